//! Parley client library: the client side of wire protocol v1 (`docs/protocol.md`) over WebSocket.
//!
//! [`Client::connect`] (or [`Client::spawn`]) starts one connection task and returns a cloneable [`Client`]
//! handle plus a stream of [`Event`]s. The stream yields, per channel, every message exactly once and in strict
//! `seq` order, and the connection's state changes (connected, disconnected, resynced, resync required). The task:
//!
//! - connects to `ws://host/v1/ws?v=1&token=...` and waits for `ready`;
//! - acknowledges every message with a cumulative `ack` per channel (batched for [`ClientConfig::ack_delay`]);
//! - drops duplicates (retransmissions, replays) by `seq`, buffers messages that arrive ahead of a gap, and fills
//!   gaps with `history` (`after` = last delivered);
//! - pings every heartbeat interval (the first at a random fraction of it) and treats two silent intervals as a
//!   dead connection;
//! - reconnects with exponential backoff and full jitter, resumes with `sync` (the last `seq` it holds per
//!   channel) and reports [`Event::Resynced`] on `synced`;
//! - keeps every unconfirmed send and sends it again after a reconnect with the same `client_msg_id`, which the
//!   server deduplicates, so [`Client::send`] resolves to exactly one stored message.
//!
//! The decisions are plain structs with no I/O, each unit-tested on its own: [`ordering`] (order, dedup, gaps),
//! [`backoff`] (reconnect delays), [`ack`] (ACK batching), [`heartbeat`] (pings and zombie detection) and
//! [`outbox`] (unconfirmed sends). The socket lives only in the private `driver` module, which wires them
//! together; [`client`] is the handle that talks to it over a bounded channel.
//!
//! Idle cost per client is small: a 4 KiB read buffer (2 KiB with [`ClientConfig::lightweight`]), two channel
//! blocks, and two integers per channel; buffers grown by a burst are released afterwards.

pub mod ack;
pub mod backoff;
pub mod client;
pub mod config;
mod driver;
pub mod error;
pub mod event;
pub mod heartbeat;
pub mod ordering;
pub mod outbox;

pub use backoff::Backoff;
pub use client::Client;
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::{Event, HistoryPage, HistoryQuery, SendReceipt};
pub use parley_core::presence::{PresenceView, Status};
pub use parley_core::protocol::{ChannelView, ErrorCode, MessageView};
