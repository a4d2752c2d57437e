//! The fallback transports (SSE and long-poll) against a real server: the same delivery guarantees, limits and
//! error frames as WebSocket, since both run the same connection loop.

mod common;

use common::{server, stop, token, Client};
use parley_server::Running;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Sse,
    Poll,
}

impl Transport {
    fn path(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }
}

/// What a fallback client receives.
#[derive(Debug)]
enum Incoming {
    Frame(Value),
    Closed(u16, String),
}

/// One HTTP/1.1 request on a fresh connection. Returns the status and the JSON body (`Null` when empty).
async fn http(address: SocketAddr, method: &str, path: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let response = parley_test_support::http::request(address, method, path, bearer, body).await;
    (response.status, response.json())
}

/// Reads the HTTP response head; returns the status and the headers (lowercase names).
async fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("status line");
    let status = line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.expect("header");
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return (status, headers);
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

/// One chunk of a chunked body; `None` at the end.
async fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).await.ok()?;
    chunk.truncate(size);
    Some(chunk)
}

/// Parses the SSE stream into frames and the final close event.
async fn read_events(mut reader: BufReader<TcpStream>, sender: mpsc::UnboundedSender<(Instant, Incoming)>) {
    let mut pending = String::new();
    while let Some(chunk) = read_chunk(&mut reader).await {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = if name.trim() == "close" { "close" } else { "other" };
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let value: Value = serde_json::from_str(&data.join("\n")).expect("events carry JSON");
            let incoming = if event == "close" {
                let code = value["code"].as_u64().and_then(|code| u16::try_from(code).ok()).unwrap_or(0);
                Incoming::Closed(code, value["reason"].as_str().unwrap_or("").to_owned())
            } else {
                Incoming::Frame(value)
            };
            if sender.send((Instant::now(), incoming)).is_err() {
                return;
            }
        }
    }
}

/// Polls until the session closes, passing every frame on.
async fn poll_frames(
    address: SocketAddr,
    session_id: String,
    token: String,
    sender: mpsc::UnboundedSender<(Instant, Incoming)>,
) {
    loop {
        let (status, body) =
            http(address, "GET", &format!("/v1/poll/{session_id}?wait_ms=5000"), Some(&token), "").await;
        let now = Instant::now();
        if status != 200 {
            let _ = sender.send((now, Incoming::Closed(0, format!("poll answered {status}: {body}"))));
            return;
        }
        for frame in body["frames"].as_array().cloned().unwrap_or_default() {
            let _ = sender.send((now, Incoming::Frame(frame)));
        }
        if let Some(closed) = body.get("closed") {
            let code = closed["code"].as_u64().and_then(|code| u16::try_from(code).ok()).unwrap_or(0);
            let _ = sender.send((now, Incoming::Closed(code, closed["reason"].as_str().unwrap_or("").to_owned())));
            return;
        }
    }
}

/// A client on one of the fallback transports, with the same helpers as the WebSocket `Client`.
struct Fallback {
    transport: Transport,
    address: SocketAddr,
    user: String,
    token: String,
    session_id: String,
    ready: Value,
    incoming: mpsc::UnboundedReceiver<(Instant, Incoming)>,
    reader: JoinHandle<()>,
    backlog: Vec<Value>,
    auto_ack: bool,
    /// Highest `seq` taken per channel, to drop retransmitted duplicates like a real client.
    last_seq: HashMap<String, u64>,
    /// Duplicates dropped so far.
    duplicates: usize,
}

