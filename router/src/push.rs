//! Push notifications for offline members, decided by the router that writes the channel.
//!
//! The writer hands each durable message of a small channel, with its members but the sender, to a bounded queue
//! it never waits on (the durable tap: a full queue drops the message's push and counts it). The [`PushWorker`]
//! reads that queue, away from the delivery path:
//!
//! 1. the recipients the user→gateway registry shows offline (on every gateway of the region, and in the regions
//!    whose presence this one mirrors);
//! 2. minus those who muted the channel ([`MembershipStore::mutes`], a mute ends at its time);
//! 3. minus those over their rate ([`PushLimiter`]: a burst, then so many per minute per user);
//! 4. handed to the [`Notifier`], which looks their devices up in the store ([`StoreDevices`]), sends through the
//!    provider of each device's platform and forgets the tokens a provider reports invalid.
//!
//! Each message is pushed at most once: one router writes a channel, and a message whose push was dropped (a full
//! queue, a crash) is not pushed later. Devices and mutes live in the store (the embedded store, or Cassandra),
//! so every router of a region reads the same.

use crate::backend::{Device, MembershipStore, Platform};
use async_trait::async_trait;
use parley_api::DurableMessage;
use parley_bus::presence::PresenceStore;
use parley_core::presence::Status;
use parley_core::ratelimit::TokenBucket;
use parley_core::{ChannelId, ChannelKind};
use parley_push::{DeviceRegistry, Notifier, PushMessage, PushStats};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Devices kept per user; registering one more forgets the oldest.
pub const MAX_DEVICES_PER_USER: usize = parley_push::DEFAULT_MAX_DEVICES_PER_USER;

/// Users whose rate is tracked at most; past it, the buckets of users not limited right now are forgotten.
const TRACKED_USERS: usize = 100_000;

/// The store's devices as the notifier's [`DeviceRegistry`].
#[derive(Clone)]
pub struct StoreDevices {
    membership: Arc<dyn MembershipStore>,
}

impl StoreDevices {
    /// Devices kept in `membership`.
    pub fn new(membership: Arc<dyn MembershipStore>) -> Self {
        Self { membership }
    }
}

fn registry_error(error: parley_api::BackendError) -> parley_push::Error {
    parley_push::Error::Registry { path: "the message store".into(), reason: error.to_string() }
}

#[async_trait]
impl DeviceRegistry for StoreDevices {
    async fn register(&self, user: &str, device: Device) -> Result<(), parley_push::Error> {
        self.membership.register_device(user, &device, MAX_DEVICES_PER_USER).await.map(drop).map_err(registry_error)
    }

    async fn unregister(&self, platform: Platform, token: &str) -> Result<bool, parley_push::Error> {
        self.membership.unregister_device(&Device::new(platform, token), None).await.map_err(registry_error)
    }

    async fn devices(&self, user: &str) -> Result<Vec<Device>, parley_push::Error> {
        self.membership.devices(user).await.map_err(registry_error)
    }
}

/// Per-user push rate: a token bucket per user, refilled so many per minute.
#[derive(Debug)]
pub struct PushLimiter {
    per_minute: u32,
    burst: u32,
    buckets: HashMap<String, TokenBucket>,
}

impl PushLimiter {
    /// `burst` pushes at once, then `per_minute` per minute, per user.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self { per_minute, burst: burst.max(1), buckets: HashMap::new() }
    }

    /// Whether `user` may get one more push at `now_ms` (and takes it).
    pub fn allow(&mut self, user: &str, now_ms: u64) -> bool {
        if self.buckets.len() >= TRACKED_USERS && !self.buckets.contains_key(user) {
            // Forget the users whose bucket has refilled: they lose nothing.
            self.buckets.retain(|_, bucket| !bucket.is_full(now_ms));
        }
        let (per_minute, burst) = (self.per_minute, self.burst);
        self.buckets
            .entry(user.to_owned())
            .or_insert_with(|| TokenBucket::per_minute(per_minute, burst, now_ms))
            .try_take(now_ms)
    }
}

