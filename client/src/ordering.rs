//! Per-channel ordering: turns the messages the connection receives (live, retransmitted, replayed by `sync`,
//! fetched by `history`) into one stream per channel in strict `seq` order, with no duplicate and no gap.
//!
//! No I/O. For each channel it keeps the last sequence handed to the application (`last`), the highest sequence
//! known to exist (`head`), and the out-of-order messages waiting for a gap to be filled. A channel with
//! `head > last` has a gap; the caller fills it with `history` (`after = last`) and offers what comes back.
//! An idle channel holds two integers and an empty map (no heap allocation).

use parley_core::protocol::MessageView;
use std::collections::{BTreeMap, HashMap};

/// What happened to an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It was next in order: it (and any buffered messages it unblocked) went to the output.
    Delivered,
    /// Already delivered or already buffered: dropped.
    Duplicate,
    /// Ahead of a gap: held until the gap is filled.
    Buffered,
    /// Ahead of a gap, but the channel's buffer is full: dropped; the gap fill fetches it again.
    Dropped,
}

/// A range of missing sequences of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The last sequence delivered: fetch `history` with `after = after`.
    pub after: u64,
    /// The highest sequence known to exist.
    pub head: u64,
}

#[derive(Debug, Default)]
struct ChannelOrder {
    last: u64,
    head: u64,
    /// The gap could not be filled (history had nothing more): wait for new evidence before asking again.
    stalled: bool,
    pending: BTreeMap<u64, MessageView>,
}

impl ChannelOrder {
    fn starting_at(last: u64) -> Self {
        Self { last, head: last, stalled: false, pending: BTreeMap::new() }
    }

    /// Moves every buffered message that is now next in order to `out`, and drops stale ones.
    fn drain(&mut self, out: &mut Vec<MessageView>) {
        while let Some(entry) = self.pending.first_entry() {
            let seq = *entry.key();
            if seq <= self.last {
                entry.remove();
            } else if seq == self.last + 1 {
                out.push(entry.remove());
                self.last = seq;
            } else {
                break;
            }
        }
        self.head = self.head.max(self.last);
    }
}

/// Ordering state of every channel of one client.
#[derive(Debug)]
pub struct OrderingBuffer {
    channels: HashMap<String, ChannelOrder>,
    max_buffered: usize,
}

impl OrderingBuffer {
    /// Empty state; each channel holds at most `max_buffered` out-of-order messages.
    pub fn new(max_buffered: usize) -> Self {
        Self { channels: HashMap::new(), max_buffered }
    }

    /// Starts tracking `channel` with everything up to `last` already delivered. No effect on a tracked channel.
    pub fn start(&mut self, channel: &str, last: u64) {
        if !self.channels.contains_key(channel) {
            self.channels.insert(channel.to_owned(), ChannelOrder::starting_at(last));
        }
    }

    /// Stops tracking `channel` (the user left it).
    pub fn forget(&mut self, channel: &str) {
        self.channels.remove(channel);
    }

