//! The router as a service.
//!
//! [`Router`] is the handle every caller uses. It is either the in-process single writer ([`LocalRouter`], the
//! embedded mode and the `parley-router` process itself) or a client of a `parley-router` process
//! ([`RemoteRouter`], the gateways of the distributed layout). Both answer the same calls with the same errors.
//!
//! The wire is deliberately small: `POST /internal/v1/call` takes one [`Call`] as JSON and answers `200` with
//! `{"ok": ...}` or `{"error": {"code": ..., "message": ...}}` (the protocol's stable error codes), so an error
//! the router decides reaches the client exactly as in embedded mode. `GET /internal/v1/config` gives the limits
//! a gateway enforces before calling. When a token is configured, every call must carry
//! `Authorization: Bearer <token>`. A transport failure (router down, timeout) is `unavailable`: nothing is
//! confirmed, and the client retries with the same `client_msg_id`, which the writer de-duplicates.

use crate::backend::{HistoryPage, HistoryQuery, PresenceUpdate};
use crate::error::{BackendError, RouterError};
use crate::router::{LocalRouter, RouterConfig, RouterStats, SendOutcome};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parley_core::protocol::{ChannelView, ErrorCode, MessageView};
use parley_core::sequencer::Placement;
use parley_core::{ChannelId, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};

/// Largest request or reply body the service accepts (a history page of 200 messages of 4 KiB fits easily).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One call to the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// [`Router::send`].
    Send {
        /// Sender.
        user: String,
        /// Channel.
        channel: String,
        /// Idempotency key.
        client_msg_id: String,
        /// Text.
        text: String,
        /// The sender's first attempt with this key (absent: maybe a retry).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        first_attempt: bool,
    },
    /// [`Router::create_channel`].
    CreateChannel {
        /// Creator.
        user: String,
        /// Group name.
        name: String,
        /// Other members.
        members: Vec<String>,
    },
    /// [`Router::join`].
    Join {
        /// User.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`Router::leave`].
    Leave {
        /// User.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`Router::open_dm`].
    OpenDm {
        /// User.
        user: String,
        /// The other user.
        other: String,
    },
    /// [`Router::history`].
    History {
        /// Reader.
        user: String,
        /// Channel.
        channel: String,
        /// Only `seq < before`.
        before: Option<u64>,
        /// Only `seq > after`.
        after: Option<u64>,
        /// Page size.
        limit: u32,
    },
    /// [`Router::list_channels`].
    ListChannels {
        /// User.
        user: String,
    },
    /// [`Router::channel_view`].
    ChannelView {
        /// Viewer.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`Router::mark_read`].
    MarkRead {
        /// Reader.
        user: String,
        /// Channel.
        channel: String,
        /// Read up to here.
        seq: u64,
    },
    /// [`Router::mark_delivered`].
    MarkDelivered {
        /// Recipient.
        user: String,
        /// Channel.
        channel: String,
        /// Delivered up to here.
        seq: u64,
    },
    /// [`Router::members`].
    Members {
        /// Asking user.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`Router::first_retained_seq`].
    FirstRetainedSeq {
        /// Channel.
        channel: String,
    },
    /// [`Router::feed`] (a gateway reading a large channel's new messages for its members).
    Feed {
        /// Channel.
        channel: String,
        /// Only `seq > after`.
        after: u64,
        /// Page size.
        limit: u32,
    },
    /// [`Router::record_presence`] (a gateway's presence changes, for the log).
    Presence {
        /// The changes, in the order the gateway saw them.
        updates: Vec<PresenceUpdate>,
    },
}

/// A reply on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    /// The call succeeded.
    Ok(T),
    /// The call was refused or failed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable reason.
        message: String,
    },
}

/// [`SendOutcome`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReply {
    /// Channel.
    pub channel: String,
    /// Snowflake id.
    pub id: u64,
    /// Sequence.
    pub seq: u64,
    /// Writer timestamp.
    pub ts: u64,
    /// A retry of an earlier send.
    pub duplicate: bool,
}

/// [`HistoryPage`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReply {
    /// Messages by ascending sequence.
    pub messages: Vec<MessageView>,
    /// More exist in the direction of the query.
    pub has_more: bool,
}

/// The limits a gateway enforces before calling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// Largest message text in bytes.
    pub max_text_bytes: usize,
    /// Largest channel.
    pub max_channel_members: u32,
    /// Fan-out threshold.
    pub fanout_threshold: u32,
}

