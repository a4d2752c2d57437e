//! The embedded driver: one redb database on local disk. Every write commits with immediate durability (the
//! commit is synced to disk before it returns), so a send confirmed from it survives a crash or power loss.
//!
//! Here the log and the store are the same database: appending a message writes its history row, its
//! idempotency key, its channel's last sequence and its time-bucket index in one transaction. Messages are keyed
//! by (channel, sequence) and indexed by (time bucket, channel) so retention drops whole buckets.

use crate::backend::{
    ChannelRecord, Device, HistoryPage, HistoryQuery, Home, LeaseRow, MembershipChange, MembershipStore, MessageLog,
    MessageStore, Platform, PriorSend,
};
use async_trait::async_trait;
use parley_api::BackendError;
use parley_core::access::Access;
use parley_core::protocol::MessageView;
use parley_core::sequencer::Placement;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const LAST_SEQ: TableDefinition<&str, u64> = TableDefinition::new("last_seq");
const FLOOR: TableDefinition<&str, u64> = TableDefinition::new("first_retained_seq");
const BUCKETS: TableDefinition<(u64, &str), (u64, u64)> = TableDefinition::new("time_buckets");
const SENDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sends");
const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
const MEMBERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("members");
const USER_CHANNELS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_channels");
const READ_CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("read_cursors");
/// (channel, user) → the access's name (`owner`, `admin`, `invited`, `banned`); plain members have none.
const ACCESS: TableDefinition<(&str, &str), &str> = TableDefinition::new("channel_access");
/// (user, blocked user).
const BLOCKS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_blocks");
/// channel → the home (JSON [`Home`]) claimed for a channel that is not created yet
/// ([`MembershipStore::claim_home`]); a created channel's record holds its home, and its creation takes the claim.
const CLAIMED_HOMES: TableDefinition<&str, &[u8]> = TableDefinition::new("claimed_homes");
/// (scope, machine id) → its lease (JSON [`StoredLease`], [`MembershipStore::claim_machine_id`]).
const MACHINE_LEASES: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("machine_leases");
/// Push devices: (user, platform, token) → the registration's order among the user's devices.
const DEVICES: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("push_devices");
/// Push devices' owners: (platform, token) → user.
const DEVICE_OWNERS: TableDefinition<(&str, &str), &str> = TableDefinition::new("push_device_owners");
/// Muted channels: (channel, user) → muted until (Unix ms).
const MUTES: TableDefinition<(&str, &str), u64> = TableDefinition::new("push_mutes");

/// Retention settings of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// How long messages are kept; `None` keeps them forever.
    pub messages: Option<Duration>,
    /// Width of a time bucket (the unit in which old messages are dropped).
    pub bucket: Duration,
    /// How long idempotency keys are remembered.
    pub idempotency: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            messages: Some(Duration::from_secs(365 * 24 * 3600)),
            bucket: Duration::from_secs(3600),
            idempotency: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SendRecord {
    channel: String,
    id: u64,
    seq: u64,
    ts: u64,
}

/// A machine-ID lease as the embedded store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredLease {
    holder: String,
    renewed_at: u64,
    #[serde(default)]
    released_at: Option<u64>,
}

impl StoredLease {
    fn row(self, id: u16) -> LeaseRow {
        LeaseRow { id, holder: self.holder, renewed_at_ms: self.renewed_at, released_at_ms: self.released_at }
    }
}

/// What a retention sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Messages deleted.
    pub messages: u64,
    /// Idempotency keys forgotten.
    pub idempotency_keys: u64,
}

/// The embedded store: log, message store and membership store in one redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    database: Arc<Database>,
    retention: Retention,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddedStore").field("retention", &self.retention).finish_non_exhaustive()
    }
}

/// What a step of a database transaction can fail with: redb's errors (converted by `?`) or one of ours.
#[derive(Debug)]
enum DbError {
    Redb(redb::Error),
    Backend(BackendError),
}

