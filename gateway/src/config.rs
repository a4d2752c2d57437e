//! Settings. Every flag can also be set through the environment variable named beside it.

use clap::{Args, Parser};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Limits and timing of the gateway.
#[derive(Debug, Clone, Args)]
pub struct GatewayConfig {
    /// Largest WebSocket frame or message accepted, in bytes; bigger ones close the connection with 1009.
    #[arg(long, env = "PARLEY_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Sustained sends per second per connection (token bucket).
    #[arg(long, env = "PARLEY_SEND_RATE_PER_SEC", default_value_t = 20)]
    pub send_rate_per_sec: u32,
    /// Burst of sends per connection.
    #[arg(long, env = "PARLEY_SEND_BURST", default_value_t = 40)]
    pub send_burst: u32,
    /// Frames queued for one connection before it is closed as a slow consumer (4008).
    #[arg(long, env = "PARLEY_OUTBOUND_QUEUE", default_value_t = 512)]
    pub outbound_queue: usize,
    /// Bytes of frames queued for one connection before it is closed as a slow consumer (4008), whichever of this
    /// and `--outbound-queue` comes first. A single frame is always taken into an empty queue.
    #[arg(long, env = "PARLEY_MAX_OUTBOUND_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_outbound_bytes: usize,
    /// A socket write (one frame, or a flush) that does not complete within this closes the connection as a slow
    /// consumer (4008) without waiting on the socket any longer, in milliseconds.
    #[arg(long, env = "PARLEY_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,
    /// Most concurrent connections of this process; more are refused with HTTP 503.
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Requests a connection may have in flight before the gateway stops reading from it.
    #[arg(long, env = "PARLEY_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Heartbeat interval announced to clients, in milliseconds.
    #[arg(long, env = "PARLEY_HEARTBEAT_INTERVAL_MS", default_value_t = 30_000)]
    pub heartbeat_interval_ms: u64,
    /// A connection silent for this long is closed as a zombie, in milliseconds.
    #[arg(long, env = "PARLEY_IDLE_TIMEOUT_MS", default_value_t = 90_000)]
    pub idle_timeout_ms: u64,
    /// Read buffer per WebSocket in bytes (small keeps idle connections cheap).
    #[arg(long, env = "PARLEY_WS_READ_BUFFER", default_value_t = 1024)]
    pub ws_read_buffer: usize,
    /// Channels with more members than this are fanned out on read (the router's feed, read once per instance and
    /// cached) and get no per-member join/leave events (presence is aggregate only).
    #[arg(long, env = "PARLEY_FANOUT_THRESHOLD", default_value_t = 1000)]
    pub fanout_threshold: u32,
    /// A pushed message not acknowledged within this time is retransmitted, in milliseconds.
    #[arg(long, env = "PARLEY_ACK_TIMEOUT_MS", default_value_t = 5_000)]
    pub ack_timeout_ms: u64,
    /// Retransmissions before the connection is closed (4010); the messages stay available to `sync`.
    #[arg(long, env = "PARLEY_MAX_RETRANSMITS", default_value_t = 3)]
    pub max_retransmits: u32,
    /// Every client of a drain is back on another instance within this window, in milliseconds: reconnect requests
    /// are spread over its first four fifths.
    #[arg(long, env = "PARLEY_DRAIN_WINDOW_MS", default_value_t = 20_000)]
    pub drain_window_ms: u64,
    /// A drain stops the instance after this long even if connections remain, in milliseconds.
    #[arg(long, env = "PARLEY_DRAIN_DEADLINE_MS", default_value_t = 60_000)]
    pub drain_deadline_ms: u64,
    /// Bearer token for the admin endpoints (`POST /admin/drain`); without it they refuse every request.
    #[arg(long, env = "PARLEY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Unacknowledged messages allowed per connection before it is closed (4010).
    #[arg(long, env = "PARLEY_MAX_UNACKED", default_value_t = 1_024)]
    pub max_unacked: usize,
}

