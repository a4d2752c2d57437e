//! The `Region` kind: where and how large one part of a ChatCluster runs, its backends' regional endpoints and
//! which topics replicate to which other Regions. The operator runs one MirrorMaker 2 per Region that receives
//! topics, and keeps the ChatCluster's Cassandra keyspace replicated to every Region's datacenter.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_cluster::{REDIS_URL_MESSAGE, REDIS_URL_RULE, VERSION_MESSAGE, VERSION_RULE};
use crate::common::MachineIdBlock;

/// The most gateway pods one Region may run.
pub const MAX_GATEWAY_REPLICAS: i32 = 512;
/// The most router pods one Region may run.
pub const MAX_ROUTER_REPLICAS: i32 = 64;
/// The gateway pods a Region's machine-ID block is sized for when `gateway.replicas` is set without
/// `gateway.maxReplicas` (or `replicas`, when that is larger).
pub const DEFAULT_MAX_GATEWAY_REPLICAS: i32 = 8;
/// The router pods a Region's machine-ID block is sized for when `router.maxReplicas` is not set (or
/// `router.replicas`, when that is larger).
pub const DEFAULT_MAX_ROUTER_REPLICAS: i32 = 8;

/// The CEL rule on a Region's `metadata.name`: the operator names Services (DNS-1035 labels) and pods (DNS-1123
/// labels) after it, so it must start with a lowercase letter and hold only lowercase letters, digits and `-`. It
/// holds when a Region is created (with `optionalOldSelf`, `oldSelf` has no value then); an update cannot change the
/// name, so it passes, and a Region stored before this rule existed can still get its status (the operator checks
/// every derived name again and reports `InvalidName`), finalizers and deletion.
pub const REGION_NAME_RULE: &str = "oldSelf.hasValue() || self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// The message of [`REGION_NAME_RULE`].
pub const REGION_NAME_MESSAGE: &str = "a Region name must start with a lowercase letter and hold only lowercase letters, digits and '-' (no '.'), ending with a letter or digit: the operator names Services and pods after it";

/// One region of a ChatCluster: its gateways and routers, and the regional endpoints of its backends.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "Region",
    namespaced,
    status = "RegionStatus",
    shortname = "rgn",
    category = "parley",
    doc = "One region of a ChatCluster: gateway and router replicas, regional backend endpoints and replication targets.",
    validation = Rule::new("self.metadata.name.size() <= 40").message("a Region name must be at most 40 characters, so that the names derived from it fit Kubernetes limits"),
    validation = Rule::new(REGION_NAME_RULE).optional_old_self(true).message(REGION_NAME_MESSAGE),
    printcolumn(name = "Region", type_ = "string", description = "Region name", json_path = ".spec.regionName"),
    printcolumn(name = "Cluster", type_ = "string", description = "The ChatCluster it belongs to", json_path = ".spec.clusterRef"),
    printcolumn(name = "Gateways", type_ = "string", description = "Ready gateway pods / wanted", json_path = ".status.gateways"),
    printcolumn(name = "Routers", type_ = "string", description = "Ready router pods / wanted", json_path = ".status.routers"),
    printcolumn(name = "Version", type_ = "string", description = "Parley version the Region's pods run", json_path = ".status.version"),
    printcolumn(name = "Machine IDs", type_ = "string", description = "Snowflake machine-ID block", json_path = ".status.machineIds"),
    printcolumn(name = "Ready", type_ = "string", description = "Whether the Region is ready", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", description = "Time since creation", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.replication) || self.replication.all(r, !(self.regionName in r.toRegions))")
    .message("a Region cannot replicate to itself: remove its own regionName from replication[].toRegions"))]
