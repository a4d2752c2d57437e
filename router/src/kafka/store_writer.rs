//! [`StoreWriter`]: the consumer group that copies the messages topic into a [`MessageStore`].

use super::{blocking, ensure_topics, kafka_error, retry_blocking, KafkaConfig};
use crate::backend::{MembershipStore, MessageStore};
use parley_api::BackendError;
use parley_core::protocol::MessageView;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, instrument, warn};

/// Counters of a store writer; read them for metrics.
#[derive(Debug, Default)]
pub struct StoreWriterStats {
    /// Messages written to the store (replays included).
    pub written: AtomicU64,
    /// Store writes that succeeded.
    pub batches: AtomicU64,
    /// Store writes that failed (each is retried).
    pub store_failures: AtomicU64,
    /// Offset commits that failed (the batch is written again after a restart or rebalance; harmless).
    pub commit_failures: AtomicU64,
    /// Errors while consuming.
    pub consume_failures: AtomicU64,
    /// Messages this region ordered after another region took their channel over (not stored, sent again).
    pub deposed: AtomicU64,
    /// Consumers replaced after a fatal error (e.g. fenced by a newer member with the same instance id after a
    /// broker outage longer than the session): the writer goes on with a new one.
    pub consumer_restarts: AtomicU64,
}

/// The consumer a store writer uses now: the writer's task replaces it after a fatal error, and
/// [`StoreWriter::stop`] and [`StoreWriter::kill`] close the one in place.
type ConsumerSlot = Arc<std::sync::Mutex<Option<Arc<StreamConsumer>>>>;

fn slot_take(slot: &ConsumerSlot) -> Option<Arc<StreamConsumer>> {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
}

fn slot_put(slot: &ConsumerSlot, consumer: Arc<StreamConsumer>) -> Option<Arc<StreamConsumer>> {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replace(consumer)
}

/// A member of the group `{prefix}store-writer`, subscribed to `{prefix}messages`.
fn consumer(config: &KafkaConfig) -> Result<StreamConsumer, BackendError> {
    let mut settings = config.consumer(&config.store_writer_group());
    settings.set("session.timeout.ms", config.session_timeout.as_millis().to_string());
    if let Some(instance) = &config.store_writer_instance {
        settings.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer = settings.create().map_err(kafka_error("store writer consumer"))?;
    consumer.subscribe(&[&config.messages_topic()]).map_err(kafka_error("store writer subscribe"))?;
    Ok(consumer)
}

/// Closes a consumer (leaving the group blocks in librdkafka).
async fn close(consumer: Option<Arc<StreamConsumer>>) {
    if let Some(consumer) = consumer {
        let _ = blocking(move || {
            drop(consumer);
            Ok(())
        })
        .await;
    }
}

/// The running store writer. Stop it with [`stop`](Self::stop); dropping it also stops it.
pub struct StoreWriter {
    config: KafkaConfig,
    topic: String,
    consumer: ConsumerSlot,
    stats: Arc<StoreWriterStats>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), BackendError>>>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("StoreWriter").field("topic", &self.topic).field("stats", &self.stats).finish()
    }
}

impl StoreWriter {
    /// Creates the topics if needed, joins the group `{prefix}store-writer` on `{prefix}messages`, and starts
    /// copying committed records into `store`.
    #[instrument(skip(config, store), fields(prefix = %config.prefix))]
    pub async fn start(config: KafkaConfig, store: Arc<dyn MessageStore>) -> Result<Self, BackendError> {
        Self::start_fenced(config, store, None).await
    }

