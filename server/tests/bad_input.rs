//! Every kind of bad input gets a clear answer, never a panic, and never disturbs other users.

mod common;

use common::{server, stop, token, Client, SECRET};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::{self, Message};

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_secs()).unwrap_or(0)
}

/// Reads until the server closes; returns the close code and reason.
async fn close_of(client: &mut Client) -> (u16, String) {
    let read = async {
        loop {
            match client.socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
                Some(Ok(Message::Close(None))) | None => return (0, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return (1, error.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("server closes in time")
}

#[tokio::test]
async fn oversized_frame_closes_with_1009_and_others_are_unaffected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut bystander = Client::connect(&running, "bystander").await;
    let mut client = Client::connect(&running, "big").await;
    let huge = format!(r#"{{"type":"send","channel":"g:x","client_msg_id":"1","text":"{}"}}"#, "a".repeat(70 * 1024));
    // The server may close before the whole frame is written; a failed write is fine.
    let _ = client.socket.send(Message::Text(huge.into())).await;
    let (code, reason) = close_of(&mut client).await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("frame too big"), "{reason}");
    let pong = bystander.request(json!({"type":"ping"}), "still-there").await;
    assert_eq!(pong["type"], "pong");
    stop(running).await;
}

#[tokio::test]
async fn malformed_frames_get_error_codes_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut client = Client::connect(&running, "alice").await;
    let cases = [
        ("not json at all", "invalid_json"),
        ("[1,2,3]", "invalid_json"),
        (r#"{"type":"teleport","req_id":"t"}"#, "unknown_type"),
        (r#"{"type":"send","channel":"g:a"}"#, "invalid_frame"),
        (r#"{"type":"history","channel":7}"#, "invalid_frame"),
        (r#"{"channel":"g:a"}"#, "invalid_frame"),
    ];
    for (raw, code) in cases {
        client.send_raw(raw).await;
        let error = client.expect(|frame| frame["type"] == "error").await;
        assert_eq!(error["code"], code, "{raw} -> {error}");
        assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()));
    }
    let error = client
        .request(json!({"type":"send","channel":"not a channel","client_msg_id":"1","text":"x"}), "bad-channel")
        .await;
    assert_eq!(error["code"], "invalid_argument", "{error}");
    let error = client.request(json!({"type":"send","channel":"g:a","client_msg_id":"","text":"x"}), "empty-id").await;
    assert_eq!(error["code"], "invalid_argument", "{error}");
    let error =
        client.request(json!({"type":"send","channel":"g:a","client_msg_id":"1","text":""}), "empty-text").await;
    assert_eq!(error["code"], "invalid_argument", "{error}");
    let error = client
        .request(json!({"type":"send","channel":"g:a","client_msg_id":"1","text":"x".repeat(5000)}), "long")
        .await;
    assert_eq!(error["code"], "text_too_long", "{error}");
    let error =
        client.request(json!({"type":"send","channel":"g:nowhere","client_msg_id":"1","text":"x"}), "none").await;
    assert_eq!(error["code"], "no_such_channel", "{error}");
    let error = client.request(json!({"type":"join","channel":"g:nowhere"}), "join-none").await;
    assert_eq!(error["code"], "no_such_channel", "{error}");
    let error = client.request(json!({"type":"create_channel","name":"Bad Name"}), "bad-name").await;
    assert_eq!(error["code"], "invalid_argument", "{error}");
    client.request(json!({"type":"create_channel","name":"taken"}), "c1").await;
    let error = client.request(json!({"type":"create_channel","name":"taken"}), "c2").await;
    assert_eq!(error["code"], "channel_exists", "{error}");
    let pong = client.request(json!({"type":"ping"}), "alive").await;
    assert_eq!(pong["type"], "pong", "connection still usable");
    stop(running).await;
}

#[tokio::test]
async fn sending_to_a_channel_you_are_not_in_is_not_a_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut owner = Client::connect(&running, "owner").await;
    owner.request(json!({"type":"create_channel","name":"private"}), "c").await;
    let mut outsider = Client::connect(&running, "outsider").await;
    let error = outsider.send_message("g:private", "x1", "hello?").await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "not_a_member", "{error}");
    assert_eq!(error["client_msg_id"], "x1");
    let error = outsider.request(json!({"type":"leave","channel":"g:private"}), "leave").await;
    assert_eq!(error["code"], "not_a_member", "{error}");
    // After joining, sending works; after leaving, it is refused again.
    outsider.request(json!({"type":"join","channel":"g:private"}), "join").await;
    let ok = outsider.send_message("g:private", "x2", "now I'm in").await;
    assert_eq!(ok["type"], "send_result", "{ok}");
    outsider.request(json!({"type":"leave","channel":"g:private"}), "leave2").await;
    let error = outsider.send_message("g:private", "x3", "gone").await;
    assert_eq!(error["code"], "not_a_member", "{error}");
    stop(running).await;
}

async fn handshake_status(running: &parley_server::Running, query: &str) -> (u16, String) {
    let url = format!("ws://{}/v1/ws?{query}", running.address);
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => (101, String::new()),
        Err(tungstenite::Error::Http(response)) => {
            let body =
                response.body().as_ref().map(|body| String::from_utf8_lossy(body).into_owned()).unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Err(error) => (0, error.to_string()),
    }
}

#[tokio::test]
async fn bad_tokens_and_versions_are_refused_before_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let expired = parley_gateway::auth::mint_hs256(SECRET, "alice", now_secs() - 3600).expect("token");
    let forged =
        parley_gateway::auth::mint_hs256("some-other-secret-123456", "alice", now_secs() + 3600).expect("token");
    for (query, status, needle) in [
        ("v=1".to_owned(), 401, "missing token"),
        ("v=1&token=garbage".to_owned(), 401, "unauthorized"),
        (format!("v=1&token={expired}"), 401, "expired"),
        (format!("v=1&token={forged}"), 401, "unauthorized"),
        (format!("v=2&token={}", token("alice")), 400, "unsupported_version"),
        (format!("v=abc&token={}", token("alice")), 400, "unsupported_version"),
        (format!("v=&token={}", token("alice")), 400, "unsupported_version"),
        (format!("v=1&v=2&token={}", token("alice")), 400, "unsupported_version"),
        (format!("v=99999999999&token={}", token("alice")), 400, "unsupported_version"),
    ] {
        let (actual, body) = handshake_status(&running, &query).await;
        assert_eq!(actual, status, "{query}: {body}");
        assert!(body.contains(needle), "{query}: {body}");
    }
    assert_eq!(handshake_status(&running, &format!("token={}", token("alice"))).await.0, 101, "v defaults to 1");
    let cache_buster = format!("v=1&_=1764296000000&token={}&", token("alice"));
    assert_eq!(handshake_status(&running, &cache_buster).await.0, 101, "unknown parameters are ignored");
    stop(running).await;
}

#[tokio::test]
async fn expiring_token_closes_with_4001() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let short = parley_gateway::auth::mint_hs256(SECRET, "alice", now_secs() + 2).expect("token");
    let url = format!("ws://{}/v1/ws?v=1&token={short}", running.address);
    let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("connects while valid");
    let mut client = Client { user: "alice".into(), socket, ready: json!(null), backlog: Vec::new(), auto_ack: true };
    let (code, reason) = close_of(&mut client).await;
    assert_eq!(code, 4001, "{reason}");
    stop(running).await;
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--idle-timeout-ms", "800"]).await;
    let mut silent = Client::connect(&running, "silent").await;
    let (code, _) = close_of(&mut silent).await;
    assert_eq!(code, 4009);
    stop(running).await;
}