    /// Keeps only the channels for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.channels.retain(|channel, _| keep(channel));
    }

    /// Whether `channel` is tracked.
    pub fn contains(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// The last sequence delivered on `channel`.
    pub fn last(&self, channel: &str) -> Option<u64> {
        self.channels.get(channel).map(|state| state.last)
    }

    /// The last sequence delivered, per tracked channel (what `sync` sends).
    pub fn positions(&self) -> BTreeMap<String, u64> {
        self.channels.iter().map(|(channel, state)| (channel.clone(), state.last)).collect()
    }

    /// Tracked channel ids.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(String::as_str)
    }

    /// Records that `channel` has messages up to `head` (from `ready` or a `channel` frame). Opens a gap when
    /// that is beyond what was delivered.
    pub fn note_head(&mut self, channel: &str, head: u64) {
        if let Some(state) = self.channels.get_mut(channel) {
            if head > state.head {
                state.head = head;
                state.stalled = false;
            }
        }
    }

    /// Offers one message. Delivered messages (this one and any it unblocked) are appended to `out` in order.
    /// A message of an untracked channel starts the channel at itself.
    pub fn offer(&mut self, message: MessageView, out: &mut Vec<MessageView>) -> Offer {
        let seq = message.seq;
        let state = match self.channels.get_mut(message.channel.as_str()) {
            Some(state) => state,
            None => {
                self.channels.entry(message.channel.clone()).or_insert(ChannelOrder::starting_at(seq.saturating_sub(1)))
            }
        };
        if seq <= state.last {
            return Offer::Duplicate;
        }
        if seq > state.head {
            state.head = seq;
            state.stalled = false;
        }
        if seq == state.last + 1 {
            state.last = seq;
            out.push(message);
            state.drain(out);
            return Offer::Delivered;
        }
        if state.pending.contains_key(&seq) {
            Offer::Duplicate
        } else if state.pending.len() >= self.max_buffered {
            Offer::Dropped
        } else {
            state.pending.insert(seq, message);
            Offer::Buffered
        }
    }

    /// The gap of `channel`, if it has one that is worth asking for.
    pub fn gap(&self, channel: &str) -> Option<Gap> {
        let state = self.channels.get(channel)?;
        (state.head > state.last && !state.stalled).then_some(Gap { after: state.last, head: state.head })
    }

    /// Channels with a gap worth asking for.
    pub fn gaps(&self) -> Vec<String> {
        self.channels.keys().filter(|channel| self.gap(channel).is_some()).cloned().collect()
    }

    /// Gives up on the gap of `channel` until new evidence (a newer message or head) arrives.
    pub fn stall(&mut self, channel: &str) {
        if let Some(state) = self.channels.get_mut(channel) {
            state.stalled = true;
        }
    }

    /// The messages up to `last` are gone for good (retention): continue after them. Buffered messages that are
    /// now next in order go to `out`. Returns `false` when the channel was already past `last`.
    pub fn skip_to(&mut self, channel: &str, last: u64, out: &mut Vec<MessageView>) -> bool {
        let state = self.channels.entry(channel.to_owned()).or_insert(ChannelOrder::starting_at(last));
        if last <= state.last {
            return false;
        }
        state.last = last;
        state.drain(out);
        true
    }

    /// Out-of-order messages held, over all channels.
    pub fn buffered(&self) -> usize {
        self.channels.values().map(|state| state.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &str, seq: u64) -> MessageView {
        MessageView {
            channel: channel.to_owned(),
            seq,
            id: 1_000 + seq,
            sender: "alice".to_owned(),
            text: format!("m{seq}"),
            ts: seq,
            client_msg_id: format!("c{seq}"),
        }
    }

    fn seqs(out: &mut Vec<MessageView>) -> Vec<u64> {
        out.drain(..).map(|message| message.seq).collect()
    }

    #[test]
    fn in_order_messages_pass_straight_through() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 0);
        let mut out = Vec::new();
        for seq in 1..=3 {
            assert_eq!(order.offer(message("g:a", seq), &mut out), Offer::Delivered);
        }
        assert_eq!(seqs(&mut out), [1, 2, 3]);
        assert_eq!(order.last("g:a"), Some(3));
        assert_eq!(order.gap("g:a"), None);
    }

    #[test]
    fn duplicates_are_dropped_by_seq() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 4);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 4), &mut out), Offer::Duplicate);
        assert_eq!(order.offer(message("g:a", 5), &mut out), Offer::Delivered);
        assert_eq!(order.offer(message("g:a", 5), &mut out), Offer::Duplicate);
        assert_eq!(order.offer(message("g:a", 7), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 7), &mut out), Offer::Duplicate, "already buffered");
        assert_eq!(seqs(&mut out), [5]);
    }

    #[test]
    fn out_of_order_messages_wait_for_the_gap_then_flush_in_order() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 1);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 5), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 3), &mut out), Offer::Buffered);
        assert!(out.is_empty());
        assert_eq!(order.gap("g:a"), Some(Gap { after: 1, head: 5 }));
        assert_eq!(order.buffered(), 2);
        assert_eq!(order.offer(message("g:a", 2), &mut out), Offer::Delivered);
        assert_eq!(seqs(&mut out), [2, 3]);
        assert_eq!(order.gap("g:a"), Some(Gap { after: 3, head: 5 }));
        assert_eq!(order.offer(message("g:a", 4), &mut out), Offer::Delivered);
        assert_eq!(seqs(&mut out), [4, 5]);
        assert_eq!(order.gap("g:a"), None);
        assert_eq!(order.buffered(), 0);
    }

    #[test]
    fn channels_are_independent() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 0);
        order.start("g:b", 10);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 2), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:b", 11), &mut out), Offer::Delivered);
        assert_eq!(order.gaps(), ["g:a".to_owned()]);
        assert_eq!(order.positions(), BTreeMap::from([("g:a".to_owned(), 0), ("g:b".to_owned(), 11)]));
        assert_eq!(seqs(&mut out), [11]);
    }

    #[test]
    fn an_unknown_channel_starts_at_its_first_message() {
        let mut order = OrderingBuffer::new(16);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("dm:a:b", 7), &mut out), Offer::Delivered);
        assert_eq!(order.last("dm:a:b"), Some(7));
        order.start("dm:a:b", 3);
        assert_eq!(order.last("dm:a:b"), Some(7), "start does not rewind a tracked channel");
    }

    #[test]
    fn a_full_buffer_drops_but_remembers_the_head() {
        let mut order = OrderingBuffer::new(2);
        order.start("g:a", 0);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 2), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 3), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 4), &mut out), Offer::Dropped);
        assert_eq!(order.offer(message("g:a", 1), &mut out), Offer::Delivered);
        assert_eq!(seqs(&mut out), [1, 2, 3]);
        assert_eq!(order.gap("g:a"), Some(Gap { after: 3, head: 4 }), "the dropped message is still owed");
    }

    #[test]
    fn note_head_opens_a_gap_and_stall_closes_it_until_new_evidence() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 2);
        order.note_head("g:a", 2);
        assert_eq!(order.gap("g:a"), None);
        order.note_head("g:a", 6);
        assert_eq!(order.gap("g:a"), Some(Gap { after: 2, head: 6 }));
        order.stall("g:a");
        assert_eq!(order.gap("g:a"), None);
        order.note_head("g:a", 6);
        assert_eq!(order.gap("g:a"), None, "no new evidence");
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 8), &mut out), Offer::Buffered);
        assert_eq!(order.gap("g:a"), Some(Gap { after: 2, head: 8 }));
        order.note_head("g:untracked", 5);
        assert!(!order.contains("g:untracked"));
    }

    #[test]
    fn skip_to_continues_after_a_lost_range() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 1);
        let mut out = Vec::new();
        assert_eq!(order.offer(message("g:a", 3), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 9), &mut out), Offer::Buffered);
        assert_eq!(order.offer(message("g:a", 10), &mut out), Offer::Buffered);
        assert!(order.skip_to("g:a", 8, &mut out));
        assert_eq!(seqs(&mut out), [9, 10], "the stale buffered 3 is dropped");
        assert_eq!(order.buffered(), 0);
        assert!(!order.skip_to("g:a", 5, &mut out), "never rewinds");
        assert_eq!(order.offer(message("g:a", 11), &mut out), Offer::Delivered);
    }

    #[test]
    fn forget_and_retain_drop_channels() {
        let mut order = OrderingBuffer::new(16);
        order.start("g:a", 1);
        order.start("g:b", 1);
        order.start("g:c", 1);
        order.forget("g:a");
        order.retain(|channel| channel != "g:b");
        assert_eq!(order.channels().collect::<Vec<_>>(), ["g:c"]);
    }

    #[test]
    fn any_arrival_order_yields_each_message_once_in_order() {
        // A deterministic shuffle with duplicates, as retransmission, replay and history could produce.
        let mut arrivals: Vec<u64> = (1..=60).chain(10..30).chain(50..=60).collect();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for index in (1..arrivals.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            arrivals.swap(index, (state % (index as u64 + 1)) as usize);
        }
        let mut order = OrderingBuffer::new(1_000);
        order.start("g:a", 0);
        let mut out = Vec::new();
        for seq in arrivals {
            order.offer(message("g:a", seq), &mut out);
        }
        assert_eq!(seqs(&mut out), (1..=60).collect::<Vec<_>>());
        assert_eq!(order.gap("g:a"), None);
    }
}
