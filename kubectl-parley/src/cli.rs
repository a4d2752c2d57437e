//! The command line of `kubectl parley`.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

/// Parley on Kubernetes: a ChatCluster's status, gateway drains, and rollouts.
#[derive(Debug, Parser)]
#[command(name = "kubectl-parley", bin_name = "kubectl parley", version, about)]
pub struct Args {
    /// The connection to the API server.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the API server is and which namespace to use; the same flags as kubectl's.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct ConnectionArgs {
    /// Namespace of the objects; defaults to the kubeconfig context's namespace (else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Path of the kubeconfig file; without it `KUBECONFIG`, then `~/.kube/config`, then the in-cluster
    /// configuration.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use; defaults to its current context.
    #[arg(long, global = true)]
    pub context: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Summary of a ChatCluster: conditions, machine IDs, one row per Region, rollouts in progress, incoming
    /// MirrorMaker flows and recent Warning Events.
    Status(StatusArgs),
    /// Ask a gateway pod to drain (annotation `parley.dev/drain`): it stops accepting, moves its clients to other
    /// gateways over its drain window, then stays up not ready until the pod is deleted.
    Drain(DrainArgs),
    /// Restart, pause or resume the rollout of a Region's pods.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

/// `status` arguments.
#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    /// The ChatCluster; may be omitted when the namespace holds exactly one.
    pub cluster: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Sections and tables for people.
    Text,
    /// One JSON document with the same facts (keys documented in `report::StatusReport`).
    Json,
}

/// `drain` arguments.
#[derive(Debug, ClapArgs)]
pub struct DrainArgs {
    /// The gateway pod, for example `eu-gateway-2`.
    pub pod: String,
}

/// `rollout` subcommands; each is one merge patch of the Region's annotations.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll every gateway and router pod of the Region, one at a time, each gateway drained first
    /// (annotation `parley.dev/restart-at` set to now).
    Restart(RegionArg),
    /// Hold the Region's rollout and scale-down: the step in flight finishes, no new one starts
    /// (annotation `parley.dev/rollout-paused: "true"`).
    Pause(RegionArg),
    /// Let a paused rollout go on (removes `parley.dev/rollout-paused`).
    Resume(RegionArg),
}

/// A Region object name.
#[derive(Debug, ClapArgs)]
pub struct RegionArg {
    /// The Region object, for example `eu`.
    pub region: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let args =
            Args::try_parse_from(["kubectl-parley", "status", "-n", "chat", "-o", "json", "main"]).expect("parse");
        assert_eq!(args.connection.namespace.as_deref(), Some("chat"));
        let Command::Status(status) = args.command else { panic!("expected status") };
        assert_eq!((status.cluster.as_deref(), status.output), (Some("main"), OutputFormat::Json));

        let args = Args::try_parse_from([
            "kubectl-parley",
            "--namespace",
            "chat",
            "--kubeconfig",
            "/k",
            "drain",
            "eu-gateway-1",
        ])
        .expect("parse");
        assert_eq!(args.connection.kubeconfig, Some(PathBuf::from("/k")));
        assert!(matches!(args.command, Command::Drain(DrainArgs { ref pod }) if pod == "eu-gateway-1"));

        let args = Args::try_parse_from(["kubectl-parley", "rollout", "pause", "eu", "-n", "chat"]).expect("parse");
        assert!(
            matches!(args.command, Command::Rollout(RolloutCommand::Pause(RegionArg { ref region })) if region == "eu")
        );
    }

    #[test]
    fn rollout_needs_a_region_and_a_known_action() {
        assert!(Args::try_parse_from(["kubectl-parley", "rollout", "restart"]).is_err());
        assert!(Args::try_parse_from(["kubectl-parley", "rollout", "undo", "eu"]).is_err());
        assert!(Args::try_parse_from(["kubectl-parley", "status", "-o", "yaml"]).is_err());
    }
}
