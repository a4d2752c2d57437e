//! The `ChatCluster` kind: one Parley installation, its images, its gateway and router settings, its backends and
//! the Snowflake settings shared by all of its Regions.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CredentialsSecret, MachineIdAllocation, MachineIdBlock, SecretKeyRef};

/// The desired state of a Parley chat platform. Its Regions (kind `Region`) say where and how large it runs.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    namespaced,
    status = "ChatClusterStatus",
    shortname = "cc",
    category = "parley",
    doc = "A Parley chat platform: images, gateway and router settings, backends and Snowflake settings shared by its Regions.",
    validation = Rule::new("self.metadata.name.size() <= 40").message("a ChatCluster name must be at most 40 characters, so that the names derived from it fit Kubernetes limits"),
    printcolumn(name = "Version", type_ = "string", description = "Parley version the cluster runs", json_path = ".spec.version"),
    printcolumn(name = "Regions", type_ = "string", description = "Ready Regions / all Regions", json_path = ".status.regionsReady"),
    printcolumn(name = "Machine IDs", type_ = "integer", description = "Snowflake machine IDs allocated to Regions (of 1024)", json_path = ".status.machineIdsAllocated"),
    printcolumn(name = "Ready", type_ = "string", description = "Whether every Region is ready", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", description = "Reason of the Ready condition", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", description = "Time since creation", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterSpec {
    /// Parley version to run. It is the image tag of the gateway and router images, for example `0.1.0`.
    #[x_kube(validation = Rule::new(VERSION_RULE).message(VERSION_MESSAGE))]
    #[schemars(length(min = 1, max = 128))]
    pub version: String,
    /// Container images of the gateway and the router.
    #[serde(default)]
    pub images: ImagesSpec,
    /// Settings of the WebSocket gateways (heartbeats, limits, drain).
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Settings of the routers (the single writers that order each conversation), and the gateways' per-connection
    /// delivery settings.
    #[serde(default)]
    pub router: RouterSettings,
    /// Channels with more members than this are fanned out on read (a feed each gateway reads once per batch,
    /// with a cache) instead of pushed per message; they get no per-member events, and presence is aggregated.
    #[serde(default = "default_fanout_threshold")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("fanoutThreshold must be between 1 and 1000000"))]
    pub fanout_threshold: i32,
    /// What happens to users a channel's owner or admin names (at creation, or with `invite`): `Direct` makes them
    /// members at once (workspaces, where everyone is a colleague); `Invite` invites them, and they become members
    /// when they join (internet-facing deployments). Private channels are joined only by members' invitation
    /// either way.
    #[serde(default)]
    pub membership_policy: MembershipPolicy,
    /// Snowflake ID settings shared by every Region.
    #[serde(default)]
    pub snowflake: SnowflakeSpec,
    /// Kafka, the durable message log.
    pub kafka: KafkaSpec,
    /// Cassandra or Scylla, the message store.
    pub cassandra: CassandraSpec,
    /// Redis, for pub/sub, presence and the user-to-gateway registry.
    #[serde(default)]
    pub redis: RedisSpec,
    /// The NetworkPolicies of each Region's pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySettings,
    /// The MirrorMaker 2 the operator runs in each Region that receives topics from other Regions (see the Region's
    /// `replication`).
    #[serde(default)]
    pub mirror_maker: MirrorMakerSettings,
    /// Client authentication.
    pub auth: AuthSpec,
    /// Push notifications for offline members, sent by the routers (each for the channels it writes) through APNs
    /// and FCM. Without it, or with neither provider, push is off and device registrations are refused
    /// (`push_disabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSpec>,
}

/// The push providers and the per-user rate. The key files are mounted from their Secrets into the router pods
/// (`/etc/parley/push`, read-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushSpec {
    /// Apple Push Notification service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsSpec>,
    /// Firebase Cloud Messaging (HTTP v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmSpec>,
    /// Pushes one user gets per minute at most, after `burstPerUser` (1-600; default 20).
    #[serde(default = "default_push_per_user_per_minute")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 600").message("push.perUserPerMinute must be between 1 and 600"))]
    pub per_user_per_minute: i32,
    /// Pushes one user may get at once (1-100; default 5).
    #[serde(default = "default_push_burst_per_user")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("push.burstPerUser must be between 1 and 100"))]
    pub burst_per_user: i32,
}

