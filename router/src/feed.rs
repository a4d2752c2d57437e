//! The feeds of large conversations (fan-out on read).
//!
//! A channel with more members than the fan-out threshold is not pushed message by message. The writer keeps
//! its newest messages here, in memory, and publishes one small notice per batch on the channel's topic
//! ([`parley_bus::pubsub::Event::Feed`]: "sequences `first..=last` are new"). Each gateway instance that holds members
//! reads the new messages once ([`crate::LocalRouter::feed`]) and serves all of its members from that read, so a
//! busy 10,000-member channel costs one notice per batch on the bus and one read per gateway instance, however
//! many messages the batch carried. Reads never wait for the database: they are answered from here, and only a
//! reader that fell further behind than the feed holds is sent to the store.

use parley_core::protocol::MessageView;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Messages kept per channel.
pub const FEED_MESSAGES: usize = 1024;

/// Channels kept at once; beyond it the least recently written one is dropped (its readers go to the store).
pub const FEED_CHANNELS: usize = 4096;

#[derive(Default)]
struct Feeds {
    channels: HashMap<String, ChannelFeed>,
    /// Write counter, for eviction of the least recently written channel.
    clock: u64,
}

struct ChannelFeed {
    messages: VecDeque<Arc<MessageView>>,
    written: u64,
}

/// The in-memory feeds of one writer. Cheap to clone; clones share the feeds.
#[derive(Clone)]
pub struct FeedBook {
    inner: Arc<Mutex<Feeds>>,
    per_channel: usize,
    channels: usize,
}

impl std::fmt::Debug for FeedBook {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("FeedBook").field("per_channel", &self.per_channel).finish_non_exhaustive()
    }
}

impl Default for FeedBook {
    fn default() -> Self {
        Self::new(FEED_MESSAGES, FEED_CHANNELS)
    }
}

impl FeedBook {
    /// Feeds of at most `per_channel` messages for at most `channels` channels.
    pub fn new(per_channel: usize, channels: usize) -> Self {
        Self { inner: Arc::default(), per_channel: per_channel.max(1), channels: channels.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Feeds> {
        // A poisoned lock only means a panic elsewhere mid-update of plain collections; keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a channel's durable messages (in sequence order). A message that does not follow the feed's
    /// newest one (a gap, e.g. after the channel was small for a while) starts the feed afresh from it, so a feed
    /// never has holes.
    pub fn push(&self, channel: &str, messages: impl IntoIterator<Item = MessageView>) {
        let mut feeds = self.lock();
        feeds.clock += 1;
        let clock = feeds.clock;
        if !feeds.channels.contains_key(channel) && feeds.channels.len() >= self.channels {
            let oldest = feeds.channels.iter().min_by_key(|(_, feed)| feed.written).map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                feeds.channels.remove(&oldest);
            }
        }
        let feed = feeds
            .channels
            .entry(channel.to_owned())
            .or_insert_with(|| ChannelFeed { messages: VecDeque::new(), written: clock });
        feed.written = clock;
        for message in messages {
            match feed.messages.back().map(|newest| newest.seq) {
                Some(newest) if message.seq <= newest => continue,
                Some(newest) if message.seq != newest + 1 => feed.messages.clear(),
                _ => {}
            }
            feed.messages.push_back(Arc::new(message));
            if feed.messages.len() > self.per_channel {
                feed.messages.pop_front();
            }
        }
    }

    /// Up to `limit` messages of a channel after sequence `after`, oldest first; `None` when the feed cannot
    /// answer without a hole (it does not hold the message right after `after`), and the caller must read the
    /// store instead. An answer that reaches the feed's newest message is everything written so far.
    pub fn read(&self, channel: &str, after: u64, limit: usize) -> Option<Vec<MessageView>> {
        let feeds = self.lock();
        let feed = feeds.channels.get(channel)?;
        let oldest = feed.messages.front()?.seq;
        let newest = feed.messages.back()?.seq;
        if after >= newest {
            return Some(Vec::new());
        }
        if after + 1 < oldest {
            return None;
        }
        let skip = (after + 1 - oldest) as usize;
        Some(feed.messages.iter().skip(skip).take(limit).map(|message| (**message).clone()).collect())
    }

    /// Forgets a channel (e.g. it became small again, so its readers follow the pushed messages).
    pub fn forget(&self, channel: &str) {
        self.lock().channels.remove(channel);
    }

    /// Forgets every channel (the writer's partitions changed hands: another writer may have written them).
    pub fn clear(&self) {
        self.lock().channels.clear();
    }

    /// How many channels have a feed.
    pub fn len(&self) -> usize {
        self.lock().channels.len()
    }

    /// Whether no channel has a feed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> MessageView {
        MessageView {
            channel: "g:big".into(),
            seq,
            id: seq,
            sender: "alice".into(),
            text: format!("m{seq}"),
            ts: 0,
            client_msg_id: format!("c{seq}"),
        }
    }

    fn seqs(messages: &[MessageView]) -> Vec<u64> {
        messages.iter().map(|message| message.seq).collect()
    }

    #[test]
    fn reads_what_follows_a_sequence_in_order_and_in_pages() {
        let feeds = FeedBook::new(8, 4);
        feeds.push("g:big", (1..=5).map(message));
        assert_eq!(seqs(&feeds.read("g:big", 0, 10).expect("held")), vec![1, 2, 3, 4, 5]);
        assert_eq!(seqs(&feeds.read("g:big", 2, 2).expect("held")), vec![3, 4]);
        assert_eq!(feeds.read("g:big", 5, 10), Some(Vec::new()), "nothing newer");
        assert_eq!(feeds.read("g:big", 9, 10), Some(Vec::new()), "ahead of the feed");
        assert_eq!(feeds.read("g:other", 0, 10), None, "no feed: read the store");
    }

    #[test]
    fn a_reader_behind_the_retained_window_is_sent_to_the_store() {
        let feeds = FeedBook::new(3, 4);
        feeds.push("g:big", (1..=5).map(message));
        assert_eq!(feeds.read("g:big", 1, 10), None, "2 is gone");
        assert_eq!(seqs(&feeds.read("g:big", 2, 10).expect("held")), vec![3, 4, 5]);
    }

    #[test]
    fn duplicates_are_ignored_and_a_gap_restarts_the_feed() {
        let feeds = FeedBook::new(8, 4);
        feeds.push("g:big", (1..=3).map(message));
        feeds.push("g:big", [message(3), message(4)]);
        assert_eq!(seqs(&feeds.read("g:big", 0, 10).expect("held")), vec![1, 2, 3, 4]);
        feeds.push("g:big", [message(9)]);
        assert_eq!(feeds.read("g:big", 4, 10), None, "5..=8 were never in the feed");
        assert_eq!(seqs(&feeds.read("g:big", 8, 10).expect("held")), vec![9]);
    }

    #[test]
    fn the_least_recently_written_channel_makes_room() {
        let feeds = FeedBook::new(8, 2);
        feeds.push("g:a", [message(1)]);
        feeds.push("g:b", [message(1)]);
        feeds.push("g:a", [message(2)]);
        feeds.push("g:c", [message(1)]);
        assert_eq!(feeds.len(), 2);
        assert!(feeds.read("g:b", 0, 1).is_none(), "g:b was written least recently");
        assert!(feeds.read("g:a", 0, 1).is_some());
        feeds.forget("g:a");
        assert!(feeds.read("g:a", 0, 1).is_none());
    }
}
