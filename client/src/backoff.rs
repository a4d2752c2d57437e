//! Reconnect delays: exponential backoff with full jitter.
//!
//! Attempt `n` (0 for the first retry after a failure) waits a uniformly random time in
//! `[0, min(cap, base * 2^n)]`. Full jitter spreads thousands of clients that lost the same server over the whole
//! window, so they do not come back in lockstep.

use std::time::Duration;

/// Reconnect policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub base: Duration,
    /// Largest ceiling, whatever the attempt.
    pub cap: Duration,
    /// Consecutive failed connection attempts after which the client gives up (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(500), cap: Duration::from_secs(20), max_attempts: None }
    }
}

impl Backoff {
    /// The largest delay of attempt `attempt`: `min(cap, base * 2^attempt)`, without overflow.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |ceiling| ceiling.min(self.cap))
    }

    /// The delay of attempt `attempt` for a random `fraction` in `[0, 1)` (clamped): full jitter.
    pub fn delay(&self, attempt: u32, fraction: f64) -> Duration {
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
        self.ceiling(attempt).mul_f64(fraction)
    }

    /// A delay for attempt `attempt` drawn from the thread's random generator.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }

    /// Whether `failures` consecutive failed attempts exhaust the policy.
    pub fn exhausted(&self, failures: u32) -> bool {
        self.max_attempts.is_some_and(|max| failures >= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), Duration::from_millis(500));
        assert_eq!(backoff.ceiling(1), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(5), Duration::from_secs(16));
        assert_eq!(backoff.ceiling(6), Duration::from_secs(20));
        assert_eq!(backoff.ceiling(40), Duration::from_secs(20));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(20));
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling() {
        let policies = [
            Backoff::default(),
            Backoff { base: Duration::from_millis(1), cap: Duration::from_millis(7), max_attempts: None },
            Backoff { base: Duration::from_secs(3), cap: Duration::from_secs(3600), max_attempts: Some(4) },
            Backoff { base: Duration::MAX, cap: Duration::from_secs(1), max_attempts: None },
        ];
        for backoff in policies {
            for attempt in (0..70).chain([1_000, u32::MAX]) {
                let bound = backoff
                    .cap
                    .min(backoff.base.checked_mul(2u32.saturating_pow(attempt.min(31))).unwrap_or(Duration::MAX));
                assert_eq!(backoff.ceiling(attempt), bound, "{backoff:?} attempt {attempt}");
                for _ in 0..50 {
                    let delay = backoff.jittered(attempt);
                    assert!(delay <= bound, "{delay:?} > {bound:?} ({backoff:?}, attempt {attempt})");
                }
                assert_eq!(backoff.delay(attempt, 0.0), Duration::ZERO);
                assert_eq!(backoff.delay(attempt, 1.0), bound);
                assert_eq!(backoff.delay(attempt, f64::NAN), Duration::ZERO);
                assert_eq!(backoff.delay(attempt, 7.0), bound);
                assert_eq!(backoff.delay(attempt, -1.0), Duration::ZERO);
            }
        }
    }

    #[test]
    fn jitter_spreads_over_the_window() {
        let backoff = Backoff::default();
        let delays: Vec<Duration> = (0..400).map(|_| backoff.jittered(3)).collect();
        let ceiling = backoff.ceiling(3);
        assert!(delays.iter().any(|delay| *delay < ceiling / 4), "some early: {delays:?}");
        assert!(delays.iter().any(|delay| *delay > ceiling * 3 / 4), "some late: {delays:?}");
    }

    #[test]
    fn attempts_are_bounded_only_when_asked() {
        assert!(!Backoff::default().exhausted(u32::MAX));
        let bounded = Backoff { max_attempts: Some(3), ..Backoff::default() };
        assert!(!bounded.exhausted(2));
        assert!(bounded.exhausted(3));
    }
}
