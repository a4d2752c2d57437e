//! The axum applications: the client-facing one (WebSocket upgrade, HTTP API, demo page, health, the fallback
//! transports' routes and the server API's, [`crate::server_api`]) and the admin one (metrics, drain). Every refusal is a [`HttpError`],
//! `{"code": ..., "message": ...}`; admission and authentication are [`crate::admission`]'s.

pub use crate::admission::AppState;

use crate::admission::{parse_connect_query, token};
use crate::connection::{ReadFailure, Transport};
use crate::drain::DrainPlan;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as AxumRouter};
use parley_api::http::{bearer, bearer_is, code, HttpError};
use parley_api::HistoryQuery;
use parley_core::UserId;
use serde::Deserialize;
use serde_json::json;
use tracing::{info_span, Instrument};

const INDEX_HTML: &str = include_str!("../static/index.html");
const DEV_TOKEN_TTL_SECS: u64 = 12 * 3600;

/// The client-facing application.
pub fn app(state: AppState) -> AxumRouter {
    let routes = AxumRouter::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/ws", get(websocket))
        .route("/v1/dev/login", post(dev_login))
        .route("/v1/channels", get(list_channels))
        .route("/v1/devices", post(register_device).delete(unregister_device))
        .route("/v1/channels/{id}/messages", get(history))
        .route("/v1/channels/{id}/mute", axum::routing::put(mute).delete(unmute))
        .with_state(state.clone())
        .merge(crate::server_api::routes(state.clone()))
        .merge(crate::fallback::routes(state));
    parley_api::http::with_fallbacks(routes)
}

/// The admin application (metrics, drain).
pub fn admin_app(state: AppState) -> AxumRouter {
    parley_api::http::with_fallbacks(
        AxumRouter::new().route("/metrics", get(metrics)).route("/admin/drain", post(drain)).with_state(state),
    )
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, HttpError> {
    if state.accepts_connections() {
        Ok("ready")
    } else {
        Err(HttpError::new(StatusCode::SERVICE_UNAVAILABLE, code::DRAINING, "not accepting connections"))
    }
}

#[derive(Deserialize, Default)]
struct DrainRequest {
    window_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

async fn drain(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return Err(HttpError::new(StatusCode::FORBIDDEN, code::ADMIN_DISABLED, "no --admin-token is configured"));
    };
    if !bearer_is(&headers, expected) {
        return Err(HttpError::unauthorized("wrong or missing admin token"));
    }
    let body = body?;
    let request: DrainRequest = if body.is_empty() {
        DrainRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| HttpError::invalid_frame(error.to_string()))?
    };
    let default = state.config.drain_plan();
    let window = request.window_ms.map(std::time::Duration::from_millis).unwrap_or(default.window);
    let deadline = request.deadline_ms.map(std::time::Duration::from_millis).unwrap_or(default.deadline).max(window);
    let started = state.drainer.start(DrainPlan { window, deadline });
    let connections = state.hub.connection_count();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "draining": true, "started": started, "connections": connections,
            "window_ms": window.as_millis() as u64, "deadline_ms": deadline.as_millis() as u64 })),
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, parley_telemetry::metrics::CONTENT_TYPE)], state.metrics.encode()).into_response()
}

async fn websocket(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    let connect = parse_connect_query(query.as_deref().unwrap_or_default())?;
    let upgrade = upgrade
        .map_err(|rejection| HttpError::new(rejection.status(), code::UPGRADE_REQUIRED, rejection.body_text()))?;
    let admission = state.admit(connect.v, token(connect.token.as_deref(), &headers)).await?;
    let max = state.config.max_frame_bytes;
    Ok(upgrade
        .read_buffer_size(state.config.ws_read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4).max(256 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| admission.serve(socket, Transport::websocket(classify)).instrument(info_span!("ws"))))
}

/// What a read error of axum's socket was, from tungstenite's error beneath it: a frame or message too big
/// (1009), a protocol violation (1002), a text frame that is not UTF-8 (1007), or the connection failing.
fn classify(error: &axum::Error) -> ReadFailure {
    use tungstenite::error::ProtocolError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(error) = current.downcast_ref::<tungstenite::Error>() {
            return match error {
                tungstenite::Error::Capacity(_) => ReadFailure::TooBig,
                tungstenite::Error::Utf8(_) => ReadFailure::InvalidUtf8,
                // The TCP connection ended without a close frame, or something came after the closing handshake:
                // nothing to answer.
                tungstenite::Error::Protocol(
                    ProtocolError::ResetWithoutClosingHandshake
                    | ProtocolError::ReceivedAfterClosing
                    | ProtocolError::SendAfterClosing,
                ) => ReadFailure::Gone,
                tungstenite::Error::Protocol(_) => ReadFailure::Protocol,
                _ => ReadFailure::Gone,
            };
        }
        source = current.source();
    }
    ReadFailure::Gone
}

