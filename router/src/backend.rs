//! Backend traits. Each has an embedded driver ([`crate::embedded`]) and a driver for a real engine. They are
//! async, batched and fallible so that Kafka, Cassandra/Scylla and Redis drivers fit without a rewrite.

use async_trait::async_trait;
use parley_api::BackendError;
pub use parley_api::{HistoryPage, HistoryQuery, PresenceUpdate};
use parley_core::access::{Access, Posting, Visibility};
pub use parley_core::machine_lease::LeaseRow;
use parley_core::protocol::MessageView;
use parley_core::sequencer::Placement;
use parley_core::ChannelKind;
pub use parley_push::{Device, Platform};
use serde::{Deserialize, Serialize};

/// A stored channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// Channel id.
    pub id: String,
    /// Group or DM.
    pub kind: ChannelKind,
    /// Creator.
    pub created_by: String,
    /// Creation time (Unix ms).
    pub created_at: u64,
    /// Number of members.
    pub member_count: u32,
    /// Who may join (group channels).
    #[serde(default)]
    pub visibility: Visibility,
    /// Who may post (group channels).
    #[serde(default)]
    pub posting: Posting,
    /// The first sequence its members may read (0: all). A channel created again after a deletion continues the
    /// old sequence (a sequence is never reused) and hides the old messages.
    #[serde(default)]
    pub history_from: u64,
    /// The channel's home: the region whose router orders it ([`crate::global`]). `None` for a channel created
    /// before regions existed, or by a router without a region: its home is the region that reads it (a DM's is
    /// claimed by the first region that routes a call about it, [`MembershipStore::claim_home`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<Home>,
}

/// What a router observed of one incoming flow over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowReport {
    /// The largest delivery latency (home's append → handed to this region's publisher), milliseconds.
    pub latency_ms: u64,
    /// Messages delivered.
    pub messages: u64,
    /// MirrorMaker 2's lag at the report (see [`crate::kafka::beacon`]); `None` before the source's first beacon.
    pub lag_ms: Option<u64>,
}

/// Where a channel is ordered: the region whose writer owns its sequence, and the epoch of that ownership. A
/// channel is created with its creator's region at epoch 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Home {
    /// Region name (`PARLEY_REGION` of its routers).
    pub region: String,
    /// Bumped each time the home moves; records of an older epoch come from a deposed home.
    pub epoch: u64,
    /// The last sequence the former home ordered (0 for the first home): this home continues after it.
    #[serde(default)]
    pub base_seq: u64,
}

/// A membership change, applied in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Create a channel (with its initial members, which must be listed as `Add`s too).
    Create(ChannelRecord),
    /// Add a member.
    Add {
        /// Channel.
        channel: String,
        /// User.
        user: String,
    },
    /// Remove a member.
    Remove {
        /// Channel.
        channel: String,
        /// User.
        user: String,
    },
    /// Set (or, with `None`, clear) what a channel remembers about a user: a role, an invitation or a ban.
    SetAccess {
        /// Channel.
        channel: String,
        /// User.
        user: String,
        /// The access.
        access: Option<Access>,
    },
    /// Change who may join or post.
    Configure {
        /// Channel.
        channel: String,
        /// Visibility.
        visibility: Visibility,
        /// Posting rule.
        posting: Posting,
    },
    /// Delete a channel: its record, settings, members (and their channel lists) and access entries. Its messages
    /// stay until retention removes them, readable by no one.
    Delete {
        /// Channel.
        channel: String,
    },
    /// `user` blocks (or unblocks) `other` for direct messages.
    SetBlock {
        /// Who blocks.
        user: String,
        /// Whom.
        other: String,
        /// Blocked or not.
        blocked: bool,
    },
}

impl MembershipChange {
    /// The channel a change is about (`None` for a block, which is about two users).
    pub fn channel(&self) -> Option<&str> {
        match self {
            MembershipChange::Create(record) => Some(&record.id),
            MembershipChange::Add { channel, .. }
            | MembershipChange::Remove { channel, .. }
            | MembershipChange::SetAccess { channel, .. }
            | MembershipChange::Configure { channel, .. }
            | MembershipChange::Delete { channel } => Some(channel),
            MembershipChange::SetBlock { .. } => None,
        }
    }
}