fn default_push_per_user_per_minute() -> i32 {
    20
}

fn default_push_burst_per_user() -> i32 {
    5
}

/// APNs with a token-based (`.p8`) provider key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApnsSpec {
    /// The Secret key holding the `.p8` signing key (PEM).
    pub key_secret: SecretKeyRef,
    /// The key's id (10 characters, from Apple's developer account).
    #[schemars(length(min = 1, max = 64))]
    pub key_id: String,
    /// The team id.
    #[schemars(length(min = 1, max = 64))]
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    #[schemars(length(min = 1, max = 255))]
    pub topic: String,
    /// The APNs base URL (default `https://api.push.apple.com`; `https://api.sandbox.push.apple.com` for
    /// development builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("push.apns.endpoint must be an http:// or https:// URL"))]
    #[schemars(length(max = 512))]
    pub endpoint: Option<String>,
}

/// FCM with a service account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FcmSpec {
    /// The Secret key holding the service account's JSON (`client_email`, `private_key`, `token_uri`).
    pub service_account_secret: SecretKeyRef,
    /// The Firebase project id.
    #[schemars(length(min = 1, max = 128))]
    pub project_id: String,
    /// The FCM base URL (default `https://fcm.googleapis.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("push.fcm.endpoint must be an http:// or https:// URL"))]
    #[schemars(length(max = 512))]
    pub endpoint: Option<String>,
}

fn default_fanout_threshold() -> i32 {
    1000
}

/// Container images. The tag of the gateway and router images is the ChatCluster's `version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    /// Repository of the gateway image, without a tag, for example `registry.example.com/parley/gateway`.
    #[serde(default = "default_gateway_image")]
    #[x_kube(validation = Rule::new("!self.contains('@') && !self.matches(':[^/]*$')")
        .message("images.gateway must be a repository without tag or digest; the tag is spec.version"))]
    #[schemars(length(min = 1, max = 512))]
    pub gateway: String,
    /// Repository of the router image, without a tag.
    #[serde(default = "default_router_image")]
    #[x_kube(validation = Rule::new("!self.contains('@') && !self.matches(':[^/]*$')")
        .message("images.router must be a repository without tag or digest; the tag is spec.version"))]
    #[schemars(length(min = 1, max = 512))]
    pub router: String,
    /// The whole image (with its tag) of MirrorMaker 2: an Apache Kafka 4.x image that has
    /// `/opt/kafka/bin/connect-mirror-maker.sh`, like the official `apache/kafka` images. It does not follow
    /// `version`.
    #[serde(default = "default_mirror_maker_image")]
    #[schemars(length(min = 1, max = 512))]
    pub mirror_maker: String,
    /// When the kubelet pulls the images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// Secrets with credentials for the image registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub pull_secrets: Vec<String>,
}

impl Default for ImagesSpec {
    fn default() -> Self {
        Self {
            gateway: default_gateway_image(),
            router: default_router_image(),
            mirror_maker: default_mirror_maker_image(),
            pull_policy: None,
            pull_secrets: vec![],
        }
    }
}

fn default_gateway_image() -> String {
    "parley/gateway".to_owned()
}

fn default_router_image() -> String {
    "parley/router".to_owned()
}

/// The MirrorMaker 2 image when `images.mirrorMaker` is not set.
pub const DEFAULT_MIRROR_MAKER_IMAGE: &str = "apache/kafka:4.1.0";

fn default_mirror_maker_image() -> String {
    DEFAULT_MIRROR_MAKER_IMAGE.to_owned()
}

