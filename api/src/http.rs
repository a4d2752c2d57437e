//! The one error of Parley's HTTP endpoints, and the bearer-token checks they share.
//!
//! Every refusal of an HTTP endpoint (the gateway's client API, its SSE and long-poll transports, its admin
//! endpoints, and the router's internal API) is an [`HttpError`]: a status and an [`ErrorBody`],
//! `{"code": ..., "message": ...}`, whose `code` is stable for programs and whose `message` is for people. Codes
//! of the protocol ([`ErrorCode`]) keep their wire names; the codes only HTTP has are in [`code`].
//!
//! Axum's extractor rejections convert into it, so a handler takes `Result<Query<T>, QueryRejection>` (or a
//! body, path or JSON) and uses `?`.
//!
//! [`constant_time_eq`] compares secrets (the admin token, the router's internal token, the server API keys) without
//! an early exit; [`bearer_is_any`] checks a bearer token against several accepted ones (keys being rotated).

use crate::error::RouterError;
use ::http::header::AUTHORIZATION;
use ::http::{HeaderMap, StatusCode};
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::response::{IntoResponse, Response};
use parley_core::protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The codes that only HTTP endpoints answer (the protocol's own are [`ErrorCode::as_str`]).
pub mod code {
    /// The instance drains or shuts down: connect to another.
    pub const DRAINING: &str = "draining";
    /// The instance has no room (connection limit) or a session is not reading: retry with backoff.
    pub const OVERLOADED: &str = "overloaded";
    /// The `v` of a connect names a protocol version this server does not speak.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// A request to a WebSocket endpoint is not a WebSocket upgrade.
    pub const UPGRADE_REQUIRED: &str = "upgrade_required";
    /// A request body is larger than its limit.
    pub const FRAME_TOO_BIG: &str = "frame_too_big";
    /// The caller is known but may not act on this resource.
    pub const FORBIDDEN: &str = "forbidden";
    /// A fallback session does not exist (any more).
    pub const NO_SUCH_SESSION: &str = "no_such_session";
    /// The admin endpoints are off (no admin token is configured).
    pub const ADMIN_DISABLED: &str = "admin_disabled";
    /// The insecure dev login is off.
    pub const DEV_LOGIN_DISABLED: &str = "dev_login_disabled";
    /// No push provider is configured.
    pub const PUSH_DISABLED: &str = "push_disabled";
    /// No endpoint has this path.
    pub const NOT_FOUND: &str = "not_found";
    /// The endpoint exists but not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The token was revoked by the application's backend (server API): get a new token.
    pub const TOKEN_REVOKED: &str = "token_revoked";
    /// The server API is off (no server API key is configured).
    pub const SERVER_API_DISABLED: &str = "server_api_disabled";
}

/// Adds the JSON answers for unknown paths (404 `not_found`) and wrong methods (405 `method_not_allowed`) to an
/// application, so every answer of a Parley HTTP endpoint is an [`HttpError`] or a success.
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(app: axum::Router<S>) -> axum::Router<S> {
    app.fallback(|uri: ::http::Uri| async move {
        HttpError::new(StatusCode::NOT_FOUND, code::NOT_FOUND, format!("no endpoint {}", uri.path()))
    })
    .method_not_allowed_fallback(|method: ::http::Method, uri: ::http::Uri| async move {
        HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::METHOD_NOT_ALLOWED,
            format!("{} does not take {method}", uri.path()),
        )
    })
}

/// The JSON body of an [`HttpError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
}

/// A refusal or failure of an HTTP endpoint: answered as its status with `{"code": ..., "message": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code} ({status}): {message}")]
pub struct HttpError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code: an [`ErrorCode`]'s wire name or one of [`code`].
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

impl HttpError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// A protocol error code, with the status [`status_of`] gives it.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(status_of(code), code.as_str(), message)
    }

    /// `401 unauthorized`: a token is missing, malformed, badly signed or expired.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::Unauthorized, message)
    }

    /// `401 token_revoked`: the token is valid but was revoked (issued before its user's revocation, or without
    /// `iat` while one is in force).
    pub fn token_revoked(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code::TOKEN_REVOKED, message)
    }

    /// `400 invalid_frame`: a body is not the JSON the endpoint takes.
    pub fn invalid_frame(message: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::InvalidFrame, message)
    }

    /// `400 invalid_argument`: a parameter is out of range.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::InvalidArgument, message)
    }

    /// `503 unavailable`: a backend failed; nothing was done.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::Unavailable, message)
    }

    /// `500 internal`: a bug.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::from_code(ErrorCode::Internal, message)
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code.to_owned(), message: self.message.clone() }
    }
}

/// The HTTP status of a protocol error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson
        | ErrorCode::UnknownType
        | ErrorCode::InvalidFrame
        | ErrorCode::InvalidArgument
        | ErrorCode::TextTooLong
        | ErrorCode::TooManyMembers => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::NotAMember | ErrorCode::Forbidden | ErrorCode::Banned | ErrorCode::Blocked => StatusCode::FORBIDDEN,
        ErrorCode::NoSuchChannel => StatusCode::NOT_FOUND,
        ErrorCode::ChannelExists => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::NotOwner | ErrorCode::PushDisabled => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<RouterError> for HttpError {
    fn from(error: RouterError) -> Self {
        Self::from_code(error.code(), error.to_string())
    }
}

