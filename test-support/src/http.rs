//! One plain HTTP/1.1 request on a fresh connection (`Connection: close`), for tests that talk to a server's HTTP
//! endpoints without an HTTP client library.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code; 0 when the answer had no status line (the connection was closed or reset first).
    pub status: u16,
    /// The head: the status line and the headers.
    pub head: String,
    /// The body (as sent: a chunked body is not decoded).
    pub body: String,
}

impl Response {
    /// Parses a raw response (pure, for tests).
    pub fn parse(raw: &[u8]) -> Response {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        Response { status, head: head.to_owned(), body: body.to_owned() }
    }

    /// The body as JSON; `Null` when it is empty or not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `method path` with `body` (as `application/json`) and, when given, `Authorization: Bearer {bearer}`, and
/// reads the answer to the end. A failed write is not an error (a server may answer, 413 say, before it has read a
/// large body), nor is a connection reset while reading: the response then holds what came.
pub async fn request(address: SocketAddr, method: &str, path: &str, bearer: Option<&str>, body: &str) -> Response {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {address} for {method} {path}: {error}"));
    let authorization = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    Response::parse(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_split_into_status_head_and_body() {
        let response = Response::parse(b"HTTP/1.1 202 Accepted\r\ncontent-length: 14\r\n\r\n{\"accepted\":1}");
        assert_eq!(response.status, 202);
        assert!(response.head.contains("content-length: 14"));
        assert_eq!(response.json(), serde_json::json!({"accepted": 1}));
        let empty = Response::parse(b"");
        assert_eq!((empty.status, empty.json()), (0, serde_json::Value::Null));
    }
}
