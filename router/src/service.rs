//! The writer as a router service, and the internal HTTP API that the `parley-router` binary serves.
//!
//! [`LocalRouter`] implements [`RouterService`]: each [`Call`] runs on the writer's typed methods. [`app`] serves
//! the same calls over HTTP for [`parley_api::RemoteRouter`] (the wire is described in [`parley_api::remote`]).
//! [`start`], [`start_with_tap`] and [`start_with_directory`] start an in-process writer and give its [`Router`]
//! handle.

use crate::backend::{HistoryQuery, MembershipStore, MessageLog, MessageStore};
use crate::router::{LocalRouter, RouterConfig};
use async_trait::async_trait;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Json;
use bytes::Bytes;
use parley_api::http::{bearer_is, HttpError};
use parley_api::remote::{CALL_PATH, CONFIG_PATH, MAX_BODY_BYTES, PEER_CALL_PATH};
use parley_api::{Answer, Call, DurableMessage, Limits, Reply, Router, RouterError, RouterService, RouterStats};
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::PubSub;
use parley_core::{ChannelId, UserId};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Starts an in-process writer; see [`LocalRouter::start`].
pub fn start(
    config: RouterConfig,
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    pubsub: Arc<dyn PubSub>,
) -> Result<(Router, JoinHandle<()>), RouterError> {
    LocalRouter::start(config, log, store, membership, pubsub).map(|(router, task)| (Router::new(router), task))
}

/// Starts an in-process writer with a durable tap; see [`LocalRouter::start_with_tap`].
pub fn start_with_tap(
    config: RouterConfig,
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    pubsub: Arc<dyn PubSub>,
    tap: Option<mpsc::Sender<DurableMessage>>,
) -> Result<(Router, JoinHandle<()>), RouterError> {
    LocalRouter::start_with_tap(config, log, store, membership, pubsub, tap)
        .map(|(router, task)| (Router::new(router), task))
}

/// Starts an in-process writer that addresses direct events through the user→gateway registry; see
/// [`LocalRouter::start_full`].
pub fn start_with_directory(
    config: RouterConfig,
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    pubsub: Arc<dyn PubSub>,
    directory: Arc<dyn PresenceStore>,
) -> Result<(Router, JoinHandle<()>), RouterError> {
    LocalRouter::start_full(config, log, store, membership, pubsub, None, Some(directory))
        .map(|(router, task)| (Router::new(router), task))
}

fn user(name: String) -> Result<UserId, RouterError> {
    UserId::new(name).map_err(RouterError::from)
}

#[async_trait]
impl RouterService for LocalRouter {
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        // Several routers share a Region's channels by partition: a call about a channel another router owns is
        // refused before it reads or changes anything (the gateway retries at the owner).
        if let Some(channel) = call.channel_key() {
            self.check_owner(&channel)?;
        }
        Ok(match call {
            Call::Send { user: sender, channel, client_msg_id, text, first_attempt } => {
                Answer::Sent(self.send_attempt(&user(sender)?, &channel, &client_msg_id, &text, first_attempt).await?)
            }
            Call::CreateChannel { user: creator, name, members, visibility, posting } => {
                let settings = parley_api::ChannelSettings { visibility, posting };
                Answer::Channel(self.create_channel_with(&user(creator)?, &name, &members, settings).await?)
            }
            Call::ManageChannel { user: actor, channel, action } => {
                Answer::Channel(self.manage_channel(&user(actor)?, &channel, action).await?)
            }
            Call::Server { operation } => self.server(operation).await?,
            Call::Block { user: name, other, blocked } => {
                self.block(&user(name)?, &other, blocked).await?;
                Answer::Done
            }
            Call::Join { user: name, channel } => Answer::Channel(self.join(&user(name)?, &channel).await?),
            Call::Leave { user: name, channel } => Answer::Channel(self.leave(&user(name)?, &channel).await?),
            Call::OpenDm { user: name, other } => Answer::Channel(self.open_dm(&user(name)?, &other).await?),
            Call::History { user: name, channel, before, after, limit } => {
                Answer::Page(self.history(&user(name)?, &channel, HistoryQuery { before, after, limit }).await?)
            }
            Call::ListChannels { user: name } => Answer::Channels(self.list_channels(&user(name)?).await?),
            Call::ChannelView { user: name, channel } => {
                let channel = ChannelId::parse(channel)?;
                Answer::Channel(self.channel_view(&user(name)?, &channel).await?)
            }
            Call::MarkRead { user: name, channel, seq } => {
                Answer::Seq(self.mark_read(&user(name)?, &channel, seq).await?)
            }
            Call::MarkDelivered { user: name, channel, seq } => {
                self.mark_delivered(&user(name)?, &channel, seq).await?;
                Answer::Done
            }
            Call::Members { user: name, channel } => Answer::Users(self.members(&user(name)?, &channel).await?),
            Call::FirstRetainedSeq { channel } => Answer::Seq(self.first_retained_seq(&channel).await?),
            Call::Feed { channel, after, limit } => Answer::Page(self.feed(&channel, after, limit).await?),
            Call::Presence { updates } => {
                self.record_presence(updates).await?;
                Answer::Done
            }
            Call::Device { user: name, platform, token, register } => {
                Answer::Flag(self.device(&user(name)?, &platform, &token, register).await?)
            }
            Call::Mute { user: name, channel, until } => {
                self.mute(&user(name)?, &channel, until).await?;
                Answer::Done
            }
            Call::Home { .. } => {
                return Err(RouterError::InvalidArgument(
                    "moving a channel's home needs a router that serves regions (PARLEY_REGION, --peer-token)".into(),
                ))
            }
        })
    }

    fn limits(&self) -> Limits {
        let config = self.config();
        Limits {
            max_text_bytes: config.max_text_bytes,
            max_channel_members: config.max_channel_members,
            fanout_threshold: config.fanout_threshold,
        }
    }

    fn stats(&self) -> &Arc<RouterStats> {
        LocalRouter::stats(self)
    }
}

