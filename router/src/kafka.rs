//! Kafka driver of the durable log ([`KafkaLog`]) and the store writer that fills a [`MessageStore`] from it
//! ([`StoreWriter`]).
//!
//! # Topics
//! `{prefix}messages`, `{prefix}receipts`, `{prefix}presence`, `{prefix}memberships` and `{prefix}beacons`, created
//! idempotently by [`ensure_topics`].
//! Messages are keyed by channel, and the driver places each record itself on Kafka's default partition for
//! its key ([`partition::partition_for`], murmur2 as in the Java client), so a channel lives in one partition
//! and its order is the partition's order. Every read cursor that moves is appended to `{prefix}receipts`
//! (keyed by channel, same partitioner; an idempotent producer with `acks=all`, no transaction: a cursor only
//! moves forward, so a record written twice changes nothing) before the router confirms it, so other regions can
//! mirror it. Presence changes the gateways see are appended to `{prefix}presence` (keyed by user, same producer)
//! through the router ([`MessageLog::record_presence`]); presence itself lives in Redis, and the topic is its
//! change feed for other regions. `{prefix}memberships` carries membership changes, and `{prefix}beacons` the
//! routers' timed beacons ([`beacon`]), both for other regions.
//!
//! # Ownership and fencing
//! The owner of a partition is the single writer of every channel in it. The routers of a Region share the
//! partitions through the consumer group `{prefix}writers` ([`OwnershipGroup`], see [`ownership`]): the group gives
//! each partition to one router, which acquires it ([`KafkaLog::acquire_partitions`]) and gives it up when the
//! group takes it away ([`KafkaLog::release_partitions`]); each router publishes what it owns, and gateways send a
//! channel's calls to its owner ([`parley_api::routing`]). A [`KafkaLog`] can also be opened with fixed partitions
//! (all of them for a single writer, as the tests and tools do). For each partition it acquires it creates a
//! transactional producer
//! with `transactional.id = {prefix}writer-p{partition}` and calls `init_transactions`. That bumps the
//! producer epoch of the id, so the broker rejects every later write or commit of the previous owner's
//! producer (`PRODUCER_FENCED`): the previous owner's [`append`](MessageLog::append) fails with
//! [`BackendError::Fenced`] and the router never confirms it; whatever that transaction had sent is aborted
//! and never reaches a `read_committed` consumer. `init_transactions` also finishes or aborts a transaction
//! the previous owner left open, so the new owner then reads a stable tail.
//!
//! Acquiring a partition then scans its committed records from the store writer's committed offset to the
//! end of the log into a bounded in-memory index ([`tail::TailIndex`]). `last_seq` and `find_sends` answer from
//! that index first and from the store ([`MessageStore::last_stored_seq`], [`MessageStore::find_stored_sends`])
//! for everything older, so a new owner continues each channel from its last durable sequence even when the
//! store writer lags. The index holds at most [`KafkaConfig::max_unstored_sends`] sends: entries the store writer
//! has committed are pruned, and an append that would exceed the limit fails with [`BackendError::TailFull`].
//! For a channel of a partition it does not own, a log answers `last_seq` and `find_sends` from the store only
//! (which may lag), and refuses to append ([`BackendError::NotOwner`]).
//!
//! # Appends
//! An append groups its batch by partition and runs one transaction per partition (partitions concurrently):
//! idempotent producer, `acks=all`, records sent, then `commit_transaction`. It returns `Ok` only after every
//! commit succeeded, so a confirmed send is acknowledged by all in-sync replicas (decision 2). A failed
//! transaction is aborted. When neither commit nor abort could be confirmed (the broker went away in between),
//! the partition is re-acquired before its next append (a new producer, `init_transactions`, a new tail scan),
//! which settles the outcome. Partitions of one batch commit independently: after a failure, part of the
//! batch may be durable, and the log tells the router so through `last_seq` (see `router.rs`). An append whose
//! first sequence of a channel does not follow what the tail shows fails with
//! [`BackendError::SequenceConflict`] instead of writing a second message at a sequence.
//!
//! # The store writer
//! [`StoreWriter`] is a consumer group `{prefix}store-writer` on the messages topic (`read_committed`, so
//! aborted or still-open transactions are never stored). It writes batches to the store with idempotent
//! writes, commits offsets only after a write succeeded, and retries with backoff while the store is down, so
//! it never skips a message. After a crash it replays from the committed offsets; the replayed writes change
//! nothing. The database is never on the send path (decision 3).
//!
//! # Security
//! Every client (producers, consumers, admin and metadata clients) gets the same settings from
//! [`KafkaConfig::client_config`]: TLS with [`KafkaConfig::tls`] or a CA file ([`KafkaConfig::tls_ca_file`]), SASL
//! (SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN) with [`KafkaConfig::sasl`]; both give `SASL_SSL`. librdkafka reports a
//! rejected password or a failed TLS handshake only through its error callback, while the call that needed the
//! broker just times out. [`ensure_topics`], the first call of the log and of the store writer, first reaches the
//! brokers with a client whose error callback it watches, and fails at once with [`BackendError::Refused`]
//! (`Kafka at <bootstrap>: SASL authentication failed: ...`, `... TLS handshake failed: certificate verify failed
//! ...`).

