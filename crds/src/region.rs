//! The `Region` kind: where and how large one part of a ChatCluster runs, its backends' regional endpoints and
//! which topics replicate to which other Regions. The operator runs one MirrorMaker 2 per Region that receives
//! topics, and keeps the ChatCluster's Cassandra keyspace replicated to every Region's datacenter.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_cluster::{REDIS_URL_MESSAGE, REDIS_URL_RULE};
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
    printcolumn(name = "Region", type_ = "string", description = "Region name", json_path = ".spec.regionName"),
    printcolumn(name = "Cluster", type_ = "string", description = "The ChatCluster it belongs to", json_path = ".spec.clusterRef"),
    printcolumn(name = "Gateways", type_ = "string", description = "Ready gateway pods / wanted", json_path = ".status.gateways"),
    printcolumn(name = "Routers", type_ = "string", description = "Ready router pods / wanted", json_path = ".status.routers"),
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
    /// Gateway pods: a fixed number, or a range. The operator does not scale gateways: with a range it runs
    /// `minReplicas` pods. `maxReplicas` sizes the gateways' part of the Region's machine-ID block.
    pub gateway: RegionGateway,
    /// Router pods. `maxReplicas` sizes the routers' part of the Region's machine-ID block.
    #[serde(default)]
    pub router: RegionRouter,
    /// Which topics replicate from this region's Kafka to which other regions. Each target must be the `regionName`
    /// of another Region of the ChatCluster (else this Region is Degraded with `UnknownReplicationTarget`). For each
    /// Region that at least one rule targets, the operator runs MirrorMaker 2 in that target Region
    /// (`<target>-mirrormaker`, a Deployment with its ConfigMap `<target>-mirrormaker-config`), which copies exactly
    /// the named topics from every source into the target's Kafka as `<source regionName>.<topic>`, and tells the
    /// target's routers which regions it mirrors (`PARLEY_MIRRORED_REGIONS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub replication: Vec<ReplicationRule>,
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
    /// Lower end of the range (1-512): the number of gateway pods the operator runs. Nothing scales them above it
    /// today.
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
}

impl RegionGateway {
    /// The number of gateway pods to run now: the fixed count, or the minimum of the range.
    pub fn desired_replicas(&self) -> i32 {
        self.replicas.or(self.min_replicas).unwrap_or(1)
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
