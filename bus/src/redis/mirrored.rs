//! [`RedisMirrorPositions`]: [`MirrorPositions`] in Redis, one key per source region and channel,
//! `<prefix>mirrored:<source>:<channel>`, raised (never lowered) by a script and kept a day after its last change.

use super::{call, Connection, RedisConfig, RedisStats};
use crate::mirrored::MirrorPositions;
use async_trait::async_trait;
use parley_api::BackendError;
use std::sync::Arc;
use std::time::Duration;

/// How long a position is kept after its last change.
const KEEP: Duration = Duration::from_secs(24 * 3600);

/// Sets each key to the larger of its value and the argument, and refreshes its expiry.
const RAISE: &str = r"
for i, key in ipairs(KEYS) do
  local seq = tonumber(ARGV[i + 1])
  local current = tonumber(redis.call('GET', key) or '0')
  if seq > current then redis.call('SET', key, seq, 'EX', ARGV[1]) else redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
";

/// Mirrored positions in Redis.
pub struct RedisMirrorPositions {
    connection: Connection,
    prefix: String,
    timeout: Duration,
    stats: Arc<RedisStats>,
}

impl std::fmt::Debug for RedisMirrorPositions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedisMirrorPositions").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl RedisMirrorPositions {
    /// Connects; fails if Redis cannot be reached within the timeout, or refuses the TLS handshake or the
    /// credentials.
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.check().await?;
        let connection = config.connection().await?;
        Ok(Self {
            connection,
            prefix: format!("{}mirrored:", config.prefix),
            timeout: config.timeout,
            stats: config.stats.clone(),
        })
    }

    fn key(&self, source: &str, channel: &str) -> String {
        format!("{}{source}:{channel}", self.prefix)
    }
}

#[async_trait]
impl MirrorPositions for RedisMirrorPositions {
    async fn record(&self, source: &str, positions: Vec<(String, u64)>) -> Result<(), BackendError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        // One script call per key (on Redis Cluster the keys of one call must share a slot), pipelined. `EVAL`, not
        // `EVALSHA`: a pipeline cannot load a script that the server does not have yet.
        let mut pipeline = ::redis::pipe();
        for (channel, seq) in &positions {
            pipeline
                .cmd("EVAL")
                .arg(RAISE)
                .arg(1)
                .arg(self.key(source, channel))
                .arg(KEEP.as_secs())
                .arg(*seq)
                .ignore();
        }
        call(self.timeout, &self.stats, "record mirrored positions", pipeline.query_async::<()>(&mut connection)).await
    }

    async fn position(&self, source: &str, channel: &str) -> Result<u64, BackendError> {
        let mut connection = self.connection.clone();
        let mut command = ::redis::cmd("GET");
        command.arg(self.key(source, channel));
        let value: Option<u64> =
            call(self.timeout, &self.stats, "read mirrored position", command.query_async(&mut connection)).await?;
        Ok(value.unwrap_or(0))
    }
}
