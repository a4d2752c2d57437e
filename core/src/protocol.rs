//! Wire protocol v1: one tagged enum per direction and a pure decoder. See `docs/protocol.md`.

use serde::{Deserialize, Serialize};

/// The only protocol version so far.
pub const PROTOCOL_VERSION: u32 = 1;

/// Stable error codes sent in `error` frames and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON, or not a JSON object.
    InvalidJson,
    /// Unknown `type`.
    UnknownType,
    /// A required field is missing or has the wrong type.
    InvalidFrame,
    /// A field is out of range.
    InvalidArgument,
    /// The text is longer than the limit.
    TextTooLong,
    /// Not a member of the conversation.
    NotAMember,
    /// The channel does not exist.
    NoSuchChannel,
    /// The channel name is taken.
    ChannelExists,
    /// The channel is full.
    TooManyMembers,
    /// Too many sends; retry later.
    RateLimited,
    /// The backend could not take the write; nothing was confirmed.
    Unavailable,
    /// Authentication failed.
    Unauthorized,
    /// The caller's role (or the channel's privacy) does not allow the action.
    Forbidden,
    /// The caller is banned from the channel.
    Banned,
    /// The other user of a direct message blocked the caller, or the caller blocked them.
    Blocked,
    /// A bug.
    Internal,
    /// Between gateways and routers only, never sent to a client: the router does not own the partition the
    /// channel lives in (it was just handed to another router). The gateway refreshes its map and retries.
    NotOwner,
    /// No push provider (FCM or APNs) is configured: device registrations and mutes are refused.
    PushDisabled,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::NoSuchChannel => "no_such_channel",
            ErrorCode::ChannelExists => "channel_exists",
            ErrorCode::TooManyMembers => "too_many_members",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Banned => "banned",
            ErrorCode::Blocked => "blocked",
            ErrorCode::Internal => "internal",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::PushDisabled => "push_disabled",
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// A frame from client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Send a message.
    Send {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Conversation id.
        channel: String,
        /// Idempotency key, unique per sender.
        client_msg_id: String,
        /// Message text.
        text: String,
        /// `true` on the first time this `client_msg_id` is sent: the server then skips looking for an earlier
        /// send with the same key in storage, so a send never waits for the database. Absent (or `false`) means
        /// "maybe a retry", which is always safe. A client that marks a retry as first may store it twice.
        #[serde(default, skip_serializing_if = "is_false")]
        first_attempt: bool,
    },
    /// Read a page of history.
    History {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Conversation id.
        channel: String,
        /// Only messages with a smaller sequence.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Only messages with a larger sequence.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Page size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Cumulative acknowledgement of received messages.
    Ack {
        /// Conversation id.
        channel: String,
        /// Everything up to this sequence was received.
        seq: u64,
    },
    /// Heartbeat.
    Ping {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Create a group channel.
    CreateChannel {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel name.
        name: String,
        /// Other initial members (added at once, or invited, as the deployment's membership policy says).
        #[serde(default)]
        members: Vec<String>,
        /// `public` (default: anyone may join) or `private` (by invitation).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visibility: Option<crate::access::Visibility>,
        /// `everyone` (default) or `admins` (an announcement channel).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        posting: Option<crate::access::Posting>,
    },
    /// Join a group channel.
    Join {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel id.
        channel: String,
    },
    /// Leave a channel.
    Leave {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel id.
        channel: String,
    },
    /// List my channels.
    ListChannels {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Resume: the client's last sequence per channel; the server replays what is missing, then `synced`.
    Sync {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Last sequence the client has, per channel id.
        channels: std::collections::BTreeMap<String, u64>,
    },
    /// Marks everything up to `seq` in a channel as read (a cursor; it never moves back).
    Read {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// Last read sequence.
        seq: u64,
    },
    /// Watch (or stop watching) users' presence; the answer is their current state, then live `presence`.
    SubscribePresence {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Users.
        users: Vec<String>,
        /// `false` to stop watching.
        #[serde(default = "default_true")]
        watch: bool,
    },
    /// Set your own presence: `online` or `away`.
    SetPresence {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// `online` or `away`.
        status: crate::presence::Status,
    },
    /// Presence of a channel's members (aggregate count above the fan-out threshold).
    ChannelPresence {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
    },
    /// Open (create on first use) the DM with a user.
    OpenDm {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// The other user.
        user: String,
    },
    /// Invite a user to a group channel (owners and admins): a member at once, or invited, as the deployment's
    /// membership policy says.
    Invite {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// The user.
        user: String,
    },
    /// Remove a member (owners: anyone but owners; admins: plain members).
    RemoveMember {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// The member.
        user: String,
    },
    /// Ban a user (removed if a member; cannot join or be invited until unbanned).
    Ban {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// The user.
        user: String,
    },
    /// Lift a ban.
    Unban {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// The user.
        user: String,
    },
    /// Give a member a role (owners only).
    SetRole {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// The member.
        user: String,
        /// `owner`, `admin` or `member`.
        role: crate::access::Role,
    },
    /// Change who may join or post (owners and admins).
    UpdateChannel {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// New visibility.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        visibility: Option<crate::access::Visibility>,
        /// New posting rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        posting: Option<crate::access::Posting>,
    },
    /// Refuse direct messages from a user (existing and new ones), or accept them again.
    Block {
        /// Echoed in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// The user.
        user: String,
        /// `false` to unblock.
        #[serde(default = "default_true")]
        blocked: bool,
    },
}

impl ClientFrame {
    /// The request id, if the frame carries one.
    pub fn req_id(&self) -> Option<&str> {
        match self {
            ClientFrame::Send { req_id, .. }
            | ClientFrame::History { req_id, .. }
            | ClientFrame::Ping { req_id }
            | ClientFrame::CreateChannel { req_id, .. }
            | ClientFrame::Join { req_id, .. }
            | ClientFrame::Leave { req_id, .. }
            | ClientFrame::ListChannels { req_id }
            | ClientFrame::OpenDm { req_id, .. }
            | ClientFrame::Sync { req_id, .. }
            | ClientFrame::Read { req_id, .. }
            | ClientFrame::SubscribePresence { req_id, .. }
            | ClientFrame::SetPresence { req_id, .. }
            | ClientFrame::ChannelPresence { req_id, .. }
            | ClientFrame::Invite { req_id, .. }
            | ClientFrame::RemoveMember { req_id, .. }
            | ClientFrame::Ban { req_id, .. }
            | ClientFrame::Unban { req_id, .. }
            | ClientFrame::SetRole { req_id, .. }
            | ClientFrame::UpdateChannel { req_id, .. }
            | ClientFrame::Block { req_id, .. } => req_id.as_deref(),
            ClientFrame::Ack { .. } => None,
        }
    }
}

const CLIENT_TYPES: &[&str] = &[
    "send",
    "history",
    "ack",
    "ping",
    "create_channel",
    "join",
    "leave",
    "list_channels",
    "open_dm",
    "sync",
    "read",
    "subscribe_presence",
    "set_presence",
    "channel_presence",
    "invite",
    "remove_member",
    "ban",
    "unban",
    "set_role",
    "update_channel",
    "block",
];

fn default_true() -> bool {
    true
}

/// Why a client frame could not be decoded. Small on purpose: this is the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// `invalid_json`, `unknown_type` or `invalid_frame`.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// The request id, when it could still be read.
    pub req_id: Option<String>,
}

/// The deepest nesting of objects and arrays a client frame may have, its own object included. It holds inside
/// unknown fields too (they are parsed, then ignored): serde_json's recursion limit, named here so the refusal is
/// clear (`invalid_json`, "frame nests deeper than 127 levels").
pub const MAX_DEPTH: usize = 127;

/// Decodes one client frame. Pure; never panics on any input.
///
/// Only a JSON object is a frame (`invalid_json` otherwise, and for nesting deeper than [`MAX_DEPTH`]). An object
/// that does not decode is answered by its `type`: `unknown_type` when it names no frame, else `invalid_frame`
/// with the reason (a missing field, a wrong type, a number out of range such as `1e400` or a 1,000-digit
/// integer); either way with its `req_id` when that is a string of at most 64 bytes.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    // serde's internally tagged enums also take an array whose first element is the tag: refuse it first.
    if bytes.iter().find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r')) != Some(&b'{') {
        return Err(invalid_json("frame is not a JSON object".to_owned()));
    }
    match serde_json::from_slice::<ClientFrame>(bytes) {
        Ok(frame) => Ok(frame),
        Err(error) => Err(refusal(bytes, &error)),
    }
}

