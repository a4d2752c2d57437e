//! What the workspace's tests share, so that no test file carries its own copy. The tests and the e2e tools
//! (`parley-chaos`) use it; no product binary links it.
//!
//! - [`engines`]: whether a test that needs a real engine (Redis, Kafka, Cassandra, Kubernetes) runs, is skipped
//!   with one clear line (plain `cargo test`), or fails (the full test command, which sets
//!   `PARLEY_REQUIRE_ENGINES=1`).
//! - [`process`]: child processes (`parley`, `parley-router`, `parley-operator`) started on port 0, with the
//!   addresses they bound read back from their start-up line (no probe-and-release race).
//! - [`metrics`]: scraping a Prometheus `/metrics` page and reading one sample.
//! - [`tokens`]: HS256 client tokens as the gateway verifies them.
//! - [`wait`]: waiting on a condition with a deadline instead of sleeping.
//! - [`http`]: one plain HTTP/1.1 request (admin endpoints, long-poll, device registration).
//! - `server` (feature `server`): the `parley` server in the test's own process, stopped gracefully, and tokens it
//!   accepts; the integration tests of `parley-server` and `parley-client` start it.
//! - `redis` (feature `redis`): the test environment's Redis (URL, ACL user, password, TLS CA file) as a
//!   `RedisConfig`, as the binaries read it.
//! - [`engine_suite!`]: one behaviour suite run once per driver (embedded, Redis, Cassandra, ...).
//! - `router` (feature `router`): the router's `KafkaConfig` and `CassandraConfig` from the test environment, with
//!   the TLS and credentials `e2e/stack/up.sh` sets up.
//! - [`figures`]: figure lines that the test command prints in its summary.
//! - [`unique`]: names no other test (or earlier run) uses: key prefixes, topics, keyspaces.
//! - [`wire`]: a raw WebSocket client over TCP, for tests of the wire itself (close codes, a client that stops
//!   reading).

#[cfg(feature = "apns")]
pub mod apns;
pub mod engines;
pub mod figures;
pub mod http;
pub mod metrics;
pub mod process;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "router")]
pub mod router;
#[cfg(feature = "server")]
pub mod server;
mod suite;
pub mod tokens;
pub mod wait;
pub mod wire;

pub use engines::{engine, Engine};
pub use figures::report;
pub use metrics::{metric, scrape, Scrape};
pub use process::{binary, Spawned};
#[cfg(feature = "redis")]
pub use redis::redis_config;
#[cfg(feature = "router")]
pub use router::{cassandra_config, kafka_config};
pub use tokens::{hs256_token, hs256_token_with};
pub use wait::eventually;

/// A name no other test of this run, nor of an earlier run, uses: `{prefix}{pid}-{nanos}-{n}`, made of ASCII
/// letters, digits and `-`, so it fits Redis key prefixes and Kafka topic names (Cassandra keyspaces take `_`:
/// replace the dashes).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_their_prefix() {
        let (first, second) = (unique("p-"), unique("p-"));
        assert_ne!(first, second);
        assert!(first.starts_with("p-"));
        assert!(first.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{first}");
    }
}
