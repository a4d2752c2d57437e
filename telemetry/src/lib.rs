//! What every Parley binary (`parley`, `parley-router`, `parley-operator`) shares at its edges: one set of
//! identity and log settings ([`TelemetryArgs`]), one tracing set-up ([`init`]), one shutdown-signal helper
//! ([`shutdown_signal`]) and one metrics convention ([`metrics`]: a registry built once per process, atomics
//! read at scrape time, latency histograms).
//!
//! Logs go to stderr in tracing's compact text format (ANSI colours only on a terminal). The identity settings
//! are set by the operator on every pod; each binary logs them once at start-up, so every log stream says which
//! cluster, region and pod it comes from.

use std::io::IsTerminal;

pub mod metrics;

/// Errors of the telemetry set-up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The filter as given.
        filter: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("tracing is already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Identity and log settings, read from the command line or the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log filter in tracing's `EnvFilter` syntax, e.g. `info` or `info,parley_gateway=debug`.
    #[arg(long, env = "PARLEY_LOG", default_value = "info")]
    pub log: String,
    /// Name of the ChatCluster this process serves (set by the operator; logged at start-up).
    #[arg(long, env = "PARLEY_CLUSTER")]
    pub cluster: Option<String>,
    /// Region this process serves (set by the operator; logged at start-up). A router homes the channels it creates in
    /// it (see the router's `--peer-routers`).
    #[arg(long, env = "PARLEY_REGION")]
    pub region: Option<String>,
    /// Name of this pod (set by the operator from the downward API; logged at start-up).
    #[arg(long, env = "PARLEY_POD_NAME")]
    pub pod_name: Option<String>,
    /// Namespace of this pod (set by the operator from the downward API; logged at start-up).
    #[arg(long, env = "PARLEY_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

impl Default for TelemetryArgs {
    fn default() -> Self {
        Self { log: "info".into(), cluster: None, region: None, pod_name: None, pod_namespace: None }
    }
}

/// Checks a log filter without installing it.
pub fn parse_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, TelemetryError> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|error| TelemetryError::InvalidFilter { filter: filter.to_owned(), reason: error.to_string() })
}

/// Installs the global tracing subscriber with `filter`, then logs the identity of `binary`. A filter that does
/// not parse is an error (never silently replaced by a default).
pub fn init_with_filter(binary: &str, filter: &str, args: &TelemetryArgs) -> Result<(), TelemetryError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(parse_filter(filter)?)
        .try_init()
        .map_err(|error| TelemetryError::AlreadyInitialised(error.to_string()))?;
    let none = || "-".to_owned();
    tracing::info!(
        binary,
        version = env!("CARGO_PKG_VERSION"),
        cluster = args.cluster.clone().unwrap_or_else(none),
        region = args.region.clone().unwrap_or_else(none),
        pod = args.pod_name.clone().unwrap_or_else(none),
        namespace = args.pod_namespace.clone().unwrap_or_else(none),
        "starting"
    );
    Ok(())
}

/// Installs the global tracing subscriber with `args.log`; see [`init_with_filter`].
pub fn init(binary: &str, args: &TelemetryArgs) -> Result<(), TelemetryError> {
    init_with_filter(binary, &args.log, args)
}

/// Resolves on the next SIGTERM or SIGINT (Ctrl-C). Call it again to wait for the one after.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        telemetry: TelemetryArgs,
    }

    #[test]
    fn a_bad_filter_is_refused_with_its_text() {
        let error = parse_filter("info,[").err().map(|error| error.to_string()).unwrap_or_default();
        assert!(error.contains("invalid log filter \"info,[\""), "{error}");
        assert!(parse_filter("info,parley_gateway=debug").is_ok());
    }

    #[test]
    fn identity_is_read_from_flags() {
        let probe = Probe::try_parse_from(["probe", "--region", "eu", "--cluster", "chat", "--log", "warn"])
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(probe.telemetry.region.as_deref(), Some("eu"));
        assert_eq!(probe.telemetry.cluster.as_deref(), Some("chat"));
        assert_eq!(probe.telemetry.log, "warn");
    }
}