/// The MirrorMaker 2 of each Region that receives topics: a Deployment `<region>-mirrormaker` running
/// `connect-mirror-maker.sh` in dedicated mode for that Region only (`--clusters <regionName>`), with its
/// `mm2.properties` in the ConfigMap `<region>-mirrormaker-config`. The Kafka TLS and SASL settings are the
/// ChatCluster's `kafka` ones, for every Region's Kafka.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorMakerSettings {
    /// MirrorMaker 2 pods per receiving Region (1-16). With 2 or more, the pods share the work (`tasks.max` is the
    /// number of pods) and talk to each other over MirrorMaker 2's internal REST port 8083.
    #[serde(default = "default_mirror_maker_replicas")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("mirrorMaker.replicas must be between 1 and 16"))]
    pub replicas: i32,
    /// How often MirrorMaker 2 looks for new topics and partitions to mirror, in seconds (5-60). A topic created
    /// later replicates at most this long after it appears.
    #[serde(default = "default_refresh_topics_interval_seconds")]
    #[x_kube(validation = Rule::new("self >= 5 && self <= 60").message("mirrorMaker.refreshTopicsIntervalSeconds must be between 5 and 60"))]
    pub refresh_topics_interval_seconds: i32,
    /// The cross-region delivery latency a receiving Region tolerates, in milliseconds (100-600,000; default 1,000):
    /// when the latency its routers observe on an incoming flow (a message's append in its home → its delivery here,
    /// MirrorMaker 2's lag included) goes over it, or when they stop reporting the flow, the Region is `Degraded`
    /// (`MirrorLatencyOverBudget`, `MirrorFlowSilent`).
    #[serde(default = "default_latency_budget_ms")]
    #[x_kube(validation = Rule::new("self >= 100 && self <= 600000").message("mirrorMaker.latencyBudgetMs must be between 100 and 600000"))]
    pub latency_budget_ms: i32,
    /// CPU and memory of each MirrorMaker 2 container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for MirrorMakerSettings {
    fn default() -> Self {
        Self {
            replicas: default_mirror_maker_replicas(),
            refresh_topics_interval_seconds: default_refresh_topics_interval_seconds(),
            latency_budget_ms: default_latency_budget_ms(),
            resources: None,
        }
    }
}

fn default_latency_budget_ms() -> i32 {
    1000
}

fn default_mirror_maker_replicas() -> i32 {
    1
}

fn default_refresh_topics_interval_seconds() -> i32 {
    30
}

