//! Which partition a channel lives in, and how a batch splits over partitions. Pure code, no I/O.
//!
//! The messages topic is keyed by channel. The partition of a key is Kafka's default (Java client) choice:
//! `toPositive(murmur2(key)) % partitions`. librdkafka's own default partitioner is a different one
//! (`consistent_random`, CRC32), so the driver computes the partition here and sets it on every record. Any
//! other producer of the topic must use the Java default (`murmur2_random` in librdkafka) to agree.

use parley_core::protocol::MessageView;
use std::collections::BTreeMap;

pub use parley_core::partition::{murmur2, partition_for};

/// Splits a batch by partition, keeping the batch's order within each partition (so each channel's messages
/// stay in sequence order).
pub fn group_by_partition(batch: Vec<MessageView>, partitions: i32) -> BTreeMap<i32, Vec<MessageView>> {
    let mut groups: BTreeMap<i32, Vec<MessageView>> = BTreeMap::new();
    for message in batch {
        groups.entry(partition_for(&message.channel, partitions)).or_default().push(message);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(channel: &str, seq: u64) -> MessageView {
        MessageView {
            channel: channel.to_owned(),
            seq,
            id: seq,
            sender: "alice".into(),
            text: String::new(),
            ts: 0,
            client_msg_id: format!("{channel}-{seq}"),
        }
    }

    proptest! {
        #[test]
        fn grouping_keeps_every_message_once_in_order(
            picks in proptest::collection::vec(0usize..6, 0..200),
            partitions in 1i32..12,
        ) {
            let channels = ["g:a", "g:b", "g:c", "d:alice:bob", "g:e", "g:f"];
            let mut next = [0u64; 6];
            let batch: Vec<MessageView> = picks
                .iter()
                .map(|&pick| {
                    next[pick] += 1;
                    message(channels[pick], next[pick])
                })
                .collect();
            let groups = group_by_partition(batch.clone(), partitions);
            let total: usize = groups.values().map(Vec::len).sum();
            prop_assert_eq!(total, batch.len());
            for (partition, messages) in &groups {
                prop_assert!((0..partitions).contains(partition));
                for message in messages {
                    prop_assert_eq!(partition_for(&message.channel, partitions), *partition);
                }
                // Within a partition, every channel's messages keep their ascending order.
                for channel in channels {
                    let seqs: Vec<u64> =
                        messages.iter().filter(|message| message.channel == channel).map(|message| message.seq).collect();
                    prop_assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]));
                }
            }
        }
    }
}
