//! Event dispatch: publications from the bus become frames queued to the local connections they concern (a
//! channel's members, a user's connections), membership changes of local users update the index, and the server
//! API's disconnects and token revocations (on the all-gateways topic) become [`Directive`]s queued to the user's
//! local connections, behind the frames already queued to them.

use super::index::remove_member;
use super::{Directive, Hub, HubState, OutboundFrame, OutboundItem};
use crate::connection::close;
use axum::extract::ws::Utf8Bytes;
use parley_api::Router;
use parley_bus::pubsub::{channel_topic, ControlEvent, Delivery, Event};
use parley_core::protocol::ServerFrame;
use parley_core::{ChannelId, UserId};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long a hub remembers a revocation it heard of, for connections that were being admitted meanwhile (an
/// admission, from its read of the revocation store to its registration in the hub, takes far less).
pub const RECENT_REVOCATION: std::time::Duration = std::time::Duration::from_secs(60);

/// The reason of the close of a connection the server API disconnected.
const DISCONNECTED_REASON: &str = "disconnected by the server; you may reconnect";

impl Hub {
    /// Queues a frame to every local member of a channel. Returns how many got it.
    pub fn deliver(&self, channel: &str, frame: &Utf8Bytes, seq: Option<u64>) -> usize {
        let mut slow = Vec::new();
        let delivered = {
            let mut state = self.lock();
            if let Some(seq) = seq {
                if state.channels.contains_key(channel) {
                    state.note_head(channel, seq);
                }
            }
            Self::deliver_in(&state, channel, frame, seq, &mut slow)
        };
        self.delivered(delivered, &slow);
        delivered
    }

    /// Queues a frame to the local members of a channel, with the state held; slow connections are noted.
    pub(super) fn deliver_in(
        state: &HubState,
        channel: &str,
        frame: &Utf8Bytes,
        seq: Option<u64>,
        slow: &mut Vec<u64>,
    ) -> usize {
        let Some(members) = state.channels.get(channel) else { return 0 };
        let item = OutboundFrame(Arc::new(OutboundItem {
            frame: frame.clone(),
            message: seq.map(|seq| (Arc::from(channel), seq)),
            directive: None,
        }));
        let mut delivered = 0;
        for (conn, sender) in members {
            match sender.try_send(item.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*conn),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    pub(super) fn delivered(&self, delivered: usize, slow: &[u64]) {
        self.metrics.deliveries.inc_by(delivered as u64);
        if !slow.is_empty() {
            self.cut_off(slow);
        }
    }

    /// Queues a frame to every local connection of a user.
    pub fn deliver_to_user(&self, user: &str, frame: &Utf8Bytes) {
        self.queue_to_user(user, OutboundFrame::control(frame.clone()));
    }

    /// Queues a directive to every local connection of a user, behind what is queued already; returns how many
    /// connections got it. A connection whose queue is full is cut off (4008) instead.
    pub fn direct_user(&self, user: &str, directive: Directive) -> usize {
        self.queue_to_user(user, OutboundFrame::directive(directive))
    }

    fn queue_to_user(&self, user: &str, item: OutboundFrame) -> usize {
        let mut slow = Vec::new();
        let mut queued = 0;
        {
            let state = self.lock();
            for conn in state.users.get(user).into_iter().flatten() {
                if let Some(sender) = state.conns.get(conn).and_then(|entry| entry.sender.as_ref()) {
                    match sender.try_send(item.clone()) {
                        Ok(()) => queued += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => slow.push(*conn),
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
            }
        }
        if !slow.is_empty() {
            self.cut_off(&slow);
        }
        queued
    }

    /// The server API revoked the user's tokens issued before `before`: remembered for a while (for connections
    /// registering right now), and told to the user's local connections, each of which closes (4004) if its token
    /// is revoked.
    pub fn revoked(&self, user: &str, before: u64) -> usize {
        {
            let mut state = self.lock();
            let now = std::time::Instant::now();
            state.revocations.retain(|_, (_, heard)| now.duration_since(*heard) < RECENT_REVOCATION);
            let entry = state.revocations.entry(user.to_owned()).or_insert((before, now));
            *entry = (entry.0.max(before), now);
        }
        self.direct_user(user, Directive::Revoke { before })
    }

    /// The newest revocation of the user's tokens this instance heard of within [`RECENT_REVOCATION`]. A connection
    /// checks it once it is registered: a revocation heard between its admission (which read the revocation store)
    /// and its registration (from which on it gets the directive) is found here.
    pub fn recent_revocation(&self, user: &str) -> Option<u64> {
        let state = self.lock();
        state.revocations.get(user).filter(|(_, heard)| heard.elapsed() < RECENT_REVOCATION).map(|(before, _)| *before)
    }

    /// A user's membership changed: update the index for the user's local connections, subscribe or
    /// unsubscribe, and tell the connections (with the channel's current `last_seq`, so they can fill any gap).
    async fn membership_changed(self: &Arc<Self>, router: &Router, user: &str, channel: &str, joined: bool) {
        {
            let mut state = self.lock();
            let conns: Vec<u64> =
                state.users.get(user).map(|conns| conns.iter().copied().collect()).unwrap_or_default();
            for conn in conns {
                let sender = state.conns.get(&conn).and_then(|entry| entry.sender.clone());
                let Some(sender) = sender else { continue };
                if joined {
                    state.channels.entry(channel.to_owned()).or_default().insert(conn, sender);
                    if let Some(entry) = state.conns.get_mut(&conn) {
                        entry.channels.insert(channel.to_owned());
                    }
                } else {
                    remove_member(&mut state.channels, channel, conn);
                    if let Some(entry) = state.conns.get_mut(&conn) {
                        entry.channels.remove(channel);
                    }
                }
            }
        }
        self.sync_topics(vec![channel_topic(channel)]).await;
        let (Ok(user_id), Ok(channel_id)) = (UserId::new(user), ChannelId::parse(channel)) else {
            return;
        };
        let hub = self.clone();
        let router = router.clone();
        tokio::spawn(async move {
            match router.channel_view(&user_id, &channel_id).await {
                Ok(view) => {
                    let frame = ServerFrame::Channel { req_id: None, channel: view }.to_json();
                    hub.deliver_to_user(user_id.as_str(), &Utf8Bytes::from(frame));
                }
                Err(error) => warn!(%error, "failed to read channel after membership change"),
            }
        });
    }

    /// Forwards publications to local connections until the bus closes.
    pub async fn dispatch(self: Arc<Self>, router: Router, mut publications: mpsc::Receiver<Delivery>) {
        while let Some((topic, payload)) = publications.recv().await {
            self.metrics.publications.inc();
            let Some(event) = Event::decode(&payload) else {
                warn!(%topic, "undecodable publication");
                continue;
            };
            match event {
                Event::Message { seq, ts, frame } => {
                    let Some(channel) = topic.strip_prefix("ch:") else {
                        continue;
                    };
                    match Utf8Bytes::try_from(frame) {
                        Ok(frame) => {
                            self.pushed(channel, frame, seq);
                            self.metrics.observe_fanout(ts);
                        }
                        Err(error) => warn!(%error, "message frame is not UTF-8"),
                    }
                }
                Event::Feed { first, last } => {
                    if let Some(channel) = topic.strip_prefix("ch:") {
                        self.feed_notice(&router, channel, first, last);
                    }
                }
                Event::Control(ControlEvent::Member { channel, user, joined }) => {
                    let members = self.lock().channels.get(&channel).map(|members| members.len()).unwrap_or(0);
                    if members as u32 <= self.fanout_threshold {
                        let frame = ServerFrame::Member { channel: channel.clone(), user, joined }.to_json();
                        self.deliver(&channel, &Utf8Bytes::from(frame), None);
                    }
                }
                Event::Control(ControlEvent::Delivered { channel, user, seq }) => {
                    let frame = ServerFrame::Delivered { channel: channel.clone(), user, seq }.to_json();
                    self.deliver(&channel, &Utf8Bytes::from(frame), None);
                }
                Event::Control(ControlEvent::Read { channel, user, seq }) => {
                    let frame = ServerFrame::Read { req_id: None, channel: channel.clone(), user, seq }.to_json();
                    self.deliver(&channel, &Utf8Bytes::from(frame), None);
                }
                Event::Control(ControlEvent::Invited { user, channel, by }) => {
                    let frame = ServerFrame::Invited { channel, by }.to_json();
                    self.deliver_to_user(&user, &Utf8Bytes::from(frame));
                }
                Event::Control(ControlEvent::Presence { user, status, last_seen }) => {
                    let frame = ServerFrame::Presence { user: user.clone(), status, last_seen }.to_json();
                    self.deliver_to_watchers(&user, &Utf8Bytes::from(frame));
                }
                Event::Control(ControlEvent::Disconnect { user }) => {
                    let closed = self.direct_user(&user, Directive::Close(close::DISCONNECTED, DISCONNECTED_REASON));
                    debug!(%user, closed, "server API disconnect");
                }
                Event::Control(ControlEvent::Revoked { user, before }) => {
                    let told = self.revoked(&user, before);
                    debug!(%user, before, told, "server API token revocation");
                }
                Event::Control(ControlEvent::Membership { user, channel, joined }) => {
                    // Direct events reach every instance when the router could not locate the user: keep only
                    // this instance's users.
                    if self.lock().users.contains_key(&user) {
                        self.membership_changed(&router, &user, &channel, joined).await;
                    }
                }
            }
        }
        debug!("hub dispatcher stopped");
    }
}

impl HubState {
    /// Records that a channel's messages up to `seq` exist (seen published or announced).
    pub(super) fn note_head(&mut self, channel: &str, seq: u64) {
        let head = self.heads.entry(channel.to_owned()).or_default();
        *head = (*head).max(seq);
    }
}
