//! The WebSocket wire itself, over raw TCP (`parley_test_support::wire`): the close code of each kind of broken
//! frame, a close that reaches a client which reads late, and a client that stops reading.

mod common;

use common::{server, stop, token, Client};
use parley_test_support::wire::{masked, masked_header, unmasked, Closing, RawClient, BINARY, FIN, PING, RSV1, TEXT};
use parley_test_support::{eventually, metric};
use serde_json::json;
use std::time::{Duration, Instant};

/// A raw client of `user` that has read its `ready` frame.
async fn connect(running: &common::Running, user: &str, receive_buffer: Option<u32>) -> RawClient {
    let target = format!("/v1/ws?v=1&token={}", token(user));
    let mut client = RawClient::connect(running.address, &target, receive_buffer).await.expect("upgraded");
    let ready = client.frame().await.expect("ready");
    assert!(ready.text().contains(r#""type":"ready""#), "{}", ready.text());
    client
}

#[tokio::test]
async fn frames_that_break_the_protocol_close_with_1002_and_invalid_utf8_with_1007() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("reserved bit set", masked(FIN | RSV1 | TEXT, br#"{"type":"ping"}"#), 1002),
        ("reserved data opcode", masked(FIN | 0x3, b"x"), 1002),
        ("client frame without a mask", unmasked(FIN | TEXT, br#"{"type":"ping"}"#), 1002),
        ("fragmented ping", masked(PING, b"p"), 1002),
        ("text that is not UTF-8", masked(FIN | TEXT, &[b'{', 0xff, 0xfe, b'}']), 1007),
        ("text cut inside a character", masked(FIN | TEXT, "é".as_bytes().get(..1).unwrap_or_default()), 1007),
    ];
    for (what, bytes, code) in cases {
        let mut client = connect(&running, "alice", None).await;
        client.write(&bytes).await.expect("written");
        assert_eq!(client.close(Duration::from_secs(10)).await, Closing::Code(code), "{what}");
    }
    // Binary frames carry the same JSON (docs/protocol.md), and the connection stays usable after bad JSON.
    let mut client = connect(&running, "alice", None).await;
    client.write(&masked(FIN | BINARY, br#"{"type":"ping","req_id":"b"}"#)).await.expect("written");
    let pong = client.frame().await.expect("pong");
    assert!(pong.text().contains(r#""req_id":"b""#), "{}", pong.text());
    stop(running).await;
}

#[tokio::test]
async fn a_frame_too_big_is_answered_1009_even_when_the_client_reads_it_late() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    // A client with a small receive window pings without reading, so the server's answers back up in its socket;
    // then it sends a frame far above the limit, and reads only a moment later. Its answers and the close 1009
    // still have to reach it: the server must not reset the connection under them.
    let mut client = connect(&running, "big", Some(2_048)).await;
    let pings = 200;
    for _ in 0..pings {
        client.write(&masked(FIN | TEXT, br#"{"type":"ping"}"#)).await.expect("ping written");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut oversized = masked_header(FIN | TEXT, 200_000);
    oversized.extend(std::iter::repeat_n(b'a', 60_000));
    // The server may stop reading before all of it is written.
    let _ = client.write(&oversized).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pongs = 0;
    let closing = loop {
        match tokio::time::timeout(Duration::from_secs(15), client.frame()).await.expect("the server acts in time") {
            Ok(frame) if frame.close_code().is_some() => break Closing::Code(frame.close_code().unwrap_or(0)),
            Ok(frame) => {
                assert!(frame.text().contains(r#""type":"pong""#), "{}", frame.text());
                pongs += 1;
            }
            Err(ended) => break Closing::Ended(ended),
        }
    };
    assert_eq!((pongs, closing), (pings, Closing::Code(1009)));
    stop(running).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_within_the_write_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--send-rate-per-sec", "100000", "--send-burst", "100000", "--max-text-bytes", "50000"];
    let limits = ["--ack-timeout-ms", "600000", "--write-timeout-ms", "1000"];
    let running = server(dir.path(), &[&flags[..], &limits[..]].concat()).await;
    let admin = running.admin_address;
    let mut sender = Client::connect(&running, "sender").await;
    sender.request(json!({"type":"create_channel","name":"flood","members":["sleepy"]}), "c").await;
    let mut sleepy = connect(&running, "sleepy", Some(2_048)).await;
    assert_eq!(metric(admin, "parley_gateway_connections").await, 2.0);
    // `sleepy` reads nothing more while the channel gets far more than the sockets' buffers hold (100 × 40 KB),
    // but less than its outbound queue holds (512 frames): only the blocked socket can tell the server.
    let text = "z".repeat(40_000);
    for n in 0..100 {
        let reply = sender.send_message("g:flood", &format!("f{n}"), &text).await;
        assert_eq!(reply["type"], "send_result", "{reply}");
        sender.backlog.clear();
    }
    let flooded = Instant::now();
    eventually("the server to let go of the client that stopped reading", Duration::from_secs(25), || async {
        (metric(admin, "parley_gateway_connections").await == 1.0).then_some(())
    })
    .await;
    // The socket stalled during the flood at the latest: gone within the write timeout (1 s), with room for a
    // loaded machine.
    let gone = flooded.elapsed();
    assert!(gone < Duration::from_secs(5), "gone {gone:?} after the flood");
    let stalls = metric(admin, r#"parley_gateway_limit_hits_total{limit="write_timeout"}"#).await;
    assert_eq!(stalls, 1.0, "counted as a write timeout");
    // Its socket ends (after whatever the buffers held), with the close 4008 if that made it in.
    let ending = loop {
        match tokio::time::timeout(Duration::from_secs(10), sleepy.frame()).await.expect("the socket ends") {
            Ok(frame) if frame.close_code().is_some() => break Closing::Code(frame.close_code().unwrap_or(0)),
            Ok(_) => {}
            Err(ended) => break Closing::Ended(ended),
        }
    };
    assert!(matches!(ending, Closing::Code(4008) | Closing::Ended(_)), "{ending:?}");
    let pong = sender.request(json!({"type":"ping"}), "still-there").await;
    assert_eq!(pong["type"], "pong");
    stop(running).await;
}
