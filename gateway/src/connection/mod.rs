//! The per-connection loop. It is generic over any `Sink`/`Stream` of WebSocket messages, so it runs the same
//! over axum's socket in production, over the fallback transports' virtual socket, and over plain channels in unit
//! tests.
//!
//! [`serve`] runs one `Connection` through three stages:
//!
//! 1. `Connection::open`, the handshake: the connection enters the hub, its channels are listed and joined, and
//!    `ready` goes out.
//! 2. `Connection::run`, the loop: one task per connection `select!`s between frames queued by the hub
//!    (`outbound`, first: a delivery's wake polls nothing else), shutdown, the drain signal, completed requests,
//!    the next client frame (`inbound`) and the earliest deadline (`timers`: token expiry, idle timeout, drain
//!    departure, retransmission); shutdown and drain are also read with a load before each wait. Requests
//!    (sends, history, membership; `requests`) run concurrently up to `max_in_flight`, so a client that pipelines
//!    sends is not serialised behind each disk sync; past that limit the loop stops reading the socket, which pushes
//!    back on the client through TCP.
//! 3. `Connection::finish`: the close frame (when the socket still works), the connection leaves the hub and
//!    presence, and the socket lingers until the client's close (see [`Linger`]).
//!
//! Every handler answers a `Step`: `Ok` to go on, or the `Ending` of the connection.
//!
//! What a connection may pin is bounded: its queue from the hub in frames and bytes (`--outbound-queue`,
//! `--max-outbound-bytes`), every socket write by the write timeout (`--write-timeout-ms`: a client that takes no
//! data is gone within it, and its close does not wait on the blocked socket), and the linger after a close in time
//! and bytes. Whatever ends the task (a close, a failed socket, even a panic), the connection leaves the hub and
//! presence: a panic in the loop is caught and closes with 1011, and a drop guard undoes the registration if the
//! task ends any other way.

mod inbound;
mod outbound;
mod requests;
mod timers;

#[cfg(test)]
mod tests;

use crate::config::GatewayConfig;
use crate::drain::DrainPlan;
use crate::hub::{Hub, Outbound, OutboundFrame, OutboundQueue};
use crate::metrics::{Limit, Metrics};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use parley_api::Router;
use parley_core::delivery::DeliveryTracker;
use parley_core::protocol::{ChannelView, LimitsView, ServerFrame, PROTOCOL_VERSION};
use parley_core::ratelimit::TokenBucket;
use parley_core::UserId;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use timers::{Clock, Deadlines, Lapse};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, instrument};

/// Close codes of protocol v1.
pub mod close {
    /// Going away (server shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: a frame that breaks RFC 6455 (reserved bits, an unknown opcode, an unmasked client frame, a
    /// fragmented control frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid payload data: a text frame that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error: the connection could not be set up (storage unavailable during the handshake).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Service restart: the instance drains; reconnect (elsewhere) and `sync`.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Disconnected by the server: the application's backend closed the user's sessions (server API); the client may
    /// reconnect.
    pub const DISCONNECTED: u16 = 4003;
    /// Token revoked by the application's backend (server API): get a new token before reconnecting.
    pub const TOKEN_REVOKED: u16 = 4004;
    /// Slow consumer: the outbound queue overflowed, or the socket took no data within the write timeout.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// No traffic for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4009;
    /// Messages stayed unacknowledged through every retransmission (or too many are unacknowledged).
    pub const UNACKNOWLEDGED: u16 = 4010;
}

/// What a connection needs from the process.
#[derive(Clone)]
pub struct ConnectionContext {
    /// Router handle.
    pub router: Router,
    /// Local index.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub config: Arc<GatewayConfig>,
    /// Flips to `true` when the process shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Becomes `Some` when the instance starts draining.
    pub drain: watch::Receiver<Option<DrainPlan>>,
}

