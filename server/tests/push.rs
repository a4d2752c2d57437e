//! Push notifications reach offline members through a real APNs client speaking HTTP/2 to a local server.

mod common;

use common::{server, stop, token, Client};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEVICE: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
const EC_KEY: &str = include_str!("../../push/tests/fixtures/ec-private.pem");

/// A stand-in APNs endpoint: HTTP/2 with prior knowledge on 127.0.0.1, recording every request.
async fn apns_server() -> (String, Arc<Mutex<Vec<(String, hyper::Version, Value)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let version = request.version();
                        let body = request.into_body().collect().await?.to_bytes();
                        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock().expect("log").push((path, version, json));
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

async fn post_device(running: &parley_server::Running, user: &str, body: &str) -> u16 {
    parley_test_support::http::request(running.address, "POST", "/v1/devices", Some(&token(user)), body).await.status
}

#[tokio::test]
async fn offline_members_get_a_push_and_online_ones_do_not() {
    let (endpoint, seen) = apns_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("apns.p8");
    std::fs::write(&key, EC_KEY).expect("key");
    let data = dir.path().join("data");
    let key_arg = key.display().to_string();
    let running = server(
        &data,
        &[
            "--apns-key",
            &key_arg,
            "--apns-key-id",
            "KEY123",
            "--apns-team-id",
            "TEAM123",
            "--apns-topic",
            "dev.parley.app",
            "--apns-endpoint",
            &endpoint,
        ],
    )
    .await;
    assert_eq!(post_device(&running, "bob", &format!(r#"{{"platform":"apns","token":"{DEVICE}"}}"#)).await, 201);
    assert_eq!(post_device(&running, "carol", r#"{"platform":"apns","token":"0a0b"}"#).await, 201);
    assert_eq!(post_device(&running, "bob", r#"{"platform":"pager","token":"x"}"#).await, 400);

    let mut alice = Client::connect(&running, "alice").await;
    let _carol_online = Client::connect(&running, "carol").await;
    alice.request(json!({"type":"create_channel","name":"team","members":["bob","carol"]}), "c").await;
    alice.send_message("g:team", "m1", "standup in 5").await;

    // Pushes are sent in the order of the messages (one worker, one job per message, each job done before the
    // next), so once a later message's push to bob has come, any push of the first message, to carol too, has come.
    alice.send_message("g:team", "m2", "marker").await;
    let pushes = parley_test_support::eventually("bob's push for the marker message", Duration::from_secs(30), || {
        let pushes = seen.lock().expect("log").clone();
        async move { pushes.iter().any(|(_, _, body)| body["aps"]["alert"]["body"] == "marker").then_some(pushes) }
    })
    .await;
    let to: Vec<&str> = pushes.iter().map(|(path, _, _)| path.as_str()).collect();
    let bob = format!("/3/device/{DEVICE}");
    assert_eq!(to, [bob.as_str(), bob.as_str()], "only offline bob gets pushes, never online carol: {pushes:?}");
    let (_, version, body) = &pushes[0];
    assert_eq!(*version, hyper::Version::HTTP_2);
    assert_eq!(body["aps"]["alert"]["body"], "standup in 5");
    assert_eq!(body["conversation_id"], "g:team");
    stop(running).await;
}
