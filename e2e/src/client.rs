//! Protocol client pieces for the load tool: token minting, connecting, and per-connection loops that count
//! deliveries, check `seq` order and measure latency with a small footprint.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use parley_core::protocol::{ChannelView, ClientFrame, LimitsView, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::hist::{Hist, SparseHist};
use crate::sys::now_nanos;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Where to connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// `host:port` as given.
    pub authority: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Path with query prefix, e.g. `/v1/ws?v=1`.
    pub path: String,
}

impl Target {
    /// Parses `ws://host:port[/path[?query]]`; a missing path means `/v1/ws?v=1`.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("url must start with ws:// (got {url:?}); wss is not supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" { "/v1/ws?v=1".to_owned() } else { path.to_owned() };
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {authority:?}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority:?} resolves to no address"))?;
        if !addr.ip().is_loopback() {
            bail!("refusing to load {addr}: only loopback targets (127.0.0.0/8, ::1) are allowed");
        }
        Ok(Target { authority: authority.to_owned(), addr, path })
    }

    /// The URL without a token (`ws://host:port/path`).
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.authority, self.path)
    }

    /// The full URL for one token.
    pub fn url_with_token(&self, token: &str) -> String {
        let separator = if self.path.contains('?') { '&' } else { '?' };
        format!("ws://{}{}{}token={}", self.authority, self.path, separator, token)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// Mints an HS256 token for `user` valid for `ttl_secs`.
pub fn mint_token(secret: &str, user: &str, ttl_secs: u64) -> anyhow::Result<String> {
    let claims = Claims { sub: user, exp: crate::sys::now_secs() + ttl_secs };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("minting token")
}

/// Small buffers: a load client holds thousands of these.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// What `ready` told us.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Client heartbeat interval.
    pub heartbeat: Duration,
    /// Server limits.
    pub limits: LimitsView,
    /// The user's channels.
    pub channels: Vec<ChannelView>,
}

/// Why a connection attempt failed, in a form that can be counted.
#[derive(Debug)]
pub struct ConnectError {
    /// Short class, e.g. `http_503`, `refused`, `timeout`.
    pub kind: String,
    /// Detail.
    pub detail: String,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

pub(crate) fn classify_io(error: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match error.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset => "reset".into(),
        AddrInUse | AddrNotAvailable => "no_ports".into(),
        TimedOut => "timeout".into(),
        _ if error.raw_os_error() == Some(24) => "emfile".into(),
        other => format!("io_{other:?}").to_lowercase(),
    }
}

pub(crate) fn classify_ws(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => format!("http_{}", response.status().as_u16()),
        tungstenite::Error::Io(io) => classify_io(io),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed".into(),
        tungstenite::Error::Protocol(_) => "protocol".into(),
        _ => "ws_other".into(),
    }
}

/// Opens a TCP connection (optionally from `source`), does the WebSocket handshake and reads `ready`.
pub async fn connect(
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<(Ws, Ready), ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(target, token, source)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError { kind: "timeout".into(), detail: format!("no ready within {timeout:?}") }),
    }
}

/// Opens a TCP connection to `target` from `source` (the kernel picks when `None`), without Nagle's delay.
pub(crate) async fn open_tcp(target: &Target, source: Option<IpAddr>) -> Result<TcpStream, ConnectError> {
    let io = |error: std::io::Error| ConnectError { kind: classify_io(&error), detail: error.to_string() };
    let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(io)?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).map_err(io)?;
    }
    let stream = socket.connect(target.addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    Ok(stream)
}

