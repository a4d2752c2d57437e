//! End-to-end behaviour over a real WebSocket on 127.0.0.1: DMs, channel order, idempotency, history, restart.

mod common;

use common::{server, stop, token, Client, Running, SECRET};
use parley_test_support::server::ANY_PORT;
use serde_json::{json, Value};
use std::collections::HashSet;

#[tokio::test]
async fn direct_message_between_two_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    let mut bob = Client::connect(&running, "bob").await;

    let opened = alice.request(json!({"type":"open_dm","user":"bob"}), "r1").await;
    assert_eq!(opened["type"], "channel", "{opened}");
    assert_eq!(opened["channel"]["id"], "dm:alice:bob");
    assert_eq!(opened["channel"]["name"], "bob");
    let result = alice.send_message("dm:alice:bob", "m1", "hello bob").await;
    assert_eq!(result["type"], "send_result", "{result}");
    assert_eq!(result["seq"], 1);
    let received = bob.messages("dm:alice:bob", 1).await;
    assert_eq!(received[0]["text"], "hello bob");
    assert_eq!(received[0]["sender"], "alice");
    assert_eq!(received[0]["id"], result["id"]);
    // Bob answers on the same derived id without opening anything.
    let answer = bob.send_message("dm:alice:bob", "b1", "hi alice").await;
    assert_eq!(answer["seq"], 2, "{answer}");
    let back = alice.messages("dm:alice:bob", 2).await;
    assert_eq!(back.iter().map(|m| m["seq"].as_u64()).collect::<Vec<_>>(), vec![Some(1), Some(2)]);
    // A third user can neither read nor write the DM.
    let mut carol = Client::connect(&running, "carol").await;
    let denied = carol.send_message("dm:alice:bob", "c1", "let me in").await;
    assert_eq!(denied["code"], "not_a_member", "{denied}");
    let denied = carol.request(json!({"type":"history","channel":"dm:alice:bob"}), "h").await;
    assert_eq!(denied["code"], "not_a_member", "{denied}");
    // DM with yourself is refused.
    let refused = alice.request(json!({"type":"open_dm","user":"alice"}), "self").await;
    assert_eq!(refused["code"], "invalid_argument", "{refused}");
    stop(running).await;
}

#[tokio::test]
async fn fifty_members_five_concurrent_senders_see_one_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--send-rate-per-sec", "1000", "--send-burst", "1000"]).await;
    let mut owner = Client::connect(&running, "u0").await;
    let members: Vec<String> = (1..50).map(|n| format!("u{n}")).collect();
    let created = owner.request(json!({"type":"create_channel","name":"crowd","members":members}), "c").await;
    assert_eq!(created["channel"]["members"], 50, "{created}");
    let mut clients = vec![owner];
    for n in 1..50 {
        clients.push(Client::connect(&running, &format!("u{n}")).await);
    }
    const PER_SENDER: usize = 20;
    const SENDERS: usize = 5;
    let total = PER_SENDER * SENDERS;
    // Five senders pipeline their sends concurrently; everyone (senders included) collects every message.
    let mut tasks = Vec::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            if index < SENDERS {
                for n in 0..PER_SENDER {
                    client
                        .send_json(json!({"type":"send","channel":"g:crowd","client_msg_id":format!("{index}-{n}"),"text":format!("from {index} #{n}")}))
                        .await;
                }
            }
            let received = client.messages("g:crowd", total).await;
            received.iter().map(|m| (m["seq"].as_u64().unwrap_or(0), m["id"].as_str().unwrap_or("").to_owned())).collect::<Vec<_>>()
        }));
    }
    let mut orders = Vec::new();
    for task in tasks {
        orders.push(task.await.expect("client task"));
    }
    let reference = &orders[0];
    assert_eq!(
        reference.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>(),
        "gap-free from 1"
    );
    assert_eq!(reference.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(), total, "distinct ids");
    for order in &orders {
        assert_eq!(order, reference, "every member sees the identical order");
    }
    stop(running).await;
}

