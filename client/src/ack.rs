//! ACK batching, without I/O: collects the newest cumulative acknowledgement per channel and says when to send
//! them. With a zero delay every acknowledgement is due at once; with a delay (50 ms by default) a burst of
//! messages costs one `ack` frame per channel.

use std::time::Duration;
use tokio::time::Instant;

/// Pending cumulative acknowledgements.
#[derive(Debug)]
pub struct AckBatcher {
    delay: Duration,
    pending: Vec<(String, u64)>,
    due: Option<Instant>,
}

impl AckBatcher {
    /// Acknowledgements wait at most `delay` after the first one of a batch.
    pub fn new(delay: Duration) -> Self {
        Self { delay, pending: Vec::new(), due: None }
    }

    /// Everything up to `seq` of `channel` was received at `now`.
    pub fn record(&mut self, channel: &str, seq: u64, now: Instant) {
        match self.pending.iter_mut().find(|(pending, _)| pending == channel) {
            Some((_, pending)) => *pending = (*pending).max(seq),
            None => self.pending.push((channel.to_owned(), seq)),
        }
        if self.due.is_none() {
            self.due = Some(now + self.delay);
        }
    }

    /// When the pending acknowledgements must go out.
    pub fn due_at(&self) -> Option<Instant> {
        self.due
    }

    /// The acknowledgements to send at `now` (empty when none is due yet).
    pub fn take_due(&mut self, now: Instant) -> Vec<(String, u64)> {
        match self.due {
            Some(due) if due <= now => {
                self.due = None;
                std::mem::take(&mut self.pending)
            }
            _ => Vec::new(),
        }
    }

    /// Drops everything pending (the connection is gone; the next one resumes with `sync`).
    pub fn clear(&mut self) {
        self.pending = Vec::new();
        self.due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_per_channel_and_keeps_the_highest() {
        let start = Instant::now();
        let mut acks = AckBatcher::new(Duration::from_millis(50));
        assert_eq!(acks.due_at(), None);
        acks.record("g:a", 3, start);
        acks.record("g:b", 1, start + Duration::from_millis(10));
        acks.record("g:a", 5, start + Duration::from_millis(20));
        acks.record("g:a", 4, start + Duration::from_millis(30));
        assert_eq!(acks.due_at(), Some(start + Duration::from_millis(50)), "the first record sets the deadline");
        assert!(acks.take_due(start + Duration::from_millis(49)).is_empty());
        let due = acks.take_due(start + Duration::from_millis(50));
        assert_eq!(due, [("g:a".to_owned(), 5), ("g:b".to_owned(), 1)]);
        assert_eq!(acks.due_at(), None);
        assert!(acks.take_due(start + Duration::from_secs(9)).is_empty());
    }

    #[test]
    fn zero_delay_is_immediate() {
        let now = Instant::now();
        let mut acks = AckBatcher::new(Duration::ZERO);
        acks.record("g:a", 1, now);
        assert_eq!(acks.take_due(now), [("g:a".to_owned(), 1)]);
    }

    #[test]
    fn clear_forgets_pending() {
        let now = Instant::now();
        let mut acks = AckBatcher::new(Duration::ZERO);
        acks.record("g:a", 1, now);
        acks.clear();
        assert_eq!(acks.due_at(), None);
        assert!(acks.take_due(now).is_empty());
    }
}
