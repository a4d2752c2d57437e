//! [`KafkaLog`]: the durable log on Kafka, written by the owner of each partition through a fenced
//! transactional producer. See the [module docs](super) for ownership, fencing and the tail index.

use super::partition::{group_by_partition, partition_for};
use super::tail::TailIndex;
use super::{blocking, ensure_topics, kafka_error, millis, retry_blocking, KafkaConfig};
use crate::backend::{Home, MessageLog, MessageStore, PresenceUpdate, PriorSend, ReadReceipt};
use crate::publisher::MembershipEvent;
use async_trait::async_trait;
use futures_util::future::join_all;
use parley_api::BackendError;
use parley_core::protocol::MessageView;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, info, instrument, warn};

/// How often, at most, the writer asks for the store writer's committed offsets to prune its tail index.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// The producer of one owned partition.
struct Owner {
    partition: i32,
    /// `None` when the partition must be acquired again before the next append (the outcome of the last
    /// transaction is unknown, or acquiring failed).
    producer: Option<Arc<FutureProducer>>,
    /// A newer writer took the partition over; this log never writes to it again.
    fenced: bool,
    /// This log gave the partition up (it was assigned to another router); appends are refused as `NotOwner`.
    released: bool,
}

/// An owned partition: its producer, and when it was acquired.
struct Slot {
    owner: Arc<tokio::sync::Mutex<Owner>>,
    since_ms: u64,
}

/// What a [`KafkaLog`] counts; the router exports it (`parley_router_kafka_*`).
#[derive(Debug, Default)]
pub struct KafkaLogStats {
    /// Produce or transaction failures of the message log, receipts and presence (each is an append refused to
    /// the writer, which confirms nothing of it).
    pub producer_errors: std::sync::atomic::AtomicU64,
    /// Appends whose transaction did not finish within the append deadline.
    pub append_timeouts: std::sync::atomic::AtomicU64,
    /// Partitions this log lost to a newer writer (fenced).
    pub fenced_partitions: std::sync::atomic::AtomicU64,
}

impl KafkaLogStats {
    fn count(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The Kafka [`MessageLog`] of a writer that owns some partitions of `{prefix}messages`.
pub struct KafkaLog {
    stats: Arc<KafkaLogStats>,
    config: KafkaConfig,
    topic: String,
    partitions: i32,
    /// The partitions this log owns now (changed by [`KafkaLog::acquire_partitions`] and
    /// [`KafkaLog::release_partitions`]).
    owners: std::sync::RwLock<BTreeMap<i32, Slot>>,
    /// Bumped on every change of `owners`.
    version: std::sync::atomic::AtomicU64,
    index: Arc<Mutex<TailIndex>>,
    store: Arc<dyn MessageStore>,
    /// A consumer of the store writer's group that never joins it: it reads the group's committed offsets.
    offsets: Arc<BaseConsumer>,
    last_prune: Mutex<Option<Instant>>,
    /// The idempotent producer of `{prefix}receipts` and `{prefix}presence` (no transactions: a cursor only moves
    /// forward and a presence record is a snapshot, so a record written twice changes nothing).
    records: FutureProducer,
    /// The homes of the channels this log writes, as the writer set them ([`MessageLog::set_home`]): each record
    /// carries its channel's in the [`HOME_HEADER`].
    homes: Mutex<HashMap<String, (String, u64)>>,
}

/// The record header with the home of the record's channel when it was written: `<region>:<epoch>`.
pub const HOME_HEADER: &str = "parley-home";

/// Most channel homes a log remembers (the writer sets them again when it loads a channel).
const MAX_HOMES: usize = 100_000;

/// Parses a [`HOME_HEADER`] value: region and epoch.
pub fn parse_home_header(value: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (region, epoch) = text.rsplit_once(':')?;
    Some((region.to_owned(), epoch.parse().ok()?))
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KafkaLog")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("owned", &self.owned())
            .finish_non_exhaustive()
    }
}

/// A transaction that failed: the error, and whether its outcome is settled (aborted for sure).
struct Failed {
    error: BackendError,
    settled: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn lock_index(index: &Mutex<TailIndex>) -> MutexGuard<'_, TailIndex> {
    index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits (at most `within`) until the producer holds no message, not even a delivered one whose report is still
/// being handed out. Every delivery of the transaction has resolved when this is called, but the client library
/// resolves each one before it releases the report, and `commit_transaction` flushes first: a flush that finds a
/// message still held polls for a fixed 100 ms (rdkafka's `BaseProducer::flush`), which was the p99 of every
/// commit here. The report is released within microseconds, so this waits in short naps.
fn settle_deliveries(producer: &FutureProducer, within: Duration) {
    let deadline = Instant::now() + within;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::TransactionCoordinatorFenced
    )
}

fn is_retriable(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(transaction) => transaction.is_retriable() && !transaction.is_fatal(),
        other => matches!(
            other.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::CoordinatorLoadInProgress
                    | RDKafkaErrorCode::CoordinatorNotAvailable
                    | RDKafkaErrorCode::NotCoordinator
                    | RDKafkaErrorCode::ConcurrentTransactions
            )
        ),
    }
}