#[derive(Deserialize)]
struct DevLogin {
    user: String,
}

async fn dev_login(
    State(state): State<AppState>,
    body: Result<Json<DevLogin>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    if !state.auth.dev_login_enabled() {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            code::DEV_LOGIN_DISABLED,
            "the insecure dev login is off (--insecure-dev-login)",
        ));
    }
    let Json(body) = body?;
    let user = UserId::new(body.user).map_err(|error| HttpError::invalid_argument(error.to_string()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let (token, expires) = state
        .auth
        .mint_dev_token(&user, now, DEV_TOKEN_TTL_SECS)
        .ok_or_else(|| HttpError::internal("could not mint a token"))?;
    Ok(Json(json!({ "token": token, "user": user.as_str(), "expires_at": expires * 1000, "insecure": true })))
}

async fn list_channels(State(state): State<AppState>, headers: HeaderMap) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let channels = state.router.list_channels(&identity.user).await?;
    Ok(Json(json!({ "channels": channels })))
}

#[derive(Deserialize)]
struct DeviceBody {
    platform: String,
    token: String,
}

/// Registers a device for the caller's push notifications (kept by the router, in the store).
async fn register_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DeviceBody>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let Json(body) = body?;
    let known = state.router.register_device(&identity.user, &body.platform, &body.token).await?;
    let status = if known { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({ "registered": true }))))
}

