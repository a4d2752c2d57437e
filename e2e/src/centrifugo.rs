//! Centrifugo v6 for the load tool's comparison runs (`parley-load --protocol centrifugo`): its bidirectional
//! JSON client protocol over WebSocket, and a publisher on its server HTTP API.
//!
//! Client side: one WebSocket text frame carries one or more newline-separated JSON commands or replies. A
//! connection sends `{"id":1,"connect":{"token":"<HS256 JWT, sub = user>"}}`, then
//! `{"id":2,"subscribe":{"channel":"chat:<name>"}}`; the subscribe result names the stream position
//! (`offset`, `epoch`) when the namespace keeps history. The server pings with `{}` and the client answers
//! `{}`. Publications arrive as `{"push":{"channel":"…","pub":{"data":{"text":"…"},"offset":N}}}`; with
//! history on, `offset` grows by one per publication in the channel, so gaps and duplicates are counted from
//! it like Parley's `seq`.
//!
//! Publisher side: `POST <api>/publish` with `X-API-Key`, body `{"channel":…,"data":{"text":…}}`, answered
//! `{"result":{"offset":N,"epoch":"…"}}` or `{"error":{"code":…,"message":…}}`, over one keep-alive HTTP/1.1
//! connection.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, ConnectError, Shared, Target, Ws};
use crate::sys::now_nanos;

/// The WebSocket path of Centrifugo's bidirectional transport.
pub const WS_PATH: &str = "/connection/websocket";

/// Why a Centrifugo call failed.
#[derive(Debug, thiserror::Error)]
pub enum CentrifugoError {
    /// The API URL is not `http://<loopback host>:<port>[/prefix]`.
    #[error("bad API URL {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Connecting, writing or reading failed.
    #[error("API connection: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP answer could not be read.
    #[error("bad HTTP answer: {0}")]
    Http(String),
    /// The server answered with an HTTP error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The server answered with a Centrifugo error.
    #[error("centrifugo error {code}: {message}")]
    Api {
        /// Centrifugo error code.
        code: u32,
        /// Its message.
        message: String,
    },
    /// The answer was not the JSON expected.
    #[error("unexpected answer: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a subscription started from.
#[derive(Debug, Clone, Default)]
pub struct Subscribed {
    /// The channel's top offset when the subscription began (0 when the channel has no history yet).
    pub offset: u64,
    /// The stream epoch.
    pub epoch: String,
    /// Whether the server keeps the subscription recoverable (history and positions on).
    pub recoverable: bool,
}

/// The error of a reply.
#[derive(Debug, Deserialize)]
struct ReplyError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    message: String,
}

/// The fields of a subscribe result the tool uses.
#[derive(Debug, Default, Deserialize)]
struct SubscribeResult {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    recoverable: bool,
}

/// Publication data as the publisher sends it: `{"text": "..."}`.
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Publication<'a> {
    #[serde(default, borrow)]
    data: Option<Data<'a>>,
    #[serde(default)]
    offset: u64,
}

#[derive(Deserialize)]
struct Disconnect {
    #[serde(default)]
    code: u32,
}

#[derive(Deserialize)]
struct Push<'a> {
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "pub")]
    publication: Option<Publication<'a>>,
    #[serde(default)]
    unsubscribe: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    disconnect: Option<Disconnect>,
}

/// One reply line; only the fields the tool looks at, borrowed where it counts.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(default)]
    id: u32,
    #[serde(default)]
    error: Option<ReplyError>,
    #[serde(default, borrow)]
    push: Option<Push<'a>>,
    #[serde(default)]
    subscribe: Option<SubscribeResult>,
}

/// The lines of one text frame (a frame may carry several replies), without empty ones.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').map(str::trim).filter(|line| !line.is_empty())
}

/// A server ping: an empty reply.
fn is_ping(line: &str) -> bool {
    line == "{}"
}

/// Sends one command.
async fn send(ws: &mut Ws, command: serde_json::Value) -> Result<(), ConnectError> {
    ws.send(Message::text(command.to_string()))
        .await
        .map_err(|error| ConnectError { kind: client::classify_ws(&error), detail: error.to_string() })
}

