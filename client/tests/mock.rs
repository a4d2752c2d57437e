//! Against a scripted server on 127.0.0.1: behaviour the real server rarely shows on purpose (a gap in the
//! stream, a silent connection, a send whose answer is lost).

use futures_util::{SinkExt, StreamExt};
use parley_client::{Backoff, Client, ClientConfig, Event};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

struct Mock {
    listener: TcpListener,
}

impl Mock {
    async fn start() -> Mock {
        Mock { listener: TcpListener::bind("127.0.0.1:0").await.expect("bind") }
    }

    fn config(&self) -> ClientConfig {
        let address = self.listener.local_addr().expect("address");
        let mut config = ClientConfig::new(format!("ws://{address}"), "mock-token");
        config.backoff =
            Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(50), max_attempts: None };
        config.ack_delay = Duration::ZERO;
        config
    }

    /// Accepts the next connection and sends `ready`.
    async fn accept(&self, heartbeat_ms: u64, last_seq: u64) -> Socket {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("client connects in time")
            .expect("accept");
        // The client sets TCP_NODELAY too: no Nagle delay, which tokio's paused clock could not see (it would jump
        // to the next timer meanwhile).
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let mut socket = tokio_tungstenite::accept_async(stream).await.expect("handshake");
        let ready = json!({"type":"ready","protocol":1,"session_id":"s-1","user":"alice",
            "heartbeat_interval_ms":heartbeat_ms,
            "limits":{"max_frame_bytes":65536,"max_text_bytes":4096,"max_channel_members":10000,
                      "send_rate_per_sec":20,"send_burst":40},
            "channels":[{"id":"g:a","kind":"group","name":"a","members":2,"last_seq":last_seq,"joined":true}]});
        send(&mut socket, ready).await;
        socket
    }
}

async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::Text(frame.to_string().into())).await.expect("mock sends");
}

