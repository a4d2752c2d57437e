//! The values that travel between a router and its callers.

use parley_core::protocol::MessageView;
use parley_core::sequencer::Placement;
use serde::{Deserialize, Serialize};

/// A page query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    /// Only `seq < before`.
    pub before: Option<u64>,
    /// Only `seq > after` (oldest first).
    pub after: Option<u64>,
    /// Page size.
    pub limit: u32,
}

/// A page of history, ascending by sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Messages by ascending sequence.
    pub messages: Vec<MessageView>,
    /// More exist in the direction of the query.
    pub has_more: bool,
}

/// A user's presence after it changed, as a gateway saw it; a log records it (`{prefix}presence` on Kafka, keyed by
/// user) for other regions to mirror. Presence itself lives in the presence store (Redis): these records are its
/// change feed, in the order each gateway saw the changes. Another region keeps, per user and source region, the
/// record with the newest `last_seen` (one clock per region: its presence store's), so a late record never undoes a
/// newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    /// User.
    pub user: String,
    /// The user's status after the change (over all their connections, in every gateway).
    pub status: parley_core::presence::Status,
    /// Last time the user was seen connected (Unix ms, the presence store's clock; 0 if never).
    pub last_seen: u64,
    /// The gateway instance that saw the change.
    pub instance: String,
    /// When it saw it (Unix ms, the gateway's clock).
    pub at: u64,
}

/// Channels up to this many members get live delivery receipts.
pub const DELIVERY_RECEIPT_MEMBERS: u32 = 32;

/// Most presence changes one `record_presence` call takes.
pub const MAX_PRESENCE_BATCH: usize = 1_000;

/// What an owner or admin does to a group channel (see `parley_core::access` for who may do what).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ChannelAction {
    /// Invite a user (a member at once, or invited, as the membership policy says).
    Invite {
        /// The user.
        user: String,
    },
    /// Remove a member.
    Remove {
        /// The member.
        user: String,
    },
    /// Ban a user (removed if a member).
    Ban {
        /// The user.
        user: String,
    },
    /// Lift a ban.
    Unban {
        /// The user.
        user: String,
    },
    /// Give a member a role.
    SetRole {
        /// The member.
        user: String,
        /// The role.
        role: parley_core::access::Role,
    },
    /// Change who may join or post.
    Update {
        /// New visibility.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visibility: Option<parley_core::access::Visibility>,
        /// New posting rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        posting: Option<parley_core::access::Posting>,
    },
}

/// The sender of messages the application's backend posts through the server API. No user id can take it (user ids
/// have no `@`).
pub const SERVER_SENDER: &str = "@server";

/// What the application's backend does through the server API, with full authority over channels: no role is
/// checked, and named users become members at once whatever the membership policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerOp {
    /// Creates a group channel, or answers it unchanged when it exists with the same settings (idempotent).
    CreateChannel {
        /// Group name.
        name: String,
        /// Its owner (none: the channel is managed by the backend alone).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Initial members.
        #[serde(default)]
        members: Vec<String>,
        /// Settings.
        #[serde(default)]
        settings: ChannelSettings,
    },
    /// Deletes a group channel: every member leaves it, and its history is no longer readable.
    DeleteChannel {
        /// Channel.
        channel: String,
    },
    /// Adds, removes, bans, unbans, sets a role or changes settings.
    Manage {
        /// Channel.
        channel: String,
        /// What.
        action: ChannelAction,
    },
    /// Posts a message from [`SERVER_SENDER`] (idempotent on `client_msg_id`).
    Post {
        /// Channel.
        channel: String,
        /// Idempotency key.
        client_msg_id: String,
        /// Text.
        text: String,
    },
    /// Moves a channel's home (the region whose writer orders it) to `region`, without losing or reordering a
    /// message: the current home stops taking the channel's calls (they wait), `region` waits until it has
    /// delivered everything mirrored from the old home, the home's epoch is bumped, and the channel continues at
    /// the next sequence in `region`. Answers the last sequence ordered by the old home.
    MoveHome {
        /// Channel.
        channel: String,
        /// The new home region.
        region: String,
    },
    /// Marks a region failed (or back): while it is failed, the other regions take over each of its channels at
    /// its next call, continuing after the last message they hold of it (what the failed region confirmed beyond
    /// that is the failover's loss window; it is re-sent, with its client message ids, when the region returns).
    SetRegionFailed {
        /// The region.
        region: String,
        /// Failed, or back.
        failed: bool,
    },
}