impl KafkaLog {
    /// What this log counts.
    pub fn stats(&self) -> &Arc<KafkaLogStats> {
        &self.stats
    }

    /// Creates the topics if needed, then acquires `owned` partitions of `{prefix}messages` (all of them when
    /// `None`, for a single writer): for each, `init_transactions` on its transactional producer (which fences
    /// any previous owner) and a scan of its unstored tail. `store` is where the store writer puts messages;
    /// `last_seq` and `find_sends` fall back on it for everything older than the tail.
    #[instrument(skip(config, store), fields(prefix = %config.prefix))]
    pub async fn open(
        config: KafkaConfig,
        store: Arc<dyn MessageStore>,
        owned: Option<Vec<i32>>,
    ) -> Result<Self, BackendError> {
        let partitions = ensure_topics(&config).await?;
        let owned: Vec<i32> = owned.unwrap_or_else(|| (0..partitions).collect());
        if let Some(outside) = owned.iter().find(|partition| !(0..partitions).contains(*partition)) {
            return Err(BackendError::Config(format!(
                "partition {outside} is outside {} (partitions 0..{partitions})",
                config.messages_topic()
            )));
        }
        let offsets: BaseConsumer =
            config.consumer(&config.store_writer_group()).create().map_err(kafka_error("offsets client"))?;
        let records: FutureProducer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", millis(config.linger))
            .set("message.timeout.ms", millis(config.append_timeout))
            .set("request.timeout.ms", millis(config.request_timeout))
            // Keyed records land where the Java client would put them, like the messages.
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(kafka_error("receipts and presence producer"))?;
        let log = Self {
            topic: config.messages_topic(),
            config,
            partitions,
            owners: std::sync::RwLock::new(BTreeMap::new()),
            version: std::sync::atomic::AtomicU64::new(0),
            index: Arc::new(Mutex::new(TailIndex::new())),
            store,
            offsets: Arc::new(offsets),
            last_prune: Mutex::new(None),
            records,
            homes: Mutex::new(HashMap::new()),
            stats: Arc::new(KafkaLogStats::default()),
        };
        let failed = log.acquire_partitions(&owned).await;
        if let Some((_, error)) = failed.into_iter().next() {
            return Err(error);
        }
        info!(topic = %log.topic, partitions, owned = ?owned, tail = log.tail_len(), "kafka log acquired its partitions");
        Ok(log)
    }

    /// Partition count of the messages topic.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The partitions this log owns.
    pub fn owned(&self) -> Vec<i32> {
        self.read_owners().keys().copied().collect()
    }