pub mod beacon;
pub mod log;
pub mod mirror;
pub mod ownership;
pub mod partition;
pub mod store_writer;
pub mod tail;

pub use log::{KafkaLog, KafkaLogStats};
pub use ownership::OwnershipGroup;
pub use store_writer::{Fencing, StoreWriter, StoreWriterStats};

#[cfg(doc)]
use crate::backend::{MessageLog, MessageStore};
use parley_api::BackendError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where Kafka is, topic layout, and the driver's timeouts and limits.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`, the brokers' listener for clients: plaintext, or TLS ([`KafkaConfig::tls`],
    /// [`KafkaConfig::tls_ca_file`]) and SASL ([`KafkaConfig::sasl`]) as that listener wants.
    pub bootstrap_servers: String,
    /// Prefix of every topic, transactional id and consumer group, e.g. `parley-`.
    pub prefix: String,
    /// Partitions of the topics when [`ensure_topics`] creates them (existing topics keep theirs).
    pub partitions: i32,
    /// Replication factor of the topics when [`ensure_topics`] creates them (3 in production).
    pub replication_factor: i32,
    /// Bound of every single Kafka call: metadata, admin, offsets, `init_transactions`, commit, abort.
    pub request_timeout: Duration,
    /// Bound of a whole append (its records must be acknowledged within it; librdkafka's
    /// `message.timeout.ms`). A broker outage fails an append after at most this long.
    pub append_timeout: Duration,
    /// `transaction.timeout.ms`: the broker aborts a transaction its producer abandoned after this long.
    pub transaction_timeout: Duration,
    /// `linger.ms` of the producers (a commit flushes anyway).
    pub linger: Duration,
    /// Most sends a writer keeps in its index of the unstored tail.
    pub max_unstored_sends: usize,
    /// Bound of the tail scan when a partition is acquired.
    pub scan_timeout: Duration,
    /// Most messages the store writer writes in one store call.
    pub store_batch_max: usize,
    /// How long the store writer waits to fill a batch once it has one message.
    pub store_batch_wait: Duration,
    /// First delay before the store writer retries a failed store write; doubled up to `retry_max`.
    pub retry_min: Duration,
    /// Longest delay between store-write retries.
    pub retry_max: Duration,
    /// Static membership of the store writer in its consumer group (`group.instance.id`). A restarted process
    /// with the same id takes its partitions back at once instead of waiting for the old member's session to
    /// time out; give every router its own stable id (e.g. derived from its pod). `None`: dynamic membership.
    pub store_writer_instance: Option<String>,
    /// `session.timeout.ms` of the store writer: how long a member that vanished keeps its partitions.
    pub session_timeout: Duration,
    /// Encrypt every connection with TLS, checking the brokers' certificates (and that they name the host
    /// connected to) against [`KafkaConfig::tls_ca_file`], or the system's roots without one.
    pub tls: bool,
    /// PEM file of the CA(s) that sign the brokers' certificates (`ssl.ca.location`). Setting it implies TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// SASL authentication; `None`: none. With TLS this is `SASL_SSL`, without `SASL_PLAINTEXT`.
    pub sasl: Option<KafkaSasl>,
}