/// Image pull policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Gateway settings. Most become a `PARLEY_*` setting of the gateway pods, in their ConfigMap
/// `<region>-gateway-config` (see the README's configuration table), so changing one rolls the gateways only. The
/// exceptions: `maxTextBytes` goes to the router pods, which enforce it (a gateway of a router reads it from the
/// router); `preStopDelaySeconds` is the pods' preStop sleep and, with `drainDeadlineMs`, sets their
/// terminationGracePeriodSeconds; `connectionsPerPodTarget` is not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.idleTimeoutMs > self.heartbeatIntervalMs").message("idleTimeoutMs must be greater than heartbeatIntervalMs, or healthy connections are closed between two heartbeats"),
    validation = Rule::new("self.drainDeadlineMs >= self.drainWindowMs").message("drainDeadlineMs must be at least drainWindowMs, so that every client is asked to reconnect before the gateway stops"),
    validation = Rule::new("self.connectionsPerPodTarget <= self.maxConnections").message("connectionsPerPodTarget must not exceed maxConnections"),
    validation = Rule::new("self.maxTextBytes < self.maxFrameBytes").message("maxTextBytes must be smaller than maxFrameBytes, since a message travels inside a frame")
)]
pub struct GatewaySettings {
    /// Heartbeat interval announced to clients, in milliseconds (1000-300000).
    #[serde(default = "default_heartbeat_interval_ms")]
    #[x_kube(validation = Rule::new("self >= 1000 && self <= 300000").message("heartbeatIntervalMs must be between 1000 and 300000"))]
    pub heartbeat_interval_ms: i32,
    /// Connections silent for this long are closed with 4009, in milliseconds (2000-3600000).
    #[serde(default = "default_idle_timeout_ms")]
    #[x_kube(validation = Rule::new("self >= 2000 && self <= 3600000").message("idleTimeoutMs must be between 2000 and 3600000"))]
    pub idle_timeout_ms: i32,
    /// Largest WebSocket frame in bytes; larger frames close the connection with 1009 (1024-16777216).
    #[serde(default = "default_max_frame_bytes")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 16777216").message("maxFrameBytes must be between 1024 and 16777216"))]
    pub max_frame_bytes: i32,
    /// Largest message text in bytes (1-1048576). The router enforces it (`PARLEY_MAX_TEXT_BYTES` of the router
    /// pods), and the gateways read it from the router, so changing it rolls the router, not the gateways.
    #[serde(default = "default_max_text_bytes")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1048576").message("maxTextBytes must be between 1 and 1048576"))]
    pub max_text_bytes: i32,
    /// Sends per second each connection may make on average (1-10000).
    #[serde(default = "default_send_rate_per_sec")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("sendRatePerSec must be between 1 and 10000"))]
    pub send_rate_per_sec: i32,
    /// Sends a connection may make in a burst (1-100000).
    #[serde(default = "default_send_burst")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("sendBurst must be between 1 and 100000"))]
    pub send_burst: i32,
    /// Frames queued per connection before it is closed with 4008 (16-65536).
    #[serde(default = "default_outbound_queue")]
    #[x_kube(validation = Rule::new("self >= 16 && self <= 65536").message("outboundQueue must be between 16 and 65536"))]
    pub outbound_queue: i32,
    /// Concurrent requests per connection before reads pause (1-4096).
    #[serde(default = "default_max_in_flight")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096").message("maxInFlight must be between 1 and 4096"))]
    pub max_in_flight: i32,
    /// Hard limit of connections per gateway pod; above it new connections get HTTP 503 (1-1000000).
    #[serde(default = "default_max_connections")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("maxConnections must be between 1 and 1000000"))]
    pub max_connections: i32,
    /// The connections per gateway pod that the operator's scaling aims at, for Regions with `gateway.minReplicas`
    /// and `gateway.maxReplicas` (1-1000000, at most maxConnections). It reaches no pod: the operator reads the
    /// connections each gateway reports on its own pod and sets the gateway count.
    #[serde(default = "default_connections_per_pod_target")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000").message("connectionsPerPodTarget must be between 1 and 1000000"))]
    pub connections_per_pod_target: i32,
    /// A drain has every client back on another gateway within this window, in milliseconds (0-600000): it asks
    /// them to reconnect at random moments spread over the window's first four fifths.
    #[serde(default = "default_drain_window_ms")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 600000").message("drainWindowMs must be between 0 and 600000"))]
    pub drain_window_ms: i32,
    /// A draining gateway stops at the latest after this, in milliseconds (1000-3600000). The pods'
    /// terminationGracePeriodSeconds is derived from it.
    #[serde(default = "default_drain_deadline_ms")]
    #[x_kube(validation = Rule::new("self >= 1000 && self <= 3600000").message("drainDeadlineMs must be between 1000 and 3600000"))]
    pub drain_deadline_ms: i32,
    /// Seconds a terminating gateway waits before it starts draining, so that load balancers stop sending it new
    /// connections first (0-60).
    #[serde(default = "default_pre_stop_delay_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 60").message("preStopDelaySeconds must be between 0 and 60"))]
    pub pre_stop_delay_seconds: i32,
    /// Port of the WebSocket, SSE and HTTP API (1024-65535).
    #[serde(default = "default_client_port")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 65535").message("port must be between 1024 and 65535 (the pods run as non-root)"))]
    pub port: i32,
    /// Port of the admin endpoints (/metrics, /admin/drain) (1024-65535).
    #[serde(default = "default_admin_port")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 65535").message("adminPort must be between 1024 and 65535 (the pods run as non-root)"))]
    pub admin_port: i32,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_frame_bytes: default_max_frame_bytes(),
            max_text_bytes: default_max_text_bytes(),
            send_rate_per_sec: default_send_rate_per_sec(),
            send_burst: default_send_burst(),
            outbound_queue: default_outbound_queue(),
            max_in_flight: default_max_in_flight(),
            max_connections: default_max_connections(),
            connections_per_pod_target: default_connections_per_pod_target(),
            drain_window_ms: default_drain_window_ms(),
            drain_deadline_ms: default_drain_deadline_ms(),
            pre_stop_delay_seconds: default_pre_stop_delay_seconds(),
            port: default_client_port(),
            admin_port: default_admin_port(),
        }
    }
}