    /// How many times partitions were acquired or released.
    pub fn ownership_changes(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The partitions this log owns, each with the time (Unix ms) it was acquired.
    pub fn owned_since(&self) -> Vec<(i32, u64)> {
        self.read_owners().iter().map(|(partition, slot)| (*partition, slot.since_ms)).collect()
    }

    fn read_owners(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, Slot>> {
        self.owners.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_owners(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i32, Slot>> {
        self.owners.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn owner(&self, partition: i32) -> Option<Arc<tokio::sync::Mutex<Owner>>> {
        self.read_owners().get(&partition).map(|slot| slot.owner.clone())
    }

    /// Takes `partitions` over (those not owned yet), concurrently: for each, `init_transactions` on its
    /// transactional producer, which fences the previous owner (its later appends and commits fail, and a
    /// transaction it left open is aborted), then a scan of the partition's unstored tail. A partition is owned
    /// (appends to it are accepted) only once both succeeded. Returns the partitions that could not be acquired,
    /// with why; the caller retries them.
    #[instrument(skip(self))]
    pub async fn acquire_partitions(&self, partitions: &[i32]) -> Vec<(i32, BackendError)> {
        let wanted: Vec<i32> = {
            let owners = self.read_owners();
            let mut wanted: Vec<i32> = partitions.iter().copied().filter(|p| !owners.contains_key(p)).collect();
            wanted.sort_unstable();
            wanted.dedup();
            wanted
        };
        let mut failed = Vec::new();
        for partition in &wanted {
            if !(0..self.partitions).contains(partition) {
                failed.push((
                    *partition,
                    BackendError::Config(format!(
                        "partition {partition} is outside {} (partitions 0..{})",
                        self.topic, self.partitions
                    )),
                ));
            }
        }
        let wanted: Vec<i32> =
            wanted.into_iter().filter(|partition| (0..self.partitions).contains(partition)).collect();
        let acquired = join_all(wanted.iter().map(|&partition| async move {
            let mut owner = Owner { partition, producer: None, fenced: false, released: false };
            let result = self.acquire(&mut owner, self.config.scan_timeout).await;
            (partition, owner, result)
        }))
        .await;
        let mut gained = Vec::new();
        {
            let mut owners = self.write_owners();
            for (partition, owner, result) in acquired {
                match result {
                    Ok(()) => {
                        owners.insert(
                            partition,
                            Slot { owner: Arc::new(tokio::sync::Mutex::new(owner)), since_ms: now_ms() },
                        );
                        gained.push(partition);
                    }
                    Err(error) => {
                        lock_index(&self.index).reset(partition);
                        failed.push((partition, error));
                    }
                }
            }
        }
        if !gained.is_empty() {
            self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            info!(topic = %self.topic, gained = ?gained, owned = ?self.owned(), "kafka log acquired partitions");
        }
        failed
    }

    /// Gives `partitions` up: they are no longer owned (appends to them are refused as `NotOwner` at once),
    /// an append in flight on one of them finishes first (it commits before the next owner can fence this log,
    /// or fails), then its producer is closed and its tail forgotten. Returns once every one is released, so that
    /// the group hands them on only after this log stopped writing them.
    #[instrument(skip(self))]
    pub async fn release_partitions(&self, partitions: &[i32]) {
        let removed: Vec<(i32, Slot)> = {
            let mut owners = self.write_owners();
            partitions.iter().filter_map(|partition| owners.remove(partition).map(|slot| (*partition, slot))).collect()
        };
        if removed.is_empty() {
            return;
        }
        self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for (partition, slot) in &removed {
            let mut owner = slot.owner.lock().await;
            owner.released = true;
            if let Some(old) = owner.producer.take() {
                tokio::task::spawn_blocking(move || drop(old));
            }
            lock_index(&self.index).reset(*partition);
        }
        let released: Vec<i32> = removed.iter().map(|(partition, _)| *partition).collect();
        info!(topic = %self.topic, released = ?released, owned = ?self.owned(), "kafka log released partitions");
    }

    /// The partition a channel lives in.
    pub fn partition_of(&self, channel: &str) -> i32 {
        partition_for(channel, self.partitions)
    }

    /// Sends held in the index of the unstored tail.
    pub fn tail_len(&self) -> usize {
        lock_index(&self.index).len()
    }

    /// (Re)acquires a partition: a new transactional producer, `init_transactions`, then the tail scan.
    /// `patience` bounds how long retriable errors of `init_transactions` are retried (long when the log opens,
    /// zero when an append re-acquires, so that a send fails fast while the broker is away).
    async fn acquire(&self, owner: &mut Owner, patience: Duration) -> Result<(), BackendError> {
        let partition = owner.partition;
        if let Some(old) = owner.producer.take() {
            // librdkafka's destroy can block while it tears connections down.
            tokio::task::spawn_blocking(move || drop(old));
        }
        let producer: FutureProducer = self
            .config
            .client()
            .set("transactional.id", self.config.transactional_id(partition))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", millis(self.config.linger))
            .set("message.timeout.ms", millis(self.config.append_timeout))
            .set("request.timeout.ms", millis(self.config.request_timeout))
            .set("transaction.timeout.ms", millis(self.config.transaction_timeout))
            .create()
            .map_err(kafka_error("producer"))?;
        let producer = Arc::new(producer);
        let initializing = producer.clone();
        let timeout = self.config.request_timeout;
        let started = Instant::now();
        blocking(move || {
            // A fresh cluster answers COORDINATOR_LOAD_IN_PROGRESS while it creates its transaction log (seconds
            // on a new broker); an old owner's open transaction is answered with CONCURRENT_TRANSACTIONS until it
            // is aborted. Within `patience`, such retriable errors are retried; after it, they fail.
            let deadline = Instant::now() + patience;
            loop {
                match initializing.init_transactions(timeout) {
                    Ok(()) => return Ok(()),
                    Err(error) if is_retriable(&error) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(error) => return Err(kafka_error("init transactions")(error)),
                }
            }
        })
        .await?;
        debug!(partition, elapsed_ms = started.elapsed().as_millis() as u64, "transactional producer initialized");
        self.scan(partition).await?;
        owner.producer = Some(producer);
        owner.fenced = false;
        Ok(())
    }

    /// The store writer's committed offsets of `partitions` (`None`: nothing committed yet).
    async fn committed(&self, partitions: Vec<i32>) -> Result<Vec<(i32, Option<i64>)>, BackendError> {
        let consumer = self.offsets.clone();
        let topic = self.topic.clone();
        let timeout = self.config.request_timeout;
        blocking(move || {
            let mut list = TopicPartitionList::new();
            for partition in &partitions {
                list.add_partition(&topic, *partition);
            }
            let committed = retry_blocking(timeout, || consumer.committed_offsets(list.clone(), timeout))
                .map_err(kafka_error("committed offsets"))?;
            Ok(partitions
                .iter()
                .map(|&partition| {
                    let offset = committed.find_partition(&topic, partition).and_then(|entry| match entry.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                    (partition, offset)
                })
                .collect())
        })
        .await
    }

    /// Reads a partition's committed records from the store writer's committed offset to the end of the log
    /// into the tail index.
    async fn scan(&self, partition: i32) -> Result<(), BackendError> {
        let committed = self.committed(vec![partition]).await?.first().and_then(|(_, offset)| *offset);
        let config = self.config.clone();
        let topic = self.topic.clone();
        let index = self.index.clone();
        let started = Instant::now();
        let scanned = blocking(move || {
            let consumer: BaseConsumer = config
                .consumer(&format!("{}writer-scan", config.prefix))
                .set("enable.partition.eof", "true")
                .create()
                .map_err(kafka_error("tail scan consumer"))?;
            // A topic created a moment ago may not serve offsets yet (NOT_LEADER_FOR_PARTITION): retry.
            let (low, high) = retry_blocking(config.request_timeout, || {
                consumer.fetch_watermarks(&topic, partition, config.request_timeout)
            })
            .map_err(kafka_error("tail scan watermarks"))?;
            lock_index(&index).reset(partition);
            let from = committed.unwrap_or(low).max(low);
            if from >= high {
                return Ok(0usize);
            }
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&topic, partition, Offset::Offset(from)).map_err(kafka_error("tail scan"))?;
            consumer.assign(&list).map_err(kafka_error("tail scan assign"))?;
            let deadline = Instant::now() + config.scan_timeout;
            let mut scanned = 0usize;
            loop {
                if Instant::now() >= deadline {
                    return Err(BackendError::Unavailable(format!(
                        "kafka tail scan of {topic}[{partition}] did not reach offset {high} within {} ms",
                        config.scan_timeout.as_millis()
                    )));
                }
                match consumer.poll(Duration::from_millis(200)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(error)) => return Err(kafka_error("tail scan")(error)),
                    Some(Ok(message)) => {
                        let offset = message.offset();
                        if let Some(payload) = message.payload() {
                            let view: MessageView = serde_json::from_slice(payload).map_err(BackendError::Decode)?;
                            let mut index = lock_index(&index);
                            if index.len() >= config.max_unstored_sends {
                                return Err(BackendError::TailFull {
                                    entries: index.len(),
                                    limit: config.max_unstored_sends,
                                });
                            }
                            index.insert(partition, offset, &view);
                            scanned += 1;
                        }
                        if offset + 1 >= high {
                            break;
                        }
                    }
                }
                let position = consumer.position().map_err(kafka_error("tail scan position"))?;
                if let Some(Offset::Offset(next)) =
                    position.find_partition(&topic, partition).map(|entry| entry.offset())
                {
                    if next >= high {
                        break;
                    }
                }
            }
            Ok(scanned)
        })
        .await?;
        debug!(partition, from = ?committed, scanned, elapsed_ms = started.elapsed().as_millis() as u64, "tail scanned");
        Ok(())
    }

    /// Prunes what the store holds from the tail index (at most once per [`PRUNE_INTERVAL`] unless the limit
    /// is at stake), then refuses the append if `incoming` more sends would exceed the limit.
    async fn make_room(&self, incoming: usize) -> Result<(), BackendError> {
        let limit = self.config.max_unstored_sends;
        let held = self.tail_len();
        let due = {
            let last = self.last_prune.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            last.is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL)
        };
        if (held > limit / 4 && due) || held + incoming > limit {
            *self.last_prune.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            let owned = self.owned();
            let committed = if owned.is_empty() { Vec::new() } else { self.committed(owned).await? };
            let mut index = lock_index(&self.index);
            for (partition, offset) in committed {
                if let Some(offset) = offset {
                    index.prune(partition, offset);
                }
            }
        }
        let held = self.tail_len();
        if held + incoming > limit {
            return Err(BackendError::TailFull { entries: held, limit });
        }
        Ok(())
    }

    /// Refuses a group whose first sequence of a channel does not continue what the tail shows.
    fn check_sequences(&self, messages: &[MessageView]) -> Result<(), BackendError> {
        let index = lock_index(&self.index);
        let homes = self.homes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for message in messages {
            if seen.insert(message.channel.as_str(), ()).is_some() {
                continue;
            }
            if let Some(last) = index.last_seq(&message.channel) {
                // A channel whose home came back here continues after the other home's last sequence.
                let base = homes.get(&message.channel).map(|(_, base)| *base).unwrap_or(0);
                let continues = message.seq == last + 1 || (base > last && message.seq == base + 1);
                if !continues {
                    return Err(BackendError::SequenceConflict {
                        channel: message.channel.clone(),
                        expected: last + 1,
                        got: message.seq,
                    });
                }
            }
        }
        Ok(())
    }

    #[instrument(skip(self, messages), fields(messages = messages.len()))]
    async fn append_partition(&self, partition: i32, messages: Vec<MessageView>) -> Result<(), BackendError> {
        let not_owner = || BackendError::NotOwner {
            channel: messages.first().map(|message| message.channel.clone()).unwrap_or_default(),
            partition,
        };
        let owner = self.owner(partition).ok_or_else(not_owner)?;
        let mut owner = owner.lock().await;
        if owner.released {
            return Err(not_owner());
        }
        if owner.fenced {
            return Err(BackendError::Fenced { topic: self.topic.clone(), partition });
        }
        let producer = match &owner.producer {
            Some(producer) => producer.clone(),
            None => {
                // The last transaction's outcome was unknown: a new producer settles it, and the new scan shows
                // whether any of it committed.
                self.acquire(&mut owner, Duration::ZERO).await?;
                self.check_sequences(&messages)?;
                owner.producer.clone().ok_or_else(|| BackendError::Unavailable("kafka producer missing".into()))?
            }
        };
        let bound = self.config.append_timeout + self.config.request_timeout * 2;
        match tokio::time::timeout(bound, self.transact(&producer, partition, &messages)).await {
            Ok(Ok(offsets)) => {
                let mut index = lock_index(&self.index);
                for (message, offset) in messages.iter().zip(offsets) {
                    index.insert(partition, offset, message);
                }
                Ok(())
            }
            Ok(Err(Failed { error, settled })) => {
                KafkaLogStats::count(&self.stats.producer_errors);
                if matches!(error, BackendError::Fenced { .. }) {
                    KafkaLogStats::count(&self.stats.fenced_partitions);
                    warn!(partition, "fenced: a newer writer owns this partition");
                    owner.fenced = true;
                    if let Some(old) = owner.producer.take() {
                        tokio::task::spawn_blocking(move || drop(old));
                    }
                } else if !settled {
                    warn!(partition, %error, "transaction outcome unknown; the partition is acquired again before its next append");
                    if let Some(old) = owner.producer.take() {
                        tokio::task::spawn_blocking(move || drop(old));
                    }
                }
                Err(error)
            }
            Err(_) => {
                KafkaLogStats::count(&self.stats.append_timeouts);
                if let Some(old) = owner.producer.take() {
                    tokio::task::spawn_blocking(move || drop(old));
                }
                Err(BackendError::Unavailable(format!(
                    "kafka append to {}[{partition}] timed out after {} ms (bootstrap {})",
                    self.topic,
                    bound.as_millis(),
                    self.config.bootstrap_servers
                )))
            }
        }
    }

    /// One transaction: begin, send every record to `partition`, wait for their acknowledgements, commit.
    /// Returns the records' offsets.
    async fn transact(
        &self,
        producer: &Arc<FutureProducer>,
        partition: i32,
        messages: &[MessageView],
    ) -> Result<Vec<i64>, Failed> {
        producer.begin_transaction().map_err(|error| self.failure(producer, "begin transaction", error, false))?;
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut failure = None;
        for message in messages {
            let payload = match serde_json::to_vec(message) {
                Ok(payload) => payload,
                Err(error) => {
                    failure = Some(BackendError::Encode(error));
                    break;
                }
            };
            let home = self
                .homes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&message.channel)
                .map(|(header, _)| header.clone());
            let mut record =
                FutureRecord::to(&self.topic).partition(partition).key(message.channel.as_bytes()).payload(&payload);
            if let Some(home) = &home {
                record = record.headers(OwnedHeaders::new().insert(Header { key: HOME_HEADER, value: Some(home) }));
            }
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => {
                    failure = Some(self.failure(producer, "produce", error, true).error);
                    break;
                }
            }
        }
        let mut offsets = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(delivered)) => offsets.push(delivered.offset),
                Ok(Err((error, _))) => {
                    if failure.is_none() {
                        failure = Some(self.failure(producer, "produce", error, true).error);
                    }
                }
                Err(_) => {
                    if failure.is_none() {
                        failure = Some(BackendError::Unavailable("kafka producer dropped a delivery".into()));
                    }
                }
            }
        }
        if let Some(error) = failure {
            return Err(self.abort(producer, error).await);
        }
        let committing = producer.clone();
        let timeout = self.config.request_timeout;
        let committed = tokio::task::spawn_blocking(move || {
            settle_deliveries(&committing, timeout);
            committing.commit_transaction(timeout)
        })
        .await;
        match committed {
            Ok(Ok(())) => Ok(offsets),
            Ok(Err(error)) => {
                let failed = self.failure(producer, "commit transaction", error, false);
                if matches!(failed.error, BackendError::Fenced { .. }) {
                    return Err(failed);
                }
                Err(self.abort(producer, failed.error).await)
            }
            Err(error) => Err(Failed { error: BackendError::Task(error.to_string()), settled: false }),
        }
    }

    /// Aborts the open transaction after `cause`. The outcome is settled only if the abort succeeded.
    async fn abort(&self, producer: &Arc<FutureProducer>, cause: BackendError) -> Failed {
        if matches!(cause, BackendError::Fenced { .. }) {
            return Failed { error: cause, settled: false };
        }
        let aborting = producer.clone();
        let timeout = self.config.request_timeout;
        match tokio::task::spawn_blocking(move || aborting.abort_transaction(timeout)).await {
            Ok(Ok(())) => Failed { error: cause, settled: true },
            Ok(Err(error)) => {
                let failed = self.failure(producer, "abort transaction", error, false);
                if matches!(failed.error, BackendError::Fenced { .. }) {
                    return failed;
                }
                Failed { error: cause, settled: false }
            }
            Err(_) => Failed { error: cause, settled: false },
        }
    }

    /// Classifies a Kafka error: fenced (by the error or by the producer's fatal state) or plain.
    fn failure(&self, producer: &FutureProducer, operation: &'static str, error: KafkaError, settled: bool) -> Failed {
        let fatal = producer.client().fatal_error();
        let fenced = error.rdkafka_error_code().is_some_and(is_fenced_code)
            || fatal.as_ref().is_some_and(|(code, _)| is_fenced_code(*code));
        if fenced {
            return Failed { error: BackendError::Fenced { topic: self.topic.clone(), partition: -1 }, settled: false };
        }
        let settled = settled && fatal.is_none();
        Failed { error: kafka_error(operation)(error), settled }
    }
}

