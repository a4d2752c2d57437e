//! The connection loop over in-memory channels on paused time: the socket is a pair of channels, the router a
//! small in-test service, and every timer (idle, token expiry, retransmission) runs on tokio's paused clock.

use super::*;
use crate::hub::Directive;
use crate::metrics::Metrics;
use async_trait::async_trait;
use futures::channel::mpsc as socket_channel;
use parley_api::{
    Answer, BackendError, Call, HistoryPage, Limits, RouterError, RouterService, RouterStats, SendOutcome,
};
use parley_bus::pubsub::Subscription;
use parley_core::protocol::{ClientFrame, MessageView};
use parley_core::sequencer::Placement;
use parley_core::ChannelKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::task::JoinHandle;

const ROOM: &str = "g:room";

/// A bus that accepts every subscription (publications are fed to the hub directly).
struct NoBus;

#[async_trait]
impl Subscription for NoBus {
    async fn subscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
        Ok(())
    }

    async fn unsubscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A router with one channel, [`ROOM`], that places every send at the next sequence.
#[derive(Debug, Default)]
struct TestRouter {
    /// Fail `list_channels`, as an unreachable store would.
    unavailable: bool,
    sends: AtomicU64,
    /// [`ROOM`]'s history: messages `1..=stored` (as [`view`] makes them).
    stored: u64,
    /// When set, each history read passes through it (the test holds the read in flight).
    history_gate: Option<Arc<Gate>>,
    /// Panic on a history read, as a bug in the loop's task would.
    panic_on_history: bool,
    /// The sequences of the delivery receipts published.
    receipts: Arc<std::sync::Mutex<Vec<u64>>>,
    stats: Arc<RouterStats>,
}

impl TestRouter {
    /// A page of [`ROOM`]'s history, as the store answers it.
    fn page(&self, before: Option<u64>, after: Option<u64>, limit: u32) -> HistoryPage {
        let upper = before.unwrap_or(u64::MAX).min(self.stored.saturating_add(1));
        let seqs: Vec<u64> = match after {
            Some(after) => (after.saturating_add(1)..upper).take(limit as usize + 1).collect(),
            None => {
                let mut newest: Vec<u64> = (1..upper).rev().take(limit as usize + 1).collect();
                newest.reverse();
                newest
            }
        };
        let has_more = seqs.len() > limit as usize;
        let seqs = if after.is_some() {
            &seqs[..seqs.len().min(limit as usize)]
        } else {
            &seqs[seqs.len().saturating_sub(limit as usize)..]
        };
        HistoryPage { messages: seqs.iter().map(|seq| view(*seq)).collect(), has_more }
    }
}

fn room_view() -> ChannelView {
    ChannelView {
        id: ROOM.into(),
        kind: ChannelKind::Group,
        name: "room".into(),
        members: 2,
        last_seq: 0,
        joined: true,
        read_seq: 0,
        unread: 0,
        visibility: Default::default(),
        posting: Default::default(),
        role: None,
    }
}

#[async_trait]
impl RouterService for TestRouter {
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        match call {
            Call::ListChannels { .. } if self.unavailable => {
                Err(RouterError::Unavailable(BackendError::Unavailable("the test store is down".into())))
            }
            Call::ListChannels { .. } => Ok(Answer::Channels(vec![room_view()])),
            Call::Send { channel, .. } => {
                let seq = self.sends.fetch_add(1, Ordering::SeqCst) + 1;
                let placement = Placement { id: 1_000 + seq, seq, ts: 0 };
                Ok(Answer::Sent(SendOutcome { channel, placement, duplicate: false }))
            }
            Call::History { .. } if self.panic_on_history => panic!("a bug in a request"),
            Call::History { before, after, limit, .. } => {
                if let Some(gate) = &self.history_gate {
                    gate.entered.add_permits(1);
                    gate.release.acquire().await.expect("the gate stays open").forget();
                }
                Ok(Answer::Page(self.page(before, after, limit)))
            }
            Call::FirstRetainedSeq { .. } => Ok(Answer::Seq(1)),
            Call::MarkDelivered { seq, .. } => {
                self.receipts.lock().expect("receipts").push(seq);
                Ok(Answer::Done)
            }
            other => Err(RouterError::InvalidArgument(format!("the test router does not answer {}", other.op()))),
        }
    }

    fn limits(&self) -> Limits {
        Limits::default()
    }

    fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }
}