/// What [`app`] serves.
#[derive(Clone, Debug)]
struct ServiceState {
    router: Router,
    token: Option<Arc<str>>,
    peers: Option<PeerEntry>,
}

/// How calls from other regions' routers are taken: with their token, and passed to the owner of their channel in
/// this region.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Runs the calls (a pool over this region's routers, or the writer itself when it is the only one).
    pub router: Router,
    /// The token other regions' routers present.
    pub token: Arc<str>,
}

/// The router's internal HTTP API (`/internal/v1/call`, `/internal/v1/config`, `/healthz`).
pub fn app(router: Router, token: Option<String>) -> axum::Router {
    app_with_peers(router, token, None)
}

/// [`app`], and `/internal/v1/peer-call` for other regions' routers when `peers` is given (see
/// [`crate::global`]).
pub fn app_with_peers(router: Router, token: Option<String>, peers: Option<PeerEntry>) -> axum::Router {
    let state = ServiceState { router, token: token.filter(|token| !token.is_empty()).map(Arc::from), peers };
    let routes = axum::Router::new()
        .route(CALL_PATH, post(call_handler))
        .route(PEER_CALL_PATH, post(peer_call_handler))
        .route(CONFIG_PATH, get(config_handler))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    parley_api::http::with_fallbacks(routes)
}

/// Refuses a request without the internal token (when one is configured); the token is compared in constant
/// time.
fn authorize(state: &ServiceState, headers: &HeaderMap) -> Result<(), HttpError> {
    match &state.token {
        Some(token) if !bearer_is(headers, token) => Err(HttpError::unauthorized("missing or wrong internal token")),
        _ => Ok(()),
    }
}

/// Runs one call. A call the router refuses is still `200`, with the error in the reply (see
/// [`parley_api::remote`]); only a request that is no call is an HTTP error.
async fn call_handler(
    State(state): State<ServiceState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Reply<Answer>>, HttpError> {
    authorize(&state, &headers)?;
    let body = body?;
    let call: Call =
        serde_json::from_slice(&body).map_err(|error| HttpError::invalid_frame(format!("invalid call: {error}")))?;
    Ok(Json(state.router.execute(call).await))
}

/// Runs one call from another region's router: only with the peer token, and at the owner of its channel here.
async fn peer_call_handler(
    State(state): State<ServiceState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Reply<Answer>>, HttpError> {
    let Some(peers) = &state.peers else {
        return Err(HttpError::unauthorized("this router takes no calls from other regions (no peer token)"));
    };
    if !bearer_is(&headers, &peers.token) {
        return Err(HttpError::unauthorized("missing or wrong peer token"));
    }
    let body = body?;
    let call: Call =
        serde_json::from_slice(&body).map_err(|error| HttpError::invalid_frame(format!("invalid call: {error}")))?;
    Ok(Json(peers.router.execute(call).await))
}

async fn config_handler(State(state): State<ServiceState>, headers: HeaderMap) -> Result<Json<Limits>, HttpError> {
    // Other regions' routers read the limits with the peer token.
    if let Some(peers) = &state.peers {
        if bearer_is(&headers, &peers.token) {
            return Ok(Json(state.router.limits()));
        }
    }
    authorize(&state, &headers)?;
    Ok(Json(state.router.limits()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;

    /// A router that refuses every call.
    #[derive(Debug, Default)]
    struct Refusing {
        stats: Arc<RouterStats>,
    }

    #[async_trait]
    impl RouterService for Refusing {
        async fn call(&self, call: Call) -> Result<Answer, RouterError> {
            Err(RouterError::NotAMember(format!("{} refused", call.op())))
        }

        fn limits(&self) -> Limits {
            Limits::default()
        }

        fn stats(&self) -> &Arc<RouterStats> {
            &self.stats
        }
    }

    fn state() -> ServiceState {
        ServiceState { router: Router::new(Refusing::default()), token: Some(Arc::from("secret")), peers: None }
    }

    fn headers(token: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(axum::http::header::AUTHORIZATION, HeaderValue::from_static(token));
        }
        headers
    }

    async fn answer(response: impl IntoResponse) -> (StatusCode, serde_json::Value) {
        let response = response.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("a JSON body"))
    }

    #[tokio::test]
    async fn refusals_of_the_api_are_http_errors_and_refusals_of_calls_stay_in_the_reply() {
        let call = Bytes::from_static(br#"{"op":"list_channels","user":"alice"}"#);
        for presented in [None, Some("Bearer wrong"), Some("Bearer secre"), Some("secret")] {
            let (status, body) = answer(call_handler(State(state()), headers(presented), Ok(call.clone())).await).await;
            assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &serde_json::json!("unauthorized")));
            assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
            let (status, _) = answer(config_handler(State(state()), headers(presented)).await).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{presented:?}");
        }
        let authorized = || headers(Some("Bearer secret"));
        let not_a_call = Ok(Bytes::from_static(b"{\"op\":\"dance\"}"));
        let (status, body) = answer(call_handler(State(state()), authorized(), not_a_call).await).await;
        assert_eq!((status, &body["code"]), (StatusCode::BAD_REQUEST, &serde_json::json!("invalid_frame")), "{body}");
        let (status, body) = answer(call_handler(State(state()), authorized(), Ok(call)).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["error"]["code"], "not_a_member", "{body}");
        let (status, body) = answer(config_handler(State(state()), authorized()).await).await;
        assert_eq!((status, &body["max_text_bytes"]), (StatusCode::OK, &serde_json::json!(4096)));
    }
}
