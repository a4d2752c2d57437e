//! The single writer. Commands arrive on a bounded queue and are taken in batches; consecutive commands of one
//! kind (sends, or membership changes) form a run that is decided in memory and written durably in one call.
//! Then, in this order: the senders are confirmed, and what became durable is handed to the publisher
//! ([`crate::publisher`]), which announces it on pub/sub in its own task. The writer never waits for pub/sub.
//! While one batch is being synced the next one queues up, so throughput grows with load (group commit) while
//! every channel keeps one gap-free order.
//!
//! A membership run's write (a channel of 10,000 members is 10,000 rows) runs in its own task while the writer
//! goes on with sends: sends to the channels it touches wait for it (they are decided once it is durable, or
//! refused with it), sends to every other channel do not. The next membership run starts only once the previous one
//! is written, so membership changes keep their order too.

use crate::backend::{
    ChannelRecord, HistoryPage, HistoryQuery, Home, MembershipChange, MembershipStore, MessageLog, MessageStore,
    PresenceUpdate, ReadReceipt,
};
use crate::feed::FeedBook;
use crate::publisher::{self, Job, MembershipEvent, PublisherConfig, PublisherHandle};
use bytes::Bytes;
use parley_api::{Answer, ChannelAction, ChannelSettings, ServerOp, SERVER_SENDER};
use parley_api::{
    BackendError, DurableMessage, RouterError, RouterStats, SendOutcome, DELIVERY_RECEIPT_MEMBERS, MAX_PRESENCE_BATCH,
};
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::{channel_topic, ControlEvent, Event, PubSub};
use parley_core::access::{Access, MembershipPolicy, Posting, Role, Visibility};
use parley_core::protocol::{ChannelView, MessageView, ServerFrame};
use parley_core::sequencer::{Decision, Placement, SendRequest, Sequencer};
use parley_core::snowflake::{decompose, Snowflake};
use parley_core::{ChannelId, ChannelKind, UserId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, instrument, warn};

/// How long a history read waits for a store that trails the log (see [`LocalRouter::history`]).
const STORE_CATCH_UP: Duration = Duration::from_secs(2);

/// How many channel views one channel list reads at once.
const LIST_CONCURRENCY: usize = 16;

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Snowflake machine id of this writer.
    pub machine_id: u16,
    /// Snowflake epoch (Unix ms).
    pub epoch_ms: u64,
    /// Largest message text in bytes.
    pub max_text_bytes: usize,
    /// Largest channel.
    pub max_channel_members: u32,
    /// Most commands taken in one batch.
    pub batch_max: usize,
    /// Command queue length.
    pub queue: usize,
    /// Channels with more members than this are fanned out on read (their messages go to a feed that each
    /// gateway instance reads once, announced by a notice per batch) and publish no per-member events.
    pub fanout_threshold: u32,
    /// The publisher between the writer and pub/sub.
    pub publisher: PublisherConfig,
    /// Whether users an owner or admin names become members at once or are invited.
    pub membership_policy: MembershipPolicy,
    /// This router's region (`PARLEY_REGION`): the home of the channels it creates. `None` without regions.
    pub region: Option<String>,
    /// The lease of the machine ID, when it is leased from a block ([`crate::machine_lease`]): sends are refused
    /// (`unavailable`, `machine_id_lost: ...`) while it is not valid, and a new ID it holds replaces
    /// [`machine_id`](Self::machine_id). `None`: `machine_id` is this writer's for good.
    pub machine_lease: Option<crate::machine_lease::MachineIdLease>,
    /// Whether pushes are sent (a provider is configured, [`crate::push`]): without, device registrations and
    /// mutes are refused (`push_disabled`).
    pub push: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            machine_id: 0,
            epoch_ms: parley_core::snowflake::DEFAULT_EPOCH_MS,
            max_text_bytes: 4096,
            max_channel_members: 10_000,
            batch_max: 1024,
            queue: 16_384,
            fanout_threshold: 1000,
            publisher: PublisherConfig::default(),
            membership_policy: MembershipPolicy::default(),
            region: None,
            machine_lease: None,
            push: false,
        }
    }
}

enum Command {
    Send { request: SendRequest, reply: oneshot::Sender<Result<SendOutcome, RouterError>> },
    Forget { channel: String, reply: oneshot::Sender<Result<(), RouterError>> },
    Membership { change: MembershipCommand, reply: oneshot::Sender<Result<MembershipOutcome, RouterError>> },
}

enum MembershipCommand {
    Create { creator: UserId, channel: ChannelId, members: Vec<UserId>, settings: ChannelSettings },
    Join { user: UserId, channel: ChannelId },
    Leave { user: UserId, channel: ChannelId },
    OpenDm { user: UserId, channel: ChannelId },
    Manage { actor: Actor, channel: ChannelId, action: ChannelAction },
    ServerCreate { channel: ChannelId, owner: Option<UserId>, members: Vec<UserId>, settings: ChannelSettings },
    Delete { channel: ChannelId },
    Block { user: UserId, other: UserId, blocked: bool },
}

/// Who acts on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Actor {
    /// A user, within their role.
    User(UserId),
    /// The application's backend (server API): every action, no role needed.
    Server,
}

impl Actor {
    fn name(&self) -> &str {
        match self {
            Actor::User(user) => user.as_str(),
            Actor::Server => SERVER_SENDER,
        }
    }

    fn user(&self) -> Option<&UserId> {
        match self {
            Actor::User(user) => Some(user),
            Actor::Server => None,
        }
    }
}

/// What a membership command answers.
enum MembershipOutcome {
    /// The channel as the caller sees it.
    View(ChannelView),
    /// Done (a block).
    Done,
}

/// What a membership command will answer once its run is durable.
enum Answered {
    /// The view of this channel as this user (or the backend, `None`) sees it.
    View(ChannelId, Option<UserId>),
    /// Done.
    Done,
}

/// What to announce about a user and a channel once a membership run is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Announce {
    /// Joined or added: to the user's gateways, and to the members of a small channel.
    Joined,
    /// Left, removed or banned: likewise.
    Left,
    /// Invited by this user: to the user's gateways only.
    Invited(String),
    /// The user's role changed: their gateways send them the channel again.
    Updated,
}

/// Handle to the in-process single writer; cheap to clone. Most code uses it through [`crate::Router`], which
/// is either this or a client of a remote router process.
#[derive(Clone)]
pub struct LocalRouter {
    commands: mpsc::Sender<Command>,
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    pubsub: Arc<dyn PubSub>,
    config: Arc<RouterConfig>,
    stats: Arc<RouterStats>,
    feeds: FeedBook,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LocalRouter").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The longest device token taken (FCM registration tokens are about 160 bytes, APNs tokens 64 hex digits).
pub const MAX_DEVICE_TOKEN_BYTES: usize = 4096;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

impl LocalRouter {
    /// Starts the writer task and returns the handle. The task ends when every handle is dropped.
    pub fn start(
        config: RouterConfig,
        log: Arc<dyn MessageLog>,
        store: Arc<dyn MessageStore>,
        membership: Arc<dyn MembershipStore>,
        pubsub: Arc<dyn PubSub>,
    ) -> Result<(LocalRouter, tokio::task::JoinHandle<()>), RouterError> {
        Self::start_with_tap(config, log, store, membership, pubsub, None)
    }

    /// Like [`start`](Self::start), and hands every durable message of a small channel to `tap` (without
    /// waiting: when the tap's queue is full the message is skipped and counted).
    pub fn start_with_tap(
        config: RouterConfig,
        log: Arc<dyn MessageLog>,
        store: Arc<dyn MessageStore>,
        membership: Arc<dyn MembershipStore>,
        pubsub: Arc<dyn PubSub>,
        tap: Option<mpsc::Sender<DurableMessage>>,
    ) -> Result<(LocalRouter, tokio::task::JoinHandle<()>), RouterError> {
        Self::start_full(config, log, store, membership, pubsub, tap, None)
    }

