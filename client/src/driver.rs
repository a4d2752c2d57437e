//! The connection task: the only place that touches the socket. It owns the decision structs
//! ([`OrderingBuffer`], [`AckBatcher`], [`Heartbeat`], [`Outbox`], [`Backoff`](crate::Backoff)) and turns their
//! answers into frames, events and reconnects.
//!
//! Life cycle: connect (with backoff) → `ready` → [`sync`] when resuming → live loop → on any loss, fail the
//! requests in flight, keep the unconfirmed sends, and connect again. The loop `select!`s between application
//! commands, the next server frame, forwarding events, and three timers (acknowledgements, paced sends,
//! heartbeat). Every step first decides, collecting frames in `outgoing`, and then writes them in one flush.
//!
//! [`sync`]: parley_core::protocol::ClientFrame::Sync

use crate::ack::AckBatcher;
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::event::{Event, HistoryPage, HistoryQuery, SendReceipt};
use crate::heartbeat::{Beat, Heartbeat, ZOMBIE_INTERVALS};
use crate::ordering::{Offer, OrderingBuffer};
use crate::outbox::Outbox;
use futures_util::{SinkExt, StreamExt};
use parley_core::presence::{PresenceView, Status};
use parley_core::protocol::{ChannelView, ClientFrame, ErrorCode, LimitsView, MessageView, ServerFrame};
use parley_core::ratelimit::TokenBucket;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async_with_config, MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

/// The client's WebSocket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where a send's outcome goes.
pub(crate) type SendWaiter = oneshot::Sender<Result<SendReceipt, ClientError>>;
/// Where a request's answer goes.
pub(crate) type ReplyWaiter = oneshot::Sender<Result<Reply, ClientError>>;

/// The close code of an instance that is draining (1012, service restart): reconnect elsewhere at once.
const SERVICE_RESTART: u16 = 1012;

/// A command from a [`Client`](crate::Client) handle.
pub(crate) enum Command {
    Send(Box<SendCommand>),
    Request(Box<RequestCommand>),
    SetToken(String),
    Close,
}

pub(crate) struct SendCommand {
    pub channel: String,
    pub client_msg_id: String,
    pub text: String,
    pub reply: SendWaiter,
    /// The library generated the key: it was never sent before.
    pub fresh: bool,
}

pub(crate) struct RequestCommand {
    pub request: Request,
    pub reply: ReplyWaiter,
}

/// A request answered by one frame with the same `req_id`.
pub(crate) enum Request {
    History { channel: String, query: HistoryQuery },
    CreateChannel { name: String, members: Vec<String> },
    Join { channel: String },
    Leave { channel: String },
    OpenDm { user: String },
    ListChannels,
    WatchPresence { users: Vec<String>, watch: bool },
    SetAway { away: bool },
}

impl Request {
    fn into_frame(self, req_id: String) -> ClientFrame {
        let req_id = Some(req_id);
        match self {
            Request::History { channel, query } => {
                ClientFrame::History { req_id, channel, before: query.before, after: query.after, limit: query.limit }
            }
            Request::CreateChannel { name, members } => {
                ClientFrame::CreateChannel { req_id, name, members, visibility: None, posting: None }
            }
            Request::Join { channel } => ClientFrame::Join { req_id, channel },
            Request::Leave { channel } => ClientFrame::Leave { req_id, channel },
            Request::OpenDm { user } => ClientFrame::OpenDm { req_id, user },
            Request::ListChannels => ClientFrame::ListChannels { req_id },
            Request::WatchPresence { users, watch } => ClientFrame::SubscribePresence { req_id, users, watch },
            Request::SetAway { away } => ClientFrame::SetPresence { req_id, status: away_status(away) },
        }
    }
}

fn away_status(away: bool) -> Status {
    if away {
        Status::Away
    } else {
        Status::Online
    }
}

/// The answer to a [`Request`].
#[derive(Debug)]
pub(crate) enum Reply {
    History(HistoryPage),
    Channel(ChannelView),
    Channels(Vec<ChannelView>),
    Presence(Vec<PresenceView>),
}

/// What a `req_id` in flight on this connection is for.
enum Pending {
    User(ReplyWaiter),
    GapFill(String),
    Sync,
}

/// The `ready` frame.
pub(crate) struct Ready {
    session_id: String,
    user: String,
    heartbeat_interval_ms: u64,
    limits: LimitsView,
    channels: Vec<ChannelView>,
}

