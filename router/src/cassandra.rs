//! The Cassandra/ScyllaDB driver of [`MessageStore`] and [`MembershipStore`] ([`CassandraStore`]), over the
//! `scylla` crate (both engines speak CQL). It behaves like the embedded driver ([`crate::embedded`]); the
//! behaviour suite `router/tests/stores.rs` runs the same tests against both.
//!
//! # Schema (keyspace from [`CassandraConfig::keyspace`], versioned in `schema_migrations`)
//!
//! | table | key | columns | notes |
//! | --- | --- | --- | --- |
//! | `messages` | `((channel, bucket), seq DESC)` | `id, sender, text, ts, client_msg_id` | TWCS, window = bucket width; default TTL = retention |
//! | `message_buckets` | `(channel, bucket DESC)` | `first_seq, last_seq` | the buckets a channel has; TTL = retention + one bucket |
//! | `channel_state` | `(channel)` | `last_seq, last_ts, last_id` | written `USING TIMESTAMP seq`: always the newest message |
//! | `sends` | `((sender, client_msg_id))` | `channel, seq, id, ts` | idempotency keys; same TTL as messages |
//! | `channels` | `(channel)` | `kind, created_by, created_at, member_count` | |
//! | `members` | `(channel, user)` | | members of a channel, by user name |
//! | `user_channels` | `(user, channel)` | | channels of a user, by channel id |
//! | `read_cursors` | `(user, channel)` | `seq` | written `USING TIMESTAMP seq`: only moves forward |
//! | `channel_homes` | `(channel)` | `region, epoch, base_seq` | claimed (`IF NOT EXISTS`) and moved (`IF region = ? AND epoch = ?`) by lightweight transactions at SERIAL |
//! | `machine_leases` | `((scope, id))` | `holder, renewed_at, released_at` | Snowflake machine-ID leases: claimed (`IF NOT EXISTS`, or `IF holder = ? AND renewed_at = ?` as read), renewed and released (`IF holder = ?`) by lightweight transactions at LOCAL_SERIAL, read at LOCAL_SERIAL |
//!
//! `bucket` is `ts / bucket width` (ms). Ordering by `seq` equals ordering by the Snowflake `id` within a channel,
//! which is kept as a column. A channel's sequence grows with its time (one writer assigns both), so a later
//! bucket holds only higher sequences; history pages walk `message_buckets` and read each bucket's partition
//! with a `seq` range until the page is full.
//!
//! - **Writes are idempotent**: every statement is an upsert of the same values, and the per-bucket bounds,
//!   `channel_state` and read cursors are written with a client timestamp derived from the sequence, so
//!   last-write-wins keeps the minimum or the maximum whatever the order in which writes arrive. No read, no
//!   lightweight transaction.
//! - **Message writes are batched**: a store batch writes one unlogged batch per `(channel, bucket)` partition
//!   (a single-partition batch is one mutation) and its idempotency keys in unlogged batches of at most
//!   [`SENDS_PER_BATCH`] (one partition each, under the server's multi-partition warning threshold), so the
//!   request count grows with channels, not with messages.
//! - **Retention** is the TTL. [`MessageStore::first_retained_seq`] is the oldest sequence still stored (or the
//!   one after the last stored when every message expired), so it rises as TTLs expire, with no sweep.
//! - **Membership** changes of one [`MembershipStore::apply`] call are written in logged batches (at most
//!   [`MEMBERSHIP_BATCH`] changes each, to stay under the server's batch size limit), each with the member rows,
//!   the user→channel rows and the channel's new `member_count`. The count is a regular column computed by the
//!   caller: the router's single writer is the only one that changes a channel's members.
//! - Every statement is prepared once in [`CassandraStore::connect`], runs with the configured consistency
//!   (LOCAL_QUORUM by default), a request timeout, and prefers the local datacenter. Listings page with the
//!   configured page size.
//! - Errors: an unreachable cluster, a timeout or too few replicas is [`BackendError::Unavailable`]; rejected
//!   credentials or a failed TLS handshake when connecting is [`BackendError::Refused`] (`Cassandra at <contact
//!   points>: authentication failed: ...`, `... TLS handshake failed: ...`); any other failure is
//!   [`BackendError::Cassandra`]. Nothing panics.
//! - Security: client-to-node TLS ([`CassandraConfig::tls`], [`CassandraConfig::tls_ca_file`]) through OpenSSL,
//!   checking each node's certificate against the CA file (or the system's roots) and the node's IP address; and
//!   `PasswordAuthenticator` credentials ([`CassandraConfig::credentials`]).

mod schema;

use crate::backend::{
    ChannelRecord, Device, FlowReport, HistoryPage, HistoryQuery, Home, LeaseRow, MembershipChange, MembershipStore,
    MessageStore, Platform, PriorSend,
};
use async_trait::async_trait;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use parley_api::BackendError;
use parley_core::access::{Access, Posting, Visibility};
use parley_core::protocol::MessageView;
use parley_core::sequencer::Placement;
use parley_core::ChannelKind;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError, ExecutionError, MetadataError,
    NewSessionError, RequestAttemptError,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, Statement};
use scylla::value::CqlValue;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{debug, info, instrument, warn};

/// Largest number of membership changes written in one logged batch.
pub const MEMBERSHIP_BATCH: usize = 100;

/// Most idempotency keys (one partition each) written in one unlogged batch: Cassandra warns about unlogged
/// batches across more than 10 partitions (`unlogged_batch_across_partitions_warn_threshold`).
pub const SENDS_PER_BATCH: usize = 10;

/// Concurrent requests a single call issues (writes of a batch, point reads of a listing).
const CONCURRENCY: usize = 64;

/// Base of the client timestamps that keep the smallest `first_seq` of a bucket: `FIRST_SEQ_EPOCH - seq` is
/// larger for smaller sequences, so last-write-wins keeps the minimum.
const FIRST_SEQ_EPOCH: i64 = 1 << 62;

/// Cassandra's largest TTL (20 years).
const MAX_TTL_SECONDS: u64 = 630_720_000;

/// Keyspace replication, used when [`CassandraStore::connect`] creates the keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with one replication factor (one datacenter, tests).
    Simple {
        /// Replicas of each row.
        factor: u32,
    },
    /// `NetworkTopologyStrategy`: replicas per datacenter.
    NetworkTopology(BTreeMap<String, u32>),
}

/// Where the cluster is and how the store uses it.
#[derive(Debug, Clone)]
pub struct CassandraConfig {
    /// Contact points, `host:port` (the native transport port, 9042 by default).
    pub contact_points: Vec<String>,
    /// Keyspace of every table (letters, digits and `_`, at most 48 characters).
    pub keyspace: String,
    /// Datacenter whose nodes are preferred as coordinators (`None`: any).
    pub local_datacenter: Option<String>,
    /// Consistency of every read and write.
    pub consistency: Consistency,
    /// Replication of the keyspace when it is created (an existing keyspace is left as it is).
    pub replication: Replication,
    /// How long messages and idempotency keys are kept (their TTL); `None` keeps them forever.
    pub retention: Option<Duration>,
    /// Width of a time bucket: the span of one `messages` partition and the TWCS compaction window.
    pub bucket: Duration,
    /// Upper bound of every request (and of connecting).
    pub request_timeout: Duration,
    /// Rows per page of listings (members, user channels, buckets).
    pub page_size: i32,
    /// Encrypt every connection with TLS, checking each node's certificate against
    /// [`CassandraConfig::tls_ca_file`] (or the system's roots without one) and the node's IP address.
    pub tls: bool,
    /// PEM file of the CA(s) that sign the nodes' certificates, the only ones trusted. Setting it implies TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// `PasswordAuthenticator` credentials; `None`: none (a cluster that requires them refuses the connection).
    pub credentials: Option<CassandraCredentials>,
}