/// A read error of the test socket: what a WebSocket's would be classified as.
#[derive(Debug)]
struct ReadError(ReadFailure);

impl std::fmt::Display for ReadError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "read failed: {:?}", self.0)
    }
}

fn classify(error: &ReadError) -> ReadFailure {
    error.0
}

/// The server's side of an in-memory WebSocket: client messages come from an unbounded channel, server messages
/// go into a bounded one (a client that stops reading fills it, and then sending waits, like a full TCP window).
struct TestSocket {
    from_client: socket_channel::UnboundedReceiver<Result<Message, ReadError>>,
    to_client: socket_channel::Sender<Message>,
}

impl Stream for TestSocket {
    type Item = Result<Message, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.from_client).poll_next(context)
    }
}

impl Sink<Message> for TestSocket {
    type Error = socket_channel::SendError;

    fn poll_ready(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.to_client).poll_ready(context)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.to_client).start_send(message)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.to_client).poll_flush(context)
    }

    fn poll_close(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.to_client).poll_close(context)
    }
}

/// What the client saw next.
#[derive(Debug, PartialEq)]
enum Seen {
    Frame(ServerFrame),
    Close(u16),
    /// The server closed the socket without a close frame.
    Ended,
}

/// The client's side of the socket.
struct TestClient {
    to_server: socket_channel::UnboundedSender<Result<Message, ReadError>>,
    from_server: socket_channel::Receiver<Message>,
}

impl TestClient {
    fn send(&self, frame: &ClientFrame) {
        let json = serde_json::to_string(frame).expect("encodable");
        self.to_server.unbounded_send(Ok(Message::Text(Utf8Bytes::from(json)))).expect("server reading");
    }

    fn fail_read(&self, failure: ReadFailure) {
        self.to_server.unbounded_send(Err(ReadError(failure))).expect("server reading");
    }

    /// The next thing the server sent. Paused time makes the hour pass at once if the server never sends.
    async fn next(&mut self) -> Seen {
        let received = tokio::time::timeout(Duration::from_secs(3_600), self.from_server.next())
            .await
            .expect("the server sends or closes within an hour");
        match received {
            None => Seen::Ended,
            Some(Message::Text(text)) => Seen::Frame(serde_json::from_str(text.as_str()).expect("a server frame")),
            Some(Message::Close(frame)) => Seen::Close(frame.map(|frame| frame.code).unwrap_or_default()),
            Some(other) => panic!("unexpected message {other:?}"),
        }
    }

    async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Seen::Frame(frame) => frame,
            other => panic!("expected a frame, saw {other:?}"),
        }
    }

    /// The close code; the client answers the close, as WebSocket clients do, after which the socket ends.
    async fn close(&mut self) -> u16 {
        let code = match self.next().await {
            Seen::Close(code) => code,
            other => panic!("expected a close, saw {other:?}"),
        };
        // The server may have stopped reading.
        let _ = self.to_server.unbounded_send(Ok(Message::Close(None)));
        assert_eq!(self.next().await, Seen::Ended, "nothing after the close");
        code
    }
}

/// One connection served by a spawned [`serve`], with the handles a test drives it by.
struct Harness {
    client: TestClient,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    drain: watch::Sender<Option<DrainPlan>>,
    task: JoinHandle<()>,
}

impl Harness {
    /// Queues message `seq` of [`ROOM`] to the room's local members, as the hub does for a publication. Returns
    /// how many connections took it.
    fn publish(&self, seq: u64) -> usize {
        self.hub.deliver(ROOM, &Utf8Bytes::from(message(seq).to_json()), Some(seq))
    }

    /// Waits for the connection to end, and checks it left the hub and presence.
    async fn ended(mut self) {
        (&mut self.task).await.expect("the connection task ends cleanly");
        assert_eq!(self.hub.connection_count(), 0, "unregistered from the hub");
        assert_eq!(self.online().await, 0, "alice went offline");
        drop((self.shutdown, self.drain));
    }

    /// How many of `alice`'s connections presence counts (0 or 1 here).
    async fn online(&self) -> usize {
        let presence = self.hub.presence().expect("presence attached");
        presence.online_count(&["alice".to_owned()]).await
    }
}

