//! The `build` stage: turns a [`ValidatedRegion`] and its machine-ID block into the plain Kubernetes objects that
//! `apply` will server-side apply. It is pure and deterministic: the same input always gives the same objects, so
//! a no-op reconcile has nothing to write.
//!
//! Per Region:
//! - one ConfigMap per component (`<region>-gateway-config`, `<region>-router-config`) with that component's
//!   settings only, as the `PARLEY_*` environment variables its binary reads (`parley` for the gateways,
//!   `parley-router` for the routers). Each pod template carries a hash of its own component's ConfigMap, so a
//!   gateway-only setting rolls only the gateways and a router-only setting rolls only the routers; a setting both
//!   read (`fanoutThreshold`, the Region's Redis) rolls both;
//! - the gateways: a StatefulSet (stable ordinals give each pod its machine ID), its headless Service, the client
//!   Service and a PodDisruptionBudget (maxUnavailable 1);
//! - the routers: a StatefulSet, its headless Service and a PodDisruptionBudget. Every router pod is a writer of
//!   the Kafka partitions it owns; it advertises its own URL (`PARLEY_ROUTER_ADVERTISE_URL`, its pod's DNS name
//!   under the headless Service), and the gateways' `PARLEY_ROUTER_URL` names the headless Service itself (every
//!   router), their bootstrap and fallback;
//! - a NetworkPolicy per component (unless `spec.networkPolicy.enabled` is false): the routers' internal port only
//!   from the Region's gateway pods, the gateways' client port from anywhere, the admin ports from
//!   `spec.networkPolicy.adminFrom` (default: the Region's namespace); egress is left open.
//!
//! - the MirrorMaker 2 of a Region that other Regions replicate topics into ([`crate::mm2`]): a ConfigMap with its
//!   `mm2.properties` and a Deployment;
//! - the routers' view of the other Regions: `PARLEY_PEER_ROUTERS` ([`peer_routers`]), `PARLEY_MIRRORED_REGIONS`
//!   and the ChatCluster's peer token `PARLEY_PEER_TOKEN`; their NetworkPolicy also admits the other Regions'
//!   routers of the namespace.
//!
//! Backend TLS and credentials: booleans and file paths go into the component's ConfigMap, usernames and passwords
//! into `secretKeyRef` env entries (never into a ConfigMap), and each CA bundle is a Secret volume mounted
//! read-only at `/etc/parley/tls/<kafka|cassandra|redis>/ca.crt`. Kafka and Cassandra reach the router pods only;
//! Redis reaches both. Both also get the Region's internal token (`PARLEY_INTERNAL_TOKEN`) from the Secret of
//! [`crate::internal_token`], which the controller creates before it applies anything.
//!
//! Scaling: the replica counts (`gateway.replicas` or `minReplicas`, `router.replicas`) reach only the
//! StatefulSets' `spec.replicas`. Nothing in a pod template or a ConfigMap depends on them (the machine-ID ranges
//! follow the declared maximums, see [`split_block`]), so scaling within the maximums starts or stops pods and
//! restarts none.
//!
//! Every object is owned by the Region (controller ownerReference) and labelled with the cluster, the Region and
//! the component. Pods run as non-root with a read-only root filesystem. Gateway pods get a preStop delay and a
//! terminationGracePeriodSeconds that covers the delay plus the whole drain deadline, so SIGTERM's drain is never
//! cut short by a SIGKILL.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecretKeySelector,
    SecretProjection, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use parley_crds::chat_cluster::JwtAlgorithm;
use parley_crds::common::{CredentialsSecret, SecretKeyRef, RESTART_AT_ANNOTATION};
use parley_crds::MachineIdBlock;

use crate::error::Error;
use crate::internal_token;
use crate::machine_ids::block_size;
use crate::validate::ValidatedRegion;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "parley-operator";
/// The StatefulSets' `podManagementPolicy` (immutable: the controller recreates a StatefulSet with another one,
/// orphaning its pods, which the new one adopts).
pub const POD_MANAGEMENT_POLICY: &str = "OrderedReady";

/// Annotation on pod templates with a hash of their component's ConfigMap data, so a settings change rolls the pods
/// that read it, and only those.
pub const CONFIG_HASH_ANNOTATION: &str = "parley.dev/config-hash";
/// Label with the ChatCluster name.
pub const CLUSTER_LABEL: &str = "parley.dev/cluster";
/// Label with the Region object name.
pub const REGION_LABEL: &str = "parley.dev/region";
/// Label with the Region's `spec.regionName`.
pub const REGION_NAME_LABEL: &str = "parley.dev/region-name";
/// The standard component label (`gateway` or `router`).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label the StatefulSet controller puts on each pod with its ordinal (Kubernetes 1.28+).
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// UID and GID the containers run as (the conventional "nonroot" user of distroless images).
const NON_ROOT_ID: i64 = 65532;
/// Seconds added to the drain deadline for the process to exit after its last connection closed.
const TERMINATION_MARGIN_SECONDS: i64 = 10;
/// Where the RS256 public key Secret is mounted.
const JWT_MOUNT_PATH: &str = "/etc/parley/jwt";
/// Where the router pods find the push providers' key files (`apns.p8`, `fcm.json`), read-only.
pub const PUSH_MOUNT_PATH: &str = "/etc/parley/push";
/// Under which directory each backend's CA bundle is mounted, one directory per backend.
pub const TLS_MOUNT_ROOT: &str = "/etc/parley/tls";
/// The file name of a mounted CA bundle, whatever its key in the Secret.
pub const CA_FILE_NAME: &str = "ca.crt";

