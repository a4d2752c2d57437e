//! Heartbeat decisions, without I/O: when to `ping`, and when a silent connection is a zombie.
//!
//! Pings go out every interval from `ready`, the first one at a random fraction of the interval, so clients that
//! connected together do not ping together. Any frame from the server counts as traffic; a connection with no
//! traffic for [`ZOMBIE_INTERVALS`] intervals (so a ping went unanswered) is dead.

use std::time::Duration;
use tokio::time::Instant;

/// Intervals of silence after which a connection is considered dead.
pub const ZOMBIE_INTERVALS: u32 = 2;

/// What the heartbeat wants at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing yet.
    Idle,
    /// Send a `ping`.
    Ping,
    /// No traffic for too long: drop the connection and reconnect.
    Dead,
}

/// Heartbeat state of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    next_ping: Instant,
    last_traffic: Instant,
}

impl Heartbeat {
    /// Starts at `now` (the `ready` frame); the first ping is due after `first_fraction` (in `[0, 1)`) of the
    /// interval. A zero interval is treated as one millisecond.
    pub fn new(interval: Duration, now: Instant, first_fraction: f64) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let fraction = if first_fraction.is_finite() { first_fraction.clamp(0.0, 1.0) } else { 0.0 };
        Self { interval, next_ping: now + interval.mul_f64(fraction), last_traffic: now }
    }

    /// The interval between pings.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A frame arrived at `now`.
    pub fn traffic(&mut self, now: Instant) {
        self.last_traffic = self.last_traffic.max(now);
    }

    /// The next moment [`Heartbeat::poll`] has something to say.
    pub fn deadline(&self) -> Instant {
        self.next_ping.min(self.zombie_at())
    }

    fn zombie_at(&self) -> Instant {
        self.last_traffic + self.interval * ZOMBIE_INTERVALS
    }

    /// What to do at `now`. A due ping is reported once, and the next one is scheduled an interval later.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if now >= self.zombie_at() {
            return Beat::Dead;
        }
        if now >= self.next_ping {
            // Skip pings missed while the task was not scheduled rather than sending a burst.
            while self.next_ping <= now {
                self.next_ping += self.interval;
            }
            return Beat::Ping;
        }
        Beat::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn first_ping_at_the_random_fraction_then_every_interval() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(10 * SECOND, start, 0.25);
        assert_eq!(heartbeat.deadline(), start + Duration::from_millis(2_500));
        assert_eq!(heartbeat.poll(start + 2 * SECOND), Beat::Idle);
        assert_eq!(heartbeat.poll(start + Duration::from_millis(2_500)), Beat::Ping);
        assert_eq!(heartbeat.poll(start + Duration::from_millis(2_500)), Beat::Idle, "once");
        heartbeat.traffic(start + 3 * SECOND);
        assert_eq!(heartbeat.deadline(), start + Duration::from_millis(12_500));
        assert_eq!(heartbeat.poll(start + Duration::from_millis(12_500)), Beat::Ping);
    }

    #[test]
    fn two_silent_intervals_make_a_zombie() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(10 * SECOND, start, 0.0);
        assert_eq!(heartbeat.poll(start), Beat::Ping);
        heartbeat.traffic(start + SECOND);
        assert_eq!(heartbeat.poll(start + 10 * SECOND), Beat::Ping);
        assert_eq!(heartbeat.poll(start + 20 * SECOND), Beat::Ping);
        assert_eq!(heartbeat.deadline(), start + 21 * SECOND, "zombie deadline before the next ping");
        assert_eq!(heartbeat.poll(start + 21 * SECOND - Duration::from_millis(1)), Beat::Idle);
        assert_eq!(heartbeat.poll(start + 21 * SECOND), Beat::Dead);
    }

    #[test]
    fn traffic_keeps_it_alive_and_late_polls_do_not_burst() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(SECOND, start, 0.5);
        heartbeat.traffic(start + 100 * SECOND);
        assert_eq!(heartbeat.poll(start + 100 * SECOND), Beat::Ping);
        assert_eq!(heartbeat.poll(start + 100 * SECOND), Beat::Idle);
        assert_eq!(heartbeat.deadline(), start + Duration::from_millis(100_500));
        heartbeat.traffic(start + 50 * SECOND);
        assert_eq!(heartbeat.poll(start + Duration::from_millis(101_900)), Beat::Ping, "traffic never goes back");
    }

    #[test]
    fn bad_inputs_are_tamed() {
        let start = Instant::now();
        let heartbeat = Heartbeat::new(Duration::ZERO, start, f64::NAN);
        assert_eq!(heartbeat.interval(), Duration::from_millis(1));
        assert_eq!(heartbeat.deadline(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn drives_a_timer_with_paused_time() {
        let start = Instant::now();
        let mut heartbeat = Heartbeat::new(Duration::from_secs(30), start, 0.1);
        let mut pings = 0;
        let beat = loop {
            tokio::time::sleep_until(heartbeat.deadline()).await;
            match heartbeat.poll(Instant::now()) {
                Beat::Ping => pings += 1,
                other => break other,
            }
        };
        assert_eq!(beat, Beat::Dead);
        assert_eq!(pings, 2, "pings at 3 s and 33 s, dead at 60 s");
        assert_eq!(Instant::now() - start, Duration::from_secs(60));
    }
}
