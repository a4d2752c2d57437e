//! The index of a writer's unstored tail: for each owned partition, the records between the store writer's
//! committed offset and the end of the log. It answers `last_seq` and `find_sends` for what the store does not
//! hold yet. Pure code, no I/O; its size is bounded by the caller (entries below the store writer's committed
//! offset are pruned, and an append that would exceed the limit is refused).

use crate::backend::PriorSend;
use parley_core::protocol::MessageView;
use parley_core::sequencer::Placement;
use std::collections::{HashMap, VecDeque};

/// The tail of one partition.
#[derive(Debug, Default)]
struct PartitionTail {
    /// (sender, client message id) → where it sits, and the record's offset.
    sends: HashMap<(String, String), (PriorSend, i64)>,
    /// Channel → highest sequence seen in the tail, and the offset of that record.
    channels: HashMap<String, (u64, i64)>,
    /// Send keys in offset order, for pruning.
    order: VecDeque<(i64, (String, String))>,
}

/// The unstored tails of the partitions a writer owns.
#[derive(Debug, Default)]
pub struct TailIndex {
    partitions: HashMap<i32, PartitionTail>,
    entries: usize,
}

impl TailIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of sends held (the quantity the memory limit applies to).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Forgets a partition (before it is scanned again, or when it is given up).
    pub fn reset(&mut self, partition: i32) {
        if let Some(tail) = self.partitions.remove(&partition) {
            self.entries -= tail.sends.len();
        }
    }

    /// Records a committed message at `offset` of `partition`.
    pub fn insert(&mut self, partition: i32, offset: i64, message: &MessageView) {
        let tail = self.partitions.entry(partition).or_default();
        let key = (message.sender.clone(), message.client_msg_id.clone());
        let prior = PriorSend {
            channel: message.channel.clone(),
            placement: Placement { id: message.id, seq: message.seq, ts: message.ts },
        };
        // A key keeps naming its first message, the lowest id (a later first attempt with a used key is a second
        // message).
        match tail.sends.entry(key.clone()) {
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert((prior, offset));
                self.entries += 1;
            }
            std::collections::hash_map::Entry::Occupied(mut entry) => {
                if prior.placement.id < entry.get().0.placement.id {
                    entry.insert((prior, offset));
                }
            }
        }
        tail.order.push_back((offset, key));
        let entry = tail.channels.entry(message.channel.clone()).or_insert((0, offset));
        if message.seq >= entry.0 {
            *entry = (message.seq, offset);
        }
    }

    /// Drops what lies below `committed` in `partition`: the store holds it, so the store answers for it.
    pub fn prune(&mut self, partition: i32, committed: i64) {
        let Some(tail) = self.partitions.get_mut(&partition) else {
            return;
        };
        while tail.order.front().is_some_and(|(offset, _)| *offset < committed) {
            if let Some((offset, key)) = tail.order.pop_front() {
                // Only remove the entry if it is the one recorded at that offset (a key seen twice keeps the
                // first record).
                if tail.sends.get(&key).is_some_and(|(_, at)| *at == offset) {
                    tail.sends.remove(&key);
                    self.entries -= 1;
                }
            }
        }
        tail.channels.retain(|_, (_, offset)| *offset >= committed);
    }

    /// The highest sequence of `channel` in the tail, if the tail holds any of its messages.
    pub fn last_seq(&self, channel: &str) -> Option<u64> {
        self.partitions.values().filter_map(|tail| tail.channels.get(channel).map(|(seq, _)| *seq)).max()
    }

    /// An earlier send in the tail.
    pub fn find(&self, sender: &str, client_msg_id: &str) -> Option<PriorSend> {
        let key = (sender.to_owned(), client_msg_id.to_owned());
        self.partitions.values().find_map(|tail| tail.sends.get(&key).map(|(prior, _)| prior.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &str, seq: u64, sender: &str, client_msg_id: &str) -> MessageView {
        MessageView {
            channel: channel.to_owned(),
            seq,
            id: 1000 + seq,
            sender: sender.to_owned(),
            text: "hi".into(),
            ts: 7,
            client_msg_id: client_msg_id.to_owned(),
        }
    }

    #[test]
    fn answers_last_seq_and_sends_from_the_tail() {
        let mut index = TailIndex::new();
        index.insert(0, 10, &message("g:a", 4, "alice", "m1"));
        index.insert(0, 11, &message("g:a", 5, "bob", "m2"));
        index.insert(1, 3, &message("g:b", 1, "alice", "m3"));
        assert_eq!(index.len(), 3);
        assert_eq!(index.last_seq("g:a"), Some(5));
        assert_eq!(index.last_seq("g:b"), Some(1));
        assert_eq!(index.last_seq("g:c"), None);
        let found = index.find("bob", "m2").expect("found");
        assert_eq!(found.channel, "g:a");
        assert_eq!(found.placement, Placement { id: 1005, seq: 5, ts: 7 });
        assert!(index.find("bob", "m1").is_none());
    }

    #[test]
    fn pruning_drops_only_what_the_store_holds() {
        let mut index = TailIndex::new();
        index.insert(0, 10, &message("g:a", 1, "alice", "m1"));
        index.insert(0, 12, &message("g:a", 2, "alice", "m2"));
        index.insert(0, 14, &message("g:b", 1, "alice", "m3"));
        index.insert(1, 5, &message("g:c", 1, "alice", "m4"));
        index.prune(0, 13);
        assert_eq!(index.len(), 2);
        assert!(index.find("alice", "m1").is_none());
        assert!(index.find("alice", "m2").is_none());
        assert!(index.find("alice", "m3").is_some());
        assert!(index.find("alice", "m4").is_some(), "other partitions are untouched");
        assert_eq!(index.last_seq("g:a"), None, "the store answers for g:a now");
        assert_eq!(index.last_seq("g:b"), Some(1));
        index.prune(0, 100);
        index.prune(7, 100);
        assert_eq!(index.len(), 1);
        index.reset(1);
        assert!(index.is_empty());
    }

    #[test]
    fn a_repeated_key_keeps_naming_its_first_message() {
        let mut index = TailIndex::new();
        index.insert(0, 1, &message("g:a", 1, "alice", "same"));
        index.insert(0, 9, &message("g:a", 2, "alice", "same"));
        assert_eq!(index.len(), 1);
        assert_eq!(index.find("alice", "same").map(|prior| prior.placement.seq), Some(1));
        // Once the first is stored, the store answers for the key (it keeps the first message too).
        index.prune(0, 5);
        assert!(index.find("alice", "same").is_none());
        assert!(index.is_empty());
        index.prune(0, 10);
        assert!(index.is_empty());
    }
}