macro_rules! from_redb {
    ($($kind:ty),*) => {$(
        impl From<$kind> for DbError {
            fn from(error: $kind) -> Self {
                DbError::Redb(error.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<BackendError> for DbError {
    fn from(error: BackendError) -> Self {
        DbError::Backend(error)
    }
}

impl From<DbError> for BackendError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Redb(error) => BackendError::Embedded(Box::new(error)),
            DbError::Backend(error) => error,
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec(value).map_err(BackendError::Decode)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, BackendError> {
    serde_json::from_slice(bytes).map_err(BackendError::Decode)
}

impl EmbeddedStore {
    /// Opens (or creates) the database `parley.redb` in `data_dir`.
    pub fn open(data_dir: &Path, retention: Retention) -> Result<Self, BackendError> {
        Self::open_database(data_dir, retention).map_err(BackendError::from)
    }

    fn open_database(data_dir: &Path, retention: Retention) -> Result<Self, DbError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            BackendError::Unavailable(format!("cannot create data dir {}: {error}", data_dir.display()))
        })?;
        let database = Database::create(data_dir.join("parley.redb"))?;
        let transaction = database.begin_write()?;
        {
            // Create every table up front so readers never meet a missing table.
            transaction.open_table(MESSAGES)?;
            transaction.open_table(LAST_SEQ)?;
            transaction.open_table(FLOOR)?;
            transaction.open_table(BUCKETS)?;
            transaction.open_table(SENDS)?;
            transaction.open_table(CHANNELS)?;
            transaction.open_table(MEMBERS)?;
            transaction.open_table(USER_CHANNELS)?;
            transaction.open_table(READ_CURSORS)?;
            transaction.open_table(ACCESS)?;
            transaction.open_table(BLOCKS)?;
            transaction.open_table(CLAIMED_HOMES)?;
            transaction.open_table(MACHINE_LEASES)?;
            transaction.open_table(DEVICES)?;
            transaction.open_table(DEVICE_OWNERS)?;
            transaction.open_table(MUTES)?;
        }
        transaction.commit()?;
        Ok(Self { database: Arc::new(database), retention })
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, DbError> + Send + 'static,
    {
        let database = self.database.clone();
        tokio::task::spawn_blocking(move || work(&database))
            .await
            .map_err(|error| BackendError::Task(error.to_string()))?
            .map_err(BackendError::from)
    }

    /// The second halves of the pair keys of `table` whose first half is `first` (members of a channel, channels
    /// of a user).
    async fn second_keys(
        &self,
        table: TableDefinition<'static, (&'static str, &'static str), ()>,
        first: &str,
    ) -> Result<Vec<String>, BackendError> {
        let first = first.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(table)?;
            let mut found = Vec::new();
            for entry in table.range((first.as_str(), "")..)? {
                let (key, _) = entry?;
                let (owner, second) = key.value();
                if owner != first {
                    break;
                }
                found.push(second.to_owned());
            }
            Ok(found)
        })
        .await
    }

    /// Replaces the lease of `(scope, id)` with what `update` makes of it (`None`: leave it), in one write
    /// transaction (redb runs one at a time: a compare-and-set); whether it was replaced.
    async fn update_lease(
        &self,
        scope: &str,
        id: u16,
        update: impl FnOnce(Option<StoredLease>) -> Option<StoredLease> + Send + 'static,
    ) -> Result<bool, BackendError> {
        let scope = scope.to_owned();
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let replaced = {
                let mut table = transaction.open_table(MACHINE_LEASES)?;
                let stored =
                    table.get((scope.as_str(), id))?.map(|value| decode::<StoredLease>(value.value())).transpose()?;
                match update(stored) {
                    Some(lease) => {
                        table.insert((scope.as_str(), id), encode(&lease)?.as_slice())?;
                        true
                    }
                    None => false,
                }
            };
            transaction.commit()?;
            Ok(replaced)
        })
        .await
    }

    /// Deletes messages older than the retention period (whole time buckets) and old idempotency keys.
    pub async fn sweep(&self, now_ms: u64) -> Result<SweepReport, BackendError> {
        let retention = self.retention;
        self.blocking(move |database| {
            let mut report = SweepReport::default();
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            {
                if let Some(keep) = retention.messages {
                    let bucket_ms = (retention.bucket.as_millis() as u64).max(1);
                    let cutoff_bucket = now_ms.saturating_sub(keep.as_millis() as u64) / bucket_ms;
                    let mut buckets = transaction.open_table(BUCKETS)?;
                    let mut messages = transaction.open_table(MESSAGES)?;
                    let mut floor = transaction.open_table(FLOOR)?;
                    let mut expired = Vec::new();
                    for entry in buckets.range::<(u64, &str)>(..(cutoff_bucket, ""))? {
                        let (key, value) = entry?;
                        let (bucket, channel) = key.value();
                        let (first, last) = value.value();
                        expired.push((bucket, channel.to_owned(), first, last));
                    }
                    for (bucket, channel, first, last) in expired {
                        for seq in first..=last {
                            if messages.remove((channel.as_str(), seq))?.is_some() {
                                report.messages += 1;
                            }
                        }
                        let current = floor.get(channel.as_str())?.map(|value| value.value()).unwrap_or(1);
                        floor.insert(channel.as_str(), current.max(last + 1))?;
                        buckets.remove((bucket, channel.as_str()))?;
                    }
                }
                let idempotency_cutoff = now_ms.saturating_sub(retention.idempotency.as_millis() as u64);
                let mut sends = transaction.open_table(SENDS)?;
                let before = sends.len()?;
                sends.retain(|_, value| match serde_json::from_slice::<SendRecord>(value) {
                    Ok(record) => record.ts >= idempotency_cutoff,
                    Err(_) => false,
                })?;
                report.idempotency_keys = before - sends.len()?;
            }
            transaction.commit()?;
            Ok(report)
        })
        .await
    }
}