impl GatewayConfig {
    /// The drain plan from the settings.
    pub fn drain_plan(&self) -> crate::drain::DrainPlan {
        crate::drain::DrainPlan {
            window: std::time::Duration::from_millis(self.drain_window_ms),
            deadline: std::time::Duration::from_millis(self.drain_deadline_ms.max(self.drain_window_ms)),
        }
    }

    /// The write deadline of a connection's socket (at least a millisecond).
    pub fn write_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.write_timeout_ms.max(1))
    }

    /// The ACK policy of connections.
    pub fn ack_policy(&self) -> parley_core::delivery::AckPolicy {
        parley_core::delivery::AckPolicy {
            ack_timeout_ms: self.ack_timeout_ms,
            max_retransmits: self.max_retransmits,
            max_unacked: self.max_unacked,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            send_rate_per_sec: 20,
            send_burst: 40,
            outbound_queue: 512,
            max_outbound_bytes: 4 * 1024 * 1024,
            write_timeout_ms: 10_000,
            max_connections: 100_000,
            max_in_flight: 64,
            heartbeat_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            ws_read_buffer: 1024,
            fanout_threshold: 1000,
            ack_timeout_ms: 5_000,
            max_retransmits: 3,
            max_unacked: 1_024,
            drain_window_ms: 20_000,
            drain_deadline_ms: 60_000,
            admin_token: None,
        }
    }
}

/// The pod agent: a gateway running in a Kubernetes pod watches its own Pod for a drain request (the
/// `parley.dev/drain` annotation) and publishes its figures on it (`parley.dev/gateway-status`), through the API
/// server of its in-cluster config (see [`crate::pod_agent`]). The pod is named by the identity settings'
/// `--pod-name` (`PARLEY_POD_NAME`) and `--pod-namespace` (`PARLEY_POD_NAMESPACE`).
#[derive(Debug, Clone, Args)]
pub struct PodAgentConfig {
    /// Run the pod agent (needs `--pod-name` and `--pod-namespace`, and RBAC to get, list, watch and patch that pod).
    #[arg(long, env = "PARLEY_POD_AGENT")]
    pub pod_agent: bool,
    /// The status annotation is written at most this often (and at least every 30 s), in milliseconds.
    #[arg(long, env = "PARLEY_POD_STATUS_INTERVAL_MS", default_value_t = 2_000)]
    pub pod_status_interval_ms: u64,
}

impl Default for PodAgentConfig {
    fn default() -> Self {
        Self { pod_agent: false, pod_status_interval_ms: 2_000 }
    }
}

/// The pod the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl PodAgentConfig {
    /// The agent's pod (from the identity settings) when the agent is on, `None` when it is off; an error naming
    /// what is missing when it is on without its pod.
    pub fn pod(&self, identity: &parley_telemetry::TelemetryArgs) -> Result<Option<PodRef>, String> {
        fn given(value: &Option<String>) -> Option<&str> {
            value.as_deref().map(str::trim).filter(|value| !value.is_empty())
        }
        if !self.pod_agent {
            return Ok(None);
        }
        match (given(&identity.pod_namespace), given(&identity.pod_name)) {
            (Some(namespace), Some(name)) => {
                Ok(Some(PodRef { namespace: namespace.to_owned(), name: name.to_owned() }))
            }
            (namespace, name) => {
                let missing: Vec<&str> = [
                    name.is_none().then_some("--pod-name (PARLEY_POD_NAME)"),
                    namespace.is_none().then_some("--pod-namespace (PARLEY_POD_NAMESPACE)"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(format!(
                    "--pod-agent (PARLEY_POD_AGENT) needs {}: the pod it watches and annotates",
                    missing.join(" and ")
                ))
            }
        }
    }

    /// The shortest time between two writes of the status annotation (at least 10 ms).
    pub fn status_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.pod_status_interval_ms.max(10))
    }
}