pub struct RegionSpec {
    /// Name of the ChatCluster, in the same namespace, that this Region belongs to. It cannot change.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("clusterRef must be the name of a ChatCluster: lowercase letters, digits and '-'"),
        validation = Rule::new("self == oldSelf").message("clusterRef is immutable: delete the Region and create a new one")
    )]
    #[schemars(length(min = 1, max = 40))]
    pub cluster_ref: String,
    /// Name of the region, for example `eu-west`; unique within the ChatCluster. The pods get it as `PARLEY_REGION`
    /// (in their logs and metrics), and other Regions' `replication[].toRegions` name it. It cannot change.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("regionName must be lowercase letters, digits and '-', starting and ending with a letter or digit"),
        validation = Rule::new("self == oldSelf").message("regionName is immutable: delete the Region and create a new one")
    )]
    #[schemars(length(min = 1, max = 32))]
    pub region_name: String,
    /// Parley version this Region runs, the image tag of its gateway and router images, instead of the
    /// ChatCluster's `version`: to roll a new version out one Region at a time, set it here on one Region, then on
    /// the ChatCluster, and remove it from the Region. Changing it rolls this Region's pods only; `status.version`
    /// shows the version its pods run once they all do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(VERSION_RULE).message(VERSION_MESSAGE))]
    #[schemars(length(min = 1, max = 128))]
    pub version: Option<String>,
    /// This region's Cassandra/Scylla datacenter. The operator adds it to the keyspace's replication
    /// (`ALTER KEYSPACE ... NetworkTopologyStrategy`) once a node of it has joined the cluster; until then the
    /// Region's `CassandraReplication` condition says it is absent. When it is added to a keyspace that already
    /// replicates elsewhere, the Region gets the condition `CassandraRebuildRequired` with the `nodetool rebuild`
    /// command to run on each node of the new datacenter; set the annotation
    /// `parley.dev/cassandra-rebuilt: "<datacenter>"` on the Region once it has run. Deleting the Region waits
    /// while the keyspace still replicates to the datacenter: move the data away, then set
    /// `parley.dev/cassandra-release-datacenter: "<datacenter>"` and the operator drops it from the replication
    /// and lets the Region go.
    pub cassandra: RegionCassandra,
    /// This region's Kafka.
    #[serde(default)]
    pub kafka: RegionKafka,
    /// This region's Redis.
    #[serde(default)]
    pub redis: RegionRedis,
    /// Gateway pods: a fixed number, or a range within which the operator scales them by their connections.
    /// `maxReplicas` sizes the gateways' part of the Region's machine-ID block.
    pub gateway: RegionGateway,
    /// Router pods. `maxReplicas` sizes the routers' part of the Region's machine-ID block.
    #[serde(default)]
    pub router: RegionRouter,
    /// Which topics replicate from this region's Kafka to which other regions. Each target is the `regionName` of
    /// another Region of the ChatCluster; one that no Region has yet is left out until it appears (this Region's
    /// `Progressing` condition says `WaitingForReplicationTarget`). For each Region that at least one rule targets, the operator runs MirrorMaker 2 in that target Region
    /// (`<target>-mirrormaker`, a Deployment with its ConfigMap `<target>-mirrormaker-config`), which copies exactly
    /// the named topics from every source into the target's Kafka as `<source regionName>.<topic>`, and tells the
    /// target's routers which regions it mirrors (`PARLEY_MIRRORED_REGIONS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub replication: Vec<ReplicationRule>,
    /// How the operator rolls the gateways (a new image or setting, `parley.dev/restart-at`) and removes them
    /// (scale-down): it drains a pod, waits for its connections to leave, replaces or removes it, and waits for the
    /// new pod to take connections before the next.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// The operator-driven rollout of the gateways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Gateway pods drained or replaced at once (1-16).
    #[serde(default = "default_max_in_flight")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("rollout.maxInFlight must be between 1 and 16"))]
    pub max_in_flight: i32,
    /// A draining pod is replaced (or removed) once it holds at most this many connections (0-1000000), or once
    /// the ChatCluster's `gateway.drainDeadlineMs` has passed since its drain began.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000000").message("rollout.drainedConnections must be between 0 and 1000000"))]
    pub drained_connections: i32,
    /// A pod is drained only while every other ready gateway is below this share of its `maxConnections`, in
    /// percent (1-100): its clients need room elsewhere.
    #[serde(default = "default_room_percent")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("rollout.roomPercent must be between 1 and 100"))]
    pub room_percent: i32,
    /// After each step, the share of the gateways' resume requests that succeeded must be at least this, in
    /// percent (0-100); below it the operator pauses the rollout (`parley.dev/rollout-paused`) with a Warning.
    #[serde(default = "default_min_resume_percent")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("rollout.minResumePercent must be between 0 and 100"))]
    pub min_resume_percent: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            drained_connections: 0,
            room_percent: default_room_percent(),
            min_resume_percent: default_min_resume_percent(),
        }
    }
}

