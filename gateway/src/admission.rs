//! The application's shared state, and admission: what a request must pass before it gets anything.
//!
//! Both ways in, the WebSocket upgrade ([`crate::http`]) and the SSE and long-poll transports
//! ([`crate::fallback`]), admit a connection the same way, with [`AppState::admit`]: a protocol version this
//! server speaks, a valid token (`?token=` or `Authorization: Bearer`), an instance that accepts connections (not
//! draining), and one of the process's connection permits. The [`Admission`] then carries the [`Session`] and the
//! [`ConnectionContext`] the connection loop runs with, and [`Admission::serve`] runs it. The HTTP API's other
//! endpoints authenticate with [`AppState::authenticate`]. A valid token is still refused (401 `token_revoked`) when
//! the application's backend revoked it: its user has a revocation in force ([`parley_bus::revocation`]) and it was
//! issued before that (or carries no `iat`); a revocation store that cannot be read refuses the token with 503
//! `unavailable` rather than let a revoked one in. Every refusal is a [`HttpError`].
//!
//! The connect's query string is read by [`parse_connect_query`], a pure function: unknown parameters are
//! ignored, and a malformed `v` is `unsupported_version` like an unknown one.

use crate::auth::{Authenticator, Identity};
use crate::config::GatewayConfig;
use crate::connection::{self, ConnectionContext, Session, Transport};
use crate::drain::Drainer;
use crate::hub::Hub;
use crate::metrics::{Limit, Metrics};
use axum::extract::ws::Message;
use axum::http::{HeaderMap, StatusCode};
use futures_util::{Sink, Stream};
use parley_api::http::{bearer, code, HttpError};
use parley_api::Router;
use parley_bus::pubsub::PubSub;
use parley_bus::revocation::{is_revoked, RevocationStore};
use parley_core::protocol::PROTOCOL_VERSION;
use rand::RngCore;
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
    /// Token revocations (shared by every gateway).
    pub revocations: Arc<dyn RevocationStore>,
    /// The bus, for events to every gateway (the server API's disconnects and revocations).
    pub bus: Arc<dyn PubSub>,
    /// The server API's accepted keys (empty: the server API is off).
    pub server_api_keys: Arc<[String]>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The query of a connect (`GET /v1/ws`, `GET /v1/sse`, `POST /v1/poll/connect`), as [`parse_connect_query`]
/// reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectQuery {
    /// Protocol version (absent: the current one).
    pub v: Option<u32>,
    /// The token, for clients that cannot set `Authorization` (browsers' WebSocket and EventSource); never empty.
    pub token: Option<String>,
}

/// Reads the query string of a connect (without the `?`), leniently: parameters other than `v` and `token` are
/// ignored (cache busters, tracking), `+` and `%XX` are decoded as in a form (an escape that is not one stays as it
/// is, and bytes that are not UTF-8 become U+FFFD), and an empty `token` counts as none (so the `Authorization`
/// header is used). Refused: a `v` that is not one decimal number (`v=abc`, `v=`, `v=1&v=2`), with 400
/// `unsupported_version` like a version this server does not speak (which [`AppState::admit`] refuses), and a
/// `token` given twice, with 400 `invalid_argument`. Pure and total: any input gives an answer, never a panic.
pub fn parse_connect_query(raw_query: &str) -> Result<ConnectQuery, HttpError> {
    let mut query = ConnectQuery::default();
    let (mut versions, mut tokens) = (0u32, 0u32);
    for pair in raw_query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match decode_component(name).as_str() {
            "v" => {
                versions += 1;
                if versions > 1 {
                    return Err(unsupported_version(format!("`v` is given more than once; use v={PROTOCOL_VERSION}")));
                }
                query.v = Some(parse_version(&decode_component(value))?);
            }
            "token" => {
                tokens += 1;
                if tokens > 1 {
                    return Err(HttpError::invalid_argument("`token` is given more than once"));
                }
                query.token = Some(decode_component(value)).filter(|token| !token.is_empty());
            }
            _ => {}
        }
    }
    Ok(query)
}

/// A protocol version: one to nine decimal digits.
fn parse_version(value: &str) -> Result<u32, HttpError> {
    let digits = !value.is_empty() && value.len() <= 9 && value.bytes().all(|byte| byte.is_ascii_digit());
    match value.parse::<u32>() {
        Ok(version) if digits => Ok(version),
        _ => {
            let shown: String = value.chars().take(16).collect();
            Err(unsupported_version(format!(
                "`v` must be a protocol version number, not {shown:?}; use v={PROTOCOL_VERSION}"
            )))
        }
    }
}

fn unsupported_version(message: String) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, code::UNSUPPORTED_VERSION, message)
}

