//! Client settings.

use crate::backoff::Backoff;
use crate::error::ClientError;
use std::collections::BTreeMap;
use std::time::Duration;

/// How a client connects and behaves. Build it with [`ClientConfig::new`] and adjust the public fields.
#[derive(Clone)]
pub struct ClientConfig {
    /// Server address: `ws://host:port` (the path `/v1/ws?v=1` is added), or a full `ws://host:port/v1/ws?v=1`.
    pub url: String,
    /// Other servers serving the same chat (e.g. every gateway instance when no load balancer sits in front).
    /// Every reconnect moves on to the next address in `url`, then these, round-robin, so a client of a killed
    /// or draining instance resumes on another.
    pub alternate_urls: Vec<String>,
    /// JWT sent as the `token` query parameter.
    pub token: String,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Longest wait before acknowledgements go out (zero: immediately).
    pub ack_delay: Duration,
    /// Ping interval; `None` uses the `heartbeat_interval_ms` announced in `ready`.
    pub heartbeat_interval: Option<Duration>,
    /// Limit for the TCP connect plus WebSocket handshake, and again for the `ready` frame.
    pub connect_timeout: Duration,
    /// The last `seq` per channel the application already holds (e.g. persisted by an earlier run). When not
    /// empty, the first connection resumes with `sync` from there, like a reconnect does.
    pub resume_from: BTreeMap<String, u64>,
    /// Events buffered in the event channel.
    pub event_capacity: usize,
    /// Events held beyond the channel before the client stops reading the socket (back-pressure on the server).
    pub max_event_backlog: usize,
    /// Commands (sends, requests) queued from the handles to the connection task.
    pub command_capacity: usize,
    /// Out-of-order messages buffered per channel while a gap is filled; more are dropped and fetched again.
    pub max_buffered_per_channel: usize,
    /// WebSocket read buffer per connection, in bytes.
    pub read_buffer_bytes: usize,
    /// Largest message accepted from the server, in bytes (a 200-message history page needs about 1 MiB).
    pub max_message_bytes: usize,
    /// Pace sends with the rate and burst announced in `ready`, so they are not refused with `rate_limited`.
    pub pace_sends: bool,
    /// Sends written and not yet answered, at most; more wait in order (the server stops reading a connection
    /// with too many requests in flight).
    pub max_in_flight_sends: usize,
}

impl ClientConfig {
    /// Defaults: backoff 500 ms doubling to 20 s with full jitter and no attempt limit, acknowledgements batched
    /// for 50 ms, the server's heartbeat interval, 10 s connect timeout, 4 KiB read buffer.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            alternate_urls: Vec::new(),
            token: token.into(),
            backoff: Backoff::default(),
            ack_delay: Duration::from_millis(50),
            heartbeat_interval: None,
            connect_timeout: Duration::from_secs(10),
            resume_from: BTreeMap::new(),
            event_capacity: 256,
            max_event_backlog: 4_096,
            command_capacity: 64,
            max_buffered_per_channel: 1_024,
            read_buffer_bytes: 4_096,
            max_message_bytes: 4 << 20,
            pace_sends: true,
            max_in_flight_sends: 32,
        }
    }

    /// Settings for running thousands of clients in one process (load tests): small queues and buffers.
    /// Throughput per client is lower, correctness is the same.
    pub fn lightweight(url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            event_capacity: 32,
            max_event_backlog: 512,
            command_capacity: 8,
            max_buffered_per_channel: 256,
            read_buffer_bytes: 2_048,
            ..Self::new(url, token)
        }
    }

    /// The WebSocket URL without the token, as shown in errors and logs.
    pub fn endpoint(&self) -> Result<String, ClientError> {
        Self::endpoint_of(&self.url)
    }

    /// How many addresses the client rotates through (`url` and the alternates).
    pub fn endpoint_count(&self) -> usize {
        1 + self.alternate_urls.len()
    }

    /// Every address, checked: the first error names the bad one.
    pub fn endpoints(&self) -> Result<Vec<String>, ClientError> {
        std::iter::once(&self.url).chain(&self.alternate_urls).map(|url| Self::endpoint_of(url)).collect()
    }

    fn endpoint_of(url: &str) -> Result<String, ClientError> {
        let url = url.trim();
        let rest = url
            .strip_prefix("ws://")
            .ok_or(ClientError::InvalidUrl { url: url.to_owned(), reason: "only ws:// is supported" })?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if authority_end == 0 {
            return Err(ClientError::InvalidUrl { url: url.to_owned(), reason: "missing host" });
        }
        let path = &rest[authority_end..];
        if path.is_empty() || path == "/" {
            Ok(format!("ws://{}/v1/ws?v=1", &rest[..authority_end]))
        } else {
            Ok(url.to_owned())
        }
    }

    /// The URL to connect to, with `token` as a query parameter.
    #[cfg(test)]
    pub(crate) fn connect_url(&self, token: &str) -> Result<String, ClientError> {
        self.connect_url_at(token, 0)
    }

    /// The URL of address `index` (modulo [`endpoint_count`](Self::endpoint_count)) with the token.
    pub(crate) fn connect_url_at(&self, token: &str, index: usize) -> Result<String, ClientError> {
        let endpoint = self.endpoint_at(index)?;
        let separator = if endpoint.contains('?') { '&' } else { '?' };
        Ok(format!("{endpoint}{separator}token={}", percent_encode(token)))
    }
}