/// Authentication settings. Both key settings take one key or several, comma-separated, each optionally
/// `kid=key`: a token whose header names a `kid` is verified with that key only, one without `kid` with the key
/// given without one (see [`crate::auth`]).
#[derive(Debug, Clone, Args, Default)]
pub struct AuthConfig {
    /// Shared secret(s) for HS256 tokens (at least 16 bytes each): `secret`, or several comma-separated, each
    /// optionally `kid=secret` (key rotation).
    #[arg(long, env = "PARLEY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// PEM file(s) with the RSA public key for RS256 tokens: `path`, or several comma-separated, each optionally
    /// `kid=path` (key rotation).
    #[arg(long, env = "PARLEY_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// INSECURE: serve POST /v1/dev/login, which mints a token for any user name. For local demos only.
    #[arg(long, env = "PARLEY_INSECURE_DEV_LOGIN")]
    pub insecure_dev_login: bool,
}

/// The server API (`/server/v1/...` on the client port), for the application's backend.
#[derive(Debug, Clone, Args)]
pub struct ServerApiConfig {
    /// API key(s) of the server API (`Authorization: Bearer <key>`), comma-separated so a key can be rotated (add the
    /// new key, move the backend to it, remove the old one); at least 16 bytes each. Without it the server API
    /// answers 404 `server_api_disabled`.
    #[arg(long, env = "PARLEY_SERVER_API_KEY", hide_env_values = true)]
    pub server_api_key: Option<String>,
    /// How long a token revocation is kept, in days: at least the longest lifetime of the tokens the backend issues
    /// (a token issued before a revocation is accepted again once the revocation expired).
    #[arg(long, env = "PARLEY_REVOCATION_TTL_DAYS", default_value_t = 30)]
    pub revocation_ttl_days: u64,
}

impl Default for ServerApiConfig {
    fn default() -> Self {
        Self { server_api_key: None, revocation_ttl_days: 30 }
    }
}

impl ServerApiConfig {
    /// The accepted API keys (none: the server API is off); refuses keys shorter than 16 bytes.
    pub fn keys(&self) -> Result<Vec<String>, String> {
        let keys: Vec<String> = self
            .server_api_key
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|key| !key.is_empty())
            .map(str::to_owned)
            .collect();
        if keys.iter().any(|key| key.len() < 16) {
            return Err("--server-api-key: every key must be at least 16 bytes".into());
        }
        if self.server_api_key.is_some() && keys.is_empty() {
            return Err("--server-api-key is empty".into());
        }
        Ok(keys)
    }

    /// How long a revocation is kept (at least a day).
    pub fn revocation_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.revocation_ttl_days.max(1).saturating_mul(24 * 3600))
    }
}

/// Storage and ordering settings of the embedded router.
#[derive(Debug, Clone, Args)]
pub struct StorageConfig {
    /// Directory of the embedded database.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "./parley-data")]
    pub data_dir: PathBuf,
    /// Days messages are kept (0 keeps them forever).
    #[arg(long, env = "PARLEY_RETENTION_DAYS", default_value_t = 365)]
    pub retention_days: u64,
    /// Snowflake machine id of this process (0-1023); unique per writer.
    #[arg(long, env = "PARLEY_MACHINE_ID", default_value_t = 0)]
    pub machine_id: u16,
    /// First machine id of this workload's block (set by the operator); with it the machine id is
    /// `machine_id_base + pod_index`, and `--machine-id` is ignored.
    #[arg(long, env = "PARLEY_MACHINE_ID_BASE")]
    pub machine_id_base: Option<u16>,
    /// Size of the block starting at `machine_id_base`.
    #[arg(long, env = "PARLEY_MACHINE_ID_COUNT")]
    pub machine_id_count: Option<u16>,
    /// This pod's ordinal in its StatefulSet (set by the operator).
    #[arg(long, env = "PARLEY_POD_INDEX")]
    pub pod_index: Option<u16>,
    /// Snowflake epoch in Unix milliseconds. Never change it once messages exist.
    #[arg(long, env = "PARLEY_SNOWFLAKE_EPOCH_MS", default_value_t = parley_core::snowflake::DEFAULT_EPOCH_MS)]
    pub snowflake_epoch_ms: u64,
    /// Largest message text in bytes.
    #[arg(long, env = "PARLEY_MAX_TEXT_BYTES", default_value_t = 4096)]
    pub max_text_bytes: usize,
    /// What happens to users a channel's owner or admin names (at creation, or with `invite`): `direct` makes them
    /// members at once; `invite` invites them, and they join to accept. (A gateway of a router: the router's
    /// setting applies.)
    #[arg(long, env = "PARLEY_MEMBERSHIP_POLICY", default_value_t = parley_core::access::MembershipPolicy::Direct)]
    pub membership_policy: parley_core::access::MembershipPolicy,
    /// Largest channel.
    #[arg(long, env = "PARLEY_MAX_CHANNEL_MEMBERS", default_value_t = 10_000)]
    pub max_channel_members: u32,
}

