//! Prometheus metrics of a `parley` process, prefixed `parley_`: the gateway's own (`parley_gateway_*`), and
//! whatever the process registers beside them when it starts ([`Metrics::with`]): the router's (an in-process
//! writer's, or a remote handle's transport failures: `parley_router_*`), the Redis drivers' and push's. One
//! registry, built once (`parley_telemetry::metrics`).

use parley_core::protocol::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Labels = Vec<(&'static str, &'static str)>;

/// Which limit was hit.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// A frame above `max_frame_bytes`.
    FrameSize,
    /// Send rate.
    Rate,
    /// Outbound queue overflow, in frames or bytes (slow consumer).
    OutboundQueue,
    /// A socket write that did not complete within the write timeout (slow consumer).
    WriteTimeout,
    /// Connection cap.
    Connections,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::FrameSize => "frame_size",
            Limit::Rate => "send_rate",
            Limit::OutboundQueue => "outbound_queue",
            Limit::WriteTimeout => "write_timeout",
            Limit::Connections => "connections",
        }
    }
}

/// All gateway metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open connections.
    pub connections: Gauge,
    /// Connections accepted since start.
    pub connections_total: Counter,
    /// Frames received from clients.
    pub frames_in: Counter,
    /// Frames queued to clients by fan-out.
    pub deliveries: Counter,
    /// Error frames sent, by code.
    pub errors: Family<Labels, Counter>,
    /// Limits hit, by limit.
    pub limits: Family<Labels, Counter>,
    /// Send latency from frame received to durable confirmation, in seconds.
    pub send_seconds: Histogram,
    /// From a message's sequencing (its id's timestamp) to its frame being queued to this instance's local
    /// members, in seconds: the fan-out part of delivery latency.
    pub fanout_seconds: Histogram,
    /// Publications received from pub/sub.
    pub publications: Counter,
    /// Messages retransmitted for lack of an ACK.
    pub retransmits: Counter,
    /// Gaps noticed in a connection's stream and filled from storage.
    pub gaps_filled: Counter,
    /// 1 while the instance drains.
    pub draining: Gauge,
    /// Resume (`sync`) requests, by outcome.
    pub resumes: Family<Labels, Counter>,
    /// Reads of large channels' feeds (fan-out on read), one per instance however many members it holds.
    pub feed_reads: Counter,
    /// Messages read from large channels' feeds.
    pub feed_messages: Counter,
    /// Feed reads that failed (retried with a backoff).
    pub feed_failures: Counter,
    /// History reads answered from this instance's cache of large channels' feeds.
    pub feed_cache_hits: Counter,
    /// Presence changes recorded in the log through the router (the presence journal).
    pub presence_journal_records: Counter,
    /// Presence journal batches the router could not take (sent again after a backoff).
    pub presence_journal_failures: Counter,
    /// Presence changes dropped by the journal (queue full while the router was away, or refused).
    pub presence_journal_dropped: Counter,
    /// Presence changes not published to the watchers (the queue to the bus was full).
    pub presence_dropped: Counter,
}

impl Metrics {
    /// Registers every gateway metric.
    pub fn new() -> Arc<Self> {
        Self::with(|_| {})
    }

