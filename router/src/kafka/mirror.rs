//! Delivery of other regions' records: MirrorMaker 2 copies each region's `{prefix}messages`, `{prefix}memberships`,
//! `{prefix}receipts`, `{prefix}presence` and `{prefix}beacons` into this region's Kafka as
//! `<region>.{prefix}messages` and so on;
//! the routers of this region read them (consumer group `{prefix}mirror`, `read_committed`, so nothing a fenced
//! writer aborted is delivered) and hand them to their publisher, which puts them on this region's pub/sub exactly
//! as the home's writer does in its own region. Each partition is read in order, so each channel keeps its order.
//!
//! Presence reports (what another region's gateways saw of a user) are kept in this region's presence store beside
//! its own entries ([`PresenceStore::apply_remote`]), and the user's view as shown then (online if online in any
//! region) is published on the user's presence topic for the watchers. When a region is marked failed, what it
//! said is forgotten ([`forget_failed_regions`]): its users are no longer shown online on its word.
//!
//! Delivery is at least once: a record's offset is stored only after its publication was queued, and a router
//! that restarts reads again from the last committed offset (a client ignores a sequence it has). A group that
//! starts for the first time reads from the beginning, so records mirrored before the routers started are
//! delivered too.

use super::log::{parse_home_header, HOME_HEADER};
use super::{kafka_error, KafkaConfig};
use crate::backend::ReadReceipt;
use crate::global::HomeBook;
use crate::publisher::{Job, MembershipEvent, PublisherHandle};
use bytes::Bytes;
use parley_api::BackendError;
use parley_api::PresenceUpdate;
use parley_bus::mirrored::MirrorPositions;
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::{channel_topic, presence_topic, ControlEvent, Event};
use parley_core::presence::{PresenceView, RemoteState};
use parley_core::protocol::{MessageView, ServerFrame};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, info, instrument, warn};

/// How often the consumer reads the topics' metadata (partitions added to a mirrored topic).
const TOPIC_REFRESH: Duration = Duration::from_secs(5);
/// Most records handed over in one job.
const BATCH_MAX: usize = 512;

/// What the mirror reader counts.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Messages of other regions handed to the publisher.
    pub messages: AtomicU64,
    /// Membership changes of other regions handed to the publisher.
    pub memberships: AtomicU64,
    /// Read receipts of other regions (the members of channels up to the fan-out threshold hear of them).
    pub receipts: AtomicU64,
    /// Presence reports of other regions kept in this region's presence store.
    pub presence: AtomicU64,
    /// Presence reports that could not be kept (the presence store failed; the next report of the user fixes it).
    pub presence_failures: AtomicU64,
    /// Records that could not be decoded (skipped, logged).
    pub undecodable: AtomicU64,
    /// Records of a deposed home (an epoch older than the channel's), dropped.
    pub deposed: AtomicU64,
    /// Failures to record how far the mirrored channels were delivered.
    pub position_failures: AtomicU64,
    /// Consume errors.
    pub consume_failures: AtomicU64,
    /// Milliseconds from the home's append to the hand-over here, of the last message (the regions' clocks
    /// included).
    pub last_delay_ms: AtomicU64,
    /// Per source region since the last [`MirrorStats::take_window`]: the largest delay and the messages.
    window: std::sync::Mutex<HashMap<String, crate::backend::FlowReport>>,
    /// The newest beacon of each source region: MirrorMaker 2's lag.
    pub beacons: super::beacon::Beacons,
}

impl MirrorStats {
    fn observe(&self, source: &str, delay_ms: u64) {
        let mut window = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = window.entry(source.to_owned()).or_default();
        entry.latency_ms = entry.latency_ms.max(delay_ms);
        entry.messages += 1;
    }