enum End {
    /// The application closed the client.
    Stop,
    /// The connection dropped.
    Lost { code: Option<u16>, reason: String },
}

/// Largest `history` page, used to fill gaps.
const FILL_PAGE: u32 = 200;

/// Opens one connection and waits for `ready`.
pub(crate) async fn open(config: Arc<ClientConfig>, token: String, index: usize) -> Result<(Ws, Ready), ClientError> {
    let endpoint = config.endpoint_at(index)?;
    let url = config.connect_url_at(&token, index)?;
    let settings = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_bytes.max(256))
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes));
    let (mut socket, _) =
        match timeout(config.connect_timeout, connect_async_with_config(url, Some(settings), true)).await {
            Err(_) => return Err(ClientError::Timeout { what: "the websocket handshake" }),
            Ok(Err(error)) => return Err(refusal(endpoint, error)),
            Ok(Ok(connected)) => connected,
        };
    match timeout(config.connect_timeout, read_ready(&mut socket)).await {
        Err(_) => Err(ClientError::Timeout { what: "the ready frame" }),
        Ok(ready) => ready.map(|ready| (socket, ready)),
    }
}

fn refusal(endpoint: String, error: tungstenite::Error) -> ClientError {
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            if status == 401 {
                ClientError::Unauthorized { body }
            } else {
                ClientError::Refused { status, body }
            }
        }
        other => ClientError::Connect { url: endpoint, source: Box::new(other) },
    }
}

async fn read_ready(socket: &mut Ws) -> Result<Ready, ClientError> {
    loop {
        let text = match socket.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Err(ClientError::ClosedBeforeReady {
                    code: frame.as_ref().map(|frame| u16::from(frame.code)),
                    reason: frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
                })
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(ClientError::ClosedBeforeReady { code: None, reason: error.to_string() }),
            None => return Err(ClientError::ClosedBeforeReady { code: None, reason: "connection closed".to_owned() }),
        };
        return match serde_json::from_str::<ServerFrame>(&text) {
            Ok(ServerFrame::Ready { session_id, user, heartbeat_interval_ms, limits, channels, .. }) => {
                Ok(Ready { session_id, user, heartbeat_interval_ms, limits, channels })
            }
            Ok(_) => Err(ClientError::Protocol { detail: "the first frame is not ready".to_owned() }),
            Err(error) => Err(ClientError::Protocol { detail: format!("undecodable first frame: {error}") }),
        };
    }
}

/// The error and its sources on one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Events for the application: a bounded channel plus a local backlog, so the task never blocks on a slow reader
/// (it stops reading the socket instead, once the backlog is full).
struct EventQueue {
    sender: mpsc::Sender<Event>,
    backlog: VecDeque<Event>,
}

impl EventQueue {
    fn emit(&mut self, event: Event) {
        if self.backlog.is_empty() {
            match self.sender.try_send(event) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(event)) => self.backlog.push_back(event),
            }
        } else if !self.sender.is_closed() {
            self.backlog.push_back(event);
        }
    }

    fn forward(backlog: &mut VecDeque<Event>, permit: Result<mpsc::Permit<'_, Event>, mpsc::error::SendError<()>>) {
        match permit {
            Ok(permit) => {
                if let Some(event) = backlog.pop_front() {
                    permit.send(event);
                }
                if backlog.is_empty() && backlog.capacity() > 64 {
                    backlog.shrink_to_fit();
                }
            }
            // Nobody listens any more.
            Err(_) => *backlog = VecDeque::new(),
        }
    }
}

/// The connection task's state.
pub(crate) struct Driver {
    config: Arc<ClientConfig>,
    token: String,
    /// The address of the current or last attempt (see [`ClientConfig::alternate_urls`]).
    endpoint_index: usize,
    commands: mpsc::Receiver<Command>,
    events: EventQueue,
    order: OrderingBuffer,
    outbox: Outbox<SendWaiter>,
    acks: AckBatcher,
    /// Requests made while disconnected, sent on the next connection.
    queued: Vec<RequestCommand>,
    /// Requests in flight on the current connection.
    requests: HashMap<String, Pending>,
    next_request: u64,
    /// Frames decided in this step, written at its end.
    outgoing: Vec<ClientFrame>,
    /// Messages released by the ordering buffer in this step.
    released: Vec<MessageView>,
    connected: bool,
    /// Send `sync` on the next `ready` (set after a loss, or when resuming from saved positions).
    resume: bool,
    /// The `req_id` of the `sync` in flight: gap fills wait for its `synced`.
    syncing: Option<String>,
    bucket: Option<TokenBucket>,
    connected_at: Instant,
    token_interval: Duration,
    send_retry_at: Option<Instant>,
    /// Users whose presence the application watches: watched again on every new connection.
    watched: BTreeSet<String>,
    /// Whether the application said the user is away: said again on every new connection.
    away: bool,
}