/// Decodes one component of a query string as a form does: `+` is a space, `%XX` a byte; anything else, including
/// a `%` that does not start an escape, stays as it is.
fn decode_component(raw: &str) -> String {
    fn hex(byte: u8) -> Option<u8> {
        (byte as char).to_digit(16).map(|digit| digit as u8)
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        let escape =
            (byte == b'%').then(|| Some((hex(*bytes.get(index + 1)?)?, hex(*bytes.get(index + 2)?)?))).flatten();
        match (byte, escape) {
            (_, Some((high, low))) => {
                decoded.push(high << 4 | low);
                index += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                index += 1;
            }
            (other, None) => {
                decoded.push(other);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
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

    /// Verifies a token, and that it is not revoked.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Identity, HttpError> {
        let token = token.ok_or_else(|| HttpError::unauthorized("missing token"))?;
        let identity = self.auth.verify(token)?;
        match self.revocations.revoked_before(identity.user.as_str()).await {
            Ok(Some(before)) if is_revoked(identity.issued_at, before) => Err(HttpError::token_revoked(format!(
                "this token was revoked: the tokens of {} issued before {before} (Unix seconds) are refused; get a \
                 new token",
                identity.user
            ))),
            Ok(_) => Ok(identity),
            Err(error) => Err(HttpError::unavailable(format!("cannot read token revocations: {error}"))),
        }
    }

    /// Admits a connection: the protocol version, the token (and its revocation), the instance accepting
    /// connections, and a permit, in that order.
    pub async fn admit(&self, version: Option<u32>, token: Option<&str>) -> Result<Admission, HttpError> {
        if let Some(version) = version.filter(|version| *version != PROTOCOL_VERSION) {
            return Err(unsupported_version(format!(
                "protocol version {version} is not supported; use v={PROTOCOL_VERSION}"
            )));
        }
        let identity = self.authenticate(token).await?;
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
            issued_at: identity.issued_at,
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
    /// Runs the connection loop over `socket` to its end, counted in the connection metrics; the count and the
    /// permit are given back however it ends (a panic or a dropped task included).
    pub async fn serve<S, E>(self, socket: S, transport: Transport<E>)
    where
        S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        let Admission { session, context, permit } = self;
        let _counted = Counted::new(context.metrics.clone(), permit);
        connection::serve(socket, context, session, transport).await;
    }
}

/// A connection counted in `parley_gateway_connections` that holds a permit; both are given back when this is
/// dropped, which happens however the connection's task ends.
struct Counted {
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Counted {
    fn new(metrics: Arc<Metrics>, permit: OwnedSemaphorePermit) -> Self {
        metrics.connections.inc();
        metrics.connections_total.inc();
        Self { metrics, _permit: permit }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.connections.dec();
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

    /// An application state with HS256 tokens of [`SECRET`], a router and a hub subscription that are never called,
    /// an in-process bus and revocation store, no server API key, and `max_connections` permits.
    pub(crate) fn state(max_connections: usize) -> (AppState, watch::Sender<bool>) {
        let metrics = Metrics::new();
        let hub = Hub::new(Arc::new(Unused::default()), metrics.clone(), 1_000);
        let revocations =
            parley_bus::revocation::EmbeddedRevocationStore::in_memory(std::time::Duration::from_secs(3600));
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
            revocations: Arc::new(revocations),
            bus: Arc::new(parley_bus::pubsub::LocalPubSub::new()),
            server_api_keys: Arc::from(Vec::new()),
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
        let unsupported = refusal(state.admit(Some(PROTOCOL_VERSION + 1), None).await);
        assert_eq!(unsupported, (StatusCode::BAD_REQUEST, code::UNSUPPORTED_VERSION), "before the token");
        assert_eq!(refusal(state.admit(None, None).await), (StatusCode::UNAUTHORIZED, "unauthorized"));
        assert_eq!(
            refusal(state.admit(Some(PROTOCOL_VERSION), Some("garbage")).await),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );

        let first = state.admit(Some(PROTOCOL_VERSION), Some(&token)).await.expect("admitted");
        assert_eq!((first.session.conn, first.session.user.as_str()), (1, "alice"));
        let session_id = first.session.session_id.strip_prefix("s-").expect("prefixed");
        assert!(session_id.len() == 24 && session_id.chars().all(|digit| digit.is_ascii_hexdigit()), "{session_id}");
        assert_eq!(refusal(state.admit(None, Some(&token)).await), (StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED));
        drop(first);
        let second = state.admit(None, Some(&token)).await.expect("the permit came back");
        assert_eq!(second.session.conn, 2, "a new id (a refusal takes none, and none is reused)");

        state.accepting.store(false, Ordering::Relaxed);
        assert!(!state.accepts_connections());
        assert_eq!(refusal(state.admit(None, Some(&token)).await), (StatusCode::SERVICE_UNAVAILABLE, code::DRAINING));
        assert_eq!(
            refusal(state.admit(None, None).await),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "the token first"
        );
    }

    #[tokio::test]
    async fn a_shutting_down_instance_admits_nobody() {
        let (state, shutdown) = state(8);
        shutdown.send(true).expect("state watching");
        assert_eq!(
            refusal(state.admit(None, Some(&valid_token())).await),
            (StatusCode::SERVICE_UNAVAILABLE, code::DRAINING)
        );
    }

    /// A token of `user` issued at `iat` (or without `iat`), valid for a minute.
    fn token_issued(user: &str, iat: Option<u64>) -> String {
        let now = parley_bus::revocation::unix_secs();
        let claims = crate::auth::Claims { sub: user.into(), exp: now + 60, iat };
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_and_a_later_one_admitted() {
        let (state, _shutdown) = state(8);
        let now = parley_bus::revocation::unix_secs();
        assert!(state.admit(None, Some(&token_issued("alice", Some(now - 10)))).await.is_ok(), "nothing revoked yet");
        state.revocations.revoke("alice", now).await.expect("revoke");
        for (token, what) in
            [(token_issued("alice", Some(now - 10)), "issued before"), (token_issued("alice", None), "without iat")]
        {
            let error = state.admit(None, Some(&token)).await.expect_err(what);
            assert_eq!((error.status, error.code), (StatusCode::UNAUTHORIZED, code::TOKEN_REVOKED), "{what}");
            let error = state.authenticate(Some(&token)).await.expect_err(what);
            assert_eq!(error.code, code::TOKEN_REVOKED, "the HTTP API refuses it too: {what}");
        }
        assert!(state.admit(None, Some(&token_issued("alice", Some(now)))).await.is_ok(), "issued at the revocation");
        assert!(state.admit(None, Some(&token_issued("alice", Some(now + 1)))).await.is_ok(), "issued after");
        assert!(state.admit(None, Some(&token_issued("bob", None))).await.is_ok(), "another user");
    }

    /// A socket that reads nothing and panics on the first write, as a bug would.
    struct Exploding;

    impl Stream for Exploding {
        type Item = Result<Message, std::convert::Infallible>;

        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Pending
        }
    }

    impl Sink<Message> for Exploding {
        type Error = std::convert::Infallible;

        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            panic!("a bug in the socket")
        }

        fn start_send(self: std::pin::Pin<&mut Self>, _message: Message) -> Result<(), Self::Error> {
            Ok(())
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_connection_whose_task_panics_is_uncounted_and_gives_its_permit_back() {
        let (state, _shutdown) = state(1);
        let admission = state.admit(None, Some(&valid_token())).await.expect("admitted");
        // The test router is shutting down, so the handshake ends at once with a close frame, whose write panics.
        let transport = Transport::in_memory(|never: &std::convert::Infallible| match *never {});
        let served = tokio::spawn(admission.serve(Exploding, transport)).await;
        assert!(served.is_err(), "the task panicked");
        assert_eq!(state.metrics.connections.get(), 0, "no longer counted");
        assert_eq!(state.hub.connection_count(), 0, "out of the hub");
        assert!(state.admit(None, Some(&valid_token())).await.is_ok(), "its permit is back");
    }

    #[test]
    fn the_connect_query_is_read_leniently_and_a_malformed_version_is_unsupported() {
        let parse = parse_connect_query;
        assert_eq!(parse(""), Ok(ConnectQuery::default()));
        assert_eq!(parse("v=1&token=abc"), Ok(ConnectQuery { v: Some(1), token: Some("abc".into()) }));
        assert_eq!(
            parse("&&v=01&&_=17642&token=a%2Eb+c&token%3D=x&"),
            Ok(ConnectQuery { v: Some(1), token: Some("a.b c".into()) })
        );
        assert_eq!(parse("v=2"), Ok(ConnectQuery { v: Some(2), token: None }), "admission refuses it, with the number");
        assert_eq!(parse("token=&v=1"), Ok(ConnectQuery { v: Some(1), token: None }), "empty: the header's turn");
        assert_eq!(parse("token=%zz%4"), Ok(ConnectQuery { v: None, token: Some("%zz%4".into()) }));
        assert_eq!(parse("token=%ff"), Ok(ConnectQuery { v: None, token: Some("\u{fffd}".into()) }));
        assert_eq!(parse("%76=1"), Ok(ConnectQuery { v: Some(1), token: None }), "an escaped name");
        for malformed in ["v=abc", "v=", "v", "v=1&v=2", "v=1&v=1", "v=-1", "v=+1", "v=1.0", "v=99999999999", "v=%"] {
            let error = parse(malformed).expect_err(malformed);
            assert_eq!((error.status, error.code), (StatusCode::BAD_REQUEST, code::UNSUPPORTED_VERSION), "{malformed}");
            assert!(error.message.contains("v=1"), "{malformed}: {}", error.message);
        }
        let error = parse("token=a&token=b").expect_err("two tokens");
        assert_eq!((error.status, error.code), (StatusCode::BAD_REQUEST, "invalid_argument"));
        // Whatever the input: an answer, never a panic.
        for raw in ["%", "%%", "%%%", "=", "==", "&=&", "v==1", "\u{0}", "é=é", "%c3%a9=%c3"] {
            let _ = parse(raw);
        }
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
