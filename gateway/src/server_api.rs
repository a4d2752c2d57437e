//! The server API: what the application's backend does with full authority, over HTTP on the client port, under
//! `/server/v1/` (after Centrifugo's server API).
//!
//! Every request carries one of the configured API keys (`--server-api-key`, several comma-separated while a key
//! is rotated) as `Authorization: Bearer <key>`, compared in constant time. Without a configured key every endpoint
//! answers 404 `server_api_disabled`; a missing or wrong key is 401 `unauthorized`. The key is checked before
//! anything else of the request is read. Errors are [`HttpError`]s; the router's refusals keep their codes.
//!
//! | endpoint | does | answers |
//! |---|---|---|
//! | `POST /server/v1/channels` | creates a group channel (idempotent) | 201 or 200 `{"channel"}`; 409 `channel_exists` |
//! | `DELETE /server/v1/channels/{id}` | deletes it | 204; 404 `no_such_channel` |
//! | `PATCH /server/v1/channels/{id}` | changes visibility or posting | 200 `{"channel"}` |
//! | `POST /server/v1/channels/{id}/members` | adds a member (and sets a role) | 200 `{"channel"}` |
//! | `DELETE /server/v1/channels/{id}/members/{user}` | removes a member | 200 `{"channel"}` |
//! | `POST /server/v1/channels/{id}/bans`, `DELETE .../bans/{user}` | bans, unbans | 200 `{"channel"}` |
//! | `POST /server/v1/channels/{id}/messages` | posts as `@server` (idempotent) | 200 `{"channel","id","seq","ts","duplicate"}` |
//! | `POST /server/v1/users/{user}/disconnect` | closes the user's sessions everywhere (4003) | 202 |
//! | `POST /server/v1/users/{user}/revoke` | revokes the user's tokens issued before a time (4004) | 202 |
//! | `GET /server/v1/presence?users=a,b` | presence of up to 1,000 users | 200 `{"users"}` |
//!
//! Channel operations run as [`ServerOp`]s on the router (no role is checked; named users become members at once
//! whatever the membership policy). Disconnects and revocations reach every gateway instance as events on the
//! all-gateways topic ([`ALL_GATEWAYS_TOPIC`]); a revocation is first stored in the shared
//! [`parley_bus::revocation::RevocationStore`], so that connects are refused from then on, on every instance and
//! after restarts.

use crate::admission::AppState;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router as AxumRouter};
use parley_api::http::{bearer_is_any, code, HttpError};
use parley_api::{ChannelAction, ChannelSettings, Router, ServerOp};
use parley_bus::pubsub::{ControlEvent, Event, ALL_GATEWAYS_TOPIC};
use parley_bus::revocation::unix_secs;
use parley_core::access::{Posting, Role, Visibility};
use parley_core::protocol::{ChannelView, ErrorCode};
use parley_core::{ChannelId, UserId};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

/// Most users one presence request may name.
pub const MAX_PRESENCE_USERS: usize = 1_000;

/// How far in the future (seconds, for clock skew) a revocation's `before` may lie; further is refused (a time in
/// milliseconds, most likely).
pub const MAX_FUTURE_REVOCATION_SECS: u64 = 60;

/// The user a create asks about to learn whether the channel exists already (any valid name would do: the answer
/// only tells "no such channel" from the rest).
const PROBE_USER: &str = "parley-server-api";

/// The server API's routes (merged into the client application).
pub fn routes(state: AppState) -> AxumRouter {
    AxumRouter::new()
        .route("/server/v1/channels", post(create_channel))
        .route("/server/v1/channels/{id}", delete(delete_channel).patch(update_channel))
        .route("/server/v1/channels/{id}/members", post(add_member))
        .route("/server/v1/channels/{id}/members/{user}", delete(remove_member))
        .route("/server/v1/channels/{id}/bans", post(ban))
        .route("/server/v1/channels/{id}/bans/{user}", delete(unban))
        .route("/server/v1/channels/{id}/messages", post(post_message))
        .route("/server/v1/channels/{id}/home", put(move_home))
        .route("/server/v1/regions/{region}", put(set_region))
        .route("/server/v1/users/{user}/disconnect", post(disconnect))
        .route("/server/v1/users/{user}/revoke", post(revoke))
        .route("/server/v1/presence", get(presence))
        .with_state(state)
}

