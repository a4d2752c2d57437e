//! The bodies of the fuzz targets and their assertions, written once. Two places include this file with `#[path]`:
//! the libFuzzer binaries (`fuzz/fuzz_targets/*.rs`, nightly, driven by `e2e/fuzz/run.sh`) and the corpus replay
//! on stable (`e2e/tests/fuzz_corpus.rs`, run by the normal test command). Each function takes one raw input and
//! panics only when a property fails; see `fuzz/README.md`.

use bytes::Bytes;
use parley_bus::pubsub::Event;
use parley_core::protocol::{decode_client, ErrorCode};
use parley_gateway::admission::parse_connect_query;
use parley_gateway::config::GatewayConfig;
use std::io::{self, Read, Write};
use tungstenite::error::CapacityError;
use tungstenite::protocol::{Message, Role, WebSocket, WebSocketConfig};

/// `protocol_decode`: [`decode_client`] never panics; a decoded frame serializes back to JSON that decodes to an
/// equal frame; a refusal is one of the decoder's three codes and echoes only a bounded `req_id`.
pub fn protocol_decode(data: &[u8]) {
    match decode_client(data) {
        Ok(frame) => {
            let json = match serde_json::to_vec(&frame) {
                Ok(json) => json,
                Err(error) => panic!("a decoded client frame does not serialize: {error} ({frame:?})"),
            };
            let again = decode_client(&json);
            assert_eq!(again.as_ref(), Ok(&frame), "re-encoded as {}", String::from_utf8_lossy(&json));
            // docs/protocol.md: a frame that is not a JSON object is `invalid_json` (serde's internally tagged
            // enums would also take an array whose first element is the tag; fuzz/regressions/protocol_decode/
            // array-frame keeps that input).
            match serde_json::from_slice::<serde_json::Value>(data) {
                Ok(value) => assert!(value.is_object(), "decoded from {value}"),
                Err(error) => panic!("decoded a frame from bytes that are not JSON: {error}"),
            }
        }
        Err(error) => {
            assert!(
                matches!(error.code, ErrorCode::InvalidJson | ErrorCode::UnknownType | ErrorCode::InvalidFrame),
                "unexpected decode error code {:?}",
                error.code
            );
            if let Some(req_id) = &error.req_id {
                assert!(req_id.len() <= 64, "echoed a req_id of {} bytes", req_id.len());
                assert_ne!(error.code, ErrorCode::InvalidJson, "a req_id read from something that is not an object");
            }
        }
    }
}

/// `bus_event_decode`: [`Event::decode`] never panics; what decodes encodes to bytes that decode to the same event
/// (and encode to the same bytes again); timed messages and feed notices re-encode byte for byte.
pub fn bus_event_decode(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    let Some(event) = Event::decode(&payload) else {
        return;
    };
    let encoded = event.encode();
    assert_eq!(Event::decode(&encoded).as_ref(), Some(&event), "encoded as {encoded:?}");
    assert_eq!(
        Event::decode(&encoded).map(|again| again.encode()),
        Some(encoded.clone()),
        "the encoding is not stable"
    );
    if matches!(data.first(), Some(b'T' | b'F')) {
        assert_eq!(encoded, payload, "a timed message or feed notice does not re-encode to its bytes");
    }
}

/// What reading one client's bytes gave (the replay checks that the corpus reaches each ending).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketRead {
    /// Data messages (text and binary) read.
    pub messages: usize,
    /// Whether the client sent a close frame.
    pub closed_by_client: bool,
    /// Whether the read ended on the size limit (what the gateway closes with 1009).
    pub too_big: bool,
}

/// The WebSocket settings the gateway upgrades with (`gateway/src/http.rs`, `websocket`), from its default
/// configuration: a small read buffer, no write buffering, and `max_frame_bytes` for both frames and messages.
pub fn gateway_websocket_config() -> WebSocketConfig {
    let config = GatewayConfig::default();
    let max = config.max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4).max(256 * 1024))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// `websocket_frames`: tungstenite's server side with the gateway's limits, fed arbitrary bytes as a client's
