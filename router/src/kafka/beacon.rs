//! Beacons: how far behind MirrorMaker 2's copy of a region's topics is, measured even when nobody chats.
//!
//! The routers of every region append a small record to `{prefix}beacons` every [`BEACON_EVERY`] (keyed by
//! region: one partition holds them), stamped with their clock. MirrorMaker 2 copies it with the region's other
//! topics (the operator puts it in every flow), and the routers of the receiving region read the copy with the rest
//! ([`crate::kafka::mirror`]). The copy's lag ([`Beacons::lag_ms`]) is the last beacon's transit (its stamp → its
//! reading here) while beacons keep arriving, and grows with the time the next one is overdue when they stop: a
//! MirrorMaker 2 that stalls or died shows at once, unlike a delivery latency, which is only observed on messages
//! that arrive.

use super::{kafka_error, millis, KafkaConfig};
use parley_api::BackendError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, instrument};

/// How often a router appends a beacon.
pub const BEACON_EVERY: Duration = Duration::from_secs(2);

/// One beacon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    /// The region whose routers appended it.
    pub region: String,
    /// When (Unix ms, the appending router's clock).
    pub at: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// The lag of a copy whose newest beacon was stamped `newest_at` and read after a transit of `transit_ms`, at
/// `now_ms`: the transit, or the time the next beacon is overdue (one period after the newest), whichever is
/// larger.
pub fn lag_ms(newest_at: u64, transit_ms: u64, now_ms: u64, every: Duration) -> u64 {
    let overdue = now_ms.saturating_sub(newest_at.saturating_add(every.as_millis() as u64));
    transit_ms.max(overdue)
}

/// The newest beacon read from each source region.
#[derive(Debug, Default)]
pub struct Beacons {
    newest: Mutex<HashMap<String, (u64, u64)>>,
}

impl Beacons {
    /// Notes a beacon of `source` read at `read_at` (Unix ms).
    pub fn observe(&self, source: &str, beacon: &Beacon, read_at: u64) {
        let mut newest = self.newest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = newest.entry(source.to_owned()).or_insert((0, 0));
        if beacon.at >= entry.0 {
            *entry = (beacon.at, read_at.saturating_sub(beacon.at));
        }
    }

    /// The copy's lag from `source` now, in ms; `None` before its first beacon was read.
    pub fn lag_ms(&self, source: &str) -> Option<u64> {
        let newest = self.newest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        newest.get(source).map(|(at, transit)| lag_ms(*at, *transit, now_ms(), BEACON_EVERY))
    }

    /// The largest lag over the sources that sent a beacon (0 when none did).
    pub fn max_lag_ms(&self) -> u64 {
        let sources: Vec<String> =
            self.newest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect();
        sources.iter().filter_map(|source| self.lag_ms(source)).max().unwrap_or(0)
    }
}

/// Appends a beacon of `region` to `{prefix}beacons` every [`BEACON_EVERY`] until `stopping` turns true.
pub fn start(
    config: &KafkaConfig,
    region: String,
    mut stopping: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, BackendError> {
    let producer: FutureProducer = config
        .client()
        .set("acks", "all")
        .set("message.timeout.ms", millis(BEACON_EVERY))
        .set("partitioner", "murmur2_random")
        .create()
        .map_err(kafka_error("beacon producer"))?;
    let topic = config.beacons_topic();
    Ok(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(BEACON_EVERY);
        loop {
            tokio::select! {
                _ = stopping.changed() => break,
                _ = ticks.tick() => append(&producer, &topic, &region).await,
            }
        }
    }))
}

#[instrument(skip(producer))]
async fn append(producer: &FutureProducer, topic: &str, region: &str) {
    let beacon = Beacon { region: region.to_owned(), at: now_ms() };
    let payload = match serde_json::to_vec(&beacon) {
        Ok(payload) => payload,
        Err(error) => {
            debug!(%error, "cannot encode a beacon");
            return;
        }
    };
    let record = FutureRecord::to(topic).key(region).payload(&payload);
    if let Err((error, _)) = producer.send(record, BEACON_EVERY).await {
        // The next one follows; a missing beacon shows as lag on the other side, which is what it is.
        debug!(%error, "a beacon was not appended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_transit_until_the_next_beacon_is_overdue() {
        let every = Duration::from_secs(2);
        assert_eq!(lag_ms(10_000, 150, 10_500, every), 150, "the newest arrived after 150 ms");
        assert_eq!(lag_ms(10_000, 150, 12_000, every), 150, "the next is due now");
        assert_eq!(lag_ms(10_000, 150, 17_000, every), 5_000, "the next is 5 s overdue: the copy stalled");
        assert_eq!(lag_ms(10_000, 150, 9_000, every), 150, "a clock behind the stamp");
    }

    #[test]
    fn the_newest_beacon_counts() {
        let beacons = Beacons::default();
        assert_eq!(beacons.lag_ms("eu"), None);
        let now = now_ms();
        beacons.observe("eu", &Beacon { region: "eu".into(), at: now - 100 }, now);
        beacons.observe("eu", &Beacon { region: "eu".into(), at: now - 5_000 }, now);
        let lag = beacons.lag_ms("eu").expect("a beacon was read");
        assert!((100..1_000).contains(&lag), "{lag}");
        assert_eq!(beacons.max_lag_ms(), lag);
    }
}
