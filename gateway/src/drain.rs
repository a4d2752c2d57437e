//! Draining an instance before it goes away (rollouts, scale-down): stop accepting, ask every client to
//! reconnect elsewhere at a random moment spread over a window (so the reconnects are no storm), and stop once
//! the last connection is gone or the deadline passes.
//!
//! A drain ends in one of two ways ([`DrainEnd`]): it stops the process (SIGTERM, `POST /admin/drain`), or it holds
//! it (the pod's `parley.dev/drain` annotation, see [`crate::pod_agent`]): the drain runs the same way, but once the
//! connections are gone the process stays up, not ready and not accepting, until [`Drainer::terminate`] (SIGTERM)
//! releases it; it then stops at once.

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

/// What happens once a drain is over (its connections gone, or its deadline passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// The process stops (SIGTERM, `POST /admin/drain`).
    Stop,
    /// The process stays up, not ready and not accepting, until [`Drainer::terminate`] (the drain a pod's
    /// `parley.dev/drain` annotation asks for: the operator deletes the pod once it is drained).
    Hold,
}

/// Starts and tracks the drain of this instance.
#[derive(Debug)]
pub struct Drainer {
    plan: watch::Sender<Option<DrainPlan>>,
    shutdown: watch::Sender<bool>,
    /// `true` while a drain must keep the process up once it is over.
    hold: watch::Sender<bool>,
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
        let (hold, _) = watch::channel(false);
        Self { plan, shutdown, hold, accepting, hub, metrics }
    }

    /// What connections watch.
    pub fn subscribe(&self) -> watch::Receiver<Option<DrainPlan>> {
        self.plan.subscribe()
    }

    /// Whether a drain is under way.
    pub fn draining(&self) -> bool {
        self.plan.borrow().is_some()
    }

    /// Whether the drain under way (or the next one) keeps the process up once it is over.
    pub fn holding(&self) -> bool {
        *self.hold.borrow()
    }

    /// Starts draining, then stops the process; a second call changes nothing and returns `false`.
    pub fn start(self: &Arc<Self>, plan: DrainPlan) -> bool {
        self.begin(plan, DrainEnd::Stop)
    }

    /// Starts draining and keeps the process up once the drain is over, until [`Drainer::terminate`]; a call while
    /// a drain is under way changes nothing and returns `false`.
    pub fn start_and_hold(self: &Arc<Self>, plan: DrainPlan) -> bool {
        self.begin(plan, DrainEnd::Hold)
    }

    /// What SIGTERM does: releases a held drain (the process stops at once if that drain is over, else when it is),
    /// or starts a drain that stops the process. Returns whether it started a drain.
    pub fn terminate(self: &Arc<Self>, plan: DrainPlan) -> bool {
        if self.hold.send_replace(false) {
            info!(connections = self.hub.connection_count(), "releasing the held drain: stopping once it is over");
        }
        self.start(plan)
    }

    /// Starts a drain that ends with `end`.
    pub fn begin(self: &Arc<Self>, plan: DrainPlan, end: DrainEnd) -> bool {
        if self.draining() {
            return false;
        }
        self.hold.send_replace(end == DrainEnd::Hold);
        self.accepting.store(false, Ordering::SeqCst);
        self.metrics.draining.set(1);
        info!(
            window_ms = plan.window.as_millis() as u64,
            deadline_ms = plan.deadline.as_millis() as u64,
            connections = self.hub.connection_count(),
            ?end,
            "draining: asking every client to reconnect elsewhere"
        );
        self.plan.send_replace(Some(plan));
        let drainer = self.clone();
        tokio::spawn(async move {
            // A deadline past what the clock holds (an absurd `deadline_ms`) is no deadline.
            let deadline = tokio::time::Instant::now().checked_add(plan.deadline);
            while drainer.hub.connection_count() > 0
                && deadline.is_none_or(|deadline| tokio::time::Instant::now() < deadline)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut hold = drainer.hold.subscribe();
            if *hold.borrow_and_update() {
                let remaining = drainer.hub.connection_count();
                if remaining > 0 {
                    // The deadline passed: whoever has not picked its moment to leave yet leaves now (the process
                    // stays up, so the shutdown signal, which would close them, is not sent).
                    drainer.plan.send_replace(Some(DrainPlan { window: Duration::ZERO, deadline: Duration::ZERO }));
                }
                info!(remaining, "drain finished; holding, not ready and not accepting, until SIGTERM");
                let _ = hold.wait_for(|hold| !*hold).await;
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

    fn plan() -> DrainPlan {
        DrainPlan { window: Duration::from_secs(1), deadline: Duration::from_secs(3) }
    }

    /// Whether the shutdown signal is sent within `within` (paused clock).
    async fn stops_within(shutdown: &mut watch::Receiver<bool>, within: Duration) -> bool {
        tokio::time::timeout(within, shutdown.wait_for(|stop| *stop)).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_stops_stops_once_its_connections_are_gone() {
        let (state, _shutdown) = crate::admission::tests::state(8);
        let mut shutdown = state.shutdown.clone();
        assert!(state.drainer.start(plan()));
        assert!(!state.drainer.start(plan()), "a second drain changes nothing");
        assert!(!state.accepts_connections() && !state.drainer.holding());
        assert!(stops_within(&mut shutdown, Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_drain_keeps_the_process_up_until_sigterm() {
        let (state, _shutdown) = crate::admission::tests::state(8);
        let mut shutdown = state.shutdown.clone();
        assert!(state.drainer.start_and_hold(plan()));
        assert!(state.drainer.draining() && state.drainer.holding());
        assert!(!state.accepts_connections(), "not ready, not accepting");
        assert!(!stops_within(&mut shutdown, Duration::from_secs(600)).await, "held long after the deadline");
        assert!(!state.drainer.start(plan()), "another drain request changes nothing");
        assert!(!stops_within(&mut shutdown, Duration::from_secs(1)).await, "still held");
        assert!(!state.drainer.terminate(plan()), "SIGTERM starts no second drain");
        assert!(stops_within(&mut shutdown, Duration::from_millis(100)).await, "SIGTERM stops it at once");
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_without_a_drain_starts_one_that_stops() {
        let (state, _shutdown) = crate::admission::tests::state(8);
        let mut shutdown = state.shutdown.clone();
        assert!(state.drainer.terminate(plan()));
        assert!(state.drainer.draining() && !state.drainer.holding());
        assert!(stops_within(&mut shutdown, Duration::from_secs(1)).await);
    }
}
