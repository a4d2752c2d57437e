//! The per-connection loop. It is generic over any `Sink`/`Stream` of WebSocket messages, so it runs the same
//! over axum's socket in production and over plain channels in unit tests.
//!
//! One task per connection `select!`s between: shutdown, frames queued by the hub, completed requests, the next
//! client frame, and the idle/expiry deadline. Requests (sends, history, membership) run concurrently up to
//! `max_in_flight`, so a client that pipelines sends is not serialised behind each disk sync; past that limit the
//! loop stops reading the socket, which pushes back on the client through TCP.

use crate::config::GatewayConfig;
use crate::drain::DrainPlan;
use crate::hub::{Hub, OutboundFrame};
use crate::metrics::{Limit, Metrics};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use parley_core::delivery::{Admit, DeliveryTracker, Due};
use parley_core::protocol::{decode_client, ClientFrame, ErrorCode, LimitsView, ServerFrame, PROTOCOL_VERSION};
use parley_core::ratelimit::TokenBucket;
use parley_core::UserId;
use parley_router::backend::HistoryQuery;
use parley_router::{Router, RouterError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, instrument};

/// Close codes of protocol v1.
pub mod close {
    /// Going away (server shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Service restart: the instance drains; reconnect (elsewhere) and `sync`.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
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

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// A monotonic millisecond clock for timers and rate limits (follows tokio's clock, so paused time works).
struct Clock {
    origin: Instant,
}

impl Clock {
    fn new() -> Self {
        Self { origin: Instant::now() }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn instant(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }
}

/// Delivery of messages to one connection: in order, without duplicates, filling gaps from history.
struct Delivery<'a> {
    router: &'a Router,
    hub: &'a Hub,
    conn: u64,
    user: &'a UserId,
    clock: &'a Clock,
    metrics: &'a Metrics,
}

impl Delivery<'_> {
    /// Feeds one queued frame (no flush). `Err` when the socket is gone.
    async fn push<S>(
        &mut self,
        socket: &mut S,
        tracker: &mut DeliveryTracker<Utf8Bytes>,
        item: OutboundFrame,
    ) -> Result<(), ()>
    where
        S: Sink<Message> + Unpin,
    {
        let Some((channel, seq)) = item.0.message.clone() else {
            return socket.feed(Message::Text(item.0.frame.clone())).await.map_err(|_| ());
        };
        match tracker.admit(&channel, seq) {
            Admit::Duplicate => return Ok(()),
            Admit::Deliver => {}
            Admit::Gap { from, to } => {
                self.metrics.gaps_filled.inc();
                // The gap is reported but the stream goes on: the client refetches with history.
                // Boxed: gaps are rare, and keeping this future out of line keeps every connection's task small.
                let _ = Box::pin(self.replay(socket, tracker, &channel, from - 1, Some(to))).await?;
            }
        }
        if tracker.admit(&channel, seq) == Admit::Duplicate {
            return Ok(());
        }
        socket.feed(Message::Text(item.0.frame.clone())).await.map_err(|_| ())?;
        tracker.sent(&channel, seq, item.0.frame.clone(), self.clock.now_ms());
        Ok(())
    }