impl std::fmt::Debug for ConnectionContext {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ConnectionContext").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Who is connected.
#[derive(Debug, Clone)]
pub struct Session {
    /// Connection id, unique in this process.
    pub conn: u64,
    /// Session id sent to the client.
    pub session_id: String,
    /// User.
    pub user: UserId,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
    /// When the token was issued (its `iat`), Unix seconds: a revocation of the user's tokens issued before a time
    /// closes the connection when this is earlier (or absent).
    pub issued_at: Option<u64>,
}

/// How a read from the socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFailure {
    /// A frame or message above `max_frame_bytes`: close 1009.
    TooBig,
    /// A frame that breaks RFC 6455 (reserved bits, an unknown opcode, an unmasked client frame, a fragmented
    /// control frame): close 1002.
    Protocol,
    /// A text frame that is not UTF-8: close 1007.
    InvalidUtf8,
    /// The connection failed or ended: no close frame can go out.
    Gone,
}

/// Classifies a transport's read error.
pub type Classify<E> = fn(&E) -> ReadFailure;

/// After the server's close frame, how long and how many bytes of the client's the socket keeps reading (and
/// discarding) until the client's close or the end of the stream. Closing a TCP socket with the client's data unread
/// makes the kernel reset the connection, and a reset can overtake the close frame: the client would never see why
/// it was closed (a 1009 after a frame too big, typically).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linger {
    /// At most this long.
    pub time: Duration,
    /// At most this much of the client's data.
    pub bytes: usize,
}

impl Linger {
    /// Two seconds, 1 MiB.
    pub const DEFAULT: Linger = Linger { time: Duration::from_secs(2), bytes: 1024 * 1024 };
}

/// What the loop needs to know about its transport, besides the socket.
pub struct Transport<E> {
    /// Classifies read errors.
    pub classify: Classify<E>,
    /// The linger after a close; `None` for a transport without a kernel socket (the fallbacks' virtual one).
    pub linger: Option<Linger>,
}

impl<E> Transport<E> {
    /// A WebSocket over TCP: read errors classified by `classify`, and [`Linger::DEFAULT`] after a close.
    pub fn websocket(classify: Classify<E>) -> Self {
        Self { classify, linger: Some(Linger::DEFAULT) }
    }

    /// A socket that needs no linger (in memory): read errors classified by `classify`.
    pub fn in_memory(classify: Classify<E>) -> Self {
        Self { classify, linger: None }
    }
}

impl<E> Clone for Transport<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Transport<E> {}

impl<E> std::fmt::Debug for Transport<E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Transport").field("linger", &self.linger).finish_non_exhaustive()
    }
}

/// Runs one connection to the end. `socket` is the upgraded WebSocket (or a test double).
#[instrument(name = "connection", skip_all, fields(conn = session.conn, user = %session.user))]
pub async fn serve<S, E>(socket: S, context: ConnectionContext, session: Session, transport: Transport<E>)
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    let ConnectionContext { router, hub, metrics, config, shutdown, drain } = &context;
    let mut registration = Registration::new(hub.clone(), &session);
    let shared = Shared { router, hub, metrics, config, session: &session };
    let (sender, outbound) = Outbound::channel(config.outbound_queue, config.max_outbound_bytes);
    let mut connection = Connection::new(shared, socket, transport, outbound, shutdown.clone(), drain.clone());
    let lived = AssertUnwindSafe(async {
        // Boxed: the handshake's future is only needed at the start, and kept out of line it does not enlarge the
        // task for the connection's whole life.
        match Box::pin(connection.open(sender, &mut registration)).await {
            Ok(()) => connection.run().await,
            Err(ending) => ending,
        }
    })
    .catch_unwind()
    .await;
    let ending = lived.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|what| what.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        error!(panic = %what, "the connection loop panicked; closing with 1011");
        Ending::Close(close::INTERNAL_ERROR, "internal error; reconnect and sync")
    });
    // Boxed: the close's future is only needed at the end, and kept out of line it does not enlarge the task.
    Box::pin(connection.finish(ending, registration)).await;
}

/// What a connection holds in the process (its place in the hub, and in presence once counted there), given back
/// however the connection ends: by [`Registration::release`] when it finishes, or when dropped if its task ended
/// any other way (a panic past the loop, the task dropped): the index at once, the rest in a task of its own.
struct Registration {
    hub: Arc<Hub>,
    conn: u64,
    user: UserId,
    /// Topics left to re-examine after the connection left the index.
    topics: Vec<String>,
    /// Whether the connection is in the index (or may be).
    indexed: bool,
    /// Whether presence counts the connection (or may: set before the call).
    present: bool,
}

