//! `parley-pod-runner`: plays kubelet for its own Node objects on a real API server, running the pods bound to them
//! as local processes (see `parley_e2e::runner` and `e2e/runner/README.md`).
//!
//! `run` serves until SIGTERM or Ctrl-C, then stops every process and deletes its nodes. `pod-exec` is the runner's
//! own step inside a container's namespaces; it is not meant to be called by hand.

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use parley_e2e::runner::{self, dns::Addresses, images::ImageMap, node};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A kubelet stand-in for the test stack.
#[derive(Debug, Parser)]
#[command(name = "parley-pod-runner", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register the nodes and run the pods bound to them.
    Run(Box<RunArgs>),
    /// Set up a container's namespaces and exec its program (the runner's own step).
    #[command(hide = true)]
    PodExec {
        /// The exec spec (JSON) the runner wrote.
        spec: PathBuf,
    },
}

#[derive(Debug, ClapArgs)]
struct RunArgs {
    /// Directory of the binaries the images map to (default: the directory of this executable).
    #[arg(long)]
    binaries: Option<PathBuf>,

    /// Pod directories and container logs (`logs/<namespace>/<pod>/<container>.log`).
    #[arg(long, default_value = "/var/tmp/parley-pod-runner")]
    state_dir: PathBuf,

    /// Node name prefix: the nodes are `<prefix>-0` .. `<prefix>-<nodes - 1>`.
    #[arg(long, default_value = "parley-runner")]
    node_prefix: String,

    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,

    /// Extra node label, `KEY=VALUE` (repeatable).
    #[arg(long = "node-label")]
    node_labels: Vec<String>,

    /// Node taint, `KEY[=VALUE]:EFFECT` (repeatable).
    #[arg(long = "node-taint")]
    node_taints: Vec<String>,

    /// Pods per node.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,

    /// More images, `REPOSITORY=BINARY` (repeatable), besides parley/gateway=parley and parley/router=parley-router.
    #[arg(long = "image")]
    images: Vec<String>,

    /// MirrorMaker 2 pods, `[REPOSITORY=]LAUNCHER` (repeatable; REPOSITORY defaults to apache/kafka): a container of
    /// that image running /opt/kafka/bin/connect-mirror-maker.sh runs LAUNCHER (e2e/stack's bin/mm2-run) instead.
    #[arg(long = "mm2-launcher", env = "PARLEY_MM2_RUN", value_delimiter = ',')]
    mm2_launchers: Vec<String>,

    /// First two octets of the pod addresses, in 127/8.
    #[arg(long, default_value = "127.1")]
    address_prefix: String,

    /// Cluster domain of Service and pod names.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,

    /// First restart delay of a crashed container, in seconds (a kubelet's: 10).
    #[arg(long, default_value_t = 10.0)]
    restart_backoff: f64,

    /// Longest restart delay, in seconds (a kubelet's: 300).
    #[arg(long, default_value_t = 300.0)]
    max_restart_backoff: f64,

    /// Leave the Node objects behind on exit (by default they are deleted).
    #[arg(long)]
    keep_nodes: bool,

    /// Log filter (`tracing_subscriber::EnvFilter` syntax).
    #[arg(long, env = "PARLEY_POD_RUNNER_LOG", default_value = "info,kube=warn")]
    log_filter: String,
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds, not {value}"))
}

fn config(args: &RunArgs) -> anyhow::Result<runner::Config> {
    let binaries = match &args.binaries {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(PathBuf::from)
            .context("this executable has no directory")?,
    };
    let mut images = ImageMap::builtin();
    for spec in &args.images {
        images.add(spec).map_err(anyhow::Error::msg)?;
    }
    for spec in &args.mm2_launchers {
        images.add_mirror_maker(spec).map_err(anyhow::Error::msg)?;
    }
    let labels: BTreeMap<String, String> = args
        .node_labels
        .iter()
        .map(|label| node::parse_label(label))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let taints = args
        .node_taints
        .iter()
        .map(|taint| node::parse_taint(taint))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    Ok(runner::Config {
        binaries,
        state_dir: args.state_dir.clone(),
        nodes: node::NodeSettings {
            names: (0..args.nodes).map(|n| format!("{}-{n}", args.node_prefix)).collect(),
            labels,
            taints,
            max_pods: args.max_pods,
        },
        images,
        address_prefix: Addresses::parse_prefix(&args.address_prefix).map_err(anyhow::Error::msg)?,
        cluster_domain: args.cluster_domain.clone(),
        backoff: seconds(args.restart_backoff, "--restart-backoff")?,
        max_backoff: seconds(args.max_restart_backoff, "--max-restart-backoff")?,
        delete_nodes_on_exit: !args.keep_nodes,
        api_server: None,
    })
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::PodExec { spec } => match runner::pod_exec(&spec) {
            Ok(never) => match never {},
            Err(error) => {
                eprintln!("parley-pod-runner pod-exec: {error}");
                std::process::exit(127);
            }
        },
        Command::Run(run) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&run.log_filter).context("invalid --log-filter")?,
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let config = config(&run)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?
                .block_on(async {
                    let kube_config = kube::Config::infer()
                        .await
                        .context("unable to find a Kubernetes configuration (KUBECONFIG or in-cluster)")?;
                    // Pods reach this API server as the `kubernetes` Service.
                    let api_server = runner::env::ApiServer::from_url(&kube_config.cluster_url.to_string())
                        .map_err(anyhow::Error::msg)?;
                    let client = kube::Client::try_from(kube_config).context("unable to create a Kubernetes client")?;
                    let config = runner::Config { api_server: Some(api_server), ..config };
                    runner::run(client, config, shutdown_signal()).await.context("the pod runner failed")
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent_and_parse() {
        Args::command().debug_assert();
        let args = Args::try_parse_from([
            "parley-pod-runner",
            "run",
            "--binaries",
            "/b",
            "--nodes",
            "2",
            "--node-prefix",
            "t",
            "--node-label",
            "a=b",
            "--node-taint",
            "a=b:NoSchedule",
            "--image",
            "r/x=parley",
            "--address-prefix",
            "127.9",
            "--mm2-launcher",
            "/st/bin/mm2-run",
        ])
        .expect("parse");
        let Command::Run(run) = args.command else { panic!("expected run") };
        let config = config(&run).expect("config");
        assert_eq!(config.nodes.names, vec!["t-0".to_owned(), "t-1".to_owned()]);
        assert_eq!(config.address_prefix, [127, 9]);
        assert!(config.images.lookup("r/x:1").is_some());
        assert_eq!(
            config.images.lookup("apache/kafka:4.1.0").map(|entry| entry.binary.as_str()),
            Some("/st/bin/mm2-run")
        );
        assert_eq!(config.backoff, Duration::from_secs(10));
    }
}