    /// What was observed per source region since the last call (and starts a new window).
    pub fn take_window(&self) -> HashMap<String, crate::backend::FlowReport> {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// The topics this region reads for `sources`.
pub fn mirrored_topics(config: &KafkaConfig, sources: &[String]) -> Vec<String> {
    sources
        .iter()
        .flat_map(|source| {
            [
                KafkaConfig::mirrored(source, &config.messages_topic()),
                KafkaConfig::mirrored(source, &config.memberships_topic()),
                KafkaConfig::mirrored(source, &config.receipts_topic()),
                KafkaConfig::mirrored(source, &config.presence_topic()),
                KafkaConfig::mirrored(source, &config.beacons_topic()),
            ]
        })
        .collect()
}

/// What one mirrored record is.
#[derive(Debug, PartialEq)]
enum Mirrored {
    Message(MessageView),
    Membership(MembershipEvent),
    Receipt(ReadReceipt),
    Presence(PresenceUpdate),
    Beacon(super::beacon::Beacon),
}

/// Decodes a record of `topic` (a mirrored messages or memberships topic).
fn decode(config: &KafkaConfig, topic: &str, payload: &[u8]) -> Result<Mirrored, serde_json::Error> {
    if topic.ends_with(&config.memberships_topic()) {
        serde_json::from_slice(payload).map(Mirrored::Membership)
    } else if topic.ends_with(&config.receipts_topic()) {
        serde_json::from_slice(payload).map(Mirrored::Receipt)
    } else if topic.ends_with(&config.presence_topic()) {
        serde_json::from_slice(payload).map(Mirrored::Presence)
    } else if topic.ends_with(&config.beacons_topic()) {
        serde_json::from_slice(payload).map(Mirrored::Beacon)
    } else {
        serde_json::from_slice(payload).map(Mirrored::Message)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// What the mirror reader works with besides Kafka.
#[derive(Clone)]
pub struct MirrorContext {
    /// Where delivered records go (this region's pub/sub).
    pub publisher: PublisherHandle,
    /// The channels' homes known to this router: records of an older epoch are dropped.
    pub homes: Arc<HomeBook>,
    /// Where the delivered positions are recorded.
    pub positions: Arc<dyn MirrorPositions>,
    /// Counters.
    pub stats: Arc<MirrorStats>,
    /// This region's presence store, where other regions' presence reports are kept.
    pub presence: Arc<dyn PresenceStore>,
}

impl std::fmt::Debug for MirrorContext {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("MirrorContext").field("stats", &self.stats).finish_non_exhaustive()
    }
}

/// The source region of a mirrored topic (`<source>.<topic>`).
fn source_of(topic: &str) -> &str {
    topic.split_once('.').map(|(source, _)| source).unwrap_or(topic)
}

/// Whether the record of sequence `seq` written by `record_home` is from a deposed home, given the home `known`
/// here: an older epoch, beyond where the newer home took over (what the old home ordered before stays history).
pub fn deposed(record_home: Option<&(String, u64)>, seq: u64, known: Option<&crate::backend::Home>) -> bool {
    match (record_home, known) {
        (Some((_, epoch)), Some(known)) => *epoch < known.epoch && seq > known.base_seq,
        _ => false,
    }
}

/// Starts the reader of `sources`' mirrored topics; it runs until `stopping` turns true. The topics are created
/// first when missing, with this region's partitions and replication factor (MirrorMaker 2 copies into them; the
/// regions' topics have the same partitions, so each partition of the copy holds the same channels as at home).
pub async fn start(
    config: KafkaConfig,
    sources: Vec<String>,
    context: MirrorContext,
    stopping: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, BackendError> {
    let topics = mirrored_topics(&config, &sources);
    super::create_topics(&config, &topics).await?;
    let mut settings = config.consumer(&config.mirror_group());
    settings
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", TOPIC_REFRESH.as_millis().to_string());
    let consumer: StreamConsumer = settings.create().map_err(kafka_error("mirror consumer"))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(kafka_error("mirror subscribe"))?;
    info!(?topics, "reading other regions' mirrored topics");
    Ok(tokio::spawn(run(config, consumer, context, stopping)))
}

#[instrument(skip_all)]
async fn run(
    config: KafkaConfig,
    consumer: StreamConsumer,
    context: MirrorContext,
    mut stopping: watch::Receiver<bool>,
) {
    let MirrorContext { publisher, homes, positions, stats, presence } = context;
    loop {
        let first = tokio::select! {
            _ = stopping.changed() => break,
            received = consumer.recv() => received,
        };
        let mut received = Some(first);
        let mut publications: Vec<(String, Bytes)> = Vec::new();
        let mut memberships: Vec<MembershipEvent> = Vec::new();
        let mut delivered: HashMap<(String, String), u64> = HashMap::new();
        let mut reports: HashMap<String, Vec<(String, RemoteState)>> = HashMap::new();
        let mut handled = 0usize;
        while let Some(outcome) = received.take() {
            match outcome {
                Ok(record) => {
                    let batch = Batch {
                        publications: &mut publications,
                        memberships: &mut memberships,
                        delivered: &mut delivered,
                        reports: &mut reports,
                    };
                    take(&config, &record, &stats, &homes, batch, &publisher).await;
                    if let Err(error) = consumer.store_offset_from_message(&record) {
                        debug!(%error, "cannot store a mirrored record's offset");
                    }
                    handled += 1;
                }
                Err(error) => {
                    // A mirrored topic that does not exist yet is reported until MirrorMaker 2 creates it.
                    stats.consume_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%error, "mirror consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
            if handled >= BATCH_MAX {
                break;
            }
            received = futures_util::FutureExt::now_or_never(consumer.recv());
        }
        if !publications.is_empty() {
            publisher.submit(Job::Publications(publications)).await;
        }
        if !memberships.is_empty() {
            publisher.submit(Job::Memberships(memberships)).await;
        }
        for (source, reports) in reports {
            let count = reports.len() as u64;
            match presence.apply_remote(&source, reports).await {
                Ok(changed) => {
                    stats.presence.fetch_add(count, Ordering::Relaxed);
                    publish_shown(presence.as_ref(), &publisher, changed).await;
                }
                Err(error) => {
                    stats.presence_failures.fetch_add(count, Ordering::Relaxed);
                    warn!(%error, source, "cannot keep another region's presence reports");
                }
            }
        }
        let mut by_source: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for ((source, channel), seq) in delivered {
            by_source.entry(source).or_default().push((channel, seq));
        }
        for (source, channels) in by_source {
            if let Err(error) = positions.record(&source, channels).await {
                stats.position_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%error, source, "cannot record how far mirrored channels were delivered");
            }
        }
    }
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        debug!(%error, "committing the mirror reader's offsets on stop");
    }
}

/// What one pass hands over.
struct Batch<'a> {
    publications: &'a mut Vec<(String, Bytes)>,
    memberships: &'a mut Vec<MembershipEvent>,
    /// The last sequence of each (source, channel).
    delivered: &'a mut HashMap<(String, String), u64>,
    /// Presence reports per source region, in order.
    reports: &'a mut HashMap<String, Vec<(String, RemoteState)>>,
}

/// Adds one record to what is handed over, keeping the order of messages and membership changes: a membership
/// change after messages hands the messages over first.
async fn take(
    config: &KafkaConfig,
    record: &BorrowedMessage<'_>,
    stats: &MirrorStats,
    homes: &HomeBook,
    batch: Batch<'_>,
    publisher: &PublisherHandle,
) {
    let Batch { publications, memberships, delivered, reports } = batch;
    let Some(payload) = record.payload() else { return };
    match decode(config, record.topic(), payload) {
        Ok(Mirrored::Message(message)) => {
            let home = record
                .headers()
                .and_then(|headers| headers.iter().find(|header| header.key == HOME_HEADER))
                .and_then(|header| parse_home_header(header.value?));
            if deposed(home.as_ref(), message.seq, homes.get(&message.channel).as_ref()) {
                stats.deposed.fetch_add(1, Ordering::Relaxed);
                warn!(channel = %message.channel, seq = message.seq, ?home,
                    "dropped a mirrored message of a deposed home");
                return;
            }
            let key = (source_of(record.topic()).to_owned(), message.channel.clone());
            let entry = delivered.entry(key).or_default();
            *entry = (*entry).max(message.seq);
            if !memberships.is_empty() {
                publisher.submit(Job::Memberships(std::mem::take(memberships))).await;
            }
            let delay = match record.timestamp() {
                Timestamp::CreateTime(at) | Timestamp::LogAppendTime(at) => now_ms().saturating_sub(at.max(0) as u64),
                Timestamp::NotAvailable => 0,
            };
            stats.last_delay_ms.store(delay, Ordering::Relaxed);
            stats.observe(source_of(record.topic()), delay);
            stats.messages.fetch_add(1, Ordering::Relaxed);
            let topic = channel_topic(&message.channel);
            let (seq, ts) = (message.seq, message.ts);
            let frame = Bytes::from(ServerFrame::Message(message).to_json());
            publications.push((topic, Event::Message { seq, ts, frame }.encode()));
        }
        Ok(Mirrored::Receipt(receipt)) => {
            stats.receipts.fetch_add(1, Ordering::Relaxed);
            if receipt.announce {
                let event =
                    ControlEvent::Read { channel: receipt.channel.clone(), user: receipt.user, seq: receipt.seq };
                publications.push((channel_topic(&receipt.channel), Event::Control(event).encode()));
            }
        }
        Ok(Mirrored::Beacon(beacon)) => stats.beacons.observe(source_of(record.topic()), &beacon, now_ms()),
        Ok(Mirrored::Presence(update)) => {
            let state = RemoteState { status: update.status, last_seen: update.last_seen };
            reports.entry(source_of(record.topic()).to_owned()).or_default().push((update.user, state));
        }
        Ok(Mirrored::Membership(event)) => {
            if !publications.is_empty() {
                publisher.submit(Job::Publications(std::mem::take(publications))).await;
            }
            stats.memberships.fetch_add(1, Ordering::Relaxed);
            memberships.push(event);
        }
        Err(error) => {
            stats.undecodable.fetch_add(1, Ordering::Relaxed);
            warn!(topic = record.topic(), partition = record.partition(), offset = record.offset(), %error,
                "undecodable mirrored record skipped");
        }
    }
}

/// Publishes the views of `users` as shown now on their presence topics (through the publisher, after what it
/// holds).
async fn publish_shown(presence: &dyn PresenceStore, publisher: &PublisherHandle, users: Vec<String>) {
    if users.is_empty() {
        return;
    }
    match presence.views(&users).await {
        Ok(views) => publisher.submit(Job::Publications(views.into_iter().map(presence_event).collect())).await,
        Err(error) => warn!(%error, "cannot read the presence to publish after other regions' reports"),
    }
}

fn presence_event(view: PresenceView) -> (String, Bytes) {
    let topic = presence_topic(&view.user);
    let event = ControlEvent::Presence { user: view.user, status: view.status, last_seen: view.last_seen };
    (topic, Event::Control(event).encode())
}

/// How often the regions marked failed are read, to forget their presence reports.
const FAILED_REFRESH: Duration = Duration::from_secs(2);

/// Forgets the presence reports of each source region while it is marked failed (its users are shown offline
/// unless another region holds them), and publishes the views that changed. Runs until `stopping` turns true.
pub async fn forget_failed_regions(
    membership: Arc<dyn crate::backend::MembershipStore>,
    presence: Arc<dyn PresenceStore>,
    publisher: PublisherHandle,
    sources: Vec<String>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut forgotten: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = stopping.changed() => break,
            _ = tokio::time::sleep(FAILED_REFRESH) => {}
        }
        let failed = match membership.failed_regions().await {
            Ok(failed) => failed,
            Err(error) => {
                debug!(%error, "cannot read the failed regions");
                continue;
            }
        };
        forgotten.retain(|region| failed.contains(region));
        for region in failed.into_iter().filter(|region| sources.contains(region)) {
            // Forgotten again on every pass while it is failed: reports it sent before it stopped may still arrive.
            match presence.forget_region(&region).await {
                Ok(users) => {
                    if forgotten.insert(region.clone()) || !users.is_empty() {
                        warn!(region, users = users.len(), "forgot the presence reports of a failed region");
                    }
                    publish_shown(presence.as_ref(), &publisher, users).await;
                }
                Err(error) => warn!(%error, region, "cannot forget a failed region's presence reports"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_topics_follow_the_default_replication_policy() {
        let config = KafkaConfig::new("127.0.0.1:9092");
        let topics = mirrored_topics(&config, &["eu".to_owned(), "us-east".to_owned()]);
        assert_eq!(
            topics,
            vec![
                format!("eu.{}", config.messages_topic()),
                format!("eu.{}", config.memberships_topic()),
                format!("eu.{}", config.receipts_topic()),
                format!("eu.{}", config.presence_topic()),
                format!("eu.{}", config.beacons_topic()),
                format!("us-east.{}", config.messages_topic()),
                format!("us-east.{}", config.memberships_topic()),
                format!("us-east.{}", config.receipts_topic()),
                format!("us-east.{}", config.presence_topic()),
                format!("us-east.{}", config.beacons_topic()),
            ]
        );
    }

    #[test]
    fn records_of_a_deposed_home_are_recognized() {
        let home = |epoch| crate::backend::Home { region: "us".into(), epoch, base_seq: 10 };
        assert!(deposed(Some(&("eu".into(), 1)), 11, Some(&home(2))));
        assert!(!deposed(Some(&("eu".into(), 1)), 10, Some(&home(2))), "ordered before the move: history");
        assert!(!deposed(Some(&("us".into(), 2)), 11, Some(&home(2))));
        assert!(!deposed(None, 11, Some(&home(2))), "a record without a home header is not judged");
        assert!(!deposed(Some(&("eu".into(), 1)), 11, None), "nor one of a channel whose home is unknown here");
        assert_eq!(source_of("eu.parley-messages"), "eu");
    }

    #[test]
    fn records_are_decoded_by_topic() {
        let config = KafkaConfig::new("127.0.0.1:9092");
        let event = MembershipEvent {
            channel: "g:a".into(),
            user: "bob".into(),
            joined: true,
            tell_members: true,
            invited_by: None,
        };
        let topic = format!("eu.{}", config.memberships_topic());
        let payload = serde_json::to_vec(&event).expect("encode");
        assert_eq!(decode(&config, &topic, &payload).expect("decode"), Mirrored::Membership(event));
        let message = MessageView {
            channel: "g:a".into(),
            seq: 3,
            id: 9,
            sender: "bob".into(),
            text: "hi".into(),
            ts: 1,
            client_msg_id: "c1".into(),
        };
        let topic = format!("eu.{}", config.messages_topic());
        let payload = serde_json::to_vec(&message).expect("encode");
        assert_eq!(decode(&config, &topic, &payload).expect("decode"), Mirrored::Message(message));
        assert!(decode(&config, &topic, b"{").is_err());
        let update = PresenceUpdate {
            user: "bob".into(),
            status: parley_core::presence::Status::Away,
            last_seen: 5,
            instance: "gw-1".into(),
            at: 6,
        };
        let topic = format!("eu.{}", config.presence_topic());
        let payload = serde_json::to_vec(&update).expect("encode");
        assert_eq!(decode(&config, &topic, &payload).expect("decode"), Mirrored::Presence(update));
    }
}
