//! The router's operations as one enum ([`Call`]), and what each answers ([`Answer`]).
//!
//! A call is written once: a [`Call`] variant, one typed method on [`crate::Router`], and one arm where the writer
//! runs it. The wire carries the same values: `POST /internal/v1/call` takes a [`Call`] as JSON and answers a
//! [`Reply`] whose `ok` is the [`Answer`]'s value, decoded by the call's [`AnswerKind`].

use crate::error::RouterError;
use crate::types::{ChannelAction, HistoryPage, HomeStep, PresenceUpdate, SendOutcome, ServerOp};
use parley_core::access::{Posting, Visibility};
use parley_core::protocol::{ChannelView, ErrorCode};
use serde::{Deserialize, Serialize};

/// One call to the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// [`crate::Router::send`].
    Send {
        /// Sender.
        user: String,
        /// Channel.
        channel: String,
        /// Idempotency key.
        client_msg_id: String,
        /// Text.
        text: String,
        /// The sender's first attempt with this key (absent: maybe a retry).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        first_attempt: bool,
    },
    /// [`crate::Router::create_channel`].
    CreateChannel {
        /// Creator.
        user: String,
        /// Group name.
        name: String,
        /// Other members.
        members: Vec<String>,
        /// Who may join.
        #[serde(default)]
        visibility: Visibility,
        /// Who may post.
        #[serde(default)]
        posting: Posting,
    },
    /// [`crate::Router::manage_channel`]: invite, remove, ban, unban, set a role, change settings.
    ManageChannel {
        /// Who acts.
        user: String,
        /// Channel.
        channel: String,
        /// What.
        action: ChannelAction,
    },
    /// [`crate::Router::server`]: an operation of the application's backend.
    Server {
        /// The operation.
        operation: ServerOp,
    },
    /// [`crate::Router::block`].
    Block {
        /// Who blocks (or unblocks).
        user: String,
        /// Whom.
        other: String,
        /// Blocked or not.
        blocked: bool,
    },
    /// [`crate::Router::join`].
    Join {
        /// User.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`crate::Router::leave`].
    Leave {
        /// User.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`crate::Router::open_dm`].
    OpenDm {
        /// User.
        user: String,
        /// The other user.
        other: String,
    },
    /// [`crate::Router::history`].
    History {
        /// Reader.
        user: String,
        /// Channel.
        channel: String,
        /// Only `seq < before`.
        before: Option<u64>,
        /// Only `seq > after`.
        after: Option<u64>,
        /// Page size.
        limit: u32,
    },
    /// [`crate::Router::list_channels`].
    ListChannels {
        /// User.
        user: String,
    },
    /// [`crate::Router::channel_view`].
    ChannelView {
        /// Viewer.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`crate::Router::mark_read`].
    MarkRead {
        /// Reader.
        user: String,
        /// Channel.
        channel: String,
        /// Read up to here.
        seq: u64,
    },
    /// [`crate::Router::mark_delivered`].
    MarkDelivered {
        /// Recipient.
        user: String,
        /// Channel.
        channel: String,
        /// Delivered up to here.
        seq: u64,
    },
    /// [`crate::Router::members`].
    Members {
        /// Asking user.
        user: String,
        /// Channel.
        channel: String,
    },
    /// [`crate::Router::first_retained_seq`].
    FirstRetainedSeq {
        /// Channel.
        channel: String,
    },
    /// [`crate::Router::feed`] (a gateway reading a large channel's new messages for its members).
    Feed {
        /// Channel.
        channel: String,
        /// Only `seq > after`.
        after: u64,
        /// Page size.
        limit: u32,
    },
    /// [`crate::Router::record_presence`] (a gateway's presence changes, for the log).
    Presence {
        /// The changes, in the order the gateway saw them.
        updates: Vec<PresenceUpdate>,
    },
    /// A step of moving a channel's home, between the routers of two regions.
    Home {
        /// The step.
        step: HomeStep,
    },
    /// [`crate::Router::register_device`] and [`crate::Router::unregister_device`].
    Device {
        /// The device's owner.
        user: String,
        /// `fcm` or `apns`.
        platform: String,
        /// The provider's token for the device.
        token: String,
        /// Registered (`true`) or forgotten.
        register: bool,
    },
    /// [`crate::Router::mute`].
    Mute {
        /// Who mutes.
        user: String,
        /// Channel.
        channel: String,
        /// Muted until this time (Unix ms; `u64::MAX`: until unmuted); `None` unmutes.
        until: Option<u64>,
    },
}

/// A reply on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    /// The call succeeded.
    Ok(T),
    /// The call was refused or failed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable reason.
        message: String,
    },
}

