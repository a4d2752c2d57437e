//! [`RedisPresenceStore`]: the fenced presence book kept in Redis, with the same rules as
//! [`parley_core::presence::PresenceBook`].
//!
//! Keys, under `<prefix>presence:` (`{<prefix>presence}:` on Redis Cluster: one hash tag, so every script's keys
//! share a slot; each script is sent with one key under it, so a cluster routes it to that slot's shard):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `i:<instance>:epoch` | string | the instance's last epoch (`INCR` on register; never expires) |
//! | `i:<instance>:lease` | string, `PX` expiry | the epoch that holds the lease; gone once the lease lapsed |
//! | `i:<instance>:<epoch>:users` | set | users with a connection on that epoch (what `expire` must clean) |
//! | `instances` | hash | instance → its registered epoch whose entries are not cleaned yet |
//! | `u:<user>` | hash | `c:<instance>:<epoch>` → connection count, `n` = number of such fields, `away`, `seen` (ms) |
//! | `r:<user>` | hash | region → `<status>:<seen>`: what another region last said of the user (its mirrored feed) |
//! | `g:<region>` | set | users another region spoke of (what forgetting that region must clean) |
//!
//! Every write is one Lua script, so the fencing check (the lease key holds the writer's epoch) and the write are
//! atomic: a write from an older epoch or after the lease lapsed is refused, and no entry of a dead or replaced
//! epoch can be added after it was cleaned. Times come from the Redis server (`TIME`, `PX`), one clock for all
//! instances. Reads of many users are pipelined in batches.

use super::{call, Connection, RedisConfig, RedisStats};
use crate::presence::{PresenceError, PresenceStore, Registration};
use ::redis::{Script, Value};
use async_trait::async_trait;
use parley_api::BackendError;
use parley_core::presence::{merge, Fenced, PresenceView, RemoteState, Status};
use std::sync::Arc;
use std::time::Duration;

/// Helpers shared by the scripts. `ARGV[1]` is always the key prefix.
const PRELUDE: &str = r#"
local prefix = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function user_key(user) return prefix .. 'u:' .. user end
local function users_key(instance, epoch) return prefix .. 'i:' .. instance .. ':' .. epoch .. ':users' end
local function lease_key(instance) return prefix .. 'i:' .. instance .. ':lease' end
local function epoch_key(instance) return prefix .. 'i:' .. instance .. ':epoch' end
-- 0 offline, 1 online, 2 away
local function status(key)
  local values = redis.call('HMGET', key, 'n', 'away')
  local n = tonumber(values[1] or '0') or 0
  if n <= 0 then return 0 end
  if values[2] == '1' then return 2 end
  return 1
end
local function seen(key) return tonumber(redis.call('HGET', key, 'seen') or '0') or 0 end
-- nil when (instance, epoch) holds the lease; the refusal reply otherwise
local function check(instance, epoch)
  if redis.call('GET', lease_key(instance)) == epoch then return nil end
  return {'fenced', redis.call('GET', epoch_key(instance)) or '0'}
end
local function view_reply(key, before)
  local after = status(key)
  if after == before then return {'same'} end
  return {'changed', after, seen(key)}
end
-- drops every entry of (instance, epoch); appends user, status, seen of each user whose status changed
local function drop_entries(instance, epoch, now, changes)
  local set = users_key(instance, epoch)
  local field = 'c:' .. instance .. ':' .. epoch
  for _, user in ipairs(redis.call('SMEMBERS', set)) do
    local key = user_key(user)
    local before = status(key)
    if redis.call('HDEL', key, field) == 1 then
      local n = redis.call('HINCRBY', key, 'n', -1)
      if seen(key) < now then redis.call('HSET', key, 'seen', now) end
      if n <= 0 then redis.call('HSET', key, 'away', '0') end
    end
    local after = status(key)
    if after ~= before then
      table.insert(changes, user)
      table.insert(changes, after)
      table.insert(changes, seen(key))
    end
  end
  redis.call('DEL', set)
