//! The connection loop over in-memory channels on paused time: the socket is a pair of channels, the router a
//! small in-test service, and every timer (idle, token expiry, retransmission) runs on tokio's paused clock.

use super::*;
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
    stats: Arc<RouterStats>,
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
            Call::History { .. } => Ok(Answer::Page(HistoryPage::default())),
            Call::MarkDelivered { .. } => Ok(Answer::Done),
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

/// A read error of the test socket.
#[derive(Debug)]
struct ReadError {
    too_big: bool,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.too_big { "frame too big" } else { "read failed" })
    }
}

fn read_too_big(error: &ReadError) -> bool {
    error.too_big
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

    fn fail_read(&self, too_big: bool) {
        self.to_server.unbounded_send(Err(ReadError { too_big })).expect("server reading");
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

    /// The close code, after which the socket ends.
    async fn close(&mut self) -> u16 {
        let code = match self.next().await {
            Seen::Close(code) => code,
            other => panic!("expected a close, saw {other:?}"),
        };
        assert_eq!(self.next().await, Seen::Ended, "nothing after the close");
        code
    }
}

/// One connection served by a spawned [`serve`], with the handles a test drives it by.
struct Harness {
    client: TestClient,
    hub: Arc<Hub>,
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

    /// Waits for the connection to end, and checks it left the hub.
    async fn ended(self) {
        self.task.await.expect("the connection task ends cleanly");
        assert_eq!(self.hub.connection_count(), 0, "unregistered from the hub");
        drop((self.shutdown, self.drain));
    }
}

fn message(seq: u64) -> ServerFrame {
    ServerFrame::Message(MessageView {
        channel: ROOM.into(),
        seq,
        id: 1_000 + seq,
        sender: "bob".into(),
        text: format!("m{seq}"),
        ts: 0,
        client_msg_id: format!("c{seq}"),
    })
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
    let metrics = Metrics::new();
    let hub = Hub::new(Arc::new(NoBus), metrics.clone(), config.fanout_threshold);
    let (shutdown, shutdown_signal) = watch::channel(false);
    let (drain, drain_signal) = watch::channel(None);
    let context = ConnectionContext {
        router: Router::new(router),
        hub: hub.clone(),
        metrics,
        config: Arc::new(config),
        shutdown: shutdown_signal,
        drain: drain_signal,
    };
    let session = Session {
        conn: 1,
        session_id: "s-test".into(),
        user: UserId::new("alice").expect("user"),
        expires_at: unix_secs() + expires_in.as_secs(),
    };
    let (to_server, from_client) = socket_channel::unbounded();
    // A bounded channel holds its buffer plus one message per sender.
    let (to_client, from_server) = socket_channel::channel(socket_buffer.saturating_sub(1));
    let socket = TestSocket { from_client, to_client };
    let task = tokio::spawn(serve(socket, context, session, read_too_big));
    Harness { client: TestClient { to_server, from_server }, hub, shutdown, drain, task }
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
async fn a_client_that_stops_reading_overflows_its_queue_and_is_closed_as_a_slow_consumer() {
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
    assert_eq!(harness.hub.connection_count(), 1, "cut off, but the connection is still draining its queue");
    // Once the client reads again: everything that was queued, in order, then the close.
    for seq in 1..=published {
        assert_eq!(harness.client.frame().await, message(seq));
    }
    assert_eq!(harness.client.close().await, close::SLOW_CONSUMER);
    harness.ended().await;
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
async fn a_frame_too_big_closes_with_1009_and_a_failed_read_ends_without_a_close() {
    let mut harness = ready(quiet()).await;
    harness.client.fail_read(true);
    assert_eq!(harness.client.close().await, close::TOO_BIG);
    harness.ended().await;

    let mut harness = ready(quiet()).await;
    harness.client.fail_read(false);
    assert_eq!(harness.client.next().await, Seen::Ended);
    harness.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_handshake_without_storage_closes_with_1011_before_ready() {
    let router = TestRouter { unavailable: true, ..TestRouter::default() };
    let mut harness = start(quiet(), router, Duration::from_secs(3_600), 64);
    assert_eq!(harness.client.close().await, close::INTERNAL_ERROR);
    harness.ended().await;
}