fn default_heartbeat_interval_ms() -> i32 {
    30_000
}
fn default_idle_timeout_ms() -> i32 {
    90_000
}
fn default_max_frame_bytes() -> i32 {
    65_536
}
fn default_max_text_bytes() -> i32 {
    4096
}
fn default_send_rate_per_sec() -> i32 {
    20
}
fn default_send_burst() -> i32 {
    40
}
fn default_outbound_queue() -> i32 {
    512
}
fn default_max_in_flight() -> i32 {
    64
}
fn default_max_connections() -> i32 {
    100_000
}
fn default_connections_per_pod_target() -> i32 {
    50_000
}
fn default_drain_window_ms() -> i32 {
    20_000
}
fn default_drain_deadline_ms() -> i32 {
    60_000
}
fn default_pre_stop_delay_seconds() -> i32 {
    5
}
fn default_client_port() -> i32 {
    8080
}
fn default_admin_port() -> i32 {
    9090
}

/// Settings under `router`. `maxChannelMembers`, `retentionDays` and `adminPort` are settings of the router pods, in
/// their ConfigMap `<region>-router-config`. `ackTimeoutMs`, `maxRetransmits` and `maxUnacked` are not: they are the
/// gateways' per-connection delivery settings (each gateway retransmits the pushes its own clients have not
/// acknowledged), read only by the gateway pods, so changing them rolls the gateways and never the router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSettings {
    /// Per connection, on the gateways (`PARLEY_ACK_TIMEOUT_MS` of the gateway pods): a push its client has not
    /// acknowledged within this is retransmitted, in milliseconds (100-60000).
    #[serde(default = "default_ack_timeout_ms")]
    #[x_kube(validation = Rule::new("self >= 100 && self <= 60000").message("ackTimeoutMs must be between 100 and 60000"))]
    pub ack_timeout_ms: i32,
    /// Per connection, on the gateways (`PARLEY_MAX_RETRANSMITS` of the gateway pods): retransmits of a push before
    /// the connection is closed with 4010 (0-10); the messages stay available to `sync`.
    #[serde(default = "default_max_retransmits")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10").message("maxRetransmits must be between 0 and 10"))]
    pub max_retransmits: i32,
    /// Per connection, on the gateways (`PARLEY_MAX_UNACKED` of the gateway pods): unacknowledged pushes before the
    /// connection is closed with 4010 (1-65536).
    #[serde(default = "default_max_unacked")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65536").message("maxUnacked must be between 1 and 65536"))]
    pub max_unacked: i32,
    /// Largest channel, in members (2-1000000). The router enforces it; the gateways read it from the router.
    #[serde(default = "default_max_channel_members")]
    #[x_kube(validation = Rule::new("self >= 2 && self <= 1000000").message("maxChannelMembers must be between 2 and 1000000"))]
    pub max_channel_members: i32,
    /// Days messages are kept; 0 keeps them forever (0-36500).
    #[serde(default = "default_retention_days")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 36500").message("retentionDays must be between 0 and 36500"))]
    pub retention_days: i32,
    /// Port of the router's admin endpoints (/metrics, health) (1024-65535).
    #[serde(default = "default_admin_port")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 65535").message("adminPort must be between 1024 and 65535 (the pods run as non-root)"))]
    pub admin_port: i32,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            ack_timeout_ms: default_ack_timeout_ms(),
            max_retransmits: default_max_retransmits(),
            max_unacked: default_max_unacked(),
            max_channel_members: default_max_channel_members(),
            retention_days: default_retention_days(),
            admin_port: default_admin_port(),
        }
    }
}

fn default_ack_timeout_ms() -> i32 {
    5000
}
fn default_max_retransmits() -> i32 {
    3
}
fn default_max_unacked() -> i32 {
    1024
}
fn default_max_channel_members() -> i32 {
    10_000
}
fn default_retention_days() -> i32 {
    365
}

