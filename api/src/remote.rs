//! [`RemoteRouter`]: a client of a `parley-router` process over its internal HTTP API.
//!
//! `POST /internal/v1/call` takes one [`Call`] as JSON and answers `200` with `{"ok": ...}` or
//! `{"error": {"code": ..., "message": ...}}` (the protocol's stable error codes), so an error the router decides
//! reaches the client exactly as in embedded mode. A request the API itself refuses (a wrong token, a body that is
//! not a call or is too big) gets an error status and the body of every Parley HTTP error,
//! `{"code": ..., "message": ...}` ([`crate::HttpError`]). `GET /internal/v1/config` gives the [`Limits`] a gateway
//! enforces before calling. When a token is configured, every call carries `Authorization: Bearer <token>`. A
//! transport failure (router down, timeout) is `unavailable`: nothing is confirmed, and the client retries with the
//! same `client_msg_id`, which the writer de-duplicates.

use crate::call::{Answer, Call, Reply};
use crate::error::{BackendError, RouterError};
use crate::handle::RouterService;
use crate::http::ErrorBody;
use crate::types::{Limits, RouterStats};
use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parley_core::protocol::ErrorCode;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Largest request or reply body of the internal API (a history page of 200 messages of 4 KiB fits easily).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The path of the call endpoint.
pub const CALL_PATH: &str = "/internal/v1/call";

/// The path of the call endpoint for another region's routers: the router that receives a call there passes it
/// to the owner of its channel in its own region (see `parley_router::global`).
pub const PEER_CALL_PATH: &str = "/internal/v1/peer-call";

/// The path of the limits endpoint.
pub const CONFIG_PATH: &str = "/internal/v1/config";

/// A client of a `parley-router` process.
#[derive(Clone)]
pub struct RemoteRouter {
    client: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
    token: Option<Arc<str>>,
    timeout: Duration,
    limits: Limits,
    stats: Arc<RouterStats>,
    call_path: &'static str,
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
            limits: Limits::default(),
            stats: Arc::new(RouterStats::default()),
            call_path: CALL_PATH,
        };
        remote.limits = remote.request(http::Method::GET, CONFIG_PATH, None).await?;
        Ok(remote)
    }

    /// This client, sending its calls to `path` instead of [`CALL_PATH`] (for example [`PEER_CALL_PATH`]).
    pub fn with_call_path(mut self, path: &'static str) -> Self {
        self.call_path = path;
        self
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
        if !status.is_success() {
            return Err(self.refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|error| self.unavailable(format!("HTTP {status}, undecodable reply: {error}")))
    }

    /// What an error status means: the router's refusal with a protocol code (an [`ErrorBody`]), else a failure
    /// to reach a router that can answer (`unavailable`).
    fn refusal(&self, status: StatusCode, bytes: &[u8]) -> RouterError {
        let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) else {
            // Routers before the common HTTP error answered refusals in the call envelope.
            return match serde_json::from_slice::<Reply<serde_json::Value>>(bytes) {
                Ok(Reply::Error { code, message }) => RouterError::Remote { code, message },
                _ => self.unavailable(format!("HTTP {status}, undecodable reply")),
            };
        };
        match serde_json::from_value::<ErrorCode>(serde_json::Value::String(body.code.clone())) {
            Ok(code) => RouterError::Remote { code, message: body.message },
            Err(_) => self.unavailable(format!("HTTP {status}: {}: {}", body.code, body.message)),
        }
    }

    async fn call_json(&self, call: &Call) -> Result<serde_json::Value, RouterError> {
        let body = serde_json::to_vec(call).map_err(|error| RouterError::InvalidArgument(error.to_string()))?;
        match self.request::<Reply<serde_json::Value>>(http::Method::POST, self.call_path, Some(body)).await? {
            Reply::Ok(value) => Ok(value),
            Reply::Error { code, message } => {
                if code == ErrorCode::Unavailable {
                    warn!(%message, "router reported unavailable");
                }
                Err(RouterError::Remote { code, message })
            }
        }
    }
}

#[async_trait]
impl RouterService for RemoteRouter {
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        if let Call::Send { text, .. } = &call {
            if text.len() > self.limits.max_text_bytes {
                return Err(RouterError::TextTooLong { actual: text.len(), limit: self.limits.max_text_bytes });
            }
        }
        let kind = call.answer_kind();
        let value = self.call_json(&call).await?;
        kind.decode(value).map_err(|error| self.unavailable(format!("undecodable answer to {}: {error}", call.op())))
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }

    fn is_remote(&self) -> bool {
        true
    }
}