impl Call {
    /// The channel the call is about, which decides the router that must take it (the owner of the channel's
    /// partition): a group's `g:<name>` for a creation, the direct-message channel of the two users for
    /// `open_dm` and `block`. `None` for calls about no channel (any router takes them) and for names that are
    /// not valid (the router refuses them).
    pub fn channel_key(&self) -> Option<String> {
        use parley_core::conversation::{ChannelId, UserId};
        let direct = |first: &str, second: &str| {
            let first = UserId::new(first).ok()?;
            let second = UserId::new(second).ok()?;
            ChannelId::direct(&first, &second).ok().map(|channel| channel.as_str().to_owned())
        };
        match self {
            Call::Send { channel, .. }
            | Call::ManageChannel { channel, .. }
            | Call::Join { channel, .. }
            | Call::Leave { channel, .. }
            | Call::History { channel, .. }
            | Call::ChannelView { channel, .. }
            | Call::MarkRead { channel, .. }
            | Call::MarkDelivered { channel, .. }
            | Call::Members { channel, .. }
            | Call::FirstRetainedSeq { channel }
            | Call::Feed { channel, .. }
            | Call::Server { operation: ServerOp::DeleteChannel { channel } }
            | Call::Server { operation: ServerOp::Manage { channel, .. } }
            | Call::Server { operation: ServerOp::Post { channel, .. } }
            | Call::Server { operation: ServerOp::MoveHome { channel, .. } }
            | Call::Mute { channel, .. }
            | Call::Home { step: HomeStep::Freeze { channel } | HomeStep::Release { channel } } => {
                Some(channel.clone())
            }
            Call::CreateChannel { name, .. } | Call::Server { operation: ServerOp::CreateChannel { name, .. } } => {
                ChannelId::group(name).ok().map(|channel| channel.as_str().to_owned())
            }
            Call::OpenDm { user, other } | Call::Block { user, other, .. } => direct(user, other),
            Call::ListChannels { .. }
            | Call::Presence { .. }
            | Call::Device { .. }
            | Call::Server { operation: ServerOp::SetRegionFailed { .. } } => None,
        }
    }

    /// Marks a send as possibly seen already: a call retried after its outcome was lost must be looked up by
    /// its key before it is written again.
    pub fn into_retry(self) -> Self {
        match self {
            Call::Send { user, channel, client_msg_id, text, .. } => {
                Call::Send { user, channel, client_msg_id, text, first_attempt: false }
            }
            other => other,
        }
    }

    /// The operation's name, for spans and metrics.
    pub fn op(&self) -> &'static str {
        self.describe().0
    }

    /// What the call answers.
    pub fn answer_kind(&self) -> AnswerKind {
        self.describe().1
    }

    fn describe(&self) -> (&'static str, AnswerKind) {
        match self {
            Call::Send { .. } => ("send", AnswerKind::Sent),
            Call::CreateChannel { .. } => ("create_channel", AnswerKind::Channel),
            Call::ManageChannel { .. } => ("manage_channel", AnswerKind::Channel),
            Call::Block { .. } => ("block", AnswerKind::Done),
            Call::Server { operation: ServerOp::CreateChannel { .. } } => {
                ("server_create_channel", AnswerKind::Channel)
            }
            Call::Server { operation: ServerOp::DeleteChannel { .. } } => ("server_delete_channel", AnswerKind::Done),
            Call::Server { operation: ServerOp::Manage { .. } } => ("server_manage", AnswerKind::Channel),
            Call::Server { operation: ServerOp::Post { .. } } => ("server_post", AnswerKind::Sent),
            Call::Server { operation: ServerOp::MoveHome { .. } } => ("server_move_home", AnswerKind::Seq),
            Call::Server { operation: ServerOp::SetRegionFailed { .. } } => {
                ("server_set_region_failed", AnswerKind::Done)
            }
            Call::Home { step: HomeStep::Freeze { .. } } => ("home_freeze", AnswerKind::Seq),
            Call::Home { step: HomeStep::Release { .. } } => ("home_release", AnswerKind::Done),
            Call::Join { .. } => ("join", AnswerKind::Channel),
            Call::Leave { .. } => ("leave", AnswerKind::Channel),
            Call::OpenDm { .. } => ("open_dm", AnswerKind::Channel),
            Call::History { .. } => ("history", AnswerKind::Page),
            Call::ListChannels { .. } => ("list_channels", AnswerKind::Channels),
            Call::ChannelView { .. } => ("channel_view", AnswerKind::Channel),
            Call::MarkRead { .. } => ("mark_read", AnswerKind::Seq),
            Call::MarkDelivered { .. } => ("mark_delivered", AnswerKind::Done),
            Call::Members { .. } => ("members", AnswerKind::Users),
            Call::FirstRetainedSeq { .. } => ("first_retained_seq", AnswerKind::Seq),
            Call::Feed { .. } => ("feed", AnswerKind::Page),
            Call::Presence { .. } => ("presence", AnswerKind::Done),
            Call::Device { register: true, .. } => ("register_device", AnswerKind::Flag),
            Call::Device { register: false, .. } => ("unregister_device", AnswerKind::Flag),
            Call::Mute { .. } => ("mute", AnswerKind::Done),
        }
    }
}