impl Registration {
    fn new(hub: Arc<Hub>, session: &Session) -> Self {
        Self { hub, conn: session.conn, user: session.user.clone(), topics: Vec::new(), indexed: true, present: false }
    }

    /// Leaves the hub and presence.
    async fn release(mut self) {
        if self.indexed {
            self.topics = self.hub.detach(self.conn);
            self.indexed = false;
        }
        self.hub.release_topics(self.topics.clone()).await;
        self.topics.clear();
        if self.present {
            // Cleared first: a second `disconnected` (if this is cut short) would count another connection out.
            self.present = false;
            if let Some(presence) = self.hub.presence() {
                presence.disconnected(self.user.as_str()).await;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.indexed {
            self.topics = self.hub.detach(self.conn);
        }
        if self.topics.is_empty() && !self.present {
            return;
        }
        let (hub, topics, present, user) =
            (self.hub.clone(), std::mem::take(&mut self.topics), self.present, self.user.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                hub.release_topics(topics).await;
                if let Some(presence) = hub.presence().filter(|_| present) {
                    presence.disconnected(user.as_str()).await;
                }
            });
        }
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The socket failed or the client closed it: no close frame can go out.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The socket took no data within the write timeout (4008): the close goes out only if the socket takes it at
    /// once, and nothing waits on the socket any more.
    Stalled,
}

/// The reason of the close of a connection whose token was revoked.
const TOKEN_REVOKED_REASON: &str = "token revoked; get a new token";

/// The reason of a close for a stalled socket.
const STALLED: &str = "slow consumer: the socket took no data within write_timeout_ms; reconnect and sync";

/// What a handler answers: `Err` ends the connection.
type Step = Result<(), Ending>;

/// What the loop waits for.
enum Event<E> {
    /// The process shuts down.
    Shutdown,
    /// The drain signal changed, or its sender is gone (`closed`).
    Drain {
        /// Whether the sender is gone (no drain can start any more).
        closed: bool,
    },
    /// A frame from the hub's queue (`None`: the hub cut the connection off).
    Outbound(Option<OutboundFrame>),
    /// A request completed, with its answer (encoded), if any.
    Answer(Option<Message>),
    /// The next client frame, or the end of the stream.
    Incoming(Option<Result<Message, E>>),
    /// The earliest deadline passed.
    Deadline,
}

/// The process-wide parts a connection uses, borrowed for its whole life (so request futures can hold them).
#[derive(Clone, Copy)]
struct Shared<'a> {
    router: &'a Router,
    hub: &'a Hub,
    metrics: &'a Metrics,
    config: &'a GatewayConfig,
    session: &'a Session,
}

/// A request running concurrently with the loop; its frame (if any) goes to the client when it completes.
type Pending<'a> = Pin<Box<dyn Future<Output = Option<ServerFrame>> + Send + 'a>>;

/// Frames taken from the hub's queue before one flush of the socket.
const OUTBOUND_BATCH: usize = 64;

/// One connection's state: its socket, its queue from the hub, its delivery tracking, send rate and timers, and
/// the requests in flight.
struct Connection<'a, S, E> {
    shared: Shared<'a>,
    socket: S,
    transport: Transport<E>,
    /// Whether reading the socket failed or ended: its stream gives nothing more.
    read_failed: bool,
    /// Frames the hub queued for this connection; closed when the hub cuts the connection off as a slow consumer.
    outbound: OutboundQueue,
    shutdown: watch::Receiver<bool>,
    drain: watch::Receiver<Option<DrainPlan>>,
    /// Set once the drain signal's sender is gone (no drain can start any more).
    drain_closed: bool,
    tracker: DeliveryTracker<Utf8Bytes>,
    bucket: TokenBucket,
    clock: Clock,
    deadlines: Deadlines,
    pending: FuturesUnordered<Pending<'a>>,
}

