//! User ids, channel ids and the deterministic direct-message id.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// User ids are 1–64 bytes of `[A-Za-z0-9_.-]`.
    #[error("invalid user id {0:?}: use 1-64 characters of A-Z a-z 0-9 _ . -")]
    InvalidUser(String),
    /// Channel names are 1–64 bytes of `[a-z0-9_-]`.
    #[error("invalid channel name {0:?}: use 1-64 characters of a-z 0-9 _ -")]
    InvalidChannelName(String),
    /// The channel id is neither `g:<name>` nor `dm:<a>:<b>` with `a < b`.
    #[error("invalid channel id {0:?}: expected g:<name> or dm:<user>:<user>")]
    InvalidChannel(String),
    /// A DM needs two different users.
    #[error("a direct message needs two different users")]
    SelfDm,
}

/// A validated user id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

fn valid_user(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

fn valid_channel_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'_' | b'-'))
}

impl UserId {
    /// Validates a user id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if valid_user(&value) {
            Ok(Self(value))
        } else {
            Err(IdError::InvalidUser(value))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<UserId> for String {
    fn from(value: UserId) -> Self {
        value.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// The kind of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// A named group channel with explicit membership.
    Group,
    /// A direct message between exactly two users.
    Dm,
}

/// A validated channel id: `g:<name>` or `dm:<a>:<b>` with `a < b`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(String);

impl ChannelId {
    /// Parses and validates a channel id.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if let Some(name) = value.strip_prefix("g:") {
            if valid_channel_name(name) {
                return Ok(Self(value));
            }
        } else if let Some(pair) = value.strip_prefix("dm:") {
            if let Some((first, second)) = pair.split_once(':') {
                if valid_user(first) && valid_user(second) && first < second {
                    return Ok(Self(value));
                }
            }
        }
        Err(IdError::InvalidChannel(value))
    }

    /// The id of the group channel `name`.
    pub fn group(name: &str) -> Result<Self, IdError> {
        if valid_channel_name(name) {
            Ok(Self(format!("g:{name}")))
        } else {
            Err(IdError::InvalidChannelName(name.to_owned()))
        }
    }

    /// The DM id of two users; the same whichever order they are given in.
    pub fn direct(first: &UserId, second: &UserId) -> Result<Self, IdError> {
        match first.cmp(second) {
            std::cmp::Ordering::Less => Ok(Self(format!("dm:{first}:{second}"))),
            std::cmp::Ordering::Greater => Ok(Self(format!("dm:{second}:{first}"))),
            std::cmp::Ordering::Equal => Err(IdError::SelfDm),
        }
    }

    /// The kind of conversation.
    pub fn kind(&self) -> ChannelKind {
        if self.0.starts_with("dm:") {
            ChannelKind::Dm
        } else {
            ChannelKind::Group
        }
    }

    /// For a DM, its two members.
    pub fn dm_members(&self) -> Option<(UserId, UserId)> {
        let pair = self.0.strip_prefix("dm:")?;
        let (first, second) = pair.split_once(':')?;
        Some((UserId(first.to_owned()), UserId(second.to_owned())))
    }

    /// The display name: the group name, or for a DM the user that is not `viewer`.
    pub fn display_name(&self, viewer: &UserId) -> String {
        match self.dm_members() {
            Some((first, second)) => {
                if &first == viewer {
                    second.0
                } else {
                    first.0
                }
            }
            None => self.0.trim_start_matches("g:").to_owned(),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ChannelId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<ChannelId> for String {
    fn from(value: ChannelId) -> Self {
        value.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("valid user")
    }

    #[test]
    fn dm_id_is_symmetric_and_parses() {
        let alice = user("alice");
        let bob = user("bob");
        let forward = ChannelId::direct(&alice, &bob).expect("dm");
        let backward = ChannelId::direct(&bob, &alice).expect("dm");
        assert_eq!(forward, backward);
        assert_eq!(forward.as_str(), "dm:alice:bob");
        assert_eq!(ChannelId::parse("dm:alice:bob"), Ok(forward.clone()));
        assert_eq!(forward.kind(), ChannelKind::Dm);
        assert_eq!(forward.display_name(&alice), "bob");
        assert_eq!(ChannelId::direct(&alice, &alice), Err(IdError::SelfDm));
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in ["", "general", "g:", "g:UPPER", "dm:bob:alice", "dm:alice:alice", "dm:alice", "g:a b"] {
            assert!(ChannelId::parse(bad).is_err(), "{bad}");
        }
        assert!(UserId::new("a:b").is_err());
        assert!(UserId::new("x".repeat(65)).is_err());
        assert_eq!(ChannelId::group("general").map(|id| id.kind()), Ok(ChannelKind::Group));
    }

    proptest! {
        #[test]
        fn dm_is_order_independent(first in "[a-z0-9]{1,10}", second in "[a-z0-9]{1,10}") {
            prop_assume!(first != second);
            let (a, b) = (user(&first), user(&second));
            let id = ChannelId::direct(&a, &b).expect("dm");
            prop_assert_eq!(&id, &ChannelId::direct(&b, &a).expect("dm"));
            prop_assert_eq!(ChannelId::parse(id.as_str().to_owned()).expect("parses"), id.clone());
            let (x, y) = id.dm_members().expect("members");
            prop_assert!(x < y);
        }
    }
}
