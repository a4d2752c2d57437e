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

pub use parley_test_support::server::{stop, token, token_issued_at, Running, SECRET};

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
        Client::connect_with(running, user, &token(user)).await
    }

    /// Connects `user` with this token.
    pub async fn connect_with(running: &Running, user: &str, token: &str) -> Client {
        match Client::try_connect(running, user, token).await {
            Ok(client) => client,
            Err((status, body)) => panic!("{user}: the connect was refused with {status}: {body}"),
        }
    }

    /// Connects `user` with this token; a refusal before the upgrade is its HTTP status and body.
    pub async fn try_connect(running: &Running, user: &str, token: &str) -> Result<Client, (u16, String)> {
        use tokio_tungstenite::tungstenite::Error;
        let url = format!("ws://{}/v1/ws?v=1&token={token}", running.address);
        let mut socket = match connect_async(url).await {
            Ok((socket, _)) => socket,
            Err(Error::Http(response)) => {
                let body = response.body().as_ref().map(|body| String::from_utf8_lossy(body).into_owned());
                return Err((response.status().as_u16(), body.unwrap_or_default()));
            }
            Err(error) => panic!("{user}: the connect failed: {error}"),
        };
        let ready = next_json(&mut socket).await.expect("ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        Ok(Client { user: user.to_owned(), socket, ready, backlog: Vec::new(), auto_ack: true })
    }

    /// Reads (and keeps in the backlog) frames until the server closes; the close code and reason (0 without a
    /// close frame).
    pub async fn closed(&mut self) -> (u16, String) {
        let read = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
                    Some(Ok(Message::Close(None))) | None => return (0, String::new()),
                    Some(Ok(Message::Text(text))) => {
                        self.backlog.push(serde_json::from_str(&text).expect("server sends JSON"));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return (1, error.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .unwrap_or_else(|_| panic!("{}: the server did not close within 20 s", self.user))
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

/// One request to the server's HTTP API (`bearer`: a token or a server API key).
pub async fn http(
    running: &Running,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> parley_test_support::http::Response {
    parley_test_support::http::request(running.address, method, path, bearer, body).await
}
