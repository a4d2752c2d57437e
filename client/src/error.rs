//! The crate's error type.

use parley_core::protocol::ErrorCode;
use tokio_tungstenite::tungstenite;

/// Everything that can go wrong for a caller of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configured URL cannot be used.
    #[error("invalid server url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TCP connection or the WebSocket handshake failed.
    #[error("failed to connect to {url}")]
    Connect {
        /// The URL, without the token.
        url: String,
        /// The transport error.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The server refused the token (HTTP 401).
    #[error("unauthorized: {body}")]
    Unauthorized {
        /// The server's explanation.
        body: String,
    },
    /// The server refused the upgrade with another HTTP status (400 unsupported version, 503 overloaded, ...).
    #[error("server refused the connection with HTTP {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// A step took longer than allowed.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The server closed the connection before `ready`.
    #[error("server closed the connection before ready (code {code:?}): {reason}")]
    ClosedBeforeReady {
        /// Close code, if any.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// The server broke protocol v1.
    #[error("protocol violation: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The server answered with an `error` frame.
    #[error("server refused the request ({}): {message}", code.as_str())]
    Server {
        /// Stable error code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The connection dropped before the answer arrived; the request may or may not have been applied. Sends are
    /// never failed this way: they are retried on the next connection.
    #[error("connection lost before the answer arrived")]
    ConnectionLost,
    /// The client was closed by the application (or every handle was dropped).
    #[error("client is closed")]
    Closed,
    /// Reconnecting failed `attempts` times in a row, as many as the backoff policy allows.
    #[error("gave up reconnecting after {attempts} failed attempts")]
    GaveUp {
        /// Consecutive failed attempts.
        attempts: u32,
    },
}