    /// Registers every gateway metric, then lets `extra` register what else the process exports (under the
    /// `parley` prefix: use a sub-registry for `parley_router_*` and the like).
    pub fn with(extra: impl FnOnce(&mut Registry)) -> Arc<Self> {
        let mut registry = Registry::with_prefix("parley");
        let connections = Gauge::default();
        let connections_total = Counter::default();
        let frames_in = Counter::default();
        let deliveries = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let limits = Family::<Labels, Counter>::default();
        let send_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let fanout_seconds = parley_telemetry::metrics::latency_histogram();
        let publications = Counter::default();
        let retransmits = Counter::default();
        let gaps_filled = Counter::default();
        let draining = Gauge::default();
        let resumes = Family::<Labels, Counter>::default();
        let feed_reads = Counter::default();
        let feed_messages = Counter::default();
        let feed_failures = Counter::default();
        let feed_cache_hits = Counter::default();
        let presence_journal_records = Counter::default();
        let presence_journal_failures = Counter::default();
        let presence_journal_dropped = Counter::default();
        let presence_dropped = Counter::default();
        registry.register(
            "gateway_presence_dropped",
            "Presence changes not published to watchers (the queue to the bus was full)",
            presence_dropped.clone(),
        );
        registry.register(
            "gateway_presence_journal_records",
            "Presence changes recorded in the log through the router",
            presence_journal_records.clone(),
        );
        registry.register(
            "gateway_presence_journal_failures",
            "Presence journal batches the router could not take (sent again)",
            presence_journal_failures.clone(),
        );
        registry.register(
            "gateway_presence_journal_dropped",
            "Presence changes the journal dropped (queue full, or refused)",
            presence_journal_dropped.clone(),
        );
        registry.register("gateway_feed_reads", "Reads of large channels' feeds (fan-out on read)", feed_reads.clone());
        registry.register("gateway_feed_messages", "Messages read from large channels' feeds", feed_messages.clone());
        registry.register("gateway_feed_failures", "Feed reads that failed and were retried", feed_failures.clone());
        registry.register(
            "gateway_feed_cache_hits",
            "History reads answered from the cache of large channels' feeds",
            feed_cache_hits.clone(),
        );
        registry.register("gateway_draining", "1 while the instance drains", draining.clone());
        registry.register("gateway_resumes", "Resume requests, by outcome", resumes.clone());
        registry.register("gateway_retransmits", "Messages retransmitted for lack of an ACK", retransmits.clone());
        registry.register("gateway_gaps_filled", "Stream gaps filled from storage", gaps_filled.clone());
        registry.register("gateway_connections", "Open client connections", connections.clone());
        registry.register("gateway_connections_accepted", "Client connections accepted", connections_total.clone());
        registry.register("gateway_frames_received", "Frames received from clients", frames_in.clone());
        registry.register("gateway_deliveries", "Frames queued to clients by fan-out", deliveries.clone());
        registry.register("gateway_error_frames", "Error frames sent, by code", errors.clone());
        registry.register("gateway_limit_hits", "Limits hit, by limit", limits.clone());
        registry.register("gateway_send_duration_seconds", "Send to durable confirmation", send_seconds.clone());
        registry.register("gateway_publications", "Publications received from pub/sub", publications.clone());
        registry.register(
            "gateway_fanout_seconds",
            "From a message's sequencing to its frame being queued to this instance's local members",
            fanout_seconds.clone(),
        );
        extra(&mut registry);
        Arc::new(Self {
            registry,
            connections,
            connections_total,
            frames_in,
            deliveries,
            errors,
            limits,
            send_seconds,
            fanout_seconds,
            publications,
            retransmits,
            gaps_filled,
            draining,
            resumes,
            feed_reads,
            feed_messages,
            feed_failures,
            feed_cache_hits,
            presence_journal_records,
            presence_journal_failures,
            presence_journal_dropped,
            presence_dropped,
        })
    }

    /// Counts an error frame.
    pub fn error(&self, code: ErrorCode) {
        self.errors.get_or_create(&vec![("code", code.as_str())]).inc();
    }

    /// Counts a limit hit.
    pub fn limit(&self, limit: Limit) {
        self.limits.get_or_create(&vec![("limit", limit.label())]).inc();
    }

    /// Observes the fan-out latency of a message sequenced at `sequenced_ms` (Unix ms; 0 when unknown, then
    /// nothing is observed). A clock behind the writer's counts as no delay.
    pub fn observe_fanout(&self, sequenced_ms: u64) {
        if sequenced_ms == 0 {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        self.fanout_seconds.observe(now.saturating_sub(sequenced_ms) as f64 / 1000.0);
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        parley_telemetry::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let metrics = Metrics::with(|registry| {
            parley_telemetry::metrics::AtomicCounters::default()
                .counter("messages", "Messages made durable", Arc::new(7.into()))
                .register(registry.sub_registry_with_prefix("router"));
        });
        metrics.connections.inc();
        metrics.error(ErrorCode::NotAMember);
        metrics.limit(Limit::FrameSize);
        metrics.observe_fanout(1);
        metrics.observe_fanout(0);
        let text = metrics.encode();
        assert!(text.contains("parley_gateway_connections 1"), "{text}");
        assert!(text.contains(r#"parley_gateway_error_frames_total{code="not_a_member"} 1"#), "{text}");
        assert!(text.contains(r#"parley_gateway_limit_hits_total{limit="frame_size"} 1"#), "{text}");
        assert!(text.contains("parley_router_messages_total 7"), "{text}");
        assert!(text.contains("parley_gateway_fanout_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