/// The handle to a router: in-process or remote. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Router {
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    Local(LocalRouter),
    Remote(Arc<RemoteRouter>),
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($argument:expr),* )) => {
        match &$self.inner {
            Inner::Local(router) => router.$method($($argument),*).await,
            Inner::Remote(router) => router.$method($($argument),*).await,
        }
    };
}

impl From<LocalRouter> for Router {
    fn from(router: LocalRouter) -> Self {
        Self { inner: Inner::Local(router) }
    }
}

impl From<RemoteRouter> for Router {
    fn from(router: RemoteRouter) -> Self {
        Self { inner: Inner::Remote(Arc::new(router)) }
    }
}

impl Router {
    /// Starts an in-process writer; see [`LocalRouter::start`].
    pub fn start(
        config: RouterConfig,
        log: Arc<dyn crate::backend::MessageLog>,
        store: Arc<dyn crate::backend::MessageStore>,
        membership: Arc<dyn crate::backend::MembershipStore>,
        pubsub: Arc<dyn crate::pubsub::PubSub>,
    ) -> Result<(Router, tokio::task::JoinHandle<()>), RouterError> {
        LocalRouter::start(config, log, store, membership, pubsub).map(|(router, task)| (router.into(), task))
    }

    /// Starts an in-process writer with a durable tap; see [`LocalRouter::start_with_tap`].
    pub fn start_with_tap(
        config: RouterConfig,
        log: Arc<dyn crate::backend::MessageLog>,
        store: Arc<dyn crate::backend::MessageStore>,
        membership: Arc<dyn crate::backend::MembershipStore>,
        pubsub: Arc<dyn crate::pubsub::PubSub>,
        tap: Option<tokio::sync::mpsc::Sender<crate::router::DurableMessage>>,
    ) -> Result<(Router, tokio::task::JoinHandle<()>), RouterError> {
        LocalRouter::start_with_tap(config, log, store, membership, pubsub, tap)
            .map(|(router, task)| (router.into(), task))
    }

    /// Starts an in-process writer that addresses direct events through the user→gateway registry; see
    /// [`LocalRouter::start_full`].
    pub fn start_with_directory(
        config: RouterConfig,
        log: Arc<dyn crate::backend::MessageLog>,
        store: Arc<dyn crate::backend::MessageStore>,
        membership: Arc<dyn crate::backend::MembershipStore>,
        pubsub: Arc<dyn crate::pubsub::PubSub>,
        directory: Arc<dyn crate::presence::PresenceStore>,
    ) -> Result<(Router, tokio::task::JoinHandle<()>), RouterError> {
        LocalRouter::start_full(config, log, store, membership, pubsub, None, Some(directory))
            .map(|(router, task)| (router.into(), task))
    }

    /// Whether this handle calls a remote router process.
    pub fn is_remote(&self) -> bool {
        matches!(self.inner, Inner::Remote(_))
    }

    /// The writer's counters (a remote handle counts only its transport failures, as `write_failures`).
    pub fn stats(&self) -> &RouterStats {
        match &self.inner {
            Inner::Local(router) => router.stats(),
            Inner::Remote(router) => &router.stats,
        }
    }

    /// The configuration (for a remote handle, the limits the router reported when it connected).
    pub fn config(&self) -> &RouterConfig {
        match &self.inner {
            Inner::Local(router) => router.config(),
            Inner::Remote(router) => &router.config,
        }
    }

