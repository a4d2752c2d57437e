//! Redis drivers: pub/sub for delivery ([`RedisPubSub`]), the fenced presence book with the user→gateway
//! registry ([`RedisPresenceStore`]) and token revocations ([`RedisRevocationStore`]), behind the same traits as the
//! embedded drivers.
//!
//! - Commands (`PUBLISH`, presence scripts and reads) go over one multiplexed connection that reconnects by
//!   itself (`redis::aio::ConnectionManager`). A call made while Redis is away fails with a [`BackendError`];
//!   the next one after it returns succeeds.
//! - Each subscriber has its own pub/sub connection, owned by a task that re-connects with exponential backoff
//!   and re-subscribes every topic the subscription holds, so a subscriber never stays deaf after a restart.
//!   Publications sent while the connection is down are lost (Redis pub/sub is at most once); clients fill
//!   such gaps from history, as after any other loss.
//! - Every key and channel starts with a configurable prefix (`parley:` by default), so several deployments or
//!   test runs can share one Redis.
//! - Every call has a timeout; a timeout is reported as [`BackendError::Unavailable`], and a Redis error as
//!   [`BackendError::Redis`].
//! - [`RedisStats`], shared by every driver made from one [`RedisConfig`], counts lost connections (each makes
//!   the connection re-connect) and subscriber re-connections, for the binaries' metrics.
//!
//! - **Redis Cluster**: give several seed nodes, comma-separated (`redis://a:7000,redis://b:7001`). Commands then
//!   go through a cluster connection that follows the slot map (`MOVED`/`ASK`, re-discovery). The presence
//!   scripts change many users' keys atomically, so a deployment's presence keys carry one hash tag
//!   (`{<prefix>presence}:`) and live on one shard. Pub/sub channels are cluster-wide (a `PUBLISH` on any node
//!   reaches subscribers on every node); publishers and subscribers use the first seed node, so that one node
//!   orders every channel's publications the way one Redis does.

mod presence;
mod pubsub;
mod revocation;

pub use presence::RedisPresenceStore;
pub use pubsub::RedisPubSub;
pub use revocation::RedisRevocationStore;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use parley_api::BackendError;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Where Redis is and how to talk to it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` (TLS is not built in), or several Redis Cluster seed nodes, comma-separated.
    pub url: String,
    /// Prefix of every key and channel, e.g. `parley:`.
    pub prefix: String,
    /// Upper bound of every call, connection set-up included.
    pub timeout: Duration,
    /// First delay before re-connecting a lost connection; doubled after every failed attempt.
    pub reconnect_min: Duration,
    /// Longest delay between re-connection attempts.
    pub reconnect_max: Duration,
    /// How often a subscriber's idle connection is checked with `PING`.
    pub health_check: Duration,
    /// Where the drivers made from this configuration (and its clones) count connection trouble.
    pub stats: Arc<RedisStats>,
}

/// Registers `stats` in `registry` as `redis_connection_losses` and `redis_subscriber_reconnects` (counters,
/// read at each scrape).
pub fn register_metrics(registry: &mut prometheus_client::registry::Registry, stats: &Arc<RedisStats>) {
    use parley_telemetry::metrics::{AtomicCounters, Kind};
    let (losses, reconnects) = (stats.clone(), stats.clone());
    AtomicCounters::default()
        .read(
            "redis_connection_losses",
            "Redis calls that found their connection dropped or refused (it re-connects after each)",
            Kind::Counter,
            move || losses.connection_losses.load(std::sync::atomic::Ordering::Relaxed),
        )
        .read(
            "redis_subscriber_reconnects",
            "Times a Redis subscriber re-connected and re-subscribed",
            Kind::Counter,
            move || reconnects.subscriber_reconnects.load(std::sync::atomic::Ordering::Relaxed),
        )
        .register(registry);
}

/// What the Redis drivers count; export it with the binary's metrics ([`register_metrics`]).
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Calls that found their connection dropped or refused (the command connection re-connects after each).
    pub connection_losses: AtomicU64,
    /// Times a subscriber re-connected and re-subscribed after losing its connection.
    pub subscriber_reconnects: AtomicU64,
}

impl RedisConfig {
    /// Defaults for `url`: prefix `parley:`, 2 s timeout, re-connection after 50 ms up to 2 s, health check
    /// every 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "parley:".to_owned(),
            timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            health_check: Duration::from_secs(5),
            stats: Arc::default(),
        }
    }

    /// The same configuration with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The node URLs given: one for a standalone Redis, several for Redis Cluster seed nodes.
    pub fn nodes(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|node| !node.is_empty()).collect()
    }

    /// Whether the URL names Redis Cluster seed nodes (more than one node).
    pub fn is_cluster(&self) -> bool {
        self.nodes().len() > 1
    }

    /// The prefix of keys a script must reach together: in a cluster, under one hash tag (one slot).
    fn tagged(&self, name: &str) -> String {
        if self.is_cluster() {
            format!("{{{}{name}}}:", self.prefix)
        } else {
            format!("{}{name}:", self.prefix)
        }
    }

    /// A client of the first node (pub/sub, and every command of a standalone Redis).
    fn client(&self) -> Result<::redis::Client, BackendError> {
        let node = self.nodes().first().copied().unwrap_or(self.url.as_str());
        ::redis::Client::open(node)
            .map_err(|source| BackendError::Redis { operation: "open", source: Box::new(source) })
    }

    /// The command connection: a re-connecting multiplexed connection, or a cluster connection.
    async fn connection(&self) -> Result<Connection, BackendError> {
        if !self.is_cluster() {
            return Ok(Connection::Single(self.connection_manager().await?));
        }
        let client = ClusterClient::builder(self.nodes())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(3)
            .build()
            .map_err(|source| BackendError::Redis { operation: "open", source: Box::new(source) })?;
        let connection = call(self.timeout, &self.stats, "connect", client.get_async_connection()).await?;
        Ok(Connection::Cluster(connection))
    }

    /// A multiplexed connection that re-connects by itself after an error.
    async fn connection_manager(&self) -> Result<ConnectionManager, BackendError> {
        let client = self.client()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_min_delay(self.reconnect_min)
            .set_max_delay(self.reconnect_max)
            .set_number_of_retries(3);
        call(self.timeout, &self.stats, "connect", client.get_connection_manager_with_config(manager_config)).await
    }
}

/// A command connection to a standalone Redis or to a Redis Cluster.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Runs a Redis call under a timeout, mapping its failure to a [`BackendError`]; a lost connection is counted.
async fn call<T>(
    timeout: Duration,
    stats: &RedisStats,
    operation: &'static str,
    future: impl Future<Output = RedisResult<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => {
            if source.is_connection_dropped() || source.is_connection_refusal() || source.is_io_error() {
                stats.connection_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(BackendError::Redis { operation, source: Box::new(source) })
        }
        Err(_) => {
            Err(BackendError::Unavailable(format!("redis {operation} timed out after {} ms", timeout.as_millis())))
        }
    }
}
