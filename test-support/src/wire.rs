//! A raw WebSocket client over TCP, for tests of the wire itself: it writes exactly the bytes a test gives (frames
//! that break RFC 6455, a header that announces more than the size limit) and reads the server's frames one by
//! one, down to the close frame and its code. Its socket can have a small receive buffer, so a test can stop
//! reading and have the server's writes back up.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opcode of a text frame.
pub const TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const CLOSE: u8 = 0x8;
/// Opcode of a ping.
pub const PING: u8 = 0x9;
/// The FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;
/// The RSV1 bit of a frame's first byte (no extension is negotiated, so a server must refuse it).
pub const RSV1: u8 = 0x40;

/// The key every frame of this client is masked with.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its first byte: FIN, RSV1-3 and the opcode.
    pub first: u8,
    /// Its payload (servers do not mask).
    pub payload: Vec<u8>,
}

impl Frame {
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    /// The payload as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// For a close frame: its status code, or 1005 (RFC 6455 §7.1.5: no status code) when its payload is empty.
    pub fn close_code(&self) -> Option<u16> {
        if self.opcode() != CLOSE {
            return None;
        }
        match self.payload.as_slice() {
            [] => Some(1005),
            [high, low, ..] => Some(u16::from_be_bytes([*high, *low])),
            [_] => None,
        }
    }
}

/// How a wait for the server's close ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closing {
    /// A close frame with this code (1005 when it carried none).
    Code(u16),
    /// The connection ended (end of stream, or an error such as a reset) without a close frame.
    Ended(String),
    /// Nothing ended within the wait.
    TimedOut,
}

/// A WebSocket client that speaks the wire by hand.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Connects to `address` (with a socket receive buffer of `receive_buffer` bytes when given, set before the
    /// connect so the window is small from the start) and upgrades `target` (e.g. `/v1/ws?v=1&token=...`). Gives
    /// the client on `101 Switching Protocols`, else the response head.
    pub async fn connect(address: SocketAddr, target: &str, receive_buffer: Option<u32>) -> Result<RawClient, String> {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|error| format!("socket: {error}"))?;
        if let Some(size) = receive_buffer {
            socket.set_recv_buffer_size(size).map_err(|error| format!("SO_RCVBUF: {error}"))?;
        }
        let mut stream = socket.connect(address).await.map_err(|error| format!("connect {address}: {error}"))?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|error| format!("write the upgrade: {error}"))?;
        let mut client = RawClient { stream, buffer: Vec::new() };
        let head = loop {
            if let Some(end) = client.buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&client.buffer[..end]).into_owned();
                client.buffer.drain(..end + 4);
                break head;
            }
            if client.fill().await.map_err(|error| format!("read the upgrade answer: {error}"))? == 0 {
                return Err(format!("no answer to the upgrade: {}", String::from_utf8_lossy(&client.buffer)));
            }
        };
        if head.starts_with("HTTP/1.1 101") {
            Ok(client)
        } else {
            Err(head)
        }
    }

    /// Writes raw bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The socket, e.g. to read it directly.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Reads more bytes into the buffer; 0 at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream.read(&mut chunk).await?;
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(read)
    }

    /// The next frame from the server, or how the connection ended (`Err`: the end of the stream, or the error).
    pub async fn frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Some((frame, used)) = parse(&self.buffer) {
                self.buffer.drain(..used);
                return Ok(frame);
            }
            match self.fill().await {
                Ok(0) => return Err(format!("end of stream ({} bytes of a frame left)", self.buffer.len())),
                Ok(_) => {}
                Err(error) => return Err(format!("{:?}: {error}", error.kind())),
            }
        }
    }

    /// Reads frames until the server's close frame, for at most `within`.
    pub async fn close(&mut self, within: Duration) -> Closing {
        let closing = async {
            loop {
                match self.frame().await {
                    Ok(frame) if frame.opcode() == CLOSE => return Closing::Code(frame.close_code().unwrap_or(1005)),
                    Ok(_) => {}
                    Err(ended) => return Closing::Ended(ended),
                }
            }
        };
        tokio::time::timeout(within, closing).await.unwrap_or(Closing::TimedOut)
    }
}

/// One complete unmasked frame at the start of `buffer`, with the bytes it takes.
fn parse(buffer: &[u8]) -> Option<(Frame, usize)> {
    let (&first, rest) = buffer.split_first()?;
    let (&second, rest) = rest.split_first()?;
    let (length, header): (u64, usize) = match second & 0x7f {
        126 => (u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 10),
        short => (u64::from(short), 2),
    };
    let length = usize::try_from(length).ok()?;
    let end = header.checked_add(length)?;
    let payload = buffer.get(header..end)?.to_vec();
    Some((Frame { first, payload }, end))
}

/// The header of a frame announcing `length` payload bytes, masked when `masked` (the mask key follows the length).
fn header(first: u8, length: u64, masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut bytes = vec![first];
    match length {
        0..=125 => bytes.push(mask_bit | length as u8),
        126..=0xffff => {
            bytes.push(mask_bit | 126);
            bytes.extend_from_slice(&(length as u16).to_be_bytes());
        }
        _ => {
            bytes.push(mask_bit | 127);
            bytes.extend_from_slice(&length.to_be_bytes());
        }
    }
    if masked {
        bytes.extend_from_slice(&MASK);
    }
    bytes
}

/// A client frame, masked as RFC 6455 requires of clients; `first` is its first byte (FIN, RSV1-3, opcode).
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = masked_header(first, payload.len() as u64);
    bytes.extend(payload.iter().enumerate().map(|(index, byte)| byte ^ MASK[index % 4]));
    bytes
}

/// Only the header of a masked client frame that announces `length` payload bytes (what follows is up to the test).
pub fn masked_header(first: u8, length: u64) -> Vec<u8> {
    header(first, length, true)
}

/// A client frame without a mask, which a server must refuse.
pub fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = header(first, payload.len() as u64, false);
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser_and_masks_apply() {
        let frame = unmasked(FIN | TEXT, b"hello");
        assert_eq!(parse(&frame), Some((Frame { first: FIN | TEXT, payload: b"hello".to_vec() }, 7)));
        let long = unmasked(FIN | BINARY, &[7; 300]);
        assert_eq!(&long[..4], &[FIN | BINARY, 126, 1, 44]);
        assert_eq!(parse(&long).map(|(frame, used)| (frame.payload.len(), used)), Some((300, 304)));
        assert_eq!(parse(&long[..100]), None, "incomplete");
        let masked = masked(FIN | TEXT, b"abcd");
        assert_eq!(masked[1], 0x80 | 4);
        assert_eq!(&masked[2..6], &MASK);
        assert_eq!(masked[6], b'a' ^ MASK[0]);
        assert_eq!(masked_header(FIN | TEXT, 1 << 20)[1], 0x80 | 127);
        let close = Frame { first: FIN | CLOSE, payload: vec![0x03, 0xf1, b'x'] };
        assert_eq!(close.close_code(), Some(1009));
        assert_eq!(Frame { first: FIN | CLOSE, payload: Vec::new() }.close_code(), Some(1005));
        assert_eq!(Frame { first: FIN | TEXT, payload: Vec::new() }.close_code(), None);
    }
}
