//! This instance's index of local connections, and the dispatcher that forwards publications to them.
//!
//! Small channels are pushed: each message arrives on the channel's topic and is forwarded as it is. Large ones
//! (above the router's fan-out threshold) are fanned out on read: a notice says which sequences are new, and
//! the instance reads them once from the router's feed, forwards them to every local member in order, and keeps
//! the newest in a cache that answers its members' history reads and gap fills. A channel can cross the
//! threshold either way while live: pushed messages that arrive while a read is in flight wait for it, so local
//! members still get one order.
//!
//! The instance holds one pub/sub subscription. It subscribes to `ch:<channel>` while at least one local
//! connection is a member of the channel, and to `user:<user>` while the user has a local connection, so a
//! publication crosses the bus once per instance, not once per member. Forwarding never blocks: each connection
//! has a bounded queue, and a connection whose queue is full is cut off (it sees close 4008, reconnects and fills
//! the gap from history) so that one slow client never delays the others.

use crate::metrics::{Limit, Metrics};
use axum::extract::ws::Utf8Bytes;
use parley_core::protocol::{MessageView, ServerFrame};
use parley_core::{ChannelId, UserId};
use parley_router::backend::{HistoryPage, HistoryQuery};
use parley_router::pubsub::{
    channel_topic, gateway_topic, ControlEvent, Delivery, Event, Subscription, ALL_GATEWAYS_TOPIC,
};
use parley_router::Router;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Messages one feed read asks for.
const FEED_PAGE: u32 = 200;

/// Messages of a large channel kept for members' history reads.
pub const FEED_CACHE: usize = 512;

/// Failed feed reads in a row before a follower gives up (connections then fill the gap from history when the
/// next message arrives).
const FEED_ATTEMPTS: u32 = 8;

/// This instance's following of one large channel's feed.
#[derive(Debug, Default)]
struct FeedState {
    /// The last sequence handed to local members.
    head: u64,
    /// The newest sequence announced.
    wanted: u64,
    /// Whether a follower task is reading.
    reading: bool,
    /// Pushed messages that arrived while a read was in flight (the channel became small again), in order.
    pending: BTreeMap<u64, Utf8Bytes>,
    /// The newest messages read, without holes, for history reads.
    cache: VecDeque<Arc<MessageView>>,
}

/// A frame queued to one connection. Messages carry their channel and sequence so the connection can drop
/// duplicates, fill gaps and track acknowledgements without parsing the frame.
///
/// One item is shared (behind an `Arc`) by every connection a publication goes to, so a queue slot is one
/// pointer: an idle connection's queue stays small and a fan-out copies no frame.
#[derive(Debug, Clone)]
pub struct OutboundFrame(pub Arc<OutboundItem>);

/// The shared part of an [`OutboundFrame`].
#[derive(Debug)]
pub struct OutboundItem {
    /// The encoded frame.
    pub frame: Utf8Bytes,
    /// For a `message` frame: its channel and sequence.
    pub message: Option<(Arc<str>, u64)>,
}

impl OutboundFrame {
    /// A frame that is not a message (no ACK tracking).
    pub fn control(frame: Utf8Bytes) -> Self {
        Self(Arc::new(OutboundItem { frame, message: None }))
    }
}

/// The queue of one connection.
pub type Outbound = mpsc::Sender<OutboundFrame>;

struct ConnEntry {
    user: String,
    /// `None` once the connection was cut off as a slow consumer.
    sender: Option<Outbound>,
    channels: HashSet<String>,
    /// Users whose presence this connection watches.
    watching: HashSet<String>,
}

#[derive(Default)]
struct HubState {
    conns: HashMap<u64, ConnEntry>,
    channels: HashMap<String, HashMap<u64, Outbound>>,
    users: HashMap<String, HashSet<u64>>,
    /// Watched user → watching connections.
    watchers: HashMap<String, HashSet<u64>>,
    /// Topics this instance is subscribed to.
    topics: HashSet<String>,
    /// Topics whose subscription a caller of `sync_topics` wants re-examined (taken in groups; see there).
    pending_topics: HashSet<String>,
    /// Topics whose subscribe or unsubscribe is being applied right now (their entry in `topics` is not confirmed
    /// yet).
    changing_topics: HashSet<String>,
    /// The newest message sequence seen published, per subscribed channel.
    heads: HashMap<String, u64>,
    /// Member counts of subscribed channels, as last read by a connect.
    sizes: HashMap<String, u32>,
    /// Large channels this instance follows by reading their feed.
    feeds: HashMap<String, FeedState>,
}

