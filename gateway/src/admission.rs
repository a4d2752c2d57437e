//! The application's shared state, and admission: what a request must pass before it gets anything.
//!
//! Both ways in, the WebSocket upgrade ([`crate::http`]) and the SSE and long-poll transports
//! ([`crate::fallback`]), admit a connection the same way, with [`AppState::admit`]: a protocol version this
//! server speaks, a valid token (`?token=` or `Authorization: Bearer`), an instance that accepts connections (not
//! draining), and one of the process's connection permits. The [`Admission`] then carries the [`Session`] and the
//! [`ConnectionContext`] the connection loop runs with, and [`Admission::serve`] runs it. The HTTP API's other
//! endpoints authenticate with [`AppState::authenticate`]. Every refusal is a [`HttpError`].

use crate::auth::{Authenticator, Identity};
use crate::config::GatewayConfig;
use crate::connection::{self, ConnectionContext, Session, TooBig};
use crate::drain::Drainer;
use crate::hub::Hub;
use crate::metrics::{Limit, Metrics};
use axum::extract::ws::Message;
use axum::http::{HeaderMap, StatusCode};
use futures_util::{Sink, Stream};
use parley_api::http::{bearer, code, HttpError};
use parley_api::Router;
use parley_core::protocol::PROTOCOL_VERSION;
use rand::RngCore;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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

/// The query of a connect (`GET /v1/ws`, `GET /v1/sse`, `POST /v1/poll/connect`).
#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    /// Protocol version (absent: the current one).
    pub v: Option<u32>,
    /// The token, for clients that cannot set `Authorization` (browsers' WebSocket and EventSource).
    pub token: Option<String>,
}

/// An admitted connection: what its loop runs with, and the connection permit it holds until it ends.
#[derive(Debug)]
pub struct Admission {
    /// Who is connected.
    pub session: Session,
    /// What the loop needs from the process.
    pub context: ConnectionContext,
    /// One of the process's connection permits.
    pub permit: OwnedSemaphorePermit,
}

impl AppState {
    /// Whether the instance takes new connections (it is neither draining nor shutting down).
    pub fn accepts_connections(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && !*self.shutdown.borrow()
    }

    /// Verifies a token.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, HttpError> {
        let token = token.ok_or_else(|| HttpError::unauthorized("missing token"))?;
        Ok(self.auth.verify(token)?)
    }

    /// Admits a connection: the protocol version, the token, the instance accepting connections, and a permit, in
    /// that order.
    pub fn admit(&self, version: Option<u32>, token: Option<&str>) -> Result<Admission, HttpError> {
        if let Some(version) = version.filter(|version| *version != PROTOCOL_VERSION) {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                code::UNSUPPORTED_VERSION,
                format!("protocol version {version} is not supported; use v={PROTOCOL_VERSION}"),
            ));
        }
        let identity = self.authenticate(token)?;
        if !self.accepts_connections() {
            return Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::DRAINING,
                "this instance is draining; connect to another",
            ));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.limit(Limit::Connections);
            return Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::OVERLOADED,
                "connection limit reached; retry with backoff",
            ));
        };
        let session = Session {
            conn: self.next_conn.fetch_add(1, Ordering::Relaxed),
            session_id: new_session_id(),
            user: identity.user,
            expires_at: identity.expires_at,
        };
        let context = ConnectionContext {
            router: self.router.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            config: self.config.clone(),
            shutdown: self.shutdown.clone(),
            drain: self.drainer.subscribe(),
        };
        Ok(Admission { session, context, permit })
    }
}

impl Admission {
    /// Runs the connection loop over `socket` to its end, counted in the connection metrics; the permit is
    /// released when it ends.
    pub async fn serve<S, E>(self, socket: S, too_big: TooBig<E>)
    where
        S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        let Admission { session, context, permit } = self;
        let metrics = context.metrics.clone();
        metrics.connections.inc();
        metrics.connections_total.inc();
        connection::serve(socket, context, session, too_big).await;
        metrics.connections.dec();
        drop(permit);
    }
}

/// The token of a request: `?token=`, else `Authorization: Bearer`.
pub fn token<'a>(query_token: Option<&'a str>, headers: &'a HeaderMap) -> Option<&'a str> {
    query_token.or_else(|| bearer(headers))
}

