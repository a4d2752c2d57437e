//! The metrics convention every Parley binary follows: one `prometheus-client` [`Registry`] per process, built
//! once at start-up with the binary's prefix (`parley_gateway_…`, `parley_router_…`, `parley_operator_…`) and
//! served as OpenMetrics text on the admin port (`/metrics`). Components keep their counters as plain atomics
//! (cheap on hot paths) and export them through an [`AtomicCounters`] collector read at scrape time; latencies are
//! [`latency_histogram`]s.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram of durations in seconds, from 250 µs to about 16 s (doubling buckets): wide enough for a
/// loopback round trip and for an engine outage.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// Whether an exported value only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows; exported as `<name>_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One value read at scrape time.
struct Entry {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// A collector of values kept elsewhere (atomics, or anything that can be read cheaply), registered once and
/// read on every scrape.
#[derive(Default)]
pub struct AtomicCounters {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for AtomicCounters {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_list().entries(self.entries.iter().map(|entry| entry.name)).finish()
    }
}

impl AtomicCounters {
    /// A counter read from `value`.
    pub fn counter(mut self, name: &'static str, help: &'static str, value: Arc<AtomicU64>) -> Self {
        self.entries.push(Entry {
            name,
            help,
            kind: Kind::Counter,
            read: Box::new(move || value.load(Ordering::Relaxed)),
        });
        self
    }

    /// A value computed by `read` (for fields of a shared stats struct), exported as `kind`.
    pub fn read(
        mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.entries.push(Entry { name, help, kind, read: Box::new(read) });
        self
    }

    /// Registers the collector in `registry`.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl Collector for AtomicCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for entry in &self.entries {
            let value = (entry.read)();
            match entry.kind {
                Kind::Counter => {
                    let counter = ConstCounter::new(value);
                    let metric = encoder.encode_descriptor(entry.name, entry.help, None, counter.metric_type())?;
                    counter.encode(metric)?;
                }
                Kind::Gauge => {
                    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                    let metric = encoder.encode_descriptor(entry.name, entry.help, None, gauge.metric_type())?;
                    gauge.encode(metric)?;
                }
            }
        }
        Ok(())
    }
}

/// The registry as OpenMetrics text (what `/metrics` answers).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return String::from("# encoding failed\n# EOF\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_values_are_read_at_every_scrape_under_the_registry_prefix() {
        let sent = Arc::new(AtomicU64::new(3));
        let queued = Arc::new(AtomicU64::new(9));
        let mut registry = Registry::with_prefix("parley_test");
        let seconds = latency_histogram();
        registry.register("send_seconds", "Send latency", seconds.clone());
        let read = queued.clone();
        AtomicCounters::default()
            .counter("sent", "Messages sent", sent.clone())
            .read("queued", "Jobs queued", Kind::Gauge, move || read.load(Ordering::Relaxed))
            .register(registry.sub_registry_with_prefix("inner"));
        seconds.observe(0.002);
        let first = encode(&registry);
        assert!(first.contains("parley_test_inner_sent_total 3"), "{first}");
        assert!(first.contains("parley_test_inner_queued 9"), "{first}");
        assert!(first.contains("parley_test_send_seconds_count 1"), "{first}");
        assert!(first.ends_with("# EOF\n"), "{first}");
        sent.fetch_add(2, Ordering::Relaxed);
        assert!(encode(&registry).contains("parley_test_inner_sent_total 5"));
    }
}