end
"#;

/// ARGV: prefix, instance, lease ms. Reply: epoch, then (user, status, seen) per change.
const REGISTER: &str = r#"
local instance = ARGV[2]
local epoch = redis.call('INCR', epoch_key(instance))
redis.call('SET', lease_key(instance), epoch, 'PX', ARGV[3])
local previous = redis.call('HGET', prefix .. 'instances', instance)
redis.call('HSET', prefix .. 'instances', instance, epoch)
local changes = {epoch}
if previous then drop_entries(instance, previous, now_ms(), changes) end
return changes
"#;

/// ARGV: prefix, instance, epoch, lease ms.
const RENEW: &str = r#"
local fenced = check(ARGV[2], ARGV[3])
if fenced then return fenced end
redis.call('SET', lease_key(ARGV[2]), ARGV[3], 'PX', ARGV[4], 'XX')
return {'ok'}
"#;

/// ARGV: prefix, user, instance, epoch.
const CONNECT: &str = r#"
local user, instance, epoch = ARGV[2], ARGV[3], ARGV[4]
local fenced = check(instance, epoch)
if fenced then return fenced end
local key = user_key(user)
local before = status(key)
if redis.call('HINCRBY', key, 'c:' .. instance .. ':' .. epoch, 1) == 1 then
  redis.call('HINCRBY', key, 'n', 1)
end
redis.call('SADD', users_key(instance, epoch), user)
redis.call('HSET', key, 'seen', now_ms())
return view_reply(key, before)
"#;

/// ARGV: prefix, user, instance, epoch.
const DISCONNECT: &str = r#"
local user, instance, epoch = ARGV[2], ARGV[3], ARGV[4]
local fenced = check(instance, epoch)
if fenced then return fenced end
local key = user_key(user)
if redis.call('EXISTS', key) == 0 then return {'same'} end
local before = status(key)
local field = 'c:' .. instance .. ':' .. epoch
local count = tonumber(redis.call('HGET', key, field) or '0') or 0
if count > 1 then
  redis.call('HINCRBY', key, field, -1)
elseif count == 1 then
  redis.call('HDEL', key, field)
  redis.call('HINCRBY', key, 'n', -1)
  redis.call('SREM', users_key(instance, epoch), user)
end
redis.call('HSET', key, 'seen', now_ms())
if status(key) == 0 then redis.call('HSET', key, 'away', '0') end
return view_reply(key, before)
"#;

/// ARGV: prefix, user, away ('1' or '0').
const SET_AWAY: &str = r#"
local key = user_key(ARGV[2])
if redis.call('EXISTS', key) == 0 then return {'same'} end
local before = status(key)
if before ~= 0 then redis.call('HSET', key, 'away', ARGV[3]) end
return view_reply(key, before)
"#;

/// ARGV: prefix. Reply: (user, status, seen) per change.
const EXPIRE: &str = r#"
local registered = redis.call('HGETALL', prefix .. 'instances')
local changes = {}
local now = now_ms()
for i = 1, #registered, 2 do
  local instance, epoch = registered[i], registered[i + 1]
  if redis.call('GET', lease_key(instance)) ~= epoch then
    drop_entries(instance, epoch, now, changes)
    redis.call('HDEL', prefix .. 'instances', instance)
  end
end
return changes
"#;

/// ARGV: prefix, region, then (user, status code, seen) per report. Reply: users whose held report changed.
const APPLY_REMOTE: &str = r#"
local region = ARGV[2]
local changed = {}
for i = 3, #ARGV, 3 do
  local user, code, seen = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = prefix .. 'r:' .. user
  local held = redis.call('HGET', key, region)
  local value = code .. ':' .. seen
  local newer = true
  if held then
    local held_seen = tonumber(string.match(held, ':(%d+)$') or '0') or 0
    newer = tonumber(seen) >= held_seen and held ~= value
  end
  if newer then
    redis.call('HSET', key, region, value)
    redis.call('SADD', prefix .. 'g:' .. region, user)
    table.insert(changed, user)
  end
