//! This router's Snowflake machine ID, leased from its block (`--machine-id-base`, `--machine-id-count`) in the
//! store ([`MembershipStore::machine_leases`] and the calls after it), by the rules of
//! [`parley_core::machine_lease`].
//!
//! - [`MachineLeaser::acquire`] claims an ID at start-up, waiting (and saying why) while every ID of the block is
//!   held or quarantined. The holder is a fresh incarnation name (`<pod>#<random>`), so a restarted or replaced pod
//!   never passes for its predecessor.
//! - [`MachineLeaser::keep`] renews the lease every third of its time to live. The writer asks
//!   [`MachineIdLease::current`] before it issues IDs: once a whole time to live has passed since the start of the
//!   last successful renewal, it refuses sends with `machine_id_lost` until the lease is renewed (nobody took it) or
//!   another ID is claimed (somebody did, after the time to live and the quarantine). So two processes never issue
//!   IDs with the same machine ID, even while this one is cut off from the store.
//! - [`MachineLeaser::release`], at a graceful shutdown once the writer stopped, starts the ID's quarantine.

use crate::backend::MembershipStore;
use parley_api::BackendError;
use parley_core::machine_lease::{choose, incarnation, Choice, LeaseTimings};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// The prefix of every refusal for want of a machine ID (the message of an `unavailable` error).
pub const MACHINE_ID_LOST: &str = "machine_id_lost";

/// Where and how this router leases its machine ID.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The scope the block belongs to in the store: the router's region (regions have disjoint blocks).
    pub scope: String,
    /// First ID of the block.
    pub base: u16,
    /// IDs in the block.
    pub count: u16,
    /// This pod's name: an ID it held before is preferred when free.
    pub pod: String,
    /// Time to live and quarantine.
    pub timings: LeaseTimings,
}

/// The clock written into lease rows (Unix milliseconds).
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> WallClock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0))
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// The ID held (or last held).
    id: Option<u16>,
    /// Until when IDs may be issued with it (start of the last successful claim or renewal + time to live).
    valid_until: Option<Instant>,
    /// Whether the current loss was counted already.
    loss_counted: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    lost: AtomicU64,
}

/// The machine ID the writer issues IDs with, as far as the lease allows: cheap to clone, shared by the writer, the
/// readiness check, the metrics and the [`MachineLeaser`] that keeps it.
#[derive(Debug, Clone, Default)]
pub struct MachineIdLease {
    shared: Arc<Shared>,
}

impl MachineIdLease {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ID to issue with now, or why none may be used (a message starting with [`MACHINE_ID_LOST`]).
    pub fn current(&self) -> Result<u16, String> {
        let state = *self.state();
        match (state.id, state.valid_until) {
            (Some(id), Some(until)) if Instant::now() < until => Ok(id),
            (Some(id), _) => Err(format!(
                "{MACHINE_ID_LOST}: this router's lease of Snowflake machine id {id} lapsed (not renewed within its \
                 time to live); it issues no ids until it holds one again"
            )),
            (None, _) => Err(format!("{MACHINE_ID_LOST}: this router holds no Snowflake machine id yet")),
        }
    }

    /// The ID held or last held (`None` before the first claim).
    pub fn id(&self) -> Option<u16> {
        self.state().id
    }

    /// Whether IDs may be issued now.
    pub fn is_valid(&self) -> bool {
        self.current().is_ok()
    }

    /// How many times the lease was lost (lapsed, or taken by another router after it lapsed).
    pub fn lost_total(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    fn hold(&self, id: u16, valid_until: Instant) {
        *self.state() = State { id: Some(id), valid_until: Some(valid_until), loss_counted: false };
    }

    /// Counts a loss once, if the lease is not valid now; whether it was counted now.
    fn count_if_lapsed(&self) -> bool {
        let mut state = self.state();
        let lapsed = state.valid_until.is_none_or(|until| Instant::now() >= until);
        if lapsed && state.id.is_some() && !state.loss_counted {
            state.loss_counted = true;
            self.shared.lost.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Stops issuing with the ID at once (it was taken, or is released).
    fn end(&self) {
        self.state().valid_until = None;
    }
}

/// Claims, renews and releases this router's machine ID. See the [module](self).
pub struct MachineLeaser {
    store: Arc<dyn MembershipStore>,
    settings: LeaseSettings,
    holder: String,
    lease: MachineIdLease,
    wall: WallClock,
}

impl std::fmt::Debug for MachineLeaser {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MachineLeaser")
            .field("settings", &self.settings)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// What one attempt to get an ID came to.
enum Attempt {
    /// The ID is held.
    Held(u16),
    /// Another router changed the row first.
    Raced,
    /// Nothing is free for this long; `id` is the first to become free.
    Wait { id: u16, wait: Duration },
}

/// A nonce that differs at every start: the standard library's per-process random hasher keys, the process id and the
/// time.
fn nonce() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0));
    hasher.finish()
}

impl MachineLeaser {
    /// A leaser for a new incarnation of `settings.pod`, on the system clock.
    pub fn new(store: Arc<dyn MembershipStore>, settings: LeaseSettings) -> Self {
        let holder = incarnation(&settings.pod, nonce());
        Self { store, settings, holder, lease: MachineIdLease::default(), wall: system_clock() }
    }

