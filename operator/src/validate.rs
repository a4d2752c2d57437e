//! The `validate` stage: rules that span objects, which the CRDs' CEL rules cannot express. It is pure: it takes
//! what `dereference` read from the API and returns a [`ValidatedRegion`] or the [`Error`] whose reason goes into
//! the Region's `Degraded` condition. Nothing is applied for an invalid Region.

use std::cmp::Ordering;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use parley_crds::{ChatCluster, Region};

use crate::error::Error;

/// What the `dereference` stage read for one Region.
#[derive(Clone, Debug)]
pub struct Dereferenced {
    /// The Region being reconciled.
    pub region: Region,
    /// The ChatCluster named by its `clusterRef`, if it exists.
    pub cluster: Option<ChatCluster>,
    /// Every Region in the namespace (the reconciled one may be among them).
    pub regions: Vec<Region>,
}

/// A Region that passed validation, with everything `build` needs resolved.
#[derive(Clone, Debug)]
pub struct ValidatedRegion {
    /// The Region.
    pub region: Region,
    /// Its ChatCluster.
    pub cluster: ChatCluster,
    /// Name of the Region object.
    pub name: String,
    /// Namespace of both.
    pub namespace: String,
    /// Name of the ChatCluster.
    pub cluster_name: String,
    /// The owner reference every built object carries (the Region, as controller).
    pub owner: OwnerReference,
    /// Kafka bootstrap servers: the Region's, or else the ChatCluster's.
    pub kafka_bootstrap_servers: String,
    /// Redis URL: the Region's, or else the ChatCluster's.
    pub redis_url: String,
    /// Whether that URL uses TLS (`rediss://`).
    pub redis_tls: bool,
    /// The other Regions of the ChatCluster that are not being deleted, one per region name (the oldest, as for
    /// [`Error::DuplicateRegion`]), sorted by region name: the peers its routers call and the sources its
    /// MirrorMaker 2 mirrors from.
    pub peers: Vec<Region>,
}

impl ValidatedRegion {
    /// The Parley version the Region runs, the image tag of its gateways and routers: its own `spec.version`, else
    /// the ChatCluster's.
    pub fn version(&self) -> &str {
        self.region.spec.version.as_deref().unwrap_or(&self.cluster.spec.version)
    }
}

