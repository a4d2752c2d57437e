//! The operator's error type. Each variant maps to the `reason` of the `Degraded` condition and of the Event the
//! controller records, so a kubectl user sees why a Region is not reconciled.

/// Errors of the operator's pure core.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Two Regions of one ChatCluster use the same `spec.regionName`. The older Region keeps it.
    #[error("region {region} uses the region name {region_name}, which region {existing} of chat cluster {cluster} already uses")]
    DuplicateRegion {
        /// The Region that is refused.
        region: String,
        /// The name both use.
        region_name: String,
        /// The Region that keeps the name.
        existing: String,
        /// Their ChatCluster.
        cluster: String,
    },
    /// The Region's `clusterRef` names no ChatCluster in its namespace.
    #[error("region {region} belongs to chat cluster {cluster}, which does not exist in namespace {namespace}")]
    ClusterNotFound {
        /// The Region.
        region: String,
        /// The missing ChatCluster.
        cluster: String,
        /// The namespace searched.
        namespace: String,
    },
    /// A replication rule names a region that is not a Region of the same ChatCluster.
    #[error("region {region} replicates to {target}, which is not a region of chat cluster {cluster}")]
    UnknownReplicationTarget {
        /// The Region.
        region: String,
        /// The unknown region name.
        target: String,
        /// Their ChatCluster.
        cluster: String,
    },
    /// Neither the Region nor its ChatCluster gives Kafka bootstrap servers.
    #[error(
        "region {region} has no kafka bootstrap servers: set spec.kafka.bootstrapServers on it or on its chat cluster"
    )]
    MissingKafkaBootstrap {
        /// The Region.
        region: String,
    },
    /// Neither the Region nor its ChatCluster gives a Redis URL.
    #[error("region {region} has no redis url: set spec.redis.url on it or on its chat cluster")]
    MissingRedisUrl {
        /// The Region.
        region: String,
    },
    /// An object lacks metadata the API server always sets (name, namespace or uid).
    #[error("{kind} {name} has no metadata.{field}")]
    MissingMetadata {
        /// Kind of the object.
        kind: &'static str,
        /// Its name, or `<unnamed>`.
        name: String,
        /// The missing field.
        field: &'static str,
    },
    /// No contiguous run of free machine IDs is large enough for the Region's block.
    #[error("region {region} needs {requested} contiguous machine ids, but the largest free run of the 1024 is {largest_free}")]
    MachineIdsExhausted {
        /// The Region.
        region: String,
        /// Block size it needs.
        requested: u16,
        /// Largest run of IDs neither held nor quarantined.
        largest_free: u16,
    },
    /// A block size outside 1-1024, or a block smaller than the Region's pods need.
    #[error(
        "region {region} cannot use a machine-id block of {size} ids: it needs {needed}, and a block holds 1 to 1024"
    )]
    InvalidMachineIdBlock {
        /// The Region.
        region: String,
        /// The size given.
        size: u32,
        /// The size the Region needs.
        needed: u32,
    },
}

impl Error {
    /// The CamelCase reason for the `Degraded` condition and the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::DuplicateRegion { .. } => "DuplicateRegion",
            Error::ClusterNotFound { .. } => "ClusterNotFound",
            Error::UnknownReplicationTarget { .. } => "UnknownReplicationTarget",
            Error::MissingKafkaBootstrap { .. } => "MissingKafkaBootstrap",
            Error::MissingRedisUrl { .. } => "MissingRedisUrl",
            Error::MissingMetadata { .. } => "MissingMetadata",
            Error::MachineIdsExhausted { .. } => "MachineIdsExhausted",
            Error::InvalidMachineIdBlock { .. } => "InvalidMachineIdBlock",
        }
    }
}