/// A Cassandra role's name and password. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct CassandraCredentials {
    /// The role.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for CassandraCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CassandraCredentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl CassandraConfig {
    /// Defaults for `contact_points` and `keyspace`: LOCAL_QUORUM, `SimpleStrategy` with one replica, 365 days of
    /// retention, one-hour buckets, 5 s request timeout, 1,000 rows per page, no preferred datacenter; no TLS, no
    /// credentials.
    pub fn new(contact_points: Vec<String>, keyspace: impl Into<String>) -> Self {
        Self {
            contact_points,
            keyspace: keyspace.into(),
            local_datacenter: None,
            consistency: Consistency::LocalQuorum,
            replication: Replication::Simple { factor: 1 },
            retention: Some(Duration::from_secs(365 * 24 * 3600)),
            bucket: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(5),
            page_size: 1000,
            tls: false,
            tls_ca_file: None,
            credentials: None,
        }
    }

    /// Whether connections use TLS ([`CassandraConfig::tls`], or a CA file).
    pub fn uses_tls(&self) -> bool {
        self.tls || self.tls_ca_file.is_some()
    }

    /// The OpenSSL context of the connections: peer verification on, trusting only the CA file's certificates when
    /// there is one.
    fn tls_context(&self) -> Result<Option<scylla::client::session::TlsContext>, BackendError> {
        use openssl::ssl::{SslConnector, SslMethod};
        if !self.uses_tls() {
            return Ok(None);
        }
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            BackendError::InvalidConfig(format!("cassandra TLS: {what}: {error}"))
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .map_err(|error| failed("cannot make an OpenSSL context", &error))?;
        if let Some(ca_file) = &self.tls_ca_file {
            let what = format!("cannot read the CA file {}", ca_file.display());
            let pem = std::fs::read(ca_file).map_err(|error| failed(&what, &error))?;
            let certificates = openssl::x509::X509::stack_from_pem(&pem).map_err(|error| failed(&what, &error))?;
            if certificates.is_empty() {
                return Err(failed(&what, &"no PEM certificate in it"));
            }
            let mut store = openssl::x509::store::X509StoreBuilder::new()
                .map_err(|error| failed("cannot make a certificate store", &error))?;
            for certificate in certificates {
                store.add_cert(certificate).map_err(|error| failed(&what, &error))?;
            }
            builder.set_cert_store(store.build());
        }
        Ok(Some(scylla::client::session::TlsContext::from(builder)))
    }

    /// Parses a consistency name (`LOCAL_QUORUM`, `QUORUM`, `ONE`, `LOCAL_ONE`, `ALL`, `EACH_QUORUM`, `TWO`,
    /// `THREE`), case-insensitive.
    pub fn parse_consistency(name: &str) -> Result<Consistency, BackendError> {
        Ok(match name.to_ascii_uppercase().as_str() {
            "LOCAL_QUORUM" => Consistency::LocalQuorum,
            "QUORUM" => Consistency::Quorum,
            "EACH_QUORUM" => Consistency::EachQuorum,
            "LOCAL_ONE" => Consistency::LocalOne,
            "ONE" => Consistency::One,
            "TWO" => Consistency::Two,
            "THREE" => Consistency::Three,
            "ALL" => Consistency::All,
            other => return Err(BackendError::InvalidConfig(format!("unknown cassandra consistency {other:?}"))),
        })
    }

    fn validate(&self) -> Result<(), BackendError> {
        let keyspace = &self.keyspace;
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace.chars().all(|character| character.is_ascii_alphanumeric() || character == '_')
        {
            return Err(BackendError::InvalidConfig(format!(
                "cassandra keyspace {keyspace:?} must be 1 to 48 letters, digits or underscores"
            )));
        }
        if self.contact_points.is_empty() {
            return Err(BackendError::InvalidConfig("cassandra needs at least one contact point".into()));
        }
        if self.bucket < Duration::from_secs(1) {
            return Err(BackendError::InvalidConfig("cassandra bucket width must be at least 1 s".into()));
        }
        if self.retention.is_some_and(|retention| retention.as_secs() == 0 || retention.as_secs() > MAX_TTL_SECONDS) {
            return Err(BackendError::InvalidConfig(format!(
                "cassandra retention must be between 1 s and {MAX_TTL_SECONDS} s (20 years), or unset"
            )));
        }
        if self.page_size < 1 {
            return Err(BackendError::InvalidConfig("cassandra page size must be at least 1".into()));
        }
        if self.credentials.as_ref().is_some_and(|credentials| credentials.username.is_empty()) {
            return Err(BackendError::InvalidConfig("cassandra username is empty".into()));
        }
        if let Replication::NetworkTopology(factors) = &self.replication {
            if factors.is_empty() || factors.keys().any(|datacenter| datacenter.contains('\'')) {
                return Err(BackendError::InvalidConfig(
                    "cassandra NetworkTopologyStrategy needs at least one datacenter, without quotes in its name"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// TTL of messages and idempotency keys in seconds (0: none).
    fn message_ttl_seconds(&self) -> u64 {
        self.retention.map(|retention| retention.as_secs().clamp(1, MAX_TTL_SECONDS)).unwrap_or(0)
    }

    /// TTL of bucket index rows: one bucket longer than the messages in them (0: none).
    fn bucket_ttl_seconds(&self) -> u64 {
        match self.message_ttl_seconds() {
            0 => 0,
            ttl => (ttl + self.bucket.as_secs().max(1)).min(MAX_TTL_SECONDS),
        }
    }

    fn bucket_ms(&self) -> u64 {
        (self.bucket.as_millis() as u64).max(1)
    }
}

/// Maps a failed request: unreachable nodes, timeouts and missing replicas are [`BackendError::Unavailable`].
fn execution_error(operation: &'static str, error: ExecutionError) -> BackendError {
    let unavailable = match &error {
        ExecutionError::ConnectionPoolError(_) | ExecutionError::EmptyPlan | ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::BrokenConnectionError(_) | RequestAttemptError::UnableToAllocStreamId => true,
            RequestAttemptError::DbError(db_error, _) => matches!(
                db_error,
                DbError::Unavailable { .. }
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
            ),
            _ => false,
        },
        _ => false,
    };
    if unavailable {
        BackendError::Unavailable(format!("cassandra {operation} failed: {error}"))
    } else {
        BackendError::Cassandra { operation, source: Box::new(error) }
    }
}

/// Maps a failed connect: rejected credentials and failed TLS handshakes are [`BackendError::Refused`], anything
/// else [`BackendError::Unavailable`].
fn connect_error(config: &CassandraConfig, error: NewSessionError) -> BackendError {
    let contact = config.contact_points.join(",");
    let last_connection_error = match &error {
        NewSessionError::MetadataError(MetadataError::ConnectionPoolError(ConnectionPoolError::Broken {
            last_connection_error,
        })) => Some(last_connection_error),
        _ => None,
    };
    let refused = |reason: String| BackendError::Refused { engine: "Cassandra", address: contact.clone(), reason };
    match last_connection_error {
        Some(ConnectionError::ConnectionSetupRequestError(setup)) => match setup.get_error() {
            ConnectionSetupRequestErrorKind::DbError(DbError::AuthenticationError, message) => {
                let user = config.credentials.as_ref().map(|credentials| credentials.username.as_str()).unwrap_or("");
                return refused(format!("authentication failed (user {user}): {message}"));
            }
            ConnectionSetupRequestErrorKind::MissingAuthentication => {
                return refused(
                    "authentication failed: the cluster requires credentials (set a username and password)".into(),
                );
            }
            _ => {}
        },
        Some(ConnectionError::IoError(io)) => {
            if let Some(ssl) = io.get_ref().and_then(|inner| inner.downcast_ref::<openssl::ssl::Error>()) {
                let trusted = match &config.tls_ca_file {
                    Some(ca_file) => format!("a CA in {}", ca_file.display()),
                    None => "a CA of the system's roots".to_owned(),
                };
                let hint = if ssl.to_string().contains("certificate verify failed") {
                    format!(" (the node's certificate is not signed by {trusted}, or does not name its address)")
                } else {
                    String::new()
                };
                return refused(format!("TLS handshake failed: {ssl}{hint}"));
            }
        }
        _ => {}
    }
    BackendError::Unavailable(format!("cannot connect to cassandra at {contact}: {error}"))
}

/// Whether a lightweight transaction was applied: the first column of its answer's row is `[applied]`.
fn applied(operation: &'static str, result: QueryResult) -> Result<bool, BackendError> {
    let rows = result.into_rows_result().map_err(|error| other_error(operation, error))?;
    let flag = rows
        .rows::<scylla::value::Row>()
        .map_err(|error| other_error(operation, error))?
        .next()
        .transpose()
        .map_err(|error| other_error(operation, error))?
        .and_then(|row| row.columns.into_iter().next().flatten());
    match flag {
        Some(CqlValue::Boolean(applied)) => Ok(applied),
        other => Err(BackendError::Corrupt(format!("{operation}: the answer has no [applied] flag ({other:?})"))),
    }
}

fn other_error(operation: &'static str, error: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Cassandra { operation, source: Box::new(error) }
}

/// Every prepared statement of the store.
#[derive(Debug)]
struct Statements {
    insert_message: PreparedStatement,
    bucket_first: PreparedStatement,
    bucket_last: PreparedStatement,
    channel_state: PreparedStatement,
    insert_send: PreparedStatement,
    buckets_newest_first: PreparedStatement,
    buckets_oldest_first: PreparedStatement,
    page_before: PreparedStatement,
    page_after: PreparedStatement,
    first_in_bucket: PreparedStatement,
    select_state: PreparedStatement,
    select_send: PreparedStatement,
    select_channel: PreparedStatement,
    select_members: PreparedStatement,
    select_member: PreparedStatement,
    select_user_channels: PreparedStatement,
    write_cursor: PreparedStatement,
    select_cursor: PreparedStatement,
    insert_channel: PreparedStatement,
    update_count: PreparedStatement,
    insert_member: PreparedStatement,
    delete_member: PreparedStatement,
    insert_user_channel: PreparedStatement,
    delete_user_channel: PreparedStatement,
    select_settings: PreparedStatement,
    write_settings: PreparedStatement,
    select_home: PreparedStatement,
    select_home_serial: PreparedStatement,
    write_home: PreparedStatement,
    move_home: PreparedStatement,
    claim_home: PreparedStatement,
    move_home_local: PreparedStatement,
    mark_failed: PreparedStatement,
    unmark_failed: PreparedStatement,
    select_failed: PreparedStatement,
    report_flow: PreparedStatement,
    select_access: PreparedStatement,
    select_access_of: PreparedStatement,
    write_access: PreparedStatement,
    delete_access: PreparedStatement,
    select_blocked: PreparedStatement,
    insert_block: PreparedStatement,
    delete_block: PreparedStatement,
    delete_members: PreparedStatement,
    delete_all_access: PreparedStatement,
    delete_settings: PreparedStatement,
    delete_channel: PreparedStatement,
    delete_home: PreparedStatement,
    select_lease: PreparedStatement,
    create_lease: PreparedStatement,
    take_lease: PreparedStatement,
    renew_lease: PreparedStatement,
    release_lease: PreparedStatement,
    select_devices: PreparedStatement,
    insert_device: PreparedStatement,
    delete_device: PreparedStatement,
    select_device_owner: PreparedStatement,
    insert_device_owner: PreparedStatement,
    delete_device_owner: PreparedStatement,
    select_mutes: PreparedStatement,
    insert_mute: PreparedStatement,
    delete_mute: PreparedStatement,
    delete_mutes: PreparedStatement,
}

const MESSAGE_COLUMNS: &str = "channel, seq, id, sender, text, ts, client_msg_id";
type MessageRow = (String, i64, i64, String, String, i64, String);
/// `(bucket, first_seq, last_seq)` of `message_buckets`.
type BucketRow = (i64, Option<i64>, Option<i64>);
/// `(kind, created_by, created_at, member_count)` of `channels`.
type ChannelRows = Vec<(Option<String>, Option<String>, Option<i64>, Option<i32>)>;
/// `(visibility, posting, history_from)` of `channel_settings`.
type SettingsRows = Vec<(Option<String>, Option<String>, Option<i64>)>;
/// `channel_homes` rows: region, epoch, base sequence.
type HomeRows = Vec<(Option<String>, Option<i64>, Option<i64>)>;

/// The write timestamp of an idempotency key: lower for later messages (Snowflake ids grow with time), so that
/// Cassandra's last-write-wins keeps the first message a key named, without a read or a lightweight transaction.
/// A client that sends a used key again as a first attempt gets a second message, but the key keeps naming the
/// first. Nothing else writes the `sends` table, so its timestamps need not be clock times.
fn first_wins_timestamp(id: u64) -> i64 {
    i64::MAX - signed(id)
}

fn visibility_name(visibility: Visibility) -> &'static str {
    match visibility {
        Visibility::Public => "public",
        Visibility::Private => "private",
    }
}

fn posting_name(posting: Posting) -> &'static str {
    match posting {
        Posting::Everyone => "everyone",
        Posting::Admins => "admins",
    }
}

fn message_from_row(row: MessageRow) -> MessageView {
    let (channel, seq, id, sender, text, ts, client_msg_id) = row;
    MessageView { channel, seq: seq as u64, id: id as u64, sender, text, ts: ts as u64, client_msg_id }
}

fn kind_name(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Group => "group",
        ChannelKind::Dm => "dm",
    }
}

