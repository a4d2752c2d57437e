//! This instance's presence service: it records connections in the fenced presence store, renews the instance's
//! lease, expires lapsed instances, and sends every change to the connections watching that user.
//!
//! In one process (the embedded layout) a change goes straight to this instance's watchers. Over a shared store a
//! change is published on the user's presence topic (`pr:<user>`), which every instance with a watcher of the user
//! subscribes, so watchers on any gateway hear it: a queue worker reads the user's view as shown (this region's
//! entries merged with other regions' reports) and publishes it, in the order the changes happened here. The view
//! this region reports to the others (the journal, for the presence topic in Kafka) is its own entries only.
//!
//! The store is a [`PresenceStore`]: the embedded book of this process by default (so a restart starts from an
//! empty book and no old entry can come back), or a shared driver (Redis) that keeps the same book across
//! instances under the same rules. When the store refuses this instance's writes (its lease lapsed, or a Redis
//! restart lost it), the instance registers again under a new epoch and records its live connections again, so
//! presence recovers within one renewal period.

use crate::hub::Hub;
use crate::journal::Journal;
use axum::extract::ws::Utf8Bytes;
use parley_api::PresenceUpdate;
use parley_bus::presence::{unix_ms, EmbeddedPresenceStore, PresenceError, PresenceStore};
use parley_bus::pubsub::{presence_topic, ControlEvent, Event, PubSub};
use parley_core::presence::{PresenceView, Status};
use parley_core::protocol::ServerFrame;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Lease of this instance's presence entries.
pub const LEASE: Duration = Duration::from_secs(30);

/// This instance's own connections of one user.
#[derive(Debug, Clone, Copy, Default)]
struct Local {
    connections: u32,
    away: bool,
}

/// The presence service.
pub struct Presence {
    store: Arc<dyn PresenceStore>,
    instance: String,
    epoch: AtomicU64,
    hub: Weak<Hub>,
    /// What this instance holds, to record again after a re-registration.
    local: Mutex<HashMap<String, Local>>,
    /// Writes share it; a re-registration takes it alone, so no write interleaves with the replay.
    registration: tokio::sync::RwLock<()>,
    /// Where changes go for the log (distributed layout), besides the watchers.
    journal: Option<Arc<Journal>>,
    /// Changes to publish on the bus (shared store); `None`: straight to this instance's watchers.
    outbox: Option<mpsc::Sender<Vec<PresenceView>>>,
}

/// Most batches of changes waiting for the bus; beyond it a change is dropped (presence is advisory) and counted.
const OUTBOX: usize = 4_096;

impl std::fmt::Debug for Presence {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Presence")
            .field("instance", &self.instance)
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn instance_id() -> String {
    let mut random = [0u8; 6];
    rand::rng().fill_bytes(&mut random);
    std::iter::once("gw-".to_owned()).chain(random.iter().map(|byte| format!("{byte:02x}"))).collect()
}

impl Presence {
    /// Registers this instance (a fresh random id) in an embedded book, attaches it to the hub and starts its
    /// lease renewal and expiry sweep.
    pub fn start(hub: &Arc<Hub>) -> Arc<Self> {
        let instance = instance_id();
        let store = EmbeddedPresenceStore::new();
        let epoch = store.register_now(&instance, LEASE).epoch;
        Self::launch(hub, Arc::new(store), instance, epoch, None, None)
    }

    /// Like [`Presence::start`], over a shared store (e.g. Redis), with every change also queued in `journal`
    /// (for the log) and published on `bus` (the users' presence topics); fails if the store cannot register it.
    pub async fn start_with(
        hub: &Arc<Hub>,
        store: Arc<dyn PresenceStore>,
        journal: Option<Arc<Journal>>,
        bus: Option<Arc<dyn PubSub>>,
    ) -> Result<Arc<Self>, PresenceError> {
        let instance = instance_id();
        let registration = store.register_instance(&instance, LEASE).await?;
        Ok(Self::launch(hub, store, instance, registration.epoch, journal, bus))
    }

