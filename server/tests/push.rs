//! Push notifications reach offline members through a real APNs client speaking HTTP/2 to a local server.

mod common;

use common::{server, stop, token, Client};
use parley_test_support::apns::ApnsStub;
use serde_json::json;
use std::time::Duration;

const DEVICE: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";

async fn post_device(running: &parley_server::Running, user: &str, body: &str) -> u16 {
    parley_test_support::http::request(running.address, "POST", "/v1/devices", Some(&token(user)), body).await.status
}

#[tokio::test]
async fn offline_members_get_a_push_and_online_ones_do_not() {
    let apns = ApnsStub::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Erin's device, in the file where earlier versions kept devices: moved into the store at start.
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("devices.json"), r#"[["erin",[{"platform":"apns","token":"0e0e"}]]]"#).expect("file");
    let flags = apns.flags(dir.path());
    let running = server(&data, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let bob_device = format!(r#"{{"platform":"apns","token":"{DEVICE}"}}"#);
    assert_eq!(post_device(&running, "bob", &bob_device).await, 201);
    assert_eq!(post_device(&running, "bob", &bob_device).await, 200, "registered again: nothing new");
    assert_eq!(post_device(&running, "carol", r#"{"platform":"apns","token":"0a0b"}"#).await, 201);
    assert_eq!(post_device(&running, "dave", r#"{"platform":"apns","token":"0d0d"}"#).await, 201);
    assert_eq!(post_device(&running, "bob", r#"{"platform":"pager","token":"x"}"#).await, 400);

    let mut alice = Client::connect(&running, "alice").await;
    let _carol_online = Client::connect(&running, "carol").await;
    alice.request(json!({"type":"create_channel","name":"team","members":["bob","carol","dave","erin"]}), "c").await;
    // Dave, offline too, muted the channel; a non-member cannot mute it.
    let mute = |user: &'static str| {
        let address = running.address;
        async move {
            parley_test_support::http::request(address, "PUT", "/v1/channels/g:team/mute", Some(&token(user)), "")
                .await
                .status
        }
    };
    assert_eq!(mute("dave").await, 200);
    assert_eq!(mute("mallory").await, 403, "not a member");
    alice.send_message("g:team", "m1", "standup in 5").await;

    // Pushes are sent in the order of the messages (one worker, one job per message, each job done before the
    // next), so once a later message's pushes have come, any push of the first message, to carol too, has come.
    alice.send_message("g:team", "m2", "marker").await;
    let pushes = parley_test_support::eventually("the marker's pushes", Duration::from_secs(30), || {
        let pushes = apns.pushes();
        let markers = pushes.iter().filter(|push| push.body["aps"]["alert"]["body"] == "marker").count();
        async move { (markers == 2).then_some(pushes) }
    })
    .await;
    let mut to: Vec<&str> = pushes.iter().map(|push| push.path.as_str()).collect();
    to.sort_unstable();
    let bob = format!("/3/device/{DEVICE}");
    assert_eq!(
        to,
        [bob.as_str(), bob.as_str(), "/3/device/0e0e", "/3/device/0e0e"],
        "offline bob and erin get pushes, never online carol or dave, who muted the channel: {pushes:?}"
    );
    assert!(data.join("devices.json.imported").exists() && !data.join("devices.json").exists());
    assert_eq!(pushes[0].version, hyper::Version::HTTP_2);
    assert_eq!(pushes[0].body["aps"]["alert"]["body"], "standup in 5");
    assert_eq!(pushes[0].body["conversation_id"], "g:team");
    stop(running).await;
}

#[tokio::test]
async fn devices_and_mutes_are_refused_without_a_push_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(&dir.path().join("data"), &[]).await;
    let device = post_device(&running, "bob", r#"{"platform":"fcm","token":"t"}"#).await;
    assert_eq!(device, 503, "push_disabled");
    let mute =
        parley_test_support::http::request(running.address, "PUT", "/v1/channels/g:x/mute", Some(&token("bob")), "")
            .await;
    assert_eq!(mute.status, 503);
    assert!(mute.body.contains("push_disabled"), "{}", mute.body);
    stop(running).await;
}