    /// Sends the messages of `channel` after `after` (up to `upto`, or to the end) from storage, in order, each
    /// tracked for acknowledgement. A part no longer retained is announced with `resync_required`.
    /// Outer `Err`: the socket is gone; inner `Err`: the router refused (not a member, unavailable).
    async fn replay<S>(
        &mut self,
        socket: &mut S,
        tracker: &mut DeliveryTracker<Utf8Bytes>,
        channel: &Arc<str>,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Result<(), RouterError>, ()>
    where
        S: Sink<Message> + Unpin,
    {
        let mut cursor = after;
        loop {
            let query = HistoryQuery { after: Some(cursor), before: upto.map(|last| last + 1), limit: 200 };
            let cached = self.hub.cached_page(self.conn, channel, &query);
            let read = match cached {
                Some(page) => Ok(page),
                None => self.router.history(self.user, channel, query).await,
            };
            let page = match read {
                Ok(page) => page,
                Err(error) => return Ok(Err(error)),
            };
            let first_available = page.messages.first().map(|message| message.seq);
            let expected = cursor + 1;
            let missing = match first_available {
                Some(first) => first > expected,
                None => upto.is_some_and(|last| last >= expected),
            };
            if missing {
                let first_available = match first_available {
                    Some(first) => first,
                    None => self.router.first_retained_seq(channel).await.unwrap_or(expected),
                };
                let frame =
                    ServerFrame::ResyncRequired { channel: channel.to_string(), from: expected, first_available };
                socket.feed(text(&frame)).await.map_err(|_| ())?;
                tracker.start_at(channel, first_available.saturating_sub(1));
            }
            for message in page.messages {
                let seq = message.seq;
                cursor = seq;
                if tracker.admit(channel, seq) == Admit::Duplicate && upto.is_some() {
                    continue;
                }
                let frame = Utf8Bytes::from(ServerFrame::Message(message).to_json());
                socket.feed(Message::Text(frame.clone())).await.map_err(|_| ())?;
                tracker.sent(channel, seq, frame, self.clock.now_ms());
            }
            if !page.has_more {
                return Ok(Ok(()));
            }
        }
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Option<ServerFrame>> + Send + 'a>>;

fn error_frame(
    req_id: Option<String>,
    code: ErrorCode,
    message: impl Into<String>,
    client_msg_id: Option<String>,
) -> ServerFrame {
    ServerFrame::Error { req_id, code, message: message.into(), client_msg_id }
}

fn router_error(req_id: Option<String>, error: RouterError, client_msg_id: Option<String>) -> ServerFrame {
    error_frame(req_id, error.code(), error.to_string(), client_msg_id)
}

fn text(frame: &ServerFrame) -> Message {
    Message::Text(Utf8Bytes::from(frame.to_json()))
}

/// Most users one connection may watch the presence of.
const MAX_WATCHED: usize = 1_000;

/// Classifies a transport error: `true` when the client sent a frame or message above the size limit.
pub type TooBig<E> = fn(&E) -> bool;

/// Runs one connection to the end. `socket` is the upgraded WebSocket (or a test double).
#[instrument(name = "connection", skip_all, fields(conn = session.conn, user = %session.user))]
pub async fn serve<S, E>(socket: S, context: ConnectionContext, session: Session, too_big: TooBig<E>)
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    let ConnectionContext { router, hub, metrics, config, mut shutdown, mut drain } = context;
    let mut socket = socket;
    let (sender, mut outbound) = mpsc::channel::<OutboundFrame>(config.outbound_queue.max(1));

    // The handshake's order is what makes it lossless without waiting on anyone in the common case:
    // 1. the connection and its user enter the local index, so direct events for the user are kept from now on;
    // 2. the user→gateway registry names this instance, so every membership change written after that is
    //    published to it (the router writes memberships before it locates users);
    // 3. the memberships are read: a change written before this read is in it, one written after reaches step 1;
    // 4. the channels join the index. A message of theirs that this instance saw go by between 3 and 4 (or a
    //    channel this instance had to subscribe first) makes the list stale: it is read once more, after.
    hub.register(session.conn, &session.user, sender, Vec::new()).await;
    if let Some(presence) = hub.presence() {
        presence.connected(session.user.as_str()).await;
    }
    let leave = |code: u16, reason: &'static str| {
        let hub = &hub;
        let session = &session;
        async move {
            hub.unregister(session.conn).await;
            if let Some(presence) = hub.presence() {
                presence.disconnected(session.user.as_str()).await;
            }
            (code, reason)
        }
    };
    let first = match router.list_channels(&session.user).await {
        Ok(channels) => channels,
        Err(error) => {
            debug!(%error, "cannot list channels");
            let (code, reason) = leave(1011, "storage unavailable").await;
            let _ = socket.send(close_message(code, reason)).await;
            return;
        }
    };
    let heads: Vec<(String, u64)> = first.iter().map(|view| (view.id.clone(), view.last_seq)).collect();
    let channels = if hub.add_channels_since(session.conn, heads).await {
        match router.list_channels(&session.user).await {
            Ok(channels) => {
                let late: Vec<String> = channels
                    .iter()
                    .filter(|view| !first.iter().any(|seen| seen.id == view.id))
                    .map(|view| view.id.clone())
                    .collect();
                if !late.is_empty() {
                    hub.add_channels(session.conn, late).await;
                }
                channels
            }
            Err(error) => {
                debug!(%error, "cannot list channels");
                let (code, reason) = leave(1011, "storage unavailable").await;
                let _ = socket.send(close_message(code, reason)).await;
                return;
            }
        }
    } else {
        first
    };
    hub.note_sizes(channels.iter().map(|view| (view.id.as_str(), view.members)));
    let mut tracker: DeliveryTracker<Utf8Bytes> = DeliveryTracker::new(config.ack_policy());
    for view in &channels {
        tracker.start_at(&view.id, view.last_seq);
    }
    let ready = ServerFrame::Ready {
        protocol: PROTOCOL_VERSION,
        session_id: session.session_id.clone(),
        user: session.user.to_string(),
        heartbeat_interval_ms: config.heartbeat_interval_ms,
        limits: LimitsView {
            max_frame_bytes: config.max_frame_bytes,
            max_text_bytes: router.config().max_text_bytes,
            max_channel_members: router.config().max_channel_members,
            send_rate_per_sec: config.send_rate_per_sec,
            send_burst: config.send_burst,
        },
        channels,
    };
    let ready = text(&ready);
    if socket.send(ready).await.is_err() {
        leave(1011, "write failed").await;
        return;
    }

    let clock = Clock::new();
    let mut bucket = TokenBucket::new(config.send_rate_per_sec, config.send_burst, clock.now_ms());
    let mut pending: FuturesUnordered<Pending<'_>> = FuturesUnordered::new();
    let idle = Duration::from_millis(config.idle_timeout_ms.max(1));
    let mut last_activity = Instant::now();
    let expiry = {
        let remaining = session.expires_at.saturating_mul(1000).saturating_sub(unix_ms());
        Instant::now() + Duration::from_millis(remaining)
    };
    let mut armed = (last_activity + idle).min(expiry);
    let mut drain_at: Option<Instant> = None;
    if drain.borrow().is_some() {
        // Connected while a drain was starting: leave right away.
        drain_at = Some(Instant::now());
        armed = Instant::now();
    }
    let deadline = tokio::time::sleep_until(armed);
    tokio::pin!(deadline);
    let mut delivery = Delivery {
        router: &router,
        hub: &hub,
        conn: session.conn,
        user: &session.user,
        clock: &clock,
        metrics: &metrics,
    };

    let reason: Option<(u16, &'static str)> = loop {
        let reading = pending.len() < config.max_in_flight;
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Some((close::GOING_AWAY, "server shutting down; reconnect")),
            _ = drain.changed(), if drain_at.is_none() => {
                let plan = *drain.borrow();
                if let Some(plan) = plan {
                    // A uniformly random moment in the window's first part spreads the reconnects of all clients,
                    // and the rest of the window lets the last ones land.
                    let at = Instant::now() + plan.departure_at(rand::random::<f64>());
                    drain_at = Some(at);
                    if at < armed {
                        armed = at;
                        deadline.as_mut().reset(armed);
                    }
                }
            }
            queued = outbound.recv() => match queued {
                Some(item) => {
                    if delivery.push(&mut socket, &mut tracker, item).await.is_err() { break None; }
                    let mut more = 0;
                    let mut failed = false;
                    while more < 64 {
                        match outbound.try_recv() {
                            Ok(item) => {
                                if delivery.push(&mut socket, &mut tracker, item).await.is_err() { failed = true; break; }
                                more += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    if failed || socket.flush().await.is_err() { break None; }
                    if tracker.overloaded() {
                        break Some((close::UNACKNOWLEDGED, "too many unacknowledged messages; resume with sync"));
                    }
                }
                None => break Some((close::SLOW_CONSUMER, "slow consumer: outbound queue overflowed; reconnect and fill gaps with history")),
            },
            Some(answer) = pending.next(), if !pending.is_empty() => {
                if let Some(frame) = answer {
                    if socket.send(text(&frame)).await.is_err() { break None; }
                }
            }
            incoming = socket.next(), if reading => {
                let message = match incoming {
                    None => break None,
                    Some(Err(error)) => {
                        if too_big(&error) {
                            metrics.limit(Limit::FrameSize);
                            break Some((close::TOO_BIG, "frame too big: the limit is max_frame_bytes"));
                        }
                        debug!(%error, "read failed");
                        break None;
                    }
                    Some(Ok(message)) => message,
                };
                last_activity = Instant::now();
                let bytes = match message {
                    Message::Text(text) => axum::body::Bytes::from(text),
                    Message::Binary(bytes) => bytes,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => break None,
                };
                metrics.frames_in.inc();
                let frame = match decode_client(&bytes) {
                    Ok(frame) => frame,
                    Err(error) => {
                        metrics.error(error.code);
                        let reply = error_frame(error.req_id, error.code, error.message, None);
                        if socket.send(text(&reply)).await.is_err() { break None; }
                        continue;
                    }
                };
                match frame {
                    ClientFrame::Ping { req_id } => {
                        if socket.send(text(&ServerFrame::Pong { req_id, ts: unix_ms() })).await.is_err() { break None; }
                    }
                    ClientFrame::Ack { channel, seq } => {
                        // Receipts only for small channels (the router checks again; this spares it the calls).
                        if tracker.ack(&channel, seq) > 0
                            && hub.small_channel(&channel, parley_router::router::DELIVERY_RECEIPT_MEMBERS)
                        {
                            // Progress: tell the channel (the sender sees "delivered"). Best effort, off the loop.
                            let router = &router;
                            let user = &session.user;
                            pending.push(Box::pin(async move {
                                if let Err(error) = router.mark_delivered(user, &channel, seq).await {
                                    debug!(%error, "delivery receipt not published");
                                }
                                None
                            }));
                        }
                    }
                    ClientFrame::Sync { req_id, channels } => {
                        let mut failed = false;
                        for (channel, have) in channels {
                            match Box::pin(delivery.replay(&mut socket, &mut tracker, &Arc::from(channel.as_str()), have, None)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(error)) => {
                                    metrics.error(error.code());
                                    if socket.feed(text(&router_error(req_id.clone(), error, None))).await.is_err() { failed = true; break; }
                                }
                                Err(()) => { failed = true; break; }
                            }
                        }
                        metrics.resumes.get_or_create(&vec![("outcome", if failed { "failed" } else { "replayed" })]).inc();
                        if failed || socket.send(text(&ServerFrame::Synced { req_id })).await.is_err() { break None; }
                    }
                    ClientFrame::Send { req_id, channel, client_msg_id, text: body, first_attempt } => {
                        if !bucket.try_take(clock.now_ms()) {
                            metrics.limit(Limit::Rate);
                            metrics.error(ErrorCode::RateLimited);
                            let reply = error_frame(req_id, ErrorCode::RateLimited,
                                format!("more than {} sends per second (burst {}); retry later", config.send_rate_per_sec, config.send_burst),
                                Some(client_msg_id));
                            if socket.send(text(&reply)).await.is_err() { break None; }
                            continue;
                        }
                        let router = &router;
                        let user = &session.user;
                        let metrics = &metrics;
                        pending.push(Box::pin(async move {
                            let started = Instant::now();
                            let result = router.send_attempt(user, &channel, &client_msg_id, &body, first_attempt).await;
                            metrics.send_seconds.observe(started.elapsed().as_secs_f64());
                            Some(match result {
                                Ok(outcome) => ServerFrame::SendResult {
                                    req_id, client_msg_id, channel: outcome.channel, id: outcome.placement.id,
                                    seq: outcome.placement.seq, ts: outcome.placement.ts, duplicate: outcome.duplicate,
                                },
                                Err(error) => { metrics.error(error.code()); router_error(req_id, error, Some(client_msg_id)) }
                            })
                        }));
                    }
                    other => {
                        let router = &router;
                        let hub = &hub;
                        let session = &session;
                        let metrics = &metrics;
                        pending.push(Box::pin(async move { Some(request(router, hub, session, metrics, other).await) }));
                    }
                }
            }
            _ = &mut deadline => {
                let now = Instant::now();
                if now >= expiry {
                    break Some((close::TOKEN_EXPIRED, "token expired; reconnect with a fresh token"));
                }
                if now >= last_activity + idle {
                    break Some((close::IDLE_TIMEOUT, "no traffic within the idle timeout"));
                }
                if drain_at.is_some_and(|at| now >= at) {
                    let frame = ServerFrame::Reconnect { reason: "draining".into() };
                    let _ = socket.send(text(&frame)).await;
                    break Some((close::SERVICE_RESTART, "instance draining; reconnect and sync"));
                }
                match tracker.due(clock.now_ms()) {
                    Due::Nothing => {}
                    Due::Retransmit(items) => {
                        metrics.retransmits.inc_by(items.len() as u64);
                        let mut failed = false;
                        for (_, _, frame) in items {
                            if socket.feed(Message::Text(frame)).await.is_err() { failed = true; break; }
                        }
                        if failed || socket.flush().await.is_err() { break None; }
                    }
                    Due::Dead { .. } => {
                        break Some((close::UNACKNOWLEDGED, "messages unacknowledged after every retransmission; resume with sync"));
                    }
                }
                armed = (last_activity + idle).min(expiry);
                if let Some(at) = drain_at {
                    armed = armed.min(at);
                }
                deadline.as_mut().reset(armed);
            }
        }
        // Wake earlier when a retransmission falls due before the armed deadline.
        if let Some(due_ms) = tracker.next_deadline_ms() {
            let due = clock.instant(due_ms);
            if due < armed {
                armed = due;
                deadline.as_mut().reset(armed);
            }
        }
    };
    drop(pending);
    if let Some((code, reason)) = reason {
        let _ = socket.send(close_message(code, reason)).await;
    }
    let _ = socket.close().await;
    hub.unregister(session.conn).await;
    if let Some(presence) = hub.presence() {
        presence.disconnected(session.user.as_str()).await;
    }
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

async fn request(router: &Router, hub: &Hub, session: &Session, metrics: &Metrics, frame: ClientFrame) -> ServerFrame {
    let req_id = frame.req_id().map(str::to_owned);
    let user = &session.user;
    let result: Result<ServerFrame, RouterError> = match frame {
        ClientFrame::History { req_id, channel, before, after, limit } => {
            let query = HistoryQuery { before, after, limit: limit.unwrap_or(50) };
            if limit == Some(0) {
                Err(RouterError::InvalidArgument("limit must be 1-200".into()))
            } else {
                let cached = hub.cached_page(session.conn, &channel, &query);
                let page = match cached {
                    Some(page) => Ok(page),
                    None => router.history(user, &channel, query).await,
                };
                page.map(|page| ServerFrame::History {
                    req_id,
                    channel,
                    messages: page.messages,
                    has_more: page.has_more,
                })
            }
        }
        ClientFrame::CreateChannel { req_id, name, members } => {
            if members.len() > router.config().max_channel_members as usize {
                Err(RouterError::TooManyMembers {
                    channel: format!("g:{name}"),
                    limit: router.config().max_channel_members,
                })
            } else {
                match router.create_channel(user, &name, &members).await {
                    Ok(channel) => {
                        hub.add_channels(session.conn, vec![channel.id.clone()]).await;
                        Ok(ServerFrame::Channel { req_id, channel })
                    }
                    Err(error) => Err(error),
                }
            }
        }
        ClientFrame::Join { req_id, channel } => match router.join(user, &channel).await {
            Ok(channel) => {
                hub.add_channels(session.conn, vec![channel.id.clone()]).await;
                Ok(ServerFrame::Channel { req_id, channel })
            }
            Err(error) => Err(error),
        },
        ClientFrame::Leave { req_id, channel } => {
            router.leave(user, &channel).await.map(|channel| ServerFrame::Channel { req_id, channel })
        }
        ClientFrame::OpenDm { req_id, user: other } => match router.open_dm(user, &other).await {
            Ok(channel) => {
                hub.add_channels(session.conn, vec![channel.id.clone()]).await;
                Ok(ServerFrame::Channel { req_id, channel })
            }
            Err(error) => Err(error),
        },
        ClientFrame::ListChannels { req_id } => {
            router.list_channels(user).await.map(|channels| ServerFrame::Channels { req_id, channels })
        }
        ClientFrame::SubscribePresence { req_id, users, watch } => {
            let valid: Result<Vec<String>, RouterError> =
                users.into_iter().map(|user| UserId::new(user).map(String::from).map_err(RouterError::from)).collect();
            match (valid, hub.presence()) {
                (Err(error), _) => Err(error),
                (Ok(_), None) => Err(RouterError::InvalidArgument("presence is not available".into())),
                (Ok(users), Some(presence)) => match hub.watch(session.conn, &users, watch, MAX_WATCHED) {
                    Err(limit) => {
                        Err(RouterError::InvalidArgument(format!("a connection can watch at most {limit} users")))
                    }
                    Ok(_) => Ok(ServerFrame::PresenceState {
                        req_id,
                        users: if watch { presence.views(&users).await } else { Vec::new() },
                    }),
                },
            }
        }
        ClientFrame::SetPresence { req_id, status } => match (status, hub.presence()) {
            (_, None) => Err(RouterError::InvalidArgument("presence is not available".into())),
            (parley_core::presence::Status::Offline, _) => {
                Err(RouterError::InvalidArgument("set online or away; offline follows from disconnecting".into()))
            }
            (status, Some(presence)) => {
                let view = presence.set_away(user.as_str(), status == parley_core::presence::Status::Away).await;
                Ok(ServerFrame::PresenceState { req_id, users: vec![view] })
            }
        },
        ClientFrame::ChannelPresence { req_id, channel } => {
            match (router.members(user, &channel).await, hub.presence()) {
                (Err(error), _) => Err(error),
                (Ok(_), None) => Err(RouterError::InvalidArgument("presence is not available".into())),
                (Ok(members), Some(presence)) => {
                    let online = presence.online_count(&members).await as u32;
                    let users = if members.len() as u32 <= hub.fanout_threshold() {
                        Some(presence.views(&members).await)
                    } else {
                        None
                    };
                    Ok(ServerFrame::ChannelPresence { req_id, channel, members: members.len() as u32, online, users })
                }
            }
        }
        ClientFrame::Read { req_id, channel, seq } => router
            .mark_read(user, &channel, seq)
            .await
            .map(|seq| ServerFrame::Read { req_id, channel, user: user.to_string(), seq }),
        ClientFrame::Send { .. } | ClientFrame::Ack { .. } | ClientFrame::Ping { .. } | ClientFrame::Sync { .. } => {
            Err(RouterError::InvalidArgument("handled by the connection loop".into()))
        }
    };
    result.unwrap_or_else(|error| {
        metrics.error(error.code());
        router_error(req_id, error, None)
    })
}