/// Everything built for one Region.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionResources {
    /// The gateways' settings, read by the gateway pods through `envFrom`.
    pub gateway_config_map: ConfigMap,
    /// The routers' settings, read by the router pods through `envFrom`.
    pub router_config_map: ConfigMap,
    /// The gateways' governing headless Service.
    pub gateway_headless_service: Service,
    /// The Service clients connect to.
    pub gateway_service: Service,
    /// The gateways.
    pub gateway_stateful_set: StatefulSet,
    /// At most one gateway disrupted at a time.
    pub gateway_disruption_budget: PodDisruptionBudget,
    /// The routers' governing headless Service.
    pub router_headless_service: Service,
    /// The routers.
    pub router_stateful_set: StatefulSet,
    /// At most one router disrupted at a time.
    pub router_disruption_budget: PodDisruptionBudget,
    /// The gateways' and the routers' NetworkPolicies, in that order; none when `spec.networkPolicy.enabled` is
    /// false.
    pub network_policies: Vec<NetworkPolicy>,
    /// The Region's MirrorMaker 2 ([`crate::mm2`]), when another Region replicates topics into it.
    pub mirror_maker: Option<crate::mm2::MirrorMakerResources>,
    /// The gateways' ServiceAccount, which their pod agent uses.
    pub gateway_service_account: ServiceAccount,
    /// What the gateways' pod agent may do: read, watch and annotate its own pod, by name.
    pub gateway_role: Role,
    /// Binds [`Self::gateway_role`] to [`Self::gateway_service_account`].
    pub gateway_role_binding: RoleBinding,
}

/// The two workloads of a Region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// WebSocket gateways.
    Gateway,
    /// Routers, the per-conversation single writers.
    Router,
}

impl Component {
    /// The component label value and name suffix.
    pub fn as_str(&self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Router => "router",
        }
    }
}

/// A backend whose CA bundle may be mounted into pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Kafka (router pods).
    Kafka,
    /// Cassandra or Scylla (router pods).
    Cassandra,
    /// Redis (gateway and router pods).
    Redis,
}

impl Backend {
    /// The name of the backend's mount directory and volume prefix.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Kafka => "kafka",
            Backend::Cassandra => "cassandra",
            Backend::Redis => "redis",
        }
    }

    /// The binaries' environment variable with the path of the backend's CA bundle.
    pub fn ca_file_variable(&self) -> &'static str {
        match self {
            Backend::Kafka => "PARLEY_KAFKA_TLS_CA_FILE",
            Backend::Cassandra => "PARLEY_CASSANDRA_TLS_CA_FILE",
            Backend::Redis => "PARLEY_REDIS_TLS_CA_FILE",
        }
    }
}

/// The APNs key's file name under [`PUSH_MOUNT_PATH`].
const APNS_KEY_FILE: &str = "apns.p8";
/// The FCM service account's file name under [`PUSH_MOUNT_PATH`].
const FCM_ACCOUNT_FILE: &str = "fcm.json";

/// The push providers' key files a router pod mounts (one projected volume at [`PUSH_MOUNT_PATH`]): the APNs key
/// and the FCM service account the ChatCluster's `push` names. `None` without either.
fn push_volume(validated: &ValidatedRegion) -> Option<Volume> {
    let push = validated.cluster.spec.push.as_ref()?;
    let file = |secret: &SecretKeyRef, path: &str| VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.name.clone(),
            items: Some(vec![KeyToPath { key: secret.key.clone(), path: path.to_owned(), mode: None }]),
            optional: Some(false),
        }),
        ..VolumeProjection::default()
    };
    let mut sources = Vec::new();
    if let Some(apns) = &push.apns {
        sources.push(file(&apns.key_secret, APNS_KEY_FILE));
    }
    if let Some(fcm) = &push.fcm {
        sources.push(file(&fcm.service_account_secret, FCM_ACCOUNT_FILE));
    }
    (!sources.is_empty()).then(|| Volume {
        name: "push".to_owned(),
        projected: Some(ProjectedVolumeSource { sources: Some(sources), default_mode: Some(0o440) }),
        ..Volume::default()
    })
}

/// The directory a backend's CA bundle is mounted at, read-only.
pub fn tls_mount_path(backend: Backend) -> String {
    format!("{TLS_MOUNT_ROOT}/{}", backend.as_str())
}

/// The path of a backend's mounted CA bundle, for example `/etc/parley/tls/kafka/ca.crt`.
pub fn tls_ca_file(backend: Backend) -> String {
    format!("{}/{CA_FILE_NAME}", tls_mount_path(backend))
}

