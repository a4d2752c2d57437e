//! [`OwnershipGroup`]: how the routers of a Region share the partitions of the messages topic.
//!
//! Every router is a member of the Kafka consumer group `{prefix}writers`, subscribed to `{prefix}messages`
//! with the cooperative-sticky assignor. The group coordinator gives each partition to exactly one member; the
//! member never reads it (its partitions are paused at once: the group is used for its assignment and failure
//! detection only). When the group gives this router partitions, the [`KafkaLog`] acquires them
//! ([`KafkaLog::acquire_partitions`]: `init_transactions` fences the previous owner, then the tail is scanned);
//! when the group takes them away, the log releases them ([`KafkaLog::release_partitions`]) before the rebalance
//! goes on, so the next owner starts only after this one stopped writing. The epoch of each partition is the
//! producer epoch of its transactional id: even a router that does not know yet that it was deposed (paused,
//! partitioned from the coordinator) can never commit, so it never confirms a send.
//!
//! Timing: a router that stops cleanly leaves the group and its partitions move at once (a rebalance takes well
//! under a second, acquiring a partition tens of milliseconds plus its tail scan). A router that dies (kill -9,
//! a node lost) keeps its partitions until its session times out ([`OWNERSHIP_SESSION_TIMEOUT`], 6 s), then
//! they move. Sends to those channels meanwhile fail with `unavailable` (`not_owner` between routers), and
//! clients retry with the same key.

use super::log::KafkaLog;
use super::{kafka_error, KafkaConfig};
use parley_api::routing::{OwnedPartition, RouterDirectory, RouterEntry, PUBLISH_EVERY};
use parley_api::BackendError;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::TopicPartitionList;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

/// `session.timeout.ms` of the ownership group: how long a router that died keeps its partitions.
pub const OWNERSHIP_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How long a revocation waits for the log to release its partitions (an append in flight finishes first).
const RELEASE_WAIT: Duration = Duration::from_secs(15);

/// How long to wait before acquiring again partitions that could not be acquired.
const ACQUIRE_RETRY: Duration = Duration::from_millis(500);

/// A change the group decided, for the task that applies it to the log.
enum Change {
    Assigned(Vec<i32>),
    /// Partitions taken away; the sender is answered once the log released them.
    Revoked(Vec<i32>, std::sync::mpsc::SyncSender<()>),
}

struct GroupContext {
    topic: String,
    changes: mpsc::UnboundedSender<Change>,
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements().iter().filter(|element| element.topic() == topic).map(|element| element.partition()).collect()
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions_of(list, &self.topic);
                if partitions.is_empty() {
                    return;
                }
                let (done, wait) = std::sync::mpsc::sync_channel(1);
                if self.changes.send(Change::Revoked(partitions.clone(), done)).is_ok()
                    && wait.recv_timeout(RELEASE_WAIT).is_err()
                {
                    warn!(?partitions, "the log did not release revoked partitions in time; fencing protects them");
                }
            }
            Rebalance::Error(error) => warn!(%error, "ownership group rebalance failed"),
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // The group is used for its assignment only: nothing is ever read.
            if let Err(error) = consumer.pause(list) {
                debug!(%error, "cannot pause assigned partitions");
            }
            // Sent even when empty: the first one tells that this router joined the group.
            let _ = self.changes.send(Change::Assigned(partitions_of(list, &self.topic)));
        }
    }
}

/// This router's membership in the ownership group; see the [module docs](self).
pub struct OwnershipGroup {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    changed: watch::Receiver<u64>,
}

impl std::fmt::Debug for OwnershipGroup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("OwnershipGroup").finish_non_exhaustive()
    }
}

fn group_consumer(config: &KafkaConfig, context: GroupContext) -> Result<BaseConsumer<GroupContext>, BackendError> {
    let topic = context.topic.clone();
    let mut settings = config.consumer(&config.ownership_group());
    settings
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", OWNERSHIP_SESSION_TIMEOUT.as_millis().to_string())
        .set("heartbeat.interval.ms", "1000")
        .set("auto.offset.reset", "latest")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer<GroupContext> =
        settings.create_with_context(context).map_err(kafka_error("ownership group consumer"))?;
    consumer.subscribe(&[&topic]).map_err(kafka_error("ownership group subscribe"))?;
    Ok(consumer)
}

