//! Draining an instance: every client is asked to reconnect at a random moment within the window, new
//! connections are refused, and the instance stops once the last connection is gone.

mod common;

use common::{server, token, Client};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

async fn post(address: std::net::SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let response = parley_test_support::http::request(address, "POST", path, token, body).await;
    (response.status, response.body)
}

#[tokio::test]
async fn drain_spreads_reconnects_over_the_window_then_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &["--admin-token", "admin-secret-token"]).await;
    const CLIENTS: usize = 200;
    let mut clients = Vec::with_capacity(CLIENTS);
    for n in 0..CLIENTS {
        clients.push(Client::connect(&running, &format!("user{n}")).await);
    }
    let (status, _) = post(running.admin_address, "/admin/drain", None, "{}").await;
    assert_eq!(status, 401, "the admin endpoint needs the token");
    let (status, _) = post(running.admin_address, "/admin/drain", Some("wrong"), "{}").await;
    assert_eq!(status, 401);

    let window = Duration::from_millis(2_000);
    let started = Instant::now();
    let (status, body) = post(
        running.admin_address,
        "/admin/drain",
        Some("admin-secret-token"),
        r#"{"window_ms":2000,"deadline_ms":10000}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains(r#""connections":200"#), "{body}");

    // While draining, the instance is not ready and takes no new connections.
    let url = format!("ws://{}/v1/ws?v=1&token={}", running.address, token("late"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 503),
        other => panic!("expected 503 while draining, got {other:?}"),
    }

    let mut waits = Vec::new();
    for mut client in clients {
        waits.push(tokio::spawn(async move {
            let mut told = false;
            loop {
                match client.socket.next().await {
                    Some(Ok(Message::Text(text))) => told |= text.contains(r#""type":"reconnect""#),
                    Some(Ok(Message::Close(frame))) => {
                        return (started.elapsed(), told, frame.map(|frame| u16::from(frame.code)));
                    }
                    Some(Ok(_)) => {}
                    _ => return (started.elapsed(), told, None),
                }
            }
        }));
    }
    let mut closes = Vec::new();
    for wait in waits {
        closes.push(wait.await.expect("client task"));
    }
    assert!(closes.iter().all(|(_, told, code)| *told && *code == Some(1012)), "every client was told to reconnect");
    // Departures fill the window's first four fifths; the last fifth is left for the clients to land elsewhere.
    let departures = window * 4 / 5;
    let latest = closes.iter().map(|(at, _, _)| *at).max().unwrap_or_default();
    // Measured where each client reads its close, on a real clock (see `delivery.rs` for why not a paused one): the
    // slack is for a loaded machine. The departure moments themselves are the gateway's unit tests'
    // (`gateway/src/drain.rs`).
    assert!(latest <= departures + Duration::from_millis(1_500), "all within the window: latest {latest:?}");
    // Spread: each quarter of that span saw some reconnects (uniform: about 50 each).
    let mut quarters = [0usize; 4];
    for (at, _, _) in &closes {
        let quarter = (at.as_millis() * 4 / departures.as_millis()).min(3) as usize;
        quarters[quarter] += 1;
    }
    println!("reconnect requests per quarter of the drain's departure span: {quarters:?}");
    assert!(quarters.iter().all(|count| *count >= 15), "reconnects are spread, not a storm: {quarters:?}");

    // The instance stops by itself once the last connection is gone.
    tokio::time::timeout(Duration::from_secs(10), running.task).await.expect("stops after draining").ok();
}