fn default_max_in_flight() -> i32 {
    1
}

fn default_room_percent() -> i32 {
    90
}

fn default_min_resume_percent() -> i32 {
    95
}

/// A region's Cassandra/Scylla datacenter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionCassandra {
    /// Name of the datacenter, as Cassandra's snitch reports it.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9_.-]*$')")
        .message("cassandra.datacenter must be letters, digits, '_', '.' or '-'"))]
    #[schemars(length(min = 1, max = 48))]
    pub datacenter: String,
    /// Replicas of each row in this datacenter (1-9).
    #[serde(default = "default_replication_factor")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 9").message("cassandra.replicationFactor must be between 1 and 9"))]
    pub replication_factor: i32,
}

fn default_replication_factor() -> i32 {
    3
}

/// A region's Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionKafka {
    /// Bootstrap servers of this region's Kafka (`host:port,host:port`). Defaults to the ChatCluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("kafka.bootstrapServers must not be empty"))]
    #[schemars(length(max = 2048))]
    pub bootstrap_servers: Option<String>,
    /// Replicas of each topic partition MirrorMaker 2 creates in this region's Kafka when this Region receives
    /// topics (1-9): the mirrored topics and MirrorMaker 2's own (heartbeats, offset-syncs, checkpoints, and its
    /// Connect offsets, status and configs). Use 1 only for a single-broker Kafka.
    #[serde(default = "default_kafka_replication_factor")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 9").message("kafka.replicationFactor must be between 1 and 9"))]
    pub replication_factor: i32,
}

impl Default for RegionKafka {
    fn default() -> Self {
        Self { bootstrap_servers: None, replication_factor: default_kafka_replication_factor() }
    }
}

fn default_kafka_replication_factor() -> i32 {
    3
}

/// A region's Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionRedis {
    /// URL of this region's Redis: `redis://host:port`, or `rediss://host:port` for TLS; for a Redis Cluster,
    /// comma-separated seed URLs, all of one scheme. Defaults to the ChatCluster's. The ChatCluster's
    /// `redis.tlsCaSecret` and `redis.credentials` apply to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(REDIS_URL_RULE).message(REDIS_URL_MESSAGE))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
}