/// Of the offline recipients of a message, those to push to at `now_ms`: not muted (a mute ends at its time), and
/// within their rate. Returns them with the counts muted and rate limited.
pub fn choose(
    offline: Vec<String>,
    mutes: &[(String, u64)],
    limiter: &mut PushLimiter,
    now_ms: u64,
) -> (Vec<String>, u64, u64) {
    let (mut muted, mut limited) = (0, 0);
    let chosen = offline
        .into_iter()
        .filter(|user| {
            let silenced = mutes.iter().any(|(who, until)| who == user && *until > now_ms);
            muted += u64::from(silenced);
            !silenced
        })
        .filter(|user| {
            let allowed = limiter.allow(user, now_ms);
            limited += u64::from(!allowed);
            allowed
        })
        .collect();
    (chosen, muted, limited)
}

/// What the push worker counts besides the notifier.
#[derive(Debug, Default)]
pub struct PushCounters {
    /// Offline recipients not pushed because they muted the channel.
    pub muted: AtomicU64,
    /// Offline recipients not pushed because they were over their rate.
    pub rate_limited: AtomicU64,
    /// Messages whose push was skipped because presence or mutes could not be read.
    pub skipped: AtomicU64,
}

/// Turns durable messages into pushes for offline members. See the [module documentation](self).
pub struct PushWorker {
    membership: Arc<dyn MembershipStore>,
    notifier: Notifier,
    limiter: PushLimiter,
    counters: Arc<PushCounters>,
}

impl std::fmt::Debug for PushWorker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PushWorker").field("notifier", &self.notifier).finish_non_exhaustive()
    }
}

/// Reads the worker's counters while it runs.
#[derive(Clone)]
pub struct PushReport {
    counters: Arc<PushCounters>,
    stats: Arc<dyn Fn() -> PushStats + Send + Sync>,
}

impl std::fmt::Debug for PushReport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PushReport").field("stats", &(self.stats)()).finish_non_exhaustive()
    }
}

impl PushReport {
    /// The notifier's counters: sent, failed, invalid tokens, dropped.
    pub fn stats(&self) -> PushStats {
        (self.stats)()
    }

    /// The worker's own counters.
    pub fn counters(&self) -> &PushCounters {
        &self.counters
    }

    /// Registers every counter in `registry` (`push_sent`, `push_failed`, `push_invalid_tokens`, `push_dropped`,
    /// `push_muted`, `push_rate_limited`, `push_skipped`), read at each scrape.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        use parley_telemetry::metrics::{AtomicCounters, Kind};
        let stat = |field: fn(&PushStats) -> u64| {
            let report = self.clone();
            move || field(&report.stats())
        };
        let own = |field: fn(&PushCounters) -> &AtomicU64| {
            let counters = self.counters.clone();
            move || field(&counters).load(Ordering::Relaxed)
        };
        AtomicCounters::default()
            .read("push_sent", "Push notifications accepted by a provider", Kind::Counter, stat(|stats| stats.sent))
            .read("push_failed", "Push notifications that failed", Kind::Counter, stat(|stats| stats.failed))
            .read(
                "push_invalid_tokens",
                "Device tokens unregistered as invalid",
                Kind::Counter,
                stat(|stats| stats.invalid_tokens),
            )
            .read("push_dropped", "Push notifications dropped (queue full)", Kind::Counter, stat(|stats| stats.dropped))
            .read(
                "push_muted",
                "Offline recipients not pushed: channel muted",
                Kind::Counter,
                own(|counters| &counters.muted),
            )
            .read(
                "push_rate_limited",
                "Offline recipients not pushed: over their per-user rate",
                Kind::Counter,
                own(|counters| &counters.rate_limited),
            )
            .read(
                "push_skipped",
                "Messages not pushed: presence or mutes unreadable",
                Kind::Counter,
                own(|counters| &counters.skipped),
            )
            .register(registry);
    }
}

impl PushWorker {
    /// A worker reading devices and mutes from `membership`, sending through `notifier`, at most `burst` pushes at
    /// once and `per_minute` a minute per user.
    pub fn new(membership: Arc<dyn MembershipStore>, notifier: Notifier, per_minute: u32, burst: u32) -> Self {
        Self {
            membership,
            notifier,
            limiter: PushLimiter::new(per_minute, burst),
            counters: Arc::new(PushCounters::default()),
        }
    }