/// Calls between the routers of different regions that move a channel's home (see [`ServerOp::MoveHome`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum HomeStep {
    /// To the current home: stop taking the channel's calls (they wait) and answer its last durable sequence.
    Freeze {
        /// Channel.
        channel: String,
    },
    /// To the former home: the move is over (done or abandoned); the calls that waited go on, to the home the
    /// store names now.
    Release {
        /// Channel.
        channel: String,
    },
}

/// The settings a group channel is created with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSettings {
    /// Who may join.
    #[serde(default)]
    pub visibility: parley_core::access::Visibility,
    /// Who may post.
    #[serde(default)]
    pub posting: parley_core::access::Posting,
}

/// The result of a send. On the wire: `{"channel", "id", "seq", "ts", "duplicate"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOutcome {
    /// Channel the message is in.
    pub channel: String,
    /// Where it sits.
    #[serde(flatten)]
    pub placement: Placement,
    /// Whether this was a retry of an earlier send.
    pub duplicate: bool,
}

/// Counters and latencies the writer keeps; a process exports them once with [`RouterStats::register`].
#[derive(Debug)]
pub struct RouterStats {
    /// From a send entering the writer's queue to its batch being durable (the confirmation follows at once).
    pub send_durable_seconds: prometheus_client::metrics::histogram::Histogram,
    /// From a batch being durable to its publications leaving for pub/sub (the publisher's queue and round trip).
    pub durable_published_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Messages made durable.
    pub messages: std::sync::atomic::AtomicU64,
    /// Batches written.
    pub batches: std::sync::atomic::AtomicU64,
    /// Writes that failed.
    pub write_failures: std::sync::atomic::AtomicU64,
    /// Publications sent to pub/sub by the publisher.
    pub published: std::sync::atomic::AtomicU64,
    /// Pipelined publishes (round trips) the publisher made.
    pub publish_batches: std::sync::atomic::AtomicU64,
    /// Publications that failed (the messages stay durable and are recovered from history).
    pub publish_failures: std::sync::atomic::AtomicU64,
    /// Publications whose pipelined publish missed its deadline.
    pub publish_timeouts: std::sync::atomic::AtomicU64,
    /// Jobs waiting in the publisher's queue when it last took some.
    pub publish_queue: std::sync::atomic::AtomicU64,
    /// Durable messages not handed to the tap because its queue was full.
    pub tap_dropped: std::sync::atomic::AtomicU64,
    /// Membership changes that could not be recorded for other regions.
    pub memberships_unrecorded: std::sync::atomic::AtomicU64,
    /// Messages of large channels put in a feed (fan-out on read) instead of being published.
    pub feed_messages: std::sync::atomic::AtomicU64,
    /// Feed notices published (one per large channel per batch).
    pub feed_notices: std::sync::atomic::AtomicU64,
    /// Feed reads answered from memory.
    pub feed_reads: std::sync::atomic::AtomicU64,
    /// Feed reads the memory could not answer, sent to the store.
    pub feed_store_reads: std::sync::atomic::AtomicU64,
    /// Presence changes recorded in the log for gateways.
    pub presence_records: std::sync::atomic::AtomicU64,
}

impl Default for RouterStats {
    fn default() -> Self {
        use parley_telemetry::metrics::latency_histogram;
        Self {
            send_durable_seconds: latency_histogram(),
            durable_published_seconds: latency_histogram(),
            messages: Default::default(),
            batches: Default::default(),
            write_failures: Default::default(),
            published: Default::default(),
            publish_batches: Default::default(),
            publish_failures: Default::default(),
            publish_timeouts: Default::default(),
            publish_queue: Default::default(),
            tap_dropped: Default::default(),
            memberships_unrecorded: Default::default(),
            feed_messages: Default::default(),
            feed_notices: Default::default(),
            feed_reads: Default::default(),
            feed_store_reads: Default::default(),
            presence_records: Default::default(),
        }
    }
}

