//! Pub/sub for delivery: the trait, the in-process driver, and the event envelope.
//!
//! Topics are `ch:<channel>` (messages and member changes of a conversation, subscribed once per gateway instance
//! that holds a member), `pr:<user>` (the user's presence as shown, subscribed by the gateway instances where a
//! connection watches the user) and `gw:<instance>` (direct delivery to one gateway instance: changes to the memberships of
//! users connected there, addressed through the user→gateway registry). `gw` reaches every gateway, for a router
//! with no registry (the embedded mode's single gateway) or when the registry cannot be read. Payloads are
//! [`Event`]s: a message event carries the already-encoded `message` frame, so a gateway forwards the same bytes to
//! every local member without re-encoding.

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use parley_api::BackendError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A delivered publication: topic and payload.
pub type Delivery = (Arc<str>, Bytes);

/// Publish/subscribe transport.
#[async_trait]
pub trait PubSub: Send + Sync + 'static {
    /// Publishes a payload to every current subscriber of `topic`.
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), BackendError>;
    /// Publishes several payloads in order, in one round trip where the engine allows it (a pipeline). On an
    /// error some of them may have gone out.
    async fn publish_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        for (topic, payload) in items {
            self.publish(&topic, payload).await?;
        }
        Ok(())
    }
    /// Opens a subscriber; its publications go to `sink` in publish order per topic.
    fn open(&self, sink: mpsc::Sender<Delivery>) -> Arc<dyn Subscription>;
}

/// One subscriber's topic set.
#[async_trait]
pub trait Subscription: Send + Sync {
    /// Adds topics (idempotent).
    async fn subscribe(&self, topics: Vec<String>) -> Result<(), BackendError>;
    /// Removes topics (idempotent).
    async fn unsubscribe(&self, topics: Vec<String>) -> Result<(), BackendError>;
}

/// The topic of a conversation.
pub fn channel_topic(channel: &str) -> String {
    format!("ch:{channel}")
}

/// The presence topic of a user.
pub fn presence_topic(user: &str) -> String {
    format!("pr:{user}")
}

/// The direct-delivery topic of one gateway instance.
pub fn gateway_topic(instance: &str) -> String {
    format!("gw:{instance}")
}

/// The topic every gateway instance subscribes: direct events whose user cannot be located go there.
pub const ALL_GATEWAYS_TOPIC: &str = "gw";

/// A control event (everything but messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlEvent {
    /// Someone joined or left a conversation (published on the channel topic).
    Member {
        /// Channel.
        channel: String,
        /// User.
        user: String,
        /// Joined or left.
        joined: bool,
    },
    /// A member's connection acknowledged everything up to `seq` (published on the channel topic).
    Delivered {
        /// Channel.
        channel: String,
        /// Recipient.
        user: String,
        /// Delivered up to.
        seq: u64,
    },
    /// A member moved their read cursor (published on the channel topic).
    Read {
        /// Channel.
        channel: String,
        /// Reader.
        user: String,
        /// Read up to.
        seq: u64,
    },
    /// A user was added to or removed from a conversation (published on the direct topics of the gateway
    /// instances that hold the user's connections).
    Membership {
        /// The user.
        user: String,
        /// Channel.
        channel: String,
        /// Added or removed.
        joined: bool,
    },
    /// A user was invited to a channel (published on the direct topics of the user's gateway instances).
    Invited {
        /// The user.
        user: String,
        /// Channel.
        channel: String,
        /// Who invited.
        by: String,
    },
    /// The application's backend disconnects a user (server API): every gateway closes each live connection of the
    /// user with 4003 (published on [`ALL_GATEWAYS_TOPIC`]).
    Disconnect {
        /// The user.
        user: String,
    },
    /// A user's presence as shown changed (published on the user's presence topic by the gateway that saw the
    /// change, or by a router that read another region's report).
    Presence {
        /// The user.
        user: String,
        /// The status shown.
        status: parley_core::presence::Status,
        /// Last seen (Unix ms; 0 if never).
        last_seen: u64,
    },
    /// The application's backend revoked the user's tokens issued before `before` (server API): every gateway
    /// closes each live connection of the user whose token was issued before then (or carries no `iat`) with 4004
    /// (published on [`ALL_GATEWAYS_TOPIC`]; the revocation itself is kept in a
    /// [`crate::revocation::RevocationStore`]).
    Revoked {
        /// The user.
        user: String,
        /// Tokens issued before this time (Unix seconds) are revoked.
        before: u64,
    },
}

