//! [`Router`]: the handle every caller uses, over any [`RouterService`].

use crate::call::{Answer, Call, Reply};
use crate::error::RouterError;
use crate::types::{
    ChannelAction, ChannelSettings, HistoryPage, HistoryQuery, Limits, PresenceUpdate, RouterStats, SendOutcome,
    ServerOp,
};
use async_trait::async_trait;
use parley_core::protocol::ChannelView;
use parley_core::{ChannelId, UserId};
use std::sync::Arc;
use tracing::instrument;

/// Something that runs router calls: the in-process writer (`parley_router::LocalRouter`) or a client of a
/// `parley-router` process ([`crate::RemoteRouter`]). Both answer the same calls with the same errors.
#[async_trait]
pub trait RouterService: Send + Sync + std::fmt::Debug + 'static {
    /// Runs one call.
    async fn call(&self, call: Call) -> Result<Answer, RouterError>;
    /// The limits the router enforces.
    fn limits(&self) -> Limits;
    /// The writer's counters (a remote client counts only its transport failures, as `write_failures`).
    fn stats(&self) -> &Arc<RouterStats>;
    /// Whether calls cross a process boundary.
    fn is_remote(&self) -> bool {
        false
    }
}

/// The handle to a router. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Router {
    service: Arc<dyn RouterService>,
}

impl Router {
    /// A handle over `service`.
    pub fn new(service: impl RouterService) -> Self {
        Self { service: Arc::new(service) }
    }

    /// Whether this handle calls a remote router process.
    pub fn is_remote(&self) -> bool {
        self.service.is_remote()
    }

    /// The writer's counters (a remote handle counts only its transport failures, as `write_failures`).
    pub fn stats(&self) -> &Arc<RouterStats> {
        self.service.stats()
    }

    /// The limits (for a remote handle, those the router reported when it connected).
    pub fn limits(&self) -> Limits {
        self.service.limits()
    }