/// The local index and dispatcher.
pub struct Hub {
    state: Mutex<HubState>,
    /// Serialises subscription changes so concurrent connects and disconnects never lose a subscription. Whoever
    /// holds it applies every change pending at that moment in one call (group commit).
    topic_changes: tokio::sync::Mutex<()>,
    subscription: Arc<dyn Subscription>,
    metrics: Arc<Metrics>,
    fanout_threshold: u32,
    presence: std::sync::OnceLock<Arc<crate::presence::Presence>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Hub").field("fanout_threshold", &self.fanout_threshold).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over `subscription`, whose publications must be fed to [`Hub::dispatch`].
    pub fn new(subscription: Arc<dyn Subscription>, metrics: Arc<Metrics>, fanout_threshold: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState::default()),
            topic_changes: tokio::sync::Mutex::new(()),
            subscription,
            metrics,
            fanout_threshold,
            presence: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Brings the bus subscription of the given topics in line with the index. Only the topics a change
    /// touched are examined, so a connect or disconnect costs the same with 10 or 100,000 connections. Returns
    /// once every given topic's subscription is confirmed as the index wants it; at once, without waiting for
    /// anyone, when they already are (the common case: a connection to channels other local members hold).
    async fn sync_topics(&self, candidates: Vec<String>) -> bool {
        {
            let mut state = self.lock();
            let needed: Vec<String> = candidates
                .into_iter()
                .filter(|topic| {
                    state.changing_topics.contains(topic) || state.wants(topic) != state.topics.contains(topic)
                })
                .collect();
            if needed.is_empty() {
                return false;
            }
            state.pending_topics.extend(needed);
        }
        // Group commit: whoever holds the serial lock takes every parked candidate and applies them in one
        // subscribe and one unsubscribe call. A caller whose candidates were taken by an earlier holder finds
        // nothing to do once it gets the lock, and by then that holder's calls completed. So a burst of connects
        // (a drain elsewhere, a restart) costs a few round trips to the bus, not one each.
        let _serial = self.topic_changes.lock().await;
        let (add, remove) = {
            let mut state = self.lock();
            let candidates = std::mem::take(&mut state.pending_topics);
            if candidates.is_empty() {
                // An earlier holder applied them.
                return true;
            }
            let mut add = Vec::new();
            let mut remove = Vec::new();
            for topic in candidates {
                let wanted = state.wants(&topic);
                let subscribed = state.topics.contains(&topic);
                if wanted && !subscribed {
                    state.topics.insert(topic.clone());
                    state.changing_topics.insert(topic.clone());
                    add.push(topic);
                } else if !wanted && subscribed {
                    state.topics.remove(&topic);
                    if let Some(channel) = topic.strip_prefix("ch:") {
                        state.heads.remove(channel);
                        state.sizes.remove(channel);
                        state.feeds.remove(channel);
                    }
                    state.changing_topics.insert(topic.clone());
                    remove.push(topic);
                }
            }
            (add, remove)
        };
        if !add.is_empty() {
            if let Err(error) = self.subscription.subscribe(add.clone()).await {
                warn!(%error, "subscribe failed");
            }
        }
        if !remove.is_empty() {
            if let Err(error) = self.subscription.unsubscribe(remove.clone()).await {
                warn!(%error, "unsubscribe failed");
            }
        }
        let mut state = self.lock();
        for topic in add.iter().chain(&remove) {
            state.changing_topics.remove(topic);
        }
        true
    }

    /// Subscribes this instance's direct-delivery topics: its own (`instance`, when it has a registry entry) and
    /// the one every gateway shares. Call once at start, before serving connections.
    pub async fn open_direct(&self, instance: Option<&str>) -> Result<(), parley_router::error::BackendError> {
        let topics: Vec<String> =
            std::iter::once(ALL_GATEWAYS_TOPIC.to_owned()).chain(instance.map(gateway_topic)).collect();
        self.lock().topics.extend(topics.iter().cloned());
        self.subscription.subscribe(topics).await
    }

    /// Adds a connection with its channels, and subscribes what it needs. Publications for those channels
    /// reach it from the moment this returns.
    pub async fn register(&self, conn: u64, user: &UserId, sender: Outbound, channels: Vec<String>) {
        let topics: Vec<String> = channels.iter().map(|channel| channel_topic(channel)).collect();
        {
            let mut state = self.lock();
            for channel in &channels {
                state.channels.entry(channel.clone()).or_default().insert(conn, sender.clone());
            }
            state.users.entry(user.to_string()).or_default().insert(conn);
            state.conns.insert(
                conn,
                ConnEntry {
                    user: user.to_string(),
                    sender: Some(sender),
                    channels: channels.into_iter().collect(),
                    watching: HashSet::new(),
                },
            );
        }
        self.sync_topics(topics).await;
    }