/// The next JSON frame from the client, or `None` when the connection ends or `limit` passes.
async fn receive(socket: &mut Socket, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).expect("client sends JSON")),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Frames until one matches `predicate` (the others are returned too, in order).
async fn receive_until(socket: &mut Socket, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = receive(socket, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("no match in {frames:?}"));
        let done = predicate(&frame);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

fn message(seq: u64) -> Value {
    json!({"type":"message","channel":"g:a","seq":seq,"id":(1000 + seq).to_string(),"sender":"bob",
           "text":format!("m{seq}"),"ts":seq,"client_msg_id":format!("c{seq}")})
}

async fn next_event(events: &mut tokio::sync::mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("event in time").expect("stream open")
}

async fn next_message_seq(events: &mut tokio::sync::mpsc::Receiver<Event>) -> u64 {
    loop {
        if let Event::Message(message) = next_event(events).await {
            return message.seq;
        }
    }
}

#[tokio::test]
async fn a_gap_is_filled_with_history_and_delivered_in_order() {
    let mock = Mock::start().await;
    let config = mock.config();
    let (connected, mut server) = tokio::join!(Client::connect(config), mock.accept(30_000, 0));
    let (_client, mut events) = connected.expect("connects");
    assert!(matches!(next_event(&mut events).await, Event::Connected { .. }));

    send(&mut server, message(1)).await;
    send(&mut server, message(3)).await;
    send(&mut server, message(3)).await;
    let frames = receive_until(&mut server, |frame| frame["type"] == "history").await;
    let history = frames.last().expect("history request");
    assert_eq!((history["channel"].clone(), history["after"].clone()), (json!("g:a"), json!(1)), "{history}");
    assert!(frames.iter().any(|frame| frame["type"] == "ack" && frame["seq"] == 1), "acked 1: {frames:?}");
    assert!(!frames.iter().any(|frame| frame["type"] == "ack" && frame["seq"] == 3), "3 not acked before the gap");

    let mut page = message(2);
    page.as_object_mut().expect("object").remove("type");
    let mut repeated = message(3);
    repeated.as_object_mut().expect("object").remove("type");
    send(&mut server, json!({"type":"history","req_id":history["req_id"],"channel":"g:a","messages":[page, repeated],"has_more":false})).await;
    send(&mut server, message(4)).await;

    let seqs = [
        next_message_seq(&mut events).await,
        next_message_seq(&mut events).await,
        next_message_seq(&mut events).await,
        next_message_seq(&mut events).await,
    ];
    assert_eq!(seqs, [1, 2, 3, 4]);
    receive_until(&mut server, |frame| frame["type"] == "ack" && frame["seq"] == 4).await;
    // A retransmission of an old message is dropped but acknowledged again.
    send(&mut server, message(2)).await;
    receive_until(&mut server, |frame| frame["type"] == "ack" && frame["seq"] == 4).await;
    send(&mut server, message(5)).await;
    assert_eq!(next_message_seq(&mut events).await, 5);
}

// On tokio's paused clock: the client's heartbeat follows tokio's clock, so the pings come exactly every interval
// and the silence is detected exactly two intervals after the last traffic, however loaded the machine is.
#[tokio::test(start_paused = true)]
async fn pings_keep_a_connection_and_silence_drops_it() {
    let mock = Mock::start().await;
    let (connected, mut server) = tokio::join!(Client::connect(mock.config()), mock.accept(100, 0));
    let (_client, mut events) = connected.expect("connects");
    assert!(matches!(next_event(&mut events).await, Event::Connected { .. }));

    // Answer pings for a while: the connection stays.
    let started = tokio::time::Instant::now();
    let mut pings = Vec::new();
    while started.elapsed() < Duration::from_millis(700) {
        if let Some(frame) = receive(&mut server, Duration::from_millis(50)).await {
            if frame["type"] == "ping" {
                pings.push(started.elapsed());
                send(&mut server, json!({"type":"pong","ts":1})).await;
            }
        }
    }
    assert!(pings.len() >= 6, "a ping every 100 ms: {pings:?}");
    for pair in pings.windows(2) {
        assert_eq!(pair[1] - pair[0], Duration::from_millis(100), "a ping every 100 ms: {pings:?}");
    }
    assert!(events.try_recv().is_err(), "no disconnect while pongs come back");

    // Stop answering: within two intervals of the last pong the client gives up on the connection and reconnects.
    let silent = tokio::time::Instant::now();
    let dropped = match next_event(&mut events).await {
        Event::Disconnected { code, reason } => (code, reason),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(dropped.0, None);
    assert!(dropped.1.contains("heartbeat"), "{}", dropped.1);
    assert!(silent.elapsed() <= Duration::from_millis(200), "detected in {:?}", silent.elapsed());
    let mut again = mock.accept(100, 0).await;
    let sync = receive_until(&mut again, |frame| frame["type"] == "sync").await;
    assert_eq!(sync.last().expect("sync")["channels"], json!({"g:a":0}));
}

#[tokio::test]
async fn a_send_whose_answer_was_lost_is_retried_with_the_same_client_msg_id() {
    let mock = Mock::start().await;
    let (connected, mut server) = tokio::join!(Client::connect(mock.config()), mock.accept(30_000, 0));
    let (client, mut events) = connected.expect("connects");
    let sending = tokio::spawn(async move { client.send("g:a", "hello").await });
    let first = receive_until(&mut server, |frame| frame["type"] == "send").await;
    let original = first.last().expect("send").clone();
    drop(server);

    let mut server = mock.accept(30_000, 1).await;
    let frames = receive_until(&mut server, |frame| frame["type"] == "send").await;
    let sync = frames.iter().find(|frame| frame["type"] == "sync").expect("sync before the retry");
    let retry = frames.last().expect("send");
    assert_eq!(retry["client_msg_id"], original["client_msg_id"]);
    assert_eq!(retry["text"], "hello");
    send(&mut server, message(1)).await;
    send(&mut server, json!({"type":"synced","req_id":sync["req_id"]})).await;
    send(
        &mut server,
        json!({"type":"send_result","client_msg_id":retry["client_msg_id"],"channel":"g:a","id":"1001","seq":1,"ts":1,"duplicate":true}),
    )
    .await;
    let receipt = sending.await.expect("task").expect("send confirmed");
    assert!(receipt.duplicate);
    assert_eq!(receipt.seq, 1);

    let mut kinds = Vec::new();
    while kinds.last() != Some(&"resynced") {
        kinds.push(match next_event(&mut events).await {
            Event::Connected { .. } => "connected",
            Event::Disconnected { .. } => "disconnected",
            Event::Message(_) => "message",
            Event::Resynced => "resynced",
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(kinds, ["connected", "disconnected", "connected", "message", "resynced"]);
}

#[tokio::test]
async fn gives_up_after_the_allowed_attempts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    let mut config = ClientConfig::new(format!("ws://{address}"), "token");
    config.backoff = Backoff { base: Duration::from_millis(5), cap: Duration::from_millis(20), max_attempts: Some(3) };
    assert!(Client::connect(config.clone()).await.is_err(), "nothing listens");
    let (client, mut events) = Client::spawn(config).expect("valid url");
    let mut failures = 0;
    loop {
        match next_event(&mut events).await {
            Event::ConnectFailed { attempt, .. } => {
                failures += 1;
                assert_eq!(attempt, failures);
            }
            Event::Closed { reason } => {
                assert!(reason.contains("3 failed attempts"), "{reason}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failures, 3);
    assert!(matches!(client.send("g:a", "x").await, Err(parley_client::ClientError::Closed)));
}