    /// Runs one call.
    pub async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        self.service.call(call).await
    }

    /// Runs one call for the wire: its answer, or its error as a stable code and a message.
    #[instrument(skip(self, call), fields(op = call.op()))]
    pub async fn execute(&self, call: Call) -> Reply<Answer> {
        match self.call(call).await {
            Ok(answer) => Reply::Ok(answer),
            Err(error) => Reply::Error { code: error.code(), message: error.to_string() },
        }
    }

    /// Sends a message (maybe a retry: an earlier send with the same key is looked up everywhere); returns once
    /// it is durable.
    pub async fn send(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<SendOutcome, RouterError> {
        self.send_attempt(sender, channel, client_msg_id, text, false).await
    }

    /// Sends a message, saying whether the sender sends this key for the first time (then the writer skips the
    /// idempotency lookup in storage); returns once it is durable.
    pub async fn send_attempt(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
        first_attempt: bool,
    ) -> Result<SendOutcome, RouterError> {
        self.call(Call::Send {
            user: sender.to_string(),
            channel: channel.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            text: text.to_owned(),
            first_attempt,
        })
        .await?
        .into_sent("send")
    }

    /// Creates a group channel.
    pub async fn create_channel(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
    ) -> Result<ChannelView, RouterError> {
        self.create_channel_with(creator, name, members, ChannelSettings::default()).await
    }

    /// Creates a group channel with these settings.
    pub async fn create_channel_with(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
        settings: ChannelSettings,
    ) -> Result<ChannelView, RouterError> {
        self.call(Call::CreateChannel {
            user: creator.to_string(),
            name: name.to_owned(),
            members: members.to_vec(),
            visibility: settings.visibility,
            posting: settings.posting,
        })
        .await?
        .into_channel("create_channel")
    }

    /// Invites, removes, bans, unbans, sets a role or changes a group channel's settings; answers the channel as
    /// `user` (who acts) sees it.
    pub async fn manage_channel(
        &self,
        user: &UserId,
        channel: &str,
        action: ChannelAction,
    ) -> Result<ChannelView, RouterError> {
        self.call(Call::ManageChannel { user: user.to_string(), channel: channel.to_owned(), action })
            .await?
            .into_channel("manage_channel")
    }

    /// Runs an operation of the application's backend (see [`ServerOp`]); the answer's kind follows the operation
    /// (a channel, a send's placement, or done).
    pub async fn server(&self, operation: ServerOp) -> Result<Answer, RouterError> {
        self.call(Call::Server { operation }).await
    }

    /// Blocks (or unblocks) `other`: direct messages between the two are refused while either blocks the other.
    pub async fn block(&self, user: &UserId, other: &str, blocked: bool) -> Result<(), RouterError> {
        self.call(Call::Block { user: user.to_string(), other: other.to_owned(), blocked }).await?;
        Ok(())
    }

    /// Joins a group channel.
    pub async fn join(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        self.call(Call::Join { user: user.to_string(), channel: channel.to_owned() }).await?.into_channel("join")
    }

    /// Leaves a channel.
    pub async fn leave(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        self.call(Call::Leave { user: user.to_string(), channel: channel.to_owned() }).await?.into_channel("leave")
    }

    /// Opens (creates if needed) the DM with `other`.
    pub async fn open_dm(&self, user: &UserId, other: &str) -> Result<ChannelView, RouterError> {
        self.call(Call::OpenDm { user: user.to_string(), other: other.to_owned() }).await?.into_channel("open_dm")
    }

    /// A page of a channel's history.
    pub async fn history(&self, user: &UserId, channel: &str, query: HistoryQuery) -> Result<HistoryPage, RouterError> {
        self.call(Call::History {
            user: user.to_string(),
            channel: channel.to_owned(),
            before: query.before,
            after: query.after,
            limit: query.limit,
        })
        .await?
        .into_page("history")
    }

    /// The user's channels.
    pub async fn list_channels(&self, user: &UserId) -> Result<Vec<ChannelView>, RouterError> {
        self.call(Call::ListChannels { user: user.to_string() }).await?.into_channels("list_channels")
    }

    /// One channel as the user sees it.
    pub async fn channel_view(&self, user: &UserId, channel: &ChannelId) -> Result<ChannelView, RouterError> {
        self.call(Call::ChannelView { user: user.to_string(), channel: channel.to_string() })
            .await?
            .into_channel("channel_view")
    }

    /// Moves the user's read cursor forward; returns the cursor.
    pub async fn mark_read(&self, user: &UserId, channel: &str, seq: u64) -> Result<u64, RouterError> {
        self.call(Call::MarkRead { user: user.to_string(), channel: channel.to_owned(), seq })
            .await?
            .into_seq("mark_read")
    }

    /// Publishes a delivery receipt (small channels only).
    pub async fn mark_delivered(&self, user: &UserId, channel: &str, seq: u64) -> Result<(), RouterError> {
        self.call(Call::MarkDelivered { user: user.to_string(), channel: channel.to_owned(), seq })
            .await?
            .into_done("mark_delivered")
    }

    /// The members of a channel the user belongs to.
    pub async fn members(&self, user: &UserId, channel: &str) -> Result<Vec<String>, RouterError> {
        self.call(Call::Members { user: user.to_string(), channel: channel.to_owned() }).await?.into_users("members")
    }

    /// The oldest retained sequence of a channel.
    pub async fn first_retained_seq(&self, channel: &str) -> Result<u64, RouterError> {
        self.call(Call::FirstRetainedSeq { channel: channel.to_owned() }).await?.into_seq("first_retained_seq")
    }

    /// A large channel's messages after `after`, for a gateway that serves its members from one read (fan-out on
    /// read). Not a member check: the gateway asks on behalf of its members.
    pub async fn feed(&self, channel: &str, after: u64, limit: u32) -> Result<HistoryPage, RouterError> {
        self.call(Call::Feed { channel: channel.to_owned(), after, limit }).await?.into_page("feed")
    }

    /// Records a gateway's presence changes in the log.
    pub async fn record_presence(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
        self.call(Call::Presence { updates }).await?.into_done("presence")
    }

    /// Registers a device for the user's push notifications (`platform`: `fcm` or `apns`); whether it was
    /// registered for them already.
    pub async fn register_device(&self, user: &UserId, platform: &str, token: &str) -> Result<bool, RouterError> {
        self.device(user, platform, token, true).await
    }

    /// Forgets one of the user's devices; whether it was registered for them.
    pub async fn unregister_device(&self, user: &UserId, platform: &str, token: &str) -> Result<bool, RouterError> {
        self.device(user, platform, token, false).await
    }

    async fn device(&self, user: &UserId, platform: &str, token: &str, register: bool) -> Result<bool, RouterError> {
        let call =
            Call::Device { user: user.to_string(), platform: platform.to_owned(), token: token.to_owned(), register };
        let op = call.op();
        self.call(call).await?.into_flag(op)
    }

    /// Mutes a channel's push notifications for the user until `until` (Unix ms; `u64::MAX`: until unmuted), or
    /// unmutes it with `None`.
    pub async fn mute(&self, user: &UserId, channel: &str, until: Option<u64>) -> Result<(), RouterError> {
        self.call(Call::Mute { user: user.to_string(), channel: channel.to_owned(), until }).await?.into_done("mute")
    }
}

impl From<crate::RemoteRouter> for Router {
    fn from(remote: crate::RemoteRouter) -> Self {
        Router::new(remote)
    }
}
