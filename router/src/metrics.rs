//! The `parley-router` process's metrics: one registry (prefix `parley_router`), built at start-up and served on
//! the admin port. It holds the writer's counters and latencies ([`RouterStats`]: send→durable, durable→published),
//! the Kafka log's producer errors, the store writer's counters and its lag per partition (refreshed in the
//! background), and the Redis drivers' connection losses and re-connections.

use crate::kafka::store_writer::partition_lags;
use crate::kafka::{KafkaConfig, KafkaLogStats, StoreWriterStats};
use parley_api::RouterStats;
use parley_bus::redis::RedisStats;
use parley_telemetry::metrics::{AtomicCounters, Kind};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// Labels of the per-partition store-writer lag.
type PartitionLabel = Vec<(&'static str, String)>;

/// The router's registry.
#[derive(Debug)]
pub struct RouterMetrics {
    registry: Registry,
    store_lag: Family<PartitionLabel, Gauge>,
}

impl RouterMetrics {
    /// A registry with the writer's metrics.
    pub fn new(stats: &Arc<RouterStats>) -> Self {
        let mut registry = Registry::with_prefix("parley_router");
        stats.register(&mut registry);
        Self { registry, store_lag: Family::default() }
    }

    /// Adds the Kafka log's counters (`kafka_*`).
    pub fn kafka_log(&mut self, stats: &Arc<KafkaLogStats>) {
        let read = |field: fn(&KafkaLogStats) -> &AtomicU64| {
            let stats = stats.clone();
            move || field(&stats).load(Ordering::Relaxed)
        };
        AtomicCounters::default()
            .read(
                "kafka_producer_errors",
                "Kafka produce or transaction failures (the writer confirmed nothing of them)",
                Kind::Counter,
                read(|stats| &stats.producer_errors),
            )
            .read(
                "kafka_append_timeouts",
                "Kafka appends that missed their deadline",
                Kind::Counter,
                read(|stats| &stats.append_timeouts),
            )
            .read(
                "kafka_fenced_partitions",
                "Partitions this router lost to a newer writer",
                Kind::Counter,
                read(|stats| &stats.fenced_partitions),
            )
            .register(&mut self.registry);
    }

    /// Exports the partitions `log` owns now (`parley_router_owned_partitions`, a gauge) and the changes of its
    /// ownership (`parley_router_ownership_changes_total`).
    pub fn ownership(&mut self, log: &Arc<crate::kafka::KafkaLog>) {
        let (owned, changes) = (log.clone(), log.clone());
        AtomicCounters::default()
            .read(
                "owned_partitions",
                "Partitions of the messages topic this router owns (the single writer of their channels)",
                Kind::Gauge,
                move || owned.owned().len() as u64,
            )
            .read(
                "ownership_changes",
                "Times partitions were acquired or released by this router",
                Kind::Counter,
                move || changes.ownership_changes(),
            )
            .register(&mut self.registry);
    }

    /// Exports the Snowflake machine id (`parley_router_machine_id`, a gauge): the leased one when `lease` is given
    /// (with `parley_router_machine_lease_lost_total`, the times its lease lapsed or was taken), else `fixed`.
    pub fn machine_id(&mut self, lease: Option<&crate::machine_lease::MachineIdLease>, fixed: u16) {
        let counters = match lease {
            Some(lease) => {
                let (id, lost) = (lease.clone(), lease.clone());
                AtomicCounters::default()
                    .read(
                        "machine_id",
                        "The Snowflake machine id this router leased (held, or last held while its lease is lost)",
                        Kind::Gauge,
                        move || id.id().map_or(0, u64::from),
                    )
                    .read(
                        "machine_lease_lost",
                        "Times this router's machine-id lease lapsed or was taken: it refused sends until it held one \
                         again",
                        Kind::Counter,
                        move || lost.lost_total(),
                    )
            }
            None => AtomicCounters::default().read(
                "machine_id",
                "The Snowflake machine id of this router (fixed: no block to lease from)",
                Kind::Gauge,
                move || u64::from(fixed),
            ),
        };
        counters.register(&mut self.registry);
    }

    /// Registers the counters of calls carried to other regions.
    pub fn global(&mut self, stats: &Arc<crate::global::GlobalStats>) {
        use std::sync::atomic::Ordering::Relaxed;
        let (forwarded, failures, reads, taken, held) =
            (stats.clone(), stats.clone(), stats.clone(), stats.clone(), stats.clone());
        let (failovers, resent) = (stats.clone(), stats.clone());
        AtomicCounters::default()
            .read("peer_calls", "Calls carried to a channel's home region", Kind::Counter, move || {
                forwarded.forwarded.load(Relaxed)
            })
            .read("peer_call_failures", "Carried calls that did not reach the home region", Kind::Counter, move || {
                failures.forward_failures.load(Relaxed)
            })
            .read("home_reads", "Channel homes read from the store", Kind::Counter, move || {
                reads.home_reads.load(Relaxed)
            })
            .read("homes_taken", "Channel homes moved to this region", Kind::Counter, move || {
                taken.homes_taken.load(Relaxed)
            })
            .read("held_calls", "Calls that waited while their channel's home moved", Kind::Counter, move || {
                held.held_calls.load(Relaxed)
            })
            .read("failovers", "Channels of a failed region taken over by this region", Kind::Counter, move || {
                failovers.failovers.load(Relaxed)
            })
            .read(
                "resent_messages",
                "Messages confirmed here after another region took their channel over, sent again to the new home",
                Kind::Counter,
                move || resent.resent.load(Relaxed),
            )
            .register(&mut self.registry);
    }

    /// Registers the counters of the reader of other regions' mirrored topics.
    pub fn mirror(&mut self, stats: &Arc<crate::kafka::mirror::MirrorStats>) {
        use std::sync::atomic::Ordering::Relaxed;
        let (messages, memberships, undecodable, failures, delay) =
            (stats.clone(), stats.clone(), stats.clone(), stats.clone(), stats.clone());
        let (deposed, positions, receipts) = (stats.clone(), stats.clone(), stats.clone());
        let (presence, presence_failures, lag) = (stats.clone(), stats.clone(), stats.clone());
        AtomicCounters::default()
            .read(
                "mirror_lag_ms",
                "MirrorMaker 2's lag, the largest over the source regions: the last beacon's transit, or how long the \
                 next one is overdue",
                Kind::Gauge,
                move || lag.beacons.max_lag_ms(),
            )
            .read(
                "mirrored_presence",
                "Other regions' presence reports kept in this region's presence store",
                Kind::Counter,
                move || presence.presence.load(Relaxed),
            )
            .read(
                "mirrored_presence_failures",
                "Other regions' presence reports the presence store did not take",
                Kind::Counter,
                move || presence_failures.presence_failures.load(Relaxed),
            )
            .read("mirrored_messages", "Other regions' messages delivered in this region", Kind::Counter, move || {
                messages.messages.load(Relaxed)
            })
            .read(
                "mirrored_memberships",
                "Other regions' membership changes delivered in this region",
                Kind::Counter,
                move || memberships.memberships.load(Relaxed),
            )
            .read("mirrored_undecodable", "Mirrored records skipped as undecodable", Kind::Counter, move || {
                undecodable.undecodable.load(Relaxed)
            })
            .read("mirror_consume_failures", "Errors reading the mirrored topics", Kind::Counter, move || {
                failures.consume_failures.load(Relaxed)
            })
            .read(
                "mirrored_receipts",
                "Other regions' read receipts delivered in this region",
                Kind::Counter,
                move || receipts.receipts.load(Relaxed),
            )
            .read("mirrored_deposed", "Mirrored messages of a deposed home, dropped", Kind::Counter, move || {
                deposed.deposed.load(Relaxed)
            })
            .read(
                "mirror_position_failures",
                "Failures to record how far mirrored channels were delivered",
                Kind::Counter,
                move || positions.position_failures.load(Relaxed),
            )
            .read(
                "mirror_delay_ms",
                "Milliseconds from the home's append to delivery here, of the last mirrored message",
                Kind::Gauge,
                move || delay.last_delay_ms.load(Relaxed),
            )
            .register(&mut self.registry);
    }

    /// Adds the store writer's counters (`store_writer_*`) and its lag per partition
    /// (`store_writer_lag{partition}`, set by [`RouterMetrics::refresh_store_lag`]).
    pub fn store_writer(&mut self, stats: &Arc<StoreWriterStats>) {
        let read = |field: fn(&StoreWriterStats) -> &AtomicU64| {
            let stats = stats.clone();
            move || field(&stats).load(Ordering::Relaxed)
        };
        AtomicCounters::default()
            .read(
                "store_writer_messages",
                "Messages the store writer wrote to the store (replays included)",
                Kind::Counter,
                read(|stats| &stats.written),
            )
            .read("store_writer_batches", "Store writes that succeeded", Kind::Counter, read(|stats| &stats.batches))
            .read(
                "store_writer_store_failures",
                "Store writes that failed (each is retried)",
                Kind::Counter,
                read(|stats| &stats.store_failures),
            )
            .read(
                "store_writer_commit_failures",
                "Offset commits that failed (the batch is written again later; harmless)",
                Kind::Counter,
                read(|stats| &stats.commit_failures),
            )
            .read(
                "store_writer_deposed",
                "Messages ordered here after another region took their channel over: not stored, sent again",
                Kind::Counter,
                read(|stats| &stats.deposed),
            )
            .read(
                "store_writer_consumer_restarts",
                "Store writer consumers replaced after a fatal error (fenced after a broker outage)",
                Kind::Counter,
                read(|stats| &stats.consumer_restarts),
            )
            .read(
                "store_writer_consume_failures",
                "Errors while consuming the log",
                Kind::Counter,
                read(|stats| &stats.consume_failures),
            )
            .register(&mut self.registry);
        self.registry.register(
            "store_writer_lag",
            "Records of each log partition not yet in the store (high watermark minus the committed offset)",
            self.store_lag.clone(),
        );
    }

    /// Adds the Redis drivers' counters (`redis_*`).
    pub fn redis(&mut self, stats: &Arc<RedisStats>) {
        parley_bus::redis::register_metrics(&mut self.registry, stats);
    }

    /// Adds the push worker's counters (`push_*`).
    pub fn push(&mut self, report: &crate::push::PushReport) {
        report.register(&mut self.registry);
    }

    /// Sets the store writer's lag per partition.
    pub fn set_store_lag(&self, lags: &[(i32, u64)]) {
        for (partition, lag) in lags {
            self.store_lag
                .get_or_create(&vec![("partition", partition.to_string())])
                .set(i64::try_from(*lag).unwrap_or(i64::MAX));
        }
    }

    /// Reads the store writer group's lag (of the log `config` names) every `every` and sets it, until `stop`
    /// turns true. Each read is bounded by the configuration's request timeout.
    pub async fn refresh_store_lag(
        self: Arc<Self>,
        config: KafkaConfig,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            match partition_lags(&config).await {
                Ok(lags) => self.set_store_lag(&lags),
                Err(error) => debug!(%error, "cannot read the store writer's lag"),
            }
        }
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        parley_telemetry::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_built_once_and_read_at_each_scrape() {
        let stats = Arc::new(RouterStats::default());
        let mut metrics = RouterMetrics::new(&stats);
        let kafka = Arc::new(KafkaLogStats::default());
        metrics.kafka_log(&kafka);
        metrics.store_writer(&Arc::new(StoreWriterStats::default()));
        let redis = Arc::new(RedisStats::default());
        metrics.redis(&redis);
        stats.messages.fetch_add(3, Ordering::Relaxed);
        stats.send_durable_seconds.observe(0.004);
        kafka.producer_errors.fetch_add(2, Ordering::Relaxed);
        redis.connection_losses.fetch_add(1, Ordering::Relaxed);
        metrics.set_store_lag(&[(0, 5), (1, 0)]);
        metrics.machine_id(Some(&crate::machine_lease::MachineIdLease::default()), 0);
        let text = metrics.encode();
        for expected in [
            "parley_router_messages_total 3",
            "parley_router_send_durable_seconds_count 1",
            "parley_router_durable_published_seconds_count 0",
            "parley_router_kafka_producer_errors_total 2",
            "parley_router_redis_connection_losses_total 1",
            "parley_router_store_writer_lag{partition=\"0\"} 5",
            "parley_router_store_writer_lag{partition=\"1\"} 0",
            "parley_router_publish_queue_jobs 0",
            "parley_router_machine_id 0",
            "parley_router_machine_lease_lost_total 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
        stats.messages.fetch_add(1, Ordering::Relaxed);
        assert!(metrics.encode().contains("parley_router_messages_total 4"));
    }
}