/// The CA bundles a component's pods mount: Kafka's and Cassandra's (with `tls`) for the routers, Redis' (with a
/// `rediss://` URL) for both.
pub fn tls_ca_secrets(validated: &ValidatedRegion, component: Component) -> Vec<(Backend, &SecretKeyRef)> {
    let spec = &validated.cluster.spec;
    let mut out = Vec::new();
    if component == Component::Router {
        if let Some(ca) = spec.kafka.tls_ca_secret.as_ref().filter(|_| spec.kafka.tls) {
            out.push((Backend::Kafka, ca));
        }
        if let Some(ca) = spec.cassandra.tls_ca_secret.as_ref().filter(|_| spec.cassandra.tls) {
            out.push((Backend::Cassandra, ca));
        }
    }
    if let Some(ca) = spec.redis.tls_ca_secret.as_ref().filter(|_| validated.redis_tls) {
        out.push((Backend::Redis, ca));
    }
    out
}

/// Names of the objects of a Region, derived from the Region's name (at most 40 characters, by CEL rule).
pub fn object_name(region: &str, component: Component) -> String {
    format!("{region}-{}", component.as_str())
}

/// Name of a component's headless Service.
pub fn headless_service_name(region: &str, component: Component) -> String {
    format!("{region}-{}-headless", component.as_str())
}

/// Name of a component's ConfigMap. (Operator versions before the per-component split built one ConfigMap,
/// `<region>-config`, for both; an upgraded operator deletes it as an orphan once both StatefulSets have rolled
/// onto their own ConfigMaps.)
pub fn config_map_name(region: &str, component: Component) -> String {
    format!("{region}-{}-config", component.as_str())
}

/// The value of the router's `PARLEY_KAFKA_TOPIC_PREFIX` for a ChatCluster's `kafka.topicPrefix`: the prefix and a
/// `-`, since `parley-router` appends the names directly (`{prefix}messages`). Topics are then
/// `<topicPrefix>-messages`, `<topicPrefix>-receipts` and `<topicPrefix>-presence`. Not `.`: MirrorMaker 2's default
/// replication policy uses it to name remote topics (`<source>.<topic>`).
pub fn kafka_topic_prefix(topic_prefix: &str) -> String {
    format!("{topic_prefix}-")
}

/// The URL the gateways bootstrap from and fall back to: the routers' headless Service, which resolves to every
/// ready router pod. Each call goes to the owner of its channel's partition, from the map the routers publish.
pub fn router_service_url(validated: &ValidatedRegion) -> String {
    format!(
        "http://{}.{}.svc:{ROUTER_PORT}",
        headless_service_name(&validated.name, Component::Router),
        validated.namespace
    )
}

/// The URL each router pod advertises (`PARLEY_ROUTER_ADVERTISE_URL`): its own DNS name under the headless Service.
/// `$(PARLEY_POD_NAME)` is expanded by the kubelet from the env entry before it.
pub fn router_advertise_url(validated: &ValidatedRegion) -> String {
    format!(
        "http://$(PARLEY_POD_NAME).{}.{}.svc:{ROUTER_PORT}",
        headless_service_name(&validated.name, Component::Router),
        validated.namespace
    )
}

/// The URL at which the routers of other Regions reach any router of `peer`: its `spec.router.peerUrl`, else its
/// routers' headless Service, like the gateways' `PARLEY_ROUTER_URL`.
pub fn peer_router_url(peer: &parley_crds::Region, namespace: &str) -> String {
    peer.spec.router.peer_url.clone().unwrap_or_else(|| {
        let name = peer.metadata.name.as_deref().unwrap_or_default();
        format!("http://{}.{namespace}.svc:{ROUTER_PORT}", headless_service_name(name, Component::Router))
    })
}