/// Reads until the reply with `id` arrives, answering pings on the way.
async fn await_reply(
    ws: &mut Ws,
    id: u32,
    what: &str,
) -> Result<Result<Option<SubscribeResult>, ReplyError>, ConnectError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let mut pings = 0;
                let mut answer = None;
                for line in lines(text.as_str()) {
                    if is_ping(line) {
                        pings += 1;
                        continue;
                    }
                    let reply: Reply<'_> = serde_json::from_str(line).map_err(|error| ConnectError {
                        kind: format!("bad_{what}_reply"),
                        detail: format!("{error}: {line}"),
                    })?;
                    if reply.id != id {
                        continue;
                    }
                    answer = Some(match reply.error {
                        Some(error) => Err(error),
                        None => Ok(reply.subscribe),
                    });
                }
                for _ in 0..pings {
                    send(ws, json!({})).await?;
                }
                if let Some(answer) = answer {
                    return Ok(answer);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|frame| u16::from(frame.code)).unwrap_or(0);
                return Err(ConnectError { kind: format!("close_{code}"), detail: format!("closed before {what}") });
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                return Err(ConnectError { kind: client::classify_ws(&error), detail: error.to_string() })
            }
            None => return Err(ConnectError { kind: "closed".into(), detail: format!("eof before {what}") }),
        }
    }
}

/// Opens a TCP connection (optionally from `source`), does the WebSocket handshake, connects with `token`
/// and, when `channel` is given, subscribes to it.
pub async fn connect(
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    channel: Option<&str>,
    timeout: Duration,
) -> Result<(Ws, Option<Subscribed>), ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(target, token, source, channel)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError {
            kind: "timeout".into(),
            detail: format!("no connect{} reply within {timeout:?}", if channel.is_some() { "/subscribe" } else { "" }),
        }),
    }
}

async fn connect_inner(
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    channel: Option<&str>,
) -> Result<(Ws, Option<Subscribed>), ConnectError> {
    let stream = client::open_tcp(target, source).await?;
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(target.url(), stream, Some(client::ws_config()))
            .await
            .map_err(|error| ConnectError { kind: client::classify_ws(&error), detail: error.to_string() })?;
    send(&mut ws, json!({"id": 1, "connect": {"token": token, "name": "parley-load"}})).await?;
    if let Err(error) = await_reply(&mut ws, 1, "connect").await? {
        return Err(ConnectError { kind: format!("connect_error_{}", error.code), detail: error.message });
    }
    let Some(channel) = channel else { return Ok((ws, None)) };
    send(&mut ws, json!({"id": 2, "subscribe": {"channel": channel}})).await?;
    match await_reply(&mut ws, 2, "subscribe").await? {
        Ok(result) => {
            let result = result.unwrap_or_default();
            Ok((ws, Some(Subscribed { offset: result.offset, epoch: result.epoch, recoverable: result.recoverable })))
        }
        Err(error) => Err(ConnectError { kind: format!("subscribe_error_{}", error.code), detail: error.message }),
    }
}

/// Handles one received text frame: counts publications of the counted channel, notes errors, disconnects
/// and unsubscribes. Returns how many pings it carried (each wants a `{}` back).
fn on_text(shared: &Shared, text: &str, arrived: u64, next_offset: &mut u64) -> usize {
    let mut pings = 0;
    for line in lines(text) {
        if is_ping(line) {
            pings += 1;
            continue;
        }
        let Ok(reply) = serde_json::from_str::<Reply<'_>>(line) else {
            shared.event("unparsable_frame");
            static SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SHOWN.swap(true, Ordering::Relaxed) {
                eprintln!("warning: unparsable frame: {}", line.chars().take(300).collect::<String>());
            }
            continue;
        };
        if let Some(error) = reply.error {
            shared.event(format!("error_{}", error.code));
        }
        let Some(push) = reply.push else { continue };
        let counted = match (&shared.channel, push.channel.as_deref()) {
            (Some(want), Some(channel)) => want == channel,
            // A push without its channel name refers to the connection's only subscription.
            (Some(_), None) => true,
            (None, _) => false,
        };
        if let Some(publication) = push.publication {
            if counted {
                let text = publication.data.as_ref().and_then(|data| data.text.as_deref());
                let offset = (publication.offset > 0).then_some(publication.offset);
                shared.count_delivery(offset, text, arrived, next_offset);
            }
        } else if push.unsubscribe.is_some() {
            shared.event("unsubscribed");
        } else if let Some(disconnect) = push.disconnect {
            shared.event(format!("disconnect_{}", disconnect.code));
        }
    }
    pings
}