#[async_trait]
impl MessageLog for EmbeddedStore {
    async fn append(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let bucket_ms = (self.retention.bucket.as_millis() as u64).max(1);
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            {
                let mut messages = transaction.open_table(MESSAGES)?;
                let mut last_seq = transaction.open_table(LAST_SEQ)?;
                let mut buckets = transaction.open_table(BUCKETS)?;
                let mut sends = transaction.open_table(SENDS)?;
                for message in &batch {
                    let channel = message.channel.as_str();
                    messages.insert((channel, message.seq), encode(message)?.as_slice())?;
                    let previous = last_seq.get(channel)?.map(|value| value.value()).unwrap_or(0);
                    last_seq.insert(channel, previous.max(message.seq))?;
                    let bucket = message.ts / bucket_ms;
                    let range = buckets.get((bucket, channel))?.map(|value| value.value());
                    let range = match range {
                        Some((first, last)) => (first.min(message.seq), last.max(message.seq)),
                        None => (message.seq, message.seq),
                    };
                    buckets.insert((bucket, channel), range)?;
                    let record = SendRecord {
                        channel: message.channel.clone(),
                        id: message.id,
                        seq: message.seq,
                        ts: message.ts,
                    };
                    // A key names its first message (the lowest id) for good: a client that sends a used key again
                    // as a first attempt gets a second message, but the key keeps naming the first.
                    let key = (message.sender.as_str(), message.client_msg_id.as_str());
                    let earlier = match sends.get(key)? {
                        Some(value) => decode::<SendRecord>(value.value())?.id <= message.id,
                        None => false,
                    };
                    if !earlier {
                        sends.insert(key, encode(&record)?.as_slice())?;
                    }
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn last_seq(&self, channel: &str) -> Result<u64, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(LAST_SEQ)?;
            Ok(table.get(channel.as_str())?.map(|value| value.value()).unwrap_or(0))
        })
        .await
    }

    async fn find_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(SENDS)?;
            let mut found = Vec::with_capacity(keys.len());
            for (sender, client_msg_id) in &keys {
                let prior = match table.get((sender.as_str(), client_msg_id.as_str()))? {
                    Some(value) => {
                        let record: SendRecord = decode(value.value())?;
                        Some(PriorSend {
                            channel: record.channel,
                            placement: Placement { id: record.id, seq: record.seq, ts: record.ts },
                        })
                    }
                    None => None,
                };
                found.push(prior);
            }
            Ok(found)
        })
        .await
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn write(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        // The log is this same database: a message that was appended is already stored. Writing again is an
        // idempotent upsert of the same row, used when the store follows another log.
        let missing: Vec<MessageView> = {
            let keys: Vec<(String, u64)> = batch.iter().map(|message| (message.channel.clone(), message.seq)).collect();
            let present = self
                .blocking(move |database| {
                    let transaction = database.begin_read()?;
                    let table = transaction.open_table(MESSAGES)?;
                    let mut present = Vec::with_capacity(keys.len());
                    for (channel, seq) in &keys {
                        present.push(table.get((channel.as_str(), *seq))?.is_some());
                    }
                    Ok(present)
                })
                .await?;
            batch.into_iter().zip(present).filter(|(_, present)| !present).map(|(message, _)| message).collect()
        };
        self.append(missing).await
    }

    async fn history(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(MESSAGES)?;
            let limit = query.limit.max(1) as usize;
            let mut messages = Vec::with_capacity(limit + 1);
            if let Some(after) = query.after {
                let upper = query.before.unwrap_or(u64::MAX);
                if after.saturating_add(1) < upper {
                    for entry in table.range((channel.as_str(), after + 1)..(channel.as_str(), upper))? {
                        let (_, value) = entry?;
                        messages.push(decode::<MessageView>(value.value())?);
                        if messages.len() > limit {
                            break;
                        }
                    }
                }
                let has_more = messages.len() > limit;
                messages.truncate(limit);
                Ok(HistoryPage { messages, has_more })
            } else {
                let upper = query.before.unwrap_or(u64::MAX);
                for entry in table.range((channel.as_str(), 0)..(channel.as_str(), upper))?.rev() {
                    let (_, value) = entry?;
                    messages.push(decode::<MessageView>(value.value())?);
                    if messages.len() > limit {
                        break;
                    }
                }
                let has_more = messages.len() > limit;
                messages.truncate(limit);
                messages.reverse();
                Ok(HistoryPage { messages, has_more })
            }
        })
        .await
    }

    async fn first_retained_seq(&self, channel: &str) -> Result<u64, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(FLOOR)?;
            Ok(table.get(channel.as_str())?.map(|value| value.value()).unwrap_or(1))
        })
        .await
    }

    async fn last_stored_seq(&self, channel: &str) -> Result<u64, BackendError> {
        // The log is this same database.
        self.last_seq(channel).await
    }

    async fn find_stored_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        self.find_sends(keys).await
    }
}