    fn launch(
        hub: &Arc<Hub>,
        store: Arc<dyn PresenceStore>,
        instance: String,
        epoch: u64,
        journal: Option<Arc<Journal>>,
        bus: Option<Arc<dyn PubSub>>,
    ) -> Arc<Self> {
        let outbox = bus.map(|bus| {
            let (outbox, changes) = mpsc::channel(OUTBOX);
            tokio::spawn(publish_shown(store.clone(), bus, changes));
            outbox
        });
        let presence = Arc::new(Self {
            store,
            instance,
            epoch: AtomicU64::new(epoch),
            hub: Arc::downgrade(hub),
            local: Mutex::new(HashMap::new()),
            registration: tokio::sync::RwLock::new(()),
            journal,
            outbox,
        });
        hub.attach_presence(presence.clone());
        let weak = Arc::downgrade(&presence);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LEASE / 3);
            loop {
                every.tick().await;
                let Some(presence) = weak.upgrade() else { break };
                presence.tick().await;
            }
        });
        presence
    }

    /// The store this presence is kept in (what other components read the registry from).
    pub fn store(&self) -> Arc<dyn PresenceStore> {
        self.store.clone()
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn local(&self) -> MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn tick(&self) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        match self.store.renew(&self.instance, epoch, LEASE).await {
            Ok(()) => {}
            Err(PresenceError::Fenced(error)) => {
                warn!(%error, "presence lease lost; registering again");
                self.register_again(epoch).await;
            }
            Err(error) => warn!(%error, "presence lease renewal failed"),
        }
        match self.store.expire().await {
            Ok(changes) => self.publish(changes),
            Err(error) => warn!(%error, "presence expiry failed"),
        }
    }

    /// Registers under a new epoch (unless that already happened since `fenced_epoch` was refused) and records
    /// this instance's connections again.
    async fn register_again(&self, fenced_epoch: u64) {
        let _alone = self.registration.write().await;
        if self.epoch.load(Ordering::Relaxed) != fenced_epoch {
            return;
        }
        let registration = match self.store.register_instance(&self.instance, LEASE).await {
            Ok(registration) => registration,
            Err(error) => {
                warn!(%error, "presence registration failed; retrying at the next renewal");
                return;
            }
        };
        let epoch = registration.epoch;
        self.epoch.store(epoch, Ordering::Relaxed);
        self.publish(registration.changes);
        let held: Vec<(String, Local)> = self.local().iter().map(|(user, local)| (user.clone(), *local)).collect();
        for (user, local) in held {
            for _ in 0..local.connections {
                match self.store.connect(&user, &self.instance, epoch).await {
                    Ok(change) => self.publish(change),
                    Err(error) => warn!(%error, "presence write failed while registering again"),
                }
            }
            if local.away {
                if let Ok(change) = self.store.set_away(&user, true).await {
                    self.publish(change);
                }
            }
        }
    }

    fn publish(&self, changes: impl IntoIterator<Item = PresenceView>) {
        let Some(hub) = self.hub.upgrade() else { return };
        let changes: Vec<PresenceView> = changes.into_iter().collect();
        if changes.is_empty() {
            return;
        }
        if let Some(journal) = &self.journal {
            for view in &changes {
                journal.push(PresenceUpdate {
                    user: view.user.clone(),
                    status: view.status,
                    last_seen: view.last_seen,
                    instance: self.instance.clone(),
                    at: unix_ms(),
                });
            }
        }
        match &self.outbox {
            Some(outbox) => {
                if outbox.try_send(changes).is_err() {
                    hub.metrics().presence_dropped.inc();
                    debug!("presence outbox full; a change is not published");
                }
            }
            None => {
                for view in changes {
                    let user = view.user.clone();
                    let frame =
                        ServerFrame::Presence { user: view.user, status: view.status, last_seen: view.last_seen };
                    hub.deliver_to_watchers(&user, &Utf8Bytes::from(frame.to_json()));
                }
            }
        }
    }

    /// Publishes a fenced write's outcome; a fenced instance registers again (which records this write too).
    async fn written(&self, epoch: u64, result: Result<Option<PresenceView>, PresenceError>) {
        match result {
            Ok(change) => self.publish(change),
            Err(PresenceError::Fenced(error)) => {
                warn!(%error, "presence write fenced; registering again");
                self.register_again(epoch).await;
            }
            Err(error) => warn!(%error, "presence write failed"),
        }
    }

    /// A connection of `user` opened.
    pub async fn connected(&self, user: &str) {
        let (epoch, result) = {
            let _shared = self.registration.read().await;
            self.local().entry(user.to_owned()).or_default().connections += 1;
            let epoch = self.epoch.load(Ordering::Relaxed);
            (epoch, self.store.connect(user, &self.instance, epoch).await)
        };
        self.written(epoch, result).await;
    }

    /// A connection of `user` closed.
    pub async fn disconnected(&self, user: &str) {
        let (epoch, result) = {
            let _shared = self.registration.read().await;
            {
                let mut local = self.local();
                if let Some(entry) = local.get_mut(user) {
                    entry.connections = entry.connections.saturating_sub(1);
                    if entry.connections == 0 {
                        local.remove(user);
                    }
                }
            }
            let epoch = self.epoch.load(Ordering::Relaxed);
            (epoch, self.store.disconnect(user, &self.instance, epoch).await)
        };
        self.written(epoch, result).await;
    }

    /// The user says they are away (or back). Returns their view.
    pub async fn set_away(&self, user: &str, away: bool) -> PresenceView {
        {
            let _shared = self.registration.read().await;
            if let Some(entry) = self.local().get_mut(user) {
                entry.away = away;
            }
            match self.store.set_away(user, away).await {
                Ok(change) => self.publish(change),
                Err(error) => warn!(%error, "presence write failed"),
            }
        }
        let mut views = self.views(&[user.to_owned()]).await;
        views.pop().unwrap_or(PresenceView { user: user.to_owned(), status: Status::Offline, last_seen: 0 })
    }

    /// Current views of users; empty if the store cannot answer.
    pub async fn views(&self, users: &[String]) -> Vec<PresenceView> {
        self.store.views(users).await.unwrap_or_else(|error| {
            warn!(%error, "presence read failed");
            Vec::new()
        })
    }

    /// Current views of users, or why the store cannot answer.
    pub async fn try_views(&self, users: &[String]) -> Result<Vec<PresenceView>, PresenceError> {
        self.store.views(users).await
    }

    /// How many of `users` are online or away; 0 if the store cannot answer.
    pub async fn online_count(&self, users: &[String]) -> usize {
        self.store.online_count(users).await.unwrap_or_else(|error| {
            warn!(%error, "presence read failed");
            0
        })
    }

    /// For each of `users`, the instances holding a connection of theirs (the user→gateway registry).
    pub async fn locate(&self, users: &[String]) -> Result<Vec<Vec<String>>, PresenceError> {
        self.store.locate(users).await
    }
}

