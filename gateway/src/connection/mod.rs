//! The per-connection loop. It is generic over any `Sink`/`Stream` of WebSocket messages, so it runs the same
//! over axum's socket in production, over the fallback transports' virtual socket, and over plain channels in unit
//! tests.
//!
//! [`serve`] runs one `Connection` through three stages:
//!
//! 1. `Connection::open`, the handshake: the connection enters the hub, its channels are listed and joined, and
//!    `ready` goes out.
//! 2. `Connection::run`, the loop: one task per connection `select!`s between shutdown, the drain signal, frames
//!    queued by the hub (`outbound`), completed requests, the next client frame (`inbound`) and the earliest
//!    deadline (`timers`: token expiry, idle timeout, drain departure, retransmission). Requests (sends, history,
//!    membership; `requests`) run concurrently up to `max_in_flight`, so a client that pipelines sends is not
//!    serialised behind each disk sync; past that limit the loop stops reading the socket, which pushes back on
//!    the client through TCP.
//! 3. `Connection::finish`: the close frame (when the socket still works), then the connection leaves the hub.
//!
//! Every handler answers a `Step`: `Ok` to go on, or the `Ending` of the connection.

mod inbound;
mod outbound;
mod requests;
mod timers;

#[cfg(test)]
mod tests;

use crate::config::GatewayConfig;
use crate::drain::DrainPlan;
use crate::hub::{Hub, Outbound, OutboundFrame};
use crate::metrics::Metrics;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use parley_api::Router;
use parley_core::delivery::DeliveryTracker;
use parley_core::protocol::{ChannelView, LimitsView, ServerFrame, PROTOCOL_VERSION};
use parley_core::ratelimit::TokenBucket;
use parley_core::UserId;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use timers::{Clock, Deadlines, Lapse};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, instrument};

/// Close codes of protocol v1.
pub mod close {
    /// Going away (server shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error: the connection could not be set up (storage unavailable during the handshake).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Service restart: the instance drains; reconnect (elsewhere) and `sync`.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Slow consumer: the outbound queue overflowed.
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
}

/// Classifies a transport error: `true` when the client sent a frame or message above the size limit.
pub type TooBig<E> = fn(&E) -> bool;

/// Runs one connection to the end. `socket` is the upgraded WebSocket (or a test double).
#[instrument(name = "connection", skip_all, fields(conn = session.conn, user = %session.user))]
pub async fn serve<S, E>(socket: S, context: ConnectionContext, session: Session, too_big: TooBig<E>)
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    let ConnectionContext { router, hub, metrics, config, shutdown, drain } = context;
    let shared = Shared { router: &router, hub: &hub, metrics: &metrics, config: &config, session: &session };
    let (sender, outbound) = mpsc::channel::<OutboundFrame>(config.outbound_queue.max(1));
    let mut connection = Connection::new(shared, socket, too_big, outbound, shutdown, drain);
    let ending = match connection.open(sender).await {
        Ok(()) => connection.run().await,
        Err(ending) => ending,
    };
    connection.finish(ending).await;
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The socket failed or the client closed it: no close frame can go out.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// What a handler answers: `Err` ends the connection.
type Step = Result<(), Ending>;

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
    too_big: TooBig<E>,
    /// Frames the hub queued for this connection; ends when the hub cuts the connection off as a slow consumer.
    outbound: mpsc::Receiver<OutboundFrame>,
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
        too_big: TooBig<E>,
        outbound: mpsc::Receiver<OutboundFrame>,
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
            too_big,
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
    async fn open(&mut self, sender: Outbound) -> Step {
        let Shared { hub, session, .. } = self.shared;
        hub.register(session.conn, &session.user, sender, Vec::new()).await;
        if let Some(presence) = hub.presence() {
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

    /// Waits for the next event and handles it. Earlier branches win when several are ready.
    async fn step(&mut self) -> Step {
        let reading = self.pending.len() < self.shared.config.max_in_flight;
        let watching_drain = !self.drain_closed && !self.deadlines.leaving();
        tokio::select! {
            biased;
            _ = self.shutdown.changed() => Err(Ending::Close(close::GOING_AWAY, "server shutting down; reconnect")),
            changed = self.drain.changed(), if watching_drain => {
                match changed {
                    Ok(()) => self.on_drain(),
                    Err(_) => self.drain_closed = true,
                }
                Ok(())
            }
            queued = self.outbound.recv() => self.on_outbound(queued).await,
            Some(answer) = self.pending.next(), if !self.pending.is_empty() => match answer {
                Some(frame) => self.send(&frame).await,
                None => Ok(()),
            },
            incoming = self.socket.next(), if reading => {
                let message = self.received(incoming)?;
                self.on_message(message).await
            }
            () = self.deadlines.sleep() => self.on_deadline().await,
        }
    }

    /// The instance started draining: pick this connection's moment to leave.
    fn on_drain(&mut self) {
        let plan = *self.drain.borrow();
        if let Some(plan) = plan {
            // A uniformly random moment in the window's first part spreads the reconnects of all clients, and the
            // rest of the window lets the last ones land.
            let at = Instant::now() + plan.departure_at(rand::random::<f64>());
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
                let _ = self.send(&ServerFrame::Reconnect { reason: "draining".into() }).await;
                Err(Ending::Close(close::SERVICE_RESTART, "instance draining; reconnect and sync"))
            }
            None => {
                self.retransmit().await?;
                self.deadlines.rearm();
                Ok(())
            }
        }
    }

    /// Sends the close frame (when the socket still works), closes the socket and leaves the hub.
    async fn finish(mut self, ending: Ending) {
        // Requests still in flight are abandoned: nobody would read their answers.
        self.pending.clear();
        debug!(?ending, "connection ends");
        if let Ending::Close(code, reason) = ending {
            let _ = self.socket.send(close_message(code, reason)).await;
        }
        let _ = self.socket.close().await;
        let Shared { hub, session, .. } = self.shared;
        hub.unregister(session.conn).await;
        if let Some(presence) = hub.presence() {
            presence.disconnected(session.user.as_str()).await;
        }
    }

    /// Sends one frame and flushes.
    async fn send(&mut self, frame: &ServerFrame) -> Step {
        self.socket.send(text(frame)).await.map_err(|_| Ending::Gone)
    }

    /// Queues one message on the socket without flushing.
    async fn feed(&mut self, message: Message) -> Step {
        self.socket.feed(message).await.map_err(|_| Ending::Gone)
    }

    async fn flush(&mut self) -> Step {
        self.socket.flush().await.map_err(|_| Ending::Gone)
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
