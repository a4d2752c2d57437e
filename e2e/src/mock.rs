//! A minimal in-memory protocol v1 server, only for checking the load tool itself (`parley-load __mock`).
//! It speaks just enough of the protocol: `ready`, `ping`, `create_channel`, `join`, `send` with broadcast, and
//! `GET /readyz`. No durability, no rate limits, no validation beyond the token signature.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use parley_core::protocol::ClientFrame;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct Channel {
    members: HashSet<String>,
    last_seq: u64,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    conns: HashMap<String, Vec<(u64, mpsc::UnboundedSender<Message>)>>,
    next_conn: u64,
    next_id: u64,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn view(id: &str, channel: &Channel, viewer: &str) -> Value {
    json!({
        "id": id,
        "kind": "group",
        "name": id.trim_start_matches("g:"),
        "members": channel.members.len(),
        "last_seq": channel.last_seq,
        "joined": channel.members.contains(viewer),
    })
}

fn broadcast(state: &State, channel: &Channel, frame: &Value) {
    let text = frame.to_string();
    for member in &channel.members {
        for (_, conn) in state.conns.get(member).into_iter().flatten() {
            let _ = conn.send(Message::text(text.clone()));
        }
    }
}

/// Serves until the process is killed.
pub async fn serve(listen: &str, secret: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    eprintln!("mock server listening on {listen}");
    let state: Shared = Arc::default();
    let key = Arc::new(jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()));
    loop {
        let (stream, _) = listener.accept().await.context("accept")?;
        let state = state.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let _ = connection(stream, state, key).await;
        });
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback type, not ours
async fn connection(mut stream: TcpStream, state: Shared, key: Arc<jsonwebtoken::DecodingKey>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut peek = [0u8; 12];
    let read = stream.peek(&mut peek).await?;
    if peek[..read].starts_with(b"GET /readyz") {
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).await?;
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await?;
        return Ok(());
    }
    let mut user = None;
    let ws = tokio_tungstenite::accept_hdr_async(stream, |request: &Request, response: Response| {
        let token =
            request.uri().query().unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("token=")).unwrap_or("");
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            Ok(data) => {
                user = Some(data.claims.sub);
                Ok(response)
            }
            Err(_) => {
                let mut refused = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                    r#"{"code":"unauthorized"}"#.to_owned(),
                ));
                *refused.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                Err(refused)
            }
        }
    })
    .await?;
    let user = user.context("no user")?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let conn_id = {
        let mut state = lock(&state);
        state.next_conn += 1;
        let id = state.next_conn;
        state.conns.entry(user.clone()).or_default().push((id, tx.clone()));
        let channels = state
            .channels
            .iter()
            .filter(|(_, channel)| channel.members.contains(&user))
            .map(|(id, channel)| view(id, channel, &user))
            .collect();
        let channels: Vec<Value> = channels;
        let ready = json!({
            "type": "ready",
            "protocol": 1,
            "session_id": format!("s-{id}"),
            "user": user,
            "heartbeat_interval_ms": 30_000,
            "limits": {"max_frame_bytes": 65536, "max_text_bytes": 4096, "max_channel_members": 10_000,
                       "send_rate_per_sec": 1000, "send_burst": 1000},
            "channels": channels,
        });
        let _ = tx.send(Message::text(ready.to_string()));
        id
    };
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(message)) = source.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(frame) = parley_core::protocol::decode_client(text.as_bytes()) else {
            continue;
        };
        let mut state = lock(&state);
        let answer = match frame {
            ClientFrame::Ping { req_id } => json!({"type": "pong", "req_id": req_id, "ts": 0}),
            ClientFrame::CreateChannel { req_id, name, .. } => {
                let id = format!("g:{name}");
                let mut channel = Channel::default();
                channel.members.insert(user.clone());
                let answer = json!({"type": "channel", "req_id": req_id, "channel": view(&id, &channel, &user)});
                state.channels.insert(id, channel);
                answer
            }
            ClientFrame::Join { req_id, channel: id } => {
                let mut channels = std::mem::take(&mut state.channels);
                let answer = match channels.get_mut(&id) {
                    Some(channel) => {
                        channel.members.insert(user.clone());
                        let member = json!({"type": "member", "channel": id, "user": user, "joined": true});
                        broadcast(&state, channel, &member);
                        json!({"type": "channel", "req_id": req_id, "channel": view(&id, channel, &user)})
                    }
                    None => error(req_id, None),
                };
                state.channels = channels;
                answer
            }
            ClientFrame::Send { req_id, channel: id, client_msg_id, text, .. } => {
                let mut channels = std::mem::take(&mut state.channels);
                state.next_id += 1;
                let message_id = state.next_id.to_string();
                let answer = match channels.get_mut(&id) {
                    Some(channel) if channel.members.contains(&user) => {
                        channel.last_seq += 1;
                        let seq = channel.last_seq;
                        let message = json!({"type": "message", "channel": id, "seq": seq, "id": message_id,
                            "sender": user, "text": text, "ts": 0, "client_msg_id": client_msg_id});
                        broadcast(&state, channel, &message);
                        json!({"type": "send_result", "req_id": req_id, "client_msg_id": client_msg_id,
                            "channel": id, "id": message_id, "seq": seq, "ts": 0, "duplicate": false})
                    }
                    _ => error(req_id, Some(client_msg_id)),
                };
                state.channels = channels;
                answer
            }
            _ => continue,
        };
        let _ = tx.send(Message::text(answer.to_string()));
    }
    {
        let mut state = lock(&state);
        if let Some(conns) = state.conns.get_mut(&user) {
            conns.retain(|(id, _)| *id != conn_id);
        }
    }
    drop(tx);
    writer.abort();
    Ok(())
}

fn error(req_id: Option<String>, client_msg_id: Option<String>) -> Value {
    json!({"type": "error", "req_id": req_id, "code": "no_such_channel", "message": "no such channel",
        "client_msg_id": client_msg_id})
}
