//! Draining an instance: every client is asked to reconnect at a random moment within the window, new
//! connections are refused, and the instance stops once the last connection is gone.

mod common;

use common::{server, token, Client};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn post(address: std::net::SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let auth = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, text)
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