#[tokio::test]
async fn send_rate_limit_answers_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--send-rate-per-sec", "1", "--send-burst", "3"]).await;
    let mut client = Client::connect(&running, "fast").await;
    client.request(json!({"type":"create_channel","name":"rl"}), "c").await;
    let mut codes = Vec::new();
    for n in 0..5 {
        let reply = client.send_message("g:rl", &format!("m{n}"), "x").await;
        codes.push(reply["type"].as_str().unwrap_or("").to_owned() + ":" + reply["code"].as_str().unwrap_or(""));
    }
    assert_eq!(codes[..3], ["send_result:", "send_result:", "send_result:"]);
    assert_eq!(codes[3..], ["error:rate_limited", "error:rate_limited"]);
    stop(running).await;
}

#[tokio::test]
async fn connection_limit_refuses_with_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--max-connections", "2"]).await;
    let _first = Client::connect(&running, "a").await;
    let _second = Client::connect(&running, "b").await;
    let (status, body) = handshake_status(&running, &format!("v=1&token={}", token("c"))).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overloaded"), "{body}");
    stop(running).await;
}

#[tokio::test]
async fn slow_consumer_is_cut_off_with_4008_without_slowing_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(
        dir.path(),
        &[
            "--outbound-queue",
            "16",
            "--send-rate-per-sec",
            "100000",
            "--send-burst",
            "100000",
            "--max-text-bytes",
            "50000",
            "--ack-timeout-ms",
            "600000",
        ],
    )
    .await;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"flood","members":["sleepy"]}), "c").await;
    let mut sleepy = Client::connect(&running, "sleepy").await;
    // Send far more than the socket buffers and the 16-frame queue hold (500 × 40 KB) while `sleepy` reads nothing. The
    // sender reads everything it is sent, so it keeps up and is never cut off.
    let text = "z".repeat(40_000);
    for n in 0..500 {
        let reply = sender.send_message("g:flood", &format!("f{n}"), &text).await;
        assert_eq!(reply["type"], "send_result", "{reply}");
        sender.backlog.clear();
    }
    let (code, reason) = close_of(&mut sleepy).await;
    assert_eq!(code, 4008, "{reason}");
    stop(running).await;
}