    /// Like [`start_with_tap`](Self::start_with_tap), and addresses direct events (membership changes) to the
    /// gateway instances that `directory` (the user→gateway registry) locates. Without one, they go to every
    /// gateway ([`parley_bus::pubsub::ALL_GATEWAYS_TOPIC`]), which is right for one gateway and wasteful for many.
    pub fn start_full(
        config: RouterConfig,
        log: Arc<dyn MessageLog>,
        store: Arc<dyn MessageStore>,
        membership: Arc<dyn MembershipStore>,
        pubsub: Arc<dyn PubSub>,
        tap: Option<mpsc::Sender<DurableMessage>>,
        directory: Option<Arc<dyn PresenceStore>>,
    ) -> Result<(LocalRouter, tokio::task::JoinHandle<()>), RouterError> {
        let snowflake = Snowflake::new(config.machine_id, config.epoch_ms).map_err(RouterError::Clock)?;
        let (commands, queue) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(RouterStats::default());
        let feeds = FeedBook::default();
        let (publisher, publisher_task) = publisher::start(config.publisher, pubsub.clone(), directory, stats.clone());
        let writer = Writer {
            queue,
            log: log.clone(),
            membership: membership.clone(),
            publisher,
            sequencer: Sequencer::new(),
            snowflake,
            channels: HashMap::new(),
            config: config.clone(),
            stats: stats.clone(),
            durable_tap: tap,
            feeds: feeds.clone(),
            blocks: HashMap::new(),
            ownership_seen: log.ownership_version(),
            membership_records: config.region.as_ref().map(|_| {
                let (records, batches) = mpsc::channel(MEMBERSHIP_RECORD_QUEUE);
                tokio::spawn(record_memberships(log.clone(), batches, stats.clone()));
                records
            }),
        };
        let task = tokio::spawn(async move {
            writer.run().await;
            // The writer dropped its publisher handle: the publisher drains what is queued, then stops.
            let _ = publisher_task.await;
        });
        Ok((LocalRouter { commands, log, store, membership, pubsub, config: Arc::new(config), stats, feeds }, task))
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Refuses a call about a channel whose partition another router owns (see [`MessageLog::check_owner`]).
    pub fn check_owner(&self, channel: &str) -> Result<(), RouterError> {
        self.log.check_owner(channel).map_err(RouterError::Unavailable)
    }

    async fn submit<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<T, RouterError>>) -> Command,
    ) -> Result<T, RouterError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(build(reply)).await.map_err(|_| RouterError::ShuttingDown)?;
        answer.await.map_err(|_| RouterError::ShuttingDown)?
    }

    /// Sends a message (maybe a retry: an earlier send with the same key is looked up everywhere). Returns once it
    /// is durable.
    pub async fn send(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<SendOutcome, RouterError> {
        self.send_attempt(sender, channel, client_msg_id, text, false).await
    }

    /// Sends a message; `first_attempt` when the sender has never sent this key before, so no earlier send is
    /// looked up in storage (the send never waits for the database). Returns once it is durable.
    #[instrument(skip(self, text), fields(sender = %sender))]
    pub async fn send_attempt(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
        first_attempt: bool,
    ) -> Result<SendOutcome, RouterError> {
        let channel = ChannelId::parse(channel)?;
        let request = self.send_request(&channel, sender.as_str(), client_msg_id, text, first_attempt)?;
        self.submit_send(request).await
    }

    /// A send's request, once its key and text are checked.
    fn send_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        client_msg_id: &str,
        text: &str,
        first_attempt: bool,
    ) -> Result<SendRequest, RouterError> {
        if client_msg_id.is_empty() || client_msg_id.len() > 64 {
            return Err(RouterError::InvalidArgument("client_msg_id must be 1-64 bytes".into()));
        }
        if text.is_empty() {
            return Err(RouterError::InvalidArgument("text must not be empty".into()));
        }
        if text.len() > self.config.max_text_bytes {
            return Err(RouterError::TextTooLong { actual: text.len(), limit: self.config.max_text_bytes });
        }
        Ok(SendRequest {
            channel: channel.to_string(),
            sender: sender.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            text: text.to_owned(),
            first_attempt,
        })
    }

    /// Hands a send to the writer; returns once it is durable (or refused).
    async fn submit_send(&self, request: SendRequest) -> Result<SendOutcome, RouterError> {
        let queued = tokio::time::Instant::now();
        let outcome = self.submit(|reply| Command::Send { request, reply }).await;
        if outcome.as_ref().is_ok_and(|outcome| !outcome.duplicate) {
            self.stats.send_durable_seconds.observe(queued.elapsed().as_secs_f64());
        }
        outcome
    }

    /// Creates a group channel with the creator and `members`.
    pub async fn create_channel(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
    ) -> Result<ChannelView, RouterError> {
        self.create_channel_with(creator, name, members, ChannelSettings::default()).await
    }

    /// The members of a new channel: `first` (if any) then `members`, each a valid user id, each once; refused when
    /// they are more than the channel limit.
    fn new_members(
        &self,
        channel: &ChannelId,
        first: Option<&UserId>,
        members: impl IntoIterator<Item = String>,
    ) -> Result<Vec<UserId>, RouterError> {
        let mut unique: Vec<UserId> = first.into_iter().cloned().collect();
        let mut seen: HashSet<UserId> = unique.iter().cloned().collect();
        for member in members {
            let member = UserId::new(member)?;
            if seen.insert(member.clone()) {
                unique.push(member);
            }
        }
        if unique.len() > self.config.max_channel_members as usize {
            return Err(RouterError::TooManyMembers {
                channel: channel.to_string(),
                limit: self.config.max_channel_members,
            });
        }
        Ok(unique)
    }

    /// Creates a group channel with these settings; the creator is its owner.
    pub async fn create_channel_with(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
        settings: ChannelSettings,
    ) -> Result<ChannelView, RouterError> {
        let channel = ChannelId::group(name)?;
        let unique = self.new_members(&channel, Some(creator), members.iter().cloned())?;
        let change = MembershipCommand::Create { creator: creator.clone(), channel, members: unique, settings };
        let view = self.membership_view(change).await?;
        self.with_read(creator, view).await
    }

    /// An owner's or admin's action on a group channel (see `parley_core::access`); answers the channel as the
    /// actor sees it.
    pub async fn manage_channel(
        &self,
        actor: &UserId,
        channel: &str,
        action: ChannelAction,
    ) -> Result<ChannelView, RouterError> {
        let channel = ChannelId::parse(channel)?;
        if channel.kind() == ChannelKind::Dm {
            return Err(RouterError::InvalidArgument("direct messages have no roles, invitations or bans".into()));
        }
        let change = MembershipCommand::Manage { actor: Actor::User(actor.clone()), channel, action };
        let view = self.membership_view(change).await?;
        self.with_read(actor, view).await
    }

    /// `user` blocks (or unblocks) `other`: sends between them in their direct message are refused while either
    /// blocks the other.
    pub async fn block(&self, user: &UserId, other: &str, blocked: bool) -> Result<(), RouterError> {
        let other = UserId::new(other)?;
        if &other == user {
            return Err(RouterError::InvalidArgument("you cannot block yourself".into()));
        }
        let change = MembershipCommand::Block { user: user.clone(), other, blocked };
        self.submit(|reply| Command::Membership { change, reply }).await?;
        Ok(())
    }

    /// Runs an operation of the application's backend (server API), with full authority over channels.
    pub async fn server(&self, operation: ServerOp) -> Result<Answer, RouterError> {
        let group = |channel: &str| -> Result<ChannelId, RouterError> {
            let channel = ChannelId::parse(channel)?;
            if channel.kind() == ChannelKind::Dm {
                return Err(RouterError::InvalidArgument("the server API manages group channels only".into()));
            }
            Ok(channel)
        };
        match operation {
            ServerOp::CreateChannel { name, owner, members, settings } => {
                let channel = ChannelId::group(&name)?;
                let owner = owner.map(UserId::new).transpose()?;
                let mut unique = self.new_members(&channel, owner.as_ref(), members)?;
                if owner.is_some() {
                    // The owner is passed on its own.
                    unique.remove(0);
                }
                let change = MembershipCommand::ServerCreate { channel, owner, members: unique, settings };
                Ok(Answer::Channel(self.membership_view(change).await?))
            }
            ServerOp::DeleteChannel { channel } => {
                let change = MembershipCommand::Delete { channel: group(&channel)? };
                self.submit(|reply| Command::Membership { change, reply }).await?;
                Ok(Answer::Done)
            }
            ServerOp::Manage { channel, action } => {
                let change = MembershipCommand::Manage { actor: Actor::Server, channel: group(&channel)?, action };
                Ok(Answer::Channel(self.membership_view(change).await?))
            }
            ServerOp::Post { channel, client_msg_id, text } => {
                let request = self.send_request(&group(&channel)?, SERVER_SENDER, &client_msg_id, &text, false)?;
                Ok(Answer::Sent(self.submit_send(request).await?))
            }
            ServerOp::SetRegionFailed { region, .. } => Err(RouterError::InvalidArgument(format!(
                "cannot mark region {region} failed: this router serves no regions (set PARLEY_REGION, \
                 --peer-routers and --peer-token)"
            ))),
            ServerOp::MoveHome { channel, .. } => Err(RouterError::InvalidArgument(format!(
                "cannot move the home of {channel}: this router serves no regions (set PARLEY_REGION, \
                 --peer-routers and --peer-token)"
            ))),
        }
    }

    /// The last durable sequence of `channel` in this writer's log (its store for what the log no longer holds).
    pub async fn last_durable_seq(&self, channel: &str) -> Result<u64, RouterError> {
        self.log.last_seq(channel).await.map_err(RouterError::Unavailable)
    }

    /// The membership store (where channel homes are kept).
    pub fn membership_store(&self) -> Arc<dyn MembershipStore> {
        self.membership.clone()
    }

    /// Forgets what the writer remembers of `channel` (its members, settings and last sequence): the next call
    /// reads it again from the store and the log. Used when the channel's home changes.
    pub async fn forget(&self, channel: &str) -> Result<(), RouterError> {
        self.submit(|reply| Command::Forget { channel: channel.to_owned(), reply }).await
    }

    /// Runs a membership command that answers a channel view.
    async fn membership_view(&self, change: MembershipCommand) -> Result<ChannelView, RouterError> {
        match self.submit(|reply| Command::Membership { change, reply }).await? {
            MembershipOutcome::View(view) => Ok(view),
            MembershipOutcome::Done => Err(RouterError::UnexpectedAnswer { op: "membership" }),
        }
    }

    /// Joins a group channel (idempotent).
    pub async fn join(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        let channel = ChannelId::parse(channel)?;
        if channel.kind() == ChannelKind::Dm {
            return Err(RouterError::InvalidArgument("direct messages cannot be joined; use open_dm".into()));
        }
        let change = MembershipCommand::Join { user: user.clone(), channel };
        let view = self.membership_view(change).await?;
        self.with_read(user, view).await
    }

    /// Leaves a group channel.
    pub async fn leave(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        let channel = ChannelId::parse(channel)?;
        if channel.kind() == ChannelKind::Dm {
            return Err(RouterError::InvalidArgument("direct messages cannot be left".into()));
        }
        let change = MembershipCommand::Leave { user: user.clone(), channel };
        let view = self.membership_view(change).await?;
        self.with_read(user, view).await
    }

    /// Opens the DM between `user` and `other`, creating it on first use.
    pub async fn open_dm(&self, user: &UserId, other: &str) -> Result<ChannelView, RouterError> {
        let other = UserId::new(other)?;
        let channel = ChannelId::direct(user, &other)?;
        let change = MembershipCommand::OpenDm { user: user.clone(), channel };
        let view = self.membership_view(change).await?;
        self.with_read(user, view).await
    }

    /// Reads a page of history of a channel the user is a member of.
    #[instrument(skip(self), fields(user = %user))]
    pub async fn history(
        &self,
        user: &UserId,
        channel: &str,
        mut query: HistoryQuery,
    ) -> Result<HistoryPage, RouterError> {
        let channel = ChannelId::parse(channel)?;
        if query.limit == 0 {
            query.limit = 50;
        }
        if query.limit > 200 {
            return Err(RouterError::InvalidArgument("limit must be 1-200".into()));
        }
        self.require_member(user, &channel).await?;
        let from = self.history_from(&channel).await?;
        if from <= 1 {
            return self.read_page(&channel, query).await;
        }
        // A channel created again after a deletion: nothing before `from` is readable.
        if query.before.is_some_and(|before| before <= from) {
            return Ok(HistoryPage { messages: Vec::new(), has_more: false });
        }
        if let Some(after) = query.after {
            query.after = Some(after.max(from - 1));
        }
        let mut page = self.read_page(&channel, query).await?;
        let before = page.messages.len();
        page.messages.retain(|message| message.seq >= from);
        if page.messages.len() < before {
            page.has_more = false;
        }
        Ok(page)
    }

    /// The first readable sequence of a channel (1 for most; later for a channel created again after a deletion).
    async fn history_from(&self, channel: &ChannelId) -> Result<u64, RouterError> {
        if channel.kind() == ChannelKind::Dm {
            return Ok(1);
        }
        let record = self.membership.channel(channel.as_str()).await.map_err(RouterError::Unavailable)?;
        Ok(record.map(|record| record.history_from).unwrap_or(0).max(1))
    }

    /// A large channel's messages after `after` (at most `limit`, 1-200), for a gateway that serves all its
    /// members from one read (fan-out on read). Answered from the writer's in-memory feed; a reader further behind
    /// than the feed holds (or after a restart) is answered from the store. No membership check: only gateways
    /// call it, on behalf of members they hold.
    #[instrument(skip(self))]
    pub async fn feed(&self, channel: &str, after: u64, limit: u32) -> Result<HistoryPage, RouterError> {
        let channel = ChannelId::parse(channel)?;
        if !(1..=200).contains(&limit) {
            return Err(RouterError::InvalidArgument("limit must be 1-200".into()));
        }
        if let Some(mut messages) = self.feeds.read(channel.as_str(), after, limit as usize + 1) {
            self.stats.feed_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let has_more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            return Ok(HistoryPage { messages, has_more });
        }
        self.stats.feed_store_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.read_page(&channel, HistoryQuery { before: None, after: Some(after), limit }).await
    }

    /// Records presence changes a gateway saw, in the order given (see [`MessageLog::record_presence`]): on
    /// Kafka, `{prefix}presence` keyed by user. At most [`MAX_PRESENCE_BATCH`] per call; every user must be a
    /// valid user id and every instance non-empty, or nothing is recorded. Only gateways call it.
    #[instrument(skip(self, updates), fields(updates = updates.len()))]
    pub async fn record_presence(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
        if updates.len() > MAX_PRESENCE_BATCH {
            return Err(RouterError::InvalidArgument(format!(
                "{} presence changes in one call (at most {MAX_PRESENCE_BATCH})",
                updates.len()
            )));
        }
        for update in &updates {
            UserId::new(update.user.as_str())?;
            if update.instance.is_empty() || update.instance.len() > 128 {
                return Err(RouterError::InvalidArgument("a presence change needs its instance (1-128 bytes)".into()));
            }
        }
        let count = updates.len() as u64;
        self.log.record_presence(updates).await.map_err(RouterError::Unavailable)?;
        self.stats.presence_records.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn read_page(&self, channel: &ChannelId, query: HistoryQuery) -> Result<HistoryPage, RouterError> {
        let mut page = self.store.history(channel.as_str(), query).await.map_err(RouterError::Unavailable)?;
        if query.before.is_some() {
            return Ok(page);
        }
        // A page that reaches the newest stored message must also reach the newest durable one. When the store
        // follows a separate log (Kafka → store writer → Cassandra) it can trail by a few milliseconds: wait for
        // it (bounded), so a client filling a gap right after a message was confirmed finds it.
        // Only such a page can be short; the others skip the extra read of the log.
        let reaches_end = |page: &HistoryPage| query.after.is_none() || !page.has_more;
        if !reaches_end(&page) {
            return Ok(page);
        }
        let last = self.log.last_seq(channel.as_str()).await.map_err(RouterError::Unavailable)?;
        let deadline = tokio::time::Instant::now() + STORE_CATCH_UP;
        let mut pause = Duration::from_millis(5);
        loop {
            let newest = page.messages.last().map(|message| message.seq).unwrap_or(query.after.unwrap_or(0));
            if !reaches_end(&page) || newest >= last {
                return Ok(page);
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(channel = %channel, newest, last, "history: the store trails the log; page returned short");
                return Ok(page);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            page = self.store.history(channel.as_str(), query).await.map_err(RouterError::Unavailable)?;
        }
    }

    async fn require_member(&self, user: &UserId, channel: &ChannelId) -> Result<(), RouterError> {
        if self.membership.is_member(channel.as_str(), user.as_str()).await.map_err(RouterError::Unavailable)? {
            return Ok(());
        }
        if let Some((first, second)) = channel.dm_members() {
            if &first == user || &second == user {
                // A DM nobody has written to yet: its members are known, it is just empty.
                return Ok(());
            }
            return Err(RouterError::NotAMember(channel.to_string()));
        }
        match self.membership.channel(channel.as_str()).await.map_err(RouterError::Unavailable)? {
            Some(_) => Err(RouterError::NotAMember(channel.to_string())),
            None => Err(RouterError::NoSuchChannel(channel.to_string())),
        }
    }

    /// The user's channels.
    pub async fn list_channels(&self, user: &UserId) -> Result<Vec<ChannelView>, RouterError> {
        use futures_util::{StreamExt, TryStreamExt};
        let channels = self.membership.user_channels(user.as_str()).await.map_err(RouterError::Unavailable)?;
        // Views are read a few at a time: a connect costs a couple of store round trips, not four per channel.
        futures_util::stream::iter(channels.into_iter().filter_map(|channel| ChannelId::parse(channel).ok()))
            .map(|id| async move { self.channel_view(user, &id).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await
    }

    /// One channel as the user sees it (its four reads in parallel).
    pub async fn channel_view(&self, user: &UserId, channel: &ChannelId) -> Result<ChannelView, RouterError> {
        let (record, joined, last_seq, read_seq, access) = tokio::try_join!(
            self.membership.channel(channel.as_str()),
            self.membership.is_member(channel.as_str(), user.as_str()),
            self.log.last_seq(channel.as_str()),
            self.membership.read_seq(user.as_str(), channel.as_str()),
            self.membership.access_of(channel.as_str(), user.as_str()),
        )
        .map_err(RouterError::Unavailable)?;
        let group = channel.kind() == ChannelKind::Group;
        let read_seq = read_seq.max(record.as_ref().map(|record| record.history_from).unwrap_or(0).saturating_sub(1));
        Ok(ChannelView {
            id: channel.to_string(),
            kind: channel.kind(),
            name: channel.display_name(user),
            members: record.as_ref().map(|record| record.member_count).unwrap_or(0),
            last_seq,
            joined,
            read_seq,
            unread: last_seq.saturating_sub(read_seq),
            visibility: record.as_ref().map(|record| record.visibility).unwrap_or_default(),
            posting: record.as_ref().map(|record| record.posting).unwrap_or_default(),
            role: (joined && group).then(|| Access::role(access)),
        })
    }

    /// Moves the user's read cursor forward (clamped to the last sequence) and tells the channel's members.
    /// Returns the cursor.
    #[instrument(skip(self), fields(user = %user))]
    pub async fn mark_read(&self, user: &UserId, channel: &str, seq: u64) -> Result<u64, RouterError> {
        let channel = ChannelId::parse(channel)?;
        self.require_member(user, &channel).await?;
        let last = self.log.last_seq(channel.as_str()).await.map_err(RouterError::Unavailable)?;
        let cursor = self
            .membership
            .set_read(user.as_str(), channel.as_str(), seq.min(last))
            .await
            .map_err(RouterError::Unavailable)?;
        let record = self.membership.channel(channel.as_str()).await.map_err(RouterError::Unavailable)?;
        let announce = record.is_none_or(|record| record.member_count <= self.config.fanout_threshold);
        // Into the log too (the receipts topic other regions mirror); a cursor is only confirmed once it is.
        let receipt =
            ReadReceipt { channel: channel.to_string(), user: user.to_string(), seq: cursor, ts: now_ms(), announce };
        self.log.record_read(receipt).await.map_err(RouterError::Unavailable)?;
        if announce {
            let event = ControlEvent::Read { channel: channel.to_string(), user: user.to_string(), seq: cursor };
            if let Err(error) =
                self.pubsub.publish(&channel_topic(channel.as_str()), Event::Control(event).encode()).await
            {
                self.stats.publish_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(%error, "read receipt publish failed");
            }
        }
        Ok(cursor)
    }

    /// A member's client acknowledged everything up to `seq`: tell the channel (only channels of at most
    /// [`DELIVERY_RECEIPT_MEMBERS`] members, so receipts never grow quadratically). Not stored. Only a member may
    /// (like [`LocalRouter::mark_read`]): a receipt from anyone else is refused (`not_a_member`, or
    /// `no_such_channel`) and nothing is published.
    pub async fn mark_delivered(&self, user: &UserId, channel: &str, seq: u64) -> Result<(), RouterError> {
        let channel = ChannelId::parse(channel)?;
        self.require_member(user, &channel).await?;
        let Some(record) = self.membership.channel(channel.as_str()).await.map_err(RouterError::Unavailable)? else {
            return Ok(());
        };
        if record.member_count > DELIVERY_RECEIPT_MEMBERS {
            return Ok(());
        }
        let event = ControlEvent::Delivered { channel: channel.to_string(), user: user.to_string(), seq };
        self.pubsub
            .publish(&channel_topic(channel.as_str()), Event::Control(event).encode())
            .await
            .map_err(RouterError::Unavailable)
    }

    /// The members of a channel the user belongs to.
    pub async fn members(&self, user: &UserId, channel: &str) -> Result<Vec<String>, RouterError> {
        let channel = ChannelId::parse(channel)?;
        self.require_member(user, &channel).await?;
        self.membership.members(channel.as_str()).await.map_err(RouterError::Unavailable)
    }

    /// Registers one of `user`'s push devices (`platform`: `fcm` or `apns`) or forgets it; whether it was
    /// registered for them before.
    pub async fn device(
        &self,
        user: &UserId,
        platform: &str,
        token: &str,
        register: bool,
    ) -> Result<bool, RouterError> {
        if !self.config.push {
            return Err(RouterError::PushDisabled);
        }
        let platform = parley_push::Platform::parse(platform)
            .ok_or_else(|| RouterError::InvalidArgument(format!("unknown platform {platform:?}; use fcm or apns")))?;
        if token.is_empty() || token.len() > MAX_DEVICE_TOKEN_BYTES || token.chars().any(char::is_control) {
            return Err(RouterError::InvalidArgument(format!(
                "a device token is 1-{MAX_DEVICE_TOKEN_BYTES} bytes without control characters"
            )));
        }
        let device = parley_push::Device::new(platform, token);
        let done = if register {
            self.membership.register_device(user.as_str(), &device, crate::push::MAX_DEVICES_PER_USER).await
        } else {
            self.membership.unregister_device(&device, Some(user.as_str())).await
        };
        done.map_err(RouterError::Unavailable)
    }

    /// Mutes `channel`'s push notifications for `user` (a member) until `until` (Unix ms; `u64::MAX`: until
    /// unmuted), or unmutes it with `None` (a member or not).
    pub async fn mute(&self, user: &UserId, channel: &str, until: Option<u64>) -> Result<(), RouterError> {
        if !self.config.push {
            return Err(RouterError::PushDisabled);
        }
        let channel = ChannelId::parse(channel)?;
        if let Some(until) = until {
            if until <= now_ms() {
                return Err(RouterError::InvalidArgument(format!("until ({until}) is not in the future")));
            }
            self.require_member(user, &channel).await?;
        }
        self.membership.set_mute(user.as_str(), channel.as_str(), until).await.map_err(RouterError::Unavailable)
    }

    /// Adds the viewer's read cursor to a view.
    async fn with_read(&self, user: &UserId, mut view: ChannelView) -> Result<ChannelView, RouterError> {
        let read = self.membership.read_seq(user.as_str(), &view.id).await.map_err(RouterError::Unavailable)?;
        // Nothing hidden counts as unread (a channel created again after a deletion).
        let from = match ChannelId::parse(view.id.as_str()) {
            Ok(id) => self.history_from(&id).await?,
            Err(_) => 1,
        };
        view.read_seq = read.max(from - 1);
        view.unread = view.last_seq.saturating_sub(view.read_seq);
        Ok(view)
    }

    /// The oldest retained sequence of a channel.
    pub async fn first_retained_seq(&self, channel: &str) -> Result<u64, RouterError> {
        let retained = self.store.first_retained_seq(channel).await.map_err(RouterError::Unavailable)?;
        let from = match ChannelId::parse(channel) {
            Ok(id) => self.history_from(&id).await?,
            Err(_) => 1,
        };
        Ok(retained.max(from))
    }
}

struct CachedChannel {
    kind: ChannelKind,
    members: HashSet<String>,
    visibility: Visibility,
    posting: Posting,
    /// Roles, invitations and bans (group channels).
    access: HashMap<String, Access>,
}

impl CachedChannel {
    fn new(kind: ChannelKind, members: impl IntoIterator<Item = String>) -> Self {
        Self {
            kind,
            members: members.into_iter().collect(),
            visibility: Visibility::default(),
            posting: Posting::default(),
            access: HashMap::new(),
        }
    }

    fn role(&self, user: &str) -> Role {
        Access::role(self.access.get(user).copied())
    }

    fn owners(&self) -> usize {
        self.access.values().filter(|access| **access == Access::Owner).count()
    }
}

struct Writer {
    queue: mpsc::Receiver<Command>,
    log: Arc<dyn MessageLog>,
    membership: Arc<dyn MembershipStore>,
    publisher: PublisherHandle,
    sequencer: Sequencer,
    snowflake: Snowflake,
    channels: HashMap<String, CachedChannel>,
    config: RouterConfig,
    stats: Arc<RouterStats>,
    durable_tap: Option<mpsc::Sender<DurableMessage>>,
    feeds: FeedBook,
    /// The users each user blocked (loaded on demand, bounded like the channel cache).
    blocks: HashMap<String, HashSet<String>>,
    /// The log's ownership version the caches above were filled under.
    ownership_seen: u64,
    /// Durable membership changes for other regions ([`MessageLog::record_memberships`]), in order, when the writer
    /// has a region.
    membership_records: Option<mpsc::Sender<Vec<MembershipEvent>>>,
}

/// How many batches of membership changes may wait for the log before new ones are dropped (and counted).
const MEMBERSHIP_RECORD_QUEUE: usize = 1024;

/// Appends membership changes for other regions, in order, retrying each batch a few times: a batch that cannot be
/// recorded is logged and counted, and the other regions' gateways learn of those changes at their users' next
/// channel list.
async fn record_memberships(
    log: Arc<dyn MessageLog>,
    mut batches: mpsc::Receiver<Vec<MembershipEvent>>,
    stats: Arc<RouterStats>,
) {
    while let Some(events) = batches.recv().await {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=5 {
            match log.record_memberships(events.clone()).await {
                Ok(()) => break,
                Err(error) if attempt == 5 => {
                    stats.memberships_unrecorded.fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    warn!(%error, changes = events.len(), "membership changes were not recorded for other regions");
                }
                Err(error) => {
                    debug!(%error, attempt, "recording membership changes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

type SendItem = (SendRequest, oneshot::Sender<Result<SendOutcome, RouterError>>);

/// A membership run whose write is in flight.
struct PendingMembership {
    /// The write, in its own task.
    write: tokio::task::JoinHandle<Result<(), BackendError>>,
    /// The channels it changes: their sends wait for it.
    touched: HashSet<String>,
    /// The callers, answered once it is written (or has failed).
    answers: Vec<MembershipAnswer>,
    /// What to announce once it is written.
    events: Vec<(String, String, Announce)>,
    /// Users whose blocks it changes (their cached block lists are dropped once it ends).
    blockers: Vec<String>,
    /// Sends to the touched channels that arrived meanwhile, in arrival order.
    held: Vec<SendItem>,
}
type MembershipAnswer = (oneshot::Sender<Result<MembershipOutcome, RouterError>>, Result<Answered, RouterError>);
type MembershipItem = (MembershipCommand, oneshot::Sender<Result<MembershipOutcome, RouterError>>);

/// What one membership run changes and announces.
#[derive(Default)]
struct Run {
    changes: Vec<MembershipChange>,
    events: Vec<(String, String, Announce)>,
    touched: HashSet<String>,
    blockers: Vec<String>,
}

impl Run {
    fn add(&mut self, channel: &str, user: &str) {
        self.changes.push(MembershipChange::Add { channel: channel.to_owned(), user: user.to_owned() });
        self.announce(channel, user, Announce::Joined);
    }

    fn remove(&mut self, channel: &str, user: &str) {
        self.changes.push(MembershipChange::Remove { channel: channel.to_owned(), user: user.to_owned() });
        self.announce(channel, user, Announce::Left);
    }

    fn set_access(&mut self, channel: &str, user: &str, access: Option<Access>) {
        self.changes.push(MembershipChange::SetAccess { channel: channel.to_owned(), user: user.to_owned(), access });
    }

    fn announce(&mut self, channel: &str, user: &str, announce: Announce) {
        self.events.push((channel.to_owned(), user.to_owned(), announce));
    }
}

impl Writer {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.config.batch_max);
        let mut pending: Option<PendingMembership> = None;
        loop {
            let first = tokio::select! {
                biased;
                written = async {
                    match pending.as_mut() {
                        Some(waiting) => (&mut waiting.write).await,
                        None => std::future::pending().await,
                    }
                }, if pending.is_some() =>
                {
                    if let Some(done) = pending.take() {
                        self.finish_membership(done, written).await;
                    }
                    continue;
                }
                command = self.queue.recv() => match command {
                    Some(command) => command,
                    None => break,
                },
            };
            batch.push(first);
            while batch.len() < self.config.batch_max {
                match self.queue.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.sync_ownership();
            // Split into runs of one kind, keeping arrival order between runs.
            let mut sends: Vec<SendItem> = Vec::new();
            let mut changes: Vec<MembershipItem> = Vec::new();
            for command in batch.drain(..) {
                match command {
                    Command::Send { request, reply } => {
                        if !changes.is_empty() {
                            self.start_membership(&mut pending, std::mem::take(&mut changes)).await;
                        }
                        match pending.as_mut() {
                            Some(waiting) if waiting.touched.contains(&request.channel) => {
                                waiting.held.push((request, reply))
                            }
                            _ => sends.push((request, reply)),
                        }
                    }
                    Command::Membership { change, reply } => {
                        if !sends.is_empty() {
                            self.send_run(std::mem::take(&mut sends)).await;
                        }
                        changes.push((change, reply));
                    }
                    Command::Forget { channel, reply } => {
                        // Everything before it is done first, so nothing decided under the old state is left.
                        if !sends.is_empty() {
                            self.send_run(std::mem::take(&mut sends)).await;
                        }
                        if !changes.is_empty() {
                            self.start_membership(&mut pending, std::mem::take(&mut changes)).await;
                        }
                        if let Some(mut done) = pending.take() {
                            let written = (&mut done.write).await;
                            self.finish_membership(done, written).await;
                        }
                        self.channels.remove(&channel);
                        self.sequencer.forget(&channel);
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            if !sends.is_empty() {
                self.send_run(sends).await;
            }
            if !changes.is_empty() {
                self.start_membership(&mut pending, changes).await;
            }
        }
        // The queue is closed: the write in flight still answers its callers and releases its held sends.
        if let Some(mut done) = pending.take() {
            let written = (&mut done.write).await;
            self.finish_membership(done, written).await;
        }
        debug!("router writer stopped");
    }

    /// Drops everything cached about channels when the log's partitions changed hands: channels this writer
    /// gained were written by another writer meanwhile (their sequences, members and feeds are reloaded from the
    /// log and the store), and those it lost are no longer its to cache.
    fn sync_ownership(&mut self) {
        let version = self.log.ownership_version();
        if version == self.ownership_seen {
            return;
        }
        self.ownership_seen = version;
        self.sequencer = Sequencer::new();
        self.channels.clear();
        self.blocks.clear();
        self.feeds.clear();
        debug!(version, "partitions changed hands: the writer's caches were dropped");
    }

    /// Loads a channel's members and last sequence into memory; `Ok(false)` when it does not exist.
    async fn load(&mut self, channel: &ChannelId) -> Result<bool, BackendError> {
        if self.channels.contains_key(channel.as_str()) {
            return Ok(true);
        }
        let Some(record) = self.membership.channel(channel.as_str()).await? else {
            return Ok(false);
        };
        let members: HashSet<String> = self.membership.members(channel.as_str()).await?.into_iter().collect();
        let access = match record.kind {
            ChannelKind::Group => self.membership.access(channel.as_str()).await?.into_iter().collect(),
            ChannelKind::Dm => HashMap::new(),
        };
        if !self.sequencer.knows(channel.as_str()) {
            let last = self.log.last_seq(channel.as_str()).await?;
            // A channel whose home moved here continues after the last sequence of its former home.
            let base = match (&record.home, &self.config.region) {
                (Some(home), Some(region)) if &home.region == region => home.base_seq,
                _ => 0,
            };
            self.sequencer.load(channel.as_str(), last.max(base));
        }
        if let Some(home) = &record.home {
            self.log.set_home(channel.as_str(), home);
        }
        if self.channels.len() >= 100_000 {
            // Bound the cache; everything in it can be reloaded from the store.
            self.channels.clear();
        }
        let cached = CachedChannel {
            kind: record.kind,
            members,
            visibility: record.visibility,
            posting: record.posting,
            access,
        };
        self.channels.insert(channel.to_string(), cached);
        Ok(true)
    }

    /// Whether `user` blocked `other` (the user's block list is loaded once, then kept).
    async fn blocks(&mut self, user: &str, other: &str) -> Result<bool, BackendError> {
        if !self.blocks.contains_key(user) {
            let blocked: HashSet<String> = self.membership.blocked(user).await?.into_iter().collect();
            if self.blocks.len() >= 100_000 {
                self.blocks.clear();
            }
            self.blocks.insert(user.to_owned(), blocked);
        }
        Ok(self.blocks.get(user).is_some_and(|blocked| blocked.contains(other)))
    }

    /// Whether `sender` may post in `channel` (a member): its posting rule, or the DM's blocks.
    async fn may_post(&mut self, channel: &ChannelId, sender: &str) -> Result<(), RouterError> {
        match channel.dm_members() {
            Some((first, second)) => {
                let other = if first.as_str() == sender { second } else { first };
                let recipient_blocked = self.blocks(other.as_str(), sender).await.map_err(RouterError::Unavailable)?;
                let sender_blocked = self.blocks(sender, other.as_str()).await.map_err(RouterError::Unavailable)?;
                parley_core::access::can_send_dm(recipient_blocked, sender_blocked)
                    .map_err(|reason| RouterError::Blocked(reason.to_owned()))
            }
            None => match self.channels.get(channel.as_str()) {
                Some(cached) => {
                    Ok(parley_core::access::can_post(channel.as_str(), cached.posting, cached.role(sender))?)
                }
                None => Ok(()),
            },
        }
    }

    /// The channel as `viewer` sees it (`None`: as the backend sees it, a member of nothing).
    fn view(&self, channel: &ChannelId, viewer: Option<&UserId>) -> ChannelView {
        let cached = self.channels.get(channel.as_str());
        let name = match viewer {
            Some(viewer) => channel.display_name(viewer),
            None => channel.as_str().strip_prefix("g:").unwrap_or(channel.as_str()).to_owned(),
        };
        let member = |cached: &CachedChannel| viewer.is_some_and(|viewer| cached.members.contains(viewer.as_str()));
        ChannelView {
            id: channel.to_string(),
            kind: channel.kind(),
            name,
            members: cached.map(|cached| cached.members.len() as u32).unwrap_or(0),
            last_seq: self.sequencer.last_seq(channel.as_str()).unwrap_or(0),
            joined: cached.is_some_and(member),
            read_seq: 0,
            unread: 0,
            visibility: cached.map(|cached| cached.visibility).unwrap_or_default(),
            posting: cached.map(|cached| cached.posting).unwrap_or_default(),
            role: cached
                .filter(|cached| cached.kind == ChannelKind::Group && member(cached))
                .zip(viewer)
                .map(|(cached, viewer)| cached.role(viewer.as_str())),
        }
    }

    #[instrument(skip_all, fields(sends = items.len()))]
    async fn send_run(&mut self, items: Vec<SendItem>) {
        // DMs are created on first use so that a send to a DM never needs a separate call.
        let mut new_dms = Vec::new();
        for (request, _) in &items {
            if let Ok(channel) = ChannelId::parse(request.channel.clone()) {
                if channel.kind() == ChannelKind::Dm
                    && !self.channels.contains_key(channel.as_str())
                    && !new_dms.contains(&channel)
                {
                    match self.load(&channel).await {
                        Ok(true) => {}
                        Ok(false) => new_dms.push(channel),
                        Err(error) => warn!(%error, "failed to load channel"),
                    }
                }
            }
        }
        if !new_dms.is_empty() {
            let mut changes = Vec::new();
            for channel in &new_dms {
                if let Some((first, second)) = channel.dm_members() {
                    changes.extend(dm_changes(channel, &first, &second, self.new_home()));
                }
            }
            if self.membership.apply(changes).await.is_ok() {
                let mut events = Vec::new();
                for channel in &new_dms {
                    if let Some((first, second)) = channel.dm_members() {
                        self.cache_new(channel, ChannelKind::Dm, [first.to_string(), second.to_string()]);
                        events.push((channel.to_string(), first.to_string(), Announce::Joined));
                        events.push((channel.to_string(), second.to_string(), Announce::Joined));
                    }
                }
                // Announced before the batch's messages: the publisher keeps the order it is given.
                self.announce_memberships(events).await;
            }
        }

        let mut accepted: Vec<SendItem> = Vec::with_capacity(items.len());
        for (request, reply) in items {
            // The channel's partition may have changed hands since the call was checked on arrival.
            let owned = ChannelId::parse(request.channel.clone()).map_err(RouterError::from).and_then(|channel| {
                self.log.check_owner(channel.as_str()).map_err(RouterError::Unavailable)?;
                Ok(channel)
            });
            let verdict = match owned {
                Err(error) => Err(error),
                Ok(channel) => match self.load(&channel).await {
                    Err(error) => Err(RouterError::Unavailable(error)),
                    Ok(false) => Err(RouterError::NoSuchChannel(request.channel.clone())),
                    // The backend posts into any group channel (the server API checks the channel kind).
                    Ok(true) if request.sender == SERVER_SENDER => Ok(()),
                    Ok(true) => {
                        let member = self
                            .channels
                            .get(channel.as_str())
                            .is_some_and(|cached| cached.members.contains(&request.sender));
                        if member {
                            self.may_post(&channel, &request.sender).await
                        } else {
                            Err(RouterError::NotAMember(request.channel.clone()))
                        }
                    }
                },
            };
            match verdict {
                Ok(()) => accepted.push((request, reply)),
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }

        // Earlier sends are looked up only for keys that may be retries: a first attempt never waits for storage.
        let retried: Vec<(String, String)> = accepted
            .iter()
            .filter(|(request, _)| !request.first_attempt)
            .map(|(request, _)| (request.sender.clone(), request.client_msg_id.clone()))
            .collect();
        let found = if retried.is_empty() { Ok(Vec::new()) } else { self.log.find_sends(retried.clone()).await };
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                // Retries cannot be told from new sends now: refuse them (the client tries again), keep the rest.
                let message = error.to_string();
                let (keep, refuse): (Vec<SendItem>, Vec<SendItem>) =
                    accepted.into_iter().partition(|(request, _)| request.first_attempt);
                for (_, reply) in refuse {
                    let _ = reply.send(Err(RouterError::Unavailable(BackendError::Unavailable(message.clone()))));
                }
                accepted = keep;
                if accepted.is_empty() {
                    return;
                }
                Vec::new()
            }
        };
        let prior: HashMap<(String, String), (String, Placement)> = retried
            .into_iter()
            .zip(found)
            .filter_map(|(key, found)| found.map(|found| (key, (found.channel, found.placement))))
            .collect();
        // Right before ids are issued: a leased machine id is used only while the lease is valid.
        if let Some(lease) = &self.config.machine_lease {
            match lease.current() {
                Ok(id) if id != self.snowflake.machine_id() => match Snowflake::new(id, self.config.epoch_ms) {
                    Ok(snowflake) => {
                        debug!(machine_id = id, "issuing ids with a newly leased machine id");
                        self.snowflake = snowflake;
                    }
                    Err(error) => {
                        for (_, reply) in accepted {
                            let _ = reply.send(Err(RouterError::Clock(error.clone())));
                        }
                        return;
                    }
                },
                Ok(_) => {}
                Err(message) => {
                    for (_, reply) in accepted {
                        let _ = reply.send(Err(RouterError::Unavailable(BackendError::Unavailable(message.clone()))));
                    }
                    return;
                }
            }
        }
        let requests: Vec<SendRequest> = accepted.iter().map(|(request, _)| request.clone()).collect();
        let plan = self.sequencer.plan(
            &requests,
            |sender, client_msg_id| {
                prior.get(&(sender.to_owned(), client_msg_id.to_owned())).map(|(_, placement)| *placement)
            },
            &mut self.snowflake,
            now_ms(),
        );

        let mut fresh = Vec::new();
        let mut fresh_ids = HashSet::new();
        for (request, decision) in requests.iter().zip(&plan.decisions) {
            if let Decision::New(placement) = decision {
                fresh_ids.insert(placement.id);
                fresh.push(MessageView {
                    channel: request.channel.clone(),
                    seq: placement.seq,
                    id: placement.id,
                    sender: request.sender.clone(),
                    text: request.text.clone(),
                    ts: decompose(placement.id, self.config.epoch_ms).unix_ms,
                    client_msg_id: request.client_msg_id.clone(),
                });
            }
        }
        // Timestamps come from the ids, so they never go backwards within a channel.
        let written = if fresh.is_empty() { Ok(()) } else { self.log.append(fresh.clone()).await };
        if let Err(error) = &written {
            self.stats.write_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(%error, "durable append failed; nothing confirmed");
            // A log that commits per partition (Kafka) may have made part of a failed batch durable, or learn
            // only later that a commit it could not confirm went through. Take the log's word for each
            // channel's last sequence, so the next plan neither reuses a durable sequence nor leaves a gap.
            let mut channels: Vec<&str> = fresh.iter().map(|message| message.channel.as_str()).collect();
            channels.sort_unstable();
            channels.dedup();
            for channel in channels {
                if let Ok(durable) = self.log.last_seq(channel).await {
                    if self.sequencer.last_seq(channel).is_some_and(|planned| durable > planned) {
                        self.sequencer.load(channel, durable);
                    }
                }
            }
        } else {
            self.sequencer.commit(&plan);
            self.stats.messages.fetch_add(fresh.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.stats.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for (((request, reply), decision), placement_channel) in
            accepted.into_iter().zip(plan.decisions).zip(requests.iter().map(|request| request.channel.clone()))
        {
            let outcome = match decision {
                Decision::New(placement) => match &written {
                    Ok(()) => Ok(SendOutcome { channel: placement_channel, placement, duplicate: false }),
                    Err(error) => Err(refused(error, &placement_channel)),
                },
                Decision::Duplicate(placement) => {
                    if fresh_ids.contains(&placement.id) {
                        match &written {
                            Ok(()) => Ok(SendOutcome { channel: placement_channel, placement, duplicate: true }),
                            Err(error) => Err(refused(error, &placement_channel)),
                        }
                    } else {
                        let channel = prior
                            .get(&(request.sender.clone(), request.client_msg_id.clone()))
                            .map(|(channel, _)| channel.clone())
                            .unwrap_or(placement_channel);
                        Ok(SendOutcome { channel, placement, duplicate: true })
                    }
                }
                Decision::Refused(error) => Err(RouterError::Clock(error)),
            };
            let _ = reply.send(outcome);
        }
        if written.is_ok() {
            // Confirmed first, then announced.
            self.fan_out(fresh).await;
        }
    }

    /// Hands a durable batch to its readers. Small channels are pushed: each message is published on its
    /// channel's topic. Large ones are fanned out on read: their messages go to the channel's feed, and one notice
    /// per channel says which sequences are new. The publisher sends it all in one pipelined publish, in order.
    async fn fan_out(&self, fresh: Vec<MessageView>) {
        let threshold = self.config.fanout_threshold as usize;
        let mut publications: Vec<(String, Bytes)> = Vec::with_capacity(fresh.len());
        let mut large: HashMap<String, Vec<MessageView>> = HashMap::new();
        let mut small: HashSet<String> = HashSet::new();
        for message in fresh {
            let members = self.channels.get(&message.channel).map(|cached| &cached.members);
            let is_large = members.is_some_and(|members| members.len() > threshold);
            if let (Some(tap), Some(members)) = (&self.durable_tap, members.filter(|_| !is_large)) {
                // Offline notification is best effort and must never slow the writer: drop when full.
                let recipients = members.iter().filter(|member| **member != message.sender).cloned().collect();
                if tap.try_send(DurableMessage { message: message.clone(), recipients }).is_err() {
                    self.stats.tap_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if is_large {
                large.entry(message.channel.clone()).or_default().push(message);
                continue;
            }
            if !small.contains(&message.channel) {
                small.insert(message.channel.clone());
            }
            let topic = channel_topic(&message.channel);
            let (seq, ts) = (message.seq, message.ts);
            let frame = Bytes::from(ServerFrame::Message(message).to_json());
            publications.push((topic, Event::Message { seq, ts, frame }.encode()));
        }
        for channel in &small {
            // A channel that became small again is pushed from now on; its feed would only go stale.
            self.feeds.forget(channel);
        }
        for (channel, messages) in large {
            let (Some(first), Some(last)) = (messages.first().map(|m| m.seq), messages.last().map(|m| m.seq)) else {
                continue;
            };
            self.stats.feed_messages.fetch_add(messages.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.stats.feed_notices.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The feed holds them before anyone hears of them.
            self.feeds.push(&channel, messages);
            publications.push((channel_topic(&channel), Event::Feed { first, last }.encode()));
        }
        if publications.is_empty() {
            return;
        }
        self.publisher.submit(Job::Publications(publications)).await;
    }

    /// The home of a channel this writer creates: its region, at epoch 1.
    fn new_home(&self) -> Option<Home> {
        self.config.region.clone().map(|region| Home { region, epoch: 1, base_seq: 0 })
    }

    fn cache_new(&mut self, channel: &ChannelId, kind: ChannelKind, members: impl IntoIterator<Item = String>) {
        if let Some(home) = self.new_home() {
            self.log.set_home(channel.as_str(), &home);
        }
        self.sequencer.load(channel.as_str(), self.sequencer.last_seq(channel.as_str()).unwrap_or(0));
        self.channels.insert(channel.to_string(), CachedChannel::new(kind, members));
    }

    /// Hands membership changes to the publisher: each goes to the gateways holding the user, and small
    /// channels' members hear of it too (large channels get no per-member events: that would be quadratic).
    async fn announce_memberships(&self, events: Vec<(String, String, Announce)>) {
        if events.is_empty() {
            return;
        }
        let threshold = self.config.fanout_threshold as usize;
        let events = events
            .into_iter()
            .map(|(channel, user, announce)| {
                let members = self.channels.get(&channel).map(|cached| cached.members.len()).unwrap_or(0);
                let small = members <= threshold;
                let (joined, tell_members, invited_by) = match announce {
                    Announce::Joined => (true, small, None),
                    Announce::Left => (false, small, None),
                    Announce::Invited(by) => (false, false, Some(by)),
                    Announce::Updated => (true, false, None),
                };
                MembershipEvent { channel, user, joined, tell_members, invited_by }
            })
            .collect::<Vec<_>>();
        if let Some(records) = &self.membership_records {
            if records.try_send(events.clone()).is_err() {
                self.stats.memberships_unrecorded.fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
                warn!(changes = events.len(), "too many membership changes wait for the log; these are not recorded");
            }
        }
        self.publisher.submit(Job::Memberships(events)).await;
    }

    /// Decides a membership run and starts its write, once the write before it (if any) is done.
    #[instrument(skip_all, fields(changes = items.len()))]
    async fn start_membership(&mut self, pending: &mut Option<PendingMembership>, items: Vec<MembershipItem>) {
        if let Some(mut previous) = pending.take() {
            let written = (&mut previous.write).await;
            self.finish_membership(previous, written).await;
        }
        let mut run = Run::default();
        let mut answers: Vec<MembershipAnswer> = Vec::new();
        for (command, reply) in items {
            let result = self.decide(command, &mut run).await;
            answers.push((reply, result));
        }
        let Run { changes, events, touched, blockers } = run;
        let store = self.membership.clone();
        let write = tokio::spawn(async move { store.apply(changes).await });
        *pending = Some(PendingMembership { write, touched, answers, events, blockers, held: Vec::new() });
    }

    /// Decides one membership command: its changes and announcements go into `run`, the cache takes its tentative
    /// state (forgotten if the run's write fails).
    async fn decide(&mut self, command: MembershipCommand, run: &mut Run) -> Result<Answered, RouterError> {
        let limit = self.config.max_channel_members;
        let policy = self.config.membership_policy;
        match command {
            MembershipCommand::Create { creator, channel, members, settings } => {
                if self.load(&channel).await.map_err(RouterError::Unavailable)? {
                    return Err(RouterError::ChannelExists(channel.to_string()));
                }
                let id = channel.to_string();
                let last = self.log.last_seq(&id).await.map_err(RouterError::Unavailable)?;
                run.changes.push(MembershipChange::Create(ChannelRecord {
                    id: id.clone(),
                    kind: ChannelKind::Group,
                    created_by: creator.to_string(),
                    created_at: now_ms(),
                    member_count: 0,
                    visibility: settings.visibility,
                    posting: settings.posting,
                    history_from: history_from(last),
                    home: self.new_home(),
                }));
                let mut cached = CachedChannel::new(ChannelKind::Group, []);
                cached.visibility = settings.visibility;
                cached.posting = settings.posting;
                for member in &members {
                    if member == &creator || policy == MembershipPolicy::Direct {
                        run.add(&id, member.as_str());
                        cached.members.insert(member.to_string());
                    } else {
                        run.set_access(&id, member.as_str(), Some(Access::Invited));
                        run.announce(&id, member.as_str(), Announce::Invited(creator.to_string()));
                        cached.access.insert(member.to_string(), Access::Invited);
                    }
                }
                run.set_access(&id, creator.as_str(), Some(Access::Owner));
                cached.access.insert(creator.to_string(), Access::Owner);
                self.sequencer.load(&id, last);
                self.channels.insert(id.clone(), cached);
                run.touched.insert(id);
                Ok(Answered::View(channel, Some(creator)))
            }
            MembershipCommand::Join { user, channel } => {
                let cached = self.group(&channel).await?;
                if cached.members.contains(user.as_str()) {
                    return Ok(Answered::View(channel, Some(user)));
                }
                let access = cached.access.get(user.as_str()).copied();
                parley_core::access::can_join(channel.as_str(), cached.visibility, access)?;
                if cached.members.len() >= limit as usize {
                    return Err(RouterError::TooManyMembers { channel: channel.to_string(), limit });
                }
                cached.members.insert(user.to_string());
                if access == Some(Access::Invited) {
                    cached.access.remove(user.as_str());
                    run.set_access(channel.as_str(), user.as_str(), None);
                }
                run.add(channel.as_str(), user.as_str());
                run.touched.insert(channel.to_string());
                Ok(Answered::View(channel, Some(user)))
            }
            MembershipCommand::Leave { user, channel } => {
                if !self.load(&channel).await.map_err(RouterError::Unavailable)? {
                    return Err(RouterError::NoSuchChannel(channel.to_string()));
                }
                let Some(cached) = self.channels.get_mut(channel.as_str()) else {
                    return Err(RouterError::NotAMember(channel.to_string()));
                };
                if !cached.members.contains(user.as_str()) {
                    return Err(RouterError::NotAMember(channel.to_string()));
                }
                let role = cached.role(user.as_str());
                parley_core::access::can_leave(channel.as_str(), role, cached.owners(), cached.members.len())?;
                cached.members.remove(user.as_str());
                if cached.access.remove(user.as_str()).is_some() {
                    run.set_access(channel.as_str(), user.as_str(), None);
                }
                run.remove(channel.as_str(), user.as_str());
                run.touched.insert(channel.to_string());
                Ok(Answered::View(channel, Some(user)))
            }
            MembershipCommand::OpenDm { user, channel } => {
                if self.load(&channel).await.map_err(RouterError::Unavailable)? {
                    return Ok(Answered::View(channel, Some(user)));
                }
                let Some((first, second)) = channel.dm_members() else {
                    return Err(RouterError::InvalidArgument("not a direct message".into()));
                };
                run.changes.extend(dm_changes(&channel, &first, &second, self.new_home()));
                run.announce(channel.as_str(), first.as_str(), Announce::Joined);
                run.announce(channel.as_str(), second.as_str(), Announce::Joined);
                self.cache_new(&channel, ChannelKind::Dm, [first.to_string(), second.to_string()]);
                run.touched.insert(channel.to_string());
                Ok(Answered::View(channel, Some(user)))
            }
            MembershipCommand::Manage { actor, channel, action } => {
                let cached = self.group(&channel).await?;
                let server = actor == Actor::Server;
                if !server && !cached.members.contains(actor.name()) {
                    return Err(RouterError::NotAMember(channel.to_string()));
                }
                let id = channel.to_string();
                // The backend has every right; it adds users directly whatever the membership policy.
                let role = if server { Role::Owner } else { cached.role(actor.name()) };
                let policy = if server { MembershipPolicy::Direct } else { policy };
                match action {
                    ChannelAction::Invite { user } => {
                        let target = UserId::new(user)?;
                        if cached.members.contains(target.as_str()) {
                            return Ok(Answered::View(channel, actor.user().cloned()));
                        }
                        let access = cached.access.get(target.as_str()).copied();
                        parley_core::access::can_invite(&id, role, access)?;
                        match policy {
                            MembershipPolicy::Direct => {
                                if cached.members.len() >= limit as usize {
                                    return Err(RouterError::TooManyMembers { channel: id, limit });
                                }
                                cached.members.insert(target.to_string());
                                if cached.access.remove(target.as_str()).is_some() {
                                    run.set_access(&id, target.as_str(), None);
                                }
                                run.add(&id, target.as_str());
                            }
                            MembershipPolicy::Invite => {
                                cached.access.insert(target.to_string(), Access::Invited);
                                run.set_access(&id, target.as_str(), Some(Access::Invited));
                                run.announce(&id, target.as_str(), Announce::Invited(actor.name().to_owned()));
                            }
                        }
                    }
                    ChannelAction::Remove { user } => {
                        let target = UserId::new(user)?;
                        if !cached.members.contains(target.as_str()) {
                            return Err(RouterError::InvalidArgument(format!("{target} is not a member of {id}")));
                        }
                        let target_role = cached.role(target.as_str());
                        if !server {
                            parley_core::access::can_moderate(
                                "removing",
                                &id,
                                actor.name(),
                                role,
                                target.as_str(),
                                target_role,
                            )?;
                        }
                        cached.members.remove(target.as_str());
                        if cached.access.remove(target.as_str()).is_some() {
                            run.set_access(&id, target.as_str(), None);
                        }
                        run.remove(&id, target.as_str());
                    }
                    ChannelAction::Ban { user } => {
                        let target = UserId::new(user)?;
                        let member = cached.members.contains(target.as_str());
                        let target_role = if member { cached.role(target.as_str()) } else { Role::Member };
                        if !server {
                            parley_core::access::can_moderate(
                                "banning",
                                &id,
                                actor.name(),
                                role,
                                target.as_str(),
                                target_role,
                            )?;
                        }
                        if member {
                            cached.members.remove(target.as_str());
                            run.remove(&id, target.as_str());
                        }
                        cached.access.insert(target.to_string(), Access::Banned);
                        run.set_access(&id, target.as_str(), Some(Access::Banned));
                    }
                    ChannelAction::Unban { user } => {
                        let target = UserId::new(user)?;
                        if role < Role::Admin {
                            return Err(RouterError::Forbidden(format!("unbanning in {id} needs the admin role")));
                        }
                        if cached.access.get(target.as_str()) == Some(&Access::Banned) {
                            cached.access.remove(target.as_str());
                            run.set_access(&id, target.as_str(), None);
                        }
                    }
                    ChannelAction::SetRole { user, role: wanted } => {
                        let target = UserId::new(user)?;
                        if !cached.members.contains(target.as_str()) {
                            return Err(RouterError::InvalidArgument(format!("{target} is not a member of {id}")));
                        }
                        let current = cached.role(target.as_str());
                        let owners = cached.owners();
                        if !server {
                            parley_core::access::can_set_role(
                                &id,
                                actor.name(),
                                role,
                                target.as_str(),
                                current,
                                wanted,
                                owners,
                            )?;
                        }
                        if current != wanted {
                            let access = Access::of_role(wanted);
                            match access {
                                Some(access) => cached.access.insert(target.to_string(), access),
                                None => cached.access.remove(target.as_str()),
                            };
                            run.set_access(&id, target.as_str(), access);
                            run.announce(&id, target.as_str(), Announce::Updated);
                        }
                    }
                    ChannelAction::Update { visibility, posting } => {
                        parley_core::access::can_configure(&id, role)?;
                        cached.visibility = visibility.unwrap_or(cached.visibility);
                        cached.posting = posting.unwrap_or(cached.posting);
                        run.changes.push(MembershipChange::Configure {
                            channel: id.clone(),
                            visibility: cached.visibility,
                            posting: cached.posting,
                        });
                    }
                }
                run.touched.insert(id);
                Ok(Answered::View(channel, actor.user().cloned()))
            }
            MembershipCommand::ServerCreate { channel, owner, members, settings } => {
                if self.load(&channel).await.map_err(RouterError::Unavailable)? {
                    // Idempotent: the same channel again is answered as it is; other settings are a conflict.
                    let same = self.channels.get(channel.as_str()).is_some_and(|cached| {
                        cached.visibility == settings.visibility && cached.posting == settings.posting
                    });
                    return if same {
                        Ok(Answered::View(channel, None))
                    } else {
                        Err(RouterError::ChannelExists(format!("{channel} (with other settings)")))
                    };
                }
                let id = channel.to_string();
                let last = self.log.last_seq(&id).await.map_err(RouterError::Unavailable)?;
                run.changes.push(MembershipChange::Create(ChannelRecord {
                    id: id.clone(),
                    kind: ChannelKind::Group,
                    created_by: owner.as_ref().map(|owner| owner.as_str()).unwrap_or(SERVER_SENDER).to_owned(),
                    created_at: now_ms(),
                    member_count: 0,
                    visibility: settings.visibility,
                    posting: settings.posting,
                    history_from: history_from(last),
                    home: self.new_home(),
                }));
                let mut cached = CachedChannel::new(ChannelKind::Group, []);
                cached.visibility = settings.visibility;
                cached.posting = settings.posting;
                for member in owner.iter().chain(members.iter()) {
                    if cached.members.insert(member.to_string()) {
                        run.add(&id, member.as_str());
                    }
                }
                if let Some(owner) = &owner {
                    run.set_access(&id, owner.as_str(), Some(Access::Owner));
                    cached.access.insert(owner.to_string(), Access::Owner);
                }
                self.sequencer.load(&id, last);
                self.channels.insert(id.clone(), cached);
                run.touched.insert(id);
                Ok(Answered::View(channel, None))
            }
            MembershipCommand::Delete { channel } => {
                let cached = self.group(&channel).await?;
                let members: Vec<String> = cached.members.iter().cloned().collect();
                let id = channel.to_string();
                for member in &members {
                    run.announce(&id, member, Announce::Left);
                }
                run.changes.push(MembershipChange::Delete { channel: id.clone() });
                self.channels.remove(&id);
                self.feeds.forget(&id);
                run.touched.insert(id);
                Ok(Answered::Done)
            }
            MembershipCommand::Block { user, other, blocked } => {
                if let Some(list) = self.blocks.get_mut(user.as_str()) {
                    if blocked {
                        list.insert(other.to_string());
                    } else {
                        list.remove(other.as_str());
                    }
                }
                run.changes.push(MembershipChange::SetBlock {
                    user: user.to_string(),
                    other: other.to_string(),
                    blocked,
                });
                // Sends in their DM wait for the block to be durable.
                if let Ok(dm) = ChannelId::direct(&user, &other) {
                    run.touched.insert(dm.to_string());
                }
                run.blockers.push(user.to_string());
                Ok(Answered::Done)
            }
        }
    }

    /// A group channel, loaded: `no_such_channel` when it does not exist, `invalid_argument` for a DM.
    async fn group(&mut self, channel: &ChannelId) -> Result<&mut CachedChannel, RouterError> {
        if !self.load(channel).await.map_err(RouterError::Unavailable)? {
            return Err(RouterError::NoSuchChannel(channel.to_string()));
        }
        match self.channels.get_mut(channel.as_str()) {
            Some(cached) if cached.kind == ChannelKind::Group => Ok(cached),
            Some(_) => Err(RouterError::InvalidArgument("only group channels can be joined or managed".into())),
            None => Err(RouterError::NoSuchChannel(channel.to_string())),
        }
    }

    /// A membership run's write ended: answer its callers (views of the channels as written), announce it, then
    /// decide the sends that waited for it. A failed write applies nothing: its tentative state is forgotten and its
    /// callers get `unavailable`; the held sends are decided against the store as it is.
    #[instrument(skip_all, fields(changes = done.answers.len(), held = done.held.len()))]
    async fn finish_membership(
        &mut self,
        done: PendingMembership,
        written: Result<Result<(), BackendError>, tokio::task::JoinError>,
    ) {
        let PendingMembership { touched, answers, events, held, blockers, .. } = done;
        // Block lists are read again from the store, as the run left it.
        for user in blockers {
            self.blocks.remove(&user);
        }
        let written = written.unwrap_or_else(|error| Err(BackendError::Task(error.to_string())));
        match written {
            Ok(()) => {
                for (reply, result) in answers {
                    let result = match result {
                        Ok(Answered::View(channel, viewer)) => {
                            // Reloaded if the cache was cleared meanwhile (it is bounded).
                            if let Err(error) = self.load(&channel).await {
                                warn!(%error, channel = %channel, "cannot reload a channel just written");
                            }
                            Ok(MembershipOutcome::View(self.view(&channel, viewer.as_ref())))
                        }
                        Ok(Answered::Done) => Ok(MembershipOutcome::Done),
                        Err(error) => Err(error),
                    };
                    let _ = reply.send(result);
                }
                self.announce_memberships(events).await;
            }
            Err(error) => {
                self.stats.write_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(%error, "membership write failed; nothing applied");
                for channel in touched {
                    // Forget the tentative state; it is reloaded from the store on next use.
                    self.channels.remove(&channel);
                }
                let message = error.to_string();
                for (reply, result) in answers {
                    let _ = reply.send(
                        result.and_then(|_| Err(RouterError::Unavailable(BackendError::Unavailable(message.clone())))),
                    );
                }
            }
        }
        if !held.is_empty() {
            self.send_run(held).await;
        }
    }
}

/// The first readable sequence of a channel created when its id already has `last` messages (from before a
/// deletion): the old messages stay hidden, and the sequence goes on.
/// What a send of a failed append is told: `not_owner` when the log lost (or never had) the channel's partition,
/// so that the gateway retries at the owner; `unavailable` otherwise. Nothing of the append is confirmed either way.
fn refused(error: &BackendError, channel: &str) -> RouterError {
    match error {
        BackendError::Fenced { partition, .. } | BackendError::NotOwner { partition, .. } => {
            RouterError::Unavailable(BackendError::NotOwner { channel: channel.to_owned(), partition: *partition })
        }
        other => RouterError::Unavailable(BackendError::Unavailable(other.to_string())),
    }
}

fn history_from(last: u64) -> u64 {
    if last == 0 {
        0
    } else {
        last + 1
    }
}

fn dm_changes(channel: &ChannelId, first: &UserId, second: &UserId, home: Option<Home>) -> Vec<MembershipChange> {
    vec![
        MembershipChange::Create(ChannelRecord {
            id: channel.to_string(),
            kind: ChannelKind::Dm,
            created_by: first.to_string(),
            created_at: now_ms(),
            member_count: 0,
            visibility: Visibility::Public,
            posting: Posting::Everyone,
            history_from: 0,
            home,
        }),
        MembershipChange::Add { channel: channel.to_string(), user: first.to_string() },
        MembershipChange::Add { channel: channel.to_string(), user: second.to_string() },
    ]
}