    /// Sends a message (maybe a retry); returns once it is durable.
    pub async fn send(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<SendOutcome, RouterError> {
        dispatch!(self.send_attempt(sender, channel, client_msg_id, text, false))
    }

    /// Sends a message, saying whether the sender sends this key for the first time (see
    /// [`LocalRouter::send_attempt`]); returns once it is durable.
    pub async fn send_attempt(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
        first_attempt: bool,
    ) -> Result<SendOutcome, RouterError> {
        dispatch!(self.send_attempt(sender, channel, client_msg_id, text, first_attempt))
    }

    /// Creates a group channel.
    pub async fn create_channel(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
    ) -> Result<ChannelView, RouterError> {
        dispatch!(self.create_channel(creator, name, members))
    }

    /// Joins a group channel.
    pub async fn join(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        dispatch!(self.join(user, channel))
    }

    /// Leaves a channel.
    pub async fn leave(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        dispatch!(self.leave(user, channel))
    }

    /// Opens (creates if needed) the DM with `other`.
    pub async fn open_dm(&self, user: &UserId, other: &str) -> Result<ChannelView, RouterError> {
        dispatch!(self.open_dm(user, other))
    }

    /// A page of a channel's history.
    pub async fn history(&self, user: &UserId, channel: &str, query: HistoryQuery) -> Result<HistoryPage, RouterError> {
        dispatch!(self.history(user, channel, query))
    }

    /// The user's channels.
    pub async fn list_channels(&self, user: &UserId) -> Result<Vec<ChannelView>, RouterError> {
        dispatch!(self.list_channels(user))
    }

    /// One channel as the user sees it.
    pub async fn channel_view(&self, user: &UserId, channel: &ChannelId) -> Result<ChannelView, RouterError> {
        dispatch!(self.channel_view(user, channel))
    }

    /// Moves the user's read cursor forward; returns the cursor.
    pub async fn mark_read(&self, user: &UserId, channel: &str, seq: u64) -> Result<u64, RouterError> {
        dispatch!(self.mark_read(user, channel, seq))
    }

    /// Publishes a delivery receipt (small channels only).
    pub async fn mark_delivered(&self, user: &UserId, channel: &str, seq: u64) -> Result<(), RouterError> {
        dispatch!(self.mark_delivered(user, channel, seq))
    }

    /// The members of a channel the user belongs to.
    pub async fn members(&self, user: &UserId, channel: &str) -> Result<Vec<String>, RouterError> {
        dispatch!(self.members(user, channel))
    }

    /// The oldest retained sequence of a channel.
    pub async fn first_retained_seq(&self, channel: &str) -> Result<u64, RouterError> {
        dispatch!(self.first_retained_seq(channel))
    }

    /// A large channel's messages after `after`, for a gateway that serves its members from one read (fan-out on
    /// read); see [`LocalRouter::feed`]. Not a member check: the gateway asks on behalf of its members.
    pub async fn feed(&self, channel: &str, after: u64, limit: u32) -> Result<HistoryPage, RouterError> {
        dispatch!(self.feed(channel, after, limit))
    }

    /// Records a gateway's presence changes in the log; see [`LocalRouter::record_presence`].
    pub async fn record_presence(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
        dispatch!(self.record_presence(updates))
    }

    /// Runs one wire call.
    #[instrument(skip(self, call), fields(op = call.op()))]
    pub async fn execute(&self, call: Call) -> Reply<serde_json::Value> {
        match self.execute_inner(call).await {
            Ok(value) => Reply::Ok(value),
            Err(error) => Reply::Error { code: error.code(), message: error.to_string() },
        }
    }

    async fn execute_inner(&self, call: Call) -> Result<serde_json::Value, RouterError> {
        fn user(name: String) -> Result<UserId, RouterError> {
            UserId::new(name).map_err(RouterError::from)
        }
        fn json<T: Serialize>(value: T) -> Result<serde_json::Value, RouterError> {
            serde_json::to_value(value).map_err(|error| RouterError::InvalidArgument(error.to_string()))
        }
        match call {
            Call::Send { user: sender, channel, client_msg_id, text, first_attempt } => {
                let outcome = self.send_attempt(&user(sender)?, &channel, &client_msg_id, &text, first_attempt).await?;
                json(SendReply {
                    channel: outcome.channel,
                    id: outcome.placement.id,
                    seq: outcome.placement.seq,
                    ts: outcome.placement.ts,
                    duplicate: outcome.duplicate,
                })
            }
            Call::CreateChannel { user: creator, name, members } => {
                json(self.create_channel(&user(creator)?, &name, &members).await?)
            }
            Call::Join { user: name, channel } => json(self.join(&user(name)?, &channel).await?),
            Call::Leave { user: name, channel } => json(self.leave(&user(name)?, &channel).await?),
            Call::OpenDm { user: name, other } => json(self.open_dm(&user(name)?, &other).await?),
            Call::History { user: name, channel, before, after, limit } => {
                let page = self.history(&user(name)?, &channel, HistoryQuery { before, after, limit }).await?;
                json(HistoryReply { messages: page.messages, has_more: page.has_more })
            }
            Call::ListChannels { user: name } => json(self.list_channels(&user(name)?).await?),
            Call::ChannelView { user: name, channel } => {
                let channel = ChannelId::parse(channel)?;
                json(self.channel_view(&user(name)?, &channel).await?)
            }
            Call::MarkRead { user: name, channel, seq } => json(self.mark_read(&user(name)?, &channel, seq).await?),
            Call::MarkDelivered { user: name, channel, seq } => {
                json(self.mark_delivered(&user(name)?, &channel, seq).await?)
            }
            Call::Members { user: name, channel } => json(self.members(&user(name)?, &channel).await?),
            Call::FirstRetainedSeq { channel } => json(self.first_retained_seq(&channel).await?),
            Call::Feed { channel, after, limit } => {
                let page = self.feed(&channel, after, limit).await?;
                json(HistoryReply { messages: page.messages, has_more: page.has_more })
            }
            Call::Presence { updates } => json(self.record_presence(updates).await?),
        }
    }
}

impl Call {
    /// The operation's name, for spans and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Call::Send { .. } => "send",
            Call::CreateChannel { .. } => "create_channel",
            Call::Join { .. } => "join",
            Call::Leave { .. } => "leave",
            Call::OpenDm { .. } => "open_dm",
            Call::History { .. } => "history",
            Call::ListChannels { .. } => "list_channels",
            Call::ChannelView { .. } => "channel_view",
            Call::MarkRead { .. } => "mark_read",
            Call::MarkDelivered { .. } => "mark_delivered",
            Call::Members { .. } => "members",
            Call::FirstRetainedSeq { .. } => "first_retained_seq",
            Call::Feed { .. } => "feed",
            Call::Presence { .. } => "presence",
        }
    }
}