    /// Adds channels to a registered connection whose list was read with the given last sequences. `true` when
    /// that list may be stale for this connection: a channel had to be subscribed first, or a message newer than
    /// the list was published before the connection joined the channel here (read the list again, after).
    pub async fn add_channels_since(&self, conn: u64, heads: Vec<(String, u64)>) -> bool {
        let raced = {
            let mut state = self.lock();
            let Some(sender) = state.conns.get(&conn).and_then(|entry| entry.sender.clone()) else {
                return false;
            };
            let mut raced = false;
            for (channel, last_seq) in &heads {
                raced |= state.heads.get(channel).is_some_and(|seen| seen > last_seq);
                state.channels.entry(channel.clone()).or_default().insert(conn, sender.clone());
                if let Some(entry) = state.conns.get_mut(&conn) {
                    entry.channels.insert(channel.clone());
                }
            }
            raced
        };
        let subscribed = self.sync_topics(heads.iter().map(|(channel, _)| channel_topic(channel)).collect()).await;
        raced || subscribed
    }

    /// Adds channels to a registered connection (e.g. channels joined while the handshake ran).
    pub async fn add_channels(&self, conn: u64, channels: Vec<String>) {
        // No list to be stale against: whatever the answer, nothing more to do.
        self.add_channels_since(conn, channels.into_iter().map(|channel| (channel, u64::MAX)).collect()).await;
    }

    /// Removes a connection.
    pub async fn unregister(&self, conn: u64) {
        let mut topics = Vec::new();
        {
            let mut state = self.lock();
            if let Some(entry) = state.conns.remove(&conn) {
                topics.extend(entry.channels.iter().map(|channel| channel_topic(channel)));
                for channel in &entry.channels {
                    remove_member(&mut state.channels, channel, conn);
                }
                for watched in &entry.watching {
                    if let Some(conns) = state.watchers.get_mut(watched) {
                        conns.remove(&conn);
                        if conns.is_empty() {
                            state.watchers.remove(watched);
                        }
                    }
                }
                if let Some(conns) = state.users.get_mut(&entry.user) {
                    conns.remove(&conn);
                    if conns.is_empty() {
                        state.users.remove(&entry.user);
                    }
                }
            }
        }
        self.sync_topics(topics).await;
    }

    /// Starts or stops watching users' presence for a connection. Returns how many users it watches.
    pub fn watch(&self, conn: u64, users: &[String], watch: bool, limit: usize) -> Result<usize, usize> {
        let mut state = self.lock();
        let Some(entry) = state.conns.get_mut(&conn) else { return Ok(0) };
        if watch && entry.watching.len() + users.len() > limit {
            return Err(limit);
        }
        for user in users {
            if watch {
                entry.watching.insert(user.clone());
            } else {
                entry.watching.remove(user);
            }
        }
        let watched = entry.watching.len();
        for user in users {
            if watch {
                state.watchers.entry(user.clone()).or_default().insert(conn);
            } else if let Some(conns) = state.watchers.get_mut(user) {
                conns.remove(&conn);
                if conns.is_empty() {
                    state.watchers.remove(user);
                }
            }
        }
        Ok(watched)
    }

    /// Queues a frame to every connection watching `user`.
    pub fn deliver_to_watchers(&self, user: &str, frame: &Utf8Bytes) {
        let state = self.lock();
        for conn in state.watchers.get(user).into_iter().flatten() {
            if let Some(sender) = state.conns.get(conn).and_then(|entry| entry.sender.as_ref()) {
                // Presence is advisory: a full queue drops the update rather than the connection.
                let _ = sender.try_send(OutboundFrame::control(frame.clone()));
            }
        }
    }

    /// Attaches the presence service (once).
    pub fn attach_presence(&self, presence: Arc<crate::presence::Presence>) {
        let _ = self.presence.set(presence);
    }

    /// The presence service, if attached.
    pub fn presence(&self) -> Option<&Arc<crate::presence::Presence>> {
        self.presence.get()
    }