/// A decoded publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message: its sequence, its time, and the encoded `message` frame, ready to forward.
    Message {
        /// Per-channel sequence (the channel is the topic's).
        seq: u64,
        /// When the writer sequenced it (Unix ms, its id's timestamp), for fan-out latency; 0 when unknown.
        ts: u64,
        /// The encoded `message` frame.
        frame: Bytes,
    },
    /// New messages of a large channel (fan-out on read): sequences `first..=last` are durable, and readers
    /// fetch them from the channel's feed ([`crate::feed`]) instead of receiving them here.
    Feed {
        /// The first new sequence.
        first: u64,
        /// The last new sequence.
        last: u64,
    },
    /// A control event.
    Control(ControlEvent),
}

/// A message without its time (as written by earlier routers; still read).
const UNTIMED_MESSAGE_TAG: u8 = b'M';
const MESSAGE_TAG: u8 = b'T';
const FEED_TAG: u8 = b'F';
const CONTROL_TAG: u8 = b'C';

impl Event {
    /// Encodes the event for the wire between router and gateways.
    pub fn encode(&self) -> Bytes {
        match self {
            Event::Message { seq, ts, frame } => {
                let mut buffer = BytesMut::with_capacity(frame.len() + 17);
                buffer.put_u8(MESSAGE_TAG);
                buffer.put_u64(*seq);
                buffer.put_u64(*ts);
                buffer.put_slice(frame);
                buffer.freeze()
            }
            Event::Feed { first, last } => {
                let mut buffer = BytesMut::with_capacity(17);
                buffer.put_u8(FEED_TAG);
                buffer.put_u64(*first);
                buffer.put_u64(*last);
                buffer.freeze()
            }
            Event::Control(control) => {
                let mut buffer = vec![CONTROL_TAG];
                // A plain enum of strings and bools always serializes.
                if let Ok(json) = serde_json::to_vec(control) {
                    buffer.extend_from_slice(&json);
                }
                Bytes::from(buffer)
            }
        }
    }

    /// Decodes an event; `None` for a payload this version does not understand.
    pub fn decode(payload: &Bytes) -> Option<Event> {
        match *payload.first()? {
            MESSAGE_TAG if payload.len() >= 17 => Some(Event::Message {
                seq: read_u64(&payload[1..9]),
                ts: read_u64(&payload[9..17]),
                frame: payload.slice(17..),
            }),
            UNTIMED_MESSAGE_TAG if payload.len() >= 9 => {
                Some(Event::Message { seq: read_u64(&payload[1..9]), ts: 0, frame: payload.slice(9..) })
            }
            FEED_TAG if payload.len() == 17 => {
                Some(Event::Feed { first: read_u64(&payload[1..9]), last: read_u64(&payload[9..17]) })
            }
            CONTROL_TAG => serde_json::from_slice(&payload[1..]).ok().map(Event::Control),
            _ => None,
        }
    }
}

/// A big-endian u64 from exactly eight bytes (callers check the length).
fn read_u64(bytes: &[u8]) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(bytes);
    u64::from_be_bytes(buffer)
}

type Subscribers = HashMap<String, Vec<(u64, mpsc::Sender<Delivery>)>>;

/// The in-process pub/sub driver for the embedded mode.
#[derive(Clone, Default)]
pub struct LocalPubSub {
    topics: Arc<Mutex<Subscribers>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for LocalPubSub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LocalPubSub").finish_non_exhaustive()
    }
}

impl LocalPubSub {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock(topics: &Mutex<Subscribers>) -> std::sync::MutexGuard<'_, Subscribers> {
    // A poisoned lock only means another thread panicked mid-update of a plain map; keep going.
    topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl PubSub for LocalPubSub {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), BackendError> {
        let targets: Vec<mpsc::Sender<Delivery>> = match lock(&self.topics).get(topic) {
            Some(subscribers) => subscribers.iter().map(|(_, sender)| sender.clone()).collect(),
            None => return Ok(()),
        };
        let topic: Arc<str> = Arc::from(topic);
        for target in targets {
            // A closed subscriber is simply gone; the others still get the publication.
            let _ = target.send((topic.clone(), payload.clone())).await;
        }
        Ok(())
    }

