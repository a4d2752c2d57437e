//! This instance's presence service: it records connections in the fenced [`PresenceBook`], renews the
//! instance's lease, expires lapsed instances, and sends every change to the connections watching that user.
//!
//! In embedded mode the book lives in this process (so a restart starts from an empty book and no old entry can
//! come back). A shared driver (Redis) keeps the same book across instances under the same rules.

use crate::hub::Hub;
use axum::extract::ws::Utf8Bytes;
use parley_core::presence::{PresenceBook, PresenceView};
use parley_core::protocol::ServerFrame;
use rand::RngCore;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tracing::warn;

/// Lease of this instance's presence entries.
pub const LEASE: Duration = Duration::from_secs(30);

/// The presence service.
#[derive(Debug)]
pub struct Presence {
    book: Mutex<PresenceBook>,
    instance: String,
    epoch: AtomicU64,
    hub: Weak<Hub>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

impl Presence {
    /// Registers this instance (a fresh random id), attaches it to the hub and starts its lease renewal and
    /// expiry sweep.
    pub fn start(hub: &Arc<Hub>) -> Arc<Self> {
        let mut random = [0u8; 6];
        rand::rng().fill_bytes(&mut random);
        let instance: String =
            std::iter::once("gw-".to_owned()).chain(random.iter().map(|byte| format!("{byte:02x}"))).collect();
        let mut book = PresenceBook::new();
        let (epoch, _) = book.register_instance(&instance, LEASE.as_millis() as u64, now_ms());
        let presence =
            Arc::new(Self { book: Mutex::new(book), instance, epoch: AtomicU64::new(epoch), hub: Arc::downgrade(hub) });
        hub.attach_presence(presence.clone());
        let weak = Arc::downgrade(&presence);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LEASE / 3);
            loop {
                every.tick().await;
                let Some(presence) = weak.upgrade() else { break };
                presence.tick(now_ms());
            }
        });
        presence
    }

    fn lock(&self) -> MutexGuard<'_, PresenceBook> {
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn tick(&self, now: u64) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let changes = {
            let mut book = self.lock();
            if let Err(error) = book.renew(&self.instance, epoch, LEASE.as_millis() as u64, now) {
                warn!(%error, "presence lease lost");
            }
            book.expire(now)
        };
        self.publish(changes);
    }

    fn publish(&self, changes: impl IntoIterator<Item = PresenceView>) {
        let Some(hub) = self.hub.upgrade() else { return };
        for view in changes {
            let user = view.user.clone();
            let frame = ServerFrame::Presence { user: view.user, status: view.status, last_seen: view.last_seen };
            hub.deliver_to_watchers(&user, &Utf8Bytes::from(frame.to_json()));
        }
    }

    /// A connection of `user` opened.
    pub fn connected(&self, user: &str) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let change = self.lock().connect(user, &self.instance, epoch, now_ms());
        match change {
            Ok(change) => self.publish(change),
            Err(error) => warn!(%error, "presence write fenced"),
        }
    }

    /// A connection of `user` closed.
    pub fn disconnected(&self, user: &str) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let change = self.lock().disconnect(user, &self.instance, epoch, now_ms());
        match change {
            Ok(change) => self.publish(change),
            Err(error) => warn!(%error, "presence write fenced"),
        }
    }

    /// The user says they are away (or back).
    pub fn set_away(&self, user: &str, away: bool) -> PresenceView {
        let change = self.lock().set_away(user, away);
        self.publish(change);
        self.lock().view(user)
    }

    /// Current views of users.
    pub fn views(&self, users: &[String]) -> Vec<PresenceView> {
        let book = self.lock();
        users.iter().map(|user| book.view(user)).collect()
    }

    /// How many of `users` are online or away.
    pub fn online_count(&self, users: &[String]) -> usize {
        self.lock().online_count(users.iter().map(String::as_str))
    }
}