impl<'a, S, E> Connection<'a, S, E>
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    fn new(
        shared: Shared<'a>,
        socket: S,
        transport: Transport<E>,
        outbound: OutboundQueue,
        shutdown: watch::Receiver<bool>,
        drain: watch::Receiver<Option<DrainPlan>>,
    ) -> Self {
        let config = shared.config;
        let clock = Clock::new();
        let bucket = TokenBucket::new(config.send_rate_per_sec, config.send_burst, clock.now_ms());
        let idle = Duration::from_millis(config.idle_timeout_ms.max(1));
        Self {
            shared,
            socket,
            transport,
            read_failed: false,
            outbound,
            shutdown,
            drain,
            drain_closed: false,
            tracker: DeliveryTracker::new(config.ack_policy()),
            bucket,
            clock,
            deadlines: Deadlines::new(idle, shared.session.expires_at),
            pending: FuturesUnordered::new(),
        }
    }

    /// The handshake. Its order is what makes it lossless without waiting on anyone in the common case:
    /// 1. the connection and its user enter the local index, so direct events for the user are kept from now on;
    /// 2. the user→gateway registry names this instance, so every membership change written after that is
    ///    published to it (the router writes memberships before it locates users);
    /// 3. the memberships are read: a change written before this read is in it, one written after reaches step 1;
    /// 4. the channels join the index (see [`Connection::join_channels`]).
    ///
    /// Then the channels' last sequences start the delivery tracking, and `ready` goes out.
    async fn open(&mut self, sender: Outbound, registration: &mut Registration) -> Step {
        let Shared { hub, session, .. } = self.shared;
        hub.register(session.conn, &session.user, sender, Vec::new()).await;
        // A revocation heard after the admission read the store and before this registration: refused now (from
        // the registration on, revocations reach the connection through its queue).
        if let Some(before) = hub.recent_revocation(session.user.as_str()) {
            if parley_bus::revocation::is_revoked(session.issued_at, before) {
                return Err(Ending::Close(close::TOKEN_REVOKED, TOKEN_REVOKED_REASON));
            }
        }
        if let Some(presence) = hub.presence() {
            registration.present = true;
            presence.connected(session.user.as_str()).await;
        }
        let channels = self.join_channels().await?;
        hub.note_sizes(channels.iter().map(|view| (view.id.as_str(), view.members)));
        for view in &channels {
            self.tracker.start_at(&view.id, view.last_seq);
        }
        let ready = self.ready(channels);
        self.send(&ready).await
    }

    /// Steps 3 and 4 of the handshake: lists the user's channels and adds them to the index. A message of theirs
    /// that this instance saw go by between the two (or a channel this instance had to subscribe first) makes the
    /// list stale: it is read once more, after, and the channels that appeared meanwhile join too.
    async fn join_channels(&mut self) -> Result<Vec<ChannelView>, Ending> {
        let Shared { hub, session, .. } = self.shared;
        let first = list_channels(self.shared).await?;
        let heads: Vec<(String, u64)> = first.iter().map(|view| (view.id.clone(), view.last_seq)).collect();
        if !hub.add_channels_since(session.conn, heads).await {
            return Ok(first);
        }
        let channels = list_channels(self.shared).await?;
        let late: Vec<String> = channels
            .iter()
            .filter(|view| !first.iter().any(|seen| seen.id == view.id))
            .map(|view| view.id.clone())
            .collect();
        if !late.is_empty() {
            hub.add_channels(session.conn, late).await;
        }
        Ok(channels)
    }

    /// The `ready` frame: the session, the limits and the channels.
    fn ready(&self, channels: Vec<ChannelView>) -> ServerFrame {
        let Shared { router, config, session, .. } = self.shared;
        let limits = router.limits();
        ServerFrame::Ready {
            protocol: PROTOCOL_VERSION,
            session_id: session.session_id.clone(),
            user: session.user.to_string(),
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            limits: LimitsView {
                max_frame_bytes: config.max_frame_bytes,
                max_text_bytes: limits.max_text_bytes,
                max_channel_members: limits.max_channel_members,
                send_rate_per_sec: config.send_rate_per_sec,
                send_burst: config.send_burst,
            },
            channels,
        }
    }

    /// The loop, until the connection ends.
    async fn run(&mut self) -> Ending {
        // Connected while a drain was starting: leave right away.
        let draining = self.drain.borrow().is_some();
        self.deadlines.start(Instant::now(), draining);
        loop {
            if let Err(ending) = self.step().await {
                return ending;
            }
            // Wake earlier when a retransmission falls due before the armed deadline.
            if let Some(due_ms) = self.tracker.next_deadline_ms() {
                self.deadlines.wake_by(self.clock.instant(due_ms));
            }
        }
    }

    /// Waits for the next event and handles it. The wait and the
    /// handling are two steps: the branches' futures are gone before a handler's future starts, so the task holds
    /// one or the other, never both.
    async fn step(&mut self) -> Step {
        match self.next_event().await {
            Event::Shutdown => Err(Ending::Close(close::GOING_AWAY, "server shutting down; reconnect")),
            Event::Drain { closed: false } => {
                self.on_drain();
                Ok(())
            }
            Event::Drain { closed: true } => {
                self.drain_closed = true;
                Ok(())
            }
            Event::Outbound(queued) => self.on_outbound(queued).await,
            Event::Answer(Some(message)) => self.write(message).await,
            Event::Answer(None) => Ok(()),
            Event::Incoming(incoming) => {
                let message = self.received(incoming)?;
                self.on_message(message).await
            }
            Event::Deadline => self.on_deadline().await,
        }
    }

    /// The next event: the first of the branches that is ready. The shutdown and drain signals are looked at first,
    /// with a load each (no waker is registered for that); then the hub's queue is polled before anything else, so
    /// a wake for a delivery, the most frequent by far, polls nothing more. The signals' futures, which register
    /// wakers under a lock shared by every connection, are polled only when nothing was queued.
    async fn next_event(&mut self) -> Event<E> {
        // An error: the sender is gone, which is a shutdown too.
        if !matches!(self.shutdown.has_changed(), Ok(false)) {
            return Event::Shutdown;
        }
        let watching_drain = !self.drain_closed && !self.deadlines.leaving();
        if watching_drain {
            match self.drain.has_changed() {
                Ok(false) => {}
                Ok(true) => {
                    self.drain.borrow_and_update();
                    return Event::Drain { closed: false };
                }
                // The sender is gone; a plan it sent before going is still news (the next step sees the close).
                Err(_) if self.drain.borrow_and_update().has_changed() => return Event::Drain { closed: false },
                Err(_) => return Event::Drain { closed: true },
            }
        }
        let reading = self.pending.len() < self.shared.config.max_in_flight;
        tokio::select! {
            biased;
            queued = self.outbound.recv() => Event::Outbound(queued),
            _ = self.shutdown.changed() => Event::Shutdown,
            changed = self.drain.changed(), if watching_drain => Event::Drain { closed: changed.is_err() },
            Some(answer) = self.pending.next(), if !self.pending.is_empty() => {
                Event::Answer(answer.map(|frame| text(&frame)))
            }
            incoming = self.socket.next(), if reading => Event::Incoming(incoming),
            () = self.deadlines.sleep() => Event::Deadline,
        }
    }

    /// The instance started draining: pick this connection's moment to leave.
    fn on_drain(&mut self) {
        let plan = *self.drain.borrow();
        if let Some(plan) = plan {
            // A uniformly random moment in the window's first part spreads the reconnects of all clients, and the
            // rest of the window lets the last ones land.
            let at = timers::after(Instant::now(), plan.departure_at(rand::random::<f64>()));
            self.deadlines.leave_at(at);
        }
    }

    /// The earliest deadline passed: the token expired, the client went silent, its moment to leave for the
    /// drain came, or messages are due for retransmission (or dead).
    async fn on_deadline(&mut self) -> Step {
        match self.deadlines.lapsed(Instant::now()) {
            Some(Lapse::TokenExpired) => {
                Err(Ending::Close(close::TOKEN_EXPIRED, "token expired; reconnect with a fresh token"))
            }
            Some(Lapse::Idle) => Err(Ending::Close(close::IDLE_TIMEOUT, "no traffic within the idle timeout")),
            Some(Lapse::Departure) => {
                let reconnect = text(&ServerFrame::Reconnect { reason: "draining".into() });
                self.write(reconnect).await?;
                Err(Ending::Close(close::SERVICE_RESTART, "instance draining; reconnect and sync"))
            }
            None => {
                self.retransmit().await?;
                self.deadlines.rearm();
                Ok(())
            }
        }
    }

    /// Sends the close frame (when the socket still takes data), leaves the hub and presence, and lets the socket
    /// linger until the client's close; every step bounded.
    async fn finish(mut self, ending: Ending, registration: Registration) {
        // Requests still in flight are abandoned: nobody would read their answers.
        self.pending.clear();
        debug!(?ending, "connection ends");
        let Shared { config, metrics, .. } = self.shared;
        let limit = config.write_timeout();
        // Whether the close went out, and whether the socket stopped taking data.
        let (closed, stalled) = match ending {
            Ending::Gone => (false, false),
            Ending::Stalled => {
                // The socket takes nothing: the close goes out only if it fits at once.
                let _ = self.socket.send(close_message(close::SLOW_CONSUMER, STALLED)).now_or_never();
                (false, true)
            }
            Ending::Close(code, reason) => {
                match tokio::time::timeout(limit, self.socket.send(close_message(code, reason))).await {
                    Ok(Ok(())) => (true, false),
                    Ok(Err(_)) => (false, false),
                    Err(_) => {
                        metrics.limit(Limit::WriteTimeout);
                        (false, true)
                    }
                }
            }
        };
        registration.release().await;
        if closed {
            self.linger().await;
        }
        if !stalled {
            // Flushes an answer to the client's own close, if any.
            let _ = tokio::time::timeout(limit, self.socket.close()).await;
        }
    }

    /// After the server's close: reads and discards what the client still sends until its close or the end of the
    /// stream, within the transport's [`Linger`]. A stream that failed reads nothing more: then the socket is only
    /// kept open for that time, for the client to read the close.
    async fn linger(&mut self) {
        let Some(linger) = self.transport.linger else { return };
        let deadline = timers::after(Instant::now(), linger.time);
        if self.read_failed {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        let mut budget = linger.bytes;
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, self.socket.next()).await {
            let size = match &message {
                Message::Text(text) => text.len(),
                Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
                Message::Close(_) => break,
            };
            match budget.checked_sub(size) {
                Some(left) => budget = left,
                None => break,
            }
        }
    }

    /// Sends one frame and flushes, within the write timeout.
    async fn send(&mut self, frame: &ServerFrame) -> Step {
        self.write(text(frame)).await
    }

    /// Sends one message and flushes, within the write timeout.
    async fn write(&mut self, message: Message) -> Step {
        let Shared { config, metrics, .. } = self.shared;
        within(config, metrics, self.socket.send(message)).await
    }

    /// Queues one message on the socket without flushing, within the write timeout.
    async fn feed(&mut self, message: Message) -> Step {
        let Shared { config, metrics, .. } = self.shared;
        within(config, metrics, self.socket.feed(message)).await
    }

    /// Flushes the socket, within the write timeout.
    async fn flush(&mut self) -> Step {
        let Shared { config, metrics, .. } = self.shared;
        within(config, metrics, self.socket.flush()).await
    }
}

