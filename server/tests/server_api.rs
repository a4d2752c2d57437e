//! The server API (`/server/v1/...`) over real HTTP, with real WebSocket clients watching what it does: API keys,
//! channels managed with full authority, system messages, disconnects (4003), token revocations (4004, refused
//! connects, kept across a restart), presence; and JWT keys rotated by `kid`.

mod common;

use common::{http, server, stop, token, token_issued_at, Client, SECRET};
use parley_test_support::server::ANY_PORT;
use serde_json::{json, Value};
use std::time::Duration;

const OLD_KEY: &str = "server-api-key-old-0123456789";
const KEY: &str = "server-api-key-new-0123456789";

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_secs()).unwrap_or(0)
}

/// A server whose server API takes [`OLD_KEY`] and [`KEY`] (a key being rotated).
async fn with_api(dir: &std::path::Path) -> common::Running {
    server(dir, &["--server-api-key", &format!("{OLD_KEY},{KEY}")]).await
}

/// A server API call with [`KEY`]: its status and JSON body.
async fn api(running: &common::Running, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let response = http(running, method, path, Some(KEY), &body).await;
    (response.status, response.json())
}

#[tokio::test]
async fn the_server_api_is_off_without_a_key_and_refuses_a_wrong_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let off = server(dir.path(), &[]).await;
    let response = http(&off, "POST", "/server/v1/channels", Some(KEY), r#"{"name":"x"}"#).await;
    assert_eq!((response.status, &response.json()["code"]), (404, &json!("server_api_disabled")), "{response:?}");
    stop(off).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let create = r#"{"name":"keyed"}"#;
    for bearer in [None, Some("server-api-key-new-012345678"), Some("wrong"), Some(token("alice").as_str())] {
        let response = http(&running, "POST", "/server/v1/channels", bearer, create).await;
        assert_eq!((response.status, &response.json()["code"]), (401, &json!("unauthorized")), "{bearer:?}");
        assert!(response.json()["message"].as_str().is_some_and(|message| !message.is_empty()));
    }
    // Nothing was created by the refused calls; both keys of the rotation are accepted.
    let response = http(&running, "POST", "/server/v1/channels", Some(OLD_KEY), create).await;
    assert_eq!(response.status, 201, "{response:?}");
    let response = http(&running, "POST", "/server/v1/channels", Some(KEY), create).await;
    assert_eq!(response.status, 200, "{response:?}");
    stop(running).await;
}