end
return changed
"#;

/// ARGV: prefix, region. Reply: the users the region spoke of.
const FORGET_REGION: &str = r#"
local region = ARGV[2]
local set = prefix .. 'g:' .. region
local users = redis.call('SMEMBERS', set)
for _, user in ipairs(users) do
  redis.call('HDEL', prefix .. 'r:' .. user, region)
end
redis.call('DEL', set)
return users
"#;

/// How many users one pipelined read asks for.
const READ_BATCH: usize = 500;

struct Scripts {
    register: Script,
    renew: Script,
    connect: Script,
    disconnect: Script,
    set_away: Script,
    expire: Script,
    apply_remote: Script,
    forget_region: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            register: script(REGISTER),
            renew: script(RENEW),
            connect: script(CONNECT),
            disconnect: script(DISCONNECT),
            set_away: script(SET_AWAY),
            expire: script(EXPIRE),
            apply_remote: script(APPLY_REMOTE),
            forget_region: script(FORGET_REGION),
        }
    }
}

/// The presence book and user→gateway registry in Redis.
pub struct RedisPresenceStore {
    connection: Connection,
    prefix: String,
    /// The key every script is sent with, so a cluster routes it to the shard of this deployment's hash tag.
    anchor: String,
    timeout: Duration,
    stats: Arc<RedisStats>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisPresenceStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedisPresenceStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unexpected(operation: &'static str, reply: &Value) -> BackendError {
    BackendError::Unavailable(format!("unexpected reply to redis {operation}: {reply:?}"))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(number) => u64::try_from(*number).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn status(code: u64) -> Status {
    match code {
        1 => Status::Online,
        2 => Status::Away,
        _ => Status::Offline,
    }
}

fn status_code(status: Status) -> u8 {
    match status {
        Status::Online => 1,
        Status::Away => 2,
        Status::Offline => 0,
    }
}

/// A held remote report, `<status>:<seen>`.
fn remote_state(value: &str) -> Option<RemoteState> {
    let (code, seen) = value.split_once(':')?;
    Some(RemoteState { status: status(code.parse().ok()?), last_seen: seen.parse().ok()? })
}

/// Users named in a reply.
fn users(operation: &'static str, items: &[Value]) -> Result<Vec<String>, BackendError> {
    let mut users = items
        .iter()
        .map(|item| text(item).ok_or_else(|| unexpected(operation, item)))
        .collect::<Result<Vec<_>, _>>()?;
    users.sort();
    users.dedup();
    Ok(users)
}

/// Parses (user, status, seen) triples.
fn changes(operation: &'static str, items: &[Value]) -> Result<Vec<PresenceView>, BackendError> {
    let mut views = Vec::with_capacity(items.len() / 3);
    for triple in items.chunks(3) {
        match triple {
            [user, code, seen] => views.push(PresenceView {
                user: text(user).ok_or_else(|| unexpected(operation, user))?,
                status: status(number(code).ok_or_else(|| unexpected(operation, code))?),
                last_seen: number(seen).ok_or_else(|| unexpected(operation, seen))?,
            }),
            _ => return Err(BackendError::Unavailable(format!("truncated reply to redis {operation}"))),
        }
    }
    views.sort_by(|a, b| a.user.cmp(&b.user));
    Ok(views)
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisPresenceStore {
    /// Connects; fails if Redis cannot be reached within the timeout, or refuses the TLS handshake or the
    /// credentials ([`RedisConfig::check`]). Keys go under `<prefix>presence:`.
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.check().await?;
        let connection = config.connection().await?;
        let prefix = config.tagged("presence");
        Ok(Self {
            connection,
            anchor: format!("{prefix}anchor"),
            prefix,
            timeout: config.timeout,
            stats: config.stats.clone(),
            scripts: Scripts::new(),
        })
    }

    async fn run(&self, operation: &'static str, script: &Script, args: &[String]) -> Result<Vec<Value>, BackendError> {
        let mut connection = self.connection.clone();
        let mut invocation = script.key(self.anchor.as_str());
        invocation.arg(self.prefix.as_str());
        for arg in args {
            invocation.arg(arg.as_str());
        }
        match call(self.timeout, &self.stats, operation, invocation.invoke_async::<Value>(&mut connection)).await? {
            Value::Array(items) => Ok(items),
            other => Err(unexpected(operation, &other)),
        }
    }

    /// A fenced write's reply: `fenced <current>`, `same`, or `changed <status> <seen>`.
    fn view_reply(
        operation: &'static str,
        user: &str,
        instance: &str,
        epoch: u64,
        items: &[Value],
    ) -> Result<Option<PresenceView>, PresenceError> {
        match items.first().and_then(text).as_deref() {
            Some("same") => Ok(None),
            Some("changed") if items.len() == 3 => Ok(Some(PresenceView {
                user: user.to_owned(),
                status: status(number(&items[1]).ok_or_else(|| unexpected(operation, &items[1]))?),
                last_seen: number(&items[2]).ok_or_else(|| unexpected(operation, &items[2]))?,
            })),
            Some("fenced") => Err(Self::fenced(instance, epoch, items)),
            _ => Err(BackendError::Unavailable(format!("unexpected reply to redis {operation}: {items:?}")).into()),
        }
    }

    fn fenced(instance: &str, epoch: u64, items: &[Value]) -> PresenceError {
        PresenceError::Fenced(Fenced::StaleEpoch {
            instance: instance.to_owned(),
            epoch,
            current: items.get(1).and_then(number).unwrap_or(0),
        })
    }

    async fn read_views(&self, users: &[String]) -> Result<Vec<PresenceView>, BackendError> {
        let mut views = Vec::with_capacity(users.len());
        for batch in users.chunks(READ_BATCH) {
            let mut pipeline = ::redis::pipe();
            for user in batch {
                pipeline.cmd("HMGET").arg(format!("{}u:{user}", self.prefix)).arg("n").arg("away").arg("seen");
                pipeline.cmd("HVALS").arg(format!("{}r:{user}", self.prefix));
            }
            let mut connection = self.connection.clone();
            let rows: Vec<Value> =
                call(self.timeout, &self.stats, "presence views", pipeline.query_async(&mut connection)).await?;
            let mut rows = rows.into_iter();
            for user in batch {
                let (Some(local), Some(remote)) = (rows.next(), rows.next()) else {
                    return Err(BackendError::Unavailable("truncated reply to redis presence views".into()));
                };
                let (connections, away, seen): (Option<i64>, Option<String>, Option<u64>) =
                    ::redis::from_redis_value(local).map_err(|error| {
                        BackendError::Unavailable(format!("unexpected reply to redis presence views: {error}"))
                    })?;
                let status = match (connections.unwrap_or(0), away.as_deref()) {
                    (count, _) if count <= 0 => Status::Offline,
                    (_, Some("1")) => Status::Away,
                    _ => Status::Online,
                };
                let view = PresenceView { user: user.clone(), status, last_seen: seen.unwrap_or(0) };
                let reports: Vec<String> = ::redis::from_redis_value(remote).map_err(|error| {
                    BackendError::Unavailable(format!("unexpected reply to redis presence views: {error}"))
                })?;
                views.push(merge(view, reports.iter().filter_map(|value| remote_state(value))));
            }
        }
        Ok(views)
    }
}

#[async_trait]
impl PresenceStore for RedisPresenceStore {
    async fn register_instance(&self, instance: &str, lease: Duration) -> Result<Registration, PresenceError> {
        let args = [instance.to_owned(), lease_ms(lease).to_string()];
        let items = self.run("presence register", &self.scripts.register, &args).await?;
        let epoch = items.first().and_then(number).ok_or_else(|| unexpected("presence register", &Value::Nil))?;
        Ok(Registration { epoch, changes: changes("presence register", &items[1..])? })
    }

    async fn renew(&self, instance: &str, epoch: u64, lease: Duration) -> Result<(), PresenceError> {
        let args = [instance.to_owned(), epoch.to_string(), lease_ms(lease).to_string()];
        let items = self.run("presence renew", &self.scripts.renew, &args).await?;
        match items.first().and_then(text).as_deref() {
            Some("ok") => Ok(()),
            Some("fenced") => Err(Self::fenced(instance, epoch, &items)),
            _ => Err(BackendError::Unavailable(format!("unexpected reply to redis presence renew: {items:?}")).into()),
        }
    }

    async fn connect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError> {
        let args = [user.to_owned(), instance.to_owned(), epoch.to_string()];
        let items = self.run("presence connect", &self.scripts.connect, &args).await?;
        Self::view_reply("presence connect", user, instance, epoch, &items)
    }

    async fn disconnect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError> {
        let args = [user.to_owned(), instance.to_owned(), epoch.to_string()];
        let items = self.run("presence disconnect", &self.scripts.disconnect, &args).await?;
        Self::view_reply("presence disconnect", user, instance, epoch, &items)
    }

    async fn set_away(&self, user: &str, away: bool) -> Result<Option<PresenceView>, PresenceError> {
        let args = [user.to_owned(), if away { "1" } else { "0" }.to_owned()];
        let items = self.run("presence set_away", &self.scripts.set_away, &args).await?;
        Self::view_reply("presence set_away", user, "", 0, &items)
    }

    async fn expire(&self) -> Result<Vec<PresenceView>, PresenceError> {
        let items = self.run("presence expire", &self.scripts.expire, &[]).await?;
        Ok(changes("presence expire", &items)?)
    }

    async fn apply_remote(
        &self,
        region: &str,
        reports: Vec<(String, RemoteState)>,
    ) -> Result<Vec<String>, PresenceError> {
        let mut changed = Vec::new();
        for batch in reports.chunks(READ_BATCH) {
            let mut args = vec![region.to_owned()];
            for (user, state) in batch {
                args.extend([user.clone(), status_code(state.status).to_string(), state.last_seen.to_string()]);
            }
            let items = self.run("presence apply_remote", &self.scripts.apply_remote, &args).await?;
            changed.extend(users("presence apply_remote", &items)?);
        }
        changed.sort();
        changed.dedup();
        Ok(changed)
    }

    async fn forget_region(&self, region: &str) -> Result<Vec<String>, PresenceError> {
        let items = self.run("presence forget_region", &self.scripts.forget_region, &[region.to_owned()]).await?;
        Ok(users("presence forget_region", &items)?)
    }

    async fn views(&self, users: &[String]) -> Result<Vec<PresenceView>, PresenceError> {
        Ok(self.read_views(users).await?)
    }

    async fn locate(&self, users: &[String]) -> Result<Vec<Vec<String>>, PresenceError> {
        let mut found = Vec::with_capacity(users.len());
        for batch in users.chunks(READ_BATCH) {
            let mut pipeline = ::redis::pipe();
            for user in batch {
                pipeline.cmd("HKEYS").arg(format!("{}u:{user}", self.prefix));
            }
            let mut connection = self.connection.clone();
            let rows: Vec<Vec<String>> =
                call(self.timeout, &self.stats, "presence locate", pipeline.query_async(&mut connection)).await?;
            for fields in rows {
                let mut instances: Vec<String> = fields
                    .iter()
                    .filter_map(|field| field.strip_prefix("c:"))
                    .filter_map(|entry| entry.rsplit_once(':').map(|(instance, _epoch)| instance.to_owned()))
                    .collect();
                instances.sort();
                instances.dedup();
                found.push(instances);
            }
        }
        Ok(found)
    }

    async fn online_count(&self, users: &[String]) -> Result<usize, PresenceError> {
        Ok(self.read_views(users).await?.iter().filter(|view| view.status != Status::Offline).count())
    }
}