    /// The same on another clock (tests).
    pub fn with_clock(mut self, wall: WallClock) -> Self {
        self.wall = wall;
        self
    }

    /// This incarnation's holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease the writer reads.
    pub fn lease(&self) -> MachineIdLease {
        self.lease.clone()
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.settings.timings.ttl_ms)
    }

    /// One store call, bounded by the time to live (a renewal that takes longer is worthless anyway).
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        tokio::time::timeout(self.ttl(), call).await.unwrap_or_else(|_| {
            Err(BackendError::Unavailable(format!("{what} took longer than the lease's time to live")))
        })
    }

    async fn attempt(&self) -> Result<Attempt, BackendError> {
        let LeaseSettings { scope, base, count, timings, .. } = &self.settings;
        let rows = self.call("reading the machine-id leases", self.store.machine_leases(scope, *base, *count)).await?;
        let now = (self.wall)();
        let choice = choose(*base, *count, &rows, &self.holder, now, *timings)
            .map_err(|error| BackendError::InvalidConfig(error.to_string()))?;
        let (id, expected) = match choice {
            Choice::Wait { id, free_at_ms } => {
                return Ok(Attempt::Wait { id, wait: Duration::from_millis(free_at_ms.saturating_sub(now)) })
            }
            Choice::Held { id } => (id, None),
            Choice::Claim { id, expected } => (id, Some(expected)),
        };
        let started = Instant::now();
        let at = (self.wall)();
        let taken = match expected {
            // A claim whose answer was lost went through: renew it.
            None => {
                self.call("renewing a machine id", self.store.renew_machine_id(scope, id, &self.holder, at)).await?
            }
            Some(expected) => {
                let claim = self.store.claim_machine_id(scope, id, expected.as_ref(), &self.holder, at);
                self.call("claiming a machine id", claim).await?
            }
        };
        if !taken {
            return Ok(Attempt::Raced);
        }
        self.lease.hold(id, started + self.ttl());
        Ok(Attempt::Held(id))
    }

    /// Claims an ID of the block, waiting while none is free and retrying while the store fails; returns it once
    /// held (then [`lease`](Self::lease) is valid).
    pub async fn acquire(&self) -> u16 {
        let LeaseSettings { base, count, .. } = self.settings;
        let last = u32::from(base) + u32::from(count) - 1;
        let mut backoff = Duration::from_millis(100);
        let mut announced = None;
        loop {
            match self.attempt().await {
                Ok(Attempt::Held(id)) => {
                    info!(machine_id = id, holder = %self.holder, "leased Snowflake machine id {id}");
                    return id;
                }
                Ok(Attempt::Raced) => {
                    debug!("another router changed a machine-id lease first; reading the leases again");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Attempt::Wait { id, wait }) => {
                    // A release can free an ID sooner than the expiry reckoned here: read again within a renewal
                    // period.
                    let pause = wait
                        .min(Duration::from_millis(self.settings.timings.renew_every_ms()))
                        .max(Duration::from_millis(10));
                    if announced != Some(id) {
                        announced = Some(id);
                        info!(
                            next = id,
                            wait_ms = wait.as_millis() as u64,
                            "every machine id of the block {base}..={last} is held, or waits out its quarantine after \
                             a release or a lapsed lease; machine id {id} is free in {} ms. Not serving until one is \
                             leased (spare ids, router.maxReplicas above router.replicas, avoid this wait)",
                            wait.as_millis()
                        );
                    } else {
                        debug!(next = id, wait_ms = wait.as_millis() as u64, "still waiting for a free machine id");
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(error) => {
                    warn!(%error, "cannot lease a machine id of the block {base}..={last}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Renews the lease every third of its time to live until `stop` turns true; when the lease is lost, refuses
    /// (through [`MachineIdLease::current`]) until it is renewed or another ID is claimed.
    pub async fn keep(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.settings.timings.renew_every_ms());
        let scope = self.settings.scope.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let Some(id) = self.lease.id() else { continue };
            let started = Instant::now();
            let at = (self.wall)();
            let renewed = self.call("renewing a machine id", self.store.renew_machine_id(&scope, id, &self.holder, at));
            match renewed.await {
                Ok(true) => {
                    let lapsed = !self.lease.is_valid();
                    self.lease.count_if_lapsed();
                    self.lease.hold(id, started + self.ttl());
                    if lapsed {
                        info!(machine_id = id, "renewed the lapsed lease of machine id {id}; issuing ids again");
                    }
                }
                Ok(false) => {
                    self.lease.end();
                    self.lease.count_if_lapsed();
                    error!(
                        machine_id = id,
                        "another router holds machine id {id} now (this router's lease lapsed); refusing sends \
                         ({MACHINE_ID_LOST}) until it leases another"
                    );
                    tokio::select! {
                        _ = self.acquire() => {}
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                    continue;
                }
                Err(error) => warn!(%error, machine_id = id, "cannot renew the lease of machine id {id}"),
            }
            if self.lease.count_if_lapsed() {
                error!(
                    machine_id = id,
                    "the lease of machine id {id} was not renewed within its time to live; refusing sends \
                     ({MACHINE_ID_LOST}) until it is"
                );
            }
        }
    }

    /// Releases the ID (a graceful shutdown, once the writer stopped issuing): its quarantine starts now. Whether the
    /// store still named this router its holder.
    pub async fn release(&self) -> Result<bool, BackendError> {
        let Some(id) = self.lease.id() else { return Ok(false) };
        self.lease.end();
        let at = (self.wall)();
        let released = self
            .call("releasing a machine id", self.store.release_machine_id(&self.settings.scope, id, &self.holder, at))
            .await?;
        info!(machine_id = id, released, "released machine id {id}");
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::{EmbeddedStore, Retention};

    /// A wall clock that follows tokio's (paused) clock.
    fn tokio_clock() -> WallClock {
        let start = Instant::now();
        Arc::new(move || 1_800_000_000_000 + start.elapsed().as_millis() as u64)
    }

    fn settings(pod: &str, count: u16) -> LeaseSettings {
        LeaseSettings {
            scope: "eu".into(),
            base: 40,
            count,
            pod: pod.into(),
            timings: LeaseTimings::new(3_000, 10_000).expect("timings"),
        }
    }

    fn store() -> (Arc<dyn MembershipStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("open");
        (Arc::new(store), dir)
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_pod_waits_out_the_quarantine_of_its_predecessors_id() {
        let (store, _dir) = store();
        let clock = tokio_clock();
        let first = MachineLeaser::new(store.clone(), settings("router-0", 1)).with_clock(clock.clone());
        assert_eq!(first.acquire().await, 40);
        assert_eq!(first.lease().current(), Ok(40));
        assert!(first.release().await.expect("release"));
        assert!(first.lease().current().expect_err("released").starts_with(MACHINE_ID_LOST));

        let released_at = Instant::now();
        let second = MachineLeaser::new(store.clone(), settings("router-0", 1)).with_clock(clock);
        assert_ne!(first.holder(), second.holder(), "each incarnation has its own name");
        assert_eq!(second.acquire().await, 40);
        assert!(released_at.elapsed() >= Duration::from_secs(10), "{:?}", released_at.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_cannot_be_renewed_lapses_and_is_taken_after_the_quarantine() {
        let (store, _dir) = store();
        let clock = tokio_clock();
        let first = Arc::new(MachineLeaser::new(store.clone(), settings("router-0", 1)).with_clock(clock.clone()));
        assert_eq!(first.acquire().await, 40);
        let lease = first.lease();
        // Not kept (as when the store is out of reach): after the time to live the writer may not issue.
        tokio::time::sleep(Duration::from_millis(2_999)).await;
        assert_eq!(lease.current(), Ok(40));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(lease.current().expect_err("lapsed").starts_with(MACHINE_ID_LOST));

        // Another router gets the ID only after the time to live and the quarantine.
        let second = MachineLeaser::new(store.clone(), settings("router-1", 1)).with_clock(clock);
        let started = Instant::now();
        assert_eq!(second.acquire().await, 40);
        assert!(started.elapsed() >= Duration::from_secs(10), "{:?}", started.elapsed());

        // The first one finds out at its next renewal, counts the loss and waits for another ID.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let keeper = tokio::spawn(first.clone().keep(stopped));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(lease.lost_total(), 1);
        assert!(!lease.is_valid());
        let _ = stop.send(true);
        keeper.await.expect("keeper");
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_lease_stays_valid_and_a_lapsed_one_is_renewed_when_nobody_took_it() {
        let (store, _dir) = store();
        let leaser = Arc::new(MachineLeaser::new(store.clone(), settings("router-0", 2)).with_clock(tokio_clock()));
        assert_eq!(leaser.acquire().await, 40);
        let lease = leaser.lease();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let keeper = tokio::spawn(leaser.clone().keep(stopped));
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(lease.current(), Ok(40));
        }
        let _ = stop.send(true);
        keeper.await.expect("keeper");
        // Left alone past its time to live, then kept again: renewed, the same ID, one loss counted.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!lease.is_valid());
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let keeper = tokio::spawn(leaser.clone().keep(stopped));
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(lease.current(), Ok(40));
        assert_eq!(lease.lost_total(), 1);
        keeper.abort();
    }
}
