//! `parley-operator`: `crd` prints the CRDs; `run` runs the Region controller behind leader election, with
//! metrics and health on the admin port.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use kube::Client;
use parley_operator::controller::{Context, Scope};
use parley_operator::leader::{self, LeaseSettings};
use parley_operator::metrics::{self, Metrics};
use tracing::info;

/// The Parley Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "parley-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ChatCluster and Region CRDs as one multi-document YAML stream.
    Crd,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(Debug, ClapArgs)]
struct RunArgs {
    /// Namespace to watch; empty (the default) watches every namespace.
    #[arg(long, env = "PARLEY_OPERATOR_NAMESPACE", default_value = "")]
    namespace: String,

    /// Address of the admin server (`/metrics`, `/healthz`).
    #[arg(long, env = "PARLEY_OPERATOR_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,

    #[command(flatten)]
    lease: LeaseArgs,

    /// Log filter in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "PARLEY_OPERATOR_LOG", default_value = "info,kube=warn")]
    log_filter: String,
}

#[derive(Debug, ClapArgs)]
struct LeaseArgs {
    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, env = "PARLEY_OPERATOR_LEASE_NAME", default_value = "parley-operator")]
    lease_name: String,

    /// Namespace of the Lease; defaults to --namespace, else the client's default namespace (the pod's own
    /// namespace in a cluster).
    #[arg(long, env = "PARLEY_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// This replica's identity in the Lease; defaults to `$POD_NAME` or `$HOSTNAME`, plus the process id.
    #[arg(long, env = "PARLEY_OPERATOR_IDENTITY")]
    identity: Option<String>,

    /// Seconds the Lease stays valid after its last renewal; a dead leader is replaced after at most this long.
    #[arg(long, env = "PARLEY_OPERATOR_LEASE_DURATION_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_duration_seconds: u64,

    /// Seconds before expiry at which the holder renews the Lease (must be less than the duration).
    #[arg(long, env = "PARLEY_OPERATOR_LEASE_GRACE_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3599))]
    lease_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Crd => {
            for (kind, crd) in parley_crds::crds() {
                print!("---\n{}", parley_crds::render_crd(kind, &crd).context("render the CRDs")?);
            }
            Ok(())
        }
        Command::Run(run) => run_operator(run).await,
    }
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    let identity = parley_telemetry::TelemetryArgs {
        pod_name: std::env::var("POD_NAME").ok(),
        pod_namespace: std::env::var("POD_NAMESPACE").ok(),
        ..parley_telemetry::TelemetryArgs::default()
    };
    parley_telemetry::init_with_filter("parley-operator", &args.log_filter, &identity)
        .context("invalid --log-filter")?;
    if args.lease.lease_grace_seconds >= args.lease.lease_duration_seconds {
        anyhow::bail!(
            "--lease-grace-seconds ({}) must be less than --lease-duration-seconds ({})",
            args.lease.lease_grace_seconds,
            args.lease.lease_duration_seconds
        );
    }
    let client =
        Client::try_default().await.context("unable to create a Kubernetes client (KUBECONFIG or in-cluster)")?;
    let scope = if args.namespace.is_empty() { Scope::All } else { Scope::Namespace(args.namespace.clone()) };
    let lease_namespace = args.lease.lease_namespace.clone().unwrap_or_else(|| {
        if args.namespace.is_empty() {
            client.default_namespace().to_owned()
        } else {
            args.namespace.clone()
        }
    });
    let identity = args.lease.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "parley-operator".to_owned());
        format!("{host}-{}", std::process::id())
    });

    let metrics = Metrics::new();
    let listener = metrics::bind(args.admin_listen)
        .await
        .with_context(|| format!("unable to bind the admin address {}", args.admin_listen))?;
    let admin_address = listener.local_addr().context("admin address")?;
    info!(address = %admin_address, "admin server listening");
    // On stdout too, like the other binaries: a supervisor (or a test) that asked for port 0 learns the port here.
    println!("parley-operator admin listening on http://{admin_address} (metrics on http://{admin_address}/metrics)");
    let admin = tokio::spawn(metrics::serve(listener, metrics.clone()));

    let context = Context::new(client.clone(), metrics, Some(identity.clone()));
    let settings = LeaseSettings {
        name: args.lease.lease_name.clone(),
        namespace: lease_namespace,
        identity,
        duration_seconds: args.lease.lease_duration_seconds,
        grace_seconds: args.lease.lease_grace_seconds,
    };
    let result = leader::run(client, scope, settings, context, shutdown_signal()).await;
    admin.abort();
    result.context("operator stopped")
}

async fn shutdown_signal() {
    parley_telemetry::shutdown_signal().await;
    info!("shutting down");
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
    fn run_flags_parse() {
        let args = Args::try_parse_from([
            "parley-operator",
            "run",
            "--namespace",
            "chat",
            "--admin-listen",
            "127.0.0.1:9090",
            "--lease-duration-seconds",
            "6",
            "--lease-grace-seconds",
            "2",
        ])
        .expect("parse");
        let Command::Run(run) = args.command else { panic!("expected run") };
        assert_eq!(run.namespace, "chat");
        assert_eq!(run.lease.lease_duration_seconds, 6);
        assert!(Args::try_parse_from(["parley-operator", "run", "--lease-duration-seconds", "1"]).is_err());
    }
}