/// Message `seq` of [`ROOM`].
fn view(seq: u64) -> MessageView {
    MessageView {
        channel: ROOM.into(),
        seq,
        id: 1_000 + seq,
        sender: "bob".into(),
        text: format!("m{seq}"),
        ts: 0,
        client_msg_id: format!("c{seq}"),
    }
}

fn message(seq: u64) -> ServerFrame {
    ServerFrame::Message(view(seq))
}

fn unix_secs() -> u64 {
    timers::unix_ms() / 1_000
}

/// Quiet timers: an hour of idle timeout, token lifetime and ACK timeout, unless a test shortens one.
fn quiet() -> GatewayConfig {
    GatewayConfig { idle_timeout_ms: 3_600_000, ack_timeout_ms: 3_600_000, ..GatewayConfig::default() }
}

/// Starts a connection for `alice` whose token expires `expires_in` from now, over a socket that holds
/// `socket_buffer` unread messages.
fn start(config: GatewayConfig, router: TestRouter, expires_in: Duration, socket_buffer: usize) -> Harness {
    start_on(new_hub(&config), config, router, expires_in, socket_buffer, None)
}

/// A hub on a bus that is never called, with its metrics.
fn new_hub(config: &GatewayConfig) -> (Arc<Hub>, Arc<Metrics>) {
    let metrics = Metrics::new();
    (Hub::new(Arc::new(NoBus), metrics.clone(), config.fanout_threshold), metrics)
}

/// Like [`start`], on a hub of [`new_hub`], with a token issued at `issued_at` (its `iat`).
fn start_on(
    (hub, metrics): (Arc<Hub>, Arc<Metrics>),
    config: GatewayConfig,
    router: TestRouter,
    expires_in: Duration,
    socket_buffer: usize,
    issued_at: Option<u64>,
) -> Harness {
    crate::presence::Presence::start(&hub);
    let (shutdown, shutdown_signal) = watch::channel(false);
    let (drain, drain_signal) = watch::channel(None);
    let context = ConnectionContext {
        router: Router::new(router),
        hub: hub.clone(),
        metrics: metrics.clone(),
        config: Arc::new(config),
        shutdown: shutdown_signal,
        drain: drain_signal,
    };
    let session = alice(expires_in, issued_at);
    let (to_server, from_client) = socket_channel::unbounded();
    // A bounded channel holds its buffer plus one message per sender.
    let (to_client, from_server) = socket_channel::channel(socket_buffer.saturating_sub(1));
    let socket = TestSocket { from_client, to_client };
    // With the linger of a WebSocket over TCP, on the paused clock.
    let task = tokio::spawn(serve(socket, context, session, Transport::websocket(classify)));
    Harness { client: TestClient { to_server, from_server }, hub, metrics, shutdown, drain, task }
}

/// Connection 1 of user `alice`, with a token expiring in `expires_in`, issued at `issued_at` (its `iat`).
fn alice(expires_in: Duration, issued_at: Option<u64>) -> Session {
    Session {
        conn: 1,
        session_id: "s-test".into(),
        user: UserId::new("alice").expect("user"),
        expires_at: unix_secs() + expires_in.as_secs(),
        issued_at,
    }
}

/// Starts a connection and reads its `ready`.
async fn ready(config: GatewayConfig) -> Harness {
    let mut harness = start(config, TestRouter::default(), Duration::from_secs(3_600), 64);
    match harness.client.frame().await {
        ServerFrame::Ready { user, channels, .. } => {
            assert_eq!(user, "alice");
            assert_eq!(channels, vec![room_view()]);
        }
        other => panic!("expected ready, saw {other:?}"),
    }
    harness
}

fn send(req_id: &str, client_msg_id: &str) -> ClientFrame {
    ClientFrame::Send {
        req_id: Some(req_id.into()),
        channel: ROOM.into(),
        client_msg_id: client_msg_id.into(),
        text: "hello".into(),
        first_attempt: true,
    }
}