fn invalid_json(message: String) -> DecodeError {
    DecodeError { code: ErrorCode::InvalidJson, message, req_id: None }
}

/// Why an object did not decode, and what of it can still be echoed.
fn refusal(bytes: &[u8], error: &serde_json::Error) -> DecodeError {
    if nesting_depth(bytes) > MAX_DEPTH {
        return invalid_json(format!("frame nests deeper than {MAX_DEPTH} levels of objects and arrays"));
    }
    let probe = match serde_json::from_slice::<Probe>(bytes) {
        Ok(probe) => probe,
        Err(probe_error) => {
            return invalid_json(format!("frame is not a JSON object: {}", strip_position(&probe_error.to_string())))
        }
    };
    let req_id = match probe.req_id {
        Some(Field::Text(id)) if id.len() <= 64 => Some(id),
        _ => None,
    };
    let (code, message) = match probe.kind {
        None => (ErrorCode::InvalidFrame, "missing field `type`".to_owned()),
        Some(Field::Text(kind)) if !CLIENT_TYPES.contains(&kind.as_str()) => {
            let shown: String = kind.chars().take(32).collect();
            (ErrorCode::UnknownType, format!("unknown frame type {shown:?}"))
        }
        Some(Field::Text(kind)) => {
            (ErrorCode::InvalidFrame, format!("invalid {kind} frame: {}", strip_position(&error.to_string())))
        }
        Some(Field::Other) => (ErrorCode::InvalidFrame, "field `type` must be a string".to_owned()),
    };
    DecodeError { code, message, req_id }
}