#[tokio::test]
async fn the_backend_creates_idempotently_and_adds_removes_and_bans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let mut alice = Client::connect(&running, "alice").await;
    let mut bob = Client::connect(&running, "bob").await;

    let request = json!({"name":"ops","owner":"lead","members":["alice"],"visibility":"private"});
    let (status, created) = api(&running, "POST", "/server/v1/channels", request.clone()).await;
    assert_eq!((status, &created["channel"]["id"], &created["channel"]["members"]), (201, &json!("g:ops"), &json!(2)));
    assert_eq!(created["channel"]["visibility"], "private", "{created}");
    let joined = alice.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:ops").await;
    assert_eq!(joined["channel"]["joined"], true, "alice was added live: {joined}");
    let (status, again) = api(&running, "POST", "/server/v1/channels", request).await;
    assert_eq!((status, &again["channel"]["members"]), (200, &json!(2)), "the same request again: {again}");
    let (status, conflict) = api(&running, "POST", "/server/v1/channels", json!({"name":"ops"})).await;
    assert_eq!((status, &conflict["code"]), (409, &json!("channel_exists")), "{conflict}");

    // Added at once (a private channel: bob could not join by himself), with a role.
    let refused = bob.request(json!({"type":"join","channel":"g:ops"}), "j1").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let (status, added) =
        api(&running, "POST", "/server/v1/channels/g:ops/members", json!({"user":"bob","role":"admin"})).await;
    assert_eq!((status, &added["channel"]["members"]), (200, &json!(3)), "{added}");
    let view = bob.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:ops").await;
    assert_eq!(view["channel"]["joined"], true, "{view}");
    let listed = bob.request(json!({"type":"list_channels"}), "l1").await;
    let ops = listed["channels"].as_array().and_then(|channels| channels.iter().find(|view| view["id"] == "g:ops"));
    assert_eq!(ops.map(|view| view["role"].clone()), Some(json!("admin")), "{listed}");

    // Removed: bob's connection drops the channel.
    let (status, removed) = api(&running, "DELETE", "/server/v1/channels/g:ops/members/bob", Value::Null).await;
    assert_eq!((status, &removed["channel"]["members"]), (200, &json!(2)), "{removed}");
    let left = bob.expect(|frame| frame["type"] == "channel" && frame["channel"]["joined"] == false).await;
    assert_eq!(left["channel"]["id"], "g:ops");
    let (status, error) = api(&running, "DELETE", "/server/v1/channels/g:ops/members/bob", Value::Null).await;
    assert_eq!((status, &error["code"]), (400, &json!("invalid_argument")), "not a member any more: {error}");

    // Public now; banned, bob cannot join; unbanned, he can.
    let (status, patched) = api(&running, "PATCH", "/server/v1/channels/g:ops", json!({"visibility":"public"})).await;
    assert_eq!((status, &patched["channel"]["visibility"]), (200, &json!("public")), "{patched}");
    let (status, _) = api(&running, "POST", "/server/v1/channels/g:ops/bans", json!({"user":"bob"})).await;
    assert_eq!(status, 200);
    let banned = bob.request(json!({"type":"join","channel":"g:ops"}), "j2").await;
    assert_eq!(banned["code"], "banned", "{banned}");
    let (status, _) = api(&running, "DELETE", "/server/v1/channels/g:ops/bans/bob", Value::Null).await;
    assert_eq!(status, 200);
    let rejoined = bob.request(json!({"type":"join","channel":"g:ops"}), "j3").await;
    assert_eq!(rejoined["channel"]["joined"], true, "{rejoined}");

    let (status, error) = api(&running, "POST", "/server/v1/channels/dm:alice:bob/members", json!({"user":"x"})).await;
    assert_eq!((status, &error["code"]), (400, &json!("invalid_argument")), "group channels only: {error}");
    let (status, error) = api(&running, "POST", "/server/v1/channels/g:nowhere/bans", json!({"user":"bob"})).await;
    assert_eq!((status, &error["code"]), (404, &json!("no_such_channel")), "{error}");
    stop(running).await;
}

#[tokio::test]
async fn a_system_message_reaches_connected_members_live_from_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let mut alice = Client::connect(&running, "alice").await;
    api(&running, "POST", "/server/v1/channels", json!({"name":"news","members":["alice"]})).await;
    alice.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:news").await;

    let post = json!({"client_msg_id":"notice-1","text":"maintenance at noon"});
    let (status, sent) = api(&running, "POST", "/server/v1/channels/g:news/messages", post.clone()).await;
    assert_eq!(
        (status, &sent["channel"], &sent["seq"], &sent["duplicate"]),
        (200, &json!("g:news"), &json!(1), &json!(false))
    );
    assert!(sent["id"].as_str().is_some_and(|id| id.parse::<u64>().is_ok()), "the id is a string: {sent}");
    assert!(sent["ts"].as_u64().is_some_and(|ts| ts > 0), "{sent}");
    let received = alice.messages("g:news", 1).await;
    assert_eq!((&received[0]["sender"], &received[0]["text"]), (&json!("@server"), &json!("maintenance at noon")));
    assert_eq!(received[0]["id"], sent["id"]);

    let (status, again) = api(&running, "POST", "/server/v1/channels/g:news/messages", post).await;
    assert_eq!((status, &again["id"], &again["duplicate"]), (200, &sent["id"], &json!(true)), "idempotent: {again}");
    let history = alice.request(json!({"type":"history","channel":"g:news"}), "h").await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "one message: {history}");
    let (status, error) =
        api(&running, "POST", "/server/v1/channels/g:news/messages", json!({"client_msg_id":"x","text":""})).await;
    assert_eq!((status, &error["code"]), (400, &json!("invalid_argument")), "{error}");
    stop(running).await;
}