/// Gateway pods of a region. Set either `replicas` (a fixed count), or both `minReplicas` and `maxReplicas` (a
/// range). The operator does not scale gateways today: with a range the StatefulSet runs `minReplicas` pods (change
/// it to scale).
///
/// The Region's machine-ID block holds one ID per gateway pod the Region may ever run: `maxReplicas`, or, with
/// `replicas` and no `maxReplicas`, `replicas` or 8, whichever is larger. Changing `replicas` or `minReplicas`
/// within that bound changes nothing but the StatefulSet's `replicas`: no other pod restarts. Changing the bound
/// resizes the block, which restarts every gateway and router pod of the Region.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.replicas) ? !has(self.minReplicas) : has(self.minReplicas) && has(self.maxReplicas)")
        .message("set either gateway.replicas (a fixed count, optionally with gateway.maxReplicas) or both gateway.minReplicas and gateway.maxReplicas (a range; the operator runs minReplicas pods)"),
    validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas")
        .message("gateway.minReplicas must not exceed gateway.maxReplicas"),
    validation = Rule::new("!has(self.replicas) || !has(self.maxReplicas) || self.replicas <= self.maxReplicas")
        .message("gateway.replicas must not exceed gateway.maxReplicas")
)]
pub struct RegionGateway {
    /// A fixed number of gateway pods (1-512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 512").message("gateway.replicas must be between 1 and 512"))]
    pub replicas: Option<i32>,
    /// Lower end of the range (1-512). With `minReplicas` and `maxReplicas` the operator scales the gateways by
    /// their connections: it aims at the ChatCluster's `gateway.connectionsPerPodTarget` per pod, within the range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 512").message("gateway.minReplicas must be between 1 and 512"))]
    pub min_replicas: Option<i32>,
    /// The most gateway pods (1-512; at least `replicas` or `minReplicas`): upper end of a range, or the bound of a
    /// fixed count. The operator uses it only to size the Region's machine-ID block (one ID per possible gateway
    /// pod), so that scaling up to it restarts no pod. Required with `minReplicas`; with `replicas` it defaults to
    /// `replicas` or 8, whichever is larger. Changing it restarts the Region's gateways and routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 512").message("gateway.maxReplicas must be between 1 and 512"))]
    pub max_replicas: Option<i32>,
    /// CPU and memory of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Type of the client Service in front of the gateways.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Annotations of the client Service (for example a cloud load balancer's settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
    /// Connection-based scaling: seconds after a change of the gateway count before the operator adds pods again
    /// (0-3600).
    #[serde(default = "default_scale_up_cooldown_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("gateway.scaleUpCooldownSeconds must be between 0 and 3600"))]
    pub scale_up_cooldown_seconds: i32,
    /// Connection-based scaling: seconds after a change of the gateway count before the operator removes pods
    /// (0-86400). Each removal drains the pod first.
    #[serde(default = "default_scale_down_cooldown_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400").message("gateway.scaleDownCooldownSeconds must be between 0 and 86400"))]
    pub scale_down_cooldown_seconds: i32,
    /// Connection-based scaling: the band around the target, in percent (0-90), inside which the count does not
    /// change (the hysteresis): pods are added above `target × (1 + t)` per pod and removed below `target × (1 − t)`.
    #[serde(default = "default_scale_tolerance_percent")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 90").message("gateway.scaleTolerancePercent must be between 0 and 90"))]
    pub scale_tolerance_percent: i32,
}

fn default_scale_up_cooldown_seconds() -> i32 {
    30
}

fn default_scale_down_cooldown_seconds() -> i32 {
    300
}

fn default_scale_tolerance_percent() -> i32 {
    10
}

impl RegionGateway {
    /// The number of gateway pods to run when the operator has no connection counts to go by: the fixed count, or
    /// the minimum of the range.
    pub fn desired_replicas(&self) -> i32 {
        self.replicas.or(self.min_replicas).unwrap_or(1)
    }

    /// The range the operator scales the gateways in by their connections: `minReplicas` and `maxReplicas`, when
    /// both are set and no fixed `replicas` is.
    pub fn autoscaled_range(&self) -> Option<(i32, i32)> {
        match (self.replicas, self.min_replicas, self.max_replicas) {
            (None, Some(min), Some(max)) => Some((min, max.max(min))),
            _ => None,
        }
    }

    /// The most gateway pods this Region may run under its spec, which sizes the gateways' machine IDs:
    /// `maxReplicas`, else [`DEFAULT_MAX_GATEWAY_REPLICAS`] or the pods it runs, whichever is larger. It does not
    /// depend on `replicas` or `minReplicas` while they stay within it, and it is never below the pods it runs.
    pub fn max_replicas_bound(&self) -> i32 {
        let desired = self.desired_replicas();
        self.max_replicas.unwrap_or(DEFAULT_MAX_GATEWAY_REPLICAS).max(desired)
    }
}

/// Type of the client Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only (put an Ingress or Gateway API route in front).
    #[default]
    ClusterIP,
    /// Exposed on every node's port.
    NodePort,
    /// Exposed by a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects in a Service's `type`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Router pods of a region.