#[async_trait]
impl MessageLog for KafkaLog {
    async fn append(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let count = batch.len();
        let groups = group_by_partition(batch, self.partitions);
        for (partition, messages) in &groups {
            if !self.read_owners().contains_key(partition) {
                let channel = messages.first().map(|message| message.channel.clone()).unwrap_or_default();
                return Err(BackendError::NotOwner { channel, partition: *partition });
            }
            self.check_sequences(messages)?;
        }
        self.make_room(count).await?;
        let results = join_all(groups.into_iter().map(|(partition, messages)| async move {
            self.append_partition(partition, messages).await.map_err(|error| match error {
                BackendError::Fenced { topic, .. } => BackendError::Fenced { topic, partition },
                other => other,
            })
        }))
        .await;
        results.into_iter().collect::<Result<Vec<()>, BackendError>>()?;
        Ok(())
    }

    async fn record_read(&self, receipt: ReadReceipt) -> Result<(), BackendError> {
        let payload = serde_json::to_vec(&receipt).map_err(BackendError::Encode)?;
        let topic = self.config.receipts_topic();
        let record = FutureRecord::to(&topic).key(receipt.channel.as_bytes()).payload(&payload);
        match self.records.send(record, self.config.append_timeout).await {
            Ok(_) => Ok(()),
            Err((error, _)) => {
                KafkaLogStats::count(&self.stats.producer_errors);
                Err(kafka_error("receipt")(error))
            }
        }
    }