#[tokio::test]
async fn a_deleted_channel_leaves_its_members_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let mut alice = Client::connect(&running, "alice").await;
    let mut bob = Client::connect(&running, "bob").await;
    api(&running, "POST", "/server/v1/channels", json!({"name":"temp","members":["alice","bob"]})).await;
    for client in [&mut alice, &mut bob] {
        client.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:temp").await;
    }
    alice.send_message("g:temp", "a1", "before").await;
    bob.messages("g:temp", 1).await;

    let response = http(&running, "DELETE", "/server/v1/channels/g:temp", Some(KEY), "").await;
    assert_eq!(response.status, 204, "{response:?}");
    for client in [&mut alice, &mut bob] {
        let gone = client.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:temp").await;
        assert_eq!(gone["channel"]["joined"], false, "{}: {gone}", client.user);
    }
    let refused = alice.send_message("g:temp", "a2", "after").await;
    assert_eq!(refused["code"], "no_such_channel", "{refused}");
    let listed = bob.request(json!({"type":"list_channels"}), "l").await;
    assert_eq!(listed["channels"], json!([]), "{listed}");
    let (status, error) = api(&running, "DELETE", "/server/v1/channels/g:temp", Value::Null).await;
    assert_eq!((status, &error["code"]), (404, &json!("no_such_channel")), "{error}");
    let (status, error) =
        api(&running, "POST", "/server/v1/channels/g:temp/messages", json!({"client_msg_id":"s","text":"t"})).await;
    assert_eq!((status, &error["code"]), (404, &json!("no_such_channel")), "{error}");
    stop(running).await;
}

#[tokio::test]
async fn a_disconnect_closes_every_session_of_the_user_with_4003() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let mut phone = Client::connect(&running, "alice").await;
    let mut laptop = Client::connect(&running, "alice").await;
    let mut bob = Client::connect(&running, "bob").await;

    let (status, body) = api(&running, "POST", "/server/v1/users/alice/disconnect", Value::Null).await;
    assert_eq!((status, &body["user"]), (202, &json!("alice")), "{body}");
    for client in [&mut phone, &mut laptop] {
        let (code, reason) = client.closed().await;
        assert_eq!(code, 4003, "{reason}");
        assert!(reason.contains("disconnected"), "{reason}");
    }
    let pong = bob.request(json!({"type":"ping"}), "p").await;
    assert_eq!(pong["type"], "pong", "other users stay connected");
    // A disconnect is no ban: alice comes back with the same token.
    let mut back = Client::connect(&running, "alice").await;
    assert_eq!(back.request(json!({"type":"ping"}), "p").await["type"], "pong");
    let (status, _) = api(&running, "POST", "/server/v1/users/nobody/disconnect", Value::Null).await;
    assert_eq!(status, 202, "nobody connected: nothing to close");
    stop(running).await;
}