/// A request that carries a valid server API key. As a handler's first argument it is checked before the path, the
/// query and the body are read.
#[derive(Debug, Clone, Copy)]
pub struct Backend;

impl FromRequestParts<AppState> for Backend {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.server_api_keys.is_empty() {
            return Err(HttpError::new(
                StatusCode::NOT_FOUND,
                code::SERVER_API_DISABLED,
                "the server API is off: no --server-api-key is configured",
            ));
        }
        if !bearer_is_any(&parts.headers, state.server_api_keys.iter().map(String::as_str)) {
            return Err(HttpError::unauthorized("wrong or missing server API key (Authorization: Bearer <key>)"));
        }
        Ok(Backend)
    }
}

/// A user id from a path or a body: `invalid_argument` when it is not one.
fn user_id(user: &str) -> Result<UserId, HttpError> {
    UserId::new(user).map_err(|error| HttpError::invalid_argument(error.to_string()))
}

/// `{"channel": <channel info>}`, as nobody in particular sees it (`joined: false`, no read cursor, no role).
fn channel(view: ChannelView) -> Json<serde_json::Value> {
    Json(json!({ "channel": view }))
}

/// Whether a group channel exists: a member list asked by a user who is (most likely) not a member answers
/// `not_a_member` for an existing channel and `no_such_channel` otherwise.
async fn exists(router: &Router, channel: &str) -> Result<bool, HttpError> {
    let probe = user_id(PROBE_USER)?;
    match router.members(&probe, channel).await {
        Ok(_) => Ok(true),
        Err(error) => match error.code() {
            ErrorCode::NoSuchChannel => Ok(false),
            ErrorCode::NotAMember => Ok(true),
            _ => Err(error.into()),
        },
    }
}

/// Runs a channel operation that answers the channel.
async fn manage(state: &AppState, channel: String, action: ChannelAction) -> Result<ChannelView, HttpError> {
    let op = "server_manage";
    Ok(state.router.server(ServerOp::Manage { channel, action }).await?.into_channel(op)?)
}

#[derive(Deserialize)]
struct CreateChannel {
    name: String,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    visibility: Option<Visibility>,
    #[serde(default)]
    posting: Option<Posting>,
}

/// `POST /server/v1/channels`: 201 when the channel did not exist just before, 200 when it existed with the same
/// settings (409 `channel_exists` with others).
async fn create_channel(
    _: Backend,
    State(state): State<AppState>,
    body: Result<Json<CreateChannel>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Json(body) = body?;
    let id = ChannelId::group(&body.name).map_err(|error| HttpError::invalid_argument(error.to_string()))?;
    let existed = exists(&state.router, id.as_str()).await?;
    let settings =
        ChannelSettings { visibility: body.visibility.unwrap_or_default(), posting: body.posting.unwrap_or_default() };
    let operation = ServerOp::CreateChannel { name: body.name, owner: body.owner, members: body.members, settings };
    let view = state.router.server(operation).await?.into_channel("server_create_channel")?;
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    if !existed {
        info!(channel = %view.id, members = view.members, "server API created a channel");
    }
    Ok((status, channel(view)))
}