impl Driver {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let mut order = OrderingBuffer::new(config.max_buffered_per_channel);
        for (channel, last) in &config.resume_from {
            order.start(channel, *last);
        }
        Self {
            token: config.token.clone(),
            commands,
            events: EventQueue { sender: events, backlog: VecDeque::new() },
            order,
            outbox: Outbox::default(),
            acks: AckBatcher::new(config.ack_delay),
            queued: Vec::new(),
            requests: HashMap::new(),
            next_request: 0,
            outgoing: Vec::new(),
            released: Vec::new(),
            connected: false,
            resume: !config.resume_from.is_empty(),
            syncing: None,
            bucket: None,
            connected_at: Instant::now(),
            endpoint_index: 0,
            token_interval: Duration::from_millis(100),
            send_retry_at: None,
            watched: BTreeSet::new(),
            away: false,
            config,
        }
    }

    /// Runs until the application closes the client or reconnecting gives up. `first` is an already open
    /// connection; without it the first attempt starts at once.
    pub(crate) async fn run(mut self, first: Option<(Ws, Ready)>) {
        let mut connection = first;
        let mut failures = 0u32;
        let mut immediate = true;
        loop {
            let (socket, ready) = match connection.take() {
                Some(open) => open,
                None => match self.reconnect(&mut failures, immediate).await {
                    Ok(open) => open,
                    Err(error) => return self.finish(error),
                },
            };
            failures = 0;
            match self.session(socket, ready).await {
                End::Stop => return self.finish(ClientError::Closed),
                End::Lost { code, reason } => {
                    debug!(?code, %reason, "connection lost");
                    // A draining instance already spread its clients' departures over its window: go to the next
                    // instance at once. Any other loss waits a jittered backoff, so that a crash is no storm.
                    immediate = code == Some(SERVICE_RESTART);
                    self.lost();
                    self.events.emit(Event::Disconnected { code, reason });
                }
            }
        }
    }

    async fn reconnect(&mut self, failures: &mut u32, immediate: bool) -> Result<(Ws, Ready), ClientError> {
        let mut wait = !immediate;
        loop {
            if self.config.backoff.exhausted(*failures) {
                return Err(ClientError::GaveUp { attempts: *failures });
            }
            if wait {
                let delay = self.config.backoff.jittered(*failures);
                self.offline(tokio::time::sleep(delay)).await.ok_or(ClientError::Closed)?;
            }
            wait = true;
            // Every attempt goes to the next address: a killed or draining instance is left behind at once.
            self.endpoint_index = self.endpoint_index.wrapping_add(1);
            // Boxed: the handshake's state is large and only lives during the attempt.
            let attempt = Box::pin(open(self.config.clone(), self.token.clone(), self.endpoint_index));
            match self.offline(attempt).await.ok_or(ClientError::Closed)? {
                Ok(open) => return Ok(open),
                Err(error) => {
                    *failures += 1;
                    debug!(attempt = *failures, error = %describe(&error), "connection attempt failed");
                    self.events.emit(Event::ConnectFailed { attempt: *failures, error: describe(&error) });
                }
            }
        }
    }

    /// Awaits `future` while there is no connection, still taking commands and forwarding events. `None` when
    /// the application closed the client meanwhile.
    async fn offline<F: Future>(&mut self, future: F) -> Option<F::Output> {
        tokio::pin!(future);
        // A local handle, so the permit borrows it rather than `self`.
        let events = self.events.sender.clone();
        loop {
            tokio::select! {
                output = &mut future => return Some(output),
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return None,
                    Some(Command::Send(send)) => self.queue_send(*send),
                    Some(Command::Request(request)) => self.queued.push(*request),
                    Some(Command::SetToken(token)) => self.token = token,
                },
                permit = events.reserve(), if !self.events.backlog.is_empty() => {
                    EventQueue::forward(&mut self.events.backlog, permit);
                }
            }
        }
    }

    fn queue_send(&mut self, send: SendCommand) {
        let SendCommand { channel, client_msg_id, text, reply, fresh } = send;
        self.outbox.push(channel, client_msg_id, text, reply, fresh);
    }

    /// Everything stops: fail what waits, tell the application.
    fn finish(&mut self, error: ClientError) {
        let make = || match &error {
            ClientError::GaveUp { attempts } => ClientError::GaveUp { attempts: *attempts },
            _ => ClientError::Closed,
        };
        for waiter in self.outbox.drain() {
            let _ = waiter.send(Err(make()));
        }
        for request in self.queued.drain(..) {
            let _ = request.reply.send(Err(make()));
        }
        for (_, pending) in self.requests.drain() {
            if let Pending::User(reply) = pending {
                let _ = reply.send(Err(make()));
            }
        }
        let reason = error.to_string();
        self.events.emit(Event::Closed { reason });
        // Hand the backlog over without waiting: the receiver may be gone or slow; drop what does not fit.
        while let Some(event) = self.events.backlog.pop_front() {
            if self.events.sender.try_send(event).is_err() {
                break;
            }
        }
        if !self.events.backlog.is_empty() {
            let sender = self.events.sender.clone();
            let backlog = std::mem::take(&mut self.events.backlog);
            tokio::spawn(async move {
                for event in backlog {
                    if sender.send(event).await.is_err() {
                        break;
                    }
                }
            });
        }
    }

    /// The connection is gone: fail requests in flight, keep sends for the next connection.
    fn lost(&mut self) {
        self.connected = false;
        self.syncing = None;
        self.bucket = None;
        self.send_retry_at = None;
        self.acks.clear();
        self.outbox.reset();
        self.outgoing.clear();
        for (_, pending) in self.requests.drain() {
            if let Pending::User(reply) = pending {
                let _ = reply.send(Err(ClientError::ConnectionLost));
            }
        }
        self.resume = true;
    }

    async fn session(&mut self, mut socket: Ws, ready: Ready) -> End {
        let now = Instant::now();
        let interval =
            self.config.heartbeat_interval.unwrap_or_else(|| Duration::from_millis(ready.heartbeat_interval_ms));
        let mut heartbeat = Heartbeat::new(interval, now, rand::random::<f64>());
        self.begin(ready, now);
        // A local handle, so the permit borrows it rather than `self`.
        let events = self.events.sender.clone();
        let end = loop {
            self.decide_timers(Instant::now());
            if let Err(error) = self.write_outgoing(&mut socket).await {
                break End::Lost { code: None, reason: format!("write failed: {error}") };
            }
            let reading = self.events.backlog.len() < self.config.max_event_backlog;
            let beat_at = heartbeat.deadline();
            let ack_at = self.acks.due_at();
            let send_at = self.send_retry_at;
            tokio::select! {
                command = self.commands.recv() => {
                    if !self.command(command) {
                        break End::Stop;
                    }
                }
                incoming = socket.next(), if reading => {
                    let now = Instant::now();
                    heartbeat.traffic(now);
                    match incoming {
                        Some(Ok(Message::Text(text))) => self.on_text(&text, now),
                        Some(Ok(Message::Close(frame))) => {
                            break End::Lost {
                                code: frame.as_ref().map(|frame| u16::from(frame.code)),
                                reason: frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
                            };
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => break End::Lost { code: None, reason: error.to_string() },
                        None => break End::Lost { code: None, reason: "connection closed".to_owned() },
                    }
                }
                permit = events.reserve(), if !self.events.backlog.is_empty() => {
                    EventQueue::forward(&mut self.events.backlog, permit);
                }
                () = tokio::time::sleep_until(ack_at.unwrap_or(beat_at)), if ack_at.is_some() => {}
                () = tokio::time::sleep_until(send_at.unwrap_or(beat_at)), if send_at.is_some() => {}
                () = tokio::time::sleep_until(beat_at) => {
                    let now = Instant::now();
                    if !reading {
                        // Reads are paused for a slow application: the silence is ours, not the server's.
                        heartbeat.traffic(now);
                    }
                    match heartbeat.poll(now) {
                        Beat::Ping => self.outgoing.push(ClientFrame::Ping { req_id: None }),
                        Beat::Dead => {
                            break End::Lost {
                                code: None,
                                reason: format!("no traffic for {ZOMBIE_INTERVALS} heartbeat intervals"),
                            };
                        }
                        Beat::Idle => {}
                    }
                }
            }
        };
        if matches!(end, End::Stop) {
            let goodbye = CloseFrame { code: CloseCode::Normal, reason: "client closed".into() };
            let _ = timeout(Duration::from_secs(1), socket.close(Some(goodbye))).await;
        }
        end
    }

    /// A fresh connection: reconcile channels, resume, resend what is unconfirmed, send queued requests.
    fn begin(&mut self, ready: Ready, now: Instant) {
        let Ready { session_id, user, heartbeat_interval_ms: _, limits, channels } = ready;
        let joined: HashSet<&str> = channels.iter().filter(|view| view.joined).map(|view| view.id.as_str()).collect();
        self.order.retain(|channel| joined.contains(channel));
        for view in channels.iter().filter(|view| view.joined) {
            self.order.start(&view.id, view.last_seq);
            self.order.note_head(&view.id, view.last_seq);
        }
        self.connected = true;
        self.connected_at = now;
        self.send_retry_at = None;
        if self.resume {
            let req_id = self.next_req_id();
            self.outgoing.push(ClientFrame::Sync { req_id: Some(req_id.clone()), channels: self.order.positions() });
            self.requests.insert(req_id.clone(), Pending::Sync);
            self.syncing = Some(req_id);
            self.resume = false;
        }
        self.bucket = (self.config.pace_sends && limits.send_rate_per_sec > 0)
            .then(|| TokenBucket::new(limits.send_rate_per_sec, limits.send_burst, 0));
        self.token_interval = Duration::from_secs_f64(1.0 / f64::from(limits.send_rate_per_sec.max(1)));
        self.outbox.reset();
        // What the application asked of presence on earlier connections holds on this one too; the answer to the
        // watch (no req_id) is reported as presence events, the state after the reconnect.
        if !self.watched.is_empty() {
            let users = self.watched.iter().cloned().collect();
            self.outgoing.push(ClientFrame::SubscribePresence { req_id: None, users, watch: true });
        }
        if self.away {
            self.outgoing.push(ClientFrame::SetPresence { req_id: None, status: Status::Away });
        }
        for request in std::mem::take(&mut self.queued) {
            self.start_request(request);
        }
        self.events.emit(Event::Connected { session_id, user, channels });
    }

    fn next_req_id(&mut self) -> String {
        self.next_request += 1;
        format!("r{}", self.next_request)
    }

    /// Handles a command on a live connection; `false` to stop.
    fn command(&mut self, command: Option<Command>) -> bool {
        match command {
            None | Some(Command::Close) => return false,
            Some(Command::Send(send)) => self.queue_send(*send),
            Some(Command::Request(request)) => self.start_request(*request),
            Some(Command::SetToken(token)) => self.token = token,
        }
        true
    }

    fn start_request(&mut self, request: RequestCommand) {
        match &request.request {
            Request::WatchPresence { users, watch: true } => self.watched.extend(users.iter().cloned()),
            Request::WatchPresence { users, watch: false } => {
                for user in users {
                    self.watched.remove(user);
                }
            }
            Request::SetAway { away } => self.away = *away,
            _ => {}
        }
        let req_id = self.next_req_id();
        self.outgoing.push(request.request.into_frame(req_id.clone()));
        self.requests.insert(req_id, Pending::User(request.reply));
    }

    /// Timer-driven decisions: paced sends and due acknowledgements.
    fn decide_timers(&mut self, now: Instant) {
        self.pump_sends(now);
        for (channel, seq) in self.acks.take_due(now) {
            self.outgoing.push(ClientFrame::Ack { channel, seq });
        }
    }

    fn pump_sends(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        if let Some(at) = self.send_retry_at {
            if now < at {
                return;
            }
            self.send_retry_at = None;
        }
        let elapsed_ms =
            u64::try_from(now.saturating_duration_since(self.connected_at).as_millis()).unwrap_or(u64::MAX);
        while self.outbox.has_unsent() && self.outbox.in_flight() < self.config.max_in_flight_sends.max(1) {
            if let Some(bucket) = self.bucket.as_mut() {
                if !bucket.try_take(elapsed_ms) {
                    self.send_retry_at = Some(now + self.token_interval);
                    break;
                }
            }
            match self.outbox.next_unsent() {
                Some(frame) => self.outgoing.push(frame),
                None => break,
            }
        }
    }

    async fn write_outgoing(&mut self, socket: &mut Ws) -> Result<(), tungstenite::Error> {
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let mut frames = std::mem::take(&mut self.outgoing);
        for frame in frames.drain(..) {
            match serde_json::to_string(&frame) {
                Ok(json) => socket.feed(Message::Text(json.into())).await?,
                Err(error) => warn!(%error, "cannot encode a frame"),
            }
        }
        self.outgoing = frames;
        socket.flush().await
    }

    fn on_text(&mut self, text: &str, now: Instant) {
        match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => self.on_frame(frame, now),
            Err(error) => warn!(%error, "ignoring an undecodable frame"),
        }
    }

    fn on_frame(&mut self, frame: ServerFrame, now: Instant) {
        match frame {
            ServerFrame::Message(message) => self.on_message(message, now),
            ServerFrame::SendResult { client_msg_id, channel, id, seq, ts, duplicate, .. } => {
                let receipt = SendReceipt { channel, client_msg_id, id, seq, ts, duplicate };
                for waiter in self.outbox.complete(&receipt.client_msg_id) {
                    let _ = waiter.send(Ok(receipt.clone()));
                }
            }
            ServerFrame::History { req_id, channel, messages, has_more } => {
                match req_id.and_then(|req_id| self.requests.remove(&req_id)) {
                    Some(Pending::User(reply)) => {
                        let _ = reply.send(Ok(Reply::History(HistoryPage { channel, messages, has_more })));
                    }
                    Some(Pending::GapFill(filling)) => self.on_gap_fill(filling, messages, now),
                    Some(Pending::Sync) | None => {}
                }
            }
            ServerFrame::Channel { req_id, channel } => {
                self.track(&channel);
                match req_id {
                    Some(req_id) => self.answer(&req_id, Ok(Reply::Channel(channel))),
                    None => self.events.emit(Event::Channel(channel)),
                }
            }
            ServerFrame::Channels { req_id, channels } => {
                for view in &channels {
                    self.track(view);
                }
                if let Some(req_id) = req_id {
                    self.answer(&req_id, Ok(Reply::Channels(channels)));
                }
            }
            ServerFrame::Member { channel, user, joined } => self.events.emit(Event::Member { channel, user, joined }),
            ServerFrame::Presence { user, status, last_seen } => {
                self.events.emit(Event::Presence(PresenceView { user, status, last_seen }))
            }
            ServerFrame::PresenceState { req_id, users } => match req_id {
                Some(req_id) => self.answer(&req_id, Ok(Reply::Presence(users))),
                None => {
                    for view in users {
                        self.events.emit(Event::Presence(view));
                    }
                }
            },
            ServerFrame::ResyncRequired { channel, from, first_available } => {
                if self.order.skip_to(&channel, first_available.saturating_sub(1), &mut self.released) {
                    self.events.emit(Event::ResyncRequired { channel: channel.clone(), from, first_available });
                }
                self.release();
                self.acknowledge(&channel, now);
            }
            ServerFrame::Synced { req_id } => {
                if req_id.is_some() && req_id == self.syncing {
                    if let Some(req_id) = self.syncing.take() {
                        self.requests.remove(&req_id);
                    }
                    self.events.emit(Event::Resynced);
                    for channel in self.order.gaps() {
                        self.fill(&channel);
                    }
                }
            }
            ServerFrame::Error { req_id, code, message, client_msg_id } => {
                self.on_error(req_id, code, message, client_msg_id, now)
            }
            ServerFrame::Pong { .. } => {}
            ServerFrame::Ready { .. } => warn!("ignoring a second ready frame"),
            // Frames of later protocol additions this client does not use (e.g. read receipts).
            #[allow(unreachable_patterns)]
            _ => debug!("ignoring a frame this client does not use"),
        }
    }

    fn answer(&mut self, req_id: &str, reply: Result<Reply, ClientError>) {
        match self.requests.remove(req_id) {
            Some(Pending::User(waiter)) => {
                let _ = waiter.send(reply);
            }
            Some(Pending::GapFill(channel)) => {
                debug!(%channel, "gap fill failed");
                self.order.stall(&channel);
            }
            Some(Pending::Sync) => {
                // `sync` reports per-channel errors with its req_id, then still answers `synced`.
                self.requests.insert(req_id.to_owned(), Pending::Sync);
            }
            None => {}
        }
    }

    fn on_error(
        &mut self,
        req_id: Option<String>,
        code: ErrorCode,
        message: String,
        client_msg_id: Option<String>,
        now: Instant,
    ) {
        if let Some(client_msg_id) = client_msg_id {
            if code == ErrorCode::RateLimited && self.outbox.retry(&client_msg_id) {
                // Idempotent: send it again once the server's bucket has refilled a little.
                self.send_retry_at = Some(now + self.token_interval.max(Duration::from_millis(50)));
                return;
            }
            let waiters = self.outbox.complete(&client_msg_id);
            if !waiters.is_empty() {
                for waiter in waiters {
                    let _ = waiter.send(Err(ClientError::Server { code, message: message.clone() }));
                }
                return;
            }
        }
        match req_id {
            Some(req_id) => {
                if matches!(self.requests.get(&req_id), Some(Pending::Sync)) {
                    warn!(code = code.as_str(), %message, "sync reported an error");
                }
                self.answer(&req_id, Err(ClientError::Server { code, message }));
            }
            None => warn!(code = code.as_str(), %message, "server error"),
        }
    }

    fn on_message(&mut self, message: MessageView, now: Instant) {
        let channel = message.channel.clone();
        let offer = self.order.offer(message, &mut self.released);
        self.release();
        if matches!(offer, Offer::Buffered | Offer::Dropped) {
            self.fill(&channel);
        }
        // Duplicates are acknowledged again: a retransmission means the earlier ACK was late or lost.
        self.acknowledge(&channel, now);
    }

    fn on_gap_fill(&mut self, channel: String, messages: Vec<MessageView>, now: Instant) {
        let Some(before) = self.order.last(&channel) else { return };
        if let Some(first) = messages.first().map(|message| message.seq) {
            if first > before + 1 && self.order.skip_to(&channel, first - 1, &mut self.released) {
                // History no longer has the missing range.
                self.events.emit(Event::ResyncRequired {
                    channel: channel.clone(),
                    from: before + 1,
                    first_available: first,
                });
            }
        }
        for message in messages {
            if message.channel == channel {
                self.order.offer(message, &mut self.released);
            }
        }
        self.release();
        if self.order.last(&channel) == Some(before) {
            self.order.stall(&channel);
        }
        self.acknowledge(&channel, now);
        self.fill(&channel);
    }

    /// Hands the messages released by the ordering buffer to the application.
    fn release(&mut self) {
        for message in self.released.drain(..) {
            self.events.emit(Event::Message(message));
        }
    }

    fn acknowledge(&mut self, channel: &str, now: Instant) {
        if let Some(last) = self.order.last(channel).filter(|last| *last > 0) {
            self.acks.record(channel, last, now);
        }
    }

    /// Asks `history` for the gap of `channel`, unless a resume or another fill is under way.
    fn fill(&mut self, channel: &str) {
        if !self.connected || self.syncing.is_some() {
            return;
        }
        let Some(gap) = self.order.gap(channel) else { return };
        if self.requests.values().any(|pending| matches!(pending, Pending::GapFill(filling) if filling == channel)) {
            return;
        }
        let req_id = self.next_req_id();
        self.outgoing.push(ClientFrame::History {
            req_id: Some(req_id.clone()),
            channel: channel.to_owned(),
            before: None,
            after: Some(gap.after),
            limit: Some(FILL_PAGE),
        });
        self.requests.insert(req_id, Pending::GapFill(channel.to_owned()));
    }

    /// Follows a membership change: new channels start at their `last_seq`, left ones are forgotten.
    fn track(&mut self, view: &ChannelView) {
        if view.joined {
            self.order.start(&view.id, view.last_seq);
        } else {
            self.order.forget(&view.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thousands of clients run in one process: the per-client task (allocated once by `tokio::spawn`) and the
    /// values queued per client must stay small.
    #[test]
    fn connection_task_state_stays_small() {
        let (_commands, receiver) = mpsc::channel(1);
        let (sender, _events) = mpsc::channel(1);
        let driver = Driver::new(Arc::new(ClientConfig::new("ws://127.0.0.1:1", "t")), receiver, sender);
        let task = driver.run(None);
        assert!(std::mem::size_of_val(&task) <= 4_096, "task is {} bytes", std::mem::size_of_val(&task));
        assert!(std::mem::size_of::<Command>() <= 32, "command is {} bytes", std::mem::size_of::<Command>());
        assert!(std::mem::size_of::<Event>() <= 128, "event is {} bytes", std::mem::size_of::<Event>());
    }
}