#[tokio::test]
async fn a_revocation_closes_live_sessions_with_4004_and_refuses_old_tokens_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let issued = now_secs() - 10;
    let old = token_issued_at("alice", issued);
    let mut alice = Client::connect_with(&running, "alice", &old).await;
    let mut legacy = Client::connect_with(&running, "alice", &token("alice")).await;
    let mut bob = Client::connect_with(&running, "bob", &token_issued_at("bob", issued)).await;

    let (status, body) = api(&running, "POST", "/server/v1/users/alice/revoke", Value::Null).await;
    assert_eq!((status, &body["user"]), (202, &json!("alice")), "{body}");
    let before = body["before"].as_u64().expect("the time in force");
    assert!(before > issued, "{body}");
    for client in [&mut alice, &mut legacy] {
        let (code, reason) = client.closed().await;
        assert_eq!(code, 4004, "issued before, or without iat: {reason}");
        assert!(reason.contains("revoked"), "{reason}");
    }
    assert_eq!(bob.request(json!({"type":"ping"}), "p").await["type"], "pong", "other users' tokens stay valid");

    // The old token, and any without iat, is refused at connect; a token issued since connects.
    let refused = Client::try_connect(&running, "alice", &old).await.err().expect("the old token is refused");
    assert_eq!(refused.0, 401, "{refused:?}");
    assert!(refused.1.contains("token_revoked"), "{refused:?}");
    let refused = Client::try_connect(&running, "alice", &token("alice")).await.err().expect("no iat: refused");
    assert_eq!(refused.0, 401, "{refused:?}");
    let fresh = token_issued_at("alice", before);
    let mut again = Client::connect_with(&running, "alice", &fresh).await;
    assert_eq!(again.request(json!({"type":"ping"}), "p").await["type"], "pong");
    // The HTTP API refuses the old token too.
    let listed = http(&running, "GET", "/v1/channels", Some(&old), "").await;
    assert_eq!((listed.status, &listed.json()["code"]), (401, &json!("token_revoked")), "{listed:?}");
    assert_eq!(http(&running, "GET", "/v1/channels", Some(&fresh), "").await.status, 200);
    // An earlier time leaves the later one in force; a time in milliseconds is refused.
    let (status, body) = api(&running, "POST", "/server/v1/users/alice/revoke", json!({"before": issued})).await;
    assert_eq!((status, &body["before"]), (202, &json!(before)), "{body}");
    assert_eq!(again.request(json!({"type":"ping"}), "p2").await["type"], "pong", "the fresh session stays");
    let (status, body) =
        api(&running, "POST", "/server/v1/users/alice/revoke", json!({"before": now_secs() * 1000})).await;
    assert_eq!((status, &body["code"]), (400, &json!("invalid_argument")), "{body}");
    stop(running).await;

    // The revocation is kept in the data directory: a restarted server still refuses the old token.
    let restarted = with_api(dir.path()).await;
    let refused = Client::try_connect(&restarted, "alice", &old).await.err().expect("still refused after a restart");
    assert!(refused.1.contains("token_revoked"), "{refused:?}");
    Client::connect_with(&restarted, "alice", &fresh).await;
    stop(restarted).await;
}

#[tokio::test]
async fn presence_of_users_for_the_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = with_api(dir.path()).await;
    let mut alice = Client::connect(&running, "alice").await;
    alice.request(json!({"type":"set_presence","status":"away"}), "a").await;
    let _bob = Client::connect(&running, "bob").await;
    let (status, body) = api(&running, "GET", "/server/v1/presence?users=alice,bob,carol", Value::Null).await;
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<(&str, &str)> = body["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|view| (view["user"].as_str().unwrap_or(""), view["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(statuses, vec![("alice", "away"), ("bob", "online"), ("carol", "offline")], "in the order asked");
    assert_eq!(body["users"][2]["last_seen"], 0, "never seen: {body}");
    let (status, body) = api(&running, "GET", "/server/v1/presence?users=", Value::Null).await;
    assert_eq!((status, &body["code"]), (400, &json!("invalid_argument")), "{body}");
    stop(running).await;
}

#[tokio::test]
async fn jwt_keys_are_rotated_by_kid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = ("rotation-old-secret-0123456789", "rotation-new-secret-0123456789");
    let keys = format!("{SECRET},2026-06={old},2026-12={new}");
    let running =
        parley_test_support::server::start(dir.path(), None, ANY_PORT, &["--jwt-hs256-secret", keys.as_str()]).await;
    let hour = Duration::from_secs(3_600);
    let with =
        |secret: &str, kid: Option<&str>| parley_test_support::hs256_token_with(secret, kid, "alice", None, hour);
    // Without a kid: the secret given without one (the configuration before the rotation keeps working).
    Client::connect_with(&running, "alice", &token("alice")).await;
    Client::connect_with(&running, "alice", &with(old, Some("2026-06"))).await;
    Client::connect_with(&running, "alice", &with(new, Some("2026-12"))).await;
    for (token, what) in [
        (with(new, Some("2026-06")), "signed with another key than its kid's"),
        (with(new, Some("2027-01")), "an unknown kid"),
        (with(new, None), "a kid'd key without a kid"),
    ] {
        let refused = Client::try_connect(&running, "alice", &token).await.err().expect(what);
        assert_eq!(refused.0, 401, "{what}: {refused:?}");
    }
    stop(running).await;
}