    /// What the worker counts, readable while it runs.
    pub fn report(&self) -> PushReport {
        let stats = self.notifier.stats_reader();
        PushReport { counters: self.counters.clone(), stats: Arc::new(stats) }
    }

    /// Pushes the messages of `durable` to the recipients `presence` shows offline, until the writer stops; then
    /// lets the notifier finish what it queued.
    pub async fn run(mut self, presence: Arc<dyn PresenceStore>, mut durable: mpsc::Receiver<DurableMessage>) {
        while let Some(message) = durable.recv().await {
            self.handle(presence.as_ref(), message).await;
        }
        let stats = self.notifier.shutdown().await;
        debug!(?stats, "push worker stopped");
    }

    #[tracing::instrument(
        name = "push",
        skip_all,
        fields(channel = %durable.message.channel, seq = durable.message.seq)
    )]
    async fn handle(&mut self, presence: &dyn PresenceStore, durable: DurableMessage) {
        let DurableMessage { message, recipients } = durable;
        if recipients.is_empty() {
            return;
        }
        let views = match presence.views(&recipients).await {
            Ok(views) => views,
            Err(error) => {
                warn!(%error, "presence unreadable: no push for this message");
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let offline: Vec<String> =
            views.into_iter().filter(|view| view.status == Status::Offline).map(|view| view.user).collect();
        if offline.is_empty() {
            return;
        }
        let mutes = match self.membership.mutes(&message.channel).await {
            Ok(mutes) => mutes,
            Err(error) => {
                warn!(%error, "mutes unreadable: no push for this message");
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let (chosen, muted, limited) = choose(offline, &mutes, &mut self.limiter, crate::router::now_ms());
        self.counters.muted.fetch_add(muted, Ordering::Relaxed);
        self.counters.rate_limited.fetch_add(limited, Ordering::Relaxed);
        if chosen.is_empty() {
            return;
        }
        let conversation_name = ChannelId::parse(message.channel.clone())
            .ok()
            .filter(|channel| channel.kind() == ChannelKind::Group)
            .map(|channel| channel.as_str().trim_start_matches("g:").to_owned());
        let push = PushMessage {
            conversation_id: message.channel,
            conversation_name,
            sender: message.sender,
            message_id: message.id,
            seq: message.seq,
            text: message.text,
        };
        self.notifier.notify(chosen, &push);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn muted_recipients_are_skipped_until_their_mute_ends() {
        let mut limiter = PushLimiter::new(60, 10);
        let mutes = vec![("bob".to_owned(), u64::MAX), ("carol".to_owned(), 5_000)];
        let (chosen, muted, limited) = choose(users(&["bob", "carol", "dave"]), &mutes, &mut limiter, 1_000);
        assert_eq!((chosen, muted, limited), (users(&["dave"]), 2, 0));
        let (chosen, muted, _) = choose(users(&["bob", "carol"]), &mutes, &mut limiter, 5_000);
        assert_eq!((chosen, muted), (users(&["carol"]), 1), "carol's mute ended");
    }

    #[test]
    fn each_user_gets_a_burst_then_the_rate() {
        let mut limiter = PushLimiter::new(6, 2);
        let mut pushed = |now| choose(users(&["bob", "carol"]), &[], &mut limiter, now);
        assert_eq!(pushed(0), (users(&["bob", "carol"]), 0, 0));
        assert_eq!(pushed(1), (users(&["bob", "carol"]), 0, 0));
        assert_eq!(pushed(2), (Vec::new(), 0, 2), "the burst is spent");
        assert_eq!(pushed(11_000), (users(&["bob", "carol"]), 0, 0), "one more every 10 s");
    }

    #[test]
    fn the_limiter_forgets_refilled_users_past_its_size() {
        let mut limiter = PushLimiter::new(60, 1);
        for user in 0..TRACKED_USERS {
            assert!(limiter.allow(&format!("user{user}"), 0));
        }
        assert!(limiter.allow("late", 120_000), "everyone refilled: forgotten");
        assert_eq!(limiter.buckets.len(), 1);
        assert!(!limiter.allow("late", 120_000));
    }
}
