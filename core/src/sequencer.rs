//! Per-channel ordering: the single writer's decisions, with no I/O.
//!
//! The writer owns the last durable sequence of each channel it writes. For a batch of sends it plans, in
//! arrival order, a gap-free continuation of each channel's sequence and recognises retries (the same sender and
//! client message id) both against earlier durable sends and inside the batch. The plan only becomes the new
//! state with [`Sequencer::commit`], after the batch is durable; if the write fails, the plan is dropped and the
//! sequence continues from the last durable value, so a failed write never leaves a gap.

use crate::snowflake::{Snowflake, SnowflakeError};
use std::collections::HashMap;

/// A send to be ordered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    /// Conversation id.
    pub channel: String,
    /// Sender.
    pub sender: String,
    /// Idempotency key.
    pub client_msg_id: String,
    /// Text.
    pub text: String,
    /// The sender says this key was never sent before: no need to look for an earlier send in storage.
    pub first_attempt: bool,
}

/// Where a durable message sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Snowflake id.
    pub id: u64,
    /// Per-channel sequence.
    pub seq: u64,
    /// Writer timestamp (Unix ms).
    pub ts: u64,
}

/// The decision for one send of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new message at this placement; it must be written.
    New(Placement),
    /// A retry of a message that is already durable, or planned earlier in this batch.
    Duplicate(Placement),
    /// No id could be issued (clock behind or sequence exhausted); the send is refused and may be retried.
    Refused(SnowflakeError),
}

/// A planned batch, not yet durable.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// One decision per request, in request order.
    pub decisions: Vec<Decision>,
    last_seq: HashMap<String, u64>,
}

/// The writer's ordering state for the channels it owns.
#[derive(Debug, Default)]
pub struct Sequencer {
    last_seq: HashMap<String, u64>,
}

impl Sequencer {
    /// An empty sequencer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the sequencer knows the channel's last durable sequence.
    pub fn knows(&self, channel: &str) -> bool {
        self.last_seq.contains_key(channel)
    }

    /// Records the last durable sequence of a channel (loaded from the log or store).
    pub fn load(&mut self, channel: &str, last_seq: u64) {
        self.last_seq.insert(channel.to_owned(), last_seq);
    }

    /// Forgets a channel: its last sequence is loaded again before its next send (after its home moved).
    pub fn forget(&mut self, channel: &str) {
        self.last_seq.remove(channel);
    }

    /// The last durable sequence of a channel, if known.
    pub fn last_seq(&self, channel: &str) -> Option<u64> {
        self.last_seq.get(channel).copied()
    }

    /// Plans a batch. `durable` answers whether (sender, client message id) was already written, and where.
    /// Every channel in the batch must have been [`load`](Self::load)ed.
    pub fn plan(
        &self,
        requests: &[SendRequest],
        mut durable: impl FnMut(&str, &str) -> Option<Placement>,
        ids: &mut Snowflake,
        now_ms: u64,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut in_batch: HashMap<(&str, &str), Placement> = HashMap::new();
        for request in requests {
            let key = (request.sender.as_str(), request.client_msg_id.as_str());
            if let Some(placement) = in_batch.get(&key).copied().or_else(|| durable(key.0, key.1)) {
                plan.decisions.push(Decision::Duplicate(placement));
                continue;
            }
            let id = match ids.next_id(now_ms) {
                Ok(id) => id,
                Err(error) => {
                    plan.decisions.push(Decision::Refused(error));
                    continue;
                }
            };
            let last = plan
                .last_seq
                .get(&request.channel)
                .copied()
                .or_else(|| self.last_seq.get(&request.channel).copied())
                .unwrap_or(0);
            let placement = Placement { id, seq: last + 1, ts: now_ms };
            plan.last_seq.insert(request.channel.clone(), last + 1);
            in_batch.insert(key, placement);
            plan.decisions.push(Decision::New(placement));
        }
        plan
    }

    /// Makes a plan's sequences the new durable state. Call only after the batch is durable.
    pub fn commit(&mut self, plan: &Plan) {
        for (channel, seq) in &plan.last_seq {
            self.last_seq.insert(channel.clone(), *seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(channel: &str, sender: &str, id: &str) -> SendRequest {
        SendRequest {
            channel: channel.into(),
            sender: sender.into(),
            client_msg_id: id.into(),
            text: "t".into(),
            first_attempt: false,
        }
    }

    #[test]
    fn assigns_gap_free_sequences_and_dedupes_inside_batch() {
        let mut sequencer = Sequencer::new();
        sequencer.load("g:a", 10);
        sequencer.load("g:b", 0);
        let mut ids = Snowflake::new(1, 0).expect("generator");
        let batch =
            [request("g:a", "u", "1"), request("g:b", "u", "2"), request("g:a", "v", "1"), request("g:a", "u", "1")];
        let plan = sequencer.plan(&batch, |_, _| None, &mut ids, 1_000);
        let seqs: Vec<_> = plan
            .decisions
            .iter()
            .map(|decision| match decision {
                Decision::New(placement) => (true, placement.seq),
                Decision::Duplicate(placement) => (false, placement.seq),
                Decision::Refused(error) => panic!("refused: {error}"),
            })
            .collect();
        assert_eq!(seqs, vec![(true, 11), (true, 1), (true, 12), (false, 11)]);
        assert_eq!(sequencer.last_seq("g:a"), Some(10), "nothing changes before commit");
        sequencer.commit(&plan);
        assert_eq!(sequencer.last_seq("g:a"), Some(12));
    }

    #[test]
    fn durable_retry_is_a_duplicate() {
        let mut sequencer = Sequencer::new();
        sequencer.load("g:a", 3);
        let mut ids = Snowflake::new(1, 0).expect("generator");
        let earlier = Placement { id: 77, seq: 2, ts: 5 };
        let plan = sequencer.plan(&[request("g:a", "u", "x")], |_, _| Some(earlier), &mut ids, 9);
        assert_eq!(plan.decisions, vec![Decision::Duplicate(earlier)]);
    }

    proptest! {
        /// Whatever mix of channels, retries and failed writes, committed sequences per channel are exactly
        /// 1..=n with no gap and no repeat.
        #[test]
        fn committed_sequences_are_gap_free(
            batches in proptest::collection::vec(
                (proptest::collection::vec((0u8..4, 0u8..3, 0u16..40), 1..20), any::<bool>()), 1..30)
        ) {
            let mut sequencer = Sequencer::new();
            for channel in 0..4 { sequencer.load(&format!("g:{channel}"), 0); }
            let mut ids = Snowflake::new(1, 0).expect("generator");
            let mut durable: HashMap<(String, String), Placement> = HashMap::new();
            let mut written: HashMap<String, Vec<u64>> = HashMap::new();
            let mut clock = 1;
            for (batch, write_succeeds) in batches {
                clock += 1;
                let requests: Vec<_> = batch.iter()
                    .map(|(channel, sender, id)| request(&format!("g:{channel}"), &sender.to_string(), &id.to_string()))
                    .collect();
                let plan = sequencer.plan(&requests, |s, c| durable.get(&(s.to_owned(), c.to_owned())).copied(), &mut ids, clock);
                if !write_succeeds { continue; }
                for (request, decision) in requests.iter().zip(&plan.decisions) {
                    if let Decision::New(placement) = decision {
                        written.entry(request.channel.clone()).or_default().push(placement.seq);
                        durable.insert((request.sender.clone(), request.client_msg_id.clone()), *placement);
                    }
                }
                sequencer.commit(&plan);
            }
            for seqs in written.values() {
                let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
                prop_assert_eq!(seqs, &expected);
            }
        }
    }
}