/// Snowflake ID settings: 41 bits of milliseconds since the epoch, 10 bits of machine ID, 12 bits of sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowflakeSpec {
    /// Epoch of the IDs, in Unix milliseconds (default 2025-01-01T00:00:00Z). It can never change once set,
    /// since IDs already stored would then sort wrongly or repeat.
    #[serde(default = "default_epoch_ms")]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("snowflake.epochMs is immutable: changing it would reorder or repeat IDs already stored"),
        validation = Rule::new("self >= 0 && self <= 4102444800000").message("snowflake.epochMs must be between 0 and 4102444800000 (year 2100)")
    )]
    pub epoch_ms: i64,
    /// Seconds a released machine ID stays unused before another pod may get it, so that a pod and its
    /// predecessor never generate IDs with the same machine ID inside the clock-skew window (5-86400, default 60).
    /// It holds for a Region's released block (the operator gives it to no other Region meanwhile) and for each
    /// router's ID: routers lease their IDs from the Region's block, and an ID a router released (or stopped
    /// renewing) waits this long before another router may lease it. A replaced router takes a spare ID at once
    /// when `router.maxReplicas` is above `router.replicas`, and otherwise waits out the quarantine.
    #[serde(default = "default_machine_id_quarantine_seconds")]
    #[x_kube(validation = Rule::new("self >= 5 && self <= 86400").message("machineIdQuarantineSeconds must be between 5 and 86400"))]
    pub machine_id_quarantine_seconds: i32,
}

impl Default for SnowflakeSpec {
    fn default() -> Self {
        Self { epoch_ms: default_epoch_ms(), machine_id_quarantine_seconds: default_machine_id_quarantine_seconds() }
    }
}

/// 2025-01-01T00:00:00Z, the default epoch of `parley-core`'s Snowflake IDs.
fn default_epoch_ms() -> i64 {
    1_735_689_600_000
}

fn default_machine_id_quarantine_seconds() -> i32 {
    60
}

/// Kafka, the durable log every message is appended to before it is confirmed. The router pods connect to it (the
/// gateways never do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.tlsCaSecret) || (has(self.tls) && self.tls)")
        .message("kafka.tlsCaSecret needs kafka.tls: true (the CA bundle only verifies the brokers' TLS certificates); set tls: true or remove tlsCaSecret"),
    validation = Rule::new("!has(self.saslMechanism) || has(self.credentials)")
        .message("kafka.saslMechanism needs kafka.credentials (SASL is used only with a username and password); set credentials or remove saslMechanism")
)]
pub struct KafkaSpec {
    /// Default bootstrap servers (`host:port,host:port`). A Region's `kafka.bootstrapServers` overrides it; one
    /// of the two must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("kafka.bootstrapServers must not be empty"))]
    #[schemars(length(max = 2048))]
    pub bootstrap_servers: Option<String>,
    /// Prefix of the router's Kafka names, so several ChatClusters can share one Kafka. The operator gives it to the
    /// router with a `-` appended: the topics are `<topicPrefix>-messages`, `<topicPrefix>-receipts` and
    /// `<topicPrefix>-presence` (`parley-messages`... with the default), the store writer's consumer group is
    /// `<topicPrefix>-store-writer` and the transactional ids are `<topicPrefix>-writer-p<partition>`. Changing it
    /// points the router at other, possibly new and empty, topics. Avoid `.`: MirrorMaker 2's default replication
    /// policy uses it to name replicated topics (`<source>.<topic>`).
    #[serde(default = "default_topic_prefix")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9._-]{1,64}$')")
        .message("kafka.topicPrefix must be 1-64 letters, digits, '.', '_' or '-'"))]
    #[schemars(length(max = 64))]
    pub topic_prefix: String,
    /// Connect to the brokers with TLS (`PARLEY_KAFKA_TLS` of the router pods; with `credentials` the protocol is
    /// SASL_SSL). The brokers' certificates are verified against `tlsCaSecret`, or the system's roots without it.
    #[serde(default)]
    pub tls: bool,
    /// A Secret key holding the PEM bundle of the CA(s) that sign the brokers' certificates; without it the
    /// system's roots are trusted. Needs `tls: true`. It is mounted read-only into the router pods as
    /// `/etc/parley/tls/kafka/ca.crt` (`PARLEY_KAFKA_TLS_CA_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_secret: Option<SecretKeyRef>,
    /// SASL mechanism used with `credentials` (`PARLEY_KAFKA_SASL_MECHANISM`): `SCRAM-SHA-512` (the default when
    /// unset), `SCRAM-SHA-256` or `PLAIN`. Needs `credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL username and password (a Secret's keys), given to the router pods as `PARLEY_KAFKA_SASL_USERNAME` and
    /// `PARLEY_KAFKA_SASL_PASSWORD` through `secretKeyRef`. Allowed without `tls`, but then the session is not
    /// encrypted and, with `PLAIN`, the password crosses the network in clear text: use it with `tls: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSecret>,
}