/// `DELETE /server/v1/channels/{id}`: 204.
async fn delete_channel(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, HttpError> {
    let Path(id) = id?;
    state.router.server(ServerOp::DeleteChannel { channel: id.clone() }).await?.into_done("server_delete_channel")?;
    info!(channel = %id, "server API deleted a channel");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct UpdateChannel {
    #[serde(default)]
    visibility: Option<Visibility>,
    #[serde(default)]
    posting: Option<Posting>,
}

/// `PATCH /server/v1/channels/{id}`: the channel.
async fn update_channel(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<UpdateChannel>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(id) = id?;
    let Json(body) = body?;
    if body.visibility.is_none() && body.posting.is_none() {
        return Err(HttpError::invalid_argument("give visibility, posting or both"));
    }
    let action = ChannelAction::Update { visibility: body.visibility, posting: body.posting };
    Ok(channel(manage(&state, id, action).await?))
}

#[derive(Deserialize)]
struct AddMember {
    user: String,
    #[serde(default)]
    role: Option<Role>,
}

/// `POST /server/v1/channels/{id}/members`: adds the user at once (a member already: unchanged), then gives the
/// role if one is named; the channel.
async fn add_member(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<AddMember>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(id) = id?;
    let Json(body) = body?;
    let user = user_id(&body.user)?;
    let mut view = manage(&state, id.clone(), ChannelAction::Invite { user: user.to_string() }).await?;
    if let Some(role) = body.role {
        view = manage(&state, id, ChannelAction::SetRole { user: user.to_string(), role }).await?;
    }
    Ok(channel(view))
}

/// `DELETE /server/v1/channels/{id}/members/{user}`: the channel.
async fn remove_member(
    _: Backend,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path((id, user)) = path?;
    let user = user_id(&user)?;
    Ok(channel(manage(&state, id, ChannelAction::Remove { user: user.to_string() }).await?))
}

#[derive(Deserialize)]
struct Ban {
    user: String,
}

/// `POST /server/v1/channels/{id}/bans`: bans the user (removed if a member); the channel.
async fn ban(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Ban>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(id) = id?;
    let Json(body) = body?;
    let user = user_id(&body.user)?;
    Ok(channel(manage(&state, id, ChannelAction::Ban { user: user.to_string() }).await?))
}

/// `DELETE /server/v1/channels/{id}/bans/{user}`: lifts the ban; the channel.
async fn unban(
    _: Backend,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path((id, user)) = path?;
    let user = user_id(&user)?;
    Ok(channel(manage(&state, id, ChannelAction::Unban { user: user.to_string() }).await?))
}

#[derive(Deserialize)]
struct PostMessage {
    client_msg_id: String,
    text: String,
}

/// `POST /server/v1/channels/{id}/messages`: `{"channel","id","seq","ts","duplicate"}` once durable (`id` a
/// string, as everywhere in the protocol).
async fn post_message(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<PostMessage>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(id) = id?;
    let Json(body) = body?;
    let operation = ServerOp::Post { channel: id, client_msg_id: body.client_msg_id, text: body.text };
    let sent = state.router.server(operation).await?.into_sent("server_post")?;
    Ok(Json(json!({
        "channel": sent.channel,
        "id": sent.placement.id.to_string(),
        "seq": sent.placement.seq,
        "ts": sent.placement.ts,
        "duplicate": sent.duplicate,
    })))
}

#[derive(Deserialize)]
struct MoveHome {
    region: String,
}

/// `PUT /server/v1/channels/{id}/home` with `{"region": "<region>"}`: moves the channel's home (the region whose
/// writer orders it) there without losing or reordering a message; answers `{"channel","region","last_seq"}`, the
/// last sequence the old home ordered (the new home continues after it).
async fn move_home(
    _: Backend,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<MoveHome>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(id) = id?;
    let Json(body) = body?;
    let operation = ServerOp::MoveHome { channel: id.clone(), region: body.region.clone() };
    let last = state.router.server(operation).await?.into_seq("server_move_home")?;
    Ok(Json(json!({ "channel": id, "region": body.region, "last_seq": last })))
}

#[derive(Deserialize)]
struct RegionState {
    failed: bool,
}

/// `PUT /server/v1/regions/{region}` with `{"failed": true|false}`: marks another region failed (its channels are
/// taken over by the regions their next calls reach) or back; answers `{"region","failed"}`.
async fn set_region(
    _: Backend,
    State(state): State<AppState>,
    region: Result<Path<String>, PathRejection>,
    body: Result<Json<RegionState>, JsonRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(region) = region?;
    let Json(body) = body?;
    let operation = ServerOp::SetRegionFailed { region: region.clone(), failed: body.failed };
    state.router.server(operation).await?.into_done("server_set_region_failed")?;
    Ok(Json(json!({ "region": region, "failed": body.failed })))
}

/// Publishes an event to every gateway instance; `unavailable` when the bus refuses it.
async fn to_every_gateway(state: &AppState, event: ControlEvent) -> Result<(), HttpError> {
    state
        .bus
        .publish(ALL_GATEWAYS_TOPIC, Event::Control(event).encode())
        .await
        .map_err(|error| HttpError::unavailable(format!("cannot reach the gateways: {error}; retry")))
}

/// `POST /server/v1/users/{user}/disconnect`: 202 once every gateway instance was told; each closes the user's live
/// sessions with 4003 (the client may reconnect).
async fn disconnect(
    _: Backend,
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(user) = user?;
    let user = user_id(&user)?;
    to_every_gateway(&state, ControlEvent::Disconnect { user: user.to_string() }).await?;
    info!(%user, "server API disconnected a user");
    Ok((StatusCode::ACCEPTED, Json(json!({ "user": user.as_str() }))))
}

#[derive(Deserialize, Default)]
struct Revoke {
    #[serde(default)]
    before: Option<u64>,
}

/// `POST /server/v1/users/{user}/revoke` (body optional, `{"before": <Unix seconds>}`, default now): 202
/// `{"user","before"}` once the revocation is stored and every gateway instance was told (`before` is the time in
/// force, the later of this one and an earlier revocation). Tokens of the user issued before it (or without `iat`)
/// are refused at connect with 401 `token_revoked`, and live sessions holding one close with 4004.
async fn revoke(
    _: Backend,
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Path(user) = user?;
    let user = user_id(&user)?;
    let body = body?;
    let request: Revoke = if body.iter().all(u8::is_ascii_whitespace) {
        Revoke::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| HttpError::invalid_frame(error.to_string()))?
    };
    let now = unix_secs();
    let before = request.before.unwrap_or(now);
    if before > now.saturating_add(MAX_FUTURE_REVOCATION_SECS) {
        return Err(HttpError::invalid_argument(format!(
            "before ({before}) lies in the future; it is a time in Unix seconds (now: {now})"
        )));
    }
    let in_force = state
        .revocations
        .revoke(user.as_str(), before)
        .await
        .map_err(|error| HttpError::unavailable(format!("cannot store the revocation: {error}; retry")))?;
    info!(%user, before = in_force, "server API revoked tokens");
    // Stored: connects are refused from now on. A retry after a failed publish is harmless (the same time).
    to_every_gateway(&state, ControlEvent::Revoked { user: user.to_string(), before: in_force }).await.map_err(
        |error| {
            HttpError::new(
                error.status,
                error.code,
                format!("the revocation is stored, but live sessions were not told: {}", error.message),
            )
        },
    )?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "user": user.as_str(), "before": in_force }))))
}

