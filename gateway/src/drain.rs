//! Draining an instance before it goes away (rollouts, scale-down): stop accepting, ask every client to
//! reconnect elsewhere at a random moment spread over a window (so the reconnects are no storm), and stop once
//! the last connection is gone or the deadline passes.

use crate::hub::Hub;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

/// A drain request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// Reconnect requests are spread uniformly over this window.
    pub window: Duration,
    /// The instance stops at this point even if connections remain.
    pub deadline: Duration,
}

/// Starts and tracks the drain of this instance.
#[derive(Debug)]
pub struct Drainer {
    plan: watch::Sender<Option<DrainPlan>>,
    shutdown: watch::Sender<bool>,
    accepting: Arc<AtomicBool>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl Drainer {
    /// A drainer for this instance.
    pub fn new(
        shutdown: watch::Sender<bool>,
        accepting: Arc<AtomicBool>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (plan, _) = watch::channel(None);
        Self { plan, shutdown, accepting, hub, metrics }
    }

    /// What connections watch.
    pub fn subscribe(&self) -> watch::Receiver<Option<DrainPlan>> {
        self.plan.subscribe()
    }

    /// Whether a drain is under way.
    pub fn draining(&self) -> bool {
        self.plan.borrow().is_some()
    }

    /// Starts draining; a second call changes nothing and returns `false`.
    pub fn start(self: &Arc<Self>, plan: DrainPlan) -> bool {
        if self.draining() {
            return false;
        }
        self.accepting.store(false, Ordering::SeqCst);
        self.metrics.draining.set(1);
        info!(
            window_ms = plan.window.as_millis() as u64,
            deadline_ms = plan.deadline.as_millis() as u64,
            connections = self.hub.connection_count(),
            "draining: asking every client to reconnect elsewhere"
        );
        let _ = self.plan.send(Some(plan));
        let drainer = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + plan.deadline;
            while drainer.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            info!(remaining = drainer.hub.connection_count(), "drain finished; stopping");
            let _ = drainer.shutdown.send(true);
        });
        true
    }
}