#[tokio::test(start_paused = true)]
async fn ready_then_sends_are_answered_and_acknowledged_messages_stay_delivered() {
    let config = GatewayConfig { ack_timeout_ms: 100, ..quiet() };
    let mut harness = ready(config).await;
    harness.client.send(&ClientFrame::Ping { req_id: Some("p1".into()) });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { req_id: Some(id), .. } if id == "p1"));
    harness.client.send(&send("r1", "c1"));
    match harness.client.frame().await {
        ServerFrame::SendResult { req_id, client_msg_id, channel, seq, duplicate, .. } => {
            assert_eq!((req_id.as_deref(), client_msg_id.as_str(), channel.as_str()), (Some("r1"), "c1", ROOM));
            assert_eq!((seq, duplicate), (1, false));
        }
        other => panic!("expected send_result, saw {other:?}"),
    }

    // A published message arrives once, its duplicate is dropped, and once acknowledged it is not sent again.
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.client.frame().await, message(1));
    harness.client.send(&ClientFrame::Ack { channel: ROOM.into(), seq: 1 });
    let quiet_period = tokio::time::timeout(Duration::from_secs(1), harness.client.next()).await;
    assert!(quiet_period.is_err(), "no retransmission or duplicate: {quiet_period:?}");

    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.close().await, close::GOING_AWAY);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_the_idle_timeout_and_traffic_postpones_it() {
    let idle = Duration::from_millis(1_000);
    let config = GatewayConfig { idle_timeout_ms: 1_000, ..quiet() };
    let mut harness = ready(config).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    harness.client.send(&ClientFrame::Ping { req_id: None });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }));
    let last_traffic = Instant::now();
    assert_eq!(harness.client.close().await, close::IDLE_TIMEOUT);
    let silent = last_traffic.elapsed();
    assert!(silent >= idle && silent < idle + Duration::from_millis(10), "closed {silent:?} after the last ping");
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn an_unacknowledged_message_is_retransmitted_then_the_connection_closes_with_4010() {
    let config = GatewayConfig { ack_timeout_ms: 100, max_retransmits: 2, ..quiet() };
    let mut harness = ready(config).await;
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.client.frame().await, message(1));
    let sent = Instant::now();
    // Each retransmission comes one ACK timeout after the previous send.
    for attempt in 1..=2u32 {
        assert_eq!(harness.client.frame().await, message(1), "retransmission {attempt}");
        assert_eq!(sent.elapsed(), Duration::from_millis(100) * attempt);
    }
    assert_eq!(harness.client.close().await, close::UNACKNOWLEDGED);
    assert_eq!(sent.elapsed(), Duration::from_millis(300), "dead one ACK timeout after the last retransmission");
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_the_connection_with_4001() {
    let mut harness = start(quiet(), TestRouter::default(), Duration::from_secs(2), 64);
    let connected = Instant::now();
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    assert_eq!(harness.client.close().await, close::TOKEN_EXPIRED);
    // The expiry has a resolution of a second (the token's `exp`).
    let lifetime = connected.elapsed();
    assert!(lifetime > Duration::from_secs(1) && lifetime <= Duration::from_secs(2), "closed after {lifetime:?}");
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_disconnect_closes_with_4003_after_the_frames_queued_before_it() {
    let mut harness = ready(quiet()).await;
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.hub.direct_user("alice", Directive::Close(close::DISCONNECTED, "disconnected")), 1);
    assert_eq!(harness.publish(2), 1, "queued behind the directive");
    assert_eq!(harness.client.frame().await, message(1), "what was queued before the directive goes out first");
    assert_eq!(harness.client.close().await, close::DISCONNECTED);
    assert_eq!(harness.hub.direct_user("bob", Directive::Close(close::DISCONNECTED, "disconnected")), 0);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_revocation_closes_with_4004_only_a_connection_whose_token_it_revokes() {
    let issued = unix_secs() - 60;
    let mut harness =
        start_on(new_hub(&quiet()), quiet(), TestRouter::default(), Duration::from_secs(3_600), 64, Some(issued));
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    // Tokens issued before `issued` are revoked: not this one, which stays open.
    assert_eq!(harness.hub.revoked("alice", issued), 1);
    harness.client.send(&ClientFrame::Ping { req_id: Some("p".into()) });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }), "still open");
    assert_eq!(harness.hub.revoked("alice", issued + 1), 1);
    assert_eq!(harness.client.close().await, close::TOKEN_REVOKED);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_registering_after_a_revocation_it_was_admitted_before_is_closed_with_4004() {
    let (hub, metrics) = new_hub(&quiet());
    // Heard after the admission read the store, before the connection registered: no connection got it.
    let now = unix_secs();
    assert_eq!(hub.revoked("alice", now), 0);
    assert_eq!(hub.recent_revocation("alice"), Some(now));
    let mut harness =
        start_on((hub.clone(), metrics.clone()), quiet(), TestRouter::default(), Duration::from_secs(3_600), 64, None);
    assert_eq!(harness.client.close().await, close::TOKEN_REVOKED, "no iat: revoked by any revocation");
    harness.ended().await;
    let mut later =
        start_on((hub, metrics), quiet(), TestRouter::default(), Duration::from_secs(3_600), 64, Some(now + 1));
    assert!(matches!(later.client.frame().await, ServerFrame::Ready { .. }), "a token issued after it connects");
}

