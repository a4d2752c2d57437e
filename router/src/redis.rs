//! Redis drivers: pub/sub for delivery ([`RedisPubSub`]) and the fenced presence book with the user→gateway
//! registry ([`RedisPresenceStore`]), behind the same traits as the embedded drivers.
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
//!
//! The presence scripts address keys they compute from the prefix, so they need a standalone Redis (or one
//! Redis Cluster shard per prefix), not a cluster that spreads one prefix's keys over shards.

mod presence;
mod pubsub;

pub use presence::RedisPresenceStore;
pub use pubsub::RedisPubSub;

use crate::error::BackendError;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::RedisResult;
use std::future::Future;
use std::time::Duration;

/// Where Redis is and how to talk to it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` (TLS is not built in).
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
        }
    }

    /// The same configuration with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn client(&self) -> Result<::redis::Client, BackendError> {
        ::redis::Client::open(self.url.as_str())
            .map_err(|source| BackendError::Redis { operation: "open", source: Box::new(source) })
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
        call(self.timeout, "connect", client.get_connection_manager_with_config(manager_config)).await
    }
}

/// Runs a Redis call under a timeout, mapping its failure to a [`BackendError`].
async fn call<T>(
    timeout: Duration,
    operation: &'static str,
    future: impl Future<Output = RedisResult<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(BackendError::Redis { operation, source: Box::new(source) }),
        Err(_) => {
            Err(BackendError::Unavailable(format!("redis {operation} timed out after {} ms", timeout.as_millis())))
        }
    }
}
