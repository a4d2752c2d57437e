//! The presence journal: this instance's presence changes, in the order it saw them, handed to the router to be
//! recorded in the log (`{prefix}presence` on Kafka, keyed by user) for other regions to mirror.
//!
//! Presence itself lives in the presence store (Redis); the journal is only its change feed, so it never holds a
//! connection up. Changes queue in memory and one task sends them in batches of at most [`BATCH`], oldest first.
//! While the router is unavailable the same batch is sent again after a backoff (at most [`RETRY_CAP`]), so the
//! order holds and nothing is lost while it is away. If it stays away until [`QUEUE`] changes wait, the oldest
//! are dropped (a newer change of the same user supersedes them; the store keeps the truth), counted in
//! `parley_gateway_presence_journal_dropped` and logged. A batch the router refuses outright (never expected: the
//! gateway sends only valid users) is dropped the same way. On shutdown [`Journal::flush`] waits (bounded) until
//! the last changes, the disconnections of the drain, are recorded.

use crate::metrics::Metrics;
use async_trait::async_trait;
use parley_api::PresenceUpdate;
use parley_api::{Router, RouterError};
use parley_core::protocol::ErrorCode;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info_span, warn, Instrument};

/// Most changes one call to the router carries (the router takes up to
/// [`parley_api::MAX_PRESENCE_BATCH`]).
pub const BATCH: usize = 500;
/// Most changes waiting; beyond it the oldest are dropped.
pub const QUEUE: usize = 100_000;
/// First pause before sending a batch again.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest pause before sending a batch again.
pub const RETRY_CAP: Duration = Duration::from_secs(5);

/// Where the journal's batches go: the router (its `record_presence` call), or a test's recorder.
#[async_trait]
pub trait PresenceSink: Send + Sync + 'static {
    /// Records the changes in order; `Unavailable` means nothing is known and the same batch is sent again.
    async fn record(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError>;
}

#[async_trait]
impl PresenceSink for Router {
    async fn record(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
        self.record_presence(updates).await
    }
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<PresenceUpdate>,
    /// Changes taken by the sender and not recorded yet.
    in_flight: usize,
    /// Changes were dropped since the last batch was recorded (one warning per episode).
    overflowing: bool,
}