#[async_trait]
impl MembershipStore for EmbeddedStore {
    async fn channel(&self, channel: &str) -> Result<Option<ChannelRecord>, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(CHANNELS)?;
            match table.get(channel.as_str())? {
                Some(value) => Ok(Some(decode(value.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn members(&self, channel: &str) -> Result<Vec<String>, BackendError> {
        self.second_keys(MEMBERS, channel).await
    }

    async fn is_member(&self, channel: &str, user: &str) -> Result<bool, BackendError> {
        let (channel, user) = (channel.to_owned(), user.to_owned());
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(MEMBERS)?;
            Ok(table.get((channel.as_str(), user.as_str()))?.is_some())
        })
        .await
    }

    async fn user_channels(&self, user: &str) -> Result<Vec<String>, BackendError> {
        self.second_keys(USER_CHANNELS, user).await
    }

    async fn access(&self, channel: &str) -> Result<Vec<(String, Access)>, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(ACCESS)?;
            let mut found = Vec::new();
            for entry in table.range((channel.as_str(), "")..)? {
                let (key, value) = entry?;
                let (owner, user) = key.value();
                if owner != channel {
                    break;
                }
                if let Some(access) = Access::parse(value.value()) {
                    found.push((user.to_owned(), access));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn access_of(&self, channel: &str, user: &str) -> Result<Option<Access>, BackendError> {
        let (channel, user) = (channel.to_owned(), user.to_owned());
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(ACCESS)?;
            Ok(table.get((channel.as_str(), user.as_str()))?.and_then(|value| Access::parse(value.value())))
        })
        .await
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>, BackendError> {
        self.second_keys(BLOCKS, user).await
    }

    async fn register_device(&self, user: &str, device: &Device, max: usize) -> Result<bool, BackendError> {
        let (user, platform, token) = (user.to_owned(), device.platform.as_str(), device.token.clone());
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let had = {
                let mut devices = transaction.open_table(DEVICES)?;
                let mut owners = transaction.open_table(DEVICE_OWNERS)?;
                let owner = owners.get((platform, token.as_str()))?.map(|value| value.value().to_owned());
                let had = owner.as_deref() == Some(user.as_str());
                if let Some(previous) = owner.filter(|previous| *previous != user) {
                    devices.remove((previous.as_str(), platform, token.as_str()))?;
                }
                // The user's devices in registration order.
                let mut held: Vec<(u64, String, String)> = Vec::new();
                for entry in devices.range((user.as_str(), "", "")..)? {
                    let (key, order) = entry?;
                    let (owner, held_platform, held_token) = key.value();
                    if owner != user {
                        break;
                    }
                    held.push((order.value(), held_platform.to_owned(), held_token.to_owned()));
                }
                if !had {
                    let next = held.iter().map(|(order, _, _)| order + 1).max().unwrap_or(0);
                    devices.insert((user.as_str(), platform, token.as_str()), next)?;
                    owners.insert((platform, token.as_str()), user.as_str())?;
                    held.push((next, platform.to_owned(), token.clone()));
                }
                held.sort();
                let excess = held.len().saturating_sub(max.max(1));
                for (_, old_platform, old_token) in held.into_iter().take(excess) {
                    devices.remove((user.as_str(), old_platform.as_str(), old_token.as_str()))?;
                    owners.remove((old_platform.as_str(), old_token.as_str()))?;
                }
                had
            };
            transaction.commit()?;
            Ok(had)
        })
        .await
    }

    async fn unregister_device(&self, device: &Device, owner: Option<&str>) -> Result<bool, BackendError> {
        let (platform, token, expected) = (device.platform.as_str(), device.token.clone(), owner.map(str::to_owned));
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let removed = {
                let mut devices = transaction.open_table(DEVICES)?;
                let mut owners = transaction.open_table(DEVICE_OWNERS)?;
                let owner = owners.get((platform, token.as_str()))?.map(|value| value.value().to_owned());
                match owner {
                    Some(owner) if expected.as_ref().is_none_or(|expected| *expected == owner) => {
                        devices.remove((owner.as_str(), platform, token.as_str()))?;
                        owners.remove((platform, token.as_str()))?;
                        true
                    }
                    _ => false,
                }
            };
            transaction.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn devices(&self, user: &str) -> Result<Vec<Device>, BackendError> {
        let user = user.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let devices = transaction.open_table(DEVICES)?;
            let mut held = Vec::new();
            for entry in devices.range((user.as_str(), "", "")..)? {
                let (key, order) = entry?;
                let (owner, platform, token) = key.value();
                if owner != user {
                    break;
                }
                if let Some(platform) = Platform::parse(platform) {
                    held.push((order.value(), Device::new(platform, token)));
                }
            }
            held.sort_by_key(|(order, _)| *order);
            Ok(held.into_iter().map(|(_, device)| device).collect())
        })
        .await
    }