///
/// The Region's machine-ID block holds one ID per router pod the Region may ever run: `maxReplicas`, or `replicas`
/// or 8, whichever is larger. Changing `replicas` within that bound changes nothing but the router StatefulSet's
/// `replicas`: the gateways and the remaining routers keep running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.maxReplicas) || !has(self.replicas) || self.replicas <= self.maxReplicas")
        .message("router.replicas must not exceed router.maxReplicas")
)]
pub struct RegionRouter {
    /// Number of router pods (1-64). The routers share the Region's Kafka partitions: each partition, and so each
    /// channel, has one writer at a time, the router that owns it. Each router publishes the partitions it owns,
    /// with its own URL (`PARLEY_ROUTER_ADVERTISE_URL`), in Redis, and the gateways send each call to the owner of
    /// its channel's partition. More routers than the topics have partitions would stand idle.
    #[serde(default = "default_router_replicas")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("router.replicas must be between 1 and 64"))]
    pub replicas: i32,
    /// The most router pods (1-64; at least `replicas`). The operator uses it only to size the Region's machine-ID
    /// block (one ID per possible router pod), so that scaling the routers up to it restarts no pod. Defaults to
    /// `replicas` or 8, whichever is larger. Changing it restarts the Region's gateways and routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("router.maxReplicas must be between 1 and 64"))]
    pub max_replicas: Option<i32>,
    /// CPU and memory of each router container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A URL at which the routers of the other Regions reach any router of this Region (`http://` or `https://`),
    /// for a Region whose routers run in another Kubernetes cluster or behind a gateway. Without it the other
    /// Regions use this Region's router headless Service
    /// (`http://<region>-router-headless.<namespace>.svc:7070`). It reaches the other Regions' routers as part of
    /// their `PARLEY_PEER_ROUTERS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/\\\\s?#]+(/[^\\\\s]*)?$')")
        .message("router.peerUrl must be an http:// or https:// URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub peer_url: Option<String>,
}

impl RegionRouter {
    /// The most router pods this Region may run under its spec, which sizes the routers' machine IDs: `maxReplicas`,
    /// else [`DEFAULT_MAX_ROUTER_REPLICAS`] or `replicas`, whichever is larger. It does not depend on `replicas`
    /// while `replicas` stays within it, and it is never below `replicas`.
    pub fn max_replicas_bound(&self) -> i32 {
        self.max_replicas.unwrap_or(DEFAULT_MAX_ROUTER_REPLICAS).max(self.replicas)
    }
}

impl Default for RegionRouter {
    fn default() -> Self {
        Self { replicas: default_router_replicas(), max_replicas: None, resources: None, peer_url: None }
    }
}

fn default_router_replicas() -> i32 {
    1
}

/// One replication flow: topics of this region's Kafka and the regions that receive them, through the MirrorMaker 2
/// the operator runs in each receiving Region (see `replication`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationRule {
    /// Topic names without the ChatCluster's `kafka.topicPrefix` and its `-` (`messages`, `receipts`, `presence`,
    /// `memberships`), or `*` for all of them. The receiving regions deliver a channel's messages and membership
    /// changes from the copies of `messages` and `memberships`: a rule for the chat to cross regions names both.
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^([a-zA-Z0-9._-]{1,128}|[*])$'))")
        .message("each topic must be 1-128 letters, digits, '.', '_' or '-', or '*'"))]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 128)))]
    pub topics: Vec<String>,
    /// Region names (`spec.regionName` of other Regions of the same ChatCluster) that receive the topics.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 32)))]
    pub to_regions: Vec<String>,
}

/// What the operator observed of a Region.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Gateway pods that are ready.
    #[serde(default)]
    pub gateways_ready: i32,
    /// Gateway pods wanted.
    #[serde(default)]
    pub gateways_desired: i32,
    /// Router pods that are ready.
    #[serde(default)]
    pub routers_ready: i32,
    /// Router pods wanted.
    #[serde(default)]
    pub routers_desired: i32,
    /// Ready / wanted gateway pods, for example `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<String>,
    /// Ready / wanted router pods, for example `2/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routers: Option<String>,
    /// The machine-ID block of this Region, once allocated. Gateway pod `i` uses `start + i`, router pod `j` uses
    /// `start + G + j`, where `G` is the most gateway pods the block is sized for (see `gateway.maxReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id_block: Option<MachineIdBlock>,
    /// The machine-ID block as a range, for example `0-19`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_ids: Option<String>,
    /// The Secret with the token the Region's gateways and routers authenticate their calls with
    /// (`PARLEY_INTERNAL_TOKEN`), once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_token_secret: Option<String>,
    /// The NetworkPolicies applied to the Region's pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_policies: Vec<String>,
    /// The regions whose topics this Region's MirrorMaker 2 mirrors into it, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrored_regions: Vec<String>,
    /// Ready / wanted MirrorMaker 2 pods, for example `2/2`, when this Region receives topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_maker: Option<String>,
    /// Each incoming flow as this Region's routers last reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incoming_flows: Vec<IncomingFlow>,
    /// The Parley version every gateway and router pod of the Region runs (its `spec.version`, else the
    /// ChatCluster's), once they all run it; during a rollout it still shows the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The gateways' rollout as the operator drives it: one pod drained, replaced and back at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Connection-based scaling of the gateways, when `gateway.minReplicas` and `gateway.maxReplicas` are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingStatus>,
    /// The connections the gateways last reported, summed over the Region's gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_connections: Option<i64>,
}

