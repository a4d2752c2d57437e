//! Presence: live online/away/offline with last seen, zombies going offline, and channel presence.

mod common;

use common::{server, stop, Client};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn watchers_see_online_away_and_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut bob = Client::connect(&running, "bob").await;
    let state = bob.request(json!({"type":"subscribe_presence","users":["alice"]}), "w").await;
    assert_eq!(state["users"][0]["status"], "offline", "{state}");

    let mut alice = Client::connect(&running, "alice").await;
    let online = bob.expect(|frame| frame["type"] == "presence" && frame["user"] == "alice").await;
    assert_eq!(online["status"], "online");
    let away = alice.request(json!({"type":"set_presence","status":"away"}), "a").await;
    assert_eq!(away["users"][0]["status"], "away", "{away}");
    let seen = bob.expect(|frame| frame["type"] == "presence" && frame["status"] == "away").await;
    assert_eq!(seen["user"], "alice");
    let refused = alice.request(json!({"type":"set_presence","status":"offline"}), "o").await;
    assert_eq!(refused["code"], "invalid_argument");

    // A second device keeps alice online; closing the last one makes her offline with a last-seen time.
    let second = Client::connect(&running, "alice").await;
    drop(alice);
    drop(second);
    let offline = bob.expect(|frame| frame["type"] == "presence" && frame["status"] == "offline").await;
    assert!(offline["last_seen"].as_u64().unwrap_or(0) > 0, "{offline}");
    let invalid = bob.request(json!({"type":"subscribe_presence","users":["not valid!"]}), "bad").await;
    assert_eq!(invalid["code"], "invalid_argument");
    stop(running).await;
}

#[tokio::test]
async fn a_silent_client_goes_offline_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--idle-timeout-ms", "1500"]).await;
    let mut watcher = Client::connect(&running, "watcher").await;
    watcher.request(json!({"type":"subscribe_presence","users":["zombie"]}), "w").await;
    let connected = Instant::now();
    let _zombie = Client::connect(&running, "zombie").await;
    watcher.expect(|frame| frame["type"] == "presence" && frame["status"] == "online").await;
    // The zombie sends nothing and is not read. The watcher keeps its own connection alive: a ping every 300 ms,
    // well within the idle timeout (the pace of a keep-alive, not a wait for the zombie), until it sees the zombie
    // go offline.
    let mut round = 0;
    let offline_after = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        watcher.request(json!({"type":"ping"}), &format!("p{round}")).await;
        if watcher.backlog.iter().any(|frame| frame["type"] == "presence" && frame["status"] == "offline") {
            break connected.elapsed();
        }
        round += 1;
        assert!(connected.elapsed() < Duration::from_secs(30), "the zombie never went offline: {:?}", watcher.backlog);
    };
    assert!(offline_after >= Duration::from_millis(1_500), "not before the idle timeout: {offline_after:?}");
    stop(running).await;
}

#[tokio::test]
async fn channel_presence_is_per_user_below_the_threshold_and_a_count_above() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--fanout-threshold", "3"]).await;
    let mut owner = Client::connect(&running, "owner").await;
    owner.request(json!({"type":"create_channel","name":"small","members":["a","b"]}), "c1").await;
    owner.request(json!({"type":"create_channel","name":"large","members":["a","b","c","d"]}), "c2").await;
    let _a = Client::connect(&running, "a").await;
    let small = owner.request(json!({"type":"channel_presence","channel":"g:small"}), "s").await;
    assert_eq!((small["members"].clone(), small["online"].clone()), (json!(3), json!(2)), "{small}");
    assert_eq!(small["users"].as_array().map(Vec::len), Some(3));
    let large = owner.request(json!({"type":"channel_presence","channel":"g:large"}), "l").await;
    assert_eq!((large["members"].clone(), large["online"].clone()), (json!(5), json!(2)), "{large}");
    assert!(large.get("users").is_none(), "aggregate only above the threshold: {large}");
    let mut outsider = Client::connect(&running, "outsider").await;
    let refused = outsider.request(json!({"type":"channel_presence","channel":"g:small"}), "x").await;
    assert_eq!(refused["code"], "not_a_member");
    stop(running).await;
}