    async fn set_mute(&self, user: &str, channel: &str, until: Option<u64>) -> Result<(), BackendError> {
        let (user, channel) = (user.to_owned(), channel.to_owned());
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            {
                let mut mutes = transaction.open_table(MUTES)?;
                match until {
                    Some(until) => mutes.insert((channel.as_str(), user.as_str()), until)?,
                    None => mutes.remove((channel.as_str(), user.as_str()))?,
                };
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    async fn mutes(&self, channel: &str) -> Result<Vec<(String, u64)>, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let mutes = transaction.open_table(MUTES)?;
            let mut found = Vec::new();
            for entry in mutes.range((channel.as_str(), "")..)? {
                let (key, until) = entry?;
                let (owner, user) = key.value();
                if owner != channel {
                    break;
                }
                found.push((user.to_owned(), until.value()));
            }
            Ok(found)
        })
        .await
    }

    async fn set_read(&self, user: &str, channel: &str, seq: u64) -> Result<u64, BackendError> {
        let (user, channel) = (user.to_owned(), channel.to_owned());
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let cursor = {
                let mut table = transaction.open_table(READ_CURSORS)?;
                let current = table.get((user.as_str(), channel.as_str()))?.map(|value| value.value()).unwrap_or(0);
                let cursor = current.max(seq);
                if cursor != current {
                    table.insert((user.as_str(), channel.as_str()), cursor)?;
                }
                cursor
            };
            transaction.commit()?;
            Ok(cursor)
        })
        .await
    }

    async fn read_seq(&self, user: &str, channel: &str) -> Result<u64, BackendError> {
        let (user, channel) = (user.to_owned(), channel.to_owned());
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(READ_CURSORS)?;
            Ok(table.get((user.as_str(), channel.as_str()))?.map(|value| value.value()).unwrap_or(0))
        })
        .await
    }

    async fn move_home(&self, channel: &str, from: &Home, to: &Home, _failover: bool) -> Result<bool, BackendError> {
        let (channel, from, to) = (channel.to_owned(), from.clone(), to.clone());
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let moved = {
                let mut channels = transaction.open_table(CHANNELS)?;
                let record: Option<ChannelRecord> = match channels.get(channel.as_str())? {
                    Some(value) => Some(decode(value.value())?),
                    None => None,
                };
                match record {
                    Some(mut record) if record.home.as_ref() == Some(&from) => {
                        record.home = Some(to);
                        channels.insert(channel.as_str(), encode(&record)?.as_slice())?;
                        true
                    }
                    Some(_) => false,
                    // A home claimed for a channel not created yet moves like a record's.
                    None => {
                        let mut claims = transaction.open_table(CLAIMED_HOMES)?;
                        let claimed =
                            claims.get(channel.as_str())?.map(|value| decode::<Home>(value.value())).transpose()?;
                        if claimed.as_ref() == Some(&from) {
                            claims.insert(channel.as_str(), encode(&to)?.as_slice())?;
                            true
                        } else {
                            false
                        }
                    }
                }
            };
            transaction.commit()?;
            Ok(moved)
        })
        .await
    }

    async fn claim_home(&self, channel: &str, home: &Home) -> Result<Home, BackendError> {
        let (channel, home) = (channel.to_owned(), home.clone());
        self.blocking(move |database| {
            // One write transaction: redb runs one at a time, so of two claims the first one's home is the answer
            // to both.
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            let held = {
                let mut channels = transaction.open_table(CHANNELS)?;
                let mut claims = transaction.open_table(CLAIMED_HOMES)?;
                let record =
                    channels.get(channel.as_str())?.map(|value| decode::<ChannelRecord>(value.value())).transpose()?;
                match record {
                    Some(ChannelRecord { home: Some(held), .. }) => held,
                    // A channel created without a home (before regions): the claim becomes its home.
                    Some(mut record) => {
                        record.home = Some(home.clone());
                        channels.insert(channel.as_str(), encode(&record)?.as_slice())?;
                        home
                    }
                    None => {
                        let claimed =
                            claims.get(channel.as_str())?.map(|value| decode::<Home>(value.value())).transpose()?;
                        match claimed {
                            Some(held) => held,
                            None => {
                                claims.insert(channel.as_str(), encode(&home)?.as_slice())?;
                                home
                            }
                        }
                    }
                }
            };
            transaction.commit()?;
            Ok(held)
        })
        .await
    }

    async fn machine_leases(&self, scope: &str, base: u16, count: u16) -> Result<Vec<LeaseRow>, BackendError> {
        let scope = scope.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let table = transaction.open_table(MACHINE_LEASES)?;
            let end = u32::from(base) + u32::from(count);
            let mut rows = Vec::new();
            for entry in table.range((scope.as_str(), base)..)? {
                let (key, value) = entry?;
                let (owner, id) = key.value();
                if owner != scope || u32::from(id) >= end {
                    break;
                }
                rows.push(decode::<StoredLease>(value.value())?.row(id));
            }
            Ok(rows)
        })
        .await
    }

    async fn claim_machine_id(
        &self,
        scope: &str,
        id: u16,
        expected: Option<&LeaseRow>,
        holder: &str,
        now_ms: u64,
    ) -> Result<bool, BackendError> {
        let expected = expected.map(|row| (row.holder.clone(), row.renewed_at_ms));
        let claim = StoredLease { holder: holder.to_owned(), renewed_at: now_ms, released_at: None };
        self.update_lease(scope, id, move |stored| {
            let current = stored.as_ref().map(|lease| (lease.holder.clone(), lease.renewed_at));
            (current == expected).then_some(claim)
        })
        .await
    }

    async fn renew_machine_id(&self, scope: &str, id: u16, holder: &str, now_ms: u64) -> Result<bool, BackendError> {
        let holder = holder.to_owned();
        self.update_lease(scope, id, move |stored| {
            stored.filter(|lease| lease.holder == holder).map(|lease| StoredLease { renewed_at: now_ms, ..lease })
        })
        .await
    }

    async fn release_machine_id(&self, scope: &str, id: u16, holder: &str, now_ms: u64) -> Result<bool, BackendError> {
        let holder = holder.to_owned();
        self.update_lease(scope, id, move |stored| {
            stored
                .filter(|lease| lease.holder == holder)
                .map(|lease| StoredLease { released_at: Some(now_ms), ..lease })
        })
        .await
    }

    async fn home_now(&self, channel: &str) -> Result<Option<Home>, BackendError> {
        let channel = channel.to_owned();
        self.blocking(move |database| {
            let transaction = database.begin_read()?;
            let channels = transaction.open_table(CHANNELS)?;
            if let Some(record) =
                channels.get(channel.as_str())?.map(|value| decode::<ChannelRecord>(value.value())).transpose()?
            {
                return Ok(record.home);
            }
            let claims = transaction.open_table(CLAIMED_HOMES)?;
            Ok(claims.get(channel.as_str())?.map(|value| decode::<Home>(value.value())).transpose()?)
        })
        .await
    }

    async fn apply(&self, changes: Vec<MembershipChange>) -> Result<(), BackendError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.blocking(move |database| {
            let mut transaction = database.begin_write()?;
            transaction.set_durability(Durability::Immediate).map_err(|error| BackendError::Task(error.to_string()))?;
            {
                let mut channels = transaction.open_table(CHANNELS)?;
                let mut members = transaction.open_table(MEMBERS)?;
                let mut user_channels = transaction.open_table(USER_CHANNELS)?;
                let mut access_table = transaction.open_table(ACCESS)?;
                let mut blocks = transaction.open_table(BLOCKS)?;
                let mut claims = transaction.open_table(CLAIMED_HOMES)?;
                let mut mutes = transaction.open_table(MUTES)?;
                // Member counts change once per channel, however many members a run adds or removes.
                let mut deltas: HashMap<&str, i64> = HashMap::new();
                for change in &changes {
                    match change {
                        MembershipChange::Create(record) => {
                            let mut record = record.clone();
                            record.member_count = 0;
                            // The record takes the claimed home over; a home it names itself wins (as the creating
                            // writer's plain write of the home does on Cassandra).
                            let claimed = claims
                                .remove(record.id.as_str())?
                                .map(|value| decode::<Home>(value.value()))
                                .transpose()?;
                            if record.home.is_none() {
                                record.home = claimed;
                            }
                            channels.insert(record.id.as_str(), encode(&record)?.as_slice())?;
                        }
                        MembershipChange::Add { channel, user } => {
                            if members.insert((channel.as_str(), user.as_str()), ())?.is_none() {
                                user_channels.insert((user.as_str(), channel.as_str()), ())?;
                                *deltas.entry(channel.as_str()).or_default() += 1;
                            }
                        }
                        MembershipChange::Remove { channel, user } => {
                            if members.remove((channel.as_str(), user.as_str()))?.is_some() {
                                user_channels.remove((user.as_str(), channel.as_str()))?;
                                *deltas.entry(channel.as_str()).or_default() -= 1;
                            }
                        }
                        MembershipChange::SetAccess { channel, user, access } => match access {
                            Some(access) => {
                                access_table.insert((channel.as_str(), user.as_str()), access.as_str())?;
                            }
                            None => {
                                access_table.remove((channel.as_str(), user.as_str()))?;
                            }
                        },
                        MembershipChange::Configure { channel, visibility, posting } => {
                            let record =
                                channels.get(channel.as_str())?.map(|value| decode::<ChannelRecord>(value.value()));
                            if let Some(mut record) = record.transpose()? {
                                record.visibility = *visibility;
                                record.posting = *posting;
                                channels.insert(channel.as_str(), encode(&record)?.as_slice())?;
                            }
                        }
                        MembershipChange::Delete { channel } => {
                            channels.remove(channel.as_str())?;
                            claims.remove(channel.as_str())?;
                            let mut gone = Vec::new();
                            for entry in members.range((channel.as_str(), "")..)? {
                                let (key, _) = entry?;
                                let (owner, user) = key.value();
                                if owner != channel.as_str() {
                                    break;
                                }
                                gone.push(user.to_owned());
                            }
                            for user in &gone {
                                members.remove((channel.as_str(), user.as_str()))?;
                                user_channels.remove((user.as_str(), channel.as_str()))?;
                            }
                            let mut remembered = Vec::new();
                            for entry in access_table.range((channel.as_str(), "")..)? {
                                let (key, _) = entry?;
                                let (owner, user) = key.value();
                                if owner != channel.as_str() {
                                    break;
                                }
                                remembered.push(user.to_owned());
                            }
                            for user in &remembered {
                                access_table.remove((channel.as_str(), user.as_str()))?;
                            }
                            let mut muted = Vec::new();
                            for entry in mutes.range((channel.as_str(), "")..)? {
                                let (key, _) = entry?;
                                let (owner, user) = key.value();
                                if owner != channel.as_str() {
                                    break;
                                }
                                muted.push(user.to_owned());
                            }
                            for user in &muted {
                                mutes.remove((channel.as_str(), user.as_str()))?;
                            }
                            deltas.remove(channel.as_str());
                        }
                        MembershipChange::SetBlock { user, other, blocked } => {
                            if *blocked {
                                blocks.insert((user.as_str(), other.as_str()), ())?;
                            } else {
                                blocks.remove((user.as_str(), other.as_str()))?;
                            }
                        }
                    }
                }
                for (channel, delta) in deltas {
                    let record =
                        channels.get(channel)?.map(|value| decode::<ChannelRecord>(value.value())).transpose()?;
                    if let Some(mut record) = record {
                        record.member_count = (i64::from(record.member_count) + delta).max(0) as u32;
                        channels.insert(channel, encode(&record)?.as_slice())?;
                    }
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_core::ChannelKind;

    fn message(channel: &str, seq: u64, ts: u64) -> MessageView {
        MessageView {
            channel: channel.into(),
            seq,
            id: seq * 10,
            sender: "alice".into(),
            text: format!("m{seq}"),
            ts,
            client_msg_id: format!("c{seq}"),
        }
    }

    fn store(dir: &Path, retention: Retention) -> EmbeddedStore {
        EmbeddedStore::open(dir, retention).expect("open store")
    }

    #[tokio::test]
    async fn append_history_paging_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = store(dir.path(), Retention::default());
            store.append((1..=25).map(|seq| message("g:a", seq, 1000 + seq)).collect()).await.expect("append");
            store.append(vec![message("g:b", 1, 5)]).await.expect("append");
        }
        let store = store(dir.path(), Retention::default());
        assert_eq!(store.last_seq("g:a").await.expect("last"), 25);
        let newest = store.history("g:a", HistoryQuery { limit: 10, ..Default::default() }).await.expect("page");
        assert_eq!(newest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (16..=25).collect::<Vec<_>>());
        assert!(newest.has_more);
        let older = store
            .history("g:a", HistoryQuery { before: Some(16), limit: 10, ..Default::default() })
            .await
            .expect("page");
        assert_eq!(older.messages.first().map(|m| m.seq), Some(6));
        let oldest = store
            .history("g:a", HistoryQuery { before: Some(6), limit: 10, ..Default::default() })
            .await
            .expect("page");
        assert_eq!(oldest.messages.len(), 5);
        assert!(!oldest.has_more);
        let after =
            store.history("g:a", HistoryQuery { after: Some(20), limit: 3, ..Default::default() }).await.expect("page");
        assert_eq!(after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![21, 22, 23]);
        assert!(after.has_more);
        let prior =
            store.find_sends(vec![("alice".into(), "c7".into()), ("bob".into(), "c7".into())]).await.expect("find");
        assert_eq!(prior[0].as_ref().map(|p| p.placement.seq), Some(7));
        assert!(prior[1].is_none());
    }

    #[tokio::test]
    async fn retention_drops_old_buckets_and_raises_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let retention = Retention {
            messages: Some(Duration::from_secs(10)),
            bucket: Duration::from_secs(1),
            idempotency: Duration::from_secs(10),
        };
        let store = store(dir.path(), retention);
        store
            .append(vec![message("g:a", 1, 1_000), message("g:a", 2, 1_500), message("g:a", 3, 30_000)])
            .await
            .expect("append");
        let report = store.sweep(20_000).await.expect("sweep");
        assert_eq!(report, SweepReport { messages: 2, idempotency_keys: 2 });
        assert_eq!(store.first_retained_seq("g:a").await.expect("floor"), 3);
        let page = store.history("g:a", HistoryQuery { limit: 10, ..Default::default() }).await.expect("page");
        assert_eq!(page.messages.len(), 1);
    }

    #[tokio::test]
    async fn membership_counts_and_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), Retention::default());
        let record = ChannelRecord {
            id: "g:a".into(),
            kind: ChannelKind::Group,
            created_by: "alice".into(),
            created_at: 1,
            member_count: 0,
            visibility: Default::default(),
            posting: Default::default(),
            history_from: 0,
            home: None,
        };
        store
            .apply(vec![
                MembershipChange::Create(record),
                MembershipChange::Add { channel: "g:a".into(), user: "alice".into() },
                MembershipChange::Add { channel: "g:a".into(), user: "bob".into() },
                MembershipChange::Add { channel: "g:a".into(), user: "bob".into() },
            ])
            .await
            .expect("apply");
        assert_eq!(store.channel("g:a").await.expect("get").map(|r| r.member_count), Some(2));
        assert_eq!(store.members("g:a").await.expect("members"), vec!["alice", "bob"]);
        store
            .apply(vec![MembershipChange::Remove { channel: "g:a".into(), user: "alice".into() }])
            .await
            .expect("apply");
        assert!(!store.is_member("g:a", "alice").await.expect("is member"));
        assert_eq!(store.user_channels("bob").await.expect("channels"), vec!["g:a"]);
        assert_eq!(store.channel("g:a").await.expect("get").map(|r| r.member_count), Some(1));
    }
}
