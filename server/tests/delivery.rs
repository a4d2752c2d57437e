//! Delivery guarantees over a real WebSocket: ACK and retransmit, and resume with `sync`.
//!
//! These run on the real clock: on tokio's paused clock a loopback socket's Nagle delay (the server does not set
//! TCP_NODELAY) is invisible to tokio, which then jumps to the next timer. The exact timings are the gateway's unit
//! tests' (`gateway/src/connection/tests.rs`, paused clock); here the bounds leave room for a loaded machine.

mod common;

use common::{server, stop, Client};
use futures_util::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn withheld_acks_get_three_retransmits_then_close_4010() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--ack-timeout-ms", "400"]).await;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"acks","members":["mute"]}), "c").await;
    let mut mute = Client::connect(&running, "mute").await;
    mute.auto_ack = false;
    sender.send_message("g:acks", "only", "ack me").await;

    let started = Instant::now();
    let mut arrivals = Vec::new();
    let close_code = loop {
        match tokio::time::timeout(Duration::from_secs(10), mute.socket.next()).await.expect("server acts in time") {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("json");
                if frame["type"] == "message" {
                    assert_eq!(frame["seq"], 1, "only the one message is ever sent");
                    arrivals.push(started.elapsed());
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|frame| u16::from(frame.code)),
            Some(Ok(_)) => {}
            other => panic!("unexpected end: {other:?}"),
        }
    };
    assert_eq!(arrivals.len(), 4, "the original and exactly three retransmits: {arrivals:?}");
    // The first arrival is timed late (the clock starts after the send is confirmed), so check the spacing
    // between retransmissions: one ACK timeout, less what a loaded machine may add to one arrival and not the next.
    for pair in arrivals[1..].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(350),
            "retransmits are spaced by the ACK timeout: {arrivals:?}"
        );
    }
    assert_eq!(close_code, Some(4010));

    // Nothing is lost: the message is still there for a resume.
    let mut back = Client::connect(&running, "mute").await;
    back.send_json(json!({"type":"sync","req_id":"s","channels":{"g:acks":0}})).await;
    let replayed = back.messages("g:acks", 1).await;
    assert_eq!(replayed[0]["text"], "ack me");
    back.expect(|frame| frame["type"] == "synced").await;
    stop(running).await;
}

#[tokio::test]
async fn acknowledged_messages_are_not_retransmitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--ack-timeout-ms", "300"]).await;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"fine","members":["reader"]}), "c").await;
    let mut reader = Client::connect(&running, "reader").await;
    for n in 0..3 {
        sender.send_message("g:fine", &format!("m{n}"), "hello").await;
    }
    reader.messages("g:fine", 3).await;
    // Once the acknowledgements are in (a ping answered after them: the server reads a connection in order),
    // nothing is sent again. A retransmission before that is the server doing its job on a loaded machine.
    reader.request(json!({"type":"ping"}), "acked").await;
    reader.backlog.retain(|frame| frame["type"] != "message");
    // Four ACK timeouts, for a retransmission to show up if the acknowledgements were lost: the absence of an event
    // has no condition to wait on (the exact timing is the gateway's unit tests').
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let pong = reader.request(json!({"type":"ping"}), "p").await;
    assert_eq!(pong["type"], "pong");
    assert!(reader.backlog.iter().all(|frame| frame["type"] != "message"), "no retransmission: {:?}", reader.backlog);
    stop(running).await;
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_then_continues_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut bob = Client::connect(&running, "bob").await;
    bob.request(json!({"type":"create_channel","name":"resume","members":["alice"]}), "c").await;
    let mut alice = Client::connect(&running, "alice").await;
    for n in 1..=3 {
        bob.send_message("g:resume", &format!("m{n}"), &format!("text {n}")).await;
    }
    let seen = alice.messages("g:resume", 3).await;
    assert_eq!(seen.last().map(|m| m["seq"].clone()), Some(json!(3)));
    drop(alice);
    for n in 4..=6 {
        bob.send_message("g:resume", &format!("m{n}"), &format!("text {n}")).await;
    }
    let mut alice = Client::connect(&running, "alice").await;
    alice.send_json(json!({"type":"sync","req_id":"s1","channels":{"g:resume":3}})).await;
    let replayed = alice.messages("g:resume", 3).await;
    assert_eq!(replayed.iter().map(|m| m["seq"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), vec![4, 5, 6]);
    alice.expect(|frame| frame["type"] == "synced" && frame["req_id"] == "s1").await;
    bob.send_message("g:resume", "m7", "live").await;
    let live = alice.messages("g:resume", 1).await;
    assert_eq!(live[0]["seq"], 7, "live continues with no gap and no duplicate");
    let pong = alice.request(json!({"type":"ping"}), "p").await;
    assert_eq!(pong["type"], "pong");
    assert!(alice.backlog.iter().all(|frame| frame["type"] != "message"), "no duplicate: {:?}", alice.backlog);
    // Syncing a channel you are not in is refused clearly.
    let refused = alice.request(json!({"type":"sync","channels":{"g:elsewhere":0}}), "s2").await;
    assert_eq!(refused["code"], "no_such_channel", "{refused}");
    stop(running).await;
}