/// How the router authenticates to Kafka with its `credentials`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// SCRAM with SHA-512 (the default).
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// The password itself, sent to the broker (only safe over TLS).
    #[serde(rename = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    /// The value of the router's `PARLEY_KAFKA_SASL_MECHANISM`.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

fn default_topic_prefix() -> String {
    "parley".to_owned()
}

/// Cassandra or Scylla, where messages are stored from the log. The router pods connect to it (the gateways never
/// do). The operator connects to it too, with the same contact points, TLS CA and credentials (it reads those two
/// Secrets through the API server), to keep the keyspace's replication a `NetworkTopologyStrategy` with each
/// Region's datacenter and replication factor: it adds a Region's datacenter once a node of it is in the cluster
/// (`system.local`, `system.peers_v2`), never removes one on its own, and refuses to delete a Region whose datacenter
/// the keyspace still replicates to (see the Region's `cassandra`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tlsCaSecret) || (has(self.tls) && self.tls)")
    .message("cassandra.tlsCaSecret needs cassandra.tls: true (the CA bundle only verifies the nodes' TLS certificates); set tls: true or remove tlsCaSecret"))]
pub struct CassandraSpec {
    /// Contact points (`host` or `host:port`).
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub contact_points: Vec<String>,
    /// Keyspace that holds Parley's tables. It cannot change once set.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z][a-z0-9_]{0,47}$')").message("cassandra.keyspace must start with a lowercase letter and have at most 48 lowercase letters, digits or '_'"),
        validation = Rule::new("self == oldSelf").message("cassandra.keyspace is immutable")
    )]
    #[schemars(length(max = 48))]
    pub keyspace: String,
    /// Connect to the nodes with TLS (`PARLEY_CASSANDRA_TLS` of the router pods). Their certificates are verified
    /// against `tlsCaSecret`, or the system's roots without it.
    #[serde(default)]
    pub tls: bool,
    /// A Secret key holding the PEM bundle of the CA(s) that sign the nodes' certificates; without it the system's
    /// roots are trusted. Needs `tls: true`. It is mounted read-only into the router pods as
    /// `/etc/parley/tls/cassandra/ca.crt` (`PARLEY_CASSANDRA_TLS_CA_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_secret: Option<SecretKeyRef>,
    /// Username and password for Cassandra's PasswordAuthenticator (a Secret's keys), given to the router pods as
    /// `PARLEY_CASSANDRA_USERNAME` and `PARLEY_CASSANDRA_PASSWORD` through `secretKeyRef`. Allowed without `tls`,
    /// but then the password crosses the network in clear text: use it with `tls: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSecret>,
}

/// Redis, for pub/sub between routers and gateways, presence and the user-to-gateway registry. Both the gateway and
/// the router pods connect to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tlsCaSecret) || !has(self.url) || self.url.startsWith('rediss://')")
    .message("redis.tlsCaSecret needs a rediss:// (TLS) redis.url: the CA bundle only verifies TLS connections; use rediss:// or remove tlsCaSecret"))]
pub struct RedisSpec {
    /// Default URL: `redis://host:port`, or `rediss://host:port` for TLS; for a Redis Cluster, comma-separated seed
    /// URLs, all of one scheme. A Region's `redis.url` overrides it; one of the two must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(REDIS_URL_RULE).message(REDIS_URL_MESSAGE))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// A Secret key holding the PEM bundle of the CA(s) that sign the Redis servers' certificates; without it the
    /// system's roots are trusted. Only used with a `rediss://` URL (every Region of the ChatCluster must then use
    /// one). It is mounted read-only into the gateway and router pods as `/etc/parley/tls/redis/ca.crt`
    /// (`PARLEY_REDIS_TLS_CA_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_secret: Option<SecretKeyRef>,
    /// Password and, for Redis ACLs, username (a Secret's keys), given to the gateway and router pods as
    /// `PARLEY_REDIS_PASSWORD` and `PARLEY_REDIS_USERNAME` through `secretKeyRef`. The username key may be absent
    /// from the Secret (Redis' `default` user is used then). Allowed with a `redis://` URL, but then the password
    /// crosses the network in clear text: use `rediss://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSecret>,
}

