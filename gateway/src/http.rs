//! The axum application: WebSocket upgrade, HTTP API, demo page and health; and the admin application.

use crate::auth::Authenticator;
use crate::config::GatewayConfig;
use crate::connection::{self, ConnectionContext, Session};
use crate::drain::{DrainPlan, Drainer};
use crate::hub::Hub;
use crate::metrics::{Limit, Metrics};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as AxumRouter};
use parley_core::protocol::ErrorCode;
use parley_core::UserId;
use parley_router::backend::HistoryQuery;
use parley_router::{Router, RouterError};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};
use tracing::{info_span, Instrument};

const INDEX_HTML: &str = include_str!("../static/index.html");
const DEV_TOKEN_TTL_SECS: u64 = 12 * 3600;

/// Shared state of the application.
#[derive(Clone)]
pub struct AppState {
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Router handle.
    pub router: Router,
    /// Local index.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub config: Arc<GatewayConfig>,
    /// Shutdown signal.
    pub shutdown: watch::Receiver<bool>,
    /// Connection permits.
    pub permits: Arc<Semaphore>,
    /// Connection ids.
    pub next_conn: Arc<AtomicU64>,
    /// Whether the instance accepts connections (false while draining).
    pub accepting: Arc<AtomicBool>,
    /// Drain control.
    pub drainer: Arc<Drainer>,
    /// Push notifications, when a provider is configured.
    pub push: Option<Arc<crate::push::PushService>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({ "code": code, "message": message.into() }))).into_response()
}

fn router_error(error: RouterError) -> Response {
    let status = match error.code() {
        ErrorCode::NotAMember => StatusCode::FORBIDDEN,
        ErrorCode::NoSuchChannel => StatusCode::NOT_FOUND,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ChannelExists => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    api_error(status, error.code().as_str(), error.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

// Handlers answer with the `Response` directly; boxing it would only move the allocation.
#[allow(clippy::result_large_err)]
fn authenticate(state: &AppState, token: Option<&str>) -> Result<crate::auth::Identity, Response> {
    let Some(token) = token else {
        return Err(api_error(StatusCode::UNAUTHORIZED, "unauthorized", "missing token"));
    };
    state.auth.verify(token).map_err(|error| api_error(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()))
}

/// The client-facing application.
pub fn app(state: AppState) -> AxumRouter {
    AxumRouter::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/ws", get(websocket))
        .route("/v1/dev/login", post(dev_login))
        .route("/v1/channels", get(list_channels))
        .route("/v1/devices", post(register_device).delete(unregister_device))
        .route("/v1/channels/{id}/messages", get(history))
        .with_state(state.clone())
        .merge(crate::fallback::routes(state))
}

/// The admin application (metrics).
pub fn admin_app(state: AppState) -> AxumRouter {
    AxumRouter::new().route("/metrics", get(metrics)).route("/admin/drain", post(drain)).with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.accepting.load(Ordering::Relaxed) && !*state.shutdown.borrow() {
        "ready".into_response()
    } else {
        api_error(StatusCode::SERVICE_UNAVAILABLE, "draining", "not accepting connections")
    }
}

#[derive(Deserialize, Default)]
struct DrainRequest {
    window_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

async fn drain(State(state): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return api_error(StatusCode::FORBIDDEN, "admin_disabled", "no --admin-token is configured");
    };
    if bearer(&headers) != Some(expected) {
        return api_error(StatusCode::UNAUTHORIZED, "unauthorized", "wrong or missing admin token");
    }
    let request: DrainRequest = if body.is_empty() {
        DrainRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => return api_error(StatusCode::BAD_REQUEST, "invalid_frame", error.to_string()),
        }
    };
    let default = state.config.drain_plan();
    let window = request.window_ms.map(std::time::Duration::from_millis).unwrap_or(default.window);
    let deadline = request.deadline_ms.map(std::time::Duration::from_millis).unwrap_or(default.deadline).max(window);
    let started = state.drainer.start(DrainPlan { window, deadline });
    let connections = state.hub.connection_count();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "draining": true, "started": started, "connections": connections,
            "window_ms": window.as_millis() as u64, "deadline_ms": deadline.as_millis() as u64 })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.router.stats();
    let extra = [
        ("router_messages", "Messages made durable", stats.messages.load(Ordering::Relaxed)),
        ("router_batches", "Durable batches written", stats.batches.load(Ordering::Relaxed)),
        ("router_write_failures", "Durable writes that failed", stats.write_failures.load(Ordering::Relaxed)),
        ("router_publish_failures", "Publishes that failed", stats.publish_failures.load(Ordering::Relaxed)),
        (
            "router_tap_dropped",
            "Durable messages not offered to push (queue full)",
            stats.tap_dropped.load(Ordering::Relaxed),
        ),
    ];
    let push = state.push.as_ref().map(|push| push.stats()).unwrap_or_default();
    let extra = [
        extra.as_slice(),
        &[
            ("push_sent", "Push notifications accepted by a provider", push.sent),
            ("push_failed", "Push notifications that failed", push.failed),
            ("push_invalid_tokens", "Device tokens unregistered as invalid", push.invalid_tokens),
            ("push_dropped", "Push notifications dropped (queue full)", push.dropped),
        ],
    ]
    .concat();
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(&extra),
    )
        .into_response()
}

#[derive(Deserialize)]
struct WsQuery {
    v: Option<u32>,
    token: Option<String>,
}