/// after the handshake, read until it fails: it never panics nor loops, returns no data message above
/// `max_frame_bytes` and no control frame above 125 bytes, refuses what is too big with the limit's own error, and
/// writes no more than the client sent plus one control frame (pongs and the close reply).
///
/// The first byte shapes the transport, the rest is the stream: its low 7 bits are the most bytes one socket read
/// returns (0: no limit) and its high bit makes every read first fail with `WouldBlock` once, as tokio's non-blocking
/// socket does under tokio-tungstenite.
pub fn websocket_frames(data: &[u8]) -> WebSocketRead {
    let Some((&shape, stream)) = data.split_first() else {
        return WebSocketRead::default();
    };
    let chunk = match usize::from(shape & 0x7f) {
        0 => usize::MAX,
        limit => limit,
    };
    let config = gateway_websocket_config();
    let max = config.max_message_size.unwrap_or(usize::MAX);
    let client = ClientBytes { input: stream, chunk, would_block: shape & 0x80 != 0, blocked: false, written: 0 };
    let mut socket = WebSocket::from_raw_socket(client, Role::Server, Some(config));
    let mut outcome = WebSocketRead::default();
    // Every call consumes input, returns a message or blocks once: more calls than this is a loop.
    let most_calls = 3 * stream.len() + 16;
    let mut ended = false;
    for _ in 0..most_calls {
        match socket.read() {
            Ok(Message::Text(text)) => {
                assert!(text.len() <= max, "a text message of {} bytes", text.len());
                outcome.messages += 1;
            }
            Ok(Message::Binary(bytes)) => {
                assert!(bytes.len() <= max, "a binary message of {} bytes", bytes.len());
                outcome.messages += 1;
            }
            Ok(Message::Ping(payload) | Message::Pong(payload)) => {
                assert!(payload.len() <= 125, "a control frame of {} bytes", payload.len());
            }
            Ok(Message::Close(frame)) => {
                if let Some(frame) = frame {
                    assert!(frame.reason.len() <= 123, "a close reason of {} bytes", frame.reason.len());
                }
                outcome.closed_by_client = true;
            }
            Ok(Message::Frame(_)) => panic!("read returned a raw frame"),
            Err(tungstenite::Error::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                assert_eq!(max_size, max, "refused against another limit");
                assert!(size > max_size, "refused {size} bytes under the limit of {max_size}");
                outcome.too_big = true;
                ended = true;
                break;
            }
            Err(tungstenite::Error::Capacity(error)) => panic!("unexpected capacity error: {error}"),
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "no end after {most_calls} reads of {} bytes", stream.len());
    // Pongs echo pings and a close reply echoes the client's close, except that an invalid close code is answered
    // with tungstenite's own (1002, "Protocol violation"): at most one control frame (2 + 125 bytes) more.
    let written = socket.get_ref().written;
    assert!(written <= stream.len() + 127, "wrote {written} bytes in answer to {} bytes", stream.len());
    outcome
}

/// A client's bytes as a socket: reads hand out the input in chunks (blocking once before each if asked), writes
/// are counted and dropped.
struct ClientBytes<'a> {
    input: &'a [u8],
    chunk: usize,
    would_block: bool,
    blocked: bool,
    written: usize,
}

impl Read for ClientBytes<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.would_block && !self.blocked && !self.input.is_empty() {
            self.blocked = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.blocked = false;
        let count = buffer.len().min(self.chunk).min(self.input.len());
        let (head, tail) = self.input.split_at(count);
        buffer[..count].copy_from_slice(head);
        self.input = tail;
        Ok(count)
    }
}

impl Write for ClientBytes<'_> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        self.written += buffer.len();
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `connect_query`: [`parse_connect_query`] answers any raw query without panicking. A refusal is a 400
/// (`unsupported_version` or `invalid_argument`); unknown parameters change nothing; what it reads is a version of at
/// most nine digits and a non-empty token no longer than the query (decoding only shrinks), and the query written
/// back from them (the token percent-encoded) reads the same.
pub fn connect_query(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let answer = |raw: &str| parse_connect_query(raw).map_err(|error| (error.status.as_u16(), error.code));
    assert_eq!(answer(&format!("{raw}&utm_source=fuzz")), answer(&raw), "an unknown parameter changed the answer");
    match parse_connect_query(&raw) {
        Ok(query) => {
            if let Some(version) = query.v {
                assert!(version <= 999_999_999, "version {version}");
            }
            let mut written = Vec::new();
            if let Some(version) = query.v {
                written.push(format!("v={version}"));
            }
            if let Some(token) = &query.token {
                assert!(!token.is_empty(), "an empty token");
                assert!(token.len() <= raw.len(), "a token of {} bytes from a query of {}", token.len(), raw.len());
                written.push(format!("token={}", percent_encode(token)));
            }
            let written = written.join("&");
            assert_eq!(parse_connect_query(&written).ok().as_ref(), Some(&query), "written back as {written:?}");
        }
        Err(error) => {
            assert_eq!(error.status.as_u16(), 400, "refused with {} {}", error.status, error.code);
            assert!(
                matches!(error.code, "unsupported_version" | "invalid_argument"),
                "refused with code {}",
                error.code
            );
        }
    }
}

/// Every byte but the unreserved ones of RFC 3986 as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(byte).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