/// The gateways' rollout: which pods run the StatefulSet's update revision, and the step under way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The gateway StatefulSet's update revision (what the pods are rolled to).
    #[serde(default)]
    pub update_revision: String,
    /// The gateway StatefulSet's current revision (what the pods not yet rolled run).
    #[serde(default)]
    pub current_revision: String,
    /// Gateway pods on the update revision.
    #[serde(default)]
    pub updated: i32,
    /// Gateway pods wanted.
    #[serde(default)]
    pub total: i32,
    /// `Idle`, `Draining` (a pod is draining before it goes), `Replacing` (its successor is starting),
    /// `Waiting` (a check holds the next step: the other pods' room, a pod not ready) or `Paused`.
    #[serde(default)]
    pub phase: String,
    /// The pod draining now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<DrainingPod>,
    /// The share of resume requests that succeeded on the gateways during the last step (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resume_rate: Option<f64>,
    /// Whether the Region's `parley.dev/rollout-paused` annotation holds the rollout.
    #[serde(default)]
    pub paused: bool,
    /// The resume totals the gateways other than the draining pods reported when the step began, against which
    /// `lastResumeRate` is measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_baseline: Option<ResumeCounts>,
    /// What the rollout is doing, for people.
    #[serde(default)]
    pub message: String,
}

/// Resume requests the gateways served, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResumeCounts {
    /// Resumes that replayed what the client missed.
    pub resumed: i64,
    /// Resumes that failed.
    pub failed: i64,
}

/// A gateway pod being drained.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainingPod {
    /// The pod's name.
    pub pod: String,
    /// The connections it still holds, as it last reported them.
    pub connections: i64,
    /// When the operator asked it to drain (RFC 3339).
    pub since: String,
}

/// Connection-based scaling of the gateways.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatus {
    /// Gateway pods running (the StatefulSet's replicas).
    pub current: i32,
    /// Gateway pods the connections call for, within `min` and `max`.
    pub desired: i32,
    /// `gateway.minReplicas`.
    pub min: i32,
    /// `gateway.maxReplicas`.
    pub max: i32,
    /// The connections per pod the scaling aims at (the ChatCluster's `gateway.targetConnectionsPerPod`).
    pub target_connections_per_pod: i64,
    /// The connections the gateways reported, summed.
    pub connections: i64,
    /// Why `desired` is what it is.
    pub reason: String,
    /// When the operator last changed the gateway count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}

/// An incoming flow (another Region's topics, copied here by MirrorMaker 2) as this Region's routers observe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncomingFlow {
    /// The source Region's `regionName`.
    pub region: String,
    /// The largest cross-region delivery latency over the routers' last report window (about 10 s): a message's
    /// append in its home → its delivery to this Region's gateways, in milliseconds. It includes MirrorMaker 2's
    /// lag: a copy that falls behind shows here.
    pub delivery_latency_ms: i64,
    /// Messages delivered in that window.
    pub messages: i64,
    /// MirrorMaker 2's lag, the largest the routers reported, in milliseconds: the transit of the source's last
    /// beacon (its routers append one every 2 s), or how long the next one is overdue when they stop arriving (a
    /// stalled or dead MirrorMaker 2 shows here even when nobody chats). Absent before the first beacon arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_lag_ms: Option<i64>,
    /// When the routers reported it (RFC 3339).
    pub reported_at: String,
}
