//! Per-connection delivery state, with no I/O: which messages were sent and not yet acknowledged, when to
//! retransmit them, when to give up on the connection, and per channel what this connection has sent (so the
//! stream a client sees has no duplicate and every gap is noticed).
//!
//! Every message goes through [`DeliveryTracker::admit`] before it is sent, whether it is pushed live or read back
//! from history (a resume's replay, a gap fill): one record per channel decides, so a sequence goes out once per
//! connection however it arrives. A live message is `Deliver` (next in order), `Duplicate` (the client has it:
//! drop it) or `Gap` (something is missing first: fetch it from history); a replayed one is `Deliver` unless this
//! connection sent it already. After sending, the loop calls [`DeliveryTracker::sent`]. A cumulative `ack`
//! releases everything up to a sequence. On each deadline, [`DeliveryTracker::due`] says what to retransmit, or
//! that the connection is dead.
//!
//! Sequences are client-controlled numbers too (`sync`, `ack`): every sum here saturates, so `u64::MAX` is a
//! sequence like any other.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// ACK and retransmit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPolicy {
    /// How long a sent message may stay unacknowledged before it is retransmitted.
    pub ack_timeout_ms: u64,
    /// Retransmissions before the connection is considered dead.
    pub max_retransmits: u32,
    /// Unacknowledged messages kept per connection; more means the client is not acknowledging.
    pub max_unacked: usize,
}

impl Default for AckPolicy {
    fn default() -> Self {
        Self { ack_timeout_ms: 5_000, max_retransmits: 3, max_unacked: 1_024 }
    }
}

/// Where a message about to be sent comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Pushed as it was published: it continues the stream.
    Live,
    /// Read back from history at the client's request (a resume) or to fill a gap: it may lie anywhere.
    Replay,
}

/// What to do with a message about to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Deliver,
    /// The client has it (sent on this connection, or, for a live message, known before it): drop it.
    Duplicate,
    /// Sequences `from..=to` are missing before it: fill them first (live messages only).
    Gap {
        /// First missing sequence.
        from: u64,
        /// Last missing sequence.
        to: u64,
    },
}

/// What the deadline found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due<P> {
    /// Nothing to do yet.
    Nothing,
    /// Retransmit these (channel, seq, payload), oldest first.
    Retransmit(Vec<(Arc<str>, u64, P)>),
    /// A message went unacknowledged through every retransmission: close the connection (keep the messages
    /// for resume).
    Dead {
        /// The channel of the message.
        channel: String,
        /// Its sequence.
        seq: u64,
    },
}

#[derive(Debug, Clone)]
struct Pending<P> {
    channel: Arc<str>,
    seq: u64,
    payload: P,
    sent_at_ms: u64,
    attempts: u32,
}

/// Runs of earlier sequences a channel keeps beyond its main one; past this the oldest is forgotten (a later
/// resume from that far back may then send those again).
const MAX_EARLIER_RUNS: usize = 32;

/// One channel's stream on one connection.
#[derive(Debug, Clone, Default)]
struct Stream {
    /// The stream's position: everything up to it was known to the client before this connection (the channel's
    /// last sequence at connect) or was sent on it. Live messages continue from here.
    last: u64,
    /// Everything after it, up to `last`, was sent on this connection (or announced unavailable).
    sent_after: u64,
    /// Other runs sent on this connection below `sent_after` (by a resume from further back), ascending and apart:
    /// `(after, last)` is `after + 1..=last`.
    earlier: Vec<(u64, u64)>,
}

impl Stream {
    /// A stream whose client knows everything up to `seq`, none of it sent here.
    fn at(seq: u64) -> Self {
        Self { last: seq, sent_after: seq, earlier: Vec::new() }
    }

    /// Whether this connection sent `seq`.
    fn was_sent(&self, seq: u64) -> bool {
        (self.sent_after < seq && seq <= self.last)
            || self.earlier.iter().any(|&(after, last)| after < seq && seq <= last)
    }