impl RouterStats {
    /// Registers every counter and histogram in `registry` (names without a prefix: the router binary's registry
    /// has `parley_router`, and a gateway with an in-process writer registers them under the same prefix). The
    /// counters are read at each scrape.
    pub fn register(self: &std::sync::Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        use parley_telemetry::metrics::{AtomicCounters, Kind};
        registry.register(
            "send_durable_seconds",
            "From a send entering the writer's queue to its batch being durable",
            self.send_durable_seconds.clone(),
        );
        registry.register(
            "durable_published_seconds",
            "From a batch being durable to its publications leaving for pub/sub",
            self.durable_published_seconds.clone(),
        );
        let mut counters = AtomicCounters::default();
        for (name, help, field) in COUNTERS {
            let stats = self.clone();
            counters = counters
                .read(name, help, Kind::Counter, move || field(&stats).load(std::sync::atomic::Ordering::Relaxed));
        }
        let stats = self.clone();
        counters
            .read("publish_queue_jobs", "Jobs waiting in the publisher's queue", Kind::Gauge, move || {
                stats.publish_queue.load(std::sync::atomic::Ordering::Relaxed)
            })
            .register(registry);
    }

    /// Every counter as (name, help, value), for metrics.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        COUNTERS
            .iter()
            .map(|(name, help, field)| (*name, *help, field(self).load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }
}

/// A counter of [`RouterStats`]: its metric name (no prefix), help, and where it is kept.
type CounterField = (&'static str, &'static str, fn(&RouterStats) -> &std::sync::atomic::AtomicU64);

/// Every counter of [`RouterStats`], in the order metrics list them.
const COUNTERS: &[CounterField] = &[
    ("messages", "Messages made durable", |stats| &stats.messages),
    ("batches", "Batches written", |stats| &stats.batches),
    ("write_failures", "Durable writes that failed (nothing confirmed)", |stats| &stats.write_failures),
    ("published", "Publications sent to pub/sub", |stats| &stats.published),
    ("publish_batches", "Pipelined publishes (round trips to pub/sub)", |stats| &stats.publish_batches),
    ("publish_failures", "Publications that failed (recovered from history)", |stats| &stats.publish_failures),
    ("publish_timeouts", "Publications whose publish missed its deadline", |stats| &stats.publish_timeouts),
    ("tap_dropped", "Durable messages not offered to push (queue full)", |stats| &stats.tap_dropped),
    ("memberships_unrecorded", "Membership changes not recorded for other regions", |stats| {
        &stats.memberships_unrecorded
    }),
    ("feed_messages", "Messages of large channels put in their feed (fan-out on read)", |stats| &stats.feed_messages),
    ("feed_notices", "Feed notices published (one per large channel per batch)", |stats| &stats.feed_notices),
    ("feed_reads", "Gateway feed reads answered from memory", |stats| &stats.feed_reads),
    ("feed_store_reads", "Gateway feed reads answered from the store (behind the feed)", |stats| {
        &stats.feed_store_reads
    }),
    ("presence_records", "Presence changes recorded in the log for gateways", |stats| &stats.presence_records),
];

/// A message that became durable, with the other members of its channel (for offline notification). Only
/// channels up to the fan-out threshold are tapped.
#[derive(Debug, Clone)]
pub struct DurableMessage {
    /// The message.
    pub message: MessageView,
    /// Members of the channel other than the sender.
    pub recipients: Vec<String>,
}

/// The limits a router enforces, which a gateway also checks before calling (`GET /internal/v1/config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest message text in bytes.
    pub max_text_bytes: usize,
    /// Largest channel.
    pub max_channel_members: u32,
    /// Channels with more members than this are fanned out on read.
    pub fanout_threshold: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_text_bytes: 4096, max_channel_members: 10_000, fanout_threshold: 1000 }
    }
}