fn kind_from_name(name: &str) -> Result<ChannelKind, BackendError> {
    match name {
        "group" => Ok(ChannelKind::Group),
        "dm" => Ok(ChannelKind::Dm),
        other => Err(BackendError::Corrupt(format!("unknown channel kind {other:?} in cassandra"))),
    }
}

/// Sequences and ids are `u64` in Rust and `bigint` in CQL; both stay below 2^63.
fn signed(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

/// A channel in a user's inbox, by last activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// Channel id.
    pub channel: String,
    /// Highest stored sequence (0 when the channel has no stored message).
    pub last_seq: u64,
    /// Time of that message (Unix ms; 0 when none).
    pub last_ts: u64,
}

/// The Cassandra/Scylla message and membership store. Cheap to clone.
#[derive(Clone)]
pub struct CassandraStore {
    session: std::sync::Arc<Session>,
    statements: std::sync::Arc<Statements>,
    config: std::sync::Arc<CassandraConfig>,
}

impl std::fmt::Debug for CassandraStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CassandraStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl CassandraStore {
    /// Connects, creates the keyspace when missing, applies pending schema migrations and prepares every
    /// statement. An unreachable cluster is [`BackendError::Unavailable`]; rejected credentials or a failed TLS
    /// handshake, [`BackendError::Refused`].
    #[instrument(skip(config), fields(keyspace = %config.keyspace))]
    pub async fn connect(config: CassandraConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(datacenter) = &config.local_datacenter {
            policy = policy.prefer_datacenter(datacenter.clone()).permit_dc_failover(false);
        }
        let profile = ExecutionProfile::builder()
            .consistency(config.consistency)
            .request_timeout(Some(config.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.contact_points)
            .connection_timeout(config.request_timeout)
            .default_execution_profile_handle(profile.into_handle())
            .schema_agreement_timeout(Duration::from_secs(30))
            .tls_context(config.tls_context()?);
        if let Some(credentials) = &config.credentials {
            builder = builder.user(&credentials.username, &credentials.password);
        }
        let connecting = builder.build();
        let contact = config.contact_points.join(",");
        let session = match tokio::time::timeout(config.request_timeout * 2, connecting).await {
            Ok(Ok(session)) => session,
            Ok(Err(error)) => return Err(connect_error(&config, error)),
            Err(_) => {
                return Err(BackendError::Unavailable(format!(
                    "cannot connect to cassandra at {contact}: timed out after {} ms",
                    (config.request_timeout * 2).as_millis()
                )))
            }
        };
        migrate(&session, &config).await?;
        let statements = prepare(&session, &config).await?;
        Ok(Self {
            session: std::sync::Arc::new(session),
            statements: std::sync::Arc::new(statements),
            config: std::sync::Arc::new(config),
        })
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &CassandraConfig {
        &self.config
    }

    /// Drops the store's keyspace with every table in it (tests and tear-down).
    pub async fn drop_keyspace(&self) -> Result<(), BackendError> {
        let mut statement = Statement::new(format!("DROP KEYSPACE IF EXISTS {}", self.config.keyspace));
        statement.set_request_timeout(Some(Duration::from_secs(60)));
        self.session.query_unpaged(statement, ()).await.map_err(|error| execution_error("drop keyspace", error))?;
        Ok(())
    }

    async fn run(
        &self,
        operation: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult, BackendError> {
        self.session.execute_unpaged(statement, values).await.map_err(|error| execution_error(operation, error))
    }

    /// One idempotent unlogged batch of `statement`, once per row of `rows`.
    async fn run_unlogged<V: SerializeRow>(
        &self,
        operation: &'static str,
        statement: &PreparedStatement,
        rows: Vec<V>,
    ) -> Result<(), BackendError> {
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in &rows {
            batch.append_statement(statement.clone());
        }
        batch.set_is_idempotent(true);
        self.session.batch(&batch, rows).await.map(|_| ()).map_err(|error| execution_error(operation, error))
    }

    /// Rows of a single-page statement.
    async fn rows<T>(
        &self,
        operation: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<T>, BackendError>
    where
        T: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
    {
        let result = self.run(operation, statement, values).await?;
        let rows = result.into_rows_result().map_err(|error| other_error(operation, error))?;
        let typed = rows.rows::<T>().map_err(|error| other_error(operation, error))?;
        typed.collect::<Result<Vec<T>, _>>().map_err(|error| other_error(operation, error))
    }

    /// The rows of a statement as a stream that fetches page after page as it is read.
    async fn row_stream<T>(
        &self,
        operation: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<impl futures_util::Stream<Item = Result<T, BackendError>> + Unpin, BackendError>
    where
        T: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata> + 'static,
    {
        let pager = self.session.execute_iter(statement.clone(), values).await.map_err(|error| match error {
            scylla::errors::PagerExecutionError::NextPageError(_)
            | scylla::errors::PagerExecutionError::PrepareError(_) => {
                BackendError::Unavailable(format!("cassandra {operation} failed: {error}"))
            }
            other => other_error(operation, other),
        })?;
        let stream = pager.rows_stream::<T>().map_err(|error| other_error(operation, error))?;
        Ok(stream.map_err(move |error| BackendError::Unavailable(format!("cassandra {operation} failed: {error}"))))
    }

    /// Every row of a statement, page by page.
    async fn all_rows<T>(
        &self,
        operation: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<T>, BackendError>
    where
        T: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata> + 'static,
    {
        self.row_stream(operation, statement, values).await?.try_collect().await
    }

    /// The buckets of a channel with their sequence bounds, newest or oldest first, fetched page by page as the
    /// caller reads them (a page of history usually needs only the first one or two).
    async fn buckets(
        &self,
        channel: &str,
        newest_first: bool,
    ) -> Result<impl futures_util::Stream<Item = Result<BucketRow, BackendError>> + Unpin, BackendError> {
        let statement =
            if newest_first { &self.statements.buckets_newest_first } else { &self.statements.buckets_oldest_first };
        self.row_stream("list buckets", statement, (channel.to_owned(),)).await
    }

    /// A user's push devices with their registration times (rows of an unknown platform skipped).
    async fn device_rows(&self, user: &str) -> Result<Vec<(i64, Device)>, BackendError> {
        let rows: Vec<(String, String, Option<i64>)> =
            self.all_rows("list devices", &self.statements.select_devices, (user,)).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(platform, token, at)| {
                Some((at.unwrap_or(0), Device::new(Platform::parse(&platform)?, token)))
            })
            .collect())
    }

    /// A user's channels ordered by last activity (the newest message first; channels with no stored message
    /// last, by id).
    pub async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, BackendError> {
        let channels = self.user_channels(user).await?;
        let mut entries: Vec<InboxEntry> = stream::iter(channels)
            .map(|channel| async move {
                let state: Vec<(Option<i64>, Option<i64>, Option<i64>)> =
                    self.rows("read channel state", &self.statements.select_state, (channel.as_str(),)).await?;
                let (last_seq, last_ts) = state
                    .first()
                    .map(|(seq, ts, _)| (seq.unwrap_or(0) as u64, ts.unwrap_or(0) as u64))
                    .unwrap_or((0, 0));
                Ok::<_, BackendError>(InboxEntry { channel, last_seq, last_ts })
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        entries.sort_by(|left, right| right.last_ts.cmp(&left.last_ts).then_with(|| left.channel.cmp(&right.channel)));
        Ok(entries)
    }

    /// Whether each (channel, user) pair is a member, read with point queries, or with one listing per channel
    /// when a change set touches many of its members.
    async fn current_members(
        &self,
        pairs: &HashSet<(String, String)>,
    ) -> Result<HashSet<(String, String)>, BackendError> {
        let mut by_channel: HashMap<&str, Vec<&str>> = HashMap::new();
        for (channel, user) in pairs {
            by_channel.entry(channel.as_str()).or_default().push(user.as_str());
        }
        let mut present = HashSet::new();
        let mut point_reads = Vec::new();
        for (channel, users) in by_channel {
            if users.len() > 64 {
                for user in self.members(channel).await? {
                    present.insert((channel.to_owned(), user));
                }
            } else {
                point_reads.extend(users.into_iter().map(|user| (channel.to_owned(), user.to_owned())));
            }
        }
        let found: Vec<Option<(String, String)>> = stream::iter(point_reads)
            .map(|(channel, user): (String, String)| async move {
                Ok::<_, BackendError>(self.is_member(&channel, &user).await?.then_some((channel, user)))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        present.extend(found.into_iter().flatten());
        Ok(present)
    }
}

async fn migrate(session: &Session, config: &CassandraConfig) -> Result<(), BackendError> {
    let ddl = |text: String| {
        let mut statement = Statement::new(text);
        // Schema changes wait for every node; give them more time than a data request.
        statement.set_request_timeout(Some(Duration::from_secs(60)));
        statement
    };
    session
        .query_unpaged(ddl(schema::create_keyspace(config)), ())
        .await
        .map_err(|error| execution_error("create keyspace", error))?;
    session
        .query_unpaged(ddl(schema::create_migrations_table(&config.keyspace)), ())
        .await
        .map_err(|error| execution_error("create schema_migrations", error))?;
    let applied: HashSet<i32> = {
        let result = session
            .query_unpaged(format!("SELECT version FROM {}.schema_migrations", config.keyspace), ())
            .await
            .map_err(|error| execution_error("read schema_migrations", error))?;
        let rows = result.into_rows_result().map_err(|error| other_error("read schema_migrations", error))?;
        let versions = rows.rows::<(i32,)>().map_err(|error| other_error("read schema_migrations", error))?;
        versions
            .map(|row| row.map(|(version,)| version))
            .collect::<Result<_, _>>()
            .map_err(|error| other_error("read schema_migrations", error))?
    };
    for migration in schema::migrations(config) {
        if applied.contains(&migration.version) {
            continue;
        }
        info!(version = migration.version, description = migration.description, "applying cassandra migration");
        for statement in migration.statements {
            session.query_unpaged(ddl(statement), ()).await.map_err(|error| execution_error("migrate", error))?;
        }
        session.await_schema_agreement().await.map_err(|error| {
            BackendError::Unavailable(format!("cassandra nodes do not agree on the schema: {error}"))
        })?;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {}.schema_migrations (version, description, applied_at) \
                     VALUES (?, ?, toTimestamp(now()))",
                    config.keyspace
                ),
                (migration.version, migration.description),
            )
            .await
            .map_err(|error| execution_error("record migration", error))?;
    }
    Ok(())
}

async fn prepare(session: &Session, config: &CassandraConfig) -> Result<Statements, BackendError> {
    let keyspace = &config.keyspace;
    let page_size = config.page_size;
    let prepare_one = |text: String| async move {
        let mut statement = session
            .prepare(text)
            .await
            .map_err(|error| BackendError::Unavailable(format!("cassandra prepare failed: {error}")))?;
        statement.set_page_size(page_size);
        Ok::<_, BackendError>(statement)
    };
    let idempotent = |mut statement: PreparedStatement| {
        statement.set_is_idempotent(true);
        statement
    };
    let mut statements = Statements {
        insert_message: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.messages (channel, bucket, seq, id, sender, text, ts, client_msg_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
        ),
        bucket_first: idempotent(
            prepare_one(format!(
                "UPDATE {keyspace}.message_buckets USING TTL ? AND TIMESTAMP ? SET first_seq = ? \
                 WHERE channel = ? AND bucket = ?"
            ))
            .await?,
        ),
        bucket_last: idempotent(
            prepare_one(format!(
                "UPDATE {keyspace}.message_buckets USING TTL ? AND TIMESTAMP ? SET last_seq = ? \
                 WHERE channel = ? AND bucket = ?"
            ))
            .await?,
        ),
        channel_state: idempotent(
            prepare_one(format!(
                "UPDATE {keyspace}.channel_state USING TIMESTAMP ? SET last_seq = ?, last_ts = ?, last_id = ? \
                 WHERE channel = ?"
            ))
            .await?,
        ),
        insert_send: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.sends (sender, client_msg_id, channel, seq, id, ts) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
            ))
            .await?,
        ),
        buckets_newest_first: idempotent(
            prepare_one(format!(
                "SELECT bucket, first_seq, last_seq FROM {keyspace}.message_buckets WHERE channel = ?"
            ))
            .await?,
        ),
        buckets_oldest_first: idempotent(
            prepare_one(format!(
                "SELECT bucket, first_seq, last_seq FROM {keyspace}.message_buckets WHERE channel = ? \
                 ORDER BY bucket ASC"
            ))
            .await?,
        ),
        page_before: idempotent(
            prepare_one(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {keyspace}.messages WHERE channel = ? AND bucket = ? AND seq < ? \
                 LIMIT ?"
            ))
            .await?,
        ),
        page_after: idempotent(
            prepare_one(format!(
                "SELECT {MESSAGE_COLUMNS} FROM {keyspace}.messages WHERE channel = ? AND bucket = ? AND seq > ? \
                 AND seq < ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
        ),
        first_in_bucket: idempotent(
            prepare_one(format!(
                "SELECT seq FROM {keyspace}.messages WHERE channel = ? AND bucket = ? ORDER BY seq ASC LIMIT 1"
            ))
            .await?,
        ),
        select_state: idempotent(
            prepare_one(format!("SELECT last_seq, last_ts, last_id FROM {keyspace}.channel_state WHERE channel = ?"))
                .await?,
        ),
        select_send: idempotent(
            prepare_one(format!(
                "SELECT channel, seq, id, ts FROM {keyspace}.sends WHERE sender = ? AND client_msg_id = ?"
            ))
            .await?,
        ),
        select_channel: idempotent(
            prepare_one(format!(
                "SELECT kind, created_by, created_at, member_count FROM {keyspace}.channels WHERE channel = ?"
            ))
            .await?,
        ),
        select_members: idempotent(
            prepare_one(format!("SELECT user FROM {keyspace}.members WHERE channel = ?")).await?,
        ),
        select_member: idempotent(
            prepare_one(format!("SELECT user FROM {keyspace}.members WHERE channel = ? AND user = ?")).await?,
        ),
        select_user_channels: idempotent(
            prepare_one(format!("SELECT channel FROM {keyspace}.user_channels WHERE user = ?")).await?,
        ),
        write_cursor: idempotent(
            prepare_one(format!(
                "UPDATE {keyspace}.read_cursors USING TIMESTAMP ? SET seq = ? WHERE user = ? AND channel = ?"
            ))
            .await?,
        ),
        select_cursor: idempotent(
            prepare_one(format!("SELECT seq FROM {keyspace}.read_cursors WHERE user = ? AND channel = ?")).await?,
        ),
        insert_channel: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.channels (channel, kind, created_by, created_at, member_count) \
                 VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
        ),
        update_count: idempotent(
            prepare_one(format!("UPDATE {keyspace}.channels SET member_count = ? WHERE channel = ?")).await?,
        ),
        insert_member: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.members (channel, user) VALUES (?, ?)")).await?,
        ),
        delete_member: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.members WHERE channel = ? AND user = ?")).await?,
        ),
        insert_user_channel: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.user_channels (user, channel) VALUES (?, ?)")).await?,
        ),
        delete_user_channel: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.user_channels WHERE user = ? AND channel = ?")).await?,
        ),
        select_settings: idempotent(
            prepare_one(format!(
                "SELECT visibility, posting, history_from FROM {keyspace}.channel_settings WHERE channel = ?"
            ))
            .await?,
        ),
        select_home: idempotent(
            prepare_one(format!("SELECT region, epoch, base_seq FROM {keyspace}.channel_homes WHERE channel = ?"))
                .await?,
        ),
        // The home as the last move left it: a Paxos read across the datacenters.
        select_home_serial: {
            let mut statement = idempotent(
                prepare_one(format!("SELECT region, epoch, base_seq FROM {keyspace}.channel_homes WHERE channel = ?"))
                    .await?,
            );
            statement.set_consistency(scylla::statement::Consistency::Serial);
            statement
        },
        write_home: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.channel_homes (channel, region, epoch, base_seq) VALUES (?, ?, ?, ?)"
            ))
            .await?,
        ),
        // A lightweight transaction at SERIAL consistency (Paxos across the datacenters): of two regions that move
        // a channel at once, one wins.
        move_home: {
            let mut statement = prepare_one(format!(
                "UPDATE {keyspace}.channel_homes SET region = ?, epoch = ?, base_seq = ? WHERE channel = ? \
                 IF region = ? AND epoch = ?"
            ))
            .await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::Serial));
            statement
        },
        // A lightweight transaction at SERIAL consistency, like a move: of two regions that claim a home for the same
        // channel at once (a DM opened in both), one wins and both read its home. Retrying it is safe: a claim that
        // was applied before the retry is answered with the home it stored.
        claim_home: {
            let mut statement = idempotent(
                prepare_one(format!(
                    "INSERT INTO {keyspace}.channel_homes (channel, region, epoch, base_seq) VALUES (?, ?, ?, ?) \
                     IF NOT EXISTS"
                ))
                .await?,
            );
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::Serial));
            statement
        },
        // A failover's: Paxos in the local datacenter only (the failed region's may be unreachable).
        move_home_local: {
            let mut statement = prepare_one(format!(
                "UPDATE {keyspace}.channel_homes SET region = ?, epoch = ?, base_seq = ? WHERE channel = ? \
                 IF region = ? AND epoch = ?"
            ))
            .await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
            statement
        },
        mark_failed: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.failed_regions (region, since) VALUES (?, ?)")).await?,
        ),
        unmark_failed: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.failed_regions WHERE region = ?")).await?,
        ),
        select_failed: idempotent(prepare_one(format!("SELECT region FROM {keyspace}.failed_regions")).await?),
        report_flow: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.mirror_flows (target, source, reporter, latency_ms, messages, lag_ms, at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL 120"
            ))
            .await?,
        ),
        write_settings: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.channel_settings (channel, visibility, posting, history_from) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
        ),
        select_access: idempotent(
            prepare_one(format!("SELECT user, access FROM {keyspace}.channel_access WHERE channel = ?")).await?,
        ),
        select_access_of: idempotent(
            prepare_one(format!("SELECT access FROM {keyspace}.channel_access WHERE channel = ? AND user = ?")).await?,
        ),
        write_access: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.channel_access (channel, user, access) VALUES (?, ?, ?)"))
                .await?,
        ),
        delete_access: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.channel_access WHERE channel = ? AND user = ?")).await?,
        ),
        select_blocked: idempotent(
            prepare_one(format!("SELECT blocked FROM {keyspace}.user_blocks WHERE user = ?")).await?,
        ),
        insert_block: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.user_blocks (user, blocked) VALUES (?, ?)")).await?,
        ),
        delete_block: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.user_blocks WHERE user = ? AND blocked = ?")).await?,
        ),
        delete_members: idempotent(prepare_one(format!("DELETE FROM {keyspace}.members WHERE channel = ?")).await?),
        delete_all_access: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.channel_access WHERE channel = ?")).await?,
        ),
        delete_settings: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.channel_settings WHERE channel = ?")).await?,
        ),
        delete_channel: idempotent(prepare_one(format!("DELETE FROM {keyspace}.channels WHERE channel = ?")).await?),
        select_devices: idempotent(
            prepare_one(format!(
                "SELECT platform, device_token, registered_at FROM {keyspace}.push_devices WHERE user = ?"
            ))
            .await?,
        ),
        insert_device: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.push_devices (user, platform, device_token, registered_at) VALUES (?, ?, ?, ?)"
            ))
            .await?,
        ),
        delete_device: idempotent(
            prepare_one(format!(
                "DELETE FROM {keyspace}.push_devices WHERE user = ? AND platform = ? AND device_token = ?"
            ))
            .await?,
        ),
        select_device_owner: idempotent(
            prepare_one(format!(
                "SELECT user FROM {keyspace}.push_device_owners WHERE platform = ? AND device_token = ?"
            ))
            .await?,
        ),
        insert_device_owner: idempotent(
            prepare_one(format!(
                "INSERT INTO {keyspace}.push_device_owners (platform, device_token, user) VALUES (?, ?, ?)"
            ))
            .await?,
        ),
        delete_device_owner: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.push_device_owners WHERE platform = ? AND device_token = ?"))
                .await?,
        ),
        select_mutes: idempotent(
            prepare_one(format!("SELECT user, until FROM {keyspace}.push_mutes WHERE channel = ?")).await?,
        ),
        insert_mute: idempotent(
            prepare_one(format!("INSERT INTO {keyspace}.push_mutes (channel, user, until) VALUES (?, ?, ?)")).await?,
        ),
        delete_mute: idempotent(
            prepare_one(format!("DELETE FROM {keyspace}.push_mutes WHERE channel = ? AND user = ?")).await?,
        ),
        delete_mutes: idempotent(prepare_one(format!("DELETE FROM {keyspace}.push_mutes WHERE channel = ?")).await?),
        // A lightweight transaction like the claim it undoes (a plain delete would race a claim's Paxos round).
        delete_home: {
            let mut statement = idempotent(
                prepare_one(format!("DELETE FROM {keyspace}.channel_homes WHERE channel = ? IF EXISTS")).await?,
            );
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::Serial));
            statement
        },
        // Machine-ID leases: a region's routers share its datacenter and regions have disjoint blocks, so Paxos in
        // the local datacenter orders every claim of an ID, and a region keeps leasing while another is cut off.
        select_lease: {
            let mut statement = idempotent(
                prepare_one(format!(
                    "SELECT holder, renewed_at, released_at FROM {keyspace}.machine_leases WHERE scope = ? AND id = ?"
                ))
                .await?,
            );
            statement.set_consistency(scylla::statement::Consistency::LocalSerial);
            statement
        },
        // Not idempotent: a claim retried after it went through would be refused (the caller reads the leases
        // again and finds it holds the ID).
        create_lease: {
            let mut statement = prepare_one(format!(
                "INSERT INTO {keyspace}.machine_leases (scope, id, holder, renewed_at) VALUES (?, ?, ?, ?) \
                 IF NOT EXISTS"
            ))
            .await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
            statement
        },
        take_lease: {
            let mut statement = prepare_one(format!(
                "UPDATE {keyspace}.machine_leases SET holder = ?, renewed_at = ?, released_at = null \
                 WHERE scope = ? AND id = ? IF holder = ? AND renewed_at = ?"
            ))
            .await?;
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
            statement
        },
        // Retrying a renewal or a release is safe: the holder still holds the ID after it went through.
        renew_lease: {
            let mut statement = idempotent(
                prepare_one(format!(
                    "UPDATE {keyspace}.machine_leases SET renewed_at = ? WHERE scope = ? AND id = ? IF holder = ?"
                ))
                .await?,
            );
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
            statement
        },
        release_lease: {
            let mut statement = idempotent(
                prepare_one(format!(
                    "UPDATE {keyspace}.machine_leases SET released_at = ? WHERE scope = ? AND id = ? IF holder = ?"
                ))
                .await?,
            );
            statement.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
            statement
        },
    };
    // A page of history usually needs the newest (or oldest) one or two buckets: list them in small pages.
    let bucket_page = page_size.min(100);
    statements.buckets_newest_first.set_page_size(bucket_page);
    statements.buckets_oldest_first.set_page_size(bucket_page);
    Ok(statements)
}