    /// Records that `seq` was sent.
    fn record(&mut self, seq: u64) {
        if seq > self.last {
            if seq - self.last > 1 {
                // A jump (a gap that could not be filled, or a resume from beyond the stream): what lies between
                // was not sent here.
                if self.sent_after < self.last {
                    self.keep_earlier(self.sent_after, self.last);
                }
                self.sent_after = seq - 1;
            }
            self.last = seq;
        } else if seq > 0 && !self.was_sent(seq) {
            // (No message has sequence 0: there is nothing to record for it.)
            self.keep_earlier(seq - 1, seq);
            // A run that reaches the main one joins it.
            if let Some(&(after, last)) = self.earlier.last() {
                if last == self.sent_after {
                    self.sent_after = after;
                    self.earlier.pop();
                }
            }
        }
    }

    /// Adds the run `after + 1..=last` to the earlier runs, merged with the runs it touches.
    fn keep_earlier(&mut self, after: u64, last: u64) {
        let index = self.earlier.partition_point(|&(_, end)| end < after);
        let (mut after, mut last) = (after, last);
        while let Some(&(other_after, other_last)) = self.earlier.get(index) {
            if other_after > last {
                break;
            }
            after = after.min(other_after);
            last = last.max(other_last);
            self.earlier.remove(index);
        }
        self.earlier.insert(index, (after, last));
        if self.earlier.len() > MAX_EARLIER_RUNS {
            self.earlier.remove(0);
        }
    }
}

/// The delivery state of one connection.
#[derive(Debug, Clone)]
pub struct DeliveryTracker<P> {
    policy: AckPolicy,
    unacked: VecDeque<Pending<P>>,
    /// Keyed by channel, hashed with foldhash (looked up twice per delivery; the keys are the user's channels).
    streams: HashMap<Arc<str>, Stream, foldhash::fast::RandomState>,
}

impl<P: Clone> DeliveryTracker<P> {
    /// Empty state.
    pub fn new(policy: AckPolicy) -> Self {
        Self { policy, unacked: VecDeque::new(), streams: HashMap::default() }
    }

    /// Starts a channel at `seq` (everything up to it is known to the client, e.g. from `ready`), or moves its
    /// stream forward to `seq` (the sequences skipped are no longer available, and were announced so).
    pub fn start_at(&mut self, channel: &str, seq: u64) {
        match self.streams.get_mut(channel) {
            Some(stream) => stream.last = stream.last.max(seq),
            None => {
                self.streams.insert(Arc::from(channel), Stream::at(seq));
            }
        }
    }

    /// The stream's position on a channel (see [`DeliveryTracker::start_at`]), if the channel is tracked.
    pub fn delivered(&self, channel: &str) -> Option<u64> {
        self.streams.get(channel).map(|stream| stream.last)
    }

    /// Decides about message `seq` of `channel`. Untracked channels start at this message.
    pub fn admit(&self, channel: &str, seq: u64, source: Source) -> Admit {
        let Some(stream) = self.streams.get(channel) else {
            return Admit::Deliver;
        };
        match source {
            Source::Replay if stream.was_sent(seq) => Admit::Duplicate,
            Source::Replay => Admit::Deliver,
            Source::Live if seq <= stream.last => Admit::Duplicate,
            // `seq > last`, so neither sum below can overflow.
            Source::Live if seq == stream.last + 1 => Admit::Deliver,
            Source::Live => Admit::Gap { from: stream.last + 1, to: seq - 1 },
        }
    }

    /// Records that message `seq` was sent now and awaits an ACK.
    pub fn sent(&mut self, channel: &Arc<str>, seq: u64, payload: P, now_ms: u64) {
        match self.streams.get_mut(&**channel) {
            Some(stream) => stream.record(seq),
            None => {
                self.streams.insert(
                    channel.clone(),
                    Stream { last: seq, sent_after: seq.saturating_sub(1), earlier: Vec::new() },
                );
            }
        }
        self.unacked.push_back(Pending { channel: channel.clone(), seq, payload, sent_at_ms: now_ms, attempts: 0 });
    }

    /// Whether the client has stopped acknowledging (too many unacknowledged messages).
    pub fn overloaded(&self) -> bool {
        self.unacked.len() > self.policy.max_unacked
    }