    /// Records channels' member counts, as a connect read them.
    pub fn note_sizes<'a>(&self, sizes: impl IntoIterator<Item = (&'a str, u32)>) {
        let mut state = self.lock();
        for (channel, members) in sizes {
            if state.channels.contains_key(channel) {
                state.sizes.insert(channel.to_owned(), members);
            }
        }
    }

    /// Whether a channel is small enough for delivery receipts (at most `limit` members): by its member count
    /// when a connect read it, else by its local members alone (a lower bound).
    pub fn small_channel(&self, channel: &str, limit: u32) -> bool {
        let state = self.lock();
        match state.sizes.get(channel) {
            Some(members) => *members <= limit,
            None => state.channels.get(channel).map(HashMap::len).unwrap_or(0) <= limit as usize,
        }
    }

    /// The fan-out threshold.
    pub fn fanout_threshold(&self) -> u32 {
        self.fanout_threshold
    }

    /// Number of local connections.
    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Queues a frame to every local member of a channel. Returns how many got it.
    pub fn deliver(&self, channel: &str, frame: &Utf8Bytes, seq: Option<u64>) -> usize {
        let mut slow = Vec::new();
        let delivered = {
            let mut state = self.lock();
            if let Some(seq) = seq {
                if state.channels.contains_key(channel) {
                    state.note_head(channel, seq);
                }
            }
            Self::deliver_in(&state, channel, frame, seq, &mut slow)
        };
        self.delivered(delivered, &slow);
        delivered
    }

    /// Queues a frame to the local members of a channel, with the state held; slow connections are noted.
    fn deliver_in(state: &HubState, channel: &str, frame: &Utf8Bytes, seq: Option<u64>, slow: &mut Vec<u64>) -> usize {
        let Some(members) = state.channels.get(channel) else { return 0 };
        let item = OutboundFrame(Arc::new(OutboundItem {
            frame: frame.clone(),
            message: seq.map(|seq| (Arc::from(channel), seq)),
        }));
        let mut delivered = 0;
        for (conn, sender) in members {
            match sender.try_send(item.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*conn),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    fn delivered(&self, delivered: usize, slow: &[u64]) {
        self.metrics.deliveries.inc_by(delivered as u64);
        if !slow.is_empty() {
            self.cut_off(slow);
        }
    }

    /// A pushed message. While this instance reads the channel's feed (it was large until just now), the message
    /// waits for the read, so members get one order; otherwise it goes out at once.
    fn pushed(&self, channel: &str, frame: Utf8Bytes, seq: u64) {
        {
            let mut state = self.lock();
            if let Some(feed) = state.feeds.get_mut(channel) {
                if feed.reading {
                    feed.pending.insert(seq, frame);
                    state.note_head(channel, seq);
                    return;
                }
                // Pushed again: the channel is small now, and the cache would go stale.
                state.feeds.remove(channel);
            }
        }
        self.deliver(channel, &frame, Some(seq));
    }

    /// A large channel's notice: sequences `first..=last` are in its feed. Starts a follower unless one reads.
    fn feed_notice(self: &Arc<Self>, router: &Router, channel: &str, first: u64, last: u64) {
        {
            let mut state = self.lock();
            if !state.channels.contains_key(channel) {
                return;
            }
            // Where local members are: what this instance last handed them, else just before this notice.
            let seen = state.heads.get(channel).copied();
            state.note_head(channel, last);
            let feed = state
                .feeds
                .entry(channel.to_owned())
                .or_insert_with(|| FeedState { head: seen.unwrap_or(first.saturating_sub(1)), ..FeedState::default() });
            feed.wanted = feed.wanted.max(last);
            if feed.reading || feed.head >= feed.wanted {
                return;
            }
            feed.reading = true;
        }
        tokio::spawn(self.clone().follow_feed(router.clone(), channel.to_owned()));
    }

    /// Reads a channel's feed until this instance has handed out everything announced, then the pushed messages
    /// that waited for it.
    async fn follow_feed(self: Arc<Self>, router: Router, channel: String) {
        let mut failures = 0u32;
        loop {
            let after = {
                let mut state = self.lock();
                let Some(feed) = state.feeds.get_mut(&channel) else { return };
                if feed.head >= feed.wanted {
                    self.finish_feed(&mut state, &channel);
                    return;
                }
                feed.head
            };
            let page = match router.feed(&channel, after, FEED_PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    self.metrics.feed_failures.inc();
                    failures += 1;
                    if failures >= FEED_ATTEMPTS {
                        warn!(%error, %channel, after, "feed unreadable; members fill the gap from history later");
                        let mut state = self.lock();
                        self.finish_feed(&mut state, &channel);
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(25 << failures.min(5))).await;
                    continue;
                }
            };
            failures = 0;
            self.metrics.feed_reads.inc();
            self.metrics.feed_messages.inc_by(page.messages.len() as u64);
            let frames = {
                let mut state = self.lock();
                let Some(feed) = state.feeds.get_mut(&channel) else { return };
                if page.messages.is_empty() {
                    // Announced but not there (the router restarted and lost it, or it trails): take the router's
                    // word; members fill any gap from history when the next message comes.
                    feed.wanted = feed.head;
                    continue;
                }
                let mut frames = Vec::with_capacity(page.messages.len());
                for message in page.messages {
                    if message.seq <= feed.head {
                        continue;
                    }
                    feed.head = message.seq;
                    if feed.cache.back().is_some_and(|newest| newest.seq + 1 != message.seq) {
                        feed.cache.clear();
                    }
                    let message = Arc::new(message);
                    frames.push((message.seq, Utf8Bytes::from(ServerFrame::Message((*message).clone()).to_json())));
                    feed.cache.push_back(message);
                    if feed.cache.len() > FEED_CACHE {
                        feed.cache.pop_front();
                    }
                }
                frames
            };
            // One message at a time, like pushed ones, so the index is never held for a whole page. Nothing else
            // delivers to this channel meanwhile: pushed messages wait while `reading`.
            for (seq, frame) in frames {
                let mut slow = Vec::new();
                let delivered = Self::deliver_in(&self.lock(), &channel, &frame, Some(seq), &mut slow);
                self.delivered(delivered, &slow);
            }
        }
    }

    /// Ends a follower's run: the pushed messages that waited go out after what it read, in order, before anyone
    /// else can deliver to the channel.
    fn finish_feed(&self, state: &mut MutexGuard<'_, HubState>, channel: &str) {
        let Some(feed) = state.feeds.get_mut(channel) else { return };
        feed.reading = false;
        let pending = std::mem::take(&mut feed.pending);
        let head = feed.head;
        let mut slow = Vec::new();
        let mut delivered = 0;
        let mut last = head;
        for (seq, frame) in pending.into_iter().filter(|(seq, _)| *seq > head) {
            delivered += Self::deliver_in(state, channel, &frame, Some(seq), &mut slow);
            last = seq;
        }
        if last > head {
            // Pushed messages followed: the channel is small again; stop following its feed.
            state.feeds.remove(channel);
        }
        self.metrics.deliveries.inc_by(delivered as u64);
        if !slow.is_empty() {
            // Cut off under the lock already held.
            Self::cut_off_in(state, &self.metrics, &slow);
        }
    }

    /// A page of a large channel's history from this instance's cache, for a connection that is a local member:
    /// `None` when the cache cannot answer it whole (then the router does). Only reads forward from a sequence.
    pub fn cached_page(&self, conn: u64, channel: &str, query: &HistoryQuery) -> Option<HistoryPage> {
        let after = query.after?;
        let state = self.lock();
        if !state.channels.get(channel)?.contains_key(&conn) {
            return None;
        }
        let feed = state.feeds.get(channel)?;
        let oldest = feed.cache.front()?.seq;
        let newest = feed.cache.back()?.seq;
        if after + 1 < oldest {
            return None;
        }
        let end = match query.before {
            Some(before) => before.checked_sub(1)?,
            // To the end: only when the cache is as new as anything announced.
            None if feed.reading || feed.head != newest || feed.wanted > newest => return None,
            None => newest,
        };
        if end > newest {
            return None;
        }
        let limit = query.limit.clamp(1, 200) as usize;
        let mut messages: Vec<MessageView> = feed
            .cache
            .iter()
            .filter(|message| message.seq > after && message.seq <= end)
            .take(limit + 1)
            .map(|message| (**message).clone())
            .collect();
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        self.metrics.feed_cache_hits.inc();
        Some(HistoryPage { messages, has_more })
    }

    /// Queues a frame to every local connection of a user.
    pub fn deliver_to_user(&self, user: &str, frame: &Utf8Bytes) {
        let mut slow = Vec::new();
        {
            let state = self.lock();
            for conn in state.users.get(user).into_iter().flatten() {
                if let Some(sender) = state.conns.get(conn).and_then(|entry| entry.sender.as_ref()) {
                    let item = OutboundFrame::control(frame.clone());
                    if let Err(mpsc::error::TrySendError::Full(_)) = sender.try_send(item) {
                        slow.push(*conn);
                    }
                }
            }
        }
        if !slow.is_empty() {
            self.cut_off(&slow);
        }
    }

    /// Drops the queues of slow connections; each sees its queue end and closes with 4008.
    fn cut_off(&self, conns: &[u64]) {
        let mut state = self.lock();
        Self::cut_off_in(&mut state, &self.metrics, conns);
    }

    fn cut_off_in(state: &mut HubState, metrics: &Metrics, conns: &[u64]) {
        for conn in conns {
            metrics.limit(Limit::OutboundQueue);
            let channels: Vec<String> = match state.conns.get_mut(conn) {
                Some(entry) => {
                    entry.sender = None;
                    entry.channels.iter().cloned().collect()
                }
                None => continue,
            };
            for channel in channels {
                if let Some(members) = state.channels.get_mut(&channel) {
                    members.remove(conn);
                }
            }
            debug!(conn, "cut off slow consumer");
        }
    }

    /// A user's membership changed: update the index for the user's local connections, subscribe or
    /// unsubscribe, and tell the connections (with the channel's current `last_seq`, so they can fill any gap).
    async fn membership_changed(self: &Arc<Self>, router: &Router, user: &str, channel: &str, joined: bool) {
        {
            let mut state = self.lock();
            let conns: Vec<u64> =
                state.users.get(user).map(|conns| conns.iter().copied().collect()).unwrap_or_default();
            for conn in conns {
                let sender = state.conns.get(&conn).and_then(|entry| entry.sender.clone());
                let Some(sender) = sender else { continue };
                if joined {
                    state.channels.entry(channel.to_owned()).or_default().insert(conn, sender);
                    if let Some(entry) = state.conns.get_mut(&conn) {
                        entry.channels.insert(channel.to_owned());
                    }
                } else {
                    remove_member(&mut state.channels, channel, conn);
                    if let Some(entry) = state.conns.get_mut(&conn) {
                        entry.channels.remove(channel);
                    }
                }
            }
        }
        self.sync_topics(vec![channel_topic(channel)]).await;
        let (Ok(user_id), Ok(channel_id)) = (UserId::new(user), ChannelId::parse(channel)) else {
            return;
        };
        let hub = self.clone();
        let router = router.clone();
        tokio::spawn(async move {
            match router.channel_view(&user_id, &channel_id).await {
                Ok(view) => {
                    let frame = ServerFrame::Channel { req_id: None, channel: view }.to_json();
                    hub.deliver_to_user(user_id.as_str(), &Utf8Bytes::from(frame));
                }
                Err(error) => warn!(%error, "failed to read channel after membership change"),
            }
        });
    }

    /// Forwards publications to local connections until the bus closes.
    pub async fn dispatch(self: Arc<Self>, router: Router, mut publications: mpsc::Receiver<Delivery>) {
        while let Some((topic, payload)) = publications.recv().await {
            self.metrics.publications.inc();
            let Some(event) = Event::decode(&payload) else {
                warn!(%topic, "undecodable publication");
                continue;
            };
            match event {
                Event::Message { seq, frame } => {
                    let Some(channel) = topic.strip_prefix("ch:") else {
                        continue;
                    };
                    match Utf8Bytes::try_from(frame) {
                        Ok(frame) => self.pushed(channel, frame, seq),
                        Err(error) => warn!(%error, "message frame is not UTF-8"),
                    }
                }
                Event::Feed { first, last } => {
                    if let Some(channel) = topic.strip_prefix("ch:") {
                        self.feed_notice(&router, channel, first, last);
                    }
                }
                Event::Control(ControlEvent::Member { channel, user, joined }) => {
                    let members = self.lock().channels.get(&channel).map(|members| members.len()).unwrap_or(0);
                    if members as u32 <= self.fanout_threshold {
                        let frame = ServerFrame::Member { channel: channel.clone(), user, joined }.to_json();
                        self.deliver(&channel, &Utf8Bytes::from(frame), None);
                    }
                }
                Event::Control(ControlEvent::Delivered { channel, user, seq }) => {
                    let frame = ServerFrame::Delivered { channel: channel.clone(), user, seq }.to_json();
                    self.deliver(&channel, &Utf8Bytes::from(frame), None);
                }
                Event::Control(ControlEvent::Read { channel, user, seq }) => {
                    let frame = ServerFrame::Read { req_id: None, channel: channel.clone(), user, seq }.to_json();
                    self.deliver(&channel, &Utf8Bytes::from(frame), None);
                }
                Event::Control(ControlEvent::Membership { user, channel, joined }) => {
                    // Direct events reach every instance when the router could not locate the user: keep only
                    // this instance's users.
                    if self.lock().users.contains_key(&user) {
                        self.membership_changed(&router, &user, &channel, joined).await;
                    }
                }
            }
        }
        debug!("hub dispatcher stopped");
    }
}