#[tokio::test(start_paused = true)]
async fn a_client_cut_off_as_a_slow_consumer_is_closed_with_4008_without_draining_its_queue() {
    let config = GatewayConfig { outbound_queue: 4, ..quiet() };
    let mut harness = start(config, TestRouter::default(), Duration::from_secs(3_600), 2);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    // The client reads nothing more: the socket fills, the loop waits on it, and the hub's queue fills behind.
    let mut published = 0;
    loop {
        tokio::task::yield_now().await;
        if harness.publish(published + 1) == 0 {
            break;
        }
        published += 1;
        assert!(published < 100, "the queue never overflowed");
    }
    // The socket took the first frames, the loop waits to hand it the next, and the queue holds 4 more.
    assert!(published > 4, "the loop blocked on the socket before the queue filled, saw {published}");
    assert_eq!(harness.hub.connection_count(), 1, "cut off, but the connection is still writing a frame");
    // Once the client reads again (well within the write timeout): what the socket held and the frame being
    // written, in order, then the close; not the rest of the queue, which the client fills with `sync`.
    let mut seen = Vec::new();
    let code = loop {
        match harness.client.next().await {
            Seen::Frame(frame) => seen.push(frame),
            Seen::Close(code) => break code,
            Seen::Ended => panic!("ended without a close after {seen:?}"),
        }
    };
    assert_eq!(code, close::SLOW_CONSUMER);
    assert_eq!(seen, (1..=seen.len() as u64).map(message).collect::<Vec<_>>());
    assert!((seen.len() as u64) < published, "the queue was drained: {} of {published} frames", seen.len());
    assert_eq!(harness.client.next().await, Seen::Ended);
    assert!(harness.metrics.encode().contains(r#"parley_gateway_limit_hits_total{limit="outbound_queue"} 1"#));
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_nothing_is_gone_within_the_write_timeout() {
    // Default limits: the write timeout is 10 s.
    let mut harness = start(quiet(), TestRouter::default(), Duration::from_secs(3_600), 2);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    assert_eq!(harness.online().await, 1);
    // The client reads nothing more: the socket takes two frames and the loop's third write waits on it, while
    // the queue (512 frames) is far from full, so the hub never cuts the connection off.
    for seq in 1..=5 {
        assert_eq!(harness.publish(seq), 1);
        tokio::task::yield_now().await;
    }
    let stalled = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(11), &mut harness.task).await;
    assert!(
        matches!(ended, Ok(Ok(()))),
        "still connected {:?} after its socket stopped taking frames",
        stalled.elapsed()
    );
    let gone = stalled.elapsed();
    assert!(gone >= Duration::from_secs(10) && gone < Duration::from_millis(10_100), "gone after {gone:?}");
    assert_eq!(harness.hub.connection_count(), 0, "unregistered from the hub");
    assert_eq!(harness.online().await, 0, "offline");
    assert!(harness.metrics.encode().contains(r#"parley_gateway_limit_hits_total{limit="write_timeout"} 1"#));
    // What the socket held reaches the client, then the end: the close could not be written, and nothing waited
    // for it.
    assert_eq!(harness.client.frame().await, message(1));
    assert_eq!(harness.client.frame().await, message(2));
    assert_eq!(harness.client.next().await, Seen::Ended);
}

#[tokio::test(start_paused = true)]
async fn a_drain_asks_the_client_to_reconnect_and_closes_with_1012() {
    let mut harness = ready(quiet()).await;
    let plan = DrainPlan { window: Duration::from_secs(10), deadline: Duration::from_secs(20) };
    harness.drain.send(Some(plan)).expect("connection watching");
    let started = Instant::now();
    assert!(matches!(harness.client.frame().await, ServerFrame::Reconnect { .. }));
    assert_eq!(harness.client.close().await, close::SERVICE_RESTART);
    assert!(started.elapsed() <= plan.departure_at(1.0), "left within the departure part of the window");
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_broken_frame_closes_with_its_code_and_a_failed_read_ends_without_a_close() {
    let cases = [
        (ReadFailure::TooBig, close::TOO_BIG),
        (ReadFailure::Protocol, close::PROTOCOL_ERROR),
        (ReadFailure::InvalidUtf8, close::INVALID_PAYLOAD),
    ];
    for (failure, code) in cases {
        let mut harness = ready(quiet()).await;
        harness.client.fail_read(failure);
        let failed = Instant::now();
        assert_eq!(harness.client.close().await, code, "{failure:?}");
        // The stream reads nothing more: the socket stays open for the linger, for the client to read the close.
        assert_eq!(failed.elapsed(), Linger::DEFAULT.time, "{failure:?}");
        harness.ended().await;
    }

    let mut harness = ready(quiet()).await;
    harness.client.fail_read(ReadFailure::Gone);
    assert_eq!(harness.client.next().await, Seen::Ended);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn after_its_close_the_server_reads_until_the_clients_close_within_the_linger() {
    // The client answers the close at once: the socket ends then.
    let mut harness = ready(quiet()).await;
    harness.client.send(&ClientFrame::Ping { req_id: None });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }));
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.next().await, Seen::Close(close::GOING_AWAY));
    let closed = Instant::now();
    harness.client.send(&ClientFrame::Ping { req_id: None });
    harness.client.to_server.unbounded_send(Ok(close_message(1000, "bye"))).expect("server reading");
    assert_eq!(harness.client.next().await, Seen::Ended);
    assert_eq!(closed.elapsed(), Duration::ZERO, "no linger past the client's close");
    harness.ended().await;

    // A client that never closes is let go at the end of the linger, and one that keeps sending at its byte bound.
    let mut harness = ready(quiet()).await;
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.next().await, Seen::Close(close::GOING_AWAY));
    let closed = Instant::now();
    assert_eq!(harness.client.next().await, Seen::Ended);
    assert_eq!(closed.elapsed(), Linger::DEFAULT.time);
    harness.ended().await;
    let mut harness = ready(quiet()).await;
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.next().await, Seen::Close(close::GOING_AWAY));
    let closed = Instant::now();
    let chunk = Utf8Bytes::from("x".repeat(64 * 1024));
    for _ in 0..=Linger::DEFAULT.bytes / chunk.len() {
        harness.client.to_server.unbounded_send(Ok(Message::Text(chunk.clone()))).expect("server reading");
    }
    assert_eq!(harness.client.next().await, Seen::Ended);
    assert_eq!(closed.elapsed(), Duration::ZERO, "the byte bound ends the linger before its time");
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_handshake_without_storage_closes_with_1011_before_ready() {
    let router = TestRouter { unavailable: true, ..TestRouter::default() };
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert_eq!(harness.client.close().await, close::INTERNAL_ERROR);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_sync_at_the_end_of_the_sequence_space_is_answered_and_the_connection_lives_on() {
    let router = TestRouter { stored: 3, ..TestRouter::default() };
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    for have in [u64::MAX, u64::MAX - 1] {
        let channels = [(ROOM.to_owned(), have), ("g:other".to_owned(), have)].into_iter().collect();
        harness.client.send(&ClientFrame::Sync { req_id: Some("s".into()), channels });
        assert_eq!(harness.client.frame().await, ServerFrame::Synced { req_id: Some("s".into()) }, "from {have}");
    }
    harness.client.send(&ClientFrame::Ack { channel: ROOM.into(), seq: u64::MAX });
    harness.client.send(&ClientFrame::Ping { req_id: Some("p".into()) });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }));
    // Live messages still go out.
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.client.frame().await, message(1));
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.close().await, close::GOING_AWAY);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_connection_task_still_closes_unregisters_and_goes_offline() {
    let router = TestRouter { panic_on_history: true, ..TestRouter::default() };
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    assert_eq!((harness.hub.connection_count(), harness.online().await), (1, 1));
    let history =
        ClientFrame::History { req_id: Some("h".into()), channel: ROOM.into(), before: None, after: None, limit: None };
    harness.client.send(&history);
    assert_eq!(harness.client.close().await, close::INTERNAL_ERROR);
    harness.ended().await;
}