/// `parley`: gateway + router in one process with embedded storage.
#[derive(Debug, Clone, Parser)]
#[command(name = "parley", version, about = "Parley chat server (standalone: gateway + router + embedded storage)")]
pub struct StandaloneArgs {
    /// Client address (WebSocket, HTTP API, demo page).
    #[arg(long, env = "PARLEY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin address (/metrics).
    #[arg(long, env = "PARLEY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Identity and log settings.
    #[command(flatten)]
    pub telemetry: parley_telemetry::TelemetryArgs,
    /// Gateway limits.
    #[command(flatten)]
    pub gateway: GatewayConfig,
    /// Authentication.
    #[command(flatten)]
    pub auth: AuthConfig,
    /// The server API for the application's backend.
    #[command(flatten)]
    pub server_api: ServerApiConfig,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageConfig,
    /// Push notifications for offline members (standalone: this process sends them; distributed: the routers do,
    /// and these flags are not used).
    #[command(flatten)]
    pub push: parley_push::PushConfig,
    /// Distributed layout (a separate `parley-router` and Redis).
    #[command(flatten)]
    pub cluster: ClusterConfig,
    /// The pod agent (drain requests and status through the Kubernetes API).
    #[command(flatten)]
    pub pod_agent: PodAgentConfig,
}

/// The distributed layout: when `--router-url` is set this process is a gateway only. Sends and reads go to the
/// `parley-router` process, and delivery, presence and the user→gateway registry go through Redis, so several
/// gateway processes serve one chat. Without it, the process is standalone (embedded router and storage).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterConfig {
    /// Base URL of the router's internal API, e.g. `http://127.0.0.1:7070`.
    #[arg(long, env = "PARLEY_ROUTER_URL")]
    pub router_url: Option<String>,
    /// Redis for pub/sub, presence and token revocations (`--redis-url`, required with `--router-url`; TLS with
    /// `rediss://`; `--redis-username`, `--redis-password`, `--redis-tls-ca-file`, `--redis-prefix`, which must match
    /// the router's).
    #[command(flatten)]
    pub redis: parley_bus::args::RedisArgs,
    /// Bearer token for the router's internal API.
    #[arg(long, env = "PARLEY_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Upper bound of one router call.
    #[arg(long, env = "PARLEY_ROUTER_TIMEOUT_MS", default_value_t = 5_000)]
    pub router_timeout_ms: u64,
    /// How long start-up waits for the router to answer before giving up.
    #[arg(long, env = "PARLEY_ROUTER_CONNECT_TIMEOUT_MS", default_value_t = 30_000)]
    pub router_connect_timeout_ms: u64,
}

