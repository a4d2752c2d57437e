//! The [`Notifier`]: fans a message out to the devices of offline recipients, off the delivery path.
//!
//! [`Notifier::notify`] never waits: it puts one job on a bounded queue, or drops it and counts the drop when the
//! queue is full (push is at-most-once). One worker task takes jobs in order, looks up each recipient's devices
//! and sends to them with bounded concurrency; tokens a provider reports invalid are unregistered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::payload::{Notification, PushMessage};
use crate::provider::PushProvider;
use crate::registry::{Device, DeviceRegistry, Platform};

/// Notifier settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierConfig {
    /// Jobs (one per message) waiting for the worker before new ones are dropped.
    pub queue_capacity: usize,
    /// Recipients served at once by the worker.
    pub concurrency: usize,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig { queue_capacity: 1024, concurrency: 32 }
    }
}

/// A snapshot of the notifier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Pushes a provider accepted (one per device).
    pub sent: u64,
    /// Pushes that failed (provider error, timeout, no provider for the platform, device lookup failure).
    pub failed: u64,
    /// Device tokens a provider reported invalid; each was unregistered.
    pub invalid_tokens: u64,
    /// Recipients whose notification was dropped because the queue was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    invalid_tokens: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, count: u64) {
        counter.fetch_add(count, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PushStats {
        PushStats {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            invalid_tokens: self.invalid_tokens.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// One message for some offline recipients.
struct Job {
    recipients: Vec<String>,
    notification: Arc<Notification>,
}

/// What the worker needs.
struct Worker {
    registry: Arc<dyn DeviceRegistry>,
    providers: HashMap<Platform, Arc<dyn PushProvider>>,
    counters: Arc<Counters>,
    concurrency: usize,
}

/// Sends pushes to offline users in the background. See the [module documentation](self).
pub struct Notifier {
    queue: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    worker: JoinHandle<()>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Notifier").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the worker on the current tokio runtime (it must be called from within one). One provider per
    /// platform: a later provider for the same platform replaces an earlier one. Devices on a platform without a
    /// provider count as failed.
    pub fn spawn(
        registry: Arc<dyn DeviceRegistry>,
        providers: impl IntoIterator<Item = Arc<dyn PushProvider>>,
        config: NotifierConfig,
    ) -> Self {
        let (queue, jobs) = mpsc::channel(config.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            registry,
            providers: providers.into_iter().map(|provider| (provider.platform(), provider)).collect(),
            counters: Arc::clone(&counters),
            concurrency: config.concurrency.max(1),
        };
        Notifier { queue, counters, worker: tokio::spawn(worker.run(jobs)) }
    }

    /// Queues a push of `message` to every device of the `offline` recipients. Never waits: when the queue is full
    /// the push is dropped and counted, and `false` is returned.
    pub fn notify<I, S>(&self, offline: I, message: &PushMessage) -> bool
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let recipients: Vec<String> = offline.into_iter().map(Into::into).collect();
        if recipients.is_empty() {
            return true;
        }
        let count = u64::try_from(recipients.len()).unwrap_or(u64::MAX);
        let job = Job { recipients, notification: Arc::new(Notification::from_message(message)) };
        match self.queue.try_send(job) {
            Ok(()) => true,
            Err(error) => {
                Counters::add(&self.counters.dropped, count);
                tracing::debug!(recipients = count, %error, "push queue full: notification dropped");
                false
            }
        }
    }

    /// A reader of the counters that outlives this handle (for metrics scraped while the worker runs).
    pub fn stats_reader(&self) -> impl Fn() -> PushStats + Send + Sync + 'static {
        let counters = Arc::clone(&self.counters);
        move || counters.snapshot()
    }

    /// The counters so far.
    pub fn stats(&self) -> PushStats {
        self.counters.snapshot()
    }

    /// Stops taking jobs, lets the worker finish the queued ones, and returns the final counters.
    pub async fn shutdown(self) -> PushStats {
        let Notifier { queue, counters, worker } = self;
        drop(queue);
        if let Err(error) = worker.await {
            tracing::warn!(%error, "push worker ended abnormally");
        }
        counters.snapshot()
    }
}

impl Worker {
    async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let Job { recipients, notification } = job;
            stream::iter(recipients)
                .map(|user| self.notify_user(user, &notification))
                .buffer_unordered(self.concurrency)
                .for_each(|()| async {})
                .await;
        }
    }

    async fn notify_user(&self, user: String, notification: &Notification) {
        let devices = match self.registry.devices(&user).await {
            Ok(devices) => devices,
            Err(error) => {
                Counters::add(&self.counters.failed, 1);
                tracing::warn!(%user, %error, "unable to look up push devices");
                return;
            }
        };
        futures_util::future::join_all(devices.into_iter().map(|device| self.notify_device(device, notification)))
            .await;
    }

    async fn notify_device(&self, device: Device, notification: &Notification) {
        let Some(provider) = self.providers.get(&device.platform) else {
            Counters::add(&self.counters.failed, 1);
            tracing::debug!(platform = %device.platform, "no push provider configured");
            return;
        };
        match provider.send(&device.token, notification).await {
            Ok(()) => Counters::add(&self.counters.sent, 1),
            Err(Error::InvalidToken { platform, reason }) => {
                Counters::add(&self.counters.invalid_tokens, 1);
                tracing::info!(%platform, %reason, "unregistering an invalid device token");
                if let Err(error) = self.registry.unregister(platform, &device.token).await {
                    tracing::warn!(%error, "unable to unregister an invalid device token");
                }
            }
            Err(error) => {
                Counters::add(&self.counters.failed, 1);
                tracing::warn!(platform = %device.platform, %error, "push failed");
            }
        }
    }
}
