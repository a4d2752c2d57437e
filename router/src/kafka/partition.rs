//! Which partition a channel lives in, and how a batch splits over partitions. Pure code, no I/O.
//!
//! The messages topic is keyed by channel. The partition of a key is Kafka's default (Java client) choice:
//! `toPositive(murmur2(key)) % partitions`. librdkafka's own default partitioner is a different one
//! (`consistent_random`, CRC32), so the driver computes the partition here and sets it on every record. Any
//! other producer of the topic must use the Java default (`murmur2_random` in librdkafka) to agree.

use parley_core::protocol::MessageView;
use std::collections::BTreeMap;

/// Kafka's `Utils.murmur2`: MurmurHash2, 32 bits, seed `0x9747b28c`, as the Java client computes it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut hash: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        hash ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        hash ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        hash ^= u32::from(rest[0]);
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash as i32
}

/// The partition of a channel in a topic of `partitions` partitions (Kafka's default for keyed records).
/// `partitions` below 1 counts as 1.
pub fn partition_for(channel: &str, partitions: i32) -> i32 {
    let positive = murmur2(channel.as_bytes()) & 0x7fff_ffff;
    positive % partitions.max(1)
}

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

    /// The vectors of Apache Kafka's `UtilsTest.testMurmur2` (the Java client's own results).
    #[test]
    fn murmur2_matches_the_java_client() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitions_are_in_range_even_for_negative_hashes() {
        // "21" hashes to a negative number: the sign bit is masked, not negated (Java's toPositive).
        assert_eq!(partition_for("21", 1000), (-973_932_308_i32 & 0x7fff_ffff) % 1000);
        assert_eq!(partition_for("anything", 0), 0);
        assert_eq!(partition_for("anything", 1), 0);
    }

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