/// An earlier send found by its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorSend {
    /// Channel it went to.
    pub channel: String,
    /// Where it sits.
    pub placement: Placement,
}

/// A member's read cursor after it moved, as a log records it (`{prefix}receipts` on Kafka, keyed by channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReceipt {
    /// Channel.
    pub channel: String,
    /// Reader.
    pub user: String,
    /// The cursor: read up to this sequence.
    pub seq: u64,
    /// When (Unix ms, the router's clock).
    pub ts: u64,
    /// Whether the channel's members hear of it (channels up to the fan-out threshold); other regions follow it.
    #[serde(default = "announced")]
    pub announce: bool,
}

fn announced() -> bool {
    true
}

/// The durable, ordered log of messages. A send is confirmed only after [`append`](Self::append) returns.
#[async_trait]
pub trait MessageLog: Send + Sync + 'static {
    /// Appends a batch durably and atomically (synced to disk, or acknowledged by all in-sync replicas).
    async fn append(&self, batch: Vec<MessageView>) -> Result<(), BackendError>;
    /// The last durable sequence of a channel (0 when empty), for a writer taking over.
    async fn last_seq(&self, channel: &str) -> Result<u64, BackendError>;
    /// Looks up earlier sends by (sender, client message id).
    async fn find_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError>;
    /// Records a read cursor that moved (the store already holds it). A log that other regions mirror (Kafka)
    /// appends it to its receipts topic, acknowledged by all in-sync replicas; the embedded log has nothing to add
    /// to the store's cursor, which is on the same disk.
    async fn record_read(&self, _receipt: ReadReceipt) -> Result<(), BackendError> {
        Ok(())
    }
    /// Records membership changes that became durable, in order, for other regions. A log that other regions
    /// mirror (Kafka) appends them to its memberships topic, keyed by channel; the embedded log records nothing.
    async fn record_memberships(&self, _events: Vec<crate::publisher::MembershipEvent>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Remembers the home of a channel, which a log that other regions mirror (Kafka) writes into each of the
    /// channel's records (the `parley-home` header, `<region>:<epoch>`), so that readers can drop the records of a
    /// deposed home. The embedded log ignores it.
    fn set_home(&self, _channel: &str, _home: &Home) {}

    /// Records presence changes, in the order given. A log that other regions mirror (Kafka) appends them to its
    /// presence topic, acknowledged by all in-sync replicas, keyed by user so each user's changes keep their
    /// order; the embedded log records nothing (one process holds the whole presence book).
    async fn record_presence(&self, _updates: Vec<PresenceUpdate>) -> Result<(), BackendError> {
        Ok(())
    }
    /// Whether this writer owns `channel` now: `Err(BackendError::NotOwner)` when another writer does (several
    /// routers share a Kafka log by partition). A log with one writer owns everything.
    fn check_owner(&self, _channel: &str) -> Result<(), BackendError> {
        Ok(())
    }
    /// A number that changes whenever the set of channels this writer owns changes, so that it drops what it
    /// cached about channels another writer may have written meanwhile.
    fn ownership_version(&self) -> u64 {
        0
    }
}

/// Message storage for history reads.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Writes messages idempotently (keyed by channel and sequence; a rewrite changes nothing).
    async fn write(&self, batch: Vec<MessageView>) -> Result<(), BackendError>;
    /// Reads a page of a channel's history.
    async fn history(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, BackendError>;
    /// The oldest sequence still retained (1 when nothing expired yet).
    async fn first_retained_seq(&self, channel: &str) -> Result<u64, BackendError>;
    /// The highest sequence of a channel that this store holds (0 when none). A log driver whose writer takes
    /// over a channel combines it with the log's own unstored tail.
    async fn last_stored_seq(&self, channel: &str) -> Result<u64, BackendError>;
    /// Looks up stored sends by (sender, client message id), for idempotent retries older than the log's tail.
    async fn find_stored_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError>;
}