#[async_trait]
impl MessageStore for CassandraStore {
    #[instrument(skip(self, batch), fields(messages = batch.len()))]
    async fn write(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let bucket_ms = self.config.bucket_ms();
        let message_ttl = self.config.message_ttl_seconds() as i32;
        let bucket_ttl = self.config.bucket_ttl_seconds() as i32;
        // Message rows grouped by partition: one unlogged batch per (channel, bucket).
        let mut partitions: BTreeMap<(String, i64), Vec<&MessageView>> = BTreeMap::new();
        // Bounds per bucket and the newest message per channel, reduced in memory first.
        let mut bounds: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
        let mut newest: BTreeMap<String, &MessageView> = BTreeMap::new();
        for message in &batch {
            let bucket = signed(message.ts / bucket_ms);
            partitions.entry((message.channel.clone(), bucket)).or_default().push(message);
            let entry = bounds.entry((message.channel.clone(), bucket)).or_insert((message.seq, message.seq));
            *entry = (entry.0.min(message.seq), entry.1.max(message.seq));
            let current = newest.entry(message.channel.clone()).or_insert(message);
            if message.seq > current.seq {
                *current = message;
            }
        }
        let mut work: Vec<futures_util::future::BoxFuture<'_, Result<(), BackendError>>> = Vec::new();
        for ((channel, bucket), messages) in partitions {
            let rows: Vec<_> = messages
                .into_iter()
                .map(|message| {
                    (
                        channel.clone(),
                        bucket,
                        signed(message.seq),
                        signed(message.id),
                        message.sender.clone(),
                        message.text.clone(),
                        signed(message.ts),
                        message.client_msg_id.clone(),
                        message_ttl,
                    )
                })
                .collect();
            work.push(Box::pin(self.run_unlogged("write messages", &self.statements.insert_message, rows)));
        }
        for ((channel, bucket), (first, last)) in bounds {
            work.push(Box::pin(async move {
                let first_timestamp = FIRST_SEQ_EPOCH - signed(first);
                self.run(
                    "write bucket index",
                    &self.statements.bucket_first,
                    (bucket_ttl, first_timestamp, signed(first), channel.as_str(), bucket),
                )
                .await?;
                self.run(
                    "write bucket index",
                    &self.statements.bucket_last,
                    (bucket_ttl, signed(last), signed(last), channel.as_str(), bucket),
                )
                .await
                .map(|_| ())
            }));
        }
        for (channel, message) in newest {
            work.push(Box::pin(async move {
                // Timestamp = seq: the row keeps the values of the highest sequence ever written.
                self.run(
                    "write channel state",
                    &self.statements.channel_state,
                    (signed(message.seq), signed(message.seq), signed(message.ts), signed(message.id), channel),
                )
                .await
                .map(|_| ())
            }));
        }
        // Idempotency keys: each its own partition, so a few per unlogged batch (at most SENDS_PER_BATCH, under
        // the server's warning threshold for batches across partitions), which saves most of the per-request cost.
        for chunk in batch.chunks(SENDS_PER_BATCH) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|message| {
                    (
                        message.sender.as_str(),
                        message.client_msg_id.as_str(),
                        message.channel.as_str(),
                        signed(message.seq),
                        signed(message.id),
                        signed(message.ts),
                        message_ttl,
                        first_wins_timestamp(message.id),
                    )
                })
                .collect();
            work.push(Box::pin(self.run_unlogged("write idempotency keys", &self.statements.insert_send, rows)));
        }
        stream::iter(work).buffer_unordered(CONCURRENCY).try_collect::<Vec<()>>().await?;
        debug!("messages stored");
        Ok(())
    }

    #[instrument(skip(self))]
    async fn history(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, BackendError> {
        let limit = query.limit.max(1) as usize;
        let upper = query.before.unwrap_or(u64::MAX);
        let mut messages: Vec<MessageView> = Vec::with_capacity(limit + 1);
        if let Some(after) = query.after {
            if after.saturating_add(1) < upper {
                let mut buckets = self.buckets(channel, false).await?;
                while let Some((bucket, first, last)) = buckets.try_next().await? {
                    if last.is_some_and(|last| (last as u64) <= after) {
                        continue;
                    }
                    if first.is_some_and(|first| (first as u64) >= upper) {
                        break;
                    }
                    let wanted = (limit + 1 - messages.len()) as i32;
                    let rows: Vec<MessageRow> = self
                        .rows(
                            "read history",
                            &self.statements.page_after,
                            (channel, bucket, signed(after), signed(upper), wanted),
                        )
                        .await?;
                    messages.extend(rows.into_iter().map(message_from_row));
                    if messages.len() > limit {
                        break;
                    }
                }
            }
            messages.sort_by_key(|message| message.seq);
            let has_more = messages.len() > limit;
            messages.truncate(limit);
            Ok(HistoryPage { messages, has_more })
        } else {
            let mut buckets = self.buckets(channel, true).await?;
            while let Some((bucket, first, _)) = buckets.try_next().await? {
                if first.is_some_and(|first| (first as u64) >= upper) {
                    continue;
                }
                let wanted = (limit + 1 - messages.len()) as i32;
                let rows: Vec<MessageRow> = self
                    .rows("read history", &self.statements.page_before, (channel, bucket, signed(upper), wanted))
                    .await?;
                messages.extend(rows.into_iter().map(message_from_row));
                if messages.len() > limit {
                    break;
                }
            }
            messages.sort_by_key(|message| std::cmp::Reverse(message.seq));
            let has_more = messages.len() > limit;
            messages.truncate(limit);
            messages.reverse();
            Ok(HistoryPage { messages, has_more })
        }
    }

    async fn first_retained_seq(&self, channel: &str) -> Result<u64, BackendError> {
        // The oldest bucket that still has a row holds the oldest retained message. Index rows outlive their
        // messages by one bucket, so at most a few empty buckets are read before it.
        let mut buckets = self.buckets(channel, false).await?;
        while let Some((bucket, _, _)) = buckets.try_next().await? {
            let rows: Vec<(i64,)> =
                self.rows("read first retained", &self.statements.first_in_bucket, (channel, bucket)).await?;
            if let Some((seq,)) = rows.first() {
                return Ok(*seq as u64);
            }
        }
        // Nothing stored: everything up to the last stored sequence expired (or nothing was ever stored).
        Ok(self.last_stored_seq(channel).await? + 1)
    }

    async fn last_stored_seq(&self, channel: &str) -> Result<u64, BackendError> {
        let rows: Vec<(Option<i64>, Option<i64>, Option<i64>)> =
            self.rows("read channel state", &self.statements.select_state, (channel,)).await?;
        Ok(rows.first().and_then(|(seq, _, _)| *seq).unwrap_or(0) as u64)
    }

    async fn find_stored_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        stream::iter(keys)
            .map(|(sender, client_msg_id)| async move {
                let rows: Vec<(String, i64, i64, i64)> = self
                    .rows(
                        "read idempotency key",
                        &self.statements.select_send,
                        (sender.as_str(), client_msg_id.as_str()),
                    )
                    .await?;
                Ok(rows.into_iter().next().map(|(channel, seq, id, ts)| PriorSend {
                    channel,
                    placement: Placement { id: id as u64, seq: seq as u64, ts: ts as u64 },
                }))
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }
}

/// What a change set does to one channel's record.
struct ChannelUpdate {
    /// The record as it will be after the changes (`None`: no record, counts are not kept).
    record: Option<ChannelRecord>,
    /// Whether the whole record must be written (created in this change set).
    created: bool,
    /// Whether the settings must be written (created or configured in this change set).
    configured: bool,
}

#[async_trait]
impl MembershipStore for CassandraStore {
    async fn channel(&self, channel: &str) -> Result<Option<ChannelRecord>, BackendError> {
        let (rows, settings, homes): (ChannelRows, SettingsRows, HomeRows) = tokio::try_join!(
            self.rows("read channel", &self.statements.select_channel, (channel,)),
            self.rows("read channel settings", &self.statements.select_settings, (channel,)),
            self.rows("read channel home", &self.statements.select_home, (channel,)),
        )?;
        let Some((kind, created_by, created_at, member_count)) = rows.into_iter().next() else {
            return Ok(None);
        };
        let (visibility, posting, history_from) = settings.into_iter().next().unwrap_or((None, None, None));
        Ok(Some(ChannelRecord {
            id: channel.to_owned(),
            kind: kind_from_name(kind.as_deref().unwrap_or("group"))?,
            created_by: created_by.unwrap_or_default(),
            created_at: created_at.unwrap_or(0) as u64,
            member_count: member_count.unwrap_or(0).max(0) as u32,
            visibility: match visibility.as_deref() {
                Some("private") => Visibility::Private,
                _ => Visibility::Public,
            },
            posting: match posting.as_deref() {
                Some("admins") => Posting::Admins,
                _ => Posting::Everyone,
            },
            history_from: history_from.unwrap_or(0).max(0) as u64,
            home: homes.into_iter().next().and_then(|(region, epoch, base_seq)| {
                Some(Home {
                    region: region?,
                    epoch: epoch.unwrap_or(1).max(1) as u64,
                    base_seq: base_seq.unwrap_or(0).max(0) as u64,
                })
            }),
        }))
    }

    async fn access(&self, channel: &str) -> Result<Vec<(String, Access)>, BackendError> {
        let rows: Vec<(String, Option<String>)> =
            self.all_rows("list channel access", &self.statements.select_access, (channel,)).await?;
        Ok(rows.into_iter().filter_map(|(user, access)| Some((user, Access::parse(access.as_deref()?)?))).collect())
    }

    async fn access_of(&self, channel: &str, user: &str) -> Result<Option<Access>, BackendError> {
        let rows: Vec<(Option<String>,)> =
            self.rows("read channel access", &self.statements.select_access_of, (channel, user)).await?;
        Ok(rows.into_iter().next().and_then(|(access,)| Access::parse(access.as_deref()?)))
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>, BackendError> {
        let rows: Vec<(String,)> = self.all_rows("list blocks", &self.statements.select_blocked, (user,)).await?;
        Ok(rows.into_iter().map(|(blocked,)| blocked).collect())
    }

    async fn register_device(&self, user: &str, device: &Device, max: usize) -> Result<bool, BackendError> {
        // Not atomic across the two tables: a concurrent registration of the same token for another user may leave
        // it listed twice; the owner row names one user, and an invalid token is forgotten from both on its first
        // failed push.
        let platform = device.platform.as_str();
        let token = device.token.as_str();
        let owner: Vec<(String,)> =
            self.rows("read device owner", &self.statements.select_device_owner, (platform, token)).await?;
        let owner = owner.into_iter().next().map(|(owner,)| owner);
        if let Some(previous) = owner.as_deref().filter(|previous| *previous != user) {
            self.run("move device", &self.statements.delete_device, (previous, platform, token)).await?;
        }
        let mut held = self.device_rows(user).await?;
        let had = owner.as_deref() == Some(user) && held.iter().any(|(_, known)| known == device);
        if !had {
            let at = held.iter().map(|(at, _)| at + 1).max().unwrap_or(0).max(crate::router::now_ms() as i64);
            self.run("register device", &self.statements.insert_device, (user, platform, token, at)).await?;
            self.run("register device", &self.statements.insert_device_owner, (platform, token, user)).await?;
            held.push((at, device.clone()));
        }
        held.sort_by_key(|(at, _)| *at);
        let excess = held.len().saturating_sub(max.max(1));
        for (_, old) in held.into_iter().take(excess) {
            let (old_platform, old_token) = (old.platform.as_str(), old.token.as_str());
            self.run("forget device", &self.statements.delete_device, (user, old_platform, old_token)).await?;
            self.run("forget device", &self.statements.delete_device_owner, (old_platform, old_token)).await?;
        }
        Ok(had)
    }

    async fn unregister_device(&self, device: &Device, owner: Option<&str>) -> Result<bool, BackendError> {
        let platform = device.platform.as_str();
        let token = device.token.as_str();
        let rows: Vec<(String,)> =
            self.rows("read device owner", &self.statements.select_device_owner, (platform, token)).await?;
        let Some((holder,)) = rows.into_iter().next() else { return Ok(false) };
        if owner.is_some_and(|owner| owner != holder) {
            return Ok(false);
        }
        self.run("forget device", &self.statements.delete_device, (holder.as_str(), platform, token)).await?;
        self.run("forget device", &self.statements.delete_device_owner, (platform, token)).await?;
        Ok(true)
    }

    async fn devices(&self, user: &str) -> Result<Vec<Device>, BackendError> {
        let mut held = self.device_rows(user).await?;
        held.sort_by_key(|(at, _)| *at);
        Ok(held.into_iter().map(|(_, device)| device).collect())
    }

    async fn set_mute(&self, user: &str, channel: &str, until: Option<u64>) -> Result<(), BackendError> {
        match until {
            Some(until) => {
                let until = i64::try_from(until).unwrap_or(i64::MAX);
                self.run("mute", &self.statements.insert_mute, (channel, user, until)).await?;
            }
            None => {
                self.run("unmute", &self.statements.delete_mute, (channel, user)).await?;
            }
        }
        Ok(())
    }

    async fn mutes(&self, channel: &str) -> Result<Vec<(String, u64)>, BackendError> {
        let rows: Vec<(String, Option<i64>)> =
            self.all_rows("list mutes", &self.statements.select_mutes, (channel,)).await?;
        Ok(rows
            .into_iter()
            .map(|(user, until)| {
                // Stored as i64::MAX (or without a time): until unmuted.
                let until = until.filter(|until| *until != i64::MAX).map_or(u64::MAX, |until| until.max(0) as u64);
                (user, until)
            })
            .collect())
    }

    async fn members(&self, channel: &str) -> Result<Vec<String>, BackendError> {
        let rows: Vec<(String,)> = self.all_rows("list members", &self.statements.select_members, (channel,)).await?;
        Ok(rows.into_iter().map(|(user,)| user).collect())
    }

    async fn is_member(&self, channel: &str, user: &str) -> Result<bool, BackendError> {
        let rows: Vec<(String,)> = self.rows("read member", &self.statements.select_member, (channel, user)).await?;
        Ok(!rows.is_empty())
    }

    async fn user_channels(&self, user: &str) -> Result<Vec<String>, BackendError> {
        let rows: Vec<(String,)> =
            self.all_rows("list user channels", &self.statements.select_user_channels, (user,)).await?;
        Ok(rows.into_iter().map(|(channel,)| channel).collect())
    }

    async fn set_read(&self, user: &str, channel: &str, seq: u64) -> Result<u64, BackendError> {
        // The cursor cell is written with the write timestamp `seq`. Cassandra resolves concurrent writes of a
        // cell by last-write-wins on that timestamp, so the cell always holds the highest sequence ever written,
        // whatever the order in which writes arrive or replicas converge: a cursor never moves back, with no read
        // before the write and no lightweight transaction. (Ties are equal values.) Reading it back at the same
        // consistency returns the cursor after the call.
        if seq > 0 {
            self.run("write read cursor", &self.statements.write_cursor, (signed(seq), signed(seq), user, channel))
                .await?;
        }
        Ok(self.read_seq(user, channel).await?.max(seq))
    }

    async fn read_seq(&self, user: &str, channel: &str) -> Result<u64, BackendError> {
        let rows: Vec<(Option<i64>,)> =
            self.rows("read read cursor", &self.statements.select_cursor, (user, channel)).await?;
        Ok(rows.first().and_then(|(seq,)| *seq).unwrap_or(0).max(0) as u64)
    }

    async fn home_now(&self, channel: &str) -> Result<Option<Home>, BackendError> {
        let rows: HomeRows =
            self.rows("read channel home (serial)", &self.statements.select_home_serial, (channel,)).await?;
        Ok(rows.into_iter().next().and_then(|(region, epoch, base_seq)| {
            Some(Home {
                region: region?,
                epoch: epoch.unwrap_or(1).max(1) as u64,
                base_seq: base_seq.unwrap_or(0).max(0) as u64,
            })
        }))
    }

    async fn set_region_failed(&self, region: &str, failed: bool) -> Result<(), BackendError> {
        let result = if failed {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_millis() as i64)
                .unwrap_or(0);
            self.session.execute_unpaged(&self.statements.mark_failed, (region, since)).await
        } else {
            self.session.execute_unpaged(&self.statements.unmark_failed, (region,)).await
        };
        result.map(|_| ()).map_err(|error| execution_error("mark region failed", error))
    }

    async fn report_flow(
        &self,
        target: &str,
        source: &str,
        reporter: &str,
        flow: FlowReport,
    ) -> Result<(), BackendError> {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as i64)
            .unwrap_or(0);
        let lag = flow.lag_ms.map(signed);
        let values = (target, source, reporter, signed(flow.latency_ms), signed(flow.messages), lag, at);
        self.session
            .execute_unpaged(&self.statements.report_flow, values)
            .await
            .map(|_| ())
            .map_err(|error| execution_error("report a mirror flow", error))
    }

    async fn failed_regions(&self) -> Result<Vec<String>, BackendError> {
        let rows: Vec<(String,)> = self.all_rows("read failed regions", &self.statements.select_failed, ()).await?;
        Ok(rows.into_iter().map(|(region,)| region).collect())
    }

    async fn machine_leases(&self, scope: &str, base: u16, count: u16) -> Result<Vec<LeaseRow>, BackendError> {
        let end = (u32::from(base) + u32::from(count)).min(u32::from(u16::MAX) + 1);
        let reads = (u32::from(base)..end).map(|id| async move {
            let rows: Vec<(Option<String>, Option<i64>, Option<i64>)> =
                self.rows("read machine-id lease", &self.statements.select_lease, (scope, id as i32)).await?;
            Ok::<_, BackendError>(rows.into_iter().next().and_then(|(holder, renewed_at, released_at)| {
                Some(LeaseRow {
                    id: id as u16,
                    holder: holder?,
                    renewed_at_ms: renewed_at.unwrap_or(0).max(0) as u64,
                    released_at_ms: released_at.map(|at| at.max(0) as u64),
                })
            }))
        });
        let rows: Vec<Option<LeaseRow>> = stream::iter(reads).buffered(CONCURRENCY).try_collect().await?;
        Ok(rows.into_iter().flatten().collect())
    }

    #[instrument(skip(self, expected))]
    async fn claim_machine_id(
        &self,
        scope: &str,
        id: u16,
        expected: Option<&LeaseRow>,
        holder: &str,
        now_ms: u64,
    ) -> Result<bool, BackendError> {
        let operation = "claim machine id";
        let result = match expected {
            None => {
                self.run(operation, &self.statements.create_lease, (scope, i32::from(id), holder, signed(now_ms))).await
            }
            Some(row) => {
                let values =
                    (holder, signed(now_ms), scope, i32::from(id), row.holder.as_str(), signed(row.renewed_at_ms));
                self.run(operation, &self.statements.take_lease, values).await
            }
        }?;
        applied(operation, result)
    }

    async fn renew_machine_id(&self, scope: &str, id: u16, holder: &str, now_ms: u64) -> Result<bool, BackendError> {
        let operation = "renew machine id";
        let result =
            self.run(operation, &self.statements.renew_lease, (signed(now_ms), scope, i32::from(id), holder)).await?;
        applied(operation, result)
    }

    #[instrument(skip(self))]
    async fn release_machine_id(&self, scope: &str, id: u16, holder: &str, now_ms: u64) -> Result<bool, BackendError> {
        let operation = "release machine id";
        let result =
            self.run(operation, &self.statements.release_lease, (signed(now_ms), scope, i32::from(id), holder)).await?;
        applied(operation, result)
    }

    #[instrument(skip(self, from, to), fields(to = %to.region, epoch = to.epoch))]
    async fn move_home(&self, channel: &str, from: &Home, to: &Home, failover: bool) -> Result<bool, BackendError> {
        let values = (
            to.region.as_str(),
            signed(to.epoch),
            signed(to.base_seq),
            channel,
            from.region.as_str(),
            signed(from.epoch),
        );
        let result = self
            .session
            .execute_unpaged(
                if failover { &self.statements.move_home_local } else { &self.statements.move_home },
                values,
            )
            .await
            .map_err(|error| execution_error("move channel home", error))?;
        // The first column of a conditional update's row is `[applied]` (the current values follow when not).
        let operation = "move channel home";
        let rows = result.into_rows_result().map_err(|error| other_error(operation, error))?;
        let applied = rows
            .rows::<scylla::value::Row>()
            .map_err(|error| other_error(operation, error))?
            .next()
            .transpose()
            .map_err(|error| other_error(operation, error))?
            .and_then(|row| row.columns.into_iter().next().flatten())
            .map(|value| matches!(value, CqlValue::Boolean(true)));
        Ok(applied.unwrap_or(false))
    }

    #[instrument(skip(self, home), fields(region = %home.region))]
    async fn claim_home(&self, channel: &str, home: &Home) -> Result<Home, BackendError> {
        let operation = "claim channel home";
        let values = (channel, home.region.as_str(), signed(home.epoch), signed(home.base_seq));
        let result = self.run(operation, &self.statements.claim_home, values).await?;
        // A conditional insert answers one row: `[applied]`, then (when not applied) the row that exists, its
        // columns found by name.
        let rows = result.into_rows_result().map_err(|error| other_error(operation, error))?;
        let specs = rows.column_specs();
        let index = |name: &str| specs.get_by_name(name).map(|(index, _)| index);
        let (applied, region, epoch, base_seq) =
            (index("[applied]"), index("region"), index("epoch"), index("base_seq"));
        let row = rows
            .rows::<scylla::value::Row>()
            .map_err(|error| other_error(operation, error))?
            .next()
            .transpose()
            .map_err(|error| other_error(operation, error))?
            .ok_or_else(|| BackendError::Corrupt(format!("{operation} of {channel}: the answer has no row")))?;
        let column = |index: Option<usize>| index.and_then(|index| row.columns.get(index).cloned().flatten());
        let number = |index: Option<usize>| match column(index) {
            Some(CqlValue::BigInt(value)) => Some(value.max(0) as u64),
            _ => None,
        };
        match column(applied) {
            Some(CqlValue::Boolean(true)) => Ok(home.clone()),
            Some(CqlValue::Boolean(false)) => match column(region) {
                Some(CqlValue::Text(region)) => Ok(Home {
                    region,
                    epoch: number(epoch).unwrap_or(1).max(1),
                    base_seq: number(base_seq).unwrap_or(0),
                }),
                other => Err(BackendError::Corrupt(format!(
                    "{operation} of {channel}: the stored home names no region ({other:?})"
                ))),
            },
            other => Err(BackendError::Corrupt(format!(
                "{operation} of {channel}: the answer has no [applied] flag ({other:?})"
            ))),
        }
    }

    #[instrument(skip(self, changes), fields(changes = changes.len()))]
    async fn apply(&self, changes: Vec<MembershipChange>) -> Result<(), BackendError> {
        // A channel's deletion splits the changes: what comes before it is written first, then the deletion,
        // then what comes after (which reads the store again, as the deletion left it).
        let mut run = Vec::new();
        for change in changes {
            match change {
                MembershipChange::Delete { channel } => {
                    self.apply_run(std::mem::take(&mut run)).await?;
                    self.delete_channel(&channel).await?;
                }
                other => run.push(other),
            }
        }
        self.apply_run(run).await
    }
}

