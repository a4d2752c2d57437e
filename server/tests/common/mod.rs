//! Shared helpers for the server's integration tests: a real server on 127.0.0.1 (from `parley-test-support`) and a
//! real WebSocket client.

// Each test file uses its own part of these helpers.
#![allow(dead_code, missing_docs, unused_imports)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

pub use parley_test_support::server::{stop, token, Running, SECRET};

/// A server on any port with `data_dir`, the test secret and `extra` arguments.
pub async fn server(data_dir: &Path, extra: &[&str]) -> Running {
    parley_test_support::server::start(data_dir, Some(SECRET), parley_test_support::server::ANY_PORT, extra).await
}

pub struct Client {
    pub user: String,
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub ready: Value,
    /// Frames received but not yet consumed by `expect`.
    pub backlog: Vec<Value>,
    /// Acknowledge every message as it arrives (the protocol requires it; tests of retransmission turn it off).
    pub auto_ack: bool,
}

impl Client {
    pub async fn connect(running: &Running, user: &str) -> Client {
        let url = format!("ws://{}/v1/ws?v=1&token={}", running.address, token(user));
        let (mut socket, _) = connect_async(url).await.expect("websocket connects");
        let ready = next_json(&mut socket).await.expect("ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        Client { user: user.to_owned(), socket, ready, backlog: Vec::new(), auto_ack: true }
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.socket.send(Message::Text(frame.to_string().into())).await.expect("send");
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.socket.send(Message::Text(text.to_owned().into())).await.expect("send");
    }

    /// Waits for the first frame matching `predicate`, keeping the others in the backlog.
    pub async fn expect(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.backlog.iter().position(&predicate) {
            return self.backlog.remove(index);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let frame = tokio::time::timeout_at(deadline, next_json(&mut self.socket))
                .await
                .unwrap_or_else(|_| panic!("{}: timed out; backlog: {:?}", self.user, self.backlog))
                .unwrap_or_else(|| panic!("{}: connection closed; backlog: {:?}", self.user, self.backlog));
            if self.auto_ack && frame["type"] == "message" {
                let ack = json!({"type":"ack","channel":frame["channel"],"seq":frame["seq"]});
                self.socket.send(Message::Text(ack.to_string().into())).await.expect("ack");
            }
            if predicate(&frame) {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    pub async fn request(&mut self, mut frame: Value, req_id: &str) -> Value {
        frame["req_id"] = json!(req_id);
        self.send_json(frame).await;
        let id = req_id.to_owned();
        self.expect(move |reply| reply["req_id"] == id.as_str()).await
    }

    pub async fn send_message(&mut self, channel: &str, client_msg_id: &str, text: &str) -> Value {
        self.send_json(json!({"type":"send","channel":channel,"client_msg_id":client_msg_id,"text":text})).await;
        let id = client_msg_id.to_owned();
        self.expect(move |reply| {
            (reply["type"] == "send_result" || reply["type"] == "error") && reply["client_msg_id"] == id.as_str()
        })
        .await
    }

    /// Collects `count` message frames of a channel.
    pub async fn messages(&mut self, channel: &str, count: usize) -> Vec<Value> {
        let mut collected = Vec::with_capacity(count);
        while collected.len() < count {
            let channel = channel.to_owned();
            collected.push(
                self.expect(move |frame| frame["type"] == "message" && frame["channel"] == channel.as_str()).await,
            );
        }
        collected
    }
}

pub async fn next_json(socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).expect("server sends JSON")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}
