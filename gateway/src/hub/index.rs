//! The index of local connections: each connection with its user, its queue and its channels, and per channel
//! the queues of its local members. A connection whose queue overflows is cut off here.

use super::{Hub, HubState, Outbound};
use crate::metrics::{Limit, Metrics};
use parley_bus::pubsub::channel_topic;
use parley_core::UserId;
use std::collections::{HashMap, HashSet};
use tracing::debug;

/// One local connection in the index.
pub(super) struct ConnEntry {
    pub(super) user: String,
    /// `None` once the connection was cut off as a slow consumer.
    pub(super) sender: Option<Outbound>,
    pub(super) channels: HashSet<String>,
    /// Users whose presence this connection watches.
    pub(super) watching: HashSet<String>,
}

impl Hub {
    /// Adds a connection with its channels, and subscribes what it needs. Publications for those channels
    /// reach it from the moment this returns.
    pub async fn register(&self, conn: u64, user: &UserId, sender: Outbound, channels: Vec<String>) {
        let topics: Vec<String> = channels.iter().map(|channel| channel_topic(channel)).collect();
        {
            let mut state = self.lock();
            for channel in &channels {
                state.channels.entry(channel.clone()).or_default().insert(conn, sender.clone());
            }
            state.users.entry(user.to_string()).or_default().insert(conn);
            state.conns.insert(
                conn,
                ConnEntry {
                    user: user.to_string(),
                    sender: Some(sender),
                    channels: channels.into_iter().collect(),
                    watching: HashSet::new(),
                },
            );
        }
        self.sync_topics(topics).await;
    }

    /// Adds channels to a registered connection whose list was read with the given last sequences. `true` when
    /// that list may be stale for this connection: a channel had to be subscribed first, or a message newer than
    /// the list was published before the connection joined the channel here (read the list again, after).
    pub async fn add_channels_since(&self, conn: u64, heads: Vec<(String, u64)>) -> bool {
        let raced = {
            let mut state = self.lock();
            let Some(sender) = state.conns.get(&conn).and_then(|entry| entry.sender.clone()) else {
                return false;
            };
            let mut raced = false;
            for (channel, last_seq) in &heads {
                raced |= state.heads.get(channel).is_some_and(|seen| seen > last_seq);
                state.channels.entry(channel.clone()).or_default().insert(conn, sender.clone());
                if let Some(entry) = state.conns.get_mut(&conn) {
                    entry.channels.insert(channel.clone());
                }
            }
            raced
        };
        let subscribed = self.sync_topics(heads.iter().map(|(channel, _)| channel_topic(channel)).collect()).await;
        raced || subscribed
    }

    /// Adds channels to a registered connection (e.g. channels joined while the handshake ran).
    pub async fn add_channels(&self, conn: u64, channels: Vec<String>) {
        // No list to be stale against: whatever the answer, nothing more to do.
        self.add_channels_since(conn, channels.into_iter().map(|channel| (channel, u64::MAX)).collect()).await;
    }

    /// Removes a connection.
    pub async fn unregister(&self, conn: u64) {
        let topics = self.detach(conn);
        self.release_topics(topics).await;
    }

    /// Removes a connection from the index at once (no frame is queued to it any more, its queue's receiver sees it
    /// closed once empty), and gives the topics whose subscription [`Hub::release_topics`] must re-examine. The
    /// synchronous half of [`Hub::unregister`], for a connection that ends where it cannot wait (a drop).
    pub fn detach(&self, conn: u64) -> Vec<String> {
        let mut topics = Vec::new();
        {
            let mut state = self.lock();
            if let Some(entry) = state.conns.remove(&conn) {
                topics.extend(entry.channels.iter().map(|channel| channel_topic(channel)));
                for channel in &entry.channels {
                    remove_member(&mut state.channels, channel, conn);
                }
                for watched in &entry.watching {
                    topics.push(parley_bus::pubsub::presence_topic(watched));
                    if let Some(conns) = state.watchers.get_mut(watched) {
                        conns.remove(&conn);
                        if conns.is_empty() {
                            state.watchers.remove(watched);
                        }
                    }
                }
                if let Some(conns) = state.users.get_mut(&entry.user) {
                    conns.remove(&conn);
                    if conns.is_empty() {
                        state.users.remove(&entry.user);
                    }
                }
            }
        }
        topics
    }

    /// Brings the subscription of topics a [`Hub::detach`] gave in line with the index.
    pub async fn release_topics(&self, topics: Vec<String>) {
        self.sync_topics(topics).await;
    }

    /// Records channels' member counts, as a connect read them.
    pub fn note_sizes<'a>(&self, sizes: impl IntoIterator<Item = (&'a str, u32)>) {
        let mut state = self.lock();
        for (channel, members) in sizes {
            if state.channels.contains_key(channel) {
                state.sizes.insert(channel.to_owned(), members);
            }
        }
    }

    /// Whether a channel is small enough for delivery receipts (at most `limit` members): by its member count
    /// when a connect read it, else by its local members alone (a lower bound).
    pub fn small_channel(&self, channel: &str, limit: u32) -> bool {
        let state = self.lock();
        match state.sizes.get(channel) {
            Some(members) => *members <= limit,
            None => state.channels.get(channel).map(HashMap::len).unwrap_or(0) <= limit as usize,
        }
    }

    /// Number of local connections.
    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Drops the queues of slow connections; each sees its queue end and closes with 4008.
    pub(super) fn cut_off(&self, conns: &[u64]) {
        let mut state = self.lock();
        Self::cut_off_in(&mut state, &self.metrics, conns);
    }

    pub(super) fn cut_off_in(state: &mut HubState, metrics: &Metrics, conns: &[u64]) {
        for conn in conns {
            metrics.limit(Limit::OutboundQueue);
            let channels: Vec<String> = match state.conns.get_mut(conn) {
                Some(entry) => {
                    entry.sender = None;
                    entry.channels.iter().cloned().collect()
                }
                None => continue,
            };
            for channel in channels {
                if let Some(members) = state.channels.get_mut(&channel) {
                    members.remove(conn);
                }
            }
            debug!(conn, "cut off slow consumer");
        }
    }
}

/// Removes a connection from a channel's local members, and the channel once it has none.
pub(super) fn remove_member(channels: &mut HashMap<String, HashMap<u64, Outbound>>, channel: &str, conn: u64) {
    if let Some(members) = channels.get_mut(channel) {
        members.remove(&conn);
        if members.is_empty() {
            channels.remove(channel);
        }
    }
}