#[derive(Deserialize)]
struct PresenceQuery {
    #[serde(default)]
    users: Option<String>,
}

/// `GET /server/v1/presence?users=a,b,c`: `{"users":[{"user","status","last_seen"}...]}` in the order asked.
async fn presence(
    _: Backend,
    State(state): State<AppState>,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Query(query) = query?;
    let users: Vec<String> = query
        .users
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|user| !user.is_empty())
        .map(|user| user_id(user).map(String::from))
        .collect::<Result<_, _>>()?;
    if users.is_empty() || users.len() > MAX_PRESENCE_USERS {
        return Err(HttpError::invalid_argument(format!(
            "users must name 1-{MAX_PRESENCE_USERS} users, comma-separated (got {})",
            users.len()
        )));
    }
    let presence = state.hub.presence().ok_or_else(|| HttpError::unavailable("presence is not available"))?;
    let views = presence
        .try_views(&users)
        .await
        .map_err(|error| HttpError::unavailable(format!("cannot read presence: {error}")))?;
    Ok(Json(json!({ "users": views })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::tests::state;
    use axum::body::Body;
    use axum::http::{header, Request};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tower::ServiceExt;

    const KEY: &str = "server-api-key-0123456789";

    async fn answer(state: AppState, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = crate::http::app(state).oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn request(method: &str, uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        request.body(Body::from(body.to_owned())).expect("request")
    }

    #[tokio::test]
    async fn off_without_a_key_and_closed_to_a_wrong_one() {
        let (off, _shutdown) = state(8);
        let (status, body) = answer(off, request("GET", "/server/v1/presence?users=a", Some(KEY), "")).await;
        assert_eq!((status, &body["code"]), (StatusCode::NOT_FOUND, &json!("server_api_disabled")), "{body}");

        let (mut on, _shutdown) = state(8);
        on.server_api_keys = Arc::from(vec!["old-key-0123456789".to_owned(), KEY.to_owned()]);
        for key in [None, Some("server-api-key-012345678"), Some("wrong"), Some("")] {
            let (status, body) =
                answer(on.clone(), request("POST", "/server/v1/users/alice/disconnect", key, "")).await;
            assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("unauthorized")), "{key:?}: {body}");
        }
        // The key is checked before the body: a bad body with a wrong key is still 401.
        let (status, _) = answer(on.clone(), request("POST", "/server/v1/channels", Some("wrong"), "{")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        for key in ["old-key-0123456789", KEY] {
            let (status, body) =
                answer(on.clone(), request("POST", "/server/v1/users/alice/disconnect", Some(key), "")).await;
            assert_eq!((status, &body["user"]), (StatusCode::ACCEPTED, &json!("alice")), "either key: {body}");
        }
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_their_codes() {
        let (mut on, _shutdown) = state(8);
        on.server_api_keys = Arc::from(vec![KEY.to_owned()]);
        let cases = [
            (request("POST", "/server/v1/users/a:b/disconnect", Some(KEY), ""), "invalid_argument"),
            (request("POST", "/server/v1/users/alice/revoke", Some(KEY), "{\"before\":\"x\"}"), "invalid_frame"),
            (
                request("POST", "/server/v1/users/alice/revoke", Some(KEY), "{\"before\":1764296000000}"),
                "invalid_argument",
            ),
            (request("GET", "/server/v1/presence", Some(KEY), ""), "invalid_argument"),
            (request("GET", "/server/v1/presence?users=a,b:c", Some(KEY), ""), "invalid_argument"),
            (request("POST", "/server/v1/channels", Some(KEY), "{\"nom\":\"x\"}"), "invalid_frame"),
            (request("POST", "/server/v1/channels", Some(KEY), "{\"name\":\"Bad Name\"}"), "invalid_argument"),
            (request("PATCH", "/server/v1/channels/g:a", Some(KEY), "{}"), "invalid_argument"),
        ];
        for (request, code) in cases {
            let what = format!("{} {}", request.method(), request.uri());
            let (status, body) = answer(on.clone(), request).await;
            assert_eq!(body["code"], json!(code), "{what}: {status} {body}");
            assert!(status.is_client_error(), "{what}: {status}");
        }
        let many: Vec<String> = (0..=MAX_PRESENCE_USERS).map(|n| format!("u{n}")).collect();
        let uri = format!("/server/v1/presence?users={}", many.join(","));
        let (status, body) = answer(on.clone(), request("GET", &uri, Some(KEY), "")).await;
        assert_eq!((status, &body["code"]), (StatusCode::BAD_REQUEST, &json!("invalid_argument")), "{body}");
    }

    #[tokio::test]
    async fn a_revocation_is_stored_with_the_later_time() {
        let (mut on, _shutdown) = state(8);
        on.server_api_keys = Arc::from(vec![KEY.to_owned()]);
        let now = unix_secs();
        let (status, body) = answer(on.clone(), request("POST", "/server/v1/users/alice/revoke", Some(KEY), "")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let before = body["before"].as_u64().expect("before");
        assert!(before >= now && before <= unix_secs(), "now by default: {before}");
        let earlier = format!("{{\"before\":{}}}", now - 3_600);
        let (_, body) = answer(on.clone(), request("POST", "/server/v1/users/alice/revoke", Some(KEY), &earlier)).await;
        assert_eq!(body["before"], json!(before), "an earlier time leaves the later one in force");
        assert_eq!(on.revocations.revoked_before("alice").await.expect("read"), Some(before));
    }
}