impl Drop for Fallback {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Opens an SSE stream; `Err` with the status and JSON body when refused.
async fn open_sse(address: SocketAddr, query: &str) -> Result<BufReader<TcpStream>, (u16, Value)> {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!("GET /v1/sse?{query} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader).await;
    if status != 200 {
        let length = header(&headers, "content-length").and_then(|length| length.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body).await;
        return Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
    }
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"), "{headers:?}");
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"), "{headers:?}");
    Ok(reader)
}

impl Fallback {
    async fn connect(running: &Running, user: &str, transport: Transport) -> Fallback {
        match Fallback::try_connect(running.address, user, transport).await {
            Ok(client) => client,
            Err((status, body)) => panic!("{user}: {} connect refused with {status}: {body}", transport.path()),
        }
    }

    async fn try_connect(address: SocketAddr, user: &str, transport: Transport) -> Result<Fallback, (u16, Value)> {
        let token = token(user);
        let (sender, mut incoming) = mpsc::unbounded_channel();
        let (session_id, reader) = match transport {
            Transport::Sse => {
                let stream = open_sse(address, &format!("v=1&token={token}")).await?;
                let reader = tokio::spawn(read_events(stream, sender));
                (None, reader)
            }
            Transport::Poll => {
                let (status, body) = http(address, "POST", "/v1/poll/connect?v=1", Some(&token), "").await;
                if status != 200 {
                    return Err((status, body));
                }
                let session_id = body["session_id"].as_str().expect("session id").to_owned();
                let now = Instant::now();
                for frame in body["frames"].as_array().cloned().unwrap_or_default() {
                    let _ = sender.send((now, Incoming::Frame(frame)));
                }
                let reader = tokio::spawn(poll_frames(address, session_id.clone(), token.clone(), sender));
                (Some(session_id), reader)
            }
        };
        let first = tokio::time::timeout(Duration::from_secs(15), incoming.recv()).await.expect("ready in time");
        let ready = match first {
            Some((_, Incoming::Frame(frame))) => frame,
            other => panic!("{user}: expected ready, got {other:?}"),
        };
        assert_eq!(ready["type"], "ready", "the first frame is ready: {ready}");
        let ready_session = ready["session_id"].as_str().expect("session id").to_owned();
        if let Some(session_id) = &session_id {
            assert_eq!(session_id, &ready_session, "connect and ready name the same session");
        }
        Ok(Fallback {
            transport,
            address,
            user: user.to_owned(),
            token,
            session_id: ready_session,
            ready,
            incoming,
            reader,
            backlog: Vec::new(),
            auto_ack: true,
            last_seq: HashMap::new(),
            duplicates: 0,
        })
    }

    fn session_path(&self) -> String {
        format!("/v1/{}/{}", self.transport.path(), self.session_id)
    }

    /// Posts a raw body to the session.
    async fn post(&self, body: &str) -> (u16, Value) {
        http(self.address, "POST", &self.session_path(), Some(&self.token), body).await
    }

    async fn send_raw(&mut self, body: &str) {
        let (status, answer) = self.post(body).await;
        assert_eq!(status, 202, "{}: post refused: {answer}", self.user);
    }

    async fn send_json(&mut self, frame: Value) {
        self.send_raw(&frame.to_string()).await;
    }

    /// The next thing received, within 15 s (no acknowledgement, no deduplication).
    async fn next(&mut self) -> (Instant, Incoming) {
        tokio::time::timeout(Duration::from_secs(15), self.incoming.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: timed out; backlog: {:?}", self.user, self.backlog))
            .unwrap_or_else(|| panic!("{}: transport ended; backlog: {:?}", self.user, self.backlog))
    }

    async fn expect(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.backlog.iter().position(&predicate) {
            return self.backlog.remove(index);
        }
        loop {
            let frame = match self.next().await {
                (_, Incoming::Frame(frame)) => frame,
                (_, Incoming::Closed(code, reason)) => {
                    panic!("{}: closed {code} {reason}; backlog: {:?}", self.user, self.backlog)
                }
            };
            if frame["type"] == "message" {
                if self.auto_ack {
                    self.send_json(json!({"type":"ack","channel":frame["channel"],"seq":frame["seq"]})).await;
                }
                let channel = frame["channel"].as_str().unwrap_or("").to_owned();
                let seq = frame["seq"].as_u64().unwrap_or(0);
                let last = self.last_seq.entry(channel).or_insert(0);
                if seq <= *last {
                    self.duplicates += 1;
                    continue;
                }
                *last = seq;
            }
            if predicate(&frame) {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    async fn request(&mut self, mut frame: Value, req_id: &str) -> Value {
        frame["req_id"] = json!(req_id);
        self.send_json(frame).await;
        let id = req_id.to_owned();
        self.expect(move |reply| reply["req_id"] == id.as_str()).await
    }

    async fn send_message(&mut self, channel: &str, client_msg_id: &str, text: &str) -> Value {
        self.send_json(json!({"type":"send","channel":channel,"client_msg_id":client_msg_id,"text":text})).await;
        let id = client_msg_id.to_owned();
        self.expect(move |reply| {
            (reply["type"] == "send_result" || reply["type"] == "error") && reply["client_msg_id"] == id.as_str()
        })
        .await
    }

    async fn messages(&mut self, channel: &str, count: usize) -> Vec<Value> {
        let mut collected = Vec::with_capacity(count);
        while collected.len() < count {
            let channel = channel.to_owned();
            collected.push(
                self.expect(move |frame| frame["type"] == "message" && frame["channel"] == channel.as_str()).await,
            );
        }
        collected
    }

    /// Reads until the session closes; returns the close code and reason.
    async fn closed(&mut self) -> (u16, String) {
        loop {
            if let (_, Incoming::Closed(code, reason)) = self.next().await {
                return (code, reason);
            }
        }
    }

    /// Leaves: drops the SSE stream, or ends the long-poll session.
    async fn disconnect(self) {
        if self.transport == Transport::Poll {
            let (status, body) = http(self.address, "DELETE", &self.session_path(), Some(&self.token), "").await;
            assert_eq!(status, 204, "{body}");
        }
    }
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|frame| frame["seq"].as_u64().unwrap_or(0)).collect()
}

macro_rules! on_both_transports {
    ($scenario:ident, $sse:ident, $poll:ident) => {
        #[tokio::test]
        async fn $sse() {
            $scenario(Transport::Sse).await;
        }

        #[tokio::test]
        async fn $poll() {
            $scenario(Transport::Poll).await;
        }
    };
}

on_both_transports!(in_order_with_acks, sse_delivers_in_order_with_acks, poll_delivers_in_order_with_acks);

async fn in_order_with_acks(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--ack-timeout-ms", "300"]).await;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"order","members":["reader"]}), "c").await;
    let mut reader = Fallback::connect(&running, "reader", transport).await;
    assert_eq!(reader.ready["user"], "reader");
    assert_eq!(reader.ready["channels"][0]["id"], "g:order", "{}", reader.ready);
    assert!(reader.session_id.starts_with("s-"), "{}", reader.session_id);
    for n in 1..=10 {
        sender.send_message("g:order", &format!("m{n}"), &format!("text {n}")).await;
    }
    // The reader takes them only now, so some may have been retransmitted already: it drops those by seq.
    let received = reader.messages("g:order", 10).await;
    assert_eq!(seqs(&received), (1..=10).collect::<Vec<_>>());
    assert_eq!(received[9]["text"], "text 10");
    assert_eq!(received[0]["sender"], "sender");
    // Once the acknowledgements are in (a ping answered after them), nothing is sent again. Four ACK timeouts, for a
    // retransmission to show up if the acknowledgements were lost: the absence of an event has no condition to wait
    // on (the exact timing is the gateway's unit tests').
    reader.request(json!({"type":"ping"}), "p1").await;
    let duplicates = reader.duplicates;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let pong = reader.request(json!({"type":"ping"}), "p2").await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(reader.duplicates, duplicates, "no retransmission after the acknowledgements");
    assert!(reader.backlog.iter().all(|frame| frame["type"] != "message"), "no retransmission: {:?}", reader.backlog);
    stop(running).await;
}

on_both_transports!(
    withheld_acks,
    sse_withheld_acks_get_three_retransmits_then_close_4010,
    poll_withheld_acks_get_three_retransmits_then_close_4010
);

async fn withheld_acks(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--ack-timeout-ms", "400"]).await;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"acks","members":["mute"]}), "c").await;
    let mut mute = Fallback::connect(&running, "mute", transport).await;
    mute.auto_ack = false;
    let started = Instant::now();
    sender.send_message("g:acks", "only", "ack me").await;

    let mut arrivals = Vec::new();
    let (code, reason) = loop {
        match mute.next().await {
            (at, Incoming::Frame(frame)) => {
                if frame["type"] == "message" {
                    assert_eq!(frame["seq"], 1, "only the one message is ever sent");
                    arrivals.push(at - started);
                }
            }
            (_, Incoming::Closed(code, reason)) => break (code, reason),
        }
    };
    assert_eq!(arrivals.len(), 4, "the original and exactly three retransmits: {arrivals:?}");
    for pair in arrivals[1..].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(350),
            "retransmits are spaced by the ACK timeout: {arrivals:?}"
        );
    }
    assert_eq!(code, 4010, "{reason}");
    // The session is gone once it closed.
    let (status, body) = mute.post(r#"{"type":"ping"}"#).await;
    assert_eq!((status, body["code"].clone()), (404, json!("no_such_session")), "{body}");

    // Nothing is lost: the message is still there for a resume.
    let mut back = Fallback::connect(&running, "mute", transport).await;
    back.send_json(json!({"type":"sync","req_id":"s","channels":{"g:acks":0}})).await;
    let replayed = back.messages("g:acks", 1).await;
    assert_eq!(replayed[0]["text"], "ack me");
    back.expect(|frame| frame["type"] == "synced").await;
    stop(running).await;
}

on_both_transports!(resume, sse_resume_replays_exactly_what_was_missed, poll_resume_replays_exactly_what_was_missed);

async fn resume(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut bob = Client::connect(&running, "bob").await;
    bob.request(json!({"type":"create_channel","name":"resume","members":["alice"]}), "c").await;
    let mut alice = Fallback::connect(&running, "alice", transport).await;
    for n in 1..=3 {
        bob.send_message("g:resume", &format!("m{n}"), &format!("text {n}")).await;
    }
    let seen = alice.messages("g:resume", 3).await;
    assert_eq!(seqs(&seen), vec![1, 2, 3]);
    alice.disconnect().await;
    for n in 4..=6 {
        bob.send_message("g:resume", &format!("m{n}"), &format!("text {n}")).await;
    }
    let mut alice = Fallback::connect(&running, "alice", transport).await;
    alice.send_json(json!({"type":"sync","req_id":"s1","channels":{"g:resume":3}})).await;
    let replayed = alice.messages("g:resume", 3).await;
    assert_eq!(seqs(&replayed), vec![4, 5, 6]);
    alice.expect(|frame| frame["type"] == "synced" && frame["req_id"] == "s1").await;
    bob.send_message("g:resume", "m7", "live").await;
    let live = alice.messages("g:resume", 1).await;
    assert_eq!(live[0]["seq"], 7, "live continues with no gap and no duplicate");
    let pong = alice.request(json!({"type":"ping"}), "p").await;
    assert_eq!(pong["type"], "pong");
    assert!(alice.backlog.iter().all(|frame| frame["type"] != "message"), "no duplicate: {:?}", alice.backlog);
    let refused = alice.request(json!({"type":"sync","channels":{"g:elsewhere":0}}), "s2").await;
    assert_eq!(refused["code"], "no_such_channel", "{refused}");
    stop(running).await;
}

on_both_transports!(bad_input, sse_bad_input_gets_error_frames, poll_bad_input_gets_error_frames);

async fn bad_input(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--max-frame-bytes", "8192"]).await;
    let mut client = Fallback::connect(&running, "alice", transport).await;
    let cases = [
        ("not json at all", "invalid_json"),
        ("\"a string\"", "invalid_json"),
        (r#"{"type":"teleport","req_id":"t"}"#, "unknown_type"),
        (r#"{"type":"send","channel":"g:a"}"#, "invalid_frame"),
        (r#"{"type":"history","channel":7}"#, "invalid_frame"),
        (r#"{"channel":"g:a"}"#, "invalid_frame"),
        ("", "invalid_json"),
    ];
    for (raw, code) in cases {
        client.send_raw(raw).await;
        let error = client.expect(|frame| frame["type"] == "error").await;
        assert_eq!(error["code"], code, "{raw} -> {error}");
        assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()));
    }
    // A JSON array is a batch: each element is one frame, answered in order.
    client.send_raw(r#"[{"type":"ping","req_id":"b1"}, 7, {"type":"ping","req_id":"b2"}]"#).await;
    let first = client.expect(|frame| frame["type"] == "pong" || frame["type"] == "error").await;
    let second = client.expect(|frame| frame["type"] == "pong" || frame["type"] == "error").await;
    let third = client.expect(|frame| frame["type"] == "pong" || frame["type"] == "error").await;
    assert_eq!(
        (&first["req_id"], &second["code"], &third["req_id"]),
        (&json!("b1"), &json!("invalid_json"), &json!("b2"))
    );
    let error = client
        .request(json!({"type":"send","channel":"not a channel","client_msg_id":"1","text":"x"}), "bad-channel")
        .await;
    assert_eq!(error["code"], "invalid_argument", "{error}");
    let error = client
        .request(json!({"type":"send","channel":"g:a","client_msg_id":"1","text":"x".repeat(5000)}), "long")
        .await;
    assert_eq!(error["code"], "text_too_long", "{error}");
    let error =
        client.request(json!({"type":"send","channel":"g:nowhere","client_msg_id":"1","text":"x"}), "none").await;
    assert_eq!(error["code"], "no_such_channel", "{error}");

    // A body above max_frame_bytes is refused with 413; the session stays.
    let huge = format!(r#"{{"type":"send","channel":"g:x","client_msg_id":"1","text":"{}"}}"#, "a".repeat(9000));
    let (status, body) = client.post(&huge).await;
    assert_eq!((status, body["code"].clone()), (413, json!("frame_too_big")), "{body}");

    // Wrong session, wrong user, no token, wrong version.
    let address = running.address;
    let path = format!("/v1/{}/s-0000", transport.path());
    let (status, body) = http(address, "POST", &path, Some(&token("alice")), r#"{"type":"ping"}"#).await;
    assert_eq!((status, body["code"].clone()), (404, json!("no_such_session")), "{body}");
    let other = match transport {
        Transport::Sse => Transport::Poll,
        Transport::Poll => Transport::Sse,
    };
    let path = format!("/v1/{}/{}", other.path(), client.session_id);
    let (status, body) = http(address, "POST", &path, Some(&client.token), r#"{"type":"ping"}"#).await;
    assert_eq!((status, body["code"].clone()), (404, json!("no_such_session")), "a session has one transport: {body}");
    let (status, body) = http(address, "POST", &client.session_path(), Some(&token("mallory")), "{}").await;
    assert_eq!((status, body["code"].clone()), (403, json!("forbidden")), "{body}");
    let (status, body) = http(address, "POST", &client.session_path(), None, "{}").await;
    assert_eq!((status, body["code"].clone()), (401, json!("unauthorized")), "{body}");
    if transport == Transport::Poll {
        let (status, body) = http(address, "GET", &client.session_path(), Some(&token("mallory")), "").await;
        assert_eq!((status, body["code"].clone()), (403, json!("forbidden")), "{body}");
        let (status, body) = http(address, "DELETE", &client.session_path(), Some(&token("mallory")), "").await;
        assert_eq!((status, body["code"].clone()), (403, json!("forbidden")), "{body}");
    }
    let refused = match transport {
        Transport::Sse => open_sse(address, &format!("v=2&token={}", token("alice"))).await.err(),
        Transport::Poll => Some(http(address, "POST", "/v1/poll/connect?v=2", Some(&token("alice")), "").await),
    };
    let (status, body) = refused.expect("refused");
    assert_eq!((status, body["code"].clone()), (400, json!("unsupported_version")), "{body}");
    let refused = match transport {
        Transport::Sse => open_sse(address, "v=1&token=garbage").await.err(),
        Transport::Poll => Some(http(address, "POST", "/v1/poll/connect?v=1", Some("garbage"), "").await),
    };
    let (status, body) = refused.expect("refused");
    assert_eq!((status, body["code"].clone()), (401, json!("unauthorized")), "{body}");

    // Still usable after all of that.
    let pong = client.request(json!({"type":"ping"}), "still-there").await;
    assert_eq!(pong["type"], "pong");
    stop(running).await;
}

on_both_transports!(chat_with_websocket, sse_and_websocket_users_chat, poll_and_websocket_users_chat);

async fn chat_with_websocket(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    let mut bob = Fallback::connect(&running, "bob", transport).await;
    let dm = alice.request(json!({"type":"open_dm","user":"bob"}), "dm").await;
    assert_eq!(dm["channel"]["id"], "dm:alice:bob", "{dm}");
    bob.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "dm:alice:bob").await;
    for round in 0..3 {
        // Senders also receive their own messages (several devices stay in step), so match by sequence.
        let sent = alice.send_message("dm:alice:bob", &format!("a{round}"), &format!("hi bob {round}")).await;
        let seq = sent["seq"].clone();
        let received = bob.expect(|frame| frame["type"] == "message" && frame["seq"] == seq).await;
        assert_eq!((&received["sender"], &received["text"]), (&json!("alice"), &json!(format!("hi bob {round}"))));
        let sent = bob.send_message("dm:alice:bob", &format!("b{round}"), &format!("hi alice {round}")).await;
        assert_eq!(sent["type"], "send_result", "{sent}");
        let seq = sent["seq"].clone();
        let received = alice.expect(|frame| frame["type"] == "message" && frame["seq"] == seq).await;
        assert_eq!((&received["sender"], &received["text"]), (&json!("bob"), &json!(format!("hi alice {round}"))));
    }
    let own = bob.messages("dm:alice:bob", 3).await;
    assert_eq!(seqs(&own), vec![2, 4, 6], "bob's own messages reach him too, in order");
    // Each side also saw its own messages, in the same order.
    let history = bob.request(json!({"type":"history","channel":"dm:alice:bob"}), "h").await;
    assert_eq!(seqs(history["messages"].as_array().expect("messages")), (1..=6).collect::<Vec<_>>());
    stop(running).await;
}

on_both_transports!(shutdown, sse_sessions_close_with_1001_on_shutdown, poll_sessions_close_with_1001_on_shutdown);

async fn shutdown(transport: Transport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut client = Fallback::connect(&running, "alice", transport).await;
    let pong = client.request(json!({"type":"ping"}), "p").await;
    assert_eq!(pong["type"], "pong");
    if transport == Transport::Poll {
        // The reader's next poll must be waiting in the server when it stops listening. A poll of ours makes the
        // reader's waiting one answer at once, and the reader's next one answers ours in turn (a newer poll takes
        // over): once ours is answered, a poll of the reader's is waiting in the server.
        let path = format!("{}?wait_ms=20000", client.session_path());
        let (status, answer) = http(running.address, "GET", &path, Some(&client.token), "").await;
        assert_eq!((status, answer), (200, json!({"frames": []})), "handed over to the reader's next poll");
    }
    let _ = running.shutdown.send(true);
    let (code, reason) = client.closed().await;
    assert_eq!(code, 1001, "{reason}");
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await.expect("the server stops");
}

#[tokio::test]
async fn poll_waits_then_answers_empty_and_a_newer_poll_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let address = running.address;
    let alice = token("alice");
    let (status, connected) = http(address, "POST", "/v1/poll/connect?v=1", Some(&alice), "").await;
    assert_eq!(status, 200, "{connected}");
    assert_eq!(connected["frames"][0]["type"], "ready", "{connected}");
    let session_id = connected["session_id"].as_str().expect("session id").to_owned();
    let path = format!("/v1/poll/{session_id}");

    let started = Instant::now();
    let (status, empty) = http(address, "GET", &format!("{path}?wait_ms=300"), Some(&alice), "").await;
    assert_eq!((status, empty), (200, json!({"frames": []})));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Of two polls, the one that reaches the server first answers at once when the other arrives, and the frames
    // go to the newest poll.
    let poll = || {
        let (path, alice) = (path.clone(), alice.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = http(address, "GET", &format!("{path}?wait_ms=20000"), Some(&alice), "").await;
            (answer, started.elapsed())
        })
    };
    let (mut first, mut second) = (poll(), poll());
    let (older, newer) = tokio::select! {
        older = &mut first => (older, second),
        older = &mut second => (older, first),
    };
    let ((status, answer), waited) = older.expect("older poll");
    assert_eq!((status, answer), (200, json!({"frames": []})));
    // Not after its own 20 s wait (the bound leaves room for a loaded machine).
    assert!(waited < Duration::from_secs(15), "the older poll handed over: {waited:?}");
    let (status, posted) = http(address, "POST", &path, Some(&alice), r#"{"type":"ping","req_id":"p"}"#).await;
    assert_eq!((status, posted), (202, json!({"accepted": 1})));
    let ((status, answer), _) = newer.await.expect("newer poll");
    assert_eq!(status, 200, "{answer}");
    assert_eq!((&answer["frames"][0]["type"], &answer["frames"][0]["req_id"]), (&json!("pong"), &json!("p")));

    // DELETE ends the session.
    let (status, _) = http(address, "DELETE", &path, Some(&alice), "").await;
    assert_eq!(status, 204);
    let (status, body) = http(address, "GET", &format!("{path}?wait_ms=0"), Some(&alice), "").await;
    assert_eq!((status, body["code"].clone()), (404, json!("no_such_session")), "{body}");
    stop(running).await;
}

#[tokio::test]
async fn sessions_share_the_connection_limit_and_idle_ones_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--max-connections", "1", "--idle-timeout-ms", "1500"]).await;
    let address = running.address;

    // A long-poll session that pings but never polls is dropped after the idle timeout.
    let poller = token("poller");
    let (status, connected) = http(address, "POST", "/v1/poll/connect?v=1", Some(&poller), "").await;
    assert_eq!(status, 200, "{connected}");
    let path = format!("/v1/poll/{}", connected["session_id"].as_str().expect("session id"));
    let refused = Fallback::try_connect(address, "other", Transport::Sse).await.err().expect("at the limit");
    assert_eq!((refused.0, refused.1["code"].clone()), (503, json!("overloaded")), "{}", refused.1);
    let refused = Fallback::try_connect(address, "other", Transport::Poll).await.err().expect("at the limit");
    assert_eq!((refused.0, refused.1["code"].clone()), (503, json!("overloaded")), "{}", refused.1);
    let started = Instant::now();
    let status = loop {
        let (status, _) = http(address, "POST", &path, Some(&poller), r#"{"type":"ping"}"#).await;
        if status != 202 || started.elapsed() > Duration::from_secs(15) {
            break status;
        }
        // The pace of the pings (which must not keep the session; each leaves a pong queued for a poll that never
        // comes), not a guess at when the session goes: the loop ends when it is gone.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(status, 404, "the unpolled session is gone");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1_200), "not before the idle timeout: {elapsed:?}");

    // Its permit is free again (as soon as the server has let the session go). An SSE session that never pings is
    // closed with 4009.
    let mut silent = free_permit(address, "silent", Transport::Sse).await;
    let (code, reason) = silent.closed().await;
    assert_eq!(code, 4009, "{reason}");
    drop(silent);

    // And so is a long-poll session that polls but never pings; the close comes with its last poll.
    let mut quiet = free_permit(address, "quiet", Transport::Poll).await;
    let (code, reason) = quiet.closed().await;
    assert_eq!(code, 4009, "{reason}");
    let (status, _) = quiet.post(r#"{"type":"ping"}"#).await;
    assert_eq!(status, 404);
    stop(running).await;
}

/// Connects once the connection permit of a closed session is free again; only 503 (overloaded) is retried.
async fn free_permit(address: SocketAddr, user: &str, transport: Transport) -> Fallback {
    parley_test_support::eventually("a free connection permit", Duration::from_secs(15), || async move {
        match Fallback::try_connect(address, user, transport).await {
            Ok(client) => Some(client),
            Err((503, _)) => None,
            Err((status, body)) => panic!("{user}: {} connect refused with {status}: {body}", transport.path()),
        }
    })
    .await
}

#[tokio::test]
async fn an_sse_session_ends_when_its_stream_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let client = Fallback::connect(&running, "alice", Transport::Sse).await;
    let (address, path, token) = (running.address, client.session_path(), client.token.clone());
    drop(client);
    // The server notices the dropped stream (its next write fails) and ends the session.
    let status = parley_test_support::eventually("the session to end", Duration::from_secs(30), || async {
        let (status, _) = http(address, "POST", &path, Some(&token), r#"{"type":"ping"}"#).await;
        (status != 202).then_some(status)
    })
    .await;
    assert_eq!(status, 404, "the session ends with its stream");
    stop(running).await;
}