    /// Number of unacknowledged messages.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// A cumulative ACK: everything of `channel` up to `seq` was received. Returns how many were released.
    pub fn ack(&mut self, channel: &str, seq: u64) -> usize {
        let before = self.unacked.len();
        self.unacked.retain(|pending| !(&*pending.channel == channel && pending.seq <= seq));
        if self.unacked.is_empty() && self.unacked.capacity() > 64 {
            // Give back memory after a burst; idle connections should stay small.
            self.unacked.shrink_to_fit();
        }
        before - self.unacked.len()
    }

    /// When the next retransmission is due.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.unacked.iter().map(|pending| pending.sent_at_ms.saturating_add(self.policy.ack_timeout_ms)).min()
    }

    /// What is due at `now_ms`. Retransmitted messages restart their timer.
    pub fn due(&mut self, now_ms: u64) -> Due<P> {
        let timeout = self.policy.ack_timeout_ms;
        let mut resend = Vec::new();
        for pending in self.unacked.iter_mut() {
            if pending.sent_at_ms.saturating_add(timeout) > now_ms {
                continue;
            }
            if pending.attempts >= self.policy.max_retransmits {
                return Due::Dead { channel: pending.channel.to_string(), seq: pending.seq };
            }
            pending.attempts += 1;
            pending.sent_at_ms = now_ms;
            resend.push((pending.channel.clone(), pending.seq, pending.payload.clone()));
        }
        if resend.is_empty() {
            Due::Nothing
        } else {
            Due::Retransmit(resend)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_in_order_drops_duplicates_and_reports_gaps() {
        let mut tracker: DeliveryTracker<()> = DeliveryTracker::new(AckPolicy::default());
        tracker.start_at("c", 4);
        assert_eq!(tracker.admit("c", 4, Source::Live), Admit::Duplicate);
        assert_eq!(tracker.admit("c", 5, Source::Live), Admit::Deliver);
        assert_eq!(tracker.admit("c", 8, Source::Live), Admit::Gap { from: 5, to: 7 });
        assert_eq!(tracker.admit("new", 1, Source::Live), Admit::Deliver);
        tracker.sent(&Arc::from("c"), 5, (), 0);
        assert_eq!(tracker.admit("c", 5, Source::Live), Admit::Duplicate);
        assert_eq!(tracker.delivered("c"), Some(5));
    }

    #[test]
    fn exactly_three_retransmits_at_timeout_spacing_then_dead() {
        let mut tracker = DeliveryTracker::new(AckPolicy::default());
        tracker.sent(&Arc::from("c"), 1, "m1", 1_000);
        assert_eq!(tracker.due(5_999), Due::Nothing);
        assert_eq!(tracker.next_deadline_ms(), Some(6_000));
        let mut retransmits = Vec::new();
        let mut now = 6_000;
        loop {
            match tracker.due(now) {
                Due::Retransmit(items) => retransmits.push((now, items.len())),
                Due::Dead { seq, .. } => {
                    assert_eq!(seq, 1);
                    break;
                }
                Due::Nothing => panic!("nothing due at {now}"),
            }
            now = tracker.next_deadline_ms().expect("pending");
        }
        assert_eq!(retransmits, vec![(6_000, 1), (11_000, 1), (16_000, 1)]);
        assert_eq!(now, 21_000, "declared dead one timeout after the third retransmit");
    }

    #[test]
    fn cumulative_ack_releases_only_its_channel() {
        let mut tracker = DeliveryTracker::new(AckPolicy::default());
        for seq in 1..=3 {
            tracker.sent(&Arc::from("a"), seq, (), 0);
            tracker.sent(&Arc::from("b"), seq, (), 0);
        }
        assert_eq!(tracker.ack("a", 2), 2);
        assert_eq!(tracker.unacked(), 4);
        assert_eq!(tracker.ack("b", 10), 3);
        assert_eq!(tracker.ack("a", 3), 1);
        assert_eq!(tracker.next_deadline_ms(), None);
    }

    /// The sequences of `1..=upto` a replay would send on `channel`, each recorded as sent.
    fn replay(tracker: &mut DeliveryTracker<()>, channel: &str, after: u64, upto: u64) -> Vec<u64> {
        let channel: Arc<str> = Arc::from(channel);
        let mut sent = Vec::new();
        for seq in after + 1..=upto {
            if tracker.admit(&channel, seq, Source::Replay) == Admit::Deliver {
                tracker.sent(&channel, seq, (), 0);
                sent.push(seq);
            }
        }
        sent
    }

    #[test]
    fn replays_and_live_pushes_share_one_record_so_each_sequence_goes_out_once() {
        let mut tracker: DeliveryTracker<()> = DeliveryTracker::new(AckPolicy::default());
        // Connected when the channel ended at 10; 11 and 12 went out live.
        tracker.start_at("c", 10);
        for seq in [11, 12] {
            assert_eq!(tracker.admit("c", seq, Source::Live), Admit::Deliver);
            tracker.sent(&Arc::from("c"), seq, (), 0);
        }
        // A resume from 3 replays 4..=10 (never sent here) and 13, not 11 and 12.
        assert_eq!(replay(&mut tracker, "c", 3, 13), vec![4, 5, 6, 7, 8, 9, 10, 13]);
        // Live copies of what the replay sent are duplicates, and the stream goes on after it.
        assert_eq!(tracker.admit("c", 13, Source::Live), Admit::Duplicate);
        assert_eq!(tracker.admit("c", 14, Source::Live), Admit::Deliver);
        // A second resume sends only what this connection never sent.
        assert_eq!(replay(&mut tracker, "c", 0, 14), vec![1, 2, 3, 14]);
        assert_eq!(replay(&mut tracker, "c", 0, 14), Vec::<u64>::new());
    }

    #[test]
    fn a_replay_cut_short_leaves_a_run_apart_that_later_replays_respect() {
        let mut tracker: DeliveryTracker<()> = DeliveryTracker::new(AckPolicy::default());
        tracker.start_at("c", 100);
        // A resume from 10 sent 11..=20, then the history read failed.
        assert_eq!(replay(&mut tracker, "c", 10, 20), (11..=20).collect::<Vec<_>>());
        // A resume from 5 sends 6..=10 and 21..=100, but not 11..=20 again.
        let sent = replay(&mut tracker, "c", 5, 100);
        assert_eq!(sent, (6..=10).chain(21..=100).collect::<Vec<_>>());
        assert_eq!(tracker.streams.get("c").map(|stream| (stream.sent_after, stream.earlier.len())), Some((5, 0)));
        // A gap that could not be filled: 102..=104 were never sent here, and a later resume sends them.
        tracker.sent(&Arc::from("c"), 101, (), 0);
        tracker.sent(&Arc::from("c"), 105, (), 0);
        assert_eq!(replay(&mut tracker, "c", 100, 105), vec![102, 103, 104]);
    }

    #[test]
    fn the_ends_of_the_sequence_space_do_not_overflow() {
        let mut tracker = DeliveryTracker::new(AckPolicy { ack_timeout_ms: u64::MAX, ..AckPolicy::default() });
        tracker.start_at("c", u64::MAX - 1);
        assert_eq!(tracker.admit("c", u64::MAX, Source::Live), Admit::Deliver);
        tracker.sent(&Arc::from("c"), u64::MAX, "last", u64::MAX);
        assert_eq!(tracker.admit("c", u64::MAX, Source::Live), Admit::Duplicate);
        assert_eq!(tracker.admit("c", u64::MAX, Source::Replay), Admit::Duplicate);
        assert_eq!(tracker.admit("c", 0, Source::Replay), Admit::Deliver);
        tracker.sent(&Arc::from("c"), 0, "zero", 0);
        tracker.sent(&Arc::from("new"), 0, "first", 0);
        assert_eq!(tracker.next_deadline_ms(), Some(u64::MAX));
        assert_eq!(tracker.due(u64::MAX - 1), Due::Nothing);
        assert_eq!(tracker.ack("c", u64::MAX), 2);
    }
}