/// Channels and their members.
#[async_trait]
pub trait MembershipStore: Send + Sync + 'static {
    /// A channel's record.
    async fn channel(&self, channel: &str) -> Result<Option<ChannelRecord>, BackendError>;
    /// A channel's members.
    async fn members(&self, channel: &str) -> Result<Vec<String>, BackendError>;
    /// Whether a user is a member.
    async fn is_member(&self, channel: &str, user: &str) -> Result<bool, BackendError>;
    /// The channels a user belongs to.
    async fn user_channels(&self, user: &str) -> Result<Vec<String>, BackendError>;
    /// Moves a user's read cursor forward (never back); returns the cursor after the call.
    async fn set_read(&self, user: &str, channel: &str, seq: u64) -> Result<u64, BackendError>;
    /// A user's read cursor in a channel (0 when nothing was read).
    async fn read_seq(&self, user: &str, channel: &str) -> Result<u64, BackendError>;
    /// What a channel remembers about users besides membership: roles, invitations, bans.
    async fn access(&self, channel: &str) -> Result<Vec<(String, Access)>, BackendError>;
    /// What a channel remembers about one user.
    async fn access_of(&self, channel: &str, user: &str) -> Result<Option<Access>, BackendError>;
    /// The users `user` blocked.
    async fn blocked(&self, user: &str) -> Result<Vec<String>, BackendError>;
    /// Applies changes durably and atomically; member counts follow the adds and removes.
    async fn apply(&self, changes: Vec<MembershipChange>) -> Result<(), BackendError>;
    /// Moves a channel's home from `from` to `to`, only if the store still names `from` (compare-and-set: two
    /// regions that move the same channel at once cannot both win). `Ok(false)` when it names another home. With
    /// `failover`, the compare-and-set involves the local datacenter only (on Cassandra LOCAL_SERIAL instead of
    /// SERIAL), so it works while the failed region's datacenter is unreachable; the failed region is fenced by
    /// its mark ([`set_region_failed`](Self::set_region_failed)) and by the epoch.
    async fn move_home(&self, channel: &str, from: &Home, to: &Home, failover: bool) -> Result<bool, BackendError>;
    /// The channel's home, claiming `home` for it if it has none: returns the home the store holds (the channel's
    /// record's, or one claimed earlier for a channel not created yet), else records `home` and returns it. Atomic
    /// against a concurrent claim from any region (on Cassandra a lightweight transaction at SERIAL consistency,
    /// across the datacenters): of two regions that claim at once, both get the first claim's home. A claim alone
    /// creates no channel ([`channel`](Self::channel) stays `None` until the channel is created); the creating
    /// writer stores the same home with its record. A DM's id is the same in every region, so its home is claimed
    /// before it is created ([`crate::global`]). A store that keeps no homes refuses.
    async fn claim_home(&self, channel: &str, _home: &Home) -> Result<Home, BackendError> {
        Err(BackendError::InvalidConfig(format!(
            "cannot claim a home for {channel}: this store keeps no channel homes (use Cassandra or the embedded store)"
        )))
    }
    /// Marks `region` failed or back (the other regions take its channels over while it is failed).
    async fn set_region_failed(&self, region: &str, _failed: bool) -> Result<(), BackendError> {
        Err(BackendError::InvalidConfig(format!(
            "cannot mark region {region} failed: this store keeps no regions (use Cassandra)"
        )))
    }
    /// The regions marked failed.
    async fn failed_regions(&self) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }
    /// Reports what `reporter` (a router of region `target`) observed of the flow from `source` over its last window:
    /// the largest delivery latency and the messages delivered. Kept about two minutes (the operator shows it in the
    /// Region's status). A store that keeps no regions records nothing.
    async fn report_flow(
        &self,
        _target: &str,
        _source: &str,
        _reporter: &str,
        _flow: FlowReport,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    /// The machine-ID leases of the block `[base, base + count)` in `scope` (a router's region): one row per ID
    /// ever leased, none for an ID never leased ([`parley_core::machine_lease`] decides from them). A linearizable
    /// read: on Cassandra at LOCAL_SERIAL, like the lease's compare-and-sets (a region's routers share a
    /// datacenter, and regions have disjoint blocks). A store that keeps no leases refuses.
    async fn machine_leases(&self, scope: &str, base: u16, _count: u16) -> Result<Vec<LeaseRow>, BackendError> {
        Err(no_leases(scope, base))
    }
    /// Claims machine ID `id` of `scope` for `holder` at `now_ms` (its clock), only if the store still holds the
    /// lease row `expected` as it was read (same holder and last renewal), or, with `None`, no row at all. The
    /// claim clears the release time. `Ok(false)` when the row changed meanwhile (another claim or a renewal won).
    /// Atomic against concurrent claims and renewals (on Cassandra a lightweight transaction).
    async fn claim_machine_id(
        &self,
        scope: &str,
        id: u16,
        _expected: Option<&LeaseRow>,
        _holder: &str,
        _now_ms: u64,
    ) -> Result<bool, BackendError> {
        Err(no_leases(scope, id))
    }
    /// Renews `holder`'s lease of `id` at `now_ms`, only if `holder` still holds it; `Ok(false)` when it lost it.
    async fn renew_machine_id(&self, scope: &str, id: u16, _holder: &str, _now_ms: u64) -> Result<bool, BackendError> {
        Err(no_leases(scope, id))
    }
    /// Releases `holder`'s lease of `id` at `now_ms` (the release time starts the quarantine), only if `holder` still
    /// holds it; `Ok(false)` when it does not.
    async fn release_machine_id(
        &self,
        scope: &str,
        id: u16,
        _holder: &str,
        _now_ms: u64,
    ) -> Result<bool, BackendError> {
        Err(no_leases(scope, id))
    }
    /// A channel's home as the last [`move_home`](Self::move_home) or [`claim_home`](Self::claim_home) left it,
    /// wherever that ran (a linearizable read: on Cassandra at SERIAL consistency, across the datacenters).
    /// [`channel`](Self::channel) reads the home of the local datacenter, which may trail a move made in another
    /// one, and names no home for a channel that is claimed but not created.
    async fn home_now(&self, channel: &str) -> Result<Option<Home>, BackendError> {
        Ok(self.channel(channel).await?.and_then(|record| record.home))
    }
    /// Registers a push device for `user`. A device belongs to one user: registering it for another moves it (the
    /// phone changed hands or accounts). Past `max` devices the user's oldest are forgotten. Whether `user` had it
    /// already.
    async fn register_device(&self, user: &str, _device: &Device, _max: usize) -> Result<bool, BackendError> {
        Err(no_push(user))
    }
    /// Forgets a push device; with `owner`, only if it is that user's. Whether it was forgotten.
    async fn unregister_device(&self, _device: &Device, owner: Option<&str>) -> Result<bool, BackendError> {
        Err(no_push(owner.unwrap_or("a user")))
    }
    /// A user's push devices, oldest first.
    async fn devices(&self, user: &str) -> Result<Vec<Device>, BackendError> {
        Err(no_push(user))
    }
    /// Mutes `channel`'s push notifications for `user` until `until` (Unix ms; `u64::MAX`: until unmuted), or
    /// unmutes it with `None`. A deleted channel's mutes go with it.
    async fn set_mute(&self, user: &str, _channel: &str, _until: Option<u64>) -> Result<(), BackendError> {
        Err(no_push(user))
    }
    /// The users who muted `channel`'s push notifications, with the time each mute ends (expired ones included).
    async fn mutes(&self, channel: &str) -> Result<Vec<(String, u64)>, BackendError> {
        Err(no_push(channel))
    }
}

/// The refusal of a store that keeps no push settings.
fn no_push(whose: &str) -> BackendError {
    BackendError::InvalidConfig(format!(
        "cannot keep push settings of {whose}: this store keeps none (use Cassandra or the embedded store)"
    ))
}

/// The refusal of a store that keeps no machine-ID leases.
fn no_leases(scope: &str, id: u16) -> BackendError {
    BackendError::InvalidConfig(format!(
        "cannot lease machine id {id} in {scope:?}: this store keeps no machine-id leases (use Cassandra or the \
         embedded store)"
    ))
}