#[tokio::test]
async fn garbage_from_one_client_never_disturbs_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--send-rate-per-sec", "1000", "--send-burst", "1000"]).await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"create_channel","name":"calm","members":["bob"]}), "c").await;
    let mut bob = Client::connect(&running, "bob").await;
    let mut fuzzer = Client::connect(&running, "fuzzer").await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fragments = [
        "{",
        "}",
        "\"type\"",
        ":",
        "\"send\"",
        "\"history\"",
        ",",
        "\"channel\"",
        "\"g:calm\"",
        "null",
        "[",
        "]",
        "\u{0}",
        "1e999",
        "\"\\ud800\"",
        "-1",
        "18446744073709551616",
    ];
    for round in 0..300 {
        let mut frame = String::new();
        for _ in 0..(next() % 12) {
            frame.push_str(fragments[(next() % fragments.len() as u64) as usize]);
        }
        if round % 3 == 0 {
            let bytes: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let _ = fuzzer.socket.send(Message::Binary(bytes.into())).await;
        } else {
            let _ = fuzzer.socket.send(Message::Text(frame.into())).await;
        }
        if round % 30 == 0 {
            let sent = alice.send_message("g:calm", &format!("r{round}"), "steady").await;
            assert_eq!(sent["type"], "send_result", "{sent}");
        }
    }
    let received = bob.messages("g:calm", 10).await;
    assert_eq!(received.iter().filter_map(|m| m["seq"].as_u64()).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    let pong = fuzzer.request(json!({"type":"ping"}), "fuzzer-alive").await;
    assert_eq!(pong["type"], "pong");
    stop(running).await;
}

#[tokio::test]
async fn sequences_at_the_end_of_the_number_space_are_answered_and_the_connection_lives_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let admin = running.admin_address;
    let mut watcher = Client::connect(&running, "watcher").await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"create_channel","name":"edge"}), "c").await;
    let sent = alice.send_message("g:edge", "m1", "hello").await;
    assert_eq!(sent["type"], "send_result", "{sent}");
    let last = u64::MAX;
    for (frame, answer) in [
        (json!({"type":"sync","channels":{"g:edge": last}}), "synced"),
        (json!({"type":"sync","channels":{"g:edge": last - 1}}), "synced"),
        (json!({"type":"history","channel":"g:edge","after": last}), "history"),
        (json!({"type":"history","channel":"g:edge","after": last - 1, "before": last}), "history"),
        (json!({"type":"history","channel":"g:edge","before": 0}), "history"),
        (json!({"type":"read","channel":"g:edge","seq": last}), "read"),
    ] {
        let reply = alice.request(frame.clone(), "edge").await;
        assert_eq!(reply["type"], answer, "{frame} -> {reply}");
    }
    alice.send_json(json!({"type":"ack","channel":"g:edge","seq": last})).await;
    let pong = alice.request(json!({"type":"ping"}), "alive").await;
    assert_eq!(pong["type"], "pong");
    // Leaving undoes everything the connection held: its count and its presence.
    let watched = watcher.request(json!({"type":"subscribe_presence","users":["alice"]}), "w").await;
    assert_eq!(watched["users"][0]["status"], "online", "{watched}");
    assert_eq!(parley_test_support::metric(admin, "parley_gateway_connections").await, 2.0);
    drop(alice);
    let offline = watcher.expect(|frame| frame["type"] == "presence" && frame["user"] == "alice").await;
    assert_eq!(offline["status"], "offline", "{offline}");
    parley_test_support::eventually("alice's connection to be uncounted", Duration::from_secs(10), || async {
        (parley_test_support::metric(admin, "parley_gateway_connections").await == 1.0).then_some(())
    })
    .await;
    stop(running).await;
}
