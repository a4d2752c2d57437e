//! This instance's index of local connections, and the dispatcher that forwards publications to them.
//!
//! Small channels are pushed: each message arrives on the channel's topic and is forwarded as it is. Large ones
//! (above the router's fan-out threshold) are fanned out on read: a notice says which sequences are new, and
//! the instance reads them once from the router's feed, forwards them to every local member in order, and keeps
//! the newest in a cache that answers its members' history reads and gap fills. A channel can cross the
//! threshold either way while live: pushed messages that arrive while a read is in flight wait for it, so local
//! members still get one order.
//!
//! The instance holds one pub/sub subscription. It subscribes to `ch:<channel>` while at least one local
//! connection is a member of the channel, and to its direct topics (its own and the one every gateway shares) for
//! events addressed to its users, so a publication crosses the bus once per instance, not once per member.
//! Forwarding never blocks: each connection has a queue bounded in frames and in bytes ([`Outbound`]), and a
//! connection whose queue is full is cut off (it sees close 4008, reconnects and fills the gap from history) so that
//! one slow client never delays the others.
//!
//! One [`Hub`] holds one state behind one lock; its methods are grouped by concern:
//!
//! - `index`: the local connections, their users and channels; cutting off slow consumers.
//! - `topics`: the bus subscription, kept in line with the index (group commit of subscription changes).
//! - `dispatch`: publications from the bus queued to the connections they concern; membership changes; the server
//!   API's disconnects and token revocations, as [`Directive`]s queued to a user's connections.
//! - `feed`: fan-out on read of large channels, and the cache of their newest messages.
//! - `watchers`: which connections watch which users' presence.

mod dispatch;
mod feed;
mod index;
mod queue;
mod topics;
mod watchers;

#[cfg(test)]
mod tests;

pub use feed::FEED_CACHE;
pub use queue::{Outbound, OutboundQueue};

use crate::metrics::Metrics;
use axum::extract::ws::Utf8Bytes;
use feed::FeedState;
use index::ConnEntry;
use parley_bus::pubsub::Subscription;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// A frame queued to one connection. Messages carry their channel and sequence so the connection can drop
/// duplicates, fill gaps and track acknowledgements without parsing the frame.
///
/// One item is shared (behind an `Arc`) by every connection a publication goes to, so a queue slot is one
/// pointer: an idle connection's queue stays small and a fan-out copies no frame.
#[derive(Debug, Clone)]
pub struct OutboundFrame(pub Arc<OutboundItem>);

/// The shared part of an [`OutboundFrame`].
#[derive(Debug)]
pub struct OutboundItem {
    /// The encoded frame (empty for a [`Directive`]).
    pub frame: Utf8Bytes,
    /// For a `message` frame: its channel and sequence.
    pub message: Option<(Arc<str>, u64)>,
    /// Instead of a frame: what the connection must do (close).
    pub directive: Option<Directive>,
}

/// What the hub tells one connection to do, in order with its frames (it travels through the same queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Close now with this code and reason (the server API disconnected the user: 4003).
    Close(u16, &'static str),
    /// The user's tokens issued before this time (Unix seconds) were revoked: close with 4004 if this connection's
    /// token is one of them (or has no `iat`).
    Revoke {
        /// Tokens issued before this are revoked.
        before: u64,
    },
}

impl OutboundFrame {
    /// A frame that is not a message (no ACK tracking).
    pub fn control(frame: Utf8Bytes) -> Self {
        Self(Arc::new(OutboundItem { frame, message: None, directive: None }))
    }

    /// A directive to the connection.
    pub fn directive(directive: Directive) -> Self {
        Self(Arc::new(OutboundItem { frame: Utf8Bytes::from_static(""), message: None, directive: Some(directive) }))
    }
}

#[derive(Default)]
struct HubState {
    conns: HashMap<u64, ConnEntry>,
    channels: HashMap<String, HashMap<u64, Outbound>>,
    users: HashMap<String, HashSet<u64>>,
    /// Watched user → watching connections.
    watchers: HashMap<String, HashSet<u64>>,
    /// Topics this instance is subscribed to.
    topics: HashSet<String>,
    /// Topics whose subscription a caller of `sync_topics` wants re-examined (taken in groups; see there).
    pending_topics: HashSet<String>,
    /// Topics whose subscribe or unsubscribe is being applied right now (their entry in `topics` is not confirmed
    /// yet).
    changing_topics: HashSet<String>,
    /// The newest message sequence seen published, per subscribed channel.
    heads: HashMap<String, u64>,
    /// Member counts of subscribed channels, as last read by a connect.
    sizes: HashMap<String, u32>,
    /// Large channels this instance follows by reading their feed.
    feeds: HashMap<String, FeedState>,
    /// Revocations this instance heard of lately (user → the newest `before`, and when it was heard), so a connection
    /// admitted just before one and registered just after it still finds it (see `Hub::recent_revocation`).
    revocations: HashMap<String, (u64, std::time::Instant)>,
}

/// The local index and dispatcher.
pub struct Hub {
    state: Mutex<HubState>,
    /// Serialises subscription changes so concurrent connects and disconnects never lose a subscription. Whoever
    /// holds it applies every change pending at that moment in one call (group commit).
    topic_changes: tokio::sync::Mutex<()>,
    subscription: Arc<dyn Subscription>,
    metrics: Arc<Metrics>,
    fanout_threshold: u32,
    presence: std::sync::OnceLock<Arc<crate::presence::Presence>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Hub").field("fanout_threshold", &self.fanout_threshold).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over `subscription`, whose publications must be fed to [`Hub::dispatch`].
    pub fn new(subscription: Arc<dyn Subscription>, metrics: Arc<Metrics>, fanout_threshold: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState::default()),
            topic_changes: tokio::sync::Mutex::new(()),
            subscription,
            metrics,
            fanout_threshold,
            presence: std::sync::OnceLock::new(),
        })
    }

    /// This instance's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The fan-out threshold.
    pub fn fanout_threshold(&self) -> u32 {
        self.fanout_threshold
    }
}