    /// Like [`start`](Self::start), in a region of several: while this region is marked failed, each message is
    /// checked against its channel's home, and a message this region ordered after another region took the channel
    /// over is not stored (it would take a sequence the new home gave to another message): it goes to
    /// [`Fencing::deposed`], to be sent again to the new home with its client message id.
    pub async fn start_fenced(
        config: KafkaConfig,
        store: Arc<dyn MessageStore>,
        fencing: Option<Fencing>,
    ) -> Result<Self, BackendError> {
        ensure_topics(&config).await?;
        let topic = config.messages_topic();
        let consumer: ConsumerSlot = Arc::new(std::sync::Mutex::new(Some(Arc::new(consumer(&config)?))));
        let stats = Arc::new(StoreWriterStats::default());
        let (shutdown, stopping) = watch::channel(false);
        let task = tokio::spawn(run(config.clone(), consumer.clone(), store, fencing, stats.clone(), stopping));
        info!(%topic, group = %config.store_writer_group(), "store writer started");
        Ok(Self { config, topic, consumer, stats, shutdown, task: Some(task) })
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<StoreWriterStats> {
        &self.stats
    }

    /// Records of the messages topic not yet committed by the group: the sum over partitions of the high
    /// watermark minus the committed offset (transaction markers count too, so it is an upper bound of the
    /// messages still to store).
    pub async fn lag(&self) -> Result<u64, BackendError> {
        lag(&self.config).await
    }

    /// The lag of each partition (see [`partition_lags`]).
    pub async fn partition_lags(&self) -> Result<Vec<(i32, u64)>, BackendError> {
        partition_lags(&self.config).await
    }

    /// Finishes the batch in hand (writes it and commits, unless the store is down: then it is left for the
    /// next writer to replay), leaves the group, and returns the error that ended the writer early, if any.
    pub async fn stop(mut self) -> Result<(), BackendError> {
        let _ = self.shutdown.send(true);
        let outcome = match self.task.take() {
            Some(task) => task.await.map_err(|error| BackendError::Task(error.to_string()))?,
            None => Ok(()),
        };
        let consumer = slot_take(&self.consumer);
        drop(self);
        close(consumer).await;
        outcome
    }

    /// Stops at once, as a crash would: the batch in hand is neither finished nor committed. The next store
    /// writer of the group replays from the committed offsets.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let consumer = slot_take(&self.consumer);
        drop(self);
        close(consumer).await;
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// The group's lag on the messages topic (see [`StoreWriter::lag`]); any process can ask.
pub async fn lag(config: &KafkaConfig) -> Result<u64, BackendError> {
    Ok(partition_lags(config).await?.into_iter().map(|(_, lag)| lag).sum())
}

/// The group's lag on each partition of the messages topic: its high watermark minus the group's committed offset
/// (the low watermark when nothing is committed). Transaction markers count too, so each is an upper bound.
pub async fn partition_lags(config: &KafkaConfig) -> Result<Vec<(i32, u64)>, BackendError> {
    let partitions = super::partition_count(config, &config.messages_topic()).await?;
    let consumer: rdkafka::consumer::BaseConsumer =
        config.consumer(&config.store_writer_group()).create().map_err(kafka_error("lag client"))?;
    let topic = config.messages_topic();
    let timeout = config.request_timeout;
    blocking(move || {
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        let committed = retry_blocking(timeout, || consumer.committed_offsets(list.clone(), timeout))
            .map_err(kafka_error("committed offsets"))?;
        let mut lags = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let (low, high) = retry_blocking(timeout, || consumer.fetch_watermarks(&topic, partition, timeout))
                .map_err(kafka_error("watermarks"))?;
            let done = match committed.find_partition(&topic, partition).map(|entry| entry.offset()) {
                Some(Offset::Offset(offset)) => offset,
                _ => low,
            };
            lags.push((partition, high.saturating_sub(done).max(0) as u64));
        }
        Ok(lags)
    })
    .await
}

/// How long the writer waits for a record before it commits positions that moved past transaction markers.
const IDLE_COMMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// What a store writer of a region of several checks before it stores; see [`StoreWriter::start_fenced`].
pub struct Fencing {
    region: String,
    membership: Arc<dyn MembershipStore>,
    deposed: mpsc::Sender<MessageView>,
    /// Whether this region is marked failed, and when that was read.
    failed: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

/// How long a store writer trusts what it read of its region's failed mark.
const FAILED_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl Fencing {
    /// Fencing for the store writer of `region`: the homes and failed marks are read from `membership`, and the
    /// messages of a deposed home go to `deposed`.
    pub fn new(region: String, membership: Arc<dyn MembershipStore>, deposed: mpsc::Sender<MessageView>) -> Self {
        Self { region, membership, deposed, failed: std::sync::Mutex::new(None) }
    }

    async fn region_failed(&self) -> Result<bool, BackendError> {
        let cached = *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, failed)) = cached.filter(|(at, _)| at.elapsed() < FAILED_MARK_TTL) {
            return Ok(failed);
        }
        let failed = self.membership.failed_regions().await?.iter().any(|region| region == &self.region);
        *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), failed));
        Ok(failed)
    }

    /// Splits `batch` into what may be stored and what this region ordered after it was deposed.
    async fn split(&self, batch: Vec<MessageView>) -> Result<(Vec<MessageView>, Vec<MessageView>), BackendError> {
        if !self.region_failed().await? {
            return Ok((batch, Vec::new()));
        }
        let mut homes: HashMap<String, Option<crate::backend::Home>> = HashMap::new();
        let (mut keep, mut deposed) = (Vec::new(), Vec::new());
        for message in batch {
            if !homes.contains_key(&message.channel) {
                // Linearizable when every datacenter answers; else this datacenter's view.
                let home = match self.membership.home_now(&message.channel).await {
                    Ok(home) => home,
                    Err(_) => self.membership.channel(&message.channel).await?.and_then(|record| record.home),
                };
                homes.insert(message.channel.clone(), home);
            }
            match homes.get(&message.channel).and_then(Option::as_ref) {
                Some(home) if home.region != self.region && message.seq > home.base_seq => deposed.push(message),
                _ => keep.push(message),
            }
        }
        Ok((keep, deposed))
    }
}