/// A new session id: `s-` and 24 random hex digits.
fn new_session_id() -> String {
    let mut random = [0u8; 12];
    rand::rng().fill_bytes(&mut random);
    std::iter::once("s-".to_owned()).chain(random.iter().map(|byte| format!("{byte:02x}"))).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::AuthConfig;
    use async_trait::async_trait;
    use parley_api::{Answer, Call, Limits, RouterError, RouterService, RouterStats};
    use parley_bus::pubsub::Subscription;

    const SECRET: &str = "0123456789abcdef-secret";

    /// Admission calls no router and no bus.
    #[derive(Debug, Default)]
    struct Unused {
        stats: Arc<RouterStats>,
    }

    #[async_trait]
    impl RouterService for Unused {
        async fn call(&self, _call: Call) -> Result<Answer, RouterError> {
            Err(RouterError::ShuttingDown)
        }

        fn limits(&self) -> Limits {
            Limits::default()
        }

        fn stats(&self) -> &Arc<RouterStats> {
            &self.stats
        }
    }

    #[async_trait]
    impl Subscription for Unused {
        async fn subscribe(&self, _topics: Vec<String>) -> Result<(), parley_api::BackendError> {
            Ok(())
        }

        async fn unsubscribe(&self, _topics: Vec<String>) -> Result<(), parley_api::BackendError> {
            Ok(())
        }
    }

    /// An application state with HS256 tokens of [`SECRET`], a router and a bus that are never called, and
    /// `max_connections` permits.
    pub(crate) fn state(max_connections: usize) -> (AppState, watch::Sender<bool>) {
        let metrics = Metrics::new();
        let hub = Hub::new(Arc::new(Unused::default()), metrics.clone(), 1_000);
        let (shutdown, shutdown_signal) = watch::channel(false);
        let accepting = Arc::new(AtomicBool::new(true));
        let drainer = Arc::new(Drainer::new(shutdown.clone(), accepting.clone(), hub.clone(), metrics.clone()));
        let auth = AuthConfig { jwt_hs256_secret: Some(SECRET.into()), ..AuthConfig::default() };
        let state = AppState {
            auth: Arc::new(Authenticator::from_config(&auth).expect("authenticator")),
            router: Router::new(Unused::default()),
            hub,
            metrics,
            config: Arc::new(GatewayConfig::default()),
            shutdown: shutdown_signal,
            permits: Arc::new(Semaphore::new(max_connections)),
            next_conn: Arc::new(AtomicU64::new(1)),
            accepting,
            drainer,
            push: None,
        };
        (state, shutdown)
    }

    /// A token of `alice` valid for a minute.
    pub(crate) fn valid_token() -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        crate::auth::mint_hs256(SECRET, "alice", now + 60).expect("token")
    }

    fn refusal(result: Result<Admission, HttpError>) -> (StatusCode, &'static str) {
        let error = result.expect_err("refused");
        assert!(!error.message.is_empty());
        (error.status, error.code)
    }

    #[tokio::test]
    async fn admission_checks_version_then_token_then_draining_then_the_connection_limit() {
        let (state, _shutdown) = state(1);
        let token = valid_token();
        let unsupported = refusal(state.admit(Some(PROTOCOL_VERSION + 1), None));
        assert_eq!(unsupported, (StatusCode::BAD_REQUEST, code::UNSUPPORTED_VERSION), "before the token");
        assert_eq!(refusal(state.admit(None, None)), (StatusCode::UNAUTHORIZED, "unauthorized"));
        assert_eq!(
            refusal(state.admit(Some(PROTOCOL_VERSION), Some("garbage"))),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );

        let first = state.admit(Some(PROTOCOL_VERSION), Some(&token)).expect("admitted");
        assert_eq!((first.session.conn, first.session.user.as_str()), (1, "alice"));
        let session_id = first.session.session_id.strip_prefix("s-").expect("prefixed");
        assert!(session_id.len() == 24 && session_id.chars().all(|digit| digit.is_ascii_hexdigit()), "{session_id}");
        assert_eq!(refusal(state.admit(None, Some(&token))), (StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED));
        drop(first);
        let second = state.admit(None, Some(&token)).expect("the permit came back");
        assert_eq!(second.session.conn, 2, "a new id (a refusal takes none, and none is reused)");

        state.accepting.store(false, Ordering::Relaxed);
        assert!(!state.accepts_connections());
        assert_eq!(refusal(state.admit(None, Some(&token))), (StatusCode::SERVICE_UNAVAILABLE, code::DRAINING));
        assert_eq!(refusal(state.admit(None, None)), (StatusCode::UNAUTHORIZED, "unauthorized"), "the token first");
    }

    #[tokio::test]
    async fn a_shutting_down_instance_admits_nobody() {
        let (state, shutdown) = state(8);
        shutdown.send(true).expect("state watching");
        assert_eq!(refusal(state.admit(None, Some(&valid_token()))), (StatusCode::SERVICE_UNAVAILABLE, code::DRAINING));
    }

    #[test]
    fn the_query_token_wins_over_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(token(None, &headers), None);
        headers.insert(axum::http::header::AUTHORIZATION, "Bearer header".parse().expect("header value"));
        assert_eq!(token(None, &headers), Some("header"));
        assert_eq!(token(Some("query"), &headers), Some("query"));
    }
}