/// Holds a history read in flight: the router says when the read started, and answers when the test lets it.
#[derive(Debug)]
struct Gate {
    entered: tokio::sync::Semaphore,
    release: tokio::sync::Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self { entered: tokio::sync::Semaphore::new(0), release: tokio::sync::Semaphore::new(0) }
    }
}

#[tokio::test(start_paused = true)]
async fn a_live_message_and_a_sync_replay_of_the_same_range_send_each_sequence_once() {
    let gate = Arc::new(Gate::default());
    let router = TestRouter { stored: 3, history_gate: Some(gate.clone()), ..TestRouter::default() };
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    // Message 1 goes out live before the client's `sync` is read.
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.client.frame().await, message(1));
    // The client resumes from nothing; while the replay's read is in flight, 2 and 3 are pushed live.
    let channels = [(ROOM.to_owned(), 0)].into_iter().collect();
    harness.client.send(&ClientFrame::Sync { req_id: Some("s".into()), channels });
    gate.entered.acquire().await.expect("the replay reads history").forget();
    assert_eq!((harness.publish(2), harness.publish(3)), (1, 1));
    gate.release.add_permits(1);
    // Each sequence exactly once: 1 was sent already, the replay sends 2 and 3, the live copies are dropped.
    assert_eq!(harness.client.frame().await, message(2));
    assert_eq!(harness.client.frame().await, message(3));
    assert_eq!(harness.client.frame().await, ServerFrame::Synced { req_id: Some("s".into()) });
    let quiet_period = tokio::time::timeout(Duration::from_secs(1), harness.client.next()).await;
    assert!(quiet_period.is_err(), "nothing more: {quiet_period:?}");
    // Live messages go on after the replay, once each.
    assert_eq!(harness.publish(4), 1);
    assert_eq!(harness.client.frame().await, message(4));
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.close().await, close::GOING_AWAY);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_receipt_says_no_more_than_the_connection_delivered() {
    let router = TestRouter::default();
    let receipts = router.receipts.clone();
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert!(matches!(harness.client.frame().await, ServerFrame::Ready { .. }));
    assert_eq!(harness.publish(1), 1);
    assert_eq!(harness.client.frame().await, message(1));
    harness.client.send(&ClientFrame::Ack { channel: ROOM.into(), seq: u64::MAX });
    harness.client.send(&ClientFrame::Ping { req_id: None });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }));
    tokio::task::yield_now().await;
    assert_eq!(*receipts.lock().expect("receipts"), vec![1], "not u64::MAX");
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.close().await, close::GOING_AWAY);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_window_past_what_the_clock_holds_never_fires_and_never_panics() {
    let mut harness = ready(quiet()).await;
    let endless = Duration::from_millis(u64::MAX);
    harness.drain.send(Some(DrainPlan { window: endless, deadline: endless })).expect("connection watching");
    harness.client.send(&ClientFrame::Ping { req_id: Some("p".into()) });
    assert!(matches!(harness.client.frame().await, ServerFrame::Pong { .. }), "still served");
    harness.shutdown.send(true).expect("connection watching");
    assert_eq!(harness.client.close().await, close::GOING_AWAY);
    harness.ended().await;
}

/// Every idle connection holds its task's future: what the loop keeps across its wait bounds the memory of an idle
/// connection. The handshake's and the close's futures, and those of rare frames, are boxed and not part of it.
#[tokio::test]
async fn the_connection_task_stays_small() {
    let config = quiet();
    let (hub, metrics) = new_hub(&config);
    let (_shutdown, shutdown_signal) = watch::channel(false);
    let (_drain, drain_signal) = watch::channel(None);
    let context = ConnectionContext {
        router: Router::new(TestRouter::default()),
        hub,
        metrics,
        config: Arc::new(config),
        shutdown: shutdown_signal,
        drain: drain_signal,
    };
    let session = alice(Duration::from_secs(3_600), None);
    let (_to_server, from_client) = socket_channel::unbounded();
    let (to_client, _from_server) = socket_channel::channel(1);
    let socket = TestSocket { from_client, to_client };
    let task = serve(socket, context, session, Transport::websocket(classify));
    let size = std::mem::size_of_val(&task);
    // 2,856 bytes before the boxing; 1,672 with it.
    assert!(size <= 1_800, "the connection's future takes {size} bytes");
}
