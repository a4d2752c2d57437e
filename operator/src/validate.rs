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
}

/// Checks the cross-object rules for one Region:
///
/// - its ChatCluster exists ([`Error::ClusterNotFound`]);
/// - no older Region of the same ChatCluster uses its region name ([`Error::DuplicateRegion`]; the Region created
///   first keeps the name, so a running region is never disturbed by a newcomer);
/// - each replication target is the region name of another Region of the ChatCluster
///   ([`Error::UnknownReplicationTarget`]);
/// - Kafka bootstrap servers and a Redis URL are given by the Region or its ChatCluster.
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
    let spec = &cluster.spec;
    let on_cluster = |setting: &str| format!("{setting} on chat cluster {cluster_name}");
    let refused = [
        (spec.kafka.tls, on_cluster("kafka.tls")),
        (spec.kafka.credentials.is_some(), on_cluster("kafka.credentials")),
        (spec.cassandra.tls, on_cluster("cassandra.tls")),
        (spec.cassandra.credentials.is_some(), on_cluster("cassandra.credentials")),
        (spec.redis.credentials.is_some(), on_cluster("redis.credentials")),
        (redis_url.starts_with("rediss://"), "a rediss:// (TLS) redis url".to_owned()),
        (region.spec.router.replicas != 1, format!("router.replicas {}", region.spec.router.replicas)),
    ];
    if let Some((_, setting)) = refused.into_iter().find(|(set, _)| *set) {
        return Err(Error::Unsupported { region: name, setting });
    }
    Ok(ValidatedRegion { region, cluster, name, namespace, cluster_name, owner, kafka_bootstrap_servers, redis_url })
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
