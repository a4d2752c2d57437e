//! Event dispatch: publications from the bus become frames queued to the local connections they concern (a
//! channel's members, a user's connections), and membership changes of local users update the index.

use super::index::remove_member;
use super::{Hub, HubState, OutboundFrame, OutboundItem};
use axum::extract::ws::Utf8Bytes;
use parley_api::Router;
use parley_bus::pubsub::{channel_topic, ControlEvent, Delivery, Event};
use parley_core::protocol::ServerFrame;
use parley_core::{ChannelId, UserId};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

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
        let mut slow = Vec::new();
        {
            let state = self.lock();
            for conn in state.users.get(user).into_iter().flatten() {
                if let Some(sender) = state.conns.get(conn).and_then(|entry| entry.sender.as_ref()) {
                    let item = OutboundFrame::control(frame.clone());
                    if let Err(mpsc::error::TrySendError::Full(_)) = sender.try_send(item) {
                        slow.push(*conn);
                    }
                }
            }
        }
        if !slow.is_empty() {
            self.cut_off(&slow);
        }
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
