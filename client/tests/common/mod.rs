//! Shared helpers: the real Parley server in-process on 127.0.0.1, tokens, and event collection.

// Each test file uses its own part of these helpers.
#![allow(dead_code, missing_docs, unused_imports)]

use parley_client::{Backoff, ClientConfig, Event, MessageView};
use parley_test_support::server::ANY_PORT;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

pub use parley_test_support::server::{stop, token, Running, SECRET};

/// Starts the server on `listen` (a restart on the address of a server that just stopped) with `data_dir`.
pub async fn server_at(data_dir: &Path, listen: SocketAddr, extra: &[&str]) -> Running {
    parley_test_support::server::start(data_dir, Some(SECRET), listen, extra).await
}

/// Starts the server on any port with `data_dir`.
pub async fn server(data_dir: &Path, extra: &[&str]) -> Running {
    server_at(data_dir, ANY_PORT, extra).await
}

/// A client configuration for tests: quick reconnects and acknowledgements.
pub fn config(address: SocketAddr, user: &str) -> ClientConfig {
    let mut config = ClientConfig::new(format!("ws://{address}"), token(user));
    config.backoff = Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(300), max_attempts: None };
    config.ack_delay = Duration::from_millis(20);
    config
}

/// Every event seen so far, and the messages by channel, checked for order as they arrive.
#[derive(Default)]
pub struct Seen {
    pub events: Vec<Event>,
    pub messages: BTreeMap<String, Vec<MessageView>>,
}

impl Seen {
    fn note(&mut self, event: Event) {
        if let Event::Message(message) = &event {
            let list = self.messages.entry(message.channel.clone()).or_default();
            if let Some(previous) = list.last() {
                assert_eq!(
                    message.seq,
                    previous.seq + 1,
                    "strict order with no gap and no duplicate in {}: {} after {}",
                    message.channel,
                    message.seq,
                    previous.seq
                );
            }
            list.push(message.clone());
        }
        self.events.push(event);
    }

    pub fn count(&self, channel: &str) -> usize {
        self.messages.get(channel).map_or(0, Vec::len)
    }

    pub fn any(&self, predicate: impl Fn(&Event) -> bool) -> bool {
        self.events.iter().any(predicate)
    }
}

/// Reads events until `done` holds (checking order on the way); panics after `limit`.
pub async fn until(events: &mut mpsc::Receiver<Event>, seen: &mut Seen, limit: Duration, done: impl Fn(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(seen) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => seen.note(event),
            Ok(None) => panic!("event stream ended; events: {:?}", seen.events),
            Err(_) => panic!(
                "timed out; counts: {:?}; last events: {:?}",
                seen.messages.iter().map(|(channel, list)| (channel.clone(), list.len())).collect::<Vec<_>>(),
                seen.events
                    .iter()
                    .rev()
                    .filter(|event| !matches!(event, Event::Message(_)))
                    .take(10)
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// Reads events for `period`, checking order; returns what came.
pub async fn drain_for(events: &mut mpsc::Receiver<Event>, seen: &mut Seen, period: Duration) {
    let deadline = tokio::time::Instant::now() + period;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        seen.note(event);
    }
}
