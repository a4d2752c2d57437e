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

/// Checks the cross-object rules for one Region:
///
/// - its ChatCluster exists ([`Error::ClusterNotFound`]);
/// - no older Region of the same ChatCluster uses its region name ([`Error::DuplicateRegion`]; the Region created
///   first keeps the name, so a running region is never disturbed by a newcomer);
/// - each replication target is the region name of another Region of the ChatCluster
///   ([`Error::UnknownReplicationTarget`]);
/// - Kafka bootstrap servers and a Redis URL are given by the Region or its ChatCluster
///   ([`Error::MissingKafkaBootstrap`], [`Error::MissingRedisUrl`]);
/// - the backend settings agree with each other ([`Error::InvalidBackendSettings`]): a CA bundle only with TLS
///   (for Redis: a `rediss://` URL, which may come from the Region), a SASL mechanism only with credentials, Redis
///   Cluster seeds of one scheme.
pub fn validate(input: Dereferenced) -> Result<ValidatedRegion, Error> {
    let Dereferenced { region, cluster, regions } = input;
    let name = metadata(&region, "name", region.metadata.name.as_deref())?;
    let namespace = metadata(&region, "namespace", region.metadata.namespace.as_deref())?;
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
    for rule in &region.spec.replication {
        for target in &rule.to_regions {
            if !siblings.iter().any(|other| &other.spec.region_name == target) {
                return Err(Error::UnknownReplicationTarget {
                    region: name,
                    target: target.clone(),
                    cluster: cluster_name,
                });
            }
        }
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
