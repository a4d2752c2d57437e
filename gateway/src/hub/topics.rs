//! The bus subscription of this instance: `ch:<channel>` topics follow the index (subscribed while at least one
//! local connection is a member of the channel), `pr:<user>` topics follow the presence watchers (subscribed while
//! at least one local connection watches the user), and the direct topics (this instance's own and the one every
//! gateway shares) are subscribed once at start.

use super::{Hub, HubState};
use parley_bus::pubsub::{gateway_topic, ALL_GATEWAYS_TOPIC};
use tracing::warn;

impl Hub {
    /// Brings the bus subscription of the given topics in line with the index. Only the topics a change
    /// touched are examined, so a connect or disconnect costs the same with 10 or 100,000 connections. Returns
    /// once every given topic's subscription is confirmed as the index wants it; at once, without waiting for
    /// anyone, when they already are (the common case: a connection to channels other local members hold).
    pub(super) async fn sync_topics(&self, candidates: Vec<String>) -> bool {
        {
            let mut state = self.lock();
            let needed: Vec<String> = candidates
                .into_iter()
                .filter(|topic| {
                    state.changing_topics.contains(topic) || state.wants(topic) != state.topics.contains(topic)
                })
                .collect();
            if needed.is_empty() {
                return false;
            }
            state.pending_topics.extend(needed);
        }
        // Group commit: whoever holds the serial lock takes every parked candidate and applies them in one
        // subscribe and one unsubscribe call. A caller whose candidates were taken by an earlier holder finds
        // nothing to do once it gets the lock, and by then that holder's calls completed. So a burst of connects
        // (a drain elsewhere, a restart) costs a few round trips to the bus, not one each.
        let _serial = self.topic_changes.lock().await;
        let (add, remove) = {
            let mut state = self.lock();
            let candidates = std::mem::take(&mut state.pending_topics);
            if candidates.is_empty() {
                // An earlier holder applied them.
                return true;
            }
            let mut add = Vec::new();
            let mut remove = Vec::new();
            for topic in candidates {
                let wanted = state.wants(&topic);
                let subscribed = state.topics.contains(&topic);
                if wanted && !subscribed {
                    state.topics.insert(topic.clone());
                    state.changing_topics.insert(topic.clone());
                    add.push(topic);
                } else if !wanted && subscribed {
                    state.topics.remove(&topic);
                    if let Some(channel) = topic.strip_prefix("ch:") {
                        state.heads.remove(channel);
                        state.sizes.remove(channel);
                        state.feeds.remove(channel);
                    }
                    state.changing_topics.insert(topic.clone());
                    remove.push(topic);
                }
            }
            (add, remove)
        };
        if !add.is_empty() {
            if let Err(error) = self.subscription.subscribe(add.clone()).await {
                warn!(%error, "subscribe failed");
            }
        }
        if !remove.is_empty() {
            if let Err(error) = self.subscription.unsubscribe(remove.clone()).await {
                warn!(%error, "unsubscribe failed");
            }
        }
        let mut state = self.lock();
        for topic in add.iter().chain(&remove) {
            state.changing_topics.remove(topic);
        }
        true
    }

    /// Subscribes this instance's direct-delivery topics: its own (`instance`, when it has a registry entry) and
    /// the one every gateway shares. Call once at start, before serving connections.
    pub async fn open_direct(&self, instance: Option<&str>) -> Result<(), parley_api::BackendError> {
        let topics: Vec<String> =
            std::iter::once(ALL_GATEWAYS_TOPIC.to_owned()).chain(instance.map(gateway_topic)).collect();
        self.lock().topics.extend(topics.iter().cloned());
        self.subscription.subscribe(topics).await
    }
}

impl HubState {
    /// Whether the index wants `topic` subscribed.
    fn wants(&self, topic: &str) -> bool {
        if let Some(channel) = topic.strip_prefix("ch:") {
            self.channels.get(channel).is_some_and(|members| !members.is_empty())
        } else if let Some(user) = topic.strip_prefix("pr:") {
            self.watchers.get(user).is_some_and(|conns| !conns.is_empty())
        } else {
            // Direct topics are subscribed once at start and kept.
            topic == ALL_GATEWAYS_TOPIC || topic.starts_with("gw:")
        }
    }
}