/// Publishes each batch of changes on the users' presence topics, as shown (merged with other regions' reports:
/// a user who left this region but is online in another stays online), in the order they were queued. When the
/// store cannot be read, the changes go out as this region saw them.
async fn publish_shown(
    store: Arc<dyn PresenceStore>,
    bus: Arc<dyn PubSub>,
    mut changes: mpsc::Receiver<Vec<PresenceView>>,
) {
    while let Some(mut batch) = changes.recv().await {
        while batch.len() < 500 {
            match changes.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let users: Vec<String> = batch.iter().map(|view| view.user.clone()).collect();
        let shown = match store.views(&users).await {
            Ok(views) => views,
            Err(error) => {
                warn!(%error, "presence read failed; publishing this region's view");
                batch
            }
        };
        let items = shown
            .into_iter()
            .map(|view| {
                let event =
                    ControlEvent::Presence { user: view.user.clone(), status: view.status, last_seen: view.last_seen };
                (presence_topic(&view.user), Event::Control(event).encode())
            })
            .collect();
        if let Err(error) = bus.publish_batch(items).await {
            warn!(%error, "presence changes not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use parley_bus::pubsub::{LocalPubSub, PubSub};
    use tokio::sync::mpsc;

    fn hub() -> Arc<Hub> {
        let (sink, _publications) = mpsc::channel(8);
        Hub::new(LocalPubSub::new().open(sink), Metrics::new(), 1_000)
    }

    #[tokio::test]
    async fn a_fenced_instance_registers_again_and_records_its_connections() {
        let hub = hub();
        let store = Arc::new(EmbeddedPresenceStore::new());
        let presence = Presence::start_with(&hub, store.clone(), None, None).await.expect("registered");
        presence.connected("alice").await;
        presence.connected("alice").await;
        presence.connected("bob").await;
        presence.set_away("bob", true).await;
        let first = presence.epoch.load(Ordering::Relaxed);

        // Another process takes the id over (as after a lapsed lease): this instance's entries are dropped.
        store.register_now(presence.instance(), LEASE);
        let gone = presence.views(&["alice".to_owned(), "bob".to_owned()]).await;
        assert!(gone.iter().all(|view| view.status == Status::Offline), "{gone:?}");

        presence.tick().await;
        let epoch = presence.epoch.load(Ordering::Relaxed);
        assert_eq!(epoch, first + 2, "registered again after the takeover");
        let back = presence.views(&["alice".to_owned(), "bob".to_owned()]).await;
        assert_eq!(back.iter().map(|view| view.status).collect::<Vec<_>>(), vec![Status::Online, Status::Away]);
        presence.disconnected("alice").await;
        assert_eq!(presence.online_count(&["alice".to_owned()]).await, 1, "one of two connections left");
        presence.disconnected("alice").await;
        assert_eq!(presence.online_count(&["alice".to_owned()]).await, 0);
        assert_eq!(
            presence.locate(&["bob".to_owned()]).await.expect("locate"),
            vec![vec![presence.instance().to_owned()]]
        );
    }
}