impl StorageConfig {
    /// The Snowflake machine id of this process: from its block and pod ordinal when the operator assigned a
    /// block, else `--machine-id`.
    pub fn effective_machine_id(&self) -> Result<u16, String> {
        parley_core::snowflake::machine_id_from_block(
            self.machine_id,
            self.machine_id_base,
            self.machine_id_count,
            self.pod_index,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        StandaloneArgs::command().debug_assert();
    }

    #[test]
    fn machine_id_from_block_and_ordinal() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["parley"];
            args.extend_from_slice(extra);
            StandaloneArgs::parse_from(args).storage.effective_machine_id()
        };
        assert_eq!(parse(&["--machine-id", "7"]), Ok(7));
        assert_eq!(parse(&["--machine-id-base", "100", "--machine-id-count", "4", "--pod-index", "3"]), Ok(103));
        assert!(parse(&["--machine-id-base", "100", "--machine-id-count", "4", "--pod-index", "4"]).is_err());
        assert!(parse(&["--machine-id-base", "1020", "--pod-index", "9"]).is_err());
        assert!(parse(&["--machine-id-base", "5"]).is_err());
    }

    #[test]
    fn defaults_match() {
        let args = StandaloneArgs::parse_from(["parley"]);
        assert_eq!(args.gateway.max_frame_bytes, GatewayConfig::default().max_frame_bytes);
        assert_eq!(args.gateway.write_timeout_ms, GatewayConfig::default().write_timeout_ms);
        assert_eq!(args.gateway.max_outbound_bytes, GatewayConfig::default().max_outbound_bytes);
        assert!(args.gateway.write_timeout() <= std::time::Duration::from_secs(10), "a stuck client goes within 10 s");
        assert_eq!(args.storage.max_channel_members, 10_000);
        assert!(!args.auth.insecure_dev_login);
        assert_eq!(args.server_api.revocation_ttl_days, ServerApiConfig::default().revocation_ttl_days);
        assert_eq!(args.server_api.keys(), Ok(Vec::new()), "the server API is off by default");
    }

    #[test]
    fn the_pod_agent_needs_its_pod() {
        let pod = |extra: &[&str]| {
            let mut args = vec!["parley"];
            args.extend_from_slice(extra);
            let args = StandaloneArgs::try_parse_from(args).expect("parse");
            args.pod_agent.pod(&args.telemetry)
        };
        assert_eq!(pod(&[]), Ok(None), "off by default");
        assert_eq!(pod(&["--pod-name", "p", "--pod-namespace", "n"]), Ok(None), "a pod alone starts nothing");
        assert_eq!(
            pod(&["--pod-agent", "--pod-name", "eu-gateway-0", "--pod-namespace", "chat"]),
            Ok(Some(PodRef { namespace: "chat".into(), name: "eu-gateway-0".into() }))
        );
        let error = pod(&["--pod-agent"]).expect_err("no pod");
        assert!(error.contains("--pod-name (PARLEY_POD_NAME) and --pod-namespace (PARLEY_POD_NAMESPACE)"), "{error}");
        let error = pod(&["--pod-agent", "--pod-name", "p", "--pod-namespace", " "]).expect_err("blank");
        assert!(error.contains("--pod-namespace") && !error.contains("--pod-name "), "{error}");
        let interval = |extra: &[&str]| {
            let mut args = vec!["parley"];
            args.extend_from_slice(extra);
            StandaloneArgs::try_parse_from(args).expect("parse").pod_agent.status_interval()
        };
        assert_eq!(interval(&[]), std::time::Duration::from_secs(2));
        assert_eq!(interval(&["--pod-status-interval-ms", "0"]), std::time::Duration::from_millis(10));
    }

    #[test]
    fn server_api_keys_are_comma_separated_and_long() {
        let keys = |value: &str| ServerApiConfig { server_api_key: Some(value.into()), ..Default::default() }.keys();
        assert_eq!(
            keys("old-key-0123456789,new-key-0123456789"),
            Ok(vec!["old-key-0123456789".into(), "new-key-0123456789".into()])
        );
        assert_eq!(keys("only-key-0123456789,"), Ok(vec!["only-key-0123456789".into()]));
        assert!(keys("short").is_err());
        assert!(keys(",").is_err());
        let parsed = StandaloneArgs::parse_from([
            "parley",
            "--server-api-key",
            "a-key-of-16-bytes!",
            "--revocation-ttl-days",
            "7",
        ]);
        assert_eq!(parsed.server_api.keys(), Ok(vec!["a-key-of-16-bytes!".into()]));
        assert_eq!(parsed.server_api.revocation_ttl(), std::time::Duration::from_secs(7 * 24 * 3600));
    }
}
