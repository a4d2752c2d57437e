//! Errors of the router and of its backends, shared by every crate that calls a router or drives an engine.
//!
//! The engine drivers live in other crates (`parley-bus` for Redis, `parley-router` for redb, Kafka and
//! Cassandra), so the variants that carry an engine's error hold it boxed: this crate links none of them.

use parley_core::protocol::ErrorCode;
use thiserror::Error;

/// A backend (storage, log, pub/sub) failure.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The embedded database failed.
    #[error("embedded database error: {0}")]
    Embedded(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record could not be decoded.
    #[error("failed to decode stored record: {0}")]
    Decode(#[source] serde_json::Error),
    /// A blocking task failed to run to completion.
    #[error("storage task failed: {0}")]
    Task(String),
    /// The backend is shutting down or unreachable.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A Redis call failed (connection refused or lost, script error, unexpected reply).
    #[error("redis {operation} failed: {source}")]
    Redis {
        /// What was attempted (`publish`, `subscribe`, `presence connect`, ...).
        operation: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A Cassandra/Scylla request failed for a reason other than unavailability (bad statement, unexpected
    /// reply, schema error).
    #[error("cassandra {operation} failed: {source}")]
    Cassandra {
        /// What was attempted (`write messages`, `read history`, `apply membership`, ...).
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A backend's configuration is invalid.
    #[error("invalid backend configuration: {0}")]
    InvalidConfig(String),
    /// A stored record holds a value this version cannot read.
    #[error("corrupt stored record: {0}")]
    Corrupt(String),
    /// A Kafka call failed (broker unreachable, request timed out, transaction error, ...).
    #[error("kafka {operation} failed: {source}")]
    Kafka {
        /// What was attempted (`init transactions`, `produce`, `commit transaction`, ...).
        operation: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A topic could not be created.
    #[error("kafka cannot create topic {topic}: {code}")]
    KafkaTopic {
        /// Topic.
        topic: String,
        /// The broker's answer.
        code: String,
    },
    /// A newer writer took over the partition: this writer's append was rejected and nothing of it committed.
    #[error("writer fenced: partition {partition} of {topic} was taken over by a newer writer; nothing of this append was committed")]
    Fenced {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
    },
    /// The channel lives in a partition this writer does not own.
    #[error("this writer does not own partition {partition}, where channel {channel} lives")]
    NotOwner {
        /// Channel.
        channel: String,
        /// Its partition.
        partition: i32,
    },
    /// The writer's index of messages not yet in the store is full: the store writer lags too far behind.
    #[error("{entries} sends are not in the store yet (limit {limit}); the store writer lags too far behind")]
    TailFull {
        /// Sends held.
        entries: usize,
        /// The limit (`max_unstored_sends`).
        limit: usize,
    },
    /// An append does not continue a channel's sequence as the log holds it.
    #[error("sequence conflict in {channel}: the log expects seq {expected}, the append starts at {got}")]
    SequenceConflict {
        /// Channel.
        channel: String,
        /// The next sequence per the log.
        expected: u64,
        /// The append's first sequence.
        got: u64,
    },
    /// A record could not be encoded.
    #[error("failed to encode record: {0}")]
    Encode(#[source] serde_json::Error),
    /// A driver setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An engine refused this client: it rejected the credentials, or the TLS handshake failed (a certificate no
    /// trusted CA signed, say). Retrying does not help; the configuration must change.
    #[error("{engine} at {address}: {reason}")]
    Refused {
        /// The engine (`Kafka`, `Cassandra`, ...).
        engine: &'static str,
        /// Where it was reached (bootstrap servers, contact points, URL).
        address: String,
        /// What failed, first what it was: `SASL authentication failed: ...`, `TLS handshake failed: ...`,
        /// `authentication failed: ...`.
        reason: String,
    },
}

/// Why the router refused or failed a request. Each maps to a stable protocol error code.
#[derive(Debug, Error)]
pub enum RouterError {
    /// A field was invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The text is longer than allowed.
    #[error("text is {actual} bytes; the limit is {limit}")]
    TextTooLong {
        /// Actual size.
        actual: usize,
        /// Limit.
        limit: usize,
    },
    /// The user is not a member.
    #[error("you are not a member of {0}")]
    NotAMember(String),
    /// The channel does not exist.
    #[error("channel {0} does not exist")]
    NoSuchChannel(String),
    /// The name is taken.
    #[error("channel {0} already exists")]
    ChannelExists(String),
    /// The channel is full.
    #[error("channel {channel} is full ({limit} members)")]
    TooManyMembers {
        /// Channel.
        channel: String,
        /// Limit.
        limit: u32,
    },
    /// The caller's role (or the channel's privacy) does not allow the action.
    #[error("{0}")]
    Forbidden(String),
    /// The caller is banned from the channel.
    #[error("you are banned from {0}")]
    Banned(String),
    /// A block between the two users of a direct message.
    #[error("{0}")]
    Blocked(String),
    /// The backend could not take the write; nothing was confirmed.
    #[error("storage unavailable, nothing was written: {0}")]
    Unavailable(#[source] BackendError),
    /// IDs cannot be issued right now (clock or sequence); retry shortly.
    #[error("cannot issue an id right now: {0}")]
    Clock(#[source] parley_core::snowflake::SnowflakeError),
    /// The writer task is gone (shutting down).
    #[error("router is shutting down")]
    ShuttingDown,
    /// The router answered a call with a reply of another kind (a version mismatch or a bug).
    #[error("the router answered {op} with an unexpected reply")]
    UnexpectedAnswer {
        /// The call's operation.
        op: &'static str,
    },
    /// No push provider is configured on the router.
    #[error("push notifications are off: no push provider (FCM or APNs) is configured")]
    PushDisabled,
    /// A remote router refused or failed the call with this code.
    #[error("{message}")]
    Remote {
        /// The stable code the router gave.
        code: ErrorCode,
        /// Its reason.
        message: String,
    },
}

impl RouterError {
    /// The stable protocol error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouterError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RouterError::TextTooLong { .. } => ErrorCode::TextTooLong,
            RouterError::NotAMember(_) => ErrorCode::NotAMember,
            RouterError::NoSuchChannel(_) => ErrorCode::NoSuchChannel,
            RouterError::ChannelExists(_) => ErrorCode::ChannelExists,
            RouterError::TooManyMembers { .. } => ErrorCode::TooManyMembers,
            RouterError::Forbidden(_) => ErrorCode::Forbidden,
            RouterError::Banned(_) => ErrorCode::Banned,
            RouterError::Blocked(_) => ErrorCode::Blocked,
            RouterError::Unavailable(BackendError::NotOwner { .. } | BackendError::Fenced { .. }) => {
                ErrorCode::NotOwner
            }
            RouterError::Unavailable(_) | RouterError::Clock(_) | RouterError::ShuttingDown => ErrorCode::Unavailable,
            RouterError::UnexpectedAnswer { .. } => ErrorCode::Internal,
            RouterError::PushDisabled => ErrorCode::PushDisabled,
            RouterError::Remote { code, .. } => *code,
        }
    }

    /// Whether another router owns the channel now (a gateway refreshes its map and calls the owner).
    pub fn is_not_owner(&self) -> bool {
        self.code() == ErrorCode::NotOwner
    }
}

impl From<parley_core::access::Denied> for RouterError {
    fn from(denied: parley_core::access::Denied) -> Self {
        use parley_core::access::Denied;
        match denied {
            Denied::Banned(channel) => RouterError::Banned(channel),
            Denied::Invalid(message) => RouterError::InvalidArgument(message),
            other => RouterError::Forbidden(other.to_string()),
        }
    }
}

impl From<parley_core::conversation::IdError> for RouterError {
    fn from(error: parley_core::conversation::IdError) -> Self {
        RouterError::InvalidArgument(error.to_string())
    }
}
