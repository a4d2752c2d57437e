//! The operator's error type. Each variant maps to the `reason` of the `Degraded` condition and of the Event the
//! controller records, so a kubectl user sees why a Region is not reconciled.
//!
//! The first variants come from the pure core and mean the spec cannot be reconciled as it is
//! ([`Error::is_invalid_spec`]): the controller marks the Region `Degraded` and waits for a change. The last ones
//! come from talking to the API server and are transient: the controller requeues with backoff.

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
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
    /// An object the operator would name after the Region could not carry that name (for example a Service, whose
    /// name must be a DNS-1035 label, for a Region named `eu.west`). Nothing is applied or allocated for it.
    #[error(
        "region {region} cannot be run under this name: its {kind} {name} must be {rule}. Recreate the Region with \
         a name of lowercase letters, digits and '-' that starts with a letter (at most 40 characters)"
    )]
    InvalidName {
        /// The Region.
        region: String,
        /// What would carry the name (a kind, or a label).
        kind: &'static str,
        /// The derived name.
        name: String,
        /// The rule it breaks, in words.
        rule: &'static str,
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
    /// Backend settings that contradict each other across the ChatCluster and the Region (CEL checks what it can
    /// within one object), such as a Redis CA bundle for a Region whose Redis URL is not `rediss://`.
    #[error("region {region} cannot be built: {problem}")]
    InvalidBackendSettings {
        /// The Region.
        region: String,
        /// What contradicts what, and how to fix it.
        problem: String,
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
    /// The Region's internal token Secret does not exist and could not be created (for example, the operator may
    /// not create Secrets). Nothing is applied until it exists: without it no gateway or router pod could start.
    #[error("region {region} has no internal token: creating Secret {namespace}/{secret} failed: {message}")]
    InternalTokenSecret {
        /// The Region.
        region: String,
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// What the API server answered (or why no token could be made).
        message: String,
        /// The client's error, when the API server refused.
        #[source]
        source: Option<Box<kube::Error>>,
    },
    /// The ChatCluster's peer token Secret (`PARLEY_PEER_TOKEN` of every router) does not exist and could not be
    /// created. Nothing is applied until it exists: the routers read it when they start.
    #[error("chat cluster {cluster} has no peer token: creating Secret {namespace}/{secret} failed: {message}")]
    PeerTokenSecret {
        /// The ChatCluster.
        cluster: String,
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// What the API server answered (or why no token could be made).
        message: String,
        /// The client's error, when the API server refused.
        #[source]
        source: Option<Box<kube::Error>>,
    },
    /// A call to the Kubernetes API failed.
    #[error("failed to {action}")]
    Kube {
        /// What the operator tried, for example `apply StatefulSet ns/eu-gateway`.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An optimistic-concurrency write lost against another writer (HTTP 409); the reconcile is retried with the
    /// object as it is now.
    #[error("conflict while writing {object}: it changed since it was read")]
    Conflict {
        /// The object written.
        object: String,
    },
    /// An object could not be turned into JSON for a patch.
    #[error("failed to serialize {object} for a patch")]
    Serialize {
        /// The object.
        object: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The finalizer helper refused the object (an unnamed object or an invalid finalizer name).
    #[error("unable to run the finalizer: {message}")]
    Finalizer {
        /// What the helper reported.
        message: String,
    },
    /// The leader-election Lease could not be set up.
    #[error("failed to set up leader election on lease {lease}")]
    LeaderElection {
        /// Name of the Lease.
        lease: String,
        /// The lease manager's error.
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    /// The background task that holds the Lease stopped.
    #[error("the leader-election task for lease {lease} stopped")]
    LeaseWatchEnded {
        /// Name of the Lease.
        lease: String,
    },
    /// The leader could not confirm a renewal of its Lease before it would expire: it stops so that it never
    /// writes while another replica may hold the Lease.
    #[error("lease {lease} could not be renewed in time: stopping so that two replicas never both write")]
    LeaseExpired {
        /// Name of the Lease.
        lease: String,
    },
    /// Another replica holds the Lease this replica thought it held.
    #[error("lease {lease} is held by {holder}: stopping so that two replicas never both write")]
    LeaseLost {
        /// Name of the Lease.
        lease: String,
        /// Its holder now (empty when none).
        holder: String,
    },
    /// The controller's stream ended although nothing asked it to stop.
    #[error("the controller stopped unexpectedly")]
    ControllerEnded,
    /// Cassandra could not be reached, or a statement or query on it failed.
    #[error("failed to {action}: {message}")]
    Cassandra {
        /// What the operator tried.
        action: String,
        /// The driver's error.
        message: String,
    },
    /// A Region that is being deleted stays: its datacenter still holds replicas of the keyspace, or whether it does
    /// cannot be checked. The message says what to do.
    #[error("region {region} is not deleted yet: {message}")]
    DeletionBlocked {
        /// The Region.
        region: String,
        /// Why, and what to do.
        message: String,
    },
}

/// Errors compare by variant and message: kube's and serde's errors are not comparable themselves.
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other) && self.to_string() == other.to_string()
    }
}

impl Eq for Error {}

impl Error {
    /// Whether the error means the spec cannot be reconciled as it is (the Region is `Degraded` until its spec,
    /// or that of a related object, changes), as opposed to a transient failure that a retry may fix.
    pub fn is_invalid_spec(&self) -> bool {
        !matches!(
            self,
            Error::Kube { .. }
                | Error::InternalTokenSecret { .. }
                | Error::PeerTokenSecret { .. }
                | Error::Conflict { .. }
                | Error::Serialize { .. }
                | Error::Finalizer { .. }
                | Error::LeaderElection { .. }
                | Error::LeaseWatchEnded { .. }
                | Error::LeaseExpired { .. }
                | Error::LeaseLost { .. }
                | Error::ControllerEnded
                | Error::Cassandra { .. }
                | Error::DeletionBlocked { .. }
        )
    }

    /// Wraps a kube error, turning an HTTP 409 into [`Error::Conflict`].
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        let action = action.into();
        match &source {
            kube::Error::Api(status) if status.code == 409 => Error::Conflict { object: action },
            _ => Error::Kube { action, source },
        }
    }

    /// The CamelCase reason for the `Degraded` condition and the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubeApiError",
            Error::InternalTokenSecret { .. } => "InternalTokenSecretFailed",
            Error::PeerTokenSecret { .. } => "PeerTokenSecretFailed",
            Error::Conflict { .. } => "Conflict",
            Error::Serialize { .. } => "SerializeError",
            Error::Finalizer { .. } => "FinalizerError",
            Error::LeaderElection { .. } => "LeaderElectionError",
            Error::LeaseWatchEnded { .. } => "LeaseWatchEnded",
            Error::LeaseExpired { .. } => "LeaseExpired",
            Error::LeaseLost { .. } => "LeaseLost",
            Error::ControllerEnded => "ControllerEnded",
            Error::Cassandra { .. } => "CassandraUnavailable",
            Error::DeletionBlocked { .. } => "DeletionBlocked",
            Error::DuplicateRegion { .. } => "DuplicateRegion",
            Error::ClusterNotFound { .. } => "ClusterNotFound",
            Error::InvalidName { .. } => "InvalidName",
            Error::MissingKafkaBootstrap { .. } => "MissingKafkaBootstrap",
            Error::MissingRedisUrl { .. } => "MissingRedisUrl",
            Error::InvalidBackendSettings { .. } => "InvalidBackendSettings",
            Error::MissingMetadata { .. } => "MissingMetadata",
            Error::MachineIdsExhausted { .. } => "MachineIdsExhausted",
            Error::InvalidMachineIdBlock { .. } => "InvalidMachineIdBlock",
        }
    }
}