/// The region names that the Region's replication rules name but no other Region of its ChatCluster has (yet),
/// sorted and without repeats. The Region runs without the flows to them and waits (its `Progressing` condition
/// says so); the other Regions' changes wake it when one appears.
pub fn missing_replication_targets(validated: &ValidatedRegion) -> Vec<String> {
    let mut missing: Vec<String> = validated
        .region
        .spec
        .replication
        .iter()
        .flat_map(|rule| rule.to_regions.iter())
        .filter(|target| !validated.peers.iter().any(|peer| &peer.spec.region_name == *target))
        .cloned()
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// Checks the cross-object rules for one Region:
///
/// - its ChatCluster exists ([`Error::ClusterNotFound`]);
/// - no older Region of the same ChatCluster uses its region name ([`Error::DuplicateRegion`]; the Region created
///   first keeps the name, so a running region is never disturbed by a newcomer);
/// - every object derived from its name can carry that name ([`check_names`], [`Error::InvalidName`]); this is
///   checked first, so a Region with such a name gets no machine IDs and nothing applied;
/// - Kafka bootstrap servers and a Redis URL are given by the Region or its ChatCluster
///   ([`Error::MissingKafkaBootstrap`], [`Error::MissingRedisUrl`]);
/// - the backend settings agree with each other ([`Error::InvalidBackendSettings`]): a CA bundle only with TLS
///   (for Redis: a `rediss://` URL, which may come from the Region), a SASL mechanism only with credentials, Redis
///   Cluster seeds of one scheme.
///
/// A replication target that is not (yet) the region name of another Region of the ChatCluster is no error: the
/// Region runs without that flow until the target appears ([`missing_replication_targets`]). Regions whose names
/// fail [`check_names`] never run, so they are neither peers nor holders of a region name.
pub fn validate(input: Dereferenced) -> Result<ValidatedRegion, Error> {
    let Dereferenced { region, cluster, regions } = input;
    let name = metadata(&region, "name", region.metadata.name.as_deref())?;
    let namespace = metadata(&region, "namespace", region.metadata.namespace.as_deref())?;
    check_names(&region)?;
    let cluster_name = region.spec.cluster_ref.clone();
    let cluster = cluster.filter(|c| c.metadata.name.as_deref() == Some(cluster_name.as_str())).ok_or_else(|| {
        Error::ClusterNotFound { region: name.clone(), cluster: cluster_name.clone(), namespace: namespace.clone() }
    })?;
    let owner = region
        .controller_owner_ref(&())
        .filter(|owner| !owner.uid.is_empty())
        .ok_or_else(|| Error::MissingMetadata { kind: "Region", name: name.clone(), field: "uid" })?;

    let siblings: Vec<&Region> = regions
        .iter()
        .filter(|other| {
            other.spec.cluster_ref == cluster_name
                && other.metadata.namespace.as_deref() == Some(namespace.as_str())
                && other.metadata.name.as_deref() != Some(name.as_str())
                && check_names(other).is_ok()
        })
        .collect();
    if let Some(existing) = siblings
        .iter()
        .filter(|other| other.spec.region_name == region.spec.region_name)
        .find(|other| created_before(other, &region))
    {
        return Err(Error::DuplicateRegion {
            region: name,
            region_name: region.spec.region_name.clone(),
            existing: existing.metadata.name.clone().unwrap_or_default(),
            cluster: cluster_name,
        });
    }
    let kafka_bootstrap_servers = region
        .spec
        .kafka
        .bootstrap_servers
        .clone()
        .or_else(|| cluster.spec.kafka.bootstrap_servers.clone())
        .ok_or_else(|| Error::MissingKafkaBootstrap { region: name.clone() })?;
    let redis_url = region
        .spec
        .redis
        .url
        .clone()
        .or_else(|| cluster.spec.redis.url.clone())
        .ok_or_else(|| Error::MissingRedisUrl { region: name.clone() })?;
    let redis_tls = redis_scheme_is_tls(&redis_url).ok_or_else(|| Error::InvalidBackendSettings {
        region: name.clone(),
        problem: format!(
            "its redis url {redis_url} must be redis:// or rediss:// (TLS) URLs, several ones (Redis Cluster seeds) \
             all of one scheme"
        ),
    })?;
    if let Some(problem) = backend_problem(&cluster, &cluster_name, &redis_url, redis_tls) {
        return Err(Error::InvalidBackendSettings { region: name, problem });
    }
    let peers = peers(&siblings, &region);
    Ok(ValidatedRegion {
        region,
        cluster,
        name,
        namespace,
        cluster_name,
        owner,
        kafka_bootstrap_servers,
        redis_url,
        redis_tls,
        peers,
    })
}

/// The Regions among `siblings` (other Regions of the same ChatCluster) that do not use `region`'s name, the oldest
/// of each region name, sorted by region name. A Region being deleted stays a peer until it is gone: its deletion
/// may wait (its datacenter still holds replicas) while it goes on serving its users.
fn peers(siblings: &[&Region], region: &Region) -> Vec<Region> {
    let mut peers: Vec<Region> = Vec::new();
    let mut candidates: Vec<&Region> =
        siblings.iter().copied().filter(|other| other.spec.region_name != region.spec.region_name).collect();
    candidates.sort_by(|a, b| {
        if created_before(a, b) {
            Ordering::Less
        } else if created_before(b, a) {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    });
    for candidate in candidates {
        if !peers.iter().any(|peer| peer.spec.region_name == candidate.spec.region_name) {
            peers.push(candidate.clone());
        }
    }
    peers.sort_by(|a, b| a.spec.region_name.cmp(&b.spec.region_name));
    peers
}

/// Whether a Redis URL (or comma-separated Redis Cluster seed URLs) uses TLS (`rediss://`); `None` when a URL has
/// another scheme or the seeds mix schemes.
pub fn redis_scheme_is_tls(url: &str) -> Option<bool> {
    let mut schemes = url.split(',').map(str::trim).map(|seed| {
        if seed.starts_with("rediss://") {
            Some(true)
        } else if seed.starts_with("redis://") {
            Some(false)
        } else {
            None
        }
    });
    let first = schemes.next().flatten()?;
    schemes.all(|scheme| scheme == Some(first)).then_some(first)
}

/// The first backend setting of the ChatCluster that contradicts another, or the Region's Redis URL. The CRD's CEL
/// rules refuse the same within one object; the Redis URL may come from the Region, which CEL cannot see.
fn backend_problem(cluster: &ChatCluster, cluster_name: &str, redis_url: &str, redis_tls: bool) -> Option<String> {
    let spec = &cluster.spec;
    if spec.kafka.tls_ca_secret.is_some() && !spec.kafka.tls {
        return Some(format!(
            "kafka.tlsCaSecret on chat cluster {cluster_name} needs kafka.tls: true (the CA bundle only verifies \
             the brokers' TLS certificates)"
        ));
    }
    if spec.kafka.sasl_mechanism.is_some() && spec.kafka.credentials.is_none() {
        return Some(format!(
            "kafka.saslMechanism on chat cluster {cluster_name} needs kafka.credentials (SASL is used only with a \
             username and password)"
        ));
    }
    if spec.cassandra.tls_ca_secret.is_some() && !spec.cassandra.tls {
        return Some(format!(
            "cassandra.tlsCaSecret on chat cluster {cluster_name} needs cassandra.tls: true (the CA bundle only \
             verifies the nodes' TLS certificates)"
        ));
    }
    if spec.redis.tls_ca_secret.is_some() && !redis_tls {
        return Some(format!(
            "redis.tlsCaSecret on chat cluster {cluster_name} is only used with TLS, but the region's redis url \
             {redis_url} is not rediss://: use rediss:// or remove redis.tlsCaSecret"
        ));
    }
    None
}

fn metadata(region: &Region, field: &'static str, value: Option<&str>) -> Result<String, Error> {
    value.map(str::to_owned).ok_or_else(|| Error::MissingMetadata {
        kind: "Region",
        name: region.metadata.name.clone().unwrap_or_else(|| "<unnamed>".to_owned()),
        field,
    })
}

/// Whether `a` was created before `b`: by creationTimestamp, then by name so that the order is total.
fn created_before(a: &Region, b: &Region) -> bool {
    let by_time = match (&a.metadata.creation_timestamp, &b.metadata.creation_timestamp) {
        (Some(a), Some(b)) => a.0.cmp(&b.0),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_time.then_with(|| a.metadata.name.cmp(&b.metadata.name)) == Ordering::Less
}

/// A rule the API server holds an object name (or label value) to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// A Service name: a DNS-1035 label.
    Dns1035Label,
    /// A pod name, which is also its hostname and the value of its `statefulset.kubernetes.io/pod-name` label: a
    /// DNS-1123 label.
    Dns1123Label,
    /// The name of most objects (ConfigMaps, Secrets, Deployments, ...): a DNS-1123 subdomain.
    Dns1123Subdomain,
    /// A StatefulSet name: a DNS-1123 label short enough that `<name>-<revision hash>`, the value of its pods'
    /// `controller-revision-hash` label, is a label value.
    StatefulSetName,
    /// A label value.
    LabelValue,
    /// A Role or RoleBinding name: any non-empty path segment.
    PathSegment,
}

/// Longest revision hash the StatefulSet controller appends to a StatefulSet's name in the
/// `controller-revision-hash` label (a 32-bit FNV hash, safe-encoded).
const REVISION_HASH_LENGTH: usize = 10;

impl NameRule {
    /// Whether `name` satisfies the rule.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            NameRule::Dns1035Label => is_dns1123_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase()),
            NameRule::Dns1123Label => is_dns1123_label(name),
            NameRule::Dns1123Subdomain => name.len() <= 253 && name.split('.').all(is_dns1123_label),
            NameRule::StatefulSetName => is_dns1123_label(name) && name.len() + 1 + REVISION_HASH_LENGTH <= 63,
            NameRule::LabelValue => {
                name.len() <= 63
                    && (name.is_empty()
                        || (name.starts_with(|c: char| c.is_ascii_alphanumeric())
                            && name.ends_with(|c: char| c.is_ascii_alphanumeric())
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
            }
            NameRule::PathSegment => !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%']),
        }
    }

    /// The rule in words, for a condition's message.
    pub fn describe(&self) -> &'static str {
        match self {
            NameRule::Dns1035Label => {
                "a DNS-1035 label: at most 63 lowercase letters, digits and '-', starting with a letter and ending \
                 with a letter or digit"
            }
            NameRule::Dns1123Label => {
                "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or \
                 digit"
            }
            NameRule::Dns1123Subdomain => {
                "a DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels (lowercase letters, \
                 digits and '-')"
            }
            NameRule::StatefulSetName => {
                "a DNS-1123 label of at most 52 characters, so that its pods' controller-revision-hash label \
                 (<name>-<10-character hash>) is a valid label value"
            }
            NameRule::LabelValue => {
                "a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or \
                 digit"
            }
            NameRule::PathSegment => "a path segment: not empty, '.' or '..', and without '/' or '%'",
        }
    }
}

/// Whether `name` is a DNS-1123 label: 1-63 lowercase letters, digits and `-`, starting and ending with a letter or
/// digit.
fn is_dns1123_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// One name the operator derives from a Region's name: the kind of object (or label) that carries it, the name,
/// and the rule the API server holds it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerivedName {
    /// What carries the name, for example `Service` or `label parley.dev/region`.
    pub kind: &'static str,
    /// The name.
    pub name: String,
    /// Its rule.
    pub rule: NameRule,
}