async fn run(
    config: KafkaConfig,
    slot: ConsumerSlot,
    store: Arc<dyn MessageStore>,
    fencing: Option<Fencing>,
    stats: Arc<StoreWriterStats>,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), BackendError> {
    // What this writer committed last, per partition.
    let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
    let Some(mut consumer) = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() else {
        return Ok(());
    };
    loop {
        if *stopping.borrow() {
            break;
        }
        let mut batch: Vec<MessageView> = Vec::new();
        let first = tokio::select! {
            _ = stopping.changed() => break,
            received = consumer.recv() => Some(received),
            _ = tokio::time::sleep(IDLE_COMMIT) => None,
        };
        let Some(first) = first else {
            // Idle: the consumer may have moved past a commit marker after the last record; commit that so
            // the lag reaches zero.
            commit_positions(&config, &consumer, &mut committed, &stats).await;
            continue;
        };
        let mut received = Some(first);
        let mut fatal = false;
        let deadline = tokio::time::Instant::now() + config.store_batch_wait;
        while let Some(outcome) = received.take() {
            match outcome {
                Ok(message) => {
                    if let Some(payload) = message.payload() {
                        let view: MessageView = serde_json::from_slice(payload).map_err(|error| {
                            error!(partition = message.partition(), offset = message.offset(), %error,
                                "undecodable record in the messages topic; the store writer stops");
                            BackendError::Decode(error)
                        })?;
                        batch.push(view);
                    }
                }
                Err(error) => {
                    stats.consume_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(%error, "store writer consume error");
                    fatal = matches!(error, KafkaError::MessageConsumptionFatal(_));
                    break;
                }
            }
            if batch.len() >= config.store_batch_max.max(1) {
                break;
            }
            received = tokio::time::timeout_at(deadline, consumer.recv()).await.ok();
        }
        if let (Some(fencing), false) = (&fencing, batch.is_empty()) {
            let mut delay = config.retry_min;
            let (keep, deposed) = loop {
                match fencing.split(std::mem::take(&mut batch)).await {
                    Ok(split) => break split,
                    Err(error) => {
                        warn!(%error, "cannot check the messages' homes; retrying");
                        tokio::select! {
                            _ = stopping.changed() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(config.retry_max);
                    }
                }
            };
            batch = keep;
            if !deposed.is_empty() {
                stats.deposed.fetch_add(deposed.len() as u64, Ordering::Relaxed);
                warn!(
                    messages = deposed.len(),
                    "messages ordered here after another region took their channels over: \
                    not stored, sent again to the new home"
                );
                for message in deposed {
                    if fencing.deposed.send(message).await.is_err() {
                        warn!("nothing takes the deposed messages any more");
                    }
                }
            }
        }
        if !batch.is_empty() {
            let mut delay = config.retry_min;
            loop {
                match store.write(batch.clone()).await {
                    Ok(()) => break,
                    Err(error) => {
                        stats.store_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(%error, retry_ms = delay.as_millis() as u64, "store write failed; retrying");
                        tokio::select! {
                            _ = stopping.changed() => {
                                // Not written, so not committed: the next writer replays it.
                                return Ok(());
                            }
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(config.retry_max);
                    }
                }
            }
            stats.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            debug!(messages = batch.len(), "stored");
        }
        if fatal {
            // The consumer cannot go on (librdkafka's fatal state): what it handed over is written, what it did
            // not commit is replayed by the new member, so nothing is lost or skipped.
            match replace_consumer(consumer, &config, &slot, &stats, &mut stopping).await {
                Some(fresh) => {
                    consumer = fresh;
                    committed.clear();
                    continue;
                }
                None => break,
            }
        }
        commit_positions(&config, &consumer, &mut committed, &stats).await;
    }
    Ok(())
}

/// Closes `old` (the consumer in `slot`) and puts a new member of the group in its place, retrying with a backoff
/// until it can (or until the writer stops: `None`).
async fn replace_consumer(
    old: Arc<StreamConsumer>,
    config: &KafkaConfig,
    slot: &ConsumerSlot,
    stats: &StoreWriterStats,
    stopping: &mut watch::Receiver<bool>,
) -> Option<Arc<StreamConsumer>> {
    drop(slot_take(slot));
    close(Some(old)).await;
    let mut delay = config.retry_min;
    loop {
        match consumer(config) {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                close(slot_put(slot, fresh.clone())).await;
                stats.consumer_restarts.fetch_add(1, Ordering::Relaxed);
                warn!("store writer consumer replaced after a fatal error; replaying from the committed offsets");
                return Some(fresh);
            }
            Err(error) => warn!(%error, retry_ms = delay.as_millis() as u64, "cannot create the store writer consumer"),
        }
        tokio::select! {
            _ = stopping.changed() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// Commits the consumer's positions that moved since the last commit. A position is the offset after the last
/// record handed to this writer, past any transaction marker, and everything handed over is written by now.
async fn commit_positions(
    config: &KafkaConfig,
    consumer: &Arc<StreamConsumer>,
    committed: &mut BTreeMap<i32, i64>,
    stats: &StoreWriterStats,
) {
    let topic = config.messages_topic();
    let positions = match consumer.position() {
        Ok(positions) => positions,
        Err(error) => {
            stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "cannot read the consumer's positions");
            return;
        }
    };
    let mut moved = BTreeMap::new();
    for entry in positions.elements_for_topic(&topic) {
        if let Offset::Offset(offset) = entry.offset() {
            if committed.get(&entry.partition()).is_none_or(|done| *done < offset) {
                moved.insert(entry.partition(), offset);
            }
        }
    }
    if moved.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (partition, offset) in &moved {
        if let Err(error) = list.add_partition_offset(&topic, *partition, Offset::Offset(*offset)) {
            warn!(%error, "cannot build the commit");
            return;
        }
    }
    let committing = consumer.clone();
    match blocking(move || committing.commit(&list, CommitMode::Sync).map_err(kafka_error("commit"))).await {
        Ok(()) => {
            debug!(offsets = ?moved, "committed");
            committed.extend(moved);
        }
        Err(error) => {
            stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "offset commit failed; the batch will be replayed (harmless)");
        }
    }
}
