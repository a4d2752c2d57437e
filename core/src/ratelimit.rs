//! A token bucket driven by an explicit clock, so it is deterministic in tests.

/// A token bucket: `rate` tokens per second, up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: u64) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate_per_sec: f64::from(rate_per_sec), burst, tokens: burst, last_ms: now_ms }
    }

    /// A full bucket refilled with `rate_per_minute` tokens per minute (slower than one per second), up to `burst`.
    pub fn per_minute(rate_per_minute: u32, burst: u32, now_ms: u64) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate_per_sec: f64::from(rate_per_minute) / 60.0, burst, tokens: burst, last_ms: now_ms }
    }

    /// Whether the bucket would be full at `now_ms` (forgetting it then loses nothing).
    pub fn is_full(&self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens + elapsed * self.rate_per_sec >= self.burst
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_minute_refills_slower_than_a_token_a_second() {
        let mut bucket = TokenBucket::per_minute(6, 2, 0);
        assert!(bucket.try_take(0) && bucket.try_take(0));
        assert!(!bucket.try_take(9_000), "one token per 10 s");
        assert!(bucket.try_take(11_000));
        assert!(!bucket.try_take(11_000));
    }

    #[test]
    fn burst_then_rate() {
        let mut bucket = TokenBucket::new(10, 3, 0);
        assert!(bucket.try_take(0) && bucket.try_take(0) && bucket.try_take(0));
        assert!(!bucket.try_take(0), "burst spent");
        assert!(!bucket.try_take(50), "half a token");
        assert!(bucket.try_take(100), "one token after 100 ms at 10/s");
        assert!(!bucket.try_take(100));
        assert!(bucket.try_take(10_000) && bucket.try_take(10_000) && bucket.try_take(10_000));
        assert!(!bucket.try_take(10_000), "never above burst");
    }
}
