//! What a push says: a short preview of the message and the deep-link data the app opens it with.

use std::collections::BTreeMap;

/// Longest notification body, in characters (an ellipsis included when the text was cut).
pub const MAX_BODY_CHARS: usize = 120;
/// Longest notification title, in characters.
pub const MAX_TITLE_CHARS: usize = 80;

/// Deep-link key: the conversation (channel) id.
pub const DATA_CONVERSATION_ID: &str = "conversation_id";
/// Deep-link key: the message's Snowflake id, in decimal.
pub const DATA_MESSAGE_ID: &str = "message_id";
/// Deep-link key: the message's per-conversation sequence number, in decimal.
pub const DATA_SEQ: &str = "seq";

/// A chat message as the push layer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushMessage {
    /// The conversation id (`dm:<a>:<b>` or `g:<name>`).
    pub conversation_id: String,
    /// A display name for group conversations; `None` for direct messages.
    pub conversation_name: Option<String>,
    /// Who sent the message (display name or user id).
    pub sender: String,
    /// The message's Snowflake id.
    pub message_id: u64,
    /// The message's sequence number within its conversation.
    pub seq: u64,
    /// The full message text.
    pub text: String,
}

/// A provider-neutral notification: what both the FCM and the APNs client send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The visible title.
    pub title: String,
    /// The visible body.
    pub body: String,
    /// Extra string data for the app (the deep link).
    pub data: BTreeMap<String, String>,
    /// APNs collapse id: a newer notification with the same id replaces the older one on the device.
    pub collapse_id: Option<String>,
}

impl Notification {
    /// The preview of `message`: title "sender" (direct message) or "sender in conversation" (group), body the
    /// text cut to [`MAX_BODY_CHARS`], and the deep link (conversation id, message id, seq) as data.
    pub fn from_message(message: &PushMessage) -> Self {
        let title = match &message.conversation_name {
            Some(name) => format!("{} in {name}", message.sender),
            None => message.sender.clone(),
        };
        let data = BTreeMap::from([
            (DATA_CONVERSATION_ID.to_owned(), message.conversation_id.clone()),
            (DATA_MESSAGE_ID.to_owned(), message.message_id.to_string()),
            (DATA_SEQ.to_owned(), message.seq.to_string()),
        ]);
        Notification {
            title: truncate(&title, MAX_TITLE_CHARS),
            body: truncate(message.text.trim(), MAX_BODY_CHARS),
            data,
            collapse_id: None,
        }
    }
}

/// `text` cut to at most `max_chars` characters at a character boundary, ending with "…" when it was cut.
pub fn truncate(text: &str, max_chars: usize) -> String {
    if max_chars == 0 {
        return String::new();
    }
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some(_) => {
            let keep = text.char_indices().nth(max_chars - 1).map_or(text.len(), |(index, _)| index);
            let mut cut = text[..keep].trim_end().to_owned();
            cut.push('…');
            cut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> PushMessage {
        PushMessage {
            conversation_id: "g:general".into(),
            conversation_name: Some("general".into()),
            sender: "alice".into(),
            message_id: 42,
            seq: 7,
            text: text.into(),
        }
    }

    #[test]
    fn short_text_is_kept() {
        assert_eq!(truncate("hello", 120), "hello");
        assert_eq!(truncate("", 120), "");
        assert_eq!(truncate("abc", 3), "abc");
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary() {
        let text = "é".repeat(200);
        let cut = truncate(&text, 120);
        assert_eq!(cut.chars().count(), 120);
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éé"));

        let emoji = "👋🏽".repeat(100);
        let cut = truncate(&emoji, 9);
        assert_eq!(cut.chars().count(), 9);
        assert_eq!(truncate("abcd", 3), "ab…");
        assert_eq!(truncate("abcd", 0), "");
    }

    #[test]
    fn preview_has_title_body_and_deep_link() {
        let notification = Notification::from_message(&message(&"x".repeat(500)));
        assert_eq!(notification.title, "alice in general");
        assert_eq!(notification.body.chars().count(), MAX_BODY_CHARS);
        assert_eq!(notification.data["conversation_id"], "g:general");
        assert_eq!(notification.data["message_id"], "42");
        assert_eq!(notification.data["seq"], "7");

        let direct = PushMessage { conversation_name: None, ..message("hi") };
        let notification = Notification::from_message(&direct);
        assert_eq!(notification.title, "alice");
        assert_eq!(notification.body, "hi");
    }
}