impl CassandraStore {
    /// Deletes a channel's record, settings, members (with their channel lists) and access entries.
    async fn delete_channel(&self, channel: &str) -> Result<(), BackendError> {
        let members = self.members(channel).await?;
        let text = |value: &str| CqlValue::Text(value.to_owned());
        for chunk in members.chunks(MEMBERSHIP_BATCH) {
            let mut batch = Batch::new(BatchType::Unlogged);
            let mut values: Vec<Vec<CqlValue>> = Vec::new();
            for user in chunk {
                batch.append_statement(self.statements.delete_user_channel.clone());
                values.push(vec![text(user), text(channel)]);
            }
            self.session.batch(&batch, values).await.map_err(|error| execution_error("delete channel", error))?;
        }
        // Then the channel's own partitions; the record last, so a failure part way leaves the channel in place
        // (deleting it again finishes the job).
        for statement in [
            &self.statements.delete_members,
            &self.statements.delete_all_access,
            &self.statements.delete_mutes,
            &self.statements.delete_settings,
            &self.statements.delete_channel,
        ] {
            self.session
                .execute_unpaged(statement, (channel,))
                .await
                .map_err(|error| execution_error("delete channel", error))?;
        }
        // Then its home, so that a group created again under the name claims one afresh. Left behind (another
        // datacenter unreachable for the compare-and-set), it still names one home: a creation goes there.
        if let Err(error) = self.session.execute_unpaged(&self.statements.delete_home, (channel,)).await {
            warn!(channel, error = %error, "the deleted channel's home stays in the store: a group created again \
                under its name is homed where it was");
        }
        Ok(())
    }

