//! Which partition of a keyed Kafka topic a channel lives in. Pure code, no I/O.
//!
//! The messages topic is keyed by channel, and a channel's partition is Kafka's default (Java client) choice:
//! `toPositive(murmur2(key)) % partitions`. The router places every record there, and each partition has one
//! owning router at a time; gateways compute the same function to send a channel's calls to its owner.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