/// What [`app`] serves.
#[derive(Clone, Debug)]
struct ServiceState {
    router: Router,
    token: Option<Arc<str>>,
}

/// The router's internal HTTP API (`/internal/v1/call`, `/internal/v1/config`, `/healthz`).
pub fn app(router: Router, token: Option<String>) -> axum::Router {
    let state = ServiceState { router, token: token.filter(|token| !token.is_empty()).map(Arc::from) };
    axum::Router::new()
        .route("/internal/v1/call", post(call_handler))
        .route("/internal/v1/config", get(config_handler))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn authorized(state: &ServiceState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else { return true };
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|presented| constant_time_eq(presented.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn unauthorized() -> Response {
    let reply: Reply<()> =
        Reply::Error { code: ErrorCode::Unauthorized, message: "missing or wrong internal token".into() };
    (StatusCode::UNAUTHORIZED, Json(reply)).into_response()
}

async fn call_handler(State(state): State<ServiceState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let call: Call = match serde_json::from_slice(&body) {
        Ok(call) => call,
        Err(error) => {
            let reply: Reply<()> =
                Reply::Error { code: ErrorCode::InvalidFrame, message: format!("invalid call: {error}") };
            return (StatusCode::BAD_REQUEST, Json(reply)).into_response();
        }
    };
    Json(state.router.execute(call).await).into_response()
}

async fn config_handler(State(state): State<ServiceState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let config = state.router.config();
    Json(ServiceConfig {
        max_text_bytes: config.max_text_bytes,
        max_channel_members: config.max_channel_members,
        fanout_threshold: config.fanout_threshold,
    })
    .into_response()
}

/// A client of a `parley-router` process.
#[derive(Clone)]
pub struct RemoteRouter {
    client: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
    token: Option<Arc<str>>,
    timeout: Duration,
    config: Arc<RouterConfig>,
    stats: Arc<RouterStats>,
}

impl std::fmt::Debug for RemoteRouter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RemoteRouter").field("base", &self.base).finish_non_exhaustive()
    }
}

impl RemoteRouter {
    /// Connects to the router at `base` (`http://host:port`), reading its limits. `timeout` bounds every call.
    pub async fn connect(base: &str, token: Option<String>, timeout: Duration) -> Result<Self, RouterError> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        let mut remote = Self {
            client,
            base: Arc::from(base.trim_end_matches('/')),
            token: token.filter(|token| !token.is_empty()).map(Arc::from),
            timeout,
            config: Arc::new(RouterConfig::default()),
            stats: Arc::new(RouterStats::default()),
        };
        let limits: ServiceConfig = remote.request(http::Method::GET, "/internal/v1/config", None).await?;
        remote.config = Arc::new(RouterConfig {
            max_text_bytes: limits.max_text_bytes,
            max_channel_members: limits.max_channel_members,
            fanout_threshold: limits.fanout_threshold,
            ..RouterConfig::default()
        });
        Ok(remote)
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> RouterError {
        self.stats.write_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RouterError::Unavailable(BackendError::Unavailable(format!("router at {}: {reason}", self.base)))
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, RouterError> {
        let uri = format!("{}{path}", self.base);
        let mut builder = http::Request::builder().method(method).uri(&uri);
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| self.unavailable(format!("invalid request: {error}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|error| self.unavailable(error))?;
            let status = response.status();
            let bytes = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|error| self.unavailable(format!("reading the reply: {error}")))?
                .to_bytes();
            Ok::<_, RouterError>((status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(self.timeout, exchange).await.map_err(|_| self.unavailable("timed out"))??;
        if status == StatusCode::UNAUTHORIZED {
            return Err(self.unavailable("the internal token was refused"));
        }
        serde_json::from_slice(&bytes)
            .map_err(|error| self.unavailable(format!("HTTP {status}, undecodable reply: {error}")))
    }

    async fn call<T: DeserializeOwned>(&self, call: &Call) -> Result<T, RouterError> {
        let body = serde_json::to_vec(call).map_err(|error| RouterError::InvalidArgument(error.to_string()))?;
        match self.request::<Reply<T>>(http::Method::POST, "/internal/v1/call", Some(body)).await? {
            Reply::Ok(value) => Ok(value),
            Reply::Error { code, message } => {
                if code == ErrorCode::Unavailable {
                    warn!(%message, "router reported unavailable");
                }
                Err(RouterError::Remote { code, message })
            }
        }
    }

    async fn send_attempt(
        &self,
        sender: &UserId,
        channel: &str,
        client_msg_id: &str,
        text: &str,
        first_attempt: bool,
    ) -> Result<SendOutcome, RouterError> {
        if text.len() > self.config.max_text_bytes {
            return Err(RouterError::TextTooLong { actual: text.len(), limit: self.config.max_text_bytes });
        }
        let reply: SendReply = self
            .call(&Call::Send {
                user: sender.to_string(),
                channel: channel.to_owned(),
                client_msg_id: client_msg_id.to_owned(),
                text: text.to_owned(),
                first_attempt,
            })
            .await?;
        Ok(SendOutcome {
            channel: reply.channel,
            placement: Placement { id: reply.id, seq: reply.seq, ts: reply.ts },
            duplicate: reply.duplicate,
        })
    }

    async fn create_channel(
        &self,
        creator: &UserId,
        name: &str,
        members: &[String],
    ) -> Result<ChannelView, RouterError> {
        self.call(&Call::CreateChannel { user: creator.to_string(), name: name.to_owned(), members: members.to_vec() })
            .await
    }

    async fn join(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        self.call(&Call::Join { user: user.to_string(), channel: channel.to_owned() }).await
    }

    async fn leave(&self, user: &UserId, channel: &str) -> Result<ChannelView, RouterError> {
        self.call(&Call::Leave { user: user.to_string(), channel: channel.to_owned() }).await
    }

    async fn open_dm(&self, user: &UserId, other: &str) -> Result<ChannelView, RouterError> {
        self.call(&Call::OpenDm { user: user.to_string(), other: other.to_owned() }).await
    }

    async fn history(&self, user: &UserId, channel: &str, query: HistoryQuery) -> Result<HistoryPage, RouterError> {
        let reply: HistoryReply = self
            .call(&Call::History {
                user: user.to_string(),
                channel: channel.to_owned(),
                before: query.before,
                after: query.after,
                limit: query.limit,
            })
            .await?;
        Ok(HistoryPage { messages: reply.messages, has_more: reply.has_more })
    }

    async fn list_channels(&self, user: &UserId) -> Result<Vec<ChannelView>, RouterError> {
        self.call(&Call::ListChannels { user: user.to_string() }).await
    }

    async fn channel_view(&self, user: &UserId, channel: &ChannelId) -> Result<ChannelView, RouterError> {
        self.call(&Call::ChannelView { user: user.to_string(), channel: channel.to_string() }).await
    }

    async fn mark_read(&self, user: &UserId, channel: &str, seq: u64) -> Result<u64, RouterError> {
        self.call(&Call::MarkRead { user: user.to_string(), channel: channel.to_owned(), seq }).await
    }

    async fn mark_delivered(&self, user: &UserId, channel: &str, seq: u64) -> Result<(), RouterError> {
        self.call(&Call::MarkDelivered { user: user.to_string(), channel: channel.to_owned(), seq }).await
    }

    async fn members(&self, user: &UserId, channel: &str) -> Result<Vec<String>, RouterError> {
        self.call(&Call::Members { user: user.to_string(), channel: channel.to_owned() }).await
    }

    async fn first_retained_seq(&self, channel: &str) -> Result<u64, RouterError> {
        self.call(&Call::FirstRetainedSeq { channel: channel.to_owned() }).await
    }

    async fn feed(&self, channel: &str, after: u64, limit: u32) -> Result<HistoryPage, RouterError> {
        let reply: HistoryReply = self.call(&Call::Feed { channel: channel.to_owned(), after, limit }).await?;
        Ok(HistoryPage { messages: reply.messages, has_more: reply.has_more })
    }

    async fn record_presence(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
        self.call(&Call::Presence { updates }).await
    }
}