impl HubState {
    /// Records that a channel's messages up to `seq` exist (seen published or announced).
    fn note_head(&mut self, channel: &str, seq: u64) {
        let head = self.heads.entry(channel.to_owned()).or_default();
        *head = (*head).max(seq);
    }

    /// Whether the index wants `topic` subscribed.
    fn wants(&self, topic: &str) -> bool {
        if let Some(channel) = topic.strip_prefix("ch:") {
            self.channels.get(channel).is_some_and(|members| !members.is_empty())
        } else {
            // Direct topics are subscribed once at start and kept.
            topic == ALL_GATEWAYS_TOPIC || topic.starts_with("gw:")
        }
    }
}

fn remove_member(channels: &mut HashMap<String, HashMap<u64, Outbound>>, channel: &str, conn: u64) {
    if let Some(members) = channels.get_mut(channel) {
        members.remove(&conn);
        if members.is_empty() {
            channels.remove(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use parley_router::error::BackendError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts subscription calls.
    #[derive(Default)]
    struct Counting {
        subscribes: AtomicUsize,
        unsubscribes: AtomicUsize,
    }

    #[async_trait]
    impl Subscription for Counting {
        async fn subscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
            self.subscribes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn unsubscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
            self.unsubscribes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("user")
    }

    #[tokio::test]
    async fn a_connect_to_channels_already_subscribed_calls_the_bus_not_at_all() {
        let bus = Arc::new(Counting::default());
        let hub = Hub::new(bus.clone(), Metrics::new(), 1_000);
        let (first, _a) = mpsc::channel(8);
        let (second, _b) = mpsc::channel(8);
        hub.register(1, &user("ann"), first, Vec::new()).await;
        assert!(hub.add_channels_since(1, vec![("g:room".into(), 0)]).await, "first member: subscribed, re-read");
        assert_eq!(bus.subscribes.load(Ordering::SeqCst), 1);
        hub.register(2, &user("bob"), second, Vec::new()).await;
        assert!(!hub.add_channels_since(2, vec![("g:room".into(), 0)]).await, "nothing new, nothing raced");
        assert_eq!(bus.subscribes.load(Ordering::SeqCst), 1, "no second subscribe");
        hub.unregister(1).await;
        assert_eq!(bus.unsubscribes.load(Ordering::SeqCst), 0, "bob still needs the channel");
        hub.unregister(2).await;
        assert_eq!(bus.unsubscribes.load(Ordering::SeqCst), 1, "the last member left");
    }

    #[tokio::test]
    async fn a_message_newer_than_the_list_seen_before_joining_asks_for_a_re_read() {
        let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 1_000);
        let (first, _a) = mpsc::channel(8);
        let (second, _b) = mpsc::channel(8);
        hub.register(1, &user("ann"), first, Vec::new()).await;
        hub.add_channels_since(1, vec![("g:room".into(), 0)]).await;
        // Bob's list said the channel ended at 4; message 5 went by before he joined the index.
        hub.deliver("g:room", &Utf8Bytes::from_static("{}"), Some(5));
        hub.register(2, &user("bob"), second, Vec::new()).await;
        assert!(hub.add_channels_since(2, vec![("g:room".into(), 4)]).await);
        let (third, _c) = mpsc::channel(8);
        hub.register(3, &user("cid"), third, Vec::new()).await;
        assert!(!hub.add_channels_since(3, vec![("g:room".into(), 5)]).await, "a list that has it is current");
    }

    #[tokio::test]
    async fn receipts_follow_the_member_count_a_connect_read() {
        let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 1_000);
        let (first, _a) = mpsc::channel(8);
        hub.register(1, &user("ann"), first, Vec::new()).await;
        hub.add_channels_since(1, vec![("g:big".into(), 0), ("g:small".into(), 0)]).await;
        // Before any count is known, the local members (one) are the bound.
        assert!(hub.small_channel("g:big", 32));
        hub.note_sizes([("g:big", 500), ("g:small", 3), ("g:elsewhere", 1)]);
        assert!(!hub.small_channel("g:big", 32));
        assert!(hub.small_channel("g:small", 32));
        assert!(hub.small_channel("g:elsewhere", 32), "not subscribed here: no members, no count kept");
    }

    fn seq_of(frame: &OutboundFrame) -> u64 {
        frame.0.message.as_ref().map(|(_, seq)| *seq).expect("a message")
    }

    #[tokio::test]
    async fn pushed_messages_wait_for_a_feed_read_in_flight_then_follow_it_in_order() {
        let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 3);
        let (sender, mut queue) = mpsc::channel(16);
        hub.register(1, &user("ann"), sender, Vec::new()).await;
        hub.add_channels_since(1, vec![("g:town".into(), 0)]).await;
        hub.pushed("g:town", Utf8Bytes::from_static("{}"), 1);
        assert_eq!(seq_of(&queue.try_recv().expect("pushed at once")), 1);
        // The channel became large: a read of 2..=3 is in flight when it becomes small again and 4, 5 are pushed.
        hub.lock()
            .feeds
            .insert("g:town".into(), FeedState { head: 1, wanted: 3, reading: true, ..FeedState::default() });
        hub.pushed("g:town", Utf8Bytes::from_static("{}"), 5);
        hub.pushed("g:town", Utf8Bytes::from_static("{}"), 4);
        assert!(queue.try_recv().is_err(), "they wait for the read");
        {
            let mut state = hub.lock();
            // The read hands out 2 and 3 ...
            for seq in [2, 3] {
                let mut slow = Vec::new();
                Hub::deliver_in(&state, "g:town", &Utf8Bytes::from_static("{}"), Some(seq), &mut slow);
            }
            state.feeds.get_mut("g:town").expect("followed").head = 3;
            // ... and finishes: the waiting pushes follow, in sequence order.
            hub.finish_feed(&mut state, "g:town");
            assert!(!state.feeds.contains_key("g:town"), "pushed again: no longer followed");
        }
        let order: Vec<u64> = std::iter::from_fn(|| queue.try_recv().ok()).map(|frame| seq_of(&frame)).collect();
        assert_eq!(order, vec![2, 3, 4, 5]);
        assert_eq!(hub.lock().heads.get("g:town"), Some(&5));
    }

    #[tokio::test]
    async fn the_feed_cache_answers_only_what_it_holds_whole_and_only_for_members() {
        let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 3);
        let (sender, _queue) = mpsc::channel(16);
        hub.register(1, &user("ann"), sender, Vec::new()).await;
        hub.add_channels_since(1, vec![("g:town".into(), 0)]).await;
        let cache = (11..=20)
            .map(|seq| {
                Arc::new(MessageView {
                    channel: "g:town".into(),
                    seq,
                    id: seq,
                    sender: "bob".into(),
                    text: format!("m{seq}"),
                    ts: 0,
                    client_msg_id: format!("c{seq}"),
                })
            })
            .collect();
        hub.lock().feeds.insert("g:town".into(), FeedState { head: 20, wanted: 20, cache, ..FeedState::default() });
        let query = |after: Option<u64>, before: Option<u64>, limit: u32| HistoryQuery { before, after, limit };
        let seqs = |page: HistoryPage| page.messages.iter().map(|message| message.seq).collect::<Vec<_>>();
        let page = hub.cached_page(1, "g:town", &query(Some(12), None, 3)).expect("held");
        assert!(page.has_more);
        assert_eq!(seqs(page), vec![13, 14, 15]);
        let page = hub.cached_page(1, "g:town", &query(Some(17), None, 50)).expect("held");
        assert!(!page.has_more);
        assert_eq!(seqs(page), vec![18, 19, 20]);
        assert_eq!(
            seqs(hub.cached_page(1, "g:town", &query(Some(10), Some(13), 50)).expect("a gap fill")),
            vec![11, 12]
        );
        assert!(hub.cached_page(1, "g:town", &query(Some(5), None, 50)).is_none(), "6..=10 are not held");
        assert!(hub.cached_page(1, "g:town", &query(None, Some(15), 50)).is_none(), "backwards reads go to the router");
        assert!(hub.cached_page(2, "g:town", &query(Some(12), None, 3)).is_none(), "not a local member");
        hub.lock().feeds.get_mut("g:town").expect("followed").wanted = 22;
        assert!(hub.cached_page(1, "g:town", &query(Some(12), None, 3)).is_none(), "21, 22 announced, not read yet");
        assert!(hub.cached_page(1, "g:town", &query(Some(12), Some(16), 3)).is_some(), "a bounded read still is");
    }
}