/// What a call answers. On the wire it is the inner value alone (`Done` is `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// A send's placement.
    Sent(SendOutcome),
    /// One channel as the caller sees it.
    Channel(ChannelView),
    /// The caller's channels.
    Channels(Vec<ChannelView>),
    /// A page of messages.
    Page(HistoryPage),
    /// A sequence number (a read cursor, the oldest retained message).
    Seq(u64),
    /// User names (members).
    Users(Vec<String>),
    /// Yes or no (a device was registered before, or was removed).
    Flag(bool),
    /// Nothing to say: the call took effect.
    Done,
}

/// The shape of an [`Answer`], known from the call before its reply arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// [`Answer::Sent`].
    Sent,
    /// [`Answer::Channel`].
    Channel,
    /// [`Answer::Channels`].
    Channels,
    /// [`Answer::Page`].
    Page,
    /// [`Answer::Seq`].
    Seq,
    /// [`Answer::Users`].
    Users,
    /// [`Answer::Flag`].
    Flag,
    /// [`Answer::Done`].
    Done,
}

impl AnswerKind {
    /// Decodes a reply's value as this kind of answer.
    pub fn decode(self, value: serde_json::Value) -> Result<Answer, serde_json::Error> {
        use serde_json::from_value;
        Ok(match self {
            AnswerKind::Sent => Answer::Sent(from_value(value)?),
            AnswerKind::Channel => Answer::Channel(from_value(value)?),
            AnswerKind::Channels => Answer::Channels(from_value(value)?),
            AnswerKind::Page => Answer::Page(from_value(value)?),
            AnswerKind::Seq => Answer::Seq(from_value(value)?),
            AnswerKind::Users => Answer::Users(from_value(value)?),
            AnswerKind::Flag => Answer::Flag(from_value(value)?),
            AnswerKind::Done => {
                from_value::<()>(value)?;
                Answer::Done
            }
        })
    }
}

macro_rules! answer_into {
    ($($method:ident => $variant:ident ( $ty:ty )),* $(,)?) => {
        impl Answer {
            $(
                #[doc = concat!("The [`Answer::", stringify!($variant), "`] value of a call to `op`.")]
                pub fn $method(self, op: &'static str) -> Result<$ty, RouterError> {
                    match self {
                        Answer::$variant(value) => Ok(value),
                        _ => Err(RouterError::UnexpectedAnswer { op }),
                    }
                }
            )*

            /// Checks that a call to `op` answered [`Answer::Done`].
            pub fn into_done(self, op: &'static str) -> Result<(), RouterError> {
                match self {
                    Answer::Done => Ok(()),
                    _ => Err(RouterError::UnexpectedAnswer { op }),
                }
            }
        }
    };
}

answer_into!(
    into_sent => Sent(SendOutcome),
    into_channel => Channel(ChannelView),
    into_channels => Channels(Vec<ChannelView>),
    into_page => Page(HistoryPage),
    into_seq => Seq(u64),
    into_users => Users(Vec<String>),
    into_flag => Flag(bool),
);