    fn open(&self, sink: mpsc::Sender<Delivery>) -> Arc<dyn Subscription> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(LocalSubscription { id, sink, topics: self.topics.clone() })
    }
}

struct LocalSubscription {
    id: u64,
    sink: mpsc::Sender<Delivery>,
    topics: Arc<Mutex<Subscribers>>,
}

#[async_trait]
impl Subscription for LocalSubscription {
    async fn subscribe(&self, topics: Vec<String>) -> Result<(), BackendError> {
        let mut map = lock(&self.topics);
        for topic in topics {
            let subscribers = map.entry(topic).or_default();
            if !subscribers.iter().any(|(id, _)| *id == self.id) {
                subscribers.push((self.id, self.sink.clone()));
            }
        }
        Ok(())
    }

    async fn unsubscribe(&self, topics: Vec<String>) -> Result<(), BackendError> {
        let mut map = lock(&self.topics);
        for topic in topics {
            if let Some(subscribers) = map.get_mut(&topic) {
                subscribers.retain(|(id, _)| *id != self.id);
                if subscribers.is_empty() {
                    map.remove(&topic);
                }
            }
        }
        Ok(())
    }
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        let mut map = lock(&self.topics);
        map.retain(|_, subscribers| {
            subscribers.retain(|(id, _)| *id != self.id);
            !subscribers.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_subscribed_topics_only() {
        let bus = LocalPubSub::new();
        let (sink, mut deliveries) = mpsc::channel(8);
        let subscription = bus.open(sink);
        subscription.subscribe(vec!["ch:g:a".into()]).await.expect("subscribe");
        bus.publish("ch:g:b", Bytes::from_static(b"x")).await.expect("publish");
        bus.publish("ch:g:a", Bytes::from_static(b"y")).await.expect("publish");
        let (topic, payload) = deliveries.recv().await.expect("delivery");
        assert_eq!((&*topic, &payload[..]), ("ch:g:a", &b"y"[..]));
        subscription.unsubscribe(vec!["ch:g:a".into()]).await.expect("unsubscribe");
        bus.publish("ch:g:a", Bytes::from_static(b"z")).await.expect("publish");
        assert!(deliveries.try_recv().is_err());
    }

    #[test]
    fn events_round_trip() {
        let message =
            Event::Message { seq: 7, ts: 1_764_296_000_000, frame: Bytes::from_static(br#"{"type":"message"}"#) };
        assert_eq!(Event::decode(&message.encode()), Some(message));
        let control = Event::Control(ControlEvent::Member { channel: "g:a".into(), user: "bob".into(), joined: true });
        assert_eq!(Event::decode(&control.encode()), Some(control));
        let disconnect = Event::Control(ControlEvent::Disconnect { user: "bob".into() });
        assert_eq!(Event::decode(&disconnect.encode()), Some(disconnect));
        let revoked = Event::Control(ControlEvent::Revoked { user: "bob".into(), before: 1_764_296_000 });
        assert_eq!(Event::decode(&revoked.encode()), Some(revoked));
        let presence = Event::Control(ControlEvent::Presence {
            user: "bob".into(),
            status: parley_core::presence::Status::Away,
            last_seen: 1_764_296_000_000,
        });
        assert_eq!(Event::decode(&presence.encode()), Some(presence));
        let feed = Event::Feed { first: 4, last: 9 };
        assert_eq!(Event::decode(&feed.encode()), Some(feed));
        assert_eq!(Event::decode(&Bytes::from_static(b"F123")), None, "a truncated feed notice");
        assert_eq!(Event::decode(&Bytes::from_static(b"?")), None);
        assert_eq!(Event::decode(&Bytes::new()), None);
        assert_eq!(Event::decode(&Bytes::from_static(b"T12345678")), None, "a message without its time");
    }

    #[test]
    fn messages_of_routers_that_sent_no_time_are_still_read() {
        let mut payload = vec![b'M'];
        payload.extend_from_slice(&9u64.to_be_bytes());
        payload.extend_from_slice(b"{}");
        let expected = Event::Message { seq: 9, ts: 0, frame: Bytes::from_static(b"{}") };
        assert_eq!(Event::decode(&Bytes::from(payload)), Some(expected));
    }
}