/// Forgets one of the caller's devices.
async fn unregister_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DeviceBody>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let Json(body) = body?;
    let removed = state.router.unregister_device(&identity.user, &body.platform, &body.token).await?;
    Ok(Json(json!({ "removed": removed })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MuteBody {
    /// Muted until (Unix ms); absent: until unmuted.
    until: Option<u64>,
}

/// Mutes a channel's push notifications for the caller (a member).
async fn mute(
    State(state): State<AppState>,
    headers: HeaderMap,
    channel: Result<Path<String>, PathRejection>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let Path(channel) = channel?;
    let body = body?;
    let MuteBody { until } = if body.is_empty() {
        MuteBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| HttpError::invalid_frame(error.to_string()))?
    };
    let until = until.unwrap_or(u64::MAX);
    state.router.mute(&identity.user, &channel, Some(until)).await?;
    let until = (until != u64::MAX).then_some(until);
    Ok(Json(json!({ "channel": channel, "muted": true, "until": until })))
}

/// Unmutes a channel's push notifications for the caller.
async fn unmute(
    State(state): State<AppState>,
    headers: HeaderMap,
    channel: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let Path(channel) = channel?;
    state.router.mute(&identity.user, &channel, None).await?;
    Ok(Json(json!({ "channel": channel, "muted": false })))
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
    channel: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let identity = state.authenticate(bearer(&headers)).await?;
    let Path(channel) = channel?;
    let Query(params) = params?;
    if params.limit == Some(0) {
        return Err(HttpError::invalid_argument("limit must be 1-200"));
    }
    let query = HistoryQuery { before: params.before, after: params.after, limit: params.limit.unwrap_or(50) };
    let page = state.router.history(&identity.user, &channel, query).await?;
    Ok(Json(json!({ "channel": channel, "messages": page.messages, "has_more": page.has_more })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::tests::{state, valid_token};
    use crate::config::GatewayConfig;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tower::ServiceExt;

    async fn answer(app: AxumRouter, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn drain_request(token: Option<&str>) -> Request<Body> {
        let mut request = Request::post("/admin/drain");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        request.body(Body::from("{\"window_ms\":1000}")).expect("request")
    }

    #[tokio::test]
    async fn the_admin_drain_needs_the_admin_token() {
        let (mut disabled, _shutdown) = state(8);
        disabled.config = Arc::new(GatewayConfig { admin_token: None, ..GatewayConfig::default() });
        let (status, body) = answer(admin_app(disabled), drain_request(Some("anything"))).await;
        assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("admin_disabled")), "{body}");

        let (mut enabled, _shutdown) = state(8);
        enabled.config =
            Arc::new(GatewayConfig { admin_token: Some("admin-secret".into()), ..GatewayConfig::default() });
        for token in [None, Some("admin-secreT"), Some("admin-secret-and-more"), Some("")] {
            let (status, body) = answer(admin_app(enabled.clone()), drain_request(token)).await;
            assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("unauthorized")), "{token:?}");
            assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
        }
        let (status, body) = answer(admin_app(enabled.clone()), drain_request(Some("admin-secret"))).await;
        assert_eq!((status, &body["draining"], &body["window_ms"]), (StatusCode::ACCEPTED, &json!(true), &json!(1000)));
        // Draining: not ready, and no new connections.
        let readyz = Request::get("/readyz").body(Body::empty()).expect("request");
        let (status, body) = answer(app(enabled.clone()), readyz).await;
        assert_eq!((status, &body["code"]), (StatusCode::SERVICE_UNAVAILABLE, &json!("draining")), "{body}");
    }

    #[test]
    fn read_errors_are_classified_by_their_close_code() {
        use tungstenite::error::{CapacityError, ProtocolError};
        let cases = [
            (tungstenite::Error::Capacity(CapacityError::MessageTooLong { size: 2, max_size: 1 }), ReadFailure::TooBig),
            (tungstenite::Error::Protocol(ProtocolError::NonZeroReservedBits), ReadFailure::Protocol),
            (tungstenite::Error::Protocol(ProtocolError::UnmaskedFrameFromClient), ReadFailure::Protocol),
            (tungstenite::Error::Protocol(ProtocolError::UnknownDataFrameType(3)), ReadFailure::Protocol),
            (tungstenite::Error::Utf8("invalid".into()), ReadFailure::InvalidUtf8),
            (tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake), ReadFailure::Gone),
            (tungstenite::Error::ConnectionClosed, ReadFailure::Gone),
            (tungstenite::Error::Io(std::io::ErrorKind::ConnectionReset.into()), ReadFailure::Gone),
        ];
        for (error, failure) in cases {
            let shown = error.to_string();
            assert_eq!(classify(&axum::Error::new(error)), failure, "{shown}");
        }
    }

    #[tokio::test]
    async fn a_malformed_version_is_unsupported_version_on_every_connect() {
        let (state, _shutdown) = state(8);
        let token = valid_token();
        for query in ["v=abc", "v=", "v=1&v=2", "v=-1", "v=99999999999", "v=1.0"] {
            for (method, path) in [("GET", "/v1/ws"), ("GET", "/v1/sse"), ("POST", "/v1/poll/connect")] {
                let request = Request::builder()
                    .method(method)
                    .uri(format!("{path}?{query}&token={token}"))
                    .body(Body::empty())
                    .expect("request");
                let (status, body) = answer(app(state.clone()), request).await;
                assert_eq!(
                    (status, &body["code"]),
                    (StatusCode::BAD_REQUEST, &json!("unsupported_version")),
                    "{path}?{query}: {body}"
                );
            }
        }
    }

    #[tokio::test]
    async fn http_api_refusals_are_json_with_a_code_and_a_message() {
        let (state, _shutdown) = state(8);
        let get = |uri: &str, token: Option<&str>| {
            let mut request = Request::get(uri);
            if let Some(token) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            request.body(Body::empty()).expect("request")
        };
        let token = valid_token();
        let cases = [
            (get("/v1/channels", None), StatusCode::UNAUTHORIZED, "unauthorized"),
            (get("/v1/channels", Some("garbage")), StatusCode::UNAUTHORIZED, "unauthorized"),
            // The test router is shutting down: the router's error keeps its code.
            (get("/v1/channels", Some(&token)), StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (get("/v1/channels/g:room/messages?limit=0", Some(&token)), StatusCode::BAD_REQUEST, "invalid_argument"),
            (get("/v1/channels/g:room/messages?limit=many", Some(&token)), StatusCode::BAD_REQUEST, "invalid_argument"),
            (get("/v1/sse?v=2", Some(&token)), StatusCode::BAD_REQUEST, "unsupported_version"),
            (get("/v1/poll/s-none?v=x", Some(&token)), StatusCode::NOT_FOUND, "no_such_session"),
            (get("/v1/poll/s-none?wait_ms=x", Some(&token)), StatusCode::BAD_REQUEST, "invalid_argument"),
            (get("/v1/channels/%FF/messages", Some(&token)), StatusCode::BAD_REQUEST, "invalid_argument"),
            (get("/v1/poll/%FF", Some(&token)), StatusCode::BAD_REQUEST, "invalid_argument"),
        ];
        for (request, status, code) in cases {
            let uri = request.uri().to_string();
            let (actual, body) = answer(app(state.clone()), request).await;
            assert_eq!((actual, &body["code"]), (status, &json!(code)), "{uri}: {body}");
            assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "{uri}: {body}");
        }
        let (status, body) = answer(app(state.clone()), get("/v1/ws?v=1", Some(&token))).await;
        assert!(status.is_client_error() && body["code"] == json!("upgrade_required"), "{status}: {body}");
        let login = Request::post("/v1/dev/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{\"user\":\"demo\"}"))
            .expect("request");
        let (status, body) = answer(app(state.clone()), login).await;
        assert_eq!((status, &body["code"]), (StatusCode::NOT_FOUND, &json!("dev_login_disabled")), "{body}");
        let device = Request::post("/v1/devices")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{\"platform\":\"fcm\"}"))
            .expect("request");
        let (status, body) = answer(app(state), device).await;
        assert_eq!((status, &body["code"]), (StatusCode::BAD_REQUEST, &json!("invalid_frame")), "{body}");
    }
}