impl ClientConfig {
    /// Address `index` (modulo [`endpoint_count`](Self::endpoint_count)) without the token.
    pub(crate) fn endpoint_at(&self, index: usize) -> Result<String, ClientError> {
        match index % self.endpoint_count() {
            0 => self.endpoint(),
            n => Self::endpoint_of(&self.alternate_urls[n - 1]),
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("alternate_urls", &self.alternate_urls)
            .field("token", &"<redacted>")
            .field("backoff", &self.backoff)
            .field("ack_delay", &self.ack_delay)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("resume_from", &self.resume_from)
            .field("event_capacity", &self.event_capacity)
            .field("max_event_backlog", &self.max_event_backlog)
            .field("command_capacity", &self.command_capacity)
            .field("max_buffered_per_channel", &self.max_buffered_per_channel)
            .field("read_buffer_bytes", &self.read_buffer_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("pace_sends", &self.pace_sends)
            .field("max_in_flight_sends", &self.max_in_flight_sends)
            .finish()
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a JWT only has those, plus `.`).
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_v1_url_with_the_token() {
        let config = ClientConfig::new("ws://127.0.0.1:8080", "aa.bb-cc_dd");
        assert_eq!(config.endpoint().ok().as_deref(), Some("ws://127.0.0.1:8080/v1/ws?v=1"));
        let mut rotating = config.clone();
        rotating.alternate_urls = vec!["ws://127.0.0.2:8080".into(), "ws://127.0.0.3:1/custom?v=1".into()];
        assert_eq!(rotating.endpoint_count(), 3);
        let seen: Vec<String> = (0..4).filter_map(|index| rotating.endpoint_at(index).ok()).collect();
        assert_eq!(
            seen,
            [
                "ws://127.0.0.1:8080/v1/ws?v=1",
                "ws://127.0.0.2:8080/v1/ws?v=1",
                "ws://127.0.0.3:1/custom?v=1",
                "ws://127.0.0.1:8080/v1/ws?v=1"
            ]
        );
        rotating.alternate_urls.push("http://nope".into());
        assert!(rotating.endpoints().is_err(), "a bad alternate is refused up front");
        assert_eq!(
            config.connect_url("aa.bb-cc_dd").ok().as_deref(),
            Some("ws://127.0.0.1:8080/v1/ws?v=1&token=aa.bb-cc_dd")
        );
        let trailing = ClientConfig::new("ws://localhost:1/", "t");
        assert_eq!(trailing.connect_url("a b+/").ok().as_deref(), Some("ws://localhost:1/v1/ws?v=1&token=a%20b%2B%2F"));
        let full = ClientConfig::new("ws://h:2/custom", "t");
        assert_eq!(full.connect_url("t").ok().as_deref(), Some("ws://h:2/custom?token=t"));
    }

    #[test]
    fn refuses_other_schemes_and_hides_the_token() {
        assert!(matches!(ClientConfig::new("http://h", "t").endpoint(), Err(ClientError::InvalidUrl { .. })));
        assert!(matches!(ClientConfig::new("wss://h", "t").endpoint(), Err(ClientError::InvalidUrl { .. })));
        assert!(matches!(ClientConfig::new("ws:///x", "t").endpoint(), Err(ClientError::InvalidUrl { .. })));
        let shown = format!("{:?}", ClientConfig::new("ws://h", "secret-token"));
        assert!(!shown.contains("secret-token"), "{shown}");
    }
}