#[tokio::test]
async fn retried_send_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"create_channel","name":"retry"}), "c").await;
    let first = alice.send_message("g:retry", "same-id", "once").await;
    let again = alice.send_message("g:retry", "same-id", "once").await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!((first["id"].clone(), first["seq"].clone()), (again["id"].clone(), again["seq"].clone()));
    // Concurrent retries in flight at the same time also collapse to one message.
    for _ in 0..5 {
        alice.send_json(json!({"type":"send","channel":"g:retry","client_msg_id":"burst","text":"x"})).await;
    }
    let mut seqs = HashSet::new();
    for _ in 0..5 {
        let reply = alice.expect(|frame| frame["type"] == "send_result" && frame["client_msg_id"] == "burst").await;
        seqs.insert(reply["seq"].as_u64());
    }
    assert_eq!(seqs.len(), 1, "one message for five retries");
    let history = alice.request(json!({"type":"history","channel":"g:retry"}), "h").await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2), "{history}");
    stop(running).await;
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .map(|messages| messages.iter().filter_map(|m| m["seq"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn history_pages_over_websocket_and_http_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--send-rate-per-sec", "1000", "--send-burst", "1000"]).await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"create_channel","name":"log"}), "c").await;
    for n in 1..=45 {
        let result = alice.send_message("g:log", &format!("m{n}"), &format!("text {n}")).await;
        assert_eq!(result["seq"], n);
    }
    let newest = alice.request(json!({"type":"history","channel":"g:log","limit":20}), "p1").await;
    assert_eq!(seqs(&newest), (26..=45).collect::<Vec<_>>());
    assert_eq!(newest["has_more"], true);
    let older = alice.request(json!({"type":"history","channel":"g:log","limit":20,"before":26}), "p2").await;
    assert_eq!(seqs(&older), (6..=25).collect::<Vec<_>>());
    let oldest = alice.request(json!({"type":"history","channel":"g:log","limit":20,"before":6}), "p3").await;
    assert_eq!(seqs(&oldest), (1..=5).collect::<Vec<_>>());
    assert_eq!(oldest["has_more"], false);
    let after = alice.request(json!({"type":"history","channel":"g:log","limit":10,"after":40}), "p4").await;
    assert_eq!(seqs(&after), (41..=45).collect::<Vec<_>>());
    let too_big = alice.request(json!({"type":"history","channel":"g:log","limit":500}), "p5").await;
    assert_eq!(too_big["code"], "invalid_argument");

    let http = http_get(&running, "/v1/channels/g:log/messages?limit=10&before=11", "alice").await;
    assert_eq!(http.0, 200, "{}", http.1);
    assert_eq!(seqs(&http.1), (1..=10).collect::<Vec<_>>());
    let forbidden = http_get(&running, "/v1/channels/g:log/messages", "mallory").await;
    assert_eq!((forbidden.0, forbidden.1["code"].clone()), (403, json!("not_a_member")));
    let listed = http_get(&running, "/v1/channels", "alice").await;
    assert_eq!(listed.1["channels"][0]["last_seq"], 45, "{}", listed.1);

    stop(running).await;
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    assert_eq!(alice.ready["channels"][0]["id"], "g:log", "{}", alice.ready);
    assert_eq!(alice.ready["channels"][0]["last_seq"], 45);
    let page = alice.request(json!({"type":"history","channel":"g:log","limit":200}), "r").await;
    assert_eq!(seqs(&page), (1..=45).collect::<Vec<_>>());
    assert_eq!(page["messages"][44]["text"], "text 45");
    // The order continues after the restart with no gap and no reused id.
    let next = alice.send_message("g:log", "after-restart", "46th").await;
    assert_eq!(next["seq"], 46);
    let last_id: u64 = page["messages"][44]["id"].as_str().and_then(|id| id.parse().ok()).expect("id");
    let next_id: u64 = next["id"].as_str().and_then(|id| id.parse().ok()).expect("id");
    assert!(next_id > last_id);
    // The retry key survives the restart too.
    let retry = alice.send_message("g:log", "m45", "text 45").await;
    assert_eq!((retry["seq"].clone(), retry["duplicate"].clone()), (json!(45), json!(true)));
    stop(running).await;
}

/// A GET with `user`'s token; the status and the JSON body.
async fn http_get(running: &Running, path: &str, user: &str) -> (u16, Value) {
    let response = parley_test_support::http::request(running.address, "GET", path, Some(&token(user)), "").await;
    (response.status, response.json())
}

#[tokio::test]
async fn dev_login_tokens_survive_a_restart_and_are_off_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev_login = || parley_test_support::server::start(dir.path(), None, ANY_PORT, &["--insecure-dev-login"]);
    let running = dev_login().await;
    let (status, body) = http_post(&running, "/v1/dev/login", r#"{"user":"demo"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["insecure"], true);
    let token = body["token"].as_str().expect("token").to_owned();
    stop(running).await;
    let running = dev_login().await;
    let url = format!("ws://{}/v1/ws?v=1&token={token}", running.address);
    assert!(tokio_tungstenite::connect_async(url).await.is_ok(), "the old dev token still works");
    stop(running).await;
    let running = parley_test_support::server::start(dir.path(), Some(SECRET), ANY_PORT, &[]).await;
    let (status, body) = http_post(&running, "/v1/dev/login", r#"{"user":"demo"}"#).await;
    assert_eq!((status, body["code"].clone()), (404, json!("dev_login_disabled")));
    stop(running).await;
}

/// A POST without a token; the status and the JSON body.
async fn http_post(running: &Running, path: &str, body: &str) -> (u16, Value) {
    let response = parley_test_support::http::request(running.address, "POST", path, None, body).await;
    (response.status, response.json())
}

#[tokio::test]
async fn read_cursor_unread_counts_and_live_receipts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"create_channel","name":"reads","members":["bob"]}), "c").await;
    for n in 1..=5 {
        alice.send_message("g:reads", &format!("m{n}"), "hello").await;
    }
    let mut bob = Client::connect(&running, "bob").await;
    assert_eq!(bob.ready["channels"][0]["unread"], 5, "{}", bob.ready);
    let answer = bob.request(json!({"type":"read","channel":"g:reads","seq":3}), "r1").await;
    assert_eq!((answer["type"].clone(), answer["seq"].clone()), (json!("read"), json!(3)), "{answer}");
    // Alice sees Bob's receipt live.
    let receipt = alice.expect(|frame| frame["type"] == "read" && frame["user"] == "bob").await;
    assert_eq!(receipt["seq"], 3);
    // The cursor never moves back, and is clamped to the last message.
    let back = bob.request(json!({"type":"read","channel":"g:reads","seq":1}), "r2").await;
    assert_eq!(back["seq"], 3);
    let far = bob.request(json!({"type":"read","channel":"g:reads","seq":99}), "r3").await;
    assert_eq!(far["seq"], 5);
    let listed = bob.request(json!({"type":"list_channels"}), "l").await;
    assert_eq!(
        (listed["channels"][0]["read_seq"].clone(), listed["channels"][0]["unread"].clone()),
        (json!(5), json!(0))
    );
    let mut carol = Client::connect(&running, "carol").await;
    let refused = carol.request(json!({"type":"read","channel":"g:reads","seq":1}), "x").await;
    assert_eq!(refused["code"], "not_a_member");
    stop(running).await;
}

#[tokio::test]
async fn sender_sees_sent_then_delivered_then_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut alice = Client::connect(&running, "alice").await;
    let mut bob = Client::connect(&running, "bob").await;
    alice.request(json!({"type":"open_dm","user":"bob"}), "dm").await;
    let sent = alice.send_message("dm:alice:bob", "d1", "did you get this?").await;
    assert_eq!(sent["type"], "send_result", "sent: {sent}");
    bob.messages("dm:alice:bob", 1).await; // bob's client acknowledges on receipt
    let delivered = alice.expect(|frame| frame["type"] == "delivered" && frame["user"] == "bob").await;
    assert_eq!(delivered["seq"], 1, "delivered: {delivered}");
    bob.request(json!({"type":"read","channel":"dm:alice:bob","seq":1}), "r").await;
    let read = alice.expect(|frame| frame["type"] == "read" && frame["user"] == "bob").await;
    assert_eq!(read["seq"], 1, "read: {read}");
    stop(running).await;
}