async fn connect_inner(target: &Target, token: &str, source: Option<IpAddr>) -> Result<(Ws, Ready), ConnectError> {
    let stream = open_tcp(target, source).await?;
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(target.url_with_token(token), stream, Some(ws_config()))
            .await
            .map_err(|error| ConnectError { kind: classify_ws(&error), detail: error.to_string() })?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(text.as_str()) {
                Ok(ServerFrame::Ready { heartbeat_interval_ms, limits, channels, .. }) => {
                    let heartbeat = Duration::from_millis(heartbeat_interval_ms.max(1000));
                    return Ok((ws, Ready { heartbeat, limits, channels }));
                }
                Ok(other) => {
                    return Err(ConnectError {
                        kind: "no_ready".into(),
                        detail: format!("first frame was not ready: {other:?}"),
                    })
                }
                Err(error) => {
                    return Err(ConnectError {
                        kind: "bad_ready".into(),
                        detail: format!("{error}: {}", text.as_str()),
                    })
                }
            },
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|frame| u16::from(frame.code)).unwrap_or(0);
                return Err(ConnectError { kind: format!("close_{code}"), detail: "closed before ready".into() });
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(ConnectError { kind: classify_ws(&error), detail: error.to_string() }),
            None => return Err(ConnectError { kind: "closed".into(), detail: "eof before ready".into() }),
        }
    }
}

/// Sends one client frame.
pub async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> anyhow::Result<()> {
    let text = serde_json::to_string(frame).context("encoding frame")?;
    ws.send(Message::text(text)).await.context("sending frame")
}

/// Reads frames until `want` accepts one (returns it) or `timeout` passes. Frames it rejects are dropped,
/// except `error` frames with the same `req_id`, which fail.
pub async fn request(ws: &mut Ws, frame: &ClientFrame, timeout: Duration) -> anyhow::Result<ServerFrame> {
    let req_id = frame.req_id().map(str::to_owned);
    send_frame(ws, frame).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("no answer to {frame:?} within {timeout:?}"))?;
        match next {
            Some(Ok(Message::Text(text))) => {
                let Ok(parsed) = serde_json::from_str::<ServerFrame>(text.as_str()) else {
                    continue;
                };
                match &parsed {
                    ServerFrame::Error { req_id: got, code, message, .. } if *got == req_id => {
                        bail!("server answered {}: {message}", code.as_str())
                    }
                    ServerFrame::Channel { req_id: got, .. }
                    | ServerFrame::Channels { req_id: got, .. }
                    | ServerFrame::History { req_id: got, .. }
                    | ServerFrame::Pong { req_id: got, .. }
                        if *got == req_id =>
                    {
                        return Ok(parsed)
                    }
                    _ => continue,
                }
            }
            Some(Ok(Message::Close(frame))) => bail!("server closed the connection: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => bail!("connection failed: {error}"),
            None => bail!("connection ended"),
        }
    }
}

/// A borrowed view of the fields the hot path needs; everything else is skipped without allocating.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Loose<'a>,
    #[serde(default, deserialize_with = "loose_u64")]
    seq: Option<u64>,
    #[serde(default, borrow)]
    text: Loose<'a>,
    #[serde(default, borrow)]
    code: Loose<'a>,
    #[serde(default, borrow)]
    client_msg_id: Loose<'a>,
}

/// A string field that may also be something else (`channel` is an object in `channel` frames): non-strings
/// read as `None` instead of failing the whole frame.
#[derive(Default)]
struct Loose<'a>(Option<Cow<'a, str>>);

impl Loose<'_> {
    fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Borrowed(value))))
            }
            fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Owned(value.to_owned()))))
            }
            fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
                Ok(Loose(Some(Cow::Owned(value))))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Loose(None))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

fn loose_u64<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(number) => number.as_u64(),
        _ => None,
    })
}

/// The send time a load message carries: its text starts with `t<unix nanos> `.
pub fn sent_at(text: &str) -> Option<u64> {
    let digits = text.strip_prefix('t')?;
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Counters shared by all connections of one process.
#[derive(Debug, Default)]
pub struct Shared {
    /// The channel whose messages are counted (`None`: count nothing).
    pub channel: Option<String>,
    /// Whether to record per-delivery latency.
    pub record_latency: bool,
    /// Messages received in `channel`.
    pub deliveries: AtomicU64,
    /// Sends confirmed by a `send_result` (not duplicates), over all senders of this process.
    pub confirmed: AtomicU64,
    /// Messages skipped over (a `seq` jumped ahead).
    pub gaps: AtomicU64,
    /// Messages at or below an already seen `seq`.
    pub dupes: AtomicU64,
    /// Connections closed or failed while they should have stayed open.
    pub dropped: AtomicU64,
    /// Connections currently open (after `ready`).
    pub open: AtomicU64,
    /// Latency (µs) from the send time in the text to arrival.
    pub latency: Mutex<Option<Hist>>,
    /// Error frames and close reasons, by code.
    pub events: Mutex<BTreeMap<String, u64>>,
}

/// A snapshot of [`Shared`] for reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Messages received in the channel.
    pub deliveries: u64,
    /// Skipped `seq`s.
    pub gaps: u64,
    /// Repeated or backwards `seq`s.
    pub dupes: u64,
    /// Connections lost.
    pub dropped: u64,
    /// Connections open.
    pub open: u64,
    /// Error frames and close codes by name.
    pub events: BTreeMap<String, u64>,
}

