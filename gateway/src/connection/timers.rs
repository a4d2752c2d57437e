//! A connection's clock and deadlines. Both follow tokio's clock, so tests run them on paused time.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::{Instant, Sleep};

/// About a century: what stands for "never" where a deadline would lie past what the clock can hold.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `at + duration`, or a moment about a century on when that is past what the clock can hold (a duration from a
/// client's, an operator's or a token's number: it must not panic).
pub(crate) fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration).or_else(|| at.checked_add(FAR)).unwrap_or(at)
}

/// Wall-clock Unix milliseconds.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// A monotonic millisecond clock for the delivery tracker and the rate limit.
pub(super) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(super) fn new() -> Self {
        Self { origin: Instant::now() }
    }

    /// Milliseconds since the clock started.
    pub(super) fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The instant `ms` milliseconds after the clock started.
    pub(super) fn instant(&self, ms: u64) -> Instant {
        after(self.origin, Duration::from_millis(ms))
    }
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lapse {
    /// The token expired.
    TokenExpired,
    /// Nothing came from the client within the idle timeout.
    Idle,
    /// The instance drains, and this connection's moment to leave came.
    Departure,
}

/// The deadlines of one connection (token expiry, idle timeout, drain departure) and the one timer armed for the
/// earliest of them, or earlier for a retransmission.
pub(super) struct Deadlines {
    idle: Duration,
    last_activity: Instant,
    expiry: Instant,
    departure: Option<Instant>,
    armed: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadlines {
    /// Deadlines for a token that expires at `expires_at` (Unix seconds).
    pub(super) fn new(idle: Duration, expires_at: u64) -> Self {
        let now = Instant::now();
        let remaining = expires_at.saturating_mul(1000).saturating_sub(unix_ms());
        let expiry = after(now, Duration::from_millis(remaining));
        let armed = after(now, idle).min(expiry);
        Self {
            idle,
            last_activity: now,
            expiry,
            departure: None,
            armed,
            timer: Box::pin(tokio::time::sleep_until(armed)),
        }
    }

    /// Starts the idle timeout at `now`; when `draining`, the connection leaves at once.
    pub(super) fn start(&mut self, now: Instant, draining: bool) {
        self.last_activity = now;
        self.rearm();
        if draining {
            self.leave_at(now);
        }
    }

    /// The client sent something.
    pub(super) fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Whether a drain departure is set.
    pub(super) fn leaving(&self) -> bool {
        self.departure.is_some()
    }

    /// Sets the drain departure.
    pub(super) fn leave_at(&mut self, at: Instant) {
        self.departure = Some(at);
        self.wake_by(at);
    }

    /// Makes the timer fire no later than `at`.
    pub(super) fn wake_by(&mut self, at: Instant) {
        if at < self.armed {
            self.arm(at);
        }
    }

    /// Arms the timer for the earliest deadline (activity moves the idle one without re-arming: the timer then
    /// fires early, finds nothing lapsed and is re-armed here).
    pub(super) fn rearm(&mut self) {
        let mut at = after(self.last_activity, self.idle).min(self.expiry);
        if let Some(departure) = self.departure {
            at = at.min(departure);
        }
        self.arm(at);
    }

    fn arm(&mut self, at: Instant) {
        self.armed = at;
        self.timer.as_mut().reset(at);
    }

    /// Completes when the armed timer fires.
    pub(super) fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.timer.as_mut()
    }

    /// Which deadline passed at `now`, if any: the token expiry first, then the idle timeout, then the departure.
    pub(super) fn lapsed(&self, now: Instant) -> Option<Lapse> {
        if now >= self.expiry {
            Some(Lapse::TokenExpired)
        } else if now >= after(self.last_activity, self.idle) {
            Some(Lapse::Idle)
        } else if self.departure.is_some_and(|at| now >= at) {
            Some(Lapse::Departure)
        } else {
            None
        }
    }
}