/// The deepest nesting of objects and arrays in `bytes` (outside strings); stops counting past [`MAX_DEPTH`].
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > MAX_DEPTH {
                    break;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// What a frame that did not decode still tells: its `type` and `req_id`. Every other value is skipped unread,
/// so a number no type can hold (`1e400`) elsewhere in the frame does not hide them.
struct Probe {
    kind: Option<Field>,
    req_id: Option<Field>,
}

/// A probed field: a string, or anything else.
enum Field {
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProbeVisitor;

        impl<'de> serde::de::Visitor<'de> for ProbeVisitor {
            type Value = Probe;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
                let mut probe = Probe { kind: None, req_id: None };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "type" if probe.kind.is_none() => probe.kind = Some(map.next_value()?),
                        "req_id" if probe.req_id.is_none() => probe.req_id = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(probe)
            }
        }

        deserializer.deserialize_map(ProbeVisitor)
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;

        impl<'de> serde::de::Visitor<'de> for FieldVisitor {
            type Value = Field;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("any JSON value")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Field, E> {
                Ok(Field::Text(value.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Field, E> {
                Ok(Field::Text(value))
            }

            fn visit_bool<E: serde::de::Error>(self, _value: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }

            fn visit_i64<E: serde::de::Error>(self, _value: i64) -> Result<Field, E> {
                Ok(Field::Other)
            }

            fn visit_u64<E: serde::de::Error>(self, _value: u64) -> Result<Field, E> {
                Ok(Field::Other)
            }

            fn visit_f64<E: serde::de::Error>(self, _value: f64) -> Result<Field, E> {
                Ok(Field::Other)
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Field, E> {
                Ok(Field::Other)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }

        deserializer.deserialize_any(FieldVisitor)
    }
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

/// Serializes ids as decimal strings, since JavaScript numbers lose precision above 2^53.
pub mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize.
    pub fn serialize<S: Serializer>(id: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(id)
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Conversation id.
    pub channel: String,
    /// Per-channel sequence, gap-free from 1.
    pub seq: u64,
    /// Snowflake id.
    #[serde(with = "id_string")]
    pub id: u64,
    /// Sender user id.
    pub sender: String,
    /// Text.
    pub text: String,
    /// Unix milliseconds assigned by the writer.
    pub ts: u64,
    /// The sender's idempotency key.
    pub client_msg_id: String,
}

/// Channel information as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// Conversation id.
    pub id: String,
    /// `group` or `dm`.
    pub kind: crate::ChannelKind,
    /// Group name, or the other user of a DM.
    pub name: String,
    /// Number of members.
    pub members: u32,
    /// Last assigned sequence (0 when empty).
    pub last_seq: u64,
    /// Whether the viewer is a member.
    pub joined: bool,
    /// The viewer's read cursor: everything up to this sequence is read.
    #[serde(default)]
    pub read_seq: u64,
    /// Messages after the read cursor.
    #[serde(default)]
    pub unread: u64,
    /// Who may join a group channel (`public` for DMs).
    #[serde(default)]
    pub visibility: crate::access::Visibility,
    /// Who may post in a group channel (`everyone` for DMs).
    #[serde(default)]
    pub posting: crate::access::Posting,
    /// The viewer's role in a group channel they are a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::access::Role>,
}

/// Limits announced in `ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsView {
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// Largest message text.
    pub max_text_bytes: usize,
    /// Largest channel.
    pub max_channel_members: u32,
    /// Sustained sends per second.
    pub send_rate_per_sec: u32,
    /// Burst of sends.
    pub send_burst: u32,
}

/// A frame from server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of every connection.
    Ready {
        /// Protocol version.
        protocol: u32,
        /// Session id.
        session_id: String,
        /// Authenticated user.
        user: String,
        /// Client heartbeat interval.
        heartbeat_interval_ms: u64,
        /// Limits.
        limits: LimitsView,
        /// The user's channels.
        channels: Vec<ChannelView>,
    },
    /// A message in a conversation.
    Message(MessageView),
    /// Confirmation of a durable send.
    SendResult {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// The sender's idempotency key.
        client_msg_id: String,
        /// Conversation id.
        channel: String,
        /// Snowflake id.
        #[serde(with = "id_string")]
        id: u64,
        /// Sequence.
        seq: u64,
        /// Timestamp.
        ts: u64,
        /// Whether this was a retry of an earlier send.
        duplicate: bool,
    },
    /// A page of history.
    History {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Conversation id.
        channel: String,
        /// Messages by ascending sequence.
        messages: Vec<MessageView>,
        /// More exist in the direction of the query.
        has_more: bool,
    },
    /// One channel.
    Channel {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// The channel.
        channel: ChannelView,
    },
    /// Channel list.
    Channels {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channels.
        channels: Vec<ChannelView>,
    },
    /// A membership change in a channel the client is in.
    Member {
        /// Conversation id.
        channel: String,
        /// User.
        user: String,
        /// Joined (true) or left (false).
        joined: bool,
    },
    /// The user was invited to a channel (membership policy `invite`): `join` it to accept.
    Invited {
        /// Channel.
        channel: String,
        /// Who invited.
        by: String,
    },
    /// Answer to `block`: whether the caller now refuses direct messages from `user`.
    BlockState {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// The user.
        user: String,
        /// Blocked or not.
        blocked: bool,
    },
    /// A gap that cannot be filled (retention expired): refetch the channel's history.
    ResyncRequired {
        /// Channel.
        channel: String,
        /// First missing sequence.
        from: u64,
        /// Oldest sequence still available.
        first_available: u64,
    },
    /// A delivery receipt: `user`'s client received everything of `channel` up to `seq` (channels of at most 32
    /// members).
    Delivered {
        /// Channel.
        channel: String,
        /// Recipient.
        user: String,
        /// Delivered up to this sequence.
        seq: u64,
    },
    /// A read receipt: `user` has read `channel` up to `seq` (also the answer to `read`).
    Read {
        /// Echo (only on the answer to the reader).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// Reader.
        user: String,
        /// Read up to this sequence.
        seq: u64,
    },
    /// A watched user's presence changed.
    Presence {
        /// User.
        user: String,
        /// New state.
        status: crate::presence::Status,
        /// Last seen (Unix ms).
        last_seen: u64,
    },
    /// Current presence of users (answer to `subscribe_presence` and `set_presence`).
    PresenceState {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Users.
        users: Vec<crate::presence::PresenceView>,
    },
    /// Presence in a channel: per user up to the fan-out threshold, otherwise only the online count.
    ChannelPresence {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Channel.
        channel: String,
        /// Members.
        members: u32,
        /// Members online or away.
        online: u32,
        /// Per-user states (absent above the fan-out threshold).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        users: Option<Vec<crate::presence::PresenceView>>,
    },
    /// A `sync` finished: everything missed was replayed, live messages follow.
    Synced {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// The instance is going away: reconnect (the load balancer picks another instance) and `sync`.
    Reconnect {
        /// Why.
        reason: String,
    },
    /// Heartbeat answer.
    Pong {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Server time.
        ts: u64,
    },
    /// An error; the connection stays usable.
    Error {
        /// Echo.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
        /// Stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
        /// For a failed send, its idempotency key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
}

impl ServerFrame {
    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: all keys are strings and there are no maps.
        serde_json::to_string(self).unwrap_or_else(|error| {
            format!(r#"{{"type":"error","code":"internal","message":"encode failed: {error}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_send() {
        let frame = decode_client(br#"{"type":"send","channel":"g:a","client_msg_id":"c1","text":"hi","extra":1}"#);
        assert_eq!(
            frame,
            Ok(ClientFrame::Send {
                req_id: None,
                channel: "g:a".into(),
                client_msg_id: "c1".into(),
                text: "hi".into(),
                first_attempt: false,
            })
        );
        let first = br#"{"type":"send","channel":"g:a","client_msg_id":"c1","text":"hi","first_attempt":true}"#;
        assert!(matches!(decode_client(first), Ok(ClientFrame::Send { first_attempt: true, .. })));
    }

    #[test]
    fn classifies_errors() {
        let code = |bytes: &[u8]| decode_client(bytes).map_err(|error| error.code).err();
        assert_eq!(code(b"not json"), Some(ErrorCode::InvalidJson));
        assert_eq!(code(b"[1,2]"), Some(ErrorCode::InvalidJson));
        assert_eq!(code(br#"["ack","g:a",3]"#), Some(ErrorCode::InvalidJson), "an array is not a frame");
        assert_eq!(code(br#"  "ping" "#), Some(ErrorCode::InvalidJson));
        assert_eq!(code(br#"{"type":"teleport"}"#), Some(ErrorCode::UnknownType));
        assert_eq!(code(br#"{"type":"send","channel":"g:a"}"#), Some(ErrorCode::InvalidFrame));
        assert_eq!(code(br#"{"channel":"g:a"}"#), Some(ErrorCode::InvalidFrame));
        assert_eq!(code(br#"{"type":7}"#), Some(ErrorCode::InvalidFrame));
        let error = decode_client(br#"{"type":"history","req_id":"r9","limit":"x"}"#).expect_err("invalid");
        assert_eq!(error.req_id.as_deref(), Some("r9"));
        assert!(error.message.starts_with("invalid history frame: "), "{}", error.message);
    }

    #[test]
    fn numbers_out_of_range_are_invalid_frames_that_keep_the_req_id() {
        let long = "9".repeat(1_000);
        let cases = [
            r#"{"type":"history","req_id":"r1","channel":"g:a","limit":1e400}"#.to_owned(),
            format!(r#"{{"type":"ack","req_id":"r1","channel":"g:a","seq":{long}}}"#),
            format!(r#"{{"type":"sync","req_id":"r1","channels":{{"g:a":{long}}}}}"#),
            r#"{"req_id":"r1","type":"read","channel":"g:a","seq":-1e999}"#.to_owned(),
            r#"{"type":"ping","req_id":"r1","unknown":[1e400]}"#.to_owned(),
        ];
        for raw in cases {
            let error = decode_client(raw.as_bytes()).expect_err("refused");
            assert_eq!((error.code, error.req_id.as_deref()), (ErrorCode::InvalidFrame, Some("r1")), "{raw}");
            assert!(error.message.contains("number out of range"), "{raw}: {}", error.message);
        }
        let error = decode_client(br#"{"type":"teleport","req_id":"r1","n":1e400}"#).expect_err("refused");
        assert_eq!((error.code, error.req_id.as_deref()), (ErrorCode::UnknownType, Some("r1")));
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_invalid_json_even_in_an_unknown_field() {
        let nested = |depth: usize| {
            let inner = depth - 1;
            format!(r#"{{"type":"ping","req_id":"p","unknown":{}{}}}"#, "[".repeat(inner), "]".repeat(inner))
        };
        assert!(decode_client(nested(MAX_DEPTH).as_bytes()).is_ok(), "{MAX_DEPTH} levels are fine");
        for depth in [MAX_DEPTH + 1, 10_000] {
            let error = decode_client(nested(depth).as_bytes()).expect_err("too deep");
            assert_eq!(error.code, ErrorCode::InvalidJson, "{depth}");
            assert!(error.message.contains(&format!("deeper than {MAX_DEPTH} levels")), "{}", error.message);
        }
    }

    #[test]
    fn server_frames_are_tagged_and_ids_are_strings() {
        let frame = ServerFrame::Message(MessageView {
            channel: "g:a".into(),
            seq: 3,
            id: u64::MAX >> 1,
            sender: "alice".into(),
            text: "hi".into(),
            ts: 5,
            client_msg_id: "c".into(),
        });
        let json = frame.to_json();
        assert!(json.starts_with(r#"{"type":"message""#), "{json}");
        assert!(json.contains(r#""id":"9223372036854775807""#), "{json}");
        assert_eq!(serde_json::from_str::<ServerFrame>(&json).expect("round trip"), frame);
        let error =
            ServerFrame::Error { req_id: None, code: ErrorCode::NotAMember, message: "no".into(), client_msg_id: None };
        assert!(error.to_json().contains(r#""code":"not_a_member""#));
        assert_eq!(ErrorCode::NotAMember.as_str(), "not_a_member");
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_client(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_json_like(text in r#"\{("type":"(send|history|ack|x)",)?("[a-z_]{1,12}":("[^"]{0,8}"|[0-9]{1,3}|null|\[\]),?){0,5}\}"#) {
            let _ = decode_client(text.as_bytes());
        }
    }
}
