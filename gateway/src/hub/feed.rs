//! Fan-out on read: this instance follows a large channel's feed (one read for all its local members) and keeps
//! the newest messages in a cache that answers its members' history reads and gap fills. Pushed messages that
//! arrive while a read is in flight (the channel just became small again) wait for it, so members get one order.

use super::{Hub, HubState};
use axum::extract::ws::Utf8Bytes;
use parley_api::{HistoryPage, HistoryQuery, Router};
use parley_core::protocol::{MessageView, ServerFrame};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, MutexGuard};
use tracing::warn;

/// Messages one feed read asks for.
const FEED_PAGE: u32 = 200;

/// Messages of a large channel kept for members' history reads.
pub const FEED_CACHE: usize = 512;

/// Failed feed reads in a row before a follower gives up (connections then fill the gap from history when the
/// next message arrives).
const FEED_ATTEMPTS: u32 = 8;

/// This instance's following of one large channel's feed.
#[derive(Debug, Default)]
pub(super) struct FeedState {
    /// The last sequence handed to local members.
    pub(super) head: u64,
    /// The newest sequence announced.
    pub(super) wanted: u64,
    /// Whether a follower task is reading.
    pub(super) reading: bool,
    /// Pushed messages that arrived while a read was in flight (the channel became small again), in order.
    pub(super) pending: BTreeMap<u64, Utf8Bytes>,
    /// The newest messages read, without holes, for history reads.
    pub(super) cache: VecDeque<Arc<MessageView>>,
}

impl Hub {
    /// A pushed message. While this instance reads the channel's feed (it was large until just now), the message
    /// waits for the read, so members get one order; otherwise it goes out at once.
    pub(super) fn pushed(&self, channel: &str, frame: Utf8Bytes, seq: u64) {
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
    pub(super) fn feed_notice(self: &Arc<Self>, router: &Router, channel: &str, first: u64, last: u64) {
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
                    if feed.cache.back().is_some_and(|newest| newest.seq.checked_add(1) != Some(message.seq)) {
                        feed.cache.clear();
                    }
                    let message = Arc::new(message);
                    let frame = Utf8Bytes::from(ServerFrame::Message((*message).clone()).to_json());
                    frames.push((message.seq, message.ts, frame));
                    feed.cache.push_back(message);
                    if feed.cache.len() > FEED_CACHE {
                        feed.cache.pop_front();
                    }
                }
                frames
            };
            // One message at a time, like pushed ones, so the index is never held for a whole page. Nothing else
            // delivers to this channel meanwhile: pushed messages wait while `reading`.
            for (seq, ts, frame) in frames {
                let mut slow = Vec::new();
                let delivered = Self::deliver_in(&self.lock(), &channel, &frame, Some(seq), &mut slow);
                self.delivered(delivered, &slow);
                self.metrics.observe_fanout(ts);
            }
        }
    }

    /// Ends a follower's run: the pushed messages that waited go out after what it read, in order, before anyone
    /// else can deliver to the channel.
    pub(super) fn finish_feed(&self, state: &mut MutexGuard<'_, HubState>, channel: &str) {
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
        // `after` and `before` are the client's numbers: any u64.
        if after.saturating_add(1) < oldest {
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
}