/// The routers' `PARLEY_PEER_ROUTERS`: `regionName=url` for every other Region of the ChatCluster, sorted by region
/// name; empty for a ChatCluster of one Region.
pub fn peer_routers(validated: &ValidatedRegion) -> String {
    validated
        .peers
        .iter()
        .map(|peer| format!("{}={}", peer.spec.region_name, peer_router_url(peer, &validated.namespace)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The machine IDs of one workload: pod `i` uses `base + i`, for `i < count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineIdRange {
    /// ID of pod 0.
    pub base: u32,
    /// IDs reserved for the workload.
    pub count: u32,
}

/// Splits a Region's block between its gateways (first, sized for the most gateway pods) and its routers (the rest,
/// sized for the most router pods). Both ranges depend on the block and the declared bounds only, never on the
/// replica counts, so scaling within the bounds leaves every pod template as it is.
pub fn split_block(
    validated: &ValidatedRegion,
    block: MachineIdBlock,
) -> Result<(MachineIdRange, MachineIdRange), Error> {
    let needed = block_size(&validated.region.spec);
    if u32::from(block.size) < needed || block.end() > u32::from(parley_crds::MACHINE_ID_SPACE) {
        return Err(Error::InvalidMachineIdBlock { region: validated.name.clone(), size: block.size.into(), needed });
    }
    let gateways = u32::try_from(validated.region.spec.gateway.max_replicas_bound()).unwrap_or(0);
    let start = u32::from(block.start);
    Ok((
        MachineIdRange { base: start, count: gateways },
        MachineIdRange { base: start + gateways, count: u32::from(block.size) - gateways },
    ))
}

/// Builds every object of a Region. `block` is the Region's machine-ID block, from [`crate::machine_ids::ensure`].
pub fn build(validated: &ValidatedRegion, block: MachineIdBlock) -> Result<RegionResources, Error> {
    let (gateway_ids, router_ids) = split_block(validated, block)?;
    let gateway = Component::Gateway;
    let router = Component::Router;
    let gateway_config_map = config_map(validated, gateway);
    let router_config_map = config_map(validated, router);
    let gateway_hash = config_hash(gateway_config_map.data.as_ref());
    let router_hash = config_hash(router_config_map.data.as_ref());
    Ok(RegionResources {
        gateway_headless_service: headless_service(validated, gateway),
        gateway_service: client_service(validated),
        gateway_stateful_set: stateful_set(validated, gateway, gateway_ids, &gateway_hash),
        gateway_disruption_budget: disruption_budget(validated, gateway),
        router_headless_service: headless_service(validated, router),
        router_stateful_set: stateful_set(validated, router, router_ids, &router_hash),
        router_disruption_budget: disruption_budget(validated, router),
        network_policies: if validated.cluster.spec.network_policy.enabled {
            vec![network_policy(validated, gateway), network_policy(validated, router)]
        } else {
            Vec::new()
        },
        gateway_config_map,
        router_config_map,
        mirror_maker: crate::mm2::build(validated)?,
        gateway_service_account: ServiceAccount {
            metadata: metadata(validated, gateway_service_account_name(&validated.name), Some(gateway)),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        gateway_role: gateway_role(validated),
        gateway_role_binding: RoleBinding {
            metadata: metadata(validated, gateway_role_name(&validated.name), Some(gateway)),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "Role".to_owned(),
                name: gateway_role_name(&validated.name),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: gateway_service_account_name(&validated.name),
                namespace: Some(validated.namespace.clone()),
                ..Subject::default()
            }]),
        },
    })
}

/// The gateways' ServiceAccount: `<region>-gateway`.
pub fn gateway_service_account_name(region: &str) -> String {
    format!("{region}-gateway")
}

/// The gateways' pod-agent Role and its RoleBinding: `<region>-gateway-pod-agent`.
pub fn gateway_role_name(region: &str) -> String {
    format!("{region}-gateway-pod-agent")
}

/// The gateways' pod agent reads and watches its own pod (for `parley.dev/drain`) and patches it (its
/// `parley.dev/gateway-status`): `get`, `list`, `watch` and `patch` on `pods`, restricted by name to the pods the
/// gateway StatefulSet may have (`<region>-gateway-0` up to the gateway bound). A list or watch is allowed by name
/// only with a `metadata.name` field selector, which is what the agent uses.
fn gateway_role(validated: &ValidatedRegion) -> Role {
    let bound = validated.region.spec.gateway.max_replicas_bound().max(1);
    let stateful_set = object_name(&validated.name, Component::Gateway);
    Role {
        metadata: metadata(validated, gateway_role_name(&validated.name), Some(Component::Gateway)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_owned()]),
            resource_names: Some((0..bound).map(|ordinal| format!("{stateful_set}-{ordinal}")).collect()),
            verbs: ["get", "list", "watch", "patch"].iter().map(|verb| (*verb).to_owned()).collect(),
            ..PolicyRule::default()
        }]),
    }
}

/// Labels that select a component's pods. They never change for the life of the Region.
pub fn selector_labels(validated: &ValidatedRegion, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CLUSTER_LABEL.to_owned(), validated.cluster_name.clone()),
        (REGION_LABEL.to_owned(), validated.name.clone()),
        (COMPONENT_LABEL.to_owned(), component.as_str().to_owned()),
    ])
}

/// Every label of a component's objects and pods.
pub fn labels(validated: &ValidatedRegion, component: Option<Component>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "parley".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), validated.cluster_name.clone()),
        ("app.kubernetes.io/part-of".to_owned(), "parley".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned()),
        ("app.kubernetes.io/version".to_owned(), validated.version().to_owned()),
        (CLUSTER_LABEL.to_owned(), validated.cluster_name.clone()),
        (REGION_LABEL.to_owned(), validated.name.clone()),
        (REGION_NAME_LABEL.to_owned(), validated.region.spec.region_name.clone()),
    ]);
    if let Some(component) = component {
        labels.insert(COMPONENT_LABEL.to_owned(), component.as_str().to_owned());
    }
    labels
}

fn metadata(validated: &ValidatedRegion, name: String, component: Option<Component>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(validated.namespace.clone()),
        labels: Some(labels(validated, component)),
        owner_references: Some(vec![validated.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The settings a component's pods read through `envFrom`: the environment variables of its binary that it reads
/// in cluster mode, and nothing else. Keys are the binaries' environment variables.
///
/// - Both: the cluster and region names (logs, metrics), the Region's Redis, and `fanoutThreshold` (the router
///   decides which channels are fanned out on read, the gateways read their feeds).
/// - The gateways (`parley`): the listeners, the router's URL, the connection limits and timings, the drain, the
///   per-connection delivery settings (`spec.router.ackTimeoutMs`, `maxRetransmits`, `maxUnacked`: each gateway
///   retransmits what its own clients have not acknowledged) and the RS256 key's path.
/// - The router (`parley-router`): its listeners, the message limits it enforces (`spec.gateway.maxTextBytes`,
///   `spec.router.maxChannelMembers`; a gateway of a router reads them from the router), retention, the Snowflake
///   epoch and machine-ID quarantine, Kafka and Cassandra (with their TLS switches and the SASL mechanism).
/// - Each mounted CA bundle's path ([`tls_ca_secrets`]). Usernames and passwords are never here: they are
///   `secretKeyRef` env entries ([`env`]).
fn config_map(validated: &ValidatedRegion, component: Component) -> ConfigMap {
    let spec = &validated.cluster.spec;
    let region = &validated.region.spec;
    let gateway = &spec.gateway;
    let router = &spec.router;
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        data.insert(key.to_owned(), value);
    };
    put("PARLEY_CLUSTER", validated.cluster_name.clone());
    put("PARLEY_REGION", region.region_name.clone());
    put("PARLEY_REDIS_URL", validated.redis_url.clone());
    put("PARLEY_FANOUT_THRESHOLD", spec.fanout_threshold.to_string());
    match component {
        Component::Gateway => {
            put("PARLEY_LISTEN", format!("0.0.0.0:{}", gateway.port));
            put("PARLEY_ADMIN_LISTEN", format!("0.0.0.0:{}", gateway.admin_port));
            // Every router: the gateways send each call to its partition's owner, from the map the routers publish.
            put("PARLEY_ROUTER_URL", router_service_url(validated));
            put("PARLEY_HEARTBEAT_INTERVAL_MS", gateway.heartbeat_interval_ms.to_string());
            put("PARLEY_IDLE_TIMEOUT_MS", gateway.idle_timeout_ms.to_string());
            put("PARLEY_MAX_FRAME_BYTES", gateway.max_frame_bytes.to_string());
            put("PARLEY_SEND_RATE_PER_SEC", gateway.send_rate_per_sec.to_string());
            put("PARLEY_SEND_BURST", gateway.send_burst.to_string());
            put("PARLEY_OUTBOUND_QUEUE", gateway.outbound_queue.to_string());
            put("PARLEY_MAX_IN_FLIGHT", gateway.max_in_flight.to_string());
            put("PARLEY_MAX_CONNECTIONS", gateway.max_connections.to_string());
            put("PARLEY_DRAIN_WINDOW_MS", gateway.drain_window_ms.to_string());
            put("PARLEY_DRAIN_DEADLINE_MS", gateway.drain_deadline_ms.to_string());
            put("PARLEY_ACK_TIMEOUT_MS", router.ack_timeout_ms.to_string());
            put("PARLEY_MAX_RETRANSMITS", router.max_retransmits.to_string());
            put("PARLEY_MAX_UNACKED", router.max_unacked.to_string());
            if spec.auth.jwt_algorithm == JwtAlgorithm::RS256 {
                put("PARLEY_JWT_RS256_PUBLIC_KEY", format!("{JWT_MOUNT_PATH}/{}", spec.auth.jwt_key_secret.key));
            }
        }
        Component::Router => {
            put("PARLEY_ROUTER_LISTEN", format!("0.0.0.0:{ROUTER_PORT}"));
            put("PARLEY_ROUTER_ADMIN_LISTEN", format!("0.0.0.0:{}", router.admin_port));
            put("PARLEY_MAX_TEXT_BYTES", gateway.max_text_bytes.to_string());
            put("PARLEY_MAX_CHANNEL_MEMBERS", router.max_channel_members.to_string());
            put("PARLEY_MEMBERSHIP_POLICY", spec.membership_policy.as_arg().to_owned());
            put("PARLEY_RETENTION_DAYS", router.retention_days.to_string());
            put("PARLEY_SNOWFLAKE_EPOCH_MS", spec.snowflake.epoch_ms.to_string());
            // The routers lease their machine IDs from the block: a released one waits this long before reuse.
            put(
                "PARLEY_MACHINE_ID_QUARANTINE_MS",
                (i64::from(spec.snowflake.machine_id_quarantine_seconds) * 1000).to_string(),
            );
            put("PARLEY_KAFKA_BOOTSTRAP_SERVERS", validated.kafka_bootstrap_servers.clone());
            put("PARLEY_KAFKA_TOPIC_PREFIX", kafka_topic_prefix(&spec.kafka.topic_prefix));
            put("PARLEY_CASSANDRA_CONTACT_POINTS", spec.cassandra.contact_points.join(","));
            put("PARLEY_CASSANDRA_KEYSPACE", spec.cassandra.keyspace.clone());
            put("PARLEY_CASSANDRA_LOCAL_DATACENTER", region.cassandra.datacenter.clone());
            put("PARLEY_CASSANDRA_REPLICATION_FACTOR", region.cassandra.replication_factor.to_string());
            if spec.kafka.tls {
                put("PARLEY_KAFKA_TLS", "true".to_owned());
            }
            if spec.kafka.credentials.is_some() {
                put("PARLEY_KAFKA_SASL_MECHANISM", spec.kafka.sasl_mechanism.unwrap_or_default().as_str().to_owned());
            }
            if spec.cassandra.tls {
                put("PARLEY_CASSANDRA_TLS", "true".to_owned());
            }
            let peers = peer_routers(validated);
            if !peers.is_empty() {
                put("PARLEY_PEER_ROUTERS", peers);
            }
            let mirrored = crate::mm2::mirrored_regions(validated);
            if !mirrored.is_empty() {
                put("PARLEY_MIRRORED_REGIONS", mirrored.join(","));
            }
            if let Some(push) = &spec.push {
                put("PARLEY_PUSH_PER_USER_PER_MINUTE", push.per_user_per_minute.to_string());
                put("PARLEY_PUSH_BURST_PER_USER", push.burst_per_user.to_string());
                if let Some(apns) = &push.apns {
                    put("PARLEY_APNS_KEY", format!("{PUSH_MOUNT_PATH}/{APNS_KEY_FILE}"));
                    put("PARLEY_APNS_KEY_ID", apns.key_id.clone());
                    put("PARLEY_APNS_TEAM_ID", apns.team_id.clone());
                    put("PARLEY_APNS_TOPIC", apns.topic.clone());
                    if let Some(endpoint) = &apns.endpoint {
                        put("PARLEY_APNS_ENDPOINT", endpoint.clone());
                    }
                }
                if let Some(fcm) = &push.fcm {
                    put("PARLEY_FCM_SERVICE_ACCOUNT", format!("{PUSH_MOUNT_PATH}/{FCM_ACCOUNT_FILE}"));
                    put("PARLEY_FCM_PROJECT_ID", fcm.project_id.clone());
                    if let Some(endpoint) = &fcm.endpoint {
                        put("PARLEY_FCM_ENDPOINT", endpoint.clone());
                    }
                }
            }
        }
    }
    for (backend, _) in tls_ca_secrets(validated, component) {
        put(backend.ca_file_variable(), tls_ca_file(backend));
    }
    ConfigMap {
        metadata: metadata(validated, config_map_name(&validated.name, component), Some(component)),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// FNV-1a (64 bit) over the sorted ConfigMap data: stable across Rust versions and operator restarts, unlike
/// `DefaultHasher`, so an unchanged config never rolls the pods.
pub fn config_hash(data: Option<&BTreeMap<String, String>>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (key, value) in data.into_iter().flatten() {
        for byte in key.bytes().chain([0]).chain(value.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// The router's internal API port (`parley-router --listen`), which the gateways call.
pub const ROUTER_PORT: i32 = 7070;

fn headless_service(validated: &ValidatedRegion, component: Component) -> Service {
    let mut ports = vec![ServicePort {
        name: Some("admin".to_owned()),
        port: admin_port(validated, component),
        target_port: Some(IntOrString::String("admin".to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }];
    if component == Component::Router {
        ports.push(ServicePort {
            name: Some("internal".to_owned()),
            port: ROUTER_PORT,
            target_port: Some(IntOrString::String("internal".to_owned())),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: metadata(validated, headless_service_name(&validated.name, component), Some(component)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(validated, component)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn client_service(validated: &ValidatedRegion) -> Service {
    let gateway = &validated.region.spec.gateway;
    let mut metadata = metadata(validated, object_name(&validated.name, Component::Gateway), Some(Component::Gateway));
    if !gateway.service_annotations.is_empty() {
        metadata.annotations = Some(gateway.service_annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(gateway.service_type.as_str().to_owned()),
            selector: Some(selector_labels(validated, Component::Gateway)),
            ports: Some(vec![ServicePort {
                name: Some("client".to_owned()),
                port: validated.cluster.spec.gateway.port,
                target_port: Some(IntOrString::String("client".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn disruption_budget(validated: &ValidatedRegion, component: Component) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(validated, object_name(&validated.name, component), Some(component)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(validated, component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The NetworkPolicy of a component's pods (ingress only; egress stays open, since the backends are outside the
/// Region). Gateways: the client port from anywhere, the admin port from the admin peers. Routers: the internal port
/// only from the Region's gateway pods, the admin port from the admin peers. The admin peers are
/// `spec.networkPolicy.adminFrom`, or every pod of the Region's namespace when it is empty.
fn network_policy(validated: &ValidatedRegion, component: Component) -> NetworkPolicy {
    let settings = &validated.cluster.spec.network_policy;
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    let pods =
        |labels: BTreeMap<String, String>| LabelSelector { match_labels: Some(labels), ..LabelSelector::default() };
    let admin_from = if settings.admin_from.is_empty() {
        vec![NetworkPolicyPeer { pod_selector: Some(LabelSelector::default()), ..NetworkPolicyPeer::default() }]
    } else {
        settings.admin_from.clone()
    };
    let service_rule = match component {
        Component::Gateway => {
            NetworkPolicyIngressRule { from: None, ports: Some(vec![tcp(validated.cluster.spec.gateway.port)]) }
        }
        // The Region's gateways, and the routers of the ChatCluster's other Regions in the namespace (their calls
        // between Regions, with the peer token).
        Component::Router => NetworkPolicyIngressRule {
            from: Some(vec![
                NetworkPolicyPeer {
                    pod_selector: Some(pods(selector_labels(validated, Component::Gateway))),
                    ..NetworkPolicyPeer::default()
                },
                NetworkPolicyPeer {
                    pod_selector: Some(pods(BTreeMap::from([
                        (CLUSTER_LABEL.to_owned(), validated.cluster_name.clone()),
                        (COMPONENT_LABEL.to_owned(), Component::Router.as_str().to_owned()),
                    ]))),
                    ..NetworkPolicyPeer::default()
                },
            ]),
            ports: Some(vec![tcp(ROUTER_PORT)]),
        },
    };
    let admin_rule =
        NetworkPolicyIngressRule { from: Some(admin_from), ports: Some(vec![tcp(admin_port(validated, component))]) };
    NetworkPolicy {
        metadata: metadata(validated, object_name(&validated.name, component), Some(component)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods(selector_labels(validated, component))),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![service_rule, admin_rule]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn admin_port(validated: &ValidatedRegion, component: Component) -> i32 {
    match component {
        Component::Gateway => validated.cluster.spec.gateway.admin_port,
        Component::Router => validated.cluster.spec.router.admin_port,
    }
}

/// terminationGracePeriodSeconds of gateway pods: the preStop delay, then the whole drain deadline, then a margin.
pub fn gateway_termination_grace_seconds(validated: &ValidatedRegion) -> i64 {
    let gateway = &validated.cluster.spec.gateway;
    let drain_seconds = (i64::from(gateway.drain_deadline_ms) + 999) / 1000;
    i64::from(gateway.pre_stop_delay_seconds) + drain_seconds + TERMINATION_MARGIN_SECONDS
}

fn stateful_set(
    validated: &ValidatedRegion,
    component: Component,
    ids: MachineIdRange,
    config_hash: &str,
) -> StatefulSet {
    let spec = &validated.region.spec;
    let replicas = match component {
        Component::Gateway => spec.gateway.desired_replicas(),
        Component::Router => spec.router.replicas,
    };
    StatefulSet {
        metadata: metadata(validated, object_name(&validated.name, component), Some(component)),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(headless_service_name(&validated.name, component)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(validated, component)),
                ..LabelSelector::default()
            },
            // One pod at a time, whatever the Kubernetes version: `Parallel` lets the StatefulSet controller start
            // or stop several at once, and with the MaxUnavailableStatefulSet feature gate (on by default since
            // 1.35) it had rollouts stall or ignore unready pods. The gateways roll `OnDelete`: the operator
            // drains each pod and deletes it ([`crate::rollout`]); the routers roll one at a time.
            pod_management_policy: Some(POD_MANAGEMENT_POLICY.to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some(
                    match component {
                        Component::Gateway => "OnDelete",
                        Component::Router => "RollingUpdate",
                    }
                    .to_owned(),
                ),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: pod_template(validated, component, ids, config_hash),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn pod_template(
    validated: &ValidatedRegion,
    component: Component,
    ids: MachineIdRange,
    config_hash: &str,
) -> PodTemplateSpec {
    let images = &validated.cluster.spec.images;
    let mut volumes =
        vec![Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() }];
    let mut mounts =
        vec![VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..VolumeMount::default() }];
    let auth = &validated.cluster.spec.auth;
    if component == Component::Gateway && auth.jwt_algorithm == JwtAlgorithm::RS256 {
        volumes.push(Volume {
            name: "jwt".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(auth.jwt_key_secret.name.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "jwt".to_owned(),
            mount_path: JWT_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    for (backend, ca) in tls_ca_secrets(validated, component) {
        let name = format!("{}-tls-ca", backend.as_str());
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath { key: ca.key.clone(), path: CA_FILE_NAME.to_owned(), mode: None }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: tls_mount_path(backend),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(volume) = push_volume(validated).filter(|_| component == Component::Router) {
        mounts.push(VolumeMount {
            name: volume.name.clone(),
            mount_path: PUSH_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(volume);
    }
    let (image, resources) = match component {
        Component::Gateway => (&images.gateway, validated.region.spec.gateway.resources.clone()),
        Component::Router => (&images.router, validated.region.spec.router.resources.clone()),
    };
    let admin_port = admin_port(validated, component);
    let mut ports = vec![ContainerPort {
        name: Some("admin".to_owned()),
        container_port: admin_port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }];
    let (probe_port, lifecycle, grace) = match component {
        Component::Gateway => {
            ports.insert(
                0,
                ContainerPort {
                    name: Some("client".to_owned()),
                    container_port: validated.cluster.spec.gateway.port,
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                },
            );
            let delay = i64::from(validated.cluster.spec.gateway.pre_stop_delay_seconds);
            let lifecycle = (delay > 0).then(|| Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction { seconds: delay }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            });
            ("client", lifecycle, gateway_termination_grace_seconds(validated))
        }
        Component::Router => {
            ports.insert(
                0,
                ContainerPort {
                    name: Some("internal".to_owned()),
                    container_port: ROUTER_PORT,
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                },
            );
            ("admin", None, 30)
        }
    };
    let mut annotations = BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned())]);
    annotations.insert("kubectl.kubernetes.io/default-container".to_owned(), component.as_str().to_owned());
    if let Some(restart_at) = validated.region.metadata.annotations.as_ref().and_then(|a| a.get(RESTART_AT_ANNOTATION))
    {
        annotations.insert(RESTART_AT_ANNOTATION.to_owned(), restart_at.clone());
    }
    let container = Container {
        name: component.as_str().to_owned(),
        image: Some(format!("{image}:{}", validated.version())),
        image_pull_policy: images.pull_policy.map(|policy| policy.as_str().to_owned()),
        ports: Some(ports),
        env: Some(env(validated, component, ids)),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: config_map_name(&validated.name, component),
                ..ConfigMapEnvSource::default()
            }),
            ..EnvFromSource::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", probe_port, 5, 3)),
        liveness_probe: Some(http_probe("/healthz", probe_port, 10, 6)),
        lifecycle,
        resources,
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pull_secrets = (!images.pull_secrets.is_empty())
        .then(|| images.pull_secrets.iter().map(|name| LocalObjectReference { name: name.clone() }).collect());
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(validated, Some(component))),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            termination_grace_period_seconds: Some(grace),
            // Only the gateways' pod agent calls the Kubernetes API, with its own ServiceAccount's token.
            service_account_name: (component == Component::Gateway)
                .then(|| gateway_service_account_name(&validated.name)),
            automount_service_account_token: Some(component == Component::Gateway),
            enable_service_links: Some(false),
            image_pull_secrets: pull_secrets,
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(NON_ROOT_ID),
                run_as_group: Some(NON_ROOT_ID),
                fs_group: Some(NON_ROOT_ID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "kubernetes.io/hostname".to_owned(),
                when_unsatisfiable: "ScheduleAnyway".to_owned(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(validated, component)),
                    ..LabelSelector::default()
                }),
                ..TopologySpreadConstraint::default()
            }]),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

fn http_probe(path: &str, port: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn literal(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value), ..EnvVar::default() }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn secret(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: optional.then_some(true),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn secret_ref(name: &str, reference: &SecretKeyRef) -> EnvVar {
    secret(name, &reference.name, &reference.key, false)
}

/// The username and password env entries of a backend's credentials. With `username_optional` a Secret without the
/// username key still starts the pod (Redis then uses its `default` user).
fn credentials(
    out: &mut Vec<EnvVar>,
    variables: (&str, &str),
    credentials: &CredentialsSecret,
    username_optional: bool,
) {
    let (username, password) = variables;
    out.push(secret(username, &credentials.secret_name, &credentials.username_key, username_optional));
    out.push(secret(password, &credentials.secret_name, &credentials.password_key, false));
}

/// Per-pod environment: identity, machine IDs and secrets (the settings are in the component's ConfigMap). Explicit
/// `env` entries take precedence over the ConfigMap's `envFrom`.
///
/// A gateway pod derives its Snowflake machine ID as `PARLEY_MACHINE_ID_BASE + PARLEY_POD_INDEX`, which is below
/// `PARLEY_MACHINE_ID_BASE + PARLEY_MACHINE_ID_COUNT`; a router pod leases one of its block (quarantined after
/// each lease, `PARLEY_MACHINE_ID_QUARANTINE_MS` in its ConfigMap). A router's `PARLEY_ROUTER_ADVERTISE_URL` follows
/// `PARLEY_POD_NAME`, which it names as `$(PARLEY_POD_NAME)` (the kubelet expands references to earlier entries
/// only). Secrets, all through `secretKeyRef`: the Region's internal token (both), the backends' usernames and
/// passwords (Kafka and Cassandra: routers; Redis: both), the JWT key and the admin token (gateways).
fn env(validated: &ValidatedRegion, component: Component, ids: MachineIdRange) -> Vec<EnvVar> {
    let spec = &validated.cluster.spec;
    let auth = &spec.auth;
    let mut out = vec![field("PARLEY_POD_NAME", "metadata.name")];
    if component == Component::Router {
        out.push(literal("PARLEY_ROUTER_ADVERTISE_URL", router_advertise_url(validated)));
    }
    out.extend([
        field("PARLEY_POD_NAMESPACE", "metadata.namespace"),
        field("PARLEY_POD_INDEX", &format!("metadata.labels['{POD_INDEX_LABEL}']")),
        literal("PARLEY_MACHINE_ID_BASE", ids.base.to_string()),
        literal("PARLEY_MACHINE_ID_COUNT", ids.count.to_string()),
        secret("PARLEY_INTERNAL_TOKEN", &internal_token::secret_name(&validated.name), internal_token::KEY, false),
    ]);
    if let Some(redis) = &spec.redis.credentials {
        credentials(&mut out, ("PARLEY_REDIS_USERNAME", "PARLEY_REDIS_PASSWORD"), redis, true);
    }
    match component {
        Component::Router => {
            out.push(secret(
                "PARLEY_PEER_TOKEN",
                &internal_token::peer_secret_name(&validated.cluster_name),
                internal_token::KEY,
                false,
            ));
            if let Some(kafka) = &spec.kafka.credentials {
                credentials(&mut out, ("PARLEY_KAFKA_SASL_USERNAME", "PARLEY_KAFKA_SASL_PASSWORD"), kafka, false);
            }
            if let Some(cassandra) = &spec.cassandra.credentials {
                credentials(&mut out, ("PARLEY_CASSANDRA_USERNAME", "PARLEY_CASSANDRA_PASSWORD"), cassandra, false);
            }
        }
        // Only the gateways authenticate clients and serve admin endpoints (`POST /admin/drain`).
        Component::Gateway => {
            // The pod agent: drains requested on the pod, connection counts published on it.
            out.push(literal("PARLEY_POD_AGENT", "true".to_owned()));
            if auth.jwt_algorithm == JwtAlgorithm::HS256 {
                out.push(secret_ref("PARLEY_JWT_HS256_SECRET", &auth.jwt_key_secret));
            }
            if let Some(admin) = &auth.admin_token_secret {
                out.push(secret_ref("PARLEY_ADMIN_TOKEN", admin));
            }
        }
    }
    out
}