    /// Applies changes with no deletion among them.
    async fn apply_run(&self, changes: Vec<MembershipChange>) -> Result<(), BackendError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Read what the changes depend on: the records of the channels touched and which touched pairs are
        // members already. The router's single writer is the only one changing these channels meanwhile.
        let mut pairs = HashSet::new();
        let mut channels: BTreeMap<String, ChannelUpdate> = BTreeMap::new();
        for change in &changes {
            if let MembershipChange::Add { channel, user } | MembershipChange::Remove { channel, user } = change {
                pairs.insert((channel.clone(), user.clone()));
            }
            let Some(channel) = change.channel() else { continue };
            if !channels.contains_key(channel) {
                let record = self.channel(channel).await?;
                channels.insert(channel.to_owned(), ChannelUpdate { record, created: false, configured: false });
            }
        }
        let mut present = self.current_members(&pairs).await?;
        // Then write them in logged batches: each holds the rows of up to MEMBERSHIP_BATCH changes and the member
        // counts as they stand after them, so counts and rows stay consistent even if a later batch fails.
        let mut chunk_statements = Batch::new(BatchType::Logged);
        let mut chunk_values: Vec<Vec<CqlValue>> = Vec::new();
        let mut chunk_touched: HashSet<String> = HashSet::new();
        // The net state of each pair changed in the chunk: every statement of a batch has the same timestamp, and
        // at equal timestamps a delete wins over an insert, so a remove and re-add must become one insert.
        let mut chunk_pairs: BTreeMap<(String, String), bool> = BTreeMap::new();
        // Likewise the net access of each (channel, user) and the net block of each (user, other) in the chunk.
        let mut chunk_access: BTreeMap<(String, String), Option<Access>> = BTreeMap::new();
        let mut chunk_blocks: BTreeMap<(String, String), bool> = BTreeMap::new();
        let mut rows_in_chunk = 0usize;
        let statements = &self.statements;
        let text = |value: &str| CqlValue::Text(value.to_owned());
        for (index, change) in changes.iter().enumerate() {
            match change {
                MembershipChange::Create(record) => {
                    let mut record = record.clone();
                    record.member_count = 0;
                    let entry = channels.entry(record.id.clone()).or_insert(ChannelUpdate {
                        record: None,
                        created: false,
                        configured: false,
                    });
                    entry.record = Some(record);
                    entry.created = true;
                    entry.configured = true;
                    chunk_touched.insert(entry_channel(change));
                }
                MembershipChange::Add { channel, user } => {
                    if present.insert((channel.clone(), user.clone())) {
                        chunk_pairs.insert((channel.clone(), user.clone()), true);
                        if let Some(record) = channels.get_mut(channel).and_then(|update| update.record.as_mut()) {
                            record.member_count = record.member_count.saturating_add(1);
                        }
                        chunk_touched.insert(channel.clone());
                    }
                }
                MembershipChange::Remove { channel, user } => {
                    if present.remove(&(channel.clone(), user.clone())) {
                        chunk_pairs.insert((channel.clone(), user.clone()), false);
                        if let Some(record) = channels.get_mut(channel).and_then(|update| update.record.as_mut()) {
                            record.member_count = record.member_count.saturating_sub(1);
                        }
                        chunk_touched.insert(channel.clone());
                    }
                }
                MembershipChange::SetAccess { channel, user, access } => {
                    chunk_access.insert((channel.clone(), user.clone()), *access);
                }
                MembershipChange::Configure { channel, visibility, posting } => {
                    if let Some(update) = channels.get_mut(channel) {
                        if let Some(record) = update.record.as_mut() {
                            record.visibility = *visibility;
                            record.posting = *posting;
                            update.configured = true;
                            chunk_touched.insert(channel.clone());
                        }
                    }
                }
                MembershipChange::SetBlock { user, other, blocked } => {
                    chunk_blocks.insert((user.clone(), other.clone()), *blocked);
                }
                MembershipChange::Delete { .. } => {
                    // `apply` writes deletions apart.
                }
            }
            rows_in_chunk += 1;
            if rows_in_chunk >= MEMBERSHIP_BATCH || index + 1 == changes.len() {
                for ((channel, user), member) in std::mem::take(&mut chunk_pairs) {
                    let (member_statement, user_statement) = if member {
                        (&statements.insert_member, &statements.insert_user_channel)
                    } else {
                        (&statements.delete_member, &statements.delete_user_channel)
                    };
                    chunk_statements.append_statement(member_statement.clone());
                    chunk_values.push(vec![text(&channel), text(&user)]);
                    chunk_statements.append_statement(user_statement.clone());
                    chunk_values.push(vec![text(&user), text(&channel)]);
                }
                for ((channel, user), access) in std::mem::take(&mut chunk_access) {
                    match access {
                        Some(access) => {
                            chunk_statements.append_statement(statements.write_access.clone());
                            chunk_values.push(vec![text(&channel), text(&user), text(access.as_str())]);
                        }
                        None => {
                            chunk_statements.append_statement(statements.delete_access.clone());
                            chunk_values.push(vec![text(&channel), text(&user)]);
                        }
                    }
                }
                for ((user, other), blocked) in std::mem::take(&mut chunk_blocks) {
                    let statement = if blocked { &statements.insert_block } else { &statements.delete_block };
                    chunk_statements.append_statement(statement.clone());
                    chunk_values.push(vec![text(&user), text(&other)]);
                }
                for channel in chunk_touched.drain() {
                    let Some(update) = channels.get_mut(&channel) else { continue };
                    let Some(record) = &update.record else { continue };
                    if update.configured {
                        chunk_statements.append_statement(statements.write_settings.clone());
                        chunk_values.push(vec![
                            text(&record.id),
                            text(visibility_name(record.visibility)),
                            text(posting_name(record.posting)),
                            CqlValue::BigInt(signed(record.history_from)),
                        ]);
                        update.configured = false;
                    }
                    let count = i32::try_from(record.member_count).unwrap_or(i32::MAX);
                    if update.created {
                        chunk_statements.append_statement(statements.insert_channel.clone());
                        chunk_values.push(vec![
                            text(&record.id),
                            text(kind_name(record.kind)),
                            text(&record.created_by),
                            CqlValue::BigInt(signed(record.created_at)),
                            CqlValue::Int(count),
                        ]);
                        if let Some(home) = &record.home {
                            chunk_statements.append_statement(statements.write_home.clone());
                            chunk_values.push(vec![
                                text(&record.id),
                                text(&home.region),
                                CqlValue::BigInt(signed(home.epoch)),
                                CqlValue::BigInt(signed(home.base_seq)),
                            ]);
                        }
                        update.created = false;
                    } else {
                        chunk_statements.append_statement(statements.update_count.clone());
                        chunk_values.push(vec![CqlValue::Int(count), text(&record.id)]);
                    }
                }
                if !chunk_values.is_empty() {
                    let values = std::mem::take(&mut chunk_values);
                    let batch = std::mem::replace(&mut chunk_statements, Batch::new(BatchType::Logged));
                    self.session
                        .batch(&batch, values)
                        .await
                        .map_err(|error| execution_error("apply membership", error))?;
                }
                rows_in_chunk = 0;
            }
        }
        Ok(())
    }
}