/// The journal's queue and its sender task.
#[derive(Debug)]
pub struct Journal {
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Journal {
    /// Starts the sender task; it ends when the journal is dropped.
    pub fn start(sink: Arc<dyn PresenceSink>, metrics: Arc<Metrics>) -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        let journal = Arc::new(Self { queue: Mutex::new(Queue::default()), wake: wake.clone(), metrics });
        tokio::spawn(send_loop(Arc::downgrade(&journal), wake, sink));
        journal
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues one change (never waits).
    pub fn push(&self, update: PresenceUpdate) {
        let (dropped, first) = {
            let mut queue = self.queue();
            queue.waiting.push_back(update);
            let over = queue.waiting.len().saturating_sub(QUEUE);
            let dropped = queue.waiting.drain(..over).count();
            let first = dropped > 0 && !queue.overflowing;
            queue.overflowing |= dropped > 0;
            (dropped, first)
        };
        if dropped > 0 {
            self.metrics.presence_journal_dropped.inc_by(dropped as u64);
            if first {
                warn!(
                    queue = QUEUE,
                    "presence journal full (router unavailable for long); dropping the oldest changes"
                );
            }
        }
        self.wake.notify_one();
    }

    /// Changes not recorded yet (waiting or being sent).
    pub fn pending(&self) -> usize {
        let queue = self.queue();
        queue.waiting.len() + queue.in_flight
    }

    /// Waits until every change queued so far is recorded (or dropped), at most `within`. Returns whether it
    /// got there.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending() > 0 {
            if tokio::time::Instant::now() >= deadline {
                warn!(pending = self.pending(), "presence journal not flushed in time");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Takes the next batch (marking it in flight), or `None` when nothing waits.
    fn take(&self) -> Option<Vec<PresenceUpdate>> {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            return None;
        }
        let count = queue.waiting.len().min(BATCH);
        queue.in_flight = count;
        Some(queue.waiting.drain(..count).collect())
    }

    fn done(&self, recorded: bool) {
        let mut queue = self.queue();
        queue.in_flight = 0;
        queue.overflowing &= !recorded;
    }
}

async fn send_loop(journal: std::sync::Weak<Journal>, wake: Arc<Notify>, sink: Arc<dyn PresenceSink>) {
    loop {
        let Some(strong) = journal.upgrade() else { return };
        let Some(batch) = strong.take() else {
            // The journal is not kept alive by a waiting sender (a push in between leaves a permit in `wake`).
            drop(strong);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let count = batch.len();
        let mut pause = RETRY_BASE;
        let recorded = loop {
            let span = info_span!("presence_journal", changes = count);
            match sink.record(batch.clone()).instrument(span).await {
                Ok(()) => {
                    strong.metrics.presence_journal_records.inc_by(count as u64);
                    break true;
                }
                Err(error) if error.code() == ErrorCode::Unavailable => {
                    strong.metrics.presence_journal_failures.inc();
                    warn!(%error, changes = count, retry_in_ms = pause.as_millis() as u64, "presence journal: router unavailable; sending the batch again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_CAP);
                    if Arc::strong_count(&strong) == 1 {
                        // The gateway is gone: nobody waits for these any more.
                        return;
                    }
                }
                Err(error) => {
                    strong.metrics.presence_journal_dropped.inc_by(count as u64);
                    warn!(%error, changes = count, "presence journal: the router refused a batch; dropped");
                    break false;
                }
            }
        };
        strong.done(recorded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_api::BackendError;
    use parley_core::presence::Status;

    /// Records what it gets; fails the first `failures` calls with `unavailable`, and refuses batches holding
    /// the user `refused`.
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<PresenceUpdate>>,
        calls: Mutex<Vec<usize>>,
        failures: Mutex<usize>,
    }

    #[async_trait]
    impl PresenceSink for Recorder {
        async fn record(&self, updates: Vec<PresenceUpdate>) -> Result<(), RouterError> {
            self.calls.lock().expect("calls").push(updates.len());
            {
                let mut failures = self.failures.lock().expect("failures");
                if *failures > 0 {
                    *failures -= 1;
                    return Err(RouterError::Unavailable(BackendError::Unavailable("router down".into())));
                }
            }
            if updates.iter().any(|update| update.user == "refused") {
                return Err(RouterError::InvalidArgument("bad user".into()));
            }
            self.got.lock().expect("got").extend(updates);
            Ok(())
        }
    }

    fn update(user: &str, n: u64) -> PresenceUpdate {
        PresenceUpdate {
            user: user.to_owned(),
            status: if n.is_multiple_of(2) { Status::Online } else { Status::Offline },
            last_seen: n,
            instance: "gw-test".into(),
            at: n,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_recorded_in_order_in_batches_across_router_outages() {
        let recorder = Arc::new(Recorder::default());
        *recorder.failures.lock().expect("failures") = 4;
        let metrics = Metrics::new();
        let journal = Journal::start(recorder.clone(), metrics.clone());
        let sent: Vec<PresenceUpdate> = (0..1_200).map(|n| update(&format!("user{}", n % 7), n)).collect();
        for change in &sent[..600] {
            journal.push(change.clone());
        }
        tokio::task::yield_now().await;
        for change in &sent[600..] {
            journal.push(change.clone());
        }
        assert!(journal.flush(Duration::from_secs(60)).await, "flushed");
        assert_eq!(*recorder.got.lock().expect("got"), sent, "every change once, in order");
        let calls = recorder.calls.lock().expect("calls").clone();
        assert!(calls.iter().all(|&size| (1..=BATCH).contains(&size)), "batches of at most {BATCH}: {calls:?}");
        assert_eq!(calls.len(), 4 + 3, "four failed attempts of the first batch, then three batches: {calls:?}");
        assert_eq!(metrics.presence_journal_records.get(), 1_200);
        assert_eq!(metrics.presence_journal_failures.get(), 4);
        assert_eq!(metrics.presence_journal_dropped.get(), 0);
        assert_eq!(journal.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_is_dropped_and_counted_and_the_rest_goes_on() {
        let recorder = Arc::new(Recorder::default());
        let metrics = Metrics::new();
        let journal = Journal::start(recorder.clone(), metrics.clone());
        journal.push(update("alice", 0));
        assert!(journal.flush(Duration::from_secs(5)).await);
        journal.push(update("refused", 1));
        assert!(journal.flush(Duration::from_secs(5)).await);
        journal.push(update("bob", 2));
        assert!(journal.flush(Duration::from_secs(5)).await);
        let got: Vec<String> = recorder.got.lock().expect("got").iter().map(|update| update.user.clone()).collect();
        assert_eq!(got, ["alice", "bob"]);
        assert_eq!(metrics.presence_journal_dropped.get(), 1);
        assert_eq!(metrics.presence_journal_records.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_the_oldest_changes() {
        let recorder = Arc::new(Recorder::default());
        // The router stays away while the queue overflows.
        *recorder.failures.lock().expect("failures") = usize::MAX;
        let metrics = Metrics::new();
        let journal = Journal::start(recorder.clone(), metrics.clone());
        for n in 0..(QUEUE + BATCH + 10) as u64 {
            journal.push(update("carol", n));
            if n == 0 {
                // Let the sender take the first change as its batch.
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(journal.pending(), QUEUE + 1, "the batch in flight and a full queue");
        assert_eq!(metrics.presence_journal_dropped.get(), (BATCH + 9) as u64);
        // The router comes back: the batch in flight first, then the newest QUEUE changes.
        *recorder.failures.lock().expect("failures") = 0;
        assert!(journal.flush(Duration::from_secs(600)).await, "flushed");
        let got = recorder.got.lock().expect("got").clone();
        assert_eq!(got.len(), QUEUE + 1);
        assert_eq!(got[0].at, 0);
        assert_eq!(got[1].at, (BATCH + 10) as u64);
        assert_eq!(got.last().map(|update| update.at), Some((QUEUE + BATCH + 9) as u64));
    }
}