impl From<BytesRejection> for HttpError {
    /// A body that could not be read: `frame_too_big` past the endpoint's limit, else `invalid_frame`.
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            code::FRAME_TOO_BIG
        } else {
            ErrorCode::InvalidFrame.as_str()
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl From<JsonRejection> for HttpError {
    /// A body that is not the JSON the endpoint takes: `invalid_frame`.
    fn from(rejection: JsonRejection) -> Self {
        Self::invalid_frame(rejection.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    /// A query string that does not fit the endpoint: `invalid_argument`.
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid_argument(rejection.body_text())
    }
}

impl From<PathRejection> for HttpError {
    /// A path parameter that does not fit the endpoint (not UTF-8, say): `invalid_argument`.
    fn from(rejection: PathRejection) -> Self {
        Self::invalid_argument(rejection.body_text())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code.to_owned(), message: self.message };
        (self.status, axum::Json(body)).into_response()
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// Whether the request's bearer token is `expected`, compared in constant time.
pub fn bearer_is(headers: &HeaderMap, expected: &str) -> bool {
    bearer(headers).is_some_and(|presented| constant_time_eq(presented.as_bytes(), expected.as_bytes()))
}

/// Whether the request's bearer token is one of `accepted`, each compared in constant time, and all of them every
/// time (which one matched, if any, does not change how long the check takes).
pub fn bearer_is_any<'a>(headers: &HeaderMap, accepted: impl IntoIterator<Item = &'a str>) -> bool {
    let Some(presented) = bearer(headers) else { return false };
    accepted
        .into_iter()
        .fold(false, |matched, expected| constant_time_eq(presented.as_bytes(), expected.as_bytes()) | matched)
}

/// Whether two byte strings are equal, in a time that depends on their lengths only, not on where they differ.
/// For comparing secrets: an early exit at the first difference would tell an attacker how much of a guess is
/// right. (The length itself may leak.)
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    let difference = left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b));
    // Keep the optimiser from turning the fold into a comparison that stops early.
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::HeaderValue;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn unknown_paths_and_wrong_methods_answer_json_errors() {
        use tower::ServiceExt;
        let app: axum::Router =
            with_fallbacks(axum::Router::new().route("/known", axum::routing::get(|| async { "ok" })));
        let request = |method: &str, path: &str| {
            ::http::Request::builder().method(method).uri(path).body(axum::body::Body::empty()).expect("request")
        };
        let missing = app.clone().oneshot(request("GET", "/unknown")).await.expect("answer");
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let body = missing.into_body().collect().await.expect("body").to_bytes();
        let body: ErrorBody = serde_json::from_slice(&body).expect("json");
        assert_eq!((body.code.as_str(), body.message.as_str()), ("not_found", "no endpoint /unknown"));
        let wrong = app.clone().oneshot(request("DELETE", "/known")).await.expect("answer");
        assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body = wrong.into_body().collect().await.expect("body").to_bytes();
        let body: ErrorBody = serde_json::from_slice(&body).expect("json");
        assert_eq!(body.code, "method_not_allowed");
        assert_eq!(app.oneshot(request("GET", "/known")).await.expect("answer").status(), StatusCode::OK);
    }

    #[test]
    fn constant_time_eq_compares_whole_byte_strings() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokem"), "last byte differs");
        assert!(!constant_time_eq(b"secret-token", b"Secret-token"), "first byte differs");
        assert!(!constant_time_eq(b"secret-token", b"secret-token-longer"), "prefix");
        assert!(!constant_time_eq(b"secret", b""));
        assert!(!constant_time_eq(&[0x00], &[0x80]), "every bit counts");
    }

    #[test]
    fn bearer_tokens_are_read_and_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        assert!(!bearer_is(&headers, "token"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic dG9rZW4="));
        assert_eq!(bearer(&headers), None, "another scheme");
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer token"));
        assert_eq!(bearer(&headers), Some("token"));
        assert!(bearer_is(&headers, "token"));
        assert!(!bearer_is(&headers, "token2"));
        assert!(bearer_is_any(&headers, ["old-key", "token"]), "any of several keys");
        assert!(bearer_is_any(&headers, ["token", "new-key"]));
        assert!(!bearer_is_any(&headers, ["old-key", "new-key"]));
        assert!(!bearer_is_any(&headers, []), "no key accepts nothing");
        assert!(!bearer_is_any(&HeaderMap::new(), ["token"]), "no header");
    }

    #[test]
    fn router_errors_keep_their_codes_and_get_a_status() {
        let cases = [
            (RouterError::NotAMember("g:a".into()), StatusCode::FORBIDDEN, "not_a_member"),
            (RouterError::NoSuchChannel("g:a".into()), StatusCode::NOT_FOUND, "no_such_channel"),
            (RouterError::ChannelExists("g:a".into()), StatusCode::CONFLICT, "channel_exists"),
            (RouterError::InvalidArgument("bad".into()), StatusCode::BAD_REQUEST, "invalid_argument"),
            (RouterError::TextTooLong { actual: 9, limit: 4 }, StatusCode::BAD_REQUEST, "text_too_long"),
            (RouterError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (RouterError::UnexpectedAnswer { op: "send" }, StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ];
        for (error, status, code) in cases {
            let message = error.to_string();
            let http = HttpError::from(error);
            assert_eq!((http.status, http.code, http.message.as_str()), (status, code, message.as_str()));
        }
    }

    #[tokio::test]
    async fn the_response_is_the_status_and_a_json_body() {
        let response =
            HttpError::new(StatusCode::SERVICE_UNAVAILABLE, code::DRAINING, "connect to another").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let content_type = response.headers().get(::http::header::CONTENT_TYPE).cloned();
        assert_eq!(content_type, Some(HeaderValue::from_static("application/json")));
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let body: ErrorBody = serde_json::from_slice(&bytes).expect("an error body");
        assert_eq!(body, ErrorBody { code: "draining".into(), message: "connect to another".into() });
    }
}
