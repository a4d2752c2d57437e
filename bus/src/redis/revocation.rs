//! [`RedisRevocationStore`]: token revocations in one Redis hash, `<prefix>revoked`: user → Unix seconds (tokens of
//! the user issued before then are revoked).
//!
//! A revocation is one Lua script, so keeping the later of two times is atomic: it also drops the entries whose
//! time is more than the TTL ago (no token issued before them can still be valid) and sets the hash to expire with
//! its newest entry, so the hash holds only the revocations of the last TTL and disappears when none is left. A
//! read is one `HGET`; an entry past its TTL counts as absent. The key is a single key, so on Redis Cluster it
//! lives on the shard of its slot and needs no hash tag.

use super::{call, Connection, RedisConfig, RedisStats};
use crate::revocation::{expired, unix_secs, RevocationStore};
use ::redis::Script;
use async_trait::async_trait;
use parley_api::BackendError;
use std::sync::Arc;
use std::time::Duration;

/// `KEYS[1]` the hash; `ARGV`: user, before, now, ttl (seconds). Answers the time in force for the user.
const REVOKE: &str = r#"
local key = KEYS[1]
local user = ARGV[1]
local before = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local current = tonumber(redis.call('HGET', key, user) or '0') or 0
if current + ttl <= now then current = 0 end
if before > current then
  redis.call('HSET', key, user, ARGV[2])
else
  before = current
end
local newest = 0
local entries = redis.call('HGETALL', key)
for i = 1, #entries, 2 do
  local at = tonumber(entries[i + 1]) or 0
  if at + ttl <= now then
    redis.call('HDEL', key, entries[i])
  elseif at > newest then
    newest = at
  end
end
if newest > 0 then redis.call('EXPIREAT', key, newest + ttl) end
return tostring(before)
"#;

/// The revocations of every user, in Redis.
pub struct RedisRevocationStore {
    connection: Connection,
    key: String,
    ttl: Duration,
    timeout: Duration,
    stats: Arc<RedisStats>,
    revoke: Script,
}

impl std::fmt::Debug for RedisRevocationStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedisRevocationStore").field("key", &self.key).field("ttl", &self.ttl).finish()
    }
}

impl RedisRevocationStore {
    /// Connects; fails if Redis cannot be reached within the timeout, or refuses the TLS handshake or the
    /// credentials ([`RedisConfig::check`]). Entries live in `<prefix>revoked` and are dropped `ttl` after their time
    /// (at least a second).
    pub async fn connect(config: RedisConfig, ttl: Duration) -> Result<Self, BackendError> {
        config.check().await?;
        let connection = config.connection().await?;
        Ok(Self {
            connection,
            key: format!("{}revoked", config.prefix),
            ttl: ttl.max(Duration::from_secs(1)),
            timeout: config.timeout,
            stats: config.stats.clone(),
            revoke: Script::new(REVOKE),
        })
    }
}

#[async_trait]
impl RevocationStore for RedisRevocationStore {
    async fn revoke(&self, user: &str, before: u64) -> Result<u64, BackendError> {
        let mut connection = self.connection.clone();
        let mut invocation = self.revoke.key(self.key.as_str());
        invocation.arg(user).arg(before).arg(unix_secs()).arg(self.ttl.as_secs());
        let in_force: String =
            call(self.timeout, &self.stats, "revoke", invocation.invoke_async(&mut connection)).await?;
        in_force
            .parse()
            .map_err(|_| BackendError::Unavailable(format!("unexpected reply to redis revoke: {in_force:?}")))
    }

    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, BackendError> {
        let mut connection = self.connection.clone();
        let mut command = ::redis::cmd("HGET");
        command.arg(self.key.as_str()).arg(user);
        let before: Option<u64> =
            call(self.timeout, &self.stats, "read revocation", command.query_async(&mut connection)).await?;
        let now = unix_secs();
        Ok(before.filter(|before| !expired(*before, self.ttl, now)))
    }
}
