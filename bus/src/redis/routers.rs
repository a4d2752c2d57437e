//! [`RedisRouterDirectory`]: the map of which router owns which partition ([`parley_api::routing`]), in one Redis
//! hash, `<prefix>routers`: router URL → its [`RouterEntry`] as JSON. A router writes its own field (`HSET`) when
//! its partitions change and every second; a gateway reads the whole hash (`HGETALL`). Readers ignore entries that
//! stopped being refreshed; a publisher also drops entries older than a minute, so routers that went away leave
//! nothing behind. The key is a single key, so on Redis Cluster it lives on the shard of its slot.

use super::{call, Connection, RedisConfig, RedisStats};
use async_trait::async_trait;
use parley_api::routing::{RouterDirectory, RouterEntry};
use parley_api::BackendError;
use std::sync::Arc;
use std::time::Duration;

/// Entries not refreshed for this long are deleted by the next publisher.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The routers' ownership map in Redis.
pub struct RedisRouterDirectory {
    connection: Connection,
    key: String,
    timeout: Duration,
    stats: Arc<RedisStats>,
}

impl std::fmt::Debug for RedisRouterDirectory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedisRouterDirectory").field("key", &self.key).finish_non_exhaustive()
    }
}

impl RedisRouterDirectory {
    /// Connects; fails if Redis cannot be reached within the timeout, or refuses the TLS handshake or the
    /// credentials. The map lives in `<prefix>routers`.
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.check().await?;
        let connection = config.connection().await?;
        Ok(Self {
            connection,
            key: format!("{}routers", config.prefix),
            timeout: config.timeout,
            stats: config.stats.clone(),
        })
    }

    async fn read(&self) -> Result<Vec<(String, String)>, BackendError> {
        let mut connection = self.connection.clone();
        let mut command = ::redis::cmd("HGETALL");
        command.arg(self.key.as_str());
        call(self.timeout, &self.stats, "read routers", command.query_async(&mut connection)).await
    }
}

#[async_trait]
impl RouterDirectory for RedisRouterDirectory {
    async fn publish(&self, entry: &RouterEntry) -> Result<(), BackendError> {
        let json = serde_json::to_string(entry).map_err(BackendError::Encode)?;
        let forget_ms = u64::try_from(FORGET_AFTER.as_millis()).unwrap_or(u64::MAX);
        let forgotten: Vec<String> = self
            .read()
            .await?
            .into_iter()
            .filter(|(url, value)| {
                url != &entry.url
                    && serde_json::from_str::<RouterEntry>(value)
                        .map(|old| entry.at_ms.saturating_sub(old.at_ms) > forget_ms)
                        .unwrap_or(true)
            })
            .map(|(url, _)| url)
            .collect();
        let mut connection = self.connection.clone();
        let mut pipeline = ::redis::pipe();
        pipeline.cmd("HSET").arg(self.key.as_str()).arg(entry.url.as_str()).arg(json).ignore();
        if !forgotten.is_empty() {
            pipeline.cmd("HDEL").arg(self.key.as_str()).arg(forgotten).ignore();
        }
        call(self.timeout, &self.stats, "publish router", pipeline.query_async::<()>(&mut connection)).await
    }

    async fn withdraw(&self, url: &str) -> Result<(), BackendError> {
        let mut connection = self.connection.clone();
        let mut command = ::redis::cmd("HDEL");
        command.arg(self.key.as_str()).arg(url);
        call(self.timeout, &self.stats, "withdraw router", command.query_async::<()>(&mut connection)).await
    }

    async fn entries(&self) -> Result<Vec<RouterEntry>, BackendError> {
        Ok(self.read().await?.into_iter().filter_map(|(_, value)| serde_json::from_str(&value).ok()).collect())
    }
}