/// The CEL rule of a Parley version (the ChatCluster's and a Region's `version`): a valid image tag.
pub const VERSION_RULE: &str = "self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$')";
/// The message of [`VERSION_RULE`].
pub const VERSION_MESSAGE: &str =
    "version must be a valid image tag: letters, digits, '_', '.' and '-', at most 128 characters";

/// The CEL rule of every Redis URL: one `redis://` or `rediss://` URL, or several comma-separated ones (Redis
/// Cluster seeds) of one scheme.
pub const REDIS_URL_RULE: &str =
    "self.matches('^redis://[^,]+(,\\\\s*redis://[^,]+)*$') || self.matches('^rediss://[^,]+(,\\\\s*rediss://[^,]+)*$')";
/// The message of [`REDIS_URL_RULE`].
pub const REDIS_URL_MESSAGE: &str = "redis.url must be redis://host:port, or rediss://host:port for TLS; several \
                                     comma-separated Redis Cluster seed URLs must all use the same scheme";

/// NetworkPolicies the operator creates for each Region (ingress only; egress stays open, since Kafka, Cassandra
/// and Redis run outside the Region).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySettings {
    /// Create a NetworkPolicy for the gateway pods and one for the router pods of each Region
    /// (`<region>-gateway`, `<region>-router`): the routers' internal port only from that Region's gateway pods,
    /// the gateways' client port from anywhere, the admin ports (metrics, `/admin/drain`, health) from `adminFrom`.
    /// A network plugin that enforces NetworkPolicies then drops every other ingress to those pods. False: none
    /// (the operator deletes those it made; bring your own).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may reach the gateways' and routers' admin ports, as NetworkPolicy peers (pod and namespace selectors,
    /// IP blocks). Empty (the default): every pod in the Region's namespace. To let a Prometheus in another
    /// namespace scrape them, name its namespace here (a `namespaceSelector`). The kubelet's probes are allowed
    /// either way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub admin_from: Vec<NetworkPolicyPeer>,
}

impl Default for NetworkPolicySettings {
    fn default() -> Self {
        Self { enabled: true, admin_from: Vec::new() }
    }
}

fn default_true() -> bool {
    true
}

/// Client authentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Algorithm of client JWTs.
    #[serde(default)]
    pub jwt_algorithm: JwtAlgorithm,
    /// Secret key with the HS256 secret (at least 16 bytes) or the RS256 public key (PEM).
    pub jwt_key_secret: SecretKeyRef,
    /// Secret key with the bearer token of the admin endpoints (`POST /admin/drain`). Without it the admin
    /// drain endpoint refuses every request; SIGTERM still drains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_secret: Option<SecretKeyRef>,
}

/// How channels take the users their owners and admins name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MembershipPolicy {
    /// Named users become members at once.
    #[default]
    Direct,
    /// Named users are invited, and join to accept.
    Invite,
}

impl MembershipPolicy {
    /// The value of the router's `--membership-policy`.
    pub fn as_arg(self) -> &'static str {
        match self {
            MembershipPolicy::Direct => "direct",
            MembershipPolicy::Invite => "invite",
        }
    }
}

/// Algorithm of client JWTs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256; the Secret holds the shared secret.
    #[default]
    HS256,
    /// RSA with SHA-256; the Secret holds the PEM public key.
    RS256,
}

/// What the operator observed of a ChatCluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Ready Regions out of all Regions, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions_ready: Option<String>,
    /// Number of Snowflake machine IDs held by Regions (quarantined ones excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_ids_allocated: Option<i32>,
    /// One summary per Region of this ChatCluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionSummary>,
    /// The machine-ID allocation (blocks and quarantine), written by the operator with optimistic concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id_allocation: Option<MachineIdAllocation>,
}

/// A Region as seen from its ChatCluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionSummary {
    /// Name of the Region object.
    pub name: String,
    /// The Region's `spec.regionName`.
    pub region_name: String,
    /// Gateway pods that are ready.
    pub gateways_ready: i32,
    /// Gateway pods wanted.
    pub gateways_desired: i32,
    /// Router pods that are ready.
    pub routers_ready: i32,
    /// Router pods wanted.
    pub routers_desired: i32,
    /// The Region's machine-ID block, once allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id_block: Option<MachineIdBlock>,
}
