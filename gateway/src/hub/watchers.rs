//! Presence watchers: which local connections watch which users' presence, and the presence service that feeds
//! them.

use super::{Hub, OutboundFrame};
use axum::extract::ws::Utf8Bytes;
use parley_bus::pubsub::presence_topic;
use std::sync::Arc;

impl Hub {
    /// Starts or stops watching users' presence for a connection. Returns how many users it watches, once this
    /// instance's subscription of the users' presence topics (`pr:<user>`, subscribed while a local connection
    /// watches the user) is in line, so a change published after the return reaches the connection.
    pub async fn watch(&self, conn: u64, users: &[String], watch: bool, limit: usize) -> Result<usize, usize> {
        let watched = self.watch_index(conn, users, watch, limit)?;
        self.sync_topics(users.iter().map(|user| presence_topic(user)).collect()).await;
        Ok(watched)
    }

    fn watch_index(&self, conn: u64, users: &[String], watch: bool, limit: usize) -> Result<usize, usize> {
        let mut state = self.lock();
        let Some(entry) = state.conns.get_mut(&conn) else { return Ok(0) };
        if watch && entry.watching.len() + users.len() > limit {
            return Err(limit);
        }
        for user in users {
            if watch {
                entry.watching.insert(user.clone());
            } else {
                entry.watching.remove(user);
            }
        }
        let watched = entry.watching.len();
        for user in users {
            if watch {
                state.watchers.entry(user.clone()).or_default().insert(conn);
            } else if let Some(conns) = state.watchers.get_mut(user) {
                conns.remove(&conn);
                if conns.is_empty() {
                    state.watchers.remove(user);
                }
            }
        }
        Ok(watched)
    }

    /// Queues a frame to every connection watching `user`.
    pub fn deliver_to_watchers(&self, user: &str, frame: &Utf8Bytes) {
        let state = self.lock();
        for conn in state.watchers.get(user).into_iter().flatten() {
            if let Some(sender) = state.conns.get(conn).and_then(|entry| entry.sender.as_ref()) {
                // Presence is advisory: a full queue drops the update rather than the connection.
                let _ = sender.try_send(OutboundFrame::control(frame.clone()));
            }
        }
    }

    /// Attaches the presence service (once).
    pub fn attach_presence(&self, presence: Arc<crate::presence::Presence>) {
        let _ = self.presence.set(presence);
    }

    /// The presence service, if attached.
    pub fn presence(&self) -> Option<&Arc<crate::presence::Presence>> {
        self.presence.get()
    }
}