/// A SASL mechanism the driver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaslMechanism {
    /// `SCRAM-SHA-512` (the default).
    #[default]
    ScramSha512,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `PLAIN`: the password travels as it is, so only over TLS.
    Plain,
}

impl SaslMechanism {
    /// The mechanism's name, as Kafka and librdkafka spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for SaslMechanism {
    type Err = String;

    /// `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`, case-insensitive.
    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_uppercase().as_str() {
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "PLAIN" => Ok(SaslMechanism::Plain),
            _ => Err(format!("unknown SASL mechanism {name:?}: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN")),
        }
    }
}

/// SASL credentials of the Kafka clients. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSasl {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl KafkaConfig {
    /// Defaults for `bootstrap_servers`: prefix `parley-`, 8 partitions, replication factor 1, 5 s requests and
    /// appends, 60 s transactions, 1 ms linger, 1,000,000 unstored sends, 60 s tail scan, store batches of 1024
    /// within 5 ms, store retries after 100 ms up to 5 s; no TLS, no SASL.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            prefix: "parley-".to_owned(),
            partitions: 8,
            replication_factor: 1,
            request_timeout: Duration::from_secs(5),
            append_timeout: Duration::from_secs(5),
            transaction_timeout: Duration::from_secs(60),
            linger: Duration::from_millis(1),
            max_unstored_sends: 1_000_000,
            scan_timeout: Duration::from_secs(60),
            store_batch_max: 1024,
            store_batch_wait: Duration::from_millis(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            store_writer_instance: None,
            session_timeout: Duration::from_secs(10),
            tls: false,
            tls_ca_file: None,
            sasl: None,
        }
    }

    /// Whether the clients use TLS ([`KafkaConfig::tls`], or a CA file).
    pub fn uses_tls(&self) -> bool {
        self.tls || self.tls_ca_file.is_some()
    }

    /// librdkafka's `security.protocol` for these settings.
    pub fn security_protocol(&self) -> &'static str {
        match (self.uses_tls(), self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        }
    }

    /// The same configuration with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same configuration with another partition count.
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// `{prefix}messages`.
    pub fn messages_topic(&self) -> String {
        format!("{}messages", self.prefix)
    }

    /// `{prefix}receipts`.
    pub fn receipts_topic(&self) -> String {
        format!("{}receipts", self.prefix)
    }

    /// `{prefix}presence`.
    pub fn presence_topic(&self) -> String {
        format!("{}presence", self.prefix)
    }

    /// `{prefix}memberships`: membership changes, keyed by channel, for other regions.
    pub fn memberships_topic(&self) -> String {
        format!("{}memberships", self.prefix)
    }

    /// `{prefix}beacons`: the routers' timed beacons, by which other regions measure MirrorMaker 2's lag.
    pub fn beacons_topic(&self) -> String {
        format!("{}beacons", self.prefix)
    }

    /// `{source}.{topic}`: `topic` of region `source` as MirrorMaker 2's default replication policy names it in
    /// this region's Kafka.
    pub fn mirrored(source: &str, topic: &str) -> String {
        format!("{source}.{topic}")
    }

    /// `{prefix}mirror`, the consumer group of the routers that deliver other regions' mirrored records.
    pub fn mirror_group(&self) -> String {
        format!("{}mirror", self.prefix)
    }

    /// `{prefix}store-writer`, the store writer's consumer group.
    pub fn store_writer_group(&self) -> String {
        format!("{}store-writer", self.prefix)
    }

    /// `{prefix}writers`, the consumer group whose assignment says which router owns which partition.
    pub fn ownership_group(&self) -> String {
        format!("{}writers", self.prefix)
    }

    /// `{prefix}writer-p{partition}`, the transactional id of a partition's owner.
    pub fn transactional_id(&self, partition: i32) -> String {
        format!("{}writer-p{partition}", self.prefix)
    }

    /// The settings every client of the driver shares (brokers, timeouts, TLS, SASL), for tools and tests that make
    /// clients of their own.
    pub fn client_config(&self) -> ClientConfig {
        self.client()
    }

    /// Settings every client shares.
    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("socket.timeout.ms", millis(self.request_timeout.max(Duration::from_millis(10))))
            .set("socket.connection.setup.timeout.ms", millis(self.request_timeout.max(Duration::from_millis(1000))))
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "3")
            .set("security.protocol", self.security_protocol());
        if let Some(ca_file) = &self.tls_ca_file {
            config.set("ssl.ca.location", ca_file.display().to_string());
        }
        if let Some(sasl) = &self.sasl {
            config
                .set("sasl.mechanisms", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
        config
    }

    /// A consumer that reads committed records and never commits by itself.
    fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.client();
        config
            .set("group.id", group)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        config
    }

    fn check(&self) -> Result<(), BackendError> {
        if self.bootstrap_servers.is_empty() {
            return Err(BackendError::Config("kafka bootstrap servers are empty".into()));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err(BackendError::Config(format!(
                "kafka partitions ({}) and replication factor ({}) must be at least 1",
                self.partitions, self.replication_factor
            )));
        }
        if let Some(ca_file) = &self.tls_ca_file {
            if let Err(error) = std::fs::metadata(ca_file) {
                return Err(BackendError::Config(format!("kafka TLS CA file {}: {error}", ca_file.display())));
            }
        }
        if self.sasl.as_ref().is_some_and(|sasl| sasl.username.is_empty()) {
            return Err(BackendError::Config("kafka SASL username is empty".into()));
        }
        if self.append_timeout > self.transaction_timeout {
            return Err(BackendError::Config(format!(
                "kafka append timeout ({} ms) must not exceed the transaction timeout ({} ms)",
                self.append_timeout.as_millis(),
                self.transaction_timeout.as_millis()
            )));
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Maps a Kafka client error to a [`BackendError`].
pub(crate) fn kafka_error(operation: &'static str) -> impl FnOnce(KafkaError) -> BackendError {
    move |source| BackendError::Kafka { operation, source: Box::new(source) }
}

/// Runs a blocking librdkafka call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(call).await.map_err(|error| BackendError::Task(error.to_string()))?
}

/// Repeats a blocking Kafka call until it succeeds or `within` has passed (then returns the last error). For
/// the moments after a topic or group was created, when leaders and coordinators are still being elected.
pub(crate) fn retry_blocking<T>(
    within: Duration,
    mut call: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let deadline = Instant::now() + within;
    loop {
        match call() {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// An error librdkafka reported through a client's error callback.
#[derive(Debug, Clone)]
struct Reported {
    code: Option<RDKafkaErrorCode>,
    reason: String,
}

/// A client context that keeps what librdkafka reports through the error callback: connection failures, failed TLS
/// handshakes, rejected SASL credentials. A call that needs the broker only times out in those cases; the report
/// says why. A refusal (credentials, TLS) is kept over the reports that follow it ("all brokers are down").
#[derive(Clone, Default)]
pub(crate) struct ErrorWatch {
    last: Arc<Mutex<Option<Reported>>>,
}

impl ErrorWatch {
    fn reported(&self) -> Option<Reported> {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The last reported error, for a message.
    fn last_error(&self) -> Option<String> {
        self.reported().map(|reported| reported.reason)
    }

    /// The refusal among the reports so far, if any.
    fn refusal(&self, config: &KafkaConfig) -> Option<BackendError> {
        self.reported().and_then(|reported| refusal(config, &reported))
    }
}

impl ClientContext for ErrorWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka");
        let code = error.rdkafka_error_code();
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !last.as_ref().is_some_and(|last| is_refusal(last.code, &last.reason)) {
            *last = Some(Reported { code, reason: reason.to_owned() });
        }
    }
}

impl ProducerContext for ErrorWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

fn is_refusal(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    match code {
        Some(RDKafkaErrorCode::Authentication) => true,
        Some(RDKafkaErrorCode::SSL) => reason.contains("handshake failed"),
        _ => false,
    }
}

/// A rejected password or a failed TLS handshake, as [`BackendError::Refused`].
fn refusal(config: &KafkaConfig, reported: &Reported) -> Option<BackendError> {
    if !is_refusal(reported.code, &reported.reason) {
        return None;
    }
    let reason = match reported.code {
        Some(RDKafkaErrorCode::Authentication) => {
            let who = match &config.sasl {
                Some(sasl) => format!(" (user {}, mechanism {})", sasl.username, sasl.mechanism),
                None => String::new(),
            };
            format!("SASL authentication failed{who}: {}", reported.reason)
        }
        _ if reported.reason.contains("certificate verify failed") => {
            let trusted = match &config.tls_ca_file {
                Some(ca_file) => format!("a CA in {}", ca_file.display()),
                None => "a CA of the system's roots".to_owned(),
            };
            format!(
                "TLS handshake failed: certificate verify failed: the broker's certificate is not signed by {trusted} \
                 ({})",
                reported.reason
            )
        }
        _ => format!("TLS handshake failed: {}", reported.reason),
    };
    Some(BackendError::Refused { engine: "Kafka", address: config.bootstrap_servers.clone(), reason })
}

/// Reaches the brokers with a client whose error callback is watched (a producer, whose `poll` serves librdkafka's
/// main queue; the admin client's main queue is never served) and asks for the cluster's metadata. Returns once the
/// brokers answered; at the first rejected password or failed TLS handshake with [`BackendError::Refused`]; after the
/// request timeout with [`BackendError::Unavailable`] and the last error librdkafka reported.
async fn reach_brokers(config: &KafkaConfig) -> Result<(), BackendError> {
    let watch = ErrorWatch::default();
    let probe: BaseProducer<ErrorWatch> =
        config.client().create_with_context(watch.clone()).map_err(kafka_error("probe client"))?;
    let config = config.clone();
    blocking(move || {
        let deadline = Instant::now() + config.request_timeout;
        loop {
            // All topics: asking for one could create it (auto.create.topics.enable).
            let answered = probe.client().fetch_metadata(None, PROBE_STEP).is_ok();
            // Serves the main queue (log lines and errors, in order) for a while: one event per call otherwise.
            probe.poll(PROBE_STEP / 2);
            if let Some(refusal) = watch.refusal(&config) {
                return Err(refusal);
            }
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut message = format!(
                    "kafka brokers at {} did not answer within {} ms",
                    config.bootstrap_servers,
                    config.request_timeout.as_millis()
                );
                if let Some(last) = watch.last_error() {
                    message.push_str(&format!("; last error: {last}"));
                }
                return Err(BackendError::Unavailable(message));
            }
        }
    })
    .await
}

/// How long one metadata request of [`reach_brokers`] waits before the error callback is looked at.
const PROBE_STEP: Duration = Duration::from_millis(200);

/// Creates `{prefix}messages`, `{prefix}receipts`, `{prefix}presence`, `{prefix}memberships` and `{prefix}beacons`
/// unless they exist, then waits until
/// the messages topic is visible with a leader for every partition. Returns its partition count (that of the
/// existing topic when it was there already). Rejected credentials or a failed TLS handshake fail it at once
/// ([`BackendError::Refused`]); brokers that do not answer, after the request timeout.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<i32, BackendError> {
    let names = [
        config.messages_topic(),
        config.receipts_topic(),
        config.presence_topic(),
        config.memberships_topic(),
        config.beacons_topic(),
    ];
    create_topics(config, &names).await?;
    partition_count(config, &config.messages_topic()).await
}

/// Creates `names` (each with the configured partitions and replication factor) unless they exist.
pub async fn create_topics(config: &KafkaConfig, names: &[String]) -> Result<(), BackendError> {
    config.check()?;
    reach_brokers(config).await?;
    let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(kafka_error("admin client"))?;
    let min_insync = if config.replication_factor >= 3 { "2" } else { "1" };
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(name, config.partitions, TopicReplication::Fixed(config.replication_factor))
                .set("min.insync.replicas", min_insync)
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(config.request_timeout))
        .operation_timeout(Some(config.request_timeout));
    let results = tokio::time::timeout(config.request_timeout * 2, admin.create_topics(topics.iter(), &options))
        .await
        .map_err(|_| unavailable("create topics", config))?
        .map_err(kafka_error("create topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BackendError::KafkaTopic { topic, code: code.to_string() }),
        }
    }
    Ok(())
}