async fn websocket(
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(version) = query.v {
        if version != parley_core::protocol::PROTOCOL_VERSION {
            return api_error(
                StatusCode::BAD_REQUEST,
                "unsupported_version",
                format!("protocol version {version} is not supported; use v=1"),
            );
        }
    }
    let identity = match authenticate(&state, query.token.as_deref().or_else(|| bearer(&headers))) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    if !state.accepting.load(Ordering::Relaxed) || *state.shutdown.borrow() {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "draining", "this instance is draining; connect to another");
    }
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        state.metrics.limit(Limit::Connections);
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "connection limit reached; retry with backoff",
        );
    };
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u8; 12];
    rand::rng().fill_bytes(&mut random);
    let session_id: String =
        std::iter::once("s-".to_owned()).chain(random.iter().map(|byte| format!("{byte:02x}"))).collect();
    let session = Session { conn, session_id, user: identity.user, expires_at: identity.expires_at };
    let context = ConnectionContext {
        router: state.router.clone(),
        hub: state.hub.clone(),
        metrics: state.metrics.clone(),
        config: state.config.clone(),
        shutdown: state.shutdown.clone(),
        drain: state.drainer.subscribe(),
    };
    let max = state.config.max_frame_bytes;
    upgrade
        .read_buffer_size(state.config.ws_read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4).max(256 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let metrics = context.metrics.clone();
            async move {
                metrics.connections.inc();
                metrics.connections_total.inc();
                connection::serve(socket, context, session, too_big).await;
                metrics.connections.dec();
                drop(permit);
            }
            .instrument(info_span!("ws"))
        })
}

/// Whether axum's socket error is tungstenite's "message or frame too big".
fn too_big(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(tungstenite::Error::Capacity(_)) = current.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = current.source();
    }
    false
}

#[derive(Deserialize)]
struct DevLogin {
    user: String,
}

async fn dev_login(
    State(state): State<AppState>,
    body: Result<Json<DevLogin>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !state.auth.dev_login_enabled() {
        return api_error(
            StatusCode::NOT_FOUND,
            "dev_login_disabled",
            "the insecure dev login is off (--insecure-dev-login)",
        );
    }
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return api_error(StatusCode::BAD_REQUEST, "invalid_frame", rejection.body_text()),
    };
    let user = match UserId::new(body.user) {
        Ok(user) => user,
        Err(error) => return api_error(StatusCode::BAD_REQUEST, "invalid_argument", error.to_string()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    match state.auth.mint_dev_token(&user, now, DEV_TOKEN_TTL_SECS) {
        Some((token, expires)) => {
            Json(json!({ "token": token, "user": user.as_str(), "expires_at": expires * 1000, "insecure": true }))
                .into_response()
        }
        None => api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not mint a token"),
    }
}

async fn list_channels(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let identity = match authenticate(&state, bearer(&headers)) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    match state.router.list_channels(&identity.user).await {
        Ok(channels) => Json(json!({ "channels": channels })).into_response(),
        Err(error) => router_error(error),
    }
}

#[derive(Deserialize)]
struct DeviceBody {
    platform: String,
    token: String,
}

async fn device_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Json<DeviceBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(UserId, parley_push::Device, Arc<crate::push::PushService>), Response> {
    let identity = authenticate(state, bearer(headers))?;
    let Some(push) = state.push.clone() else {
        return Err(api_error(StatusCode::SERVICE_UNAVAILABLE, "push_disabled", "no push provider is configured"));
    };
    let Json(body) =
        body.map_err(|rejection| api_error(StatusCode::BAD_REQUEST, "invalid_frame", rejection.body_text()))?;
    let platform = match body.platform.as_str() {
        "fcm" => parley_push::Platform::Fcm,
        "apns" => parley_push::Platform::Apns,
        other => {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("unknown platform {other:?}; use fcm or apns"),
            ))
        }
    };
    if body.token.is_empty() || body.token.len() > 4096 {
        return Err(api_error(StatusCode::BAD_REQUEST, "invalid_argument", "token must be 1-4096 bytes"));
    }
    Ok((identity.user, parley_push::Device::new(platform, body.token), push))
}

#[allow(clippy::result_large_err)]
async fn register_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DeviceBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (user, device, push) = match device_request(&state, &headers, body).await {
        Ok(parts) => parts,
        Err(response) => return response,
    };
    use parley_push::DeviceRegistry;
    match push.registry.register(user.as_str(), device).await {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "registered": true }))).into_response(),
        Err(error) => api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()),
    }
}

async fn unregister_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DeviceBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (_, device, push) = match device_request(&state, &headers, body).await {
        Ok(parts) => parts,
        Err(response) => return response,
    };
    use parley_push::DeviceRegistry;
    match push.registry.unregister(device.platform, &device.token).await {
        Ok(removed) => Json(json!({ "removed": removed })).into_response(),
        Err(error) => api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()),
    }
}

#[derive(Deserialize)]
struct HistoryParams {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
}

async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    params: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let identity = match authenticate(&state, bearer(&headers)) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => return api_error(StatusCode::BAD_REQUEST, "invalid_argument", rejection.body_text()),
    };
    if params.limit == Some(0) {
        return api_error(StatusCode::BAD_REQUEST, "invalid_argument", "limit must be 1-200");
    }
    let query = HistoryQuery { before: params.before, after: params.after, limit: params.limit.unwrap_or(50) };
    match state.router.history(&identity.user, &channel, query).await {
        Ok(page) => {
            Json(json!({ "channel": channel, "messages": page.messages, "has_more": page.has_more })).into_response()
        }
        Err(error) => router_error(error),
    }
}