/// Holds a connection open: counts publications, answers pings, and closes when `stop` turns true.
pub async fn hold(mut ws: Ws, shared: Arc<Shared>, subscribed: Option<Subscribed>, mut stop: watch::Receiver<bool>) {
    if subscribed.as_ref().is_some_and(|sub| !sub.recoverable) {
        // The namespace has no history or recovery: offsets are not checked.
        shared.event("not_recoverable");
    }
    // Offsets continue from the channel's top offset at subscribe time.
    let mut next_offset = subscribed.map(|sub| sub.offset + 1).unwrap_or(0);
    shared.open.fetch_add(1, Ordering::Relaxed);
    let already_stopped = *stop.borrow_and_update();
    let stopped = stop.changed();
    tokio::pin!(stopped);
    if already_stopped {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    loop {
        tokio::select! {
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => {
                    let pings = on_text(&shared, text.as_str(), now_nanos(), &mut next_offset);
                    let mut failed = false;
                    for _ in 0..pings {
                        if ws.send(Message::text("{}")).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        shared.event("conn_send_failed");
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    client::record_close(&shared, frame);
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    shared.event(format!("conn_{}", client::classify_ws(&error)));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    shared.event("conn_eof");
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
            _ = &mut stopped => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// Where the server HTTP API is.
#[derive(Debug, Clone)]
pub struct ApiTarget {
    /// `host:port` as given.
    pub authority: String,
    /// Resolved address (loopback).
    pub addr: SocketAddr,
    /// Path prefix of the API handlers, e.g. `/api`.
    pub prefix: String,
}

impl ApiTarget {
    /// Parses `http://host:port[/prefix]` (the prefix defaults to `/api`); only loopback addresses.
    pub fn parse(url: &str) -> Result<ApiTarget, CentrifugoError> {
        let bad = |why: &str| CentrifugoError::BadUrl { url: url.to_owned(), why: why.to_owned() };
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("must start with http://"))?;
        let (authority, prefix) = match rest.find('/') {
            Some(index) => (&rest[..index], rest[index..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() { "/api".to_owned() } else { prefix.to_owned() };
        let addr = authority
            .to_socket_addrs()
            .map_err(|error| bad(&format!("cannot resolve: {error}")))?
            .next()
            .ok_or_else(|| bad("resolves to no address"))?;
        if !addr.ip().is_loopback() {
            return Err(bad("only loopback targets (127.0.0.0/8, ::1) are allowed"));
        }
        Ok(ApiTarget { authority: authority.to_owned(), addr, prefix })
    }
}

/// What a publish returned.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Published {
    /// The publication's offset in the channel's stream (0 without history).
    #[serde(default)]
    pub offset: u64,
    /// The stream epoch.
    #[serde(default)]
    pub epoch: String,
}

#[derive(Deserialize)]
struct ApiReply {
    #[serde(default)]
    result: Option<Published>,
    #[serde(default)]
    error: Option<ReplyError>,
}

/// A publisher on the server HTTP API: one keep-alive connection, reopened after a failure.
pub struct Publisher {
    target: ApiTarget,
    key: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Publisher {
    /// A publisher for `target` with API key `key` (connects on first use).
    pub fn new(target: ApiTarget, key: String) -> Publisher {
        Publisher { target, key, conn: None }
    }

    /// Drops the connection (after an abandoned call): the next call opens a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Publishes `{"text": text}` to `channel`; returns once the server answered.
    pub async fn publish(&mut self, channel: &str, text: &str) -> Result<Published, CentrifugoError> {
        let body = json!({"channel": channel, "data": {"text": text}}).to_string();
        let result = self.call("publish", &body).await;
        if matches!(result, Err(CentrifugoError::Io(_) | CentrifugoError::Http(_))) {
            // The connection is in an unknown state: the next call opens a new one.
            self.conn = None;
        }
        let reply: ApiReply = serde_json::from_slice(&result?)?;
        match (reply.result, reply.error) {
            (_, Some(error)) => Err(CentrifugoError::Api { code: error.code, message: error.message }),
            (Some(published), None) => Ok(published),
            (None, None) => Ok(Published::default()),
        }
    }

    /// One POST to `<prefix>/<method>`; returns the body of a 200 answer.
    async fn call(&mut self, method: &str, body: &str) -> Result<Vec<u8>, CentrifugoError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let stream = TcpStream::connect(self.target.addr).await?;
                stream.set_nodelay(true)?;
                self.conn.insert(BufReader::new(stream))
            }
        };
        let request = format!(
            "POST {}/{method} HTTP/1.1\r\nHost: {}\r\nX-API-Key: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.target.prefix,
            self.target.authority,
            self.key,
            body.len()
        );
        conn.get_mut().write_all(request.as_bytes()).await?;
        let (status, body) = read_response(conn).await?;
        if status != 200 {
            return Err(CentrifugoError::Status { status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        Ok(body)
    }
}

/// Reads one HTTP/1.1 response (status, body) with a `Content-Length` or chunked body.
async fn read_response(conn: &mut BufReader<TcpStream>) -> Result<(u16, Vec<u8>), CentrifugoError> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(CentrifugoError::Http("connection closed before the status line".into()));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| CentrifugoError::Http(format!("status line {:?}", line.trim_end())))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(CentrifugoError::Http("connection closed in the headers".into()));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| CentrifugoError::Http(format!("{header:?}")))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|_| CentrifugoError::Http(format!("chunk size {:?}", line.trim_end())))?;
            let start = body.len();
            body.resize(start + size + 2, 0);
            conn.read_exact(&mut body[start..]).await?;
            body.truncate(start + size);
            if size == 0 {
                break;
            }
        }
    } else {
        let length = length.ok_or_else(|| CentrifugoError::Http("no Content-Length".into()))?;
        body.resize(length, 0);
        conn.read_exact(&mut body).await?;
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_publications_by_offset() {
        let shared = Shared::new(Some("chat:a".into()), true);
        let mut next = 3;
        let publication = |offset: u64| {
            format!(r#"{{"push":{{"channel":"chat:a","pub":{{"data":{{"text":"t1000 i0 x"}},"offset":{offset}}}}}}}"#)
        };
        // Two publications and a ping in one frame, then a gap and a repeat.
        let frame = format!("{}\n{}\n{{}}", publication(3), publication(4));
        assert_eq!(on_text(&shared, &frame, 3_000_000, &mut next), 1);
        assert_eq!(on_text(&shared, &publication(6), 3_000_000, &mut next), 0);
        assert_eq!(on_text(&shared, &publication(6), 3_000_000, &mut next), 0);
        let other = r#"{"push":{"channel":"chat:b","pub":{"data":{"text":"t1"},"offset":9}}}"#;
        assert_eq!(on_text(&shared, other, 0, &mut next), 0);
        let error = r#"{"id":7,"error":{"code":103,"message":"permission denied"}}"#;
        on_text(&shared, error, 0, &mut next);
        let counts = shared.counts();
        assert_eq!((counts.deliveries, counts.gaps, counts.dupes), (4, 1, 1));
        assert_eq!(counts.events.get("error_103"), Some(&1));
        assert!(!counts.events.contains_key("unparsable_frame"));
        let mut hist = crate::hist::Hist::new();
        hist.merge_sparse(&shared.latency_sparse());
        assert_eq!(hist.count(), 4);
    }

    #[test]
    fn parses_api_targets() {
        let target = ApiTarget::parse("http://127.0.0.1:9000").expect("parse");
        assert_eq!(target.prefix, "/api");
        let target = ApiTarget::parse("http://localhost:9000/other/").expect("parse");
        assert_eq!(target.prefix, "/other");
        assert!(ApiTarget::parse("http://8.8.8.8:80/api").is_err());
        assert!(ApiTarget::parse("ws://127.0.0.1:1").is_err());
    }

    #[test]
    fn reads_replies() {
        let reply: Reply<'_> = serde_json::from_str(
            r#"{"id":2,"subscribe":{"recoverable":true,"epoch":"AbCd","offset":5,"positioned":true}}"#,
        )
        .expect("parse");
        let result = reply.subscribe.expect("subscribe result");
        assert_eq!((reply.id, result.offset, result.recoverable), (2, 5, true));
        let reply: Reply<'_> =
            serde_json::from_str(r#"{"id":1,"connect":{"client":"c","version":"6.9.1","ping":25,"pong":true}}"#)
                .expect("parse");
        assert!(reply.id == 1 && reply.error.is_none() && reply.push.is_none());
    }
}