/// Every name the operator derives from the Region's name, strictest rule first: the Services (DNS-1035), the
/// StatefulSets and their pods (the pod of the highest ordinal the Region may run, `gateway.maxReplicas` and
/// `router.maxReplicas` bounds), then the ConfigMaps, Secrets, PodDisruptionBudgets, NetworkPolicies, the
/// MirrorMaker 2 Deployment, the gateways' ServiceAccount, Role and RoleBinding, and the `parley.dev/region` label.
pub fn derived_names(region: &Region) -> Vec<DerivedName> {
    use crate::build::{config_map_name, headless_service_name, object_name, Component};
    let name = region.metadata.name.as_deref().unwrap_or_default();
    let gateway = object_name(name, Component::Gateway);
    let router = object_name(name, Component::Router);
    let last_gateway = region.spec.gateway.max_replicas_bound().max(1) - 1;
    let last_router = region.spec.router.max_replicas_bound().max(1) - 1;
    let derived = |kind: &'static str, name: String, rule: NameRule| DerivedName { kind, name, rule };
    vec![
        derived("Service", gateway.clone(), NameRule::Dns1035Label),
        derived("Service", headless_service_name(name, Component::Gateway), NameRule::Dns1035Label),
        derived("Service", headless_service_name(name, Component::Router), NameRule::Dns1035Label),
        derived("StatefulSet", gateway.clone(), NameRule::StatefulSetName),
        derived("StatefulSet", router.clone(), NameRule::StatefulSetName),
        derived("Pod", format!("{gateway}-{last_gateway}"), NameRule::Dns1123Label),
        derived("Pod", format!("{router}-{last_router}"), NameRule::Dns1123Label),
        derived("ConfigMap", config_map_name(name, Component::Gateway), NameRule::Dns1123Subdomain),
        derived("ConfigMap", config_map_name(name, Component::Router), NameRule::Dns1123Subdomain),
        derived("ConfigMap", crate::mm2::config_map_name(name), NameRule::Dns1123Subdomain),
        derived("Secret", crate::internal_token::secret_name(name), NameRule::Dns1123Subdomain),
        derived("PodDisruptionBudget", gateway.clone(), NameRule::Dns1123Subdomain),
        derived("PodDisruptionBudget", router.clone(), NameRule::Dns1123Subdomain),
        derived("NetworkPolicy", gateway.clone(), NameRule::Dns1123Subdomain),
        derived("NetworkPolicy", router, NameRule::Dns1123Subdomain),
        derived("Deployment", crate::mm2::deployment_name(name), NameRule::Dns1123Subdomain),
        derived("ServiceAccount", gateway.clone(), NameRule::Dns1123Subdomain),
        derived("Role", format!("{gateway}-pod-agent"), NameRule::PathSegment),
        derived("RoleBinding", format!("{gateway}-pod-agent"), NameRule::PathSegment),
        derived("label parley.dev/region", name.to_owned(), NameRule::LabelValue),
    ]
}

/// Checks every name derived from the Region's name ([`derived_names`]) against its rule, so that nothing is
/// applied or allocated for a Region whose objects the API server would refuse. The first that fails is
/// [`Error::InvalidName`].
pub fn check_names(region: &Region) -> Result<(), Error> {
    match derived_names(region).into_iter().find(|derived| !derived.rule.allows(&derived.name)) {
        None => Ok(()),
        Some(derived) => Err(Error::InvalidName {
            region: region.metadata.name.clone().unwrap_or_default(),
            kind: derived.kind,
            name: derived.name,
            rule: derived.rule.describe(),
        }),
    }
}
