//! Per-connection delivery state, with no I/O: which messages were sent and not yet acknowledged, when to
//! retransmit them, when to give up on the connection, and the last sequence delivered per channel (so the
//! stream a client sees has no duplicate and every gap is noticed).
//!
//! The connection loop asks [`DeliveryTracker::admit`] before sending a message: `Deliver` (next in order),
//! `Duplicate` (already delivered: drop it) or `Gap` (something is missing first: fetch it from history). After
//! sending it calls [`DeliveryTracker::sent`]. A cumulative `ack` releases everything up to a sequence. On each
//! deadline, [`DeliveryTracker::due`] says what to retransmit, or that the connection is dead.

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

/// What to do with a message about to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Deliver,
    /// Already delivered on this connection: drop it.
    Duplicate,
    /// Sequences `from..=to` are missing before it: fill them first.
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

/// The delivery state of one connection.
#[derive(Debug, Clone)]
pub struct DeliveryTracker<P> {
    policy: AckPolicy,
    unacked: VecDeque<Pending<P>>,
    delivered: HashMap<Arc<str>, u64>,
}

impl<P: Clone> DeliveryTracker<P> {
    /// Empty state.
    pub fn new(policy: AckPolicy) -> Self {
        Self { policy, unacked: VecDeque::new(), delivered: HashMap::new() }
    }

    /// Starts a channel at `seq` (everything up to it is known to the client, e.g. from `ready` or a resume).
    pub fn start_at(&mut self, channel: &str, seq: u64) {
        let entry = self.delivered.entry(Arc::from(channel)).or_insert(seq);
        *entry = (*entry).max(seq);
    }

    /// The last sequence delivered on a channel, if the channel is tracked.
    pub fn delivered(&self, channel: &str) -> Option<u64> {
        self.delivered.get(channel).copied()
    }

    /// Decides about message `seq` of `channel`. Untracked channels start at this message.
    pub fn admit(&self, channel: &str, seq: u64) -> Admit {
        match self.delivered.get(channel) {
            None => Admit::Deliver,
            Some(&last) if seq <= last => Admit::Duplicate,
            Some(&last) if seq == last + 1 => Admit::Deliver,
            Some(&last) => Admit::Gap { from: last + 1, to: seq - 1 },
        }
    }

    /// Records that message `seq` was sent now and awaits an ACK.
    pub fn sent(&mut self, channel: &Arc<str>, seq: u64, payload: P, now_ms: u64) {
        match self.delivered.get_mut(&**channel) {
            Some(last) => *last = (*last).max(seq),
            None => {
                self.delivered.insert(channel.clone(), seq);
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
        self.unacked.iter().map(|pending| pending.sent_at_ms + self.policy.ack_timeout_ms).min()
    }

    /// What is due at `now_ms`. Retransmitted messages restart their timer.
    pub fn due(&mut self, now_ms: u64) -> Due<P> {
        let timeout = self.policy.ack_timeout_ms;
        let mut resend = Vec::new();
        for pending in self.unacked.iter_mut() {
            if pending.sent_at_ms + timeout > now_ms {
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
        assert_eq!(tracker.admit("c", 4), Admit::Duplicate);
        assert_eq!(tracker.admit("c", 5), Admit::Deliver);
        assert_eq!(tracker.admit("c", 8), Admit::Gap { from: 5, to: 7 });
        assert_eq!(tracker.admit("new", 1), Admit::Deliver);
        tracker.sent(&Arc::from("c"), 5, (), 0);
        assert_eq!(tracker.admit("c", 5), Admit::Duplicate);
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
}
