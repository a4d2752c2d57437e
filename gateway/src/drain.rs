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
    /// Every client is back on another instance within this window: reconnect requests are spread uniformly over
    /// its first [`DEPARTURE_SHARE`], and the rest is left for the last ones to connect, resume and catch up.
    pub window: Duration,
    /// The instance stops at this point even if connections remain.
    pub deadline: Duration,
}

/// The share of a drain window over which clients are asked to leave (per mille); the remainder is the time the
/// last of them have to land on another instance before the window ends.
pub const DEPARTURE_SHARE: u64 = 800;

impl DrainPlan {
    /// When, after the drain started, to ask the client with the random draw `draw` (uniform in `[0, 1)`) to
    /// leave: uniformly within the first [`DEPARTURE_SHARE`] of the window.
    pub fn departure_at(&self, draw: f64) -> Duration {
        let span = (self.window.as_millis() * u128::from(DEPARTURE_SHARE) / 1000).min(u128::from(u64::MAX)) as u64;
        let draw = if draw.is_finite() { draw.clamp(0.0, 1.0) } else { 0.0 };
        Duration::from_millis(((span as f64) * draw) as u64).min(Duration::from_millis(span))
    }
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
            // A deadline past what the clock holds (an absurd `deadline_ms`) is no deadline.
            let deadline = tokio::time::Instant::now().checked_add(plan.deadline);
            while drainer.hub.connection_count() > 0
                && deadline.is_none_or(|deadline| tokio::time::Instant::now() < deadline)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            info!(remaining = drainer.hub.connection_count(), "drain finished; stopping");
            let _ = drainer.shutdown.send(true);
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departures_fill_the_first_part_of_the_window_and_leave_the_rest_for_landing() {
        let plan = DrainPlan { window: Duration::from_secs(5), deadline: Duration::from_secs(30) };
        assert_eq!(plan.departure_at(0.0), Duration::ZERO);
        assert_eq!(plan.departure_at(0.5), Duration::from_millis(2_000));
        assert_eq!(plan.departure_at(1.0), Duration::from_millis(4_000));
        for draw in [f64::NAN, f64::INFINITY, -1.0, 7.0] {
            assert!(plan.departure_at(draw) <= Duration::from_millis(4_000), "{draw}");
        }
        let zero = DrainPlan { window: Duration::ZERO, deadline: Duration::from_secs(1) };
        assert_eq!(zero.departure_at(0.9), Duration::ZERO);
        let huge = DrainPlan { window: Duration::MAX, deadline: Duration::MAX };
        assert!(huge.departure_at(1.0) > Duration::from_secs(1_000_000));
    }
}