/// The partition count of `topic`, waiting (up to the request timeout) until the topic is visible and every
/// partition has a leader.
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<i32, BackendError> {
    let consumer: BaseConsumer = config.client().create().map_err(kafka_error("metadata client"))?;
    let topic = topic.to_owned();
    let timeout = config.request_timeout;
    blocking(move || {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = consumer.fetch_metadata(Some(topic.as_str()), remaining.max(Duration::from_millis(100)));
            let last_problem = match &outcome {
                Ok(metadata) => match metadata.topics().first() {
                    Some(found) if found.error().is_none() && !found.partitions().is_empty() => {
                        if found.partitions().iter().all(|partition| partition.leader() >= 0) {
                            return Ok(found.partitions().len() as i32);
                        }
                        format!("topic {topic} has partitions without a leader")
                    }
                    Some(found) => format!("topic {topic} is not ready: {:?}", found.error()),
                    None => format!("topic {topic} is missing"),
                },
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(BackendError::Unavailable(format!(
                    "kafka metadata of {topic}: {last_problem} after {} ms",
                    timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
}

fn unavailable(operation: &str, config: &KafkaConfig) -> BackendError {
    BackendError::Unavailable(format!(
        "kafka {operation} timed out after {} ms (bootstrap {})",
        config.request_timeout.as_millis(),
        config.bootstrap_servers
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let config = KafkaConfig::new("127.0.0.1:9092").with_prefix("t1-");
        assert_eq!(config.messages_topic(), "t1-messages");
        assert_eq!(config.receipts_topic(), "t1-receipts");
        assert_eq!(config.presence_topic(), "t1-presence");
        assert_eq!(config.store_writer_group(), "t1-store-writer");
        assert_eq!(config.transactional_id(3), "t1-writer-p3");
    }

    #[test]
    fn invalid_settings_are_refused_with_a_clear_error() {
        assert!(KafkaConfig::new("").check().is_err());
        assert!(KafkaConfig::new("h:1").with_partitions(0).check().is_err());
        let mut config = KafkaConfig::new("h:1");
        config.append_timeout = Duration::from_secs(120);
        let error = config.check().expect_err("append longer than the transaction");
        assert!(error.to_string().contains("transaction timeout"), "{error}");
        assert!(KafkaConfig::new("h:1").check().is_ok());
    }

    fn secured() -> KafkaConfig {
        let mut config = KafkaConfig::new("127.0.0.1:9093");
        config.tls_ca_file = Some(PathBuf::from("/etc/parley/kafka-ca.pem"));
        config.sasl = Some(KafkaSasl {
            mechanism: SaslMechanism::ScramSha512,
            username: "parley".into(),
            password: "s3cret".into(),
        });
        config
    }

    #[test]
    fn every_client_gets_the_security_settings() {
        let plain = KafkaConfig::new("h:1");
        assert_eq!(plain.security_protocol(), "plaintext");
        assert_eq!(plain.client_config().get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.client_config().get("sasl.username"), None);
        let mut tls = KafkaConfig::new("h:1");
        tls.tls = true;
        assert_eq!(tls.security_protocol(), "ssl");
        assert_eq!(tls.client_config().get("ssl.ca.location"), None, "the system's roots");

        let config = secured();
        assert_eq!(config.security_protocol(), "sasl_ssl", "a CA file implies TLS");
        for client in [config.client_config(), config.consumer("g"), config.client()] {
            assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(client.get("ssl.ca.location"), Some("/etc/parley/kafka-ca.pem"));
            assert_eq!(client.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
            assert_eq!(client.get("sasl.username"), Some("parley"));
            assert_eq!(client.get("sasl.password"), Some("s3cret"));
        }
        let mut sasl_only = config.clone();
        sasl_only.tls_ca_file = None;
        assert_eq!(sasl_only.security_protocol(), "sasl_plaintext");
    }

    #[test]
    fn the_password_is_not_shown_and_settings_are_checked() {
        let config = secured();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret") && shown.contains("parley"), "{shown}");
        let error = config.check().expect_err("the CA file does not exist");
        assert!(error.to_string().contains("/etc/parley/kafka-ca.pem"), "{error}");
        let mut empty_user = KafkaConfig::new("h:1");
        empty_user.sasl =
            Some(KafkaSasl { mechanism: SaslMechanism::Plain, username: String::new(), password: "p".into() });
        assert!(empty_user.check().is_err());
    }

    #[test]
    fn mechanisms_parse_and_print_as_kafka_spells_them() {
        for mechanism in [SaslMechanism::ScramSha512, SaslMechanism::ScramSha256, SaslMechanism::Plain] {
            assert_eq!(mechanism.to_string().parse::<SaslMechanism>(), Ok(mechanism));
        }
        assert_eq!("scram-sha-256".parse::<SaslMechanism>(), Ok(SaslMechanism::ScramSha256));
        assert!("GSSAPI".parse::<SaslMechanism>().is_err());
        assert_eq!(SaslMechanism::default(), SaslMechanism::ScramSha512);
    }

    #[test]
    fn rejected_credentials_and_failed_handshakes_are_refusals_that_name_the_engine() {
        let config = secured();
        let watch = ErrorWatch::default();
        assert!(watch.refusal(&config).is_none());
        watch.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert!(watch.refusal(&config).is_none(), "a broker that is down may come back");
        assert_eq!(watch.last_error().as_deref(), Some("1/1 brokers are down"));
        watch.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during \
             authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
        );
        watch.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        let refusal = watch.refusal(&config).expect("refused").to_string();
        assert!(
            refusal.starts_with(
                "Kafka at 127.0.0.1:9093: SASL authentication failed (user parley, mechanism SCRAM-SHA-512): "
            ),
            "{refusal}"
        );
        assert!(refusal.contains("invalid credentials"), "the refusal stays the last error: {refusal}");

        let watch = ErrorWatch::default();
        watch.error(
            KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify \
             failed: broker certificate could not be verified",
        );
        let refusal = watch.refusal(&config).expect("refused").to_string();
        assert!(
            refusal.starts_with("Kafka at 127.0.0.1:9093: TLS handshake failed: certificate verify failed: "),
            "{refusal}"
        );
        assert!(refusal.contains("/etc/parley/kafka-ca.pem"), "{refusal}");
    }
}