/// Runs one socket write within the write timeout: a failed write means the client is gone, a write still waiting
/// at the deadline a stalled socket (counted as a `write_timeout` limit hit).
///
/// Most writes complete at once (the socket takes the frame): the first poll is made before the timer is set up, so
/// those never create it, and the timer's future is boxed, so it does not enlarge every connection's task.
async fn within<T, X>(config: &GatewayConfig, metrics: &Metrics, write: impl Future<Output = Result<T, X>>) -> Step {
    let mut write = std::pin::pin!(write);
    if let std::task::Poll::Ready(done) = futures_util::poll!(write.as_mut()) {
        return done.map(|_| ()).map_err(|_| Ending::Gone);
    }
    match Box::pin(tokio::time::timeout(config.write_timeout(), write)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(Ending::Gone),
        Err(_) => {
            metrics.limit(Limit::WriteTimeout);
            debug!("the socket took no data within the write timeout");
            Err(Ending::Stalled)
        }
    }
}

/// The user's channels; a failure ends the handshake (1011).
async fn list_channels(shared: Shared<'_>) -> Result<Vec<ChannelView>, Ending> {
    shared.router.list_channels(&shared.session.user).await.map_err(|error| {
        debug!(%error, "cannot list channels");
        Ending::Close(close::INTERNAL_ERROR, "storage unavailable")
    })
}

fn text(frame: &ServerFrame) -> Message {
    Message::Text(Utf8Bytes::from(frame.to_json()))
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}
