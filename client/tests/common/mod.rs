//! Shared helpers: the real Parley server in-process on 127.0.0.1, tokens, and event collection.

#![allow(dead_code, missing_docs)]

use clap::Parser;
use parley_client::{Backoff, ClientConfig, Event, MessageView};
use parley_gateway::config::StandaloneArgs;
use parley_gateway::standalone::{start, Running};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

pub const SECRET: &str = "client-test-secret-0123456789";

/// Starts the server on `listen` (use `127.0.0.1:0` for any port) with `data_dir`.
pub async fn server_at(data_dir: &Path, listen: SocketAddr, extra: &[&str]) -> Running {
    let mut args = vec![
        "parley".to_owned(),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--jwt-hs256-secret".into(),
        SECRET.into(),
        "--log".into(),
        "warn".into(),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    // The port of a server that just stopped may take a moment to be free again.
    let mut attempts = 0;
    loop {
        match start(StandaloneArgs::parse_from(args.clone())).await {
            Ok(running) => return running,
            Err(error) if attempts < 50 => {
                attempts += 1;
                eprintln!("server start failed ({error}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("server does not start: {error}"),
        }
    }
}

pub async fn server(data_dir: &Path, extra: &[&str]) -> Running {
    server_at(data_dir, "127.0.0.1:0".parse().expect("address"), extra).await
}

pub async fn stop(running: Running) {
    let _ = running.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), running.task).await;
}

pub fn token(user: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    parley_gateway::auth::mint_hs256(SECRET, user, now + 3600).expect("token")
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