impl Counts {
    /// Adds another snapshot.
    pub fn add(&mut self, other: &Counts) {
        self.deliveries += other.deliveries;
        self.gaps += other.gaps;
        self.dupes += other.dupes;
        self.dropped += other.dropped;
        self.open += other.open;
        for (key, value) in &other.events {
            *self.events.entry(key.clone()).or_default() += value;
        }
    }
}

/// What a received frame was.
enum Seen<'a> {
    /// A message in the counted channel (with its `seq`).
    Delivery(Option<u64>),
    /// Anything else the caller may want to look at.
    Other(Probe<'a>),
    /// Nothing of interest.
    Nothing,
}

/// Batches cumulative `ack`s: one after `every` deliveries, or `delay` after the first unacknowledged one
/// (the server retransmits what stays unacknowledged for `ack_timeout_ms`, 5 s by default, and closes a
/// connection with more than `max_unacked`, 1024, outstanding). Each ack is a syscall and a wake-up on both
/// sides, so they are kept rare: 1.5-3 s after the first unacknowledged message, or every 256 messages.
struct Acker {
    frame: Option<(String, u64)>,
    acked: u64,
    latest: u64,
    pending: u64,
    due: Option<Instant>,
    delay: Duration,
    every: u64,
}

impl Acker {
    fn new(channel: Option<&str>, delay: Duration) -> Acker {
        Acker {
            frame: channel.map(|channel| (channel.to_owned(), 0)),
            acked: 0,
            latest: 0,
            pending: 0,
            due: None,
            delay,
            every: 256,
        }
    }

    /// Notes a delivery; returns true when an ack should go out now, and arms `due` otherwise.
    fn delivered(&mut self, seq: Option<u64>) -> bool {
        let Some(seq) = seq else { return false };
        self.latest = self.latest.max(seq);
        self.pending += 1;
        if self.due.is_none() {
            self.due = Some(Instant::now() + self.delay);
        }
        self.pending >= self.every
    }

    /// The ack frame to send, if anything is unacknowledged.
    fn take(&mut self) -> Option<Message> {
        self.due = None;
        self.pending = 0;
        if self.latest <= self.acked {
            return None;
        }
        self.acked = self.latest;
        let (channel, _) = self.frame.as_ref()?;
        let ack = ClientFrame::Ack { channel: channel.clone(), seq: self.acked };
        serde_json::to_string(&ack).ok().map(Message::text)
    }
}

impl Shared {
    /// New counters for `channel`.
    pub fn new(channel: Option<String>, record_latency: bool) -> Self {
        Shared {
            channel,
            record_latency,
            latency: Mutex::new(if record_latency { Some(Hist::new()) } else { None }),
            ..Default::default()
        }
    }

    /// Counts one event (error code, close code, ...).
    pub fn event(&self, name: impl Into<String>) {
        let mut events = self.events.lock().unwrap_or_else(|poison| poison.into_inner());
        *events.entry(name.into()).or_default() += 1;
    }

    /// A snapshot of the counters.
    pub fn counts(&self) -> Counts {
        Counts {
            deliveries: self.deliveries.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            dupes: self.dupes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            events: self.events.lock().unwrap_or_else(|poison| poison.into_inner()).clone(),
        }
    }

