//! What chat clients of the cross-process tests saw, and the checks on it: each client's event stream recorded
//! ([`record`]), the stored history read page by page ([`stored`]), and one gap-free order on every client
//! ([`check_one_order`]).

use parley_client::{Client, Event, HistoryQuery, PresenceView, Status};
use parley_core::protocol::MessageView;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What one client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// (channel, seq, id) in arrival order.
    pub messages: Vec<(String, u64, u64)>,
    /// Channels it was told it is a member of.
    pub channels: Vec<String>,
    /// When each connection came up.
    pub connected: Vec<Instant>,
    /// Presence events of watched users, in arrival order.
    pub presence: Vec<PresenceView>,
}

/// Records a client's events until its stream ends.
pub fn record(mut events: mpsc::Receiver<Event>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let mut seen = sink.lock().expect("seen");
            match event {
                Event::Message(message) => seen.messages.push((message.channel, message.seq, message.id)),
                Event::Channel(view) => seen.channels.push(view.id),
                Event::Connected { channels, .. } => {
                    seen.connected.push(Instant::now());
                    seen.channels.extend(channels.into_iter().map(|view| view.id));
                }
                Event::Presence(view) => seen.presence.push(view),
                Event::Closed { .. } => break,
                _ => {}
            }
        }
    });
    seen
}

/// Every stored message of a channel, oldest first, read page by page through `client`'s region.
pub async fn stored_messages(client: &Client, channel: &str) -> Vec<MessageView> {
    let mut all: Vec<MessageView> = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .history(channel, HistoryQuery { after: Some(after), before: None, limit: Some(200) })
            .await
            .unwrap_or_else(|error| panic!("history of {channel}: {error}"));
        let more = page.has_more;
        all.extend(page.messages);
        match all.last() {
            Some(last) if more => after = last.seq,
            _ => break,
        }
    }
    all
}

/// The whole stored history of a channel as (seq, id), read through `client`'s region.
pub async fn stored(client: &Client, channel: &str) -> Vec<(u64, u64)> {
    stored_messages(client, channel).await.iter().map(|message| (message.seq, message.id)).collect()
}

/// The history once it holds `expected` messages (the store trails the log), or what it holds after 60 s.
pub async fn stored_at_least(client: &Client, channel: &str, expected: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = stored(client, channel).await;
        if all.len() >= expected || Instant::now() > deadline {
            return all;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The (seq, id) of `channel`'s messages `seen` was shown, in arrival order.
pub fn received(seen: &Arc<Mutex<Seen>>, channel: &str) -> Vec<(u64, u64)> {
    seen.lock()
        .expect("seen")
        .messages
        .iter()
        .filter(|(c, _, _)| c == channel)
        .map(|(_, seq, id)| (*seq, *id))
        .collect()
}

/// Waits until every client of `clients` has `count` messages of `channel`, at most `within`.
pub async fn wait_received(clients: &[&Arc<Mutex<Seen>>], channel: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if clients.iter().all(|seen| received(seen, channel).len() >= count) {
            return;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `seen` was told that `user` is `status` (a presence event after index `after` of its presence
/// events); returns the index of that event. Panics with what it was told after `within`.
pub async fn wait_presence(
    seen: &Arc<Mutex<Seen>>,
    user: &str,
    status: Status,
    after: usize,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let found = {
            let seen = seen.lock().expect("seen");
            seen.presence
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, view)| view.user == user && view.status == status)
                .map(|(index, _)| index)
        };
        if let Some(index) = found {
            return index + 1;
        }
        if Instant::now() >= deadline {
            let told: Vec<(String, Status)> =
                seen.lock().expect("seen").presence.iter().map(|view| (view.user.clone(), view.status)).collect();
            panic!("never told that {user} is {status:?} within {within:?}; presence events: {told:?}");
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that `history` is gap-free and that each client was shown exactly it.
pub fn check_one_order(channel: &str, clients: &[(&str, &Arc<Mutex<Seen>>)], history: &[(u64, u64)]) {
    assert_eq!(
        history.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "{channel}: the stored history is gap-free"
    );
    for (name, seen) in clients {
        assert_eq!(
            &received(seen, channel),
            history,
            "{name} in {channel}: what it was shown differs from the history"
        );
    }
}