    fn set_home(&self, channel: &str, home: &Home) {
        let mut homes = self.homes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if homes.len() >= MAX_HOMES {
            homes.clear();
        }
        homes.insert(channel.to_owned(), (format!("{}:{}", home.region, home.epoch), home.base_seq));
    }

    async fn record_memberships(&self, events: Vec<MembershipEvent>) -> Result<(), BackendError> {
        let topic = self.config.memberships_topic();
        let mut deliveries = Vec::with_capacity(events.len());
        for event in &events {
            let payload = serde_json::to_vec(event).map_err(BackendError::Encode)?;
            let record = FutureRecord::to(&topic).key(event.channel.as_bytes()).payload(&payload);
            match self.records.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => {
                    KafkaLogStats::count(&self.stats.producer_errors);
                    return Err(kafka_error("membership")(error));
                }
            }
        }
        for delivery in join_all(deliveries).await {
            match delivery {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => {
                    KafkaLogStats::count(&self.stats.producer_errors);
                    return Err(kafka_error("membership")(error));
                }
                Err(_) => return Err(BackendError::Unavailable("membership: the Kafka producer went away".into())),
            }
        }
        Ok(())
    }

    async fn record_presence(&self, updates: Vec<PresenceUpdate>) -> Result<(), BackendError> {
        let topic = self.config.presence_topic();
        // Enqueued one after another (the idempotent producer keeps that order within a partition, retries
        // included), then awaited together: one round trip for the whole batch.
        let mut deliveries = Vec::with_capacity(updates.len());
        for update in &updates {
            let payload = serde_json::to_vec(update).map_err(BackendError::Encode)?;
            let record = FutureRecord::to(&topic).key(update.user.as_bytes()).payload(&payload);
            match self.records.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => {
                    KafkaLogStats::count(&self.stats.producer_errors);
                    return Err(kafka_error("presence")(error));
                }
            }
        }
        for delivery in join_all(deliveries).await {
            match delivery {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => {
                    KafkaLogStats::count(&self.stats.producer_errors);
                    return Err(kafka_error("presence")(error));
                }
                Err(_) => return Err(BackendError::Unavailable("presence: the Kafka producer went away".into())),
            }
        }
        Ok(())
    }

    fn check_owner(&self, channel: &str) -> Result<(), BackendError> {
        let partition = self.partition_of(channel);
        if self.read_owners().contains_key(&partition) {
            Ok(())
        } else {
            Err(BackendError::NotOwner { channel: channel.to_owned(), partition })
        }
    }

    fn ownership_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn last_seq(&self, channel: &str) -> Result<u64, BackendError> {
        if let Some(last) = lock_index(&self.index).last_seq(channel) {
            // The store only ever holds what the log held first, so the tail is never behind it.
            return Ok(last);
        }
        self.store.last_stored_seq(channel).await
    }

    async fn find_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        let mut found: Vec<Option<PriorSend>> = {
            let index = lock_index(&self.index);
            keys.iter().map(|(sender, client_msg_id)| index.find(sender, client_msg_id)).collect()
        };
        let missing: Vec<usize> = (0..keys.len()).filter(|&position| found[position].is_none()).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let stored =
            self.store.find_stored_sends(missing.iter().map(|&position| keys[position].clone()).collect()).await?;
        for (position, prior) in missing.into_iter().zip(stored) {
            found[position] = prior;
        }
        Ok(found)
    }
}