    /// The latency histogram in wire form.
    pub fn latency_sparse(&self) -> SparseHist {
        self.latency
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .as_ref()
            .map(Hist::to_sparse)
            .unwrap_or_default()
    }

    /// Counts one delivery in the counted channel. `position` is its place in the channel's stream (Parley's
    /// `seq`, Centrifugo's `offset`) and `next` the next expected one (0: unknown yet, the first one sets it):
    /// a jump ahead counts the skipped ones as gaps, a repeat or step back counts a duplicate. With latency
    /// recording on, the send time at the start of `text` gives the delivery latency.
    pub fn count_delivery(&self, position: Option<u64>, text: Option<&str>, arrived: u64, next: &mut u64) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(position) = position {
            if *next == 0 || position == *next {
                *next = position + 1;
            } else if position > *next {
                self.gaps.fetch_add(position - *next, Ordering::Relaxed);
                *next = position + 1;
            } else {
                self.dupes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.record_latency {
            if let Some(sent) = text.and_then(sent_at) {
                let micros = arrived.saturating_sub(sent) / 1000;
                let mut hist = self.latency.lock().unwrap_or_else(|poison| poison.into_inner());
                if let Some(hist) = hist.as_mut() {
                    hist.record(micros);
                }
            }
        }
    }

    /// Handles one received text frame; `arrived` is the wall clock (ns) when it was read.
    /// `next_seq` is the next expected `seq` in the channel (0: unknown yet).
    /// Returns the delivery's `seq`, or the probe for the caller when it is not a counted message.
    fn on_text<'a>(&self, text: &'a str, arrived: u64, next_seq: &mut u64) -> Seen<'a> {
        let Ok(probe) = serde_json::from_str::<Probe<'a>>(text) else {
            self.event("unparsable_frame");
            static SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SHOWN.swap(true, Ordering::Relaxed) {
                eprintln!("warning: unparsable frame: {}", text.chars().take(300).collect::<String>());
            }
            return Seen::Nothing;
        };
        if probe.kind == "message" {
            if let (Some(channel), Some(want)) = (probe.channel.as_deref(), &self.channel) {
                if channel == want.as_str() {
                    self.count_delivery(probe.seq, probe.text.as_deref(), arrived, next_seq);
                    return Seen::Delivery(probe.seq);
                }
            }
            return Seen::Nothing;
        }
        if probe.kind == "error" {
            self.event(format!("error_{}", probe.code.as_deref().unwrap_or("?")));
        }
        Seen::Other(probe)
    }
}

/// The next expected `seq` of `channel` according to `ready` (0 when the user is not a member).
pub fn next_seq_from(ready: &Ready, channel: Option<&str>) -> u64 {
    channel
        .and_then(|channel| ready.channels.iter().find(|view| view.id == channel && view.joined))
        .map(|view| view.last_seq + 1)
        .unwrap_or(0)
}

pub(crate) fn record_close(shared: &Shared, frame: Option<tungstenite::protocol::CloseFrame>) {
    let code = frame.map(|frame| u16::from(frame.code)).unwrap_or(0);
    shared.event(format!("close_{code}"));
}