impl OwnershipGroup {
    /// Joins the group and applies its decisions to `log` (which should own nothing yet) until
    /// [`stop`](Self::stop). [`changed`](Self::changed) ticks after every change the log applied.
    pub fn start(config: KafkaConfig, log: Arc<KafkaLog>) -> Result<Self, BackendError> {
        let topic = config.messages_topic();
        let (changes, mut decided) = mpsc::unbounded_channel();
        let consumer = group_consumer(&config, GroupContext { topic: topic.clone(), changes: changes.clone() })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("parley-ownership".into())
            .spawn(move || {
                let mut consumer = Some(consumer);
                while !stopping.load(Ordering::Relaxed) {
                    let Some(current) = consumer.as_ref() else {
                        std::thread::sleep(ACQUIRE_RETRY);
                        let context = GroupContext { topic: topic.clone(), changes: changes.clone() };
                        consumer = group_consumer(&config, context)
                            .map_err(|error| warn!(%error, "cannot join the ownership group again; retrying"))
                            .ok();
                        continue;
                    };
                    match current.poll(Duration::from_millis(100)) {
                        None | Some(Ok(_)) => {}
                        Some(Err(error)) => debug!(%error, "ownership group"),
                    }
                    if let Some((code, reason)) = current.client().fatal_error() {
                        // A consumer in a fatal state never recovers: give everything up, then join again.
                        warn!(?code, %reason, "ownership group consumer failed; joining again");
                        let owned = current.assignment().map(|list| partitions_of(&list, &topic)).unwrap_or_default();
                        if !owned.is_empty() {
                            let (done, wait) = std::sync::mpsc::sync_channel(1);
                            if changes.send(Change::Revoked(owned, done)).is_ok() {
                                let _ = wait.recv_timeout(RELEASE_WAIT);
                            }
                        }
                        drop(consumer.take());
                    }
                }
                if let Some(consumer) = consumer {
                    // Give the partitions up (the revocation releases them in the log), then leave the group so
                    // that they move at once.
                    consumer.unsubscribe();
                    let deadline = std::time::Instant::now() + RELEASE_WAIT;
                    while std::time::Instant::now() < deadline
                        && consumer.assignment().map(|list| list.count() > 0).unwrap_or(false)
                    {
                        let _ = consumer.poll(Duration::from_millis(50));
                    }
                    drop(consumer);
                }
            })
            .map_err(|error| BackendError::Task(format!("cannot start the ownership thread: {error}")))?;
        let (changed_tx, changed) = watch::channel(0u64);
        let task = tokio::spawn(
            async move {
                let mut pending: BTreeSet<i32> = BTreeSet::new();
                let mut version = 0u64;
                loop {
                    let change = if pending.is_empty() {
                        decided.recv().await
                    } else {
                        tokio::select! {
                            change = decided.recv() => change,
                            () = tokio::time::sleep(ACQUIRE_RETRY) => {
                                let wanted: Vec<i32> = pending.iter().copied().collect();
                                pending = retry(&log, &wanted).await;
                                version += 1;
                                let _ = changed_tx.send(version);
                                continue;
                            }
                        }
                    };
                    let Some(change) = change else { break };
                    match change {
                        Change::Assigned(partitions) if partitions.is_empty() => {}
                        Change::Assigned(partitions) => {
                            info!(?partitions, "the ownership group assigned partitions");
                            pending.extend(retry(&log, &partitions).await);
                        }
                        Change::Revoked(partitions, done) => {
                            info!(?partitions, "the ownership group revoked partitions");
                            for partition in &partitions {
                                pending.remove(partition);
                            }
                            log.release_partitions(&partitions).await;
                            let _ = done.send(());
                        }
                    }
                    version += 1;
                    let _ = changed_tx.send(version);
                }
            }
            .instrument(info_span!("ownership")),
        );
        Ok(Self { stop, thread: Some(thread), task: Some(task), changed })
    }

    /// Ticks after every change of the partitions the log owns.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// Waits (at most `within`) until the group assigned this router its first partitions and the log applied
    /// them. Returns whether it did (a router may also own nothing, when there are more routers than partitions).
    pub async fn wait_first_assignment(&self, within: Duration) -> bool {
        let mut changed = self.changed.clone();
        let reached = tokio::time::timeout(within, changed.wait_for(|version| *version > 0)).await.is_ok();
        reached
    }

    /// Gives every partition up and leaves the group, so that the other routers take them over at once.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for OwnershipGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Acquires `partitions`; returns those still to acquire.
async fn retry(log: &KafkaLog, partitions: &[i32]) -> BTreeSet<i32> {
    let failed = log.acquire_partitions(partitions).await;
    for (partition, error) in &failed {
        warn!(partition, %error, "cannot acquire an assigned partition yet; retrying");
    }
    failed.into_iter().map(|(partition, _)| partition).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// This router's entry in the map: `url` and the partitions `log` owns now.
pub fn entry(log: &KafkaLog, url: &str) -> RouterEntry {
    RouterEntry {
        url: url.to_owned(),
        partitions: log.partitions(),
        owned: log
            .owned_since()
            .into_iter()
            .map(|(partition, since_ms)| OwnedPartition { partition, since_ms })
            .collect(),
        at_ms: now_ms(),
    }
}

/// Publishes this router's entry in `directory` whenever `changed` ticks, and at least every
/// [`PUBLISH_EVERY`], until `stop` turns true; then withdraws it.
pub async fn publish(
    log: Arc<KafkaLog>,
    directory: Arc<dyn RouterDirectory>,
    url: String,
    mut changed: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        match directory.publish(&entry(&log, &url)).await {
            Ok(()) if failing => {
                info!("publishing partition ownership again");
                failing = false;
            }
            Ok(()) => {}
            Err(error) if !failing => {
                warn!(%error, "cannot publish partition ownership; gateways keep the last map they read");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    if let Err(error) = directory.withdraw(&url).await {
        debug!(%error, "cannot withdraw the ownership entry; it goes stale by itself");
    }
}