/// The channel of a change that has one, owned.
fn entry_channel(change: &MembershipChange) -> String {
    change.channel().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_and_overloaded_clusters_are_unavailable() {
        let unavailable = [
            ExecutionError::EmptyPlan,
            ExecutionError::RequestTimeout(Duration::from_secs(5)),
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                DbError::Unavailable { consistency: Consistency::LocalQuorum, required: 2, alive: 1 },
                "cannot achieve consistency level".into(),
            )),
        ];
        for error in unavailable {
            let mapped = execution_error("write messages", error);
            assert!(matches!(mapped, BackendError::Unavailable(_)), "{mapped:?}");
            assert!(mapped.to_string().starts_with("backend unavailable: cassandra write messages failed"), "{mapped}");
        }
        let syntax =
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::SyntaxError, "line 1".into()));
        let mapped = execution_error("read history", syntax);
        assert!(matches!(mapped, BackendError::Cassandra { operation: "read history", .. }), "{mapped:?}");
    }

    #[test]
    fn config_is_validated() {
        let valid = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "parley_1");
        assert!(valid.validate().is_ok());
        assert_eq!(valid.message_ttl_seconds(), 365 * 24 * 3600);
        assert_eq!(valid.bucket_ttl_seconds(), 365 * 24 * 3600 + 3600);
        let forever = CassandraConfig { retention: None, ..valid.clone() };
        assert_eq!((forever.message_ttl_seconds(), forever.bucket_ttl_seconds()), (0, 0));
        for invalid in [
            CassandraConfig { keyspace: "x".repeat(49), ..valid.clone() },
            CassandraConfig { contact_points: vec![], ..valid.clone() },
            CassandraConfig { bucket: Duration::from_millis(10), ..valid.clone() },
            CassandraConfig { page_size: 0, ..valid.clone() },
            CassandraConfig { retention: Some(Duration::from_secs(MAX_TTL_SECONDS + 1)), ..valid.clone() },
            CassandraConfig { replication: Replication::NetworkTopology(BTreeMap::new()), ..valid.clone() },
            CassandraConfig {
                credentials: Some(CassandraCredentials { username: String::new(), password: "p".into() }),
                ..valid.clone()
            },
        ] {
            assert!(matches!(invalid.validate(), Err(BackendError::InvalidConfig(_))), "{invalid:?}");
        }
    }

    #[test]
    fn tls_settings_and_the_hidden_password() {
        let mut config = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "parley_1");
        assert!(!config.uses_tls());
        assert!(config.tls_context().expect("no TLS").is_none());
        config.tls = true;
        assert!(config.tls_context().expect("the system's roots").is_some());
        config.credentials = Some(CassandraCredentials { username: "parley".into(), password: "s3cret".into() });
        let shown = format!("{config:?}");
        assert!(shown.contains("parley") && !shown.contains("s3cret"), "{shown}");

        let dir = std::env::temp_dir().join(format!("parley-cassandra-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let not_pem = dir.join("not-a-ca.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let with_file = |path: PathBuf| CassandraConfig { tls: false, tls_ca_file: Some(path), ..config.clone() };
        assert!(with_file(not_pem.clone()).uses_tls(), "a CA file implies TLS");
        for path in [not_pem, dir.join("missing.pem")] {
            let error = with_file(path.clone()).tls_context().map(|_| ()).expect_err("not a CA file");
            assert!(error.to_string().contains(&path.display().to_string()), "{error}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