/// Holds a connection open: counts deliveries, acknowledges them (batched), answers pings, sends `ping` at
/// the heartbeat interval, and closes when `stop` turns true. `phase` (0..1000) spreads the first heartbeat
/// and the ack delay so that thousands of connections do not act in the same instant.
pub async fn hold(mut ws: Ws, shared: Arc<Shared>, ready: Ready, phase: u64, mut stop: watch::Receiver<bool>) {
    let mut next_seq = next_seq_from(&ready, shared.channel.as_deref());
    shared.open.fetch_add(1, Ordering::Relaxed);
    let phase = phase % 1000;
    let first = ready.heartbeat.mul_f64(0.5 + phase as f64 / 2000.0);
    let heartbeat = tokio::time::sleep(first);
    tokio::pin!(heartbeat);
    let mut acker = Acker::new(shared.channel.as_deref(), Duration::from_millis(1500 + phase * 3 / 2));
    let ack_timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(ack_timer);
    let ping = Message::text(r#"{"type":"ping"}"#);
    // One long-lived future: re-creating `changed()` on every frame costs a Notify registration each time.
    let already_stopped = *stop.borrow_and_update();
    let stopped = stop.changed();
    tokio::pin!(stopped);
    if already_stopped {
        shared.open.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    loop {
        let outgoing = tokio::select! {
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => {
                    let arrived = now_nanos();
                    match shared.on_text(text.as_str(), arrived, &mut next_seq) {
                        Seen::Delivery(seq) => {
                            let armed = acker.due.is_some();
                            if acker.delivered(seq) {
                                acker.take()
                            } else {
                                if let (false, Some(due)) = (armed, acker.due) {
                                    ack_timer.as_mut().reset(due);
                                }
                                None
                            }
                        }
                        _ => None,
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    record_close(&shared, frame);
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => None,
                Some(Err(error)) => {
                    shared.event(format!("conn_{}", classify_ws(&error)));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    shared.event("conn_eof");
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
            () = &mut ack_timer, if acker.due.is_some() => acker.take(),
            () = &mut heartbeat => {
                heartbeat.as_mut().reset(Instant::now() + ready.heartbeat);
                Some(ping.clone())
            }
            _ = &mut stopped => {
                // Only ever set to true (or dropped): either way, close.
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
        };
        if let Some(frame) = outgoing {
            if ws.send(frame).await.is_err() {
                shared.event("conn_send_failed");
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// How one sender sends.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// Channel id.
    pub channel: String,
    /// Prefix of `client_msg_id`s (unique per run and sender).
    pub id_prefix: String,
    /// How many messages at most.
    pub count: u64,
    /// Spacing between sends (pacing; `send_rate` of the server is respected by the caller's choice).
    pub interval: Duration,
    /// Sends allowed ahead of their slot (burst) when the sender fell behind.
    pub burst: u32,
    /// Unacknowledged sends allowed at once.
    pub window: usize,
    /// Pad texts to at least this many bytes.
    pub text_bytes: usize,
    /// Give up on a send after this long without any answer.
    pub ack_timeout: Duration,
}

/// What a sender did.
#[derive(Debug, Clone, Default)]
pub struct SenderStats {
    /// Frames sent.
    pub sent: u64,
    /// `send_result`s received (not duplicates).
    pub acked: u64,
    /// `send_result`s with `duplicate: true`.
    pub duplicate: u64,
    /// Error answers by code.
    pub errors: BTreeMap<String, u64>,
    /// Sends that never got an answer.
    pub ack_timeouts: u64,
    /// Send → `send_result` latency (µs).
    pub ack_latency: Hist,
    /// Why the sender stopped early, if it did.
    pub failure: Option<String>,
}

/// Sends per `plan` on `ws` while counting deliveries like [`hold`]. When sending is finished (count reached,
/// or `stop_sending` turned true and all sends are answered or timed out) the stats go to `done`; the
/// connection keeps counting deliveries until `close` turns true.
#[allow(clippy::too_many_arguments)]
pub async fn drive_sender(
    mut ws: Ws,
    shared: Arc<Shared>,
    mut next_seq: u64,
    heartbeat: Duration,
    plan: SendPlan,
    mut stop_sending: watch::Receiver<bool>,
    mut close: watch::Receiver<bool>,
    done: oneshot::Sender<SenderStats>,
) {
    let mut stats = SenderStats::default();
    let mut done = Some(done);
    let mut sending = true;
    let mut stop_requested = *stop_sending.borrow_and_update();
    let mut in_flight: BTreeMap<u64, u64> = BTreeMap::new(); // index -> sent at (ns)
    let mut next_index = 0u64;
    let start = Instant::now();
    let mut slot = start; // when the next send is due
    let mut last_answer = Instant::now();
    let heartbeat_sleep = tokio::time::sleep(heartbeat);
    tokio::pin!(heartbeat_sleep);
    let pad = "x".repeat(plan.text_bytes);
    let mut acker = Acker::new(Some(plan.channel.as_str()), Duration::from_millis(2000));
    let ack_timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(ack_timer);
    let closing = close.changed();
    tokio::pin!(closing);
    let stopping = stop_sending.changed();
    tokio::pin!(stopping);
    shared.open.fetch_add(1, Ordering::Relaxed);
    loop {
        if sending && (stop_requested || next_index >= plan.count) && in_flight.is_empty() {
            sending = false;
            if let Some(done) = done.take() {
                let _ = done.send(std::mem::take(&mut stats));
            }
        }
        let can_send = sending && !stop_requested && next_index < plan.count && in_flight.len() < plan.window;
        let send_at = slot;
        let timeout_at = last_answer + plan.ack_timeout;
        tokio::select! {
            biased;
            _ = &mut closing => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
            _ = &mut stopping, if !stop_requested => {
                stop_requested = true;
            }
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => {
                    let arrived = now_nanos();
                    let probe = match shared.on_text(text.as_str(), arrived, &mut next_seq) {
                        Seen::Delivery(seq) => {
                            let armed = acker.due.is_some();
                            if acker.delivered(seq) {
                                if let Some(ack) = acker.take() {
                                    if ws.send(ack).await.is_err() {
                                        stats.failure = Some("sending ack failed".into());
                                        break;
                                    }
                                }
                            } else if let (false, Some(due)) = (armed, acker.due) {
                                ack_timer.as_mut().reset(due);
                            }
                            continue;
                        }
                        Seen::Other(probe) => probe,
                        Seen::Nothing => continue,
                    };
                    let index = probe
                        .client_msg_id
                        .as_deref()
                        .and_then(|id| id.strip_prefix(plan.id_prefix.as_str()))
                        .and_then(|rest| rest.parse::<u64>().ok());
                    let Some(index) = index else { continue };
                    if probe.kind == "send_result" {
                        if let Some(sent) = in_flight.remove(&index) {
                            last_answer = Instant::now();
                            stats.ack_latency.record(arrived.saturating_sub(sent) / 1000);
                            if text.as_str().contains(r#""duplicate":true"#) {
                                stats.duplicate += 1;
                            } else {
                                stats.acked += 1;
                                shared.confirmed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if probe.kind == "error" && in_flight.remove(&index).is_some() {
                        last_answer = Instant::now();
                        let code = probe.code.as_deref().unwrap_or("?").to_owned();
                        if code == "rate_limited" {
                            // Back off one slot.
                            slot = slot.max(Instant::now()) + plan.interval;
                        }
                        *stats.errors.entry(code).or_default() += 1;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    record_close(&shared, frame);
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.failure = Some("server closed the sender connection".into());
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    shared.event(format!("conn_{}", classify_ws(&error)));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.failure = Some(format!("sender connection failed: {error}"));
                    break;
                }
                None => {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.failure = Some("sender connection ended".into());
                    break;
                }
            },
            () = tokio::time::sleep_until(send_at), if can_send => {
                let sent = now_nanos();
                let mut text = format!("t{sent} i{next_index} ");
                if text.len() < plan.text_bytes {
                    text.push_str(&pad[..plan.text_bytes - text.len()]);
                }
                let frame = ClientFrame::Send {
                    req_id: None,
                    channel: plan.channel.clone(),
                    client_msg_id: format!("{}{}", plan.id_prefix, next_index),
                    text,
                    // Every load send is new (a lost connection ends the sender).
                    first_attempt: true,
                };
                if let Err(error) = send_frame(&mut ws, &frame).await {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.failure = Some(format!("{error:#}"));
                    break;
                }
                if in_flight.is_empty() {
                    last_answer = Instant::now();
                }
                in_flight.insert(next_index, sent);
                stats.sent += 1;
                next_index += 1;
                // Pace: the next slot is one interval later, but never lag more than `burst` slots behind.
                let now = Instant::now();
                let floor = now.checked_sub(plan.interval * plan.burst).unwrap_or(now);
                slot = (slot + plan.interval).max(floor);
            }
            () = tokio::time::sleep_until(timeout_at), if !in_flight.is_empty() => {
                stats.ack_timeouts += in_flight.len() as u64;
                in_flight.clear();
                last_answer = Instant::now();
            }
            () = &mut ack_timer, if acker.due.is_some() => {
                if let Some(ack) = acker.take() {
                    if ws.send(ack).await.is_err() {
                        stats.failure = Some("sending ack failed".into());
                        break;
                    }
                }
            }
            () = &mut heartbeat_sleep => {
                if send_frame(&mut ws, &ClientFrame::Ping { req_id: None }).await.is_err() {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.failure = Some("sender ping failed".into());
                    break;
                }
                heartbeat_sleep.as_mut().reset(Instant::now() + heartbeat);
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
    stats.ack_timeouts += in_flight.len() as u64;
    if let Some(done) = done.take() {
        let _ = done.send(stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let target = Target::parse("ws://127.0.0.1:9000").expect("parse");
        assert_eq!(target.url_with_token("T"), "ws://127.0.0.1:9000/v1/ws?v=1&token=T");
        let target = Target::parse("ws://localhost:9000/other").expect("parse");
        assert_eq!(target.url_with_token("T"), "ws://localhost:9000/other?token=T");
        assert!(Target::parse("ws://8.8.8.8:80").is_err());
        assert!(Target::parse("http://127.0.0.1:1").is_err());
    }

    #[test]
    fn reads_send_time() {
        assert_eq!(sent_at("t123 i4 xxx"), Some(123));
        assert_eq!(sent_at("t987"), Some(987));
        assert_eq!(sent_at("hello"), None);
    }

    #[test]
    fn counts_messages_and_checks_order() {
        let shared = Shared::new(Some("g:a".into()), true);
        let mut next = 0;
        let frame = |seq: u64| {
            format!(
                r#"{{"type":"message","channel":"g:a","seq":{seq},"id":"1","sender":"u0","text":"t1000 i0","ts":1,"client_msg_id":"c"}}"#
            )
        };
        for seq in [1, 2, 4, 4] {
            assert!(matches!(shared.on_text(&frame(seq), 3_000_000, &mut next), Seen::Delivery(Some(_))));
        }
        let other = r#"{"type":"message","channel":"g:b","seq":9,"id":"1","sender":"u0","text":"x","ts":1,"client_msg_id":"c"}"#;
        assert!(matches!(shared.on_text(other, 0, &mut next), Seen::Nothing));
        let error = r#"{"type":"error","code":"rate_limited","message":"slow","client_msg_id":"p7"}"#;
        let Seen::Other(probe) = shared.on_text(error, 0, &mut next) else { panic!("not a message") };
        assert_eq!(probe.client_msg_id.as_deref(), Some("p7"));
        let channel = r#"{"type":"channel","req_id":"j","channel":{"id":"g:a","kind":"group","name":"a","members":2,"last_seq":0,"joined":true}}"#;
        assert!(matches!(shared.on_text(channel, 0, &mut next), Seen::Other(_)));
        let counts = shared.counts();
        assert_eq!((counts.deliveries, counts.gaps, counts.dupes), (4, 1, 1));
        assert!(!counts.events.contains_key("unparsable_frame"));
        assert_eq!(counts.events.get("error_rate_limited"), Some(&1));
        let mut hist = Hist::new();
        hist.merge_sparse(&shared.latency_sparse());
        assert_eq!(hist.count(), 4);
        assert_eq!(hist.max(), 2999);
    }

    #[test]
    fn acks_are_cumulative_and_batched() {
        let mut acker = Acker::new(Some("g:a"), Duration::from_millis(500));
        assert!(acker.take().is_none());
        assert!(!acker.delivered(Some(1)));
        assert!(acker.due.is_some());
        for seq in 2..256 {
            assert!(!acker.delivered(Some(seq)));
        }
        assert!(acker.delivered(Some(256)));
        let Some(Message::Text(text)) = acker.take() else { panic!("an ack is due") };
        assert_eq!(text.as_str(), r#"{"type":"ack","channel":"g:a","seq":256}"#);
        assert!(acker.due.is_none());
        assert!(acker.take().is_none());
    }

    #[test]
    fn mints_tokens() {
        let token = mint_token("secret", "u1", 60).expect("mint");
        assert_eq!(token.split('.').count(), 3);
    }
}
