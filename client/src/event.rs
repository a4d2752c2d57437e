//! What the client tells the application, and the answers of its requests.

use parley_core::presence::PresenceView;
use parley_core::protocol::{ChannelView, MessageView};

/// One event for the application. Messages of a channel come in strict `seq` order, each exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection is up (`ready` received).
    Connected {
        /// Session id given by the server.
        session_id: String,
        /// The authenticated user.
        user: String,
        /// The user's channels, with their `last_seq` at connect.
        channels: Vec<ChannelView>,
    },
    /// The next message of a channel.
    Message(MessageView),
    /// The connection dropped; the client reconnects by itself.
    Disconnected {
        /// WebSocket close code sent by the server, if any (4008, 4009, 4010, 1001, ...).
        code: Option<u16>,
        /// Why.
        reason: String,
    },
    /// A connection attempt failed; the next one starts after the backoff delay.
    ConnectFailed {
        /// Consecutive failed attempts so far.
        attempt: u32,
        /// Why it failed.
        error: String,
    },
    /// The resume after a reconnect finished: every message missed meanwhile has been delivered.
    Resynced,
    /// Messages of `channel` from `from` to `first_available - 1` are gone (retention): the stream continues at
    /// `first_available`. Reload the channel if you kept a copy.
    ResyncRequired {
        /// Channel.
        channel: String,
        /// First missing sequence.
        from: u64,
        /// Oldest sequence still available.
        first_available: u64,
    },
    /// The user's membership of a channel changed (created, joined, left, DM opened, added by someone).
    Channel(ChannelView),
    /// Someone joined or left a channel the user is in.
    Member {
        /// Channel.
        channel: String,
        /// User.
        user: String,
        /// Joined (`true`) or left.
        joined: bool,
    },
    /// A watched user's presence (see [`crate::Client::watch_presence`]): a change, or the state after a
    /// reconnect.
    Presence(PresenceView),
    /// The client stopped for good (closed, or reconnecting gave up). No more events follow.
    Closed {
        /// Why.
        reason: String,
    },
}

/// The confirmation of a durable send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Channel.
    pub channel: String,
    /// The idempotency key the message was sent with.
    pub client_msg_id: String,
    /// Snowflake id.
    pub id: u64,
    /// Sequence in the channel.
    pub seq: u64,
    /// Server timestamp, Unix milliseconds.
    pub ts: u64,
    /// Whether the server had already stored this `client_msg_id` (a retry).
    pub duplicate: bool,
}

/// Which page of history to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only messages with a smaller `seq` (newest first page).
    pub before: Option<u64>,
    /// Only messages with a larger `seq` (oldest first page).
    pub after: Option<u64>,
    /// Page size (1-200; the server's default is 50).
    pub limit: Option<u32>,
}

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Channel.
    pub channel: String,
    /// Messages by ascending `seq`.
    pub messages: Vec<MessageView>,
    /// Whether more exist in the direction of the query.
    pub has_more: bool,
}
