//! Presence and the user→gateway registry behind a backend trait, fenced to gateway instances.
//!
//! [`PresenceStore`] has exactly the operations of [`parley_core::presence::PresenceBook`], made async and
//! fallible (a shared store can be unreachable), and batched where one request touches many users. Each driver
//! keeps the book's rules:
//!
//! - [`PresenceStore::register_instance`] gives an instance a new epoch (one more than any earlier one of its id)
//!   and a lease, and drops the entries of its earlier epochs at once;
//! - a write (`renew`, `connect`, `disconnect`) from an older epoch, or after the lease lapsed, is refused with
//!   [`Fenced`], so a restarted or stalled instance never revives old entries;
//! - [`PresenceStore::expire`] drops every entry of instances whose lease lapsed, so their users go offline within
//!   one lease period (plus the sweep period of whoever calls it).
//!
//! Time is the driver's own clock: the process's wall clock for [`EmbeddedPresenceStore`], and the Redis server's
//! clock (lease keys with `PX` expiry, `TIME` for last-seen) for the Redis driver in [`crate::redis`].

use async_trait::async_trait;
use parley_api::BackendError;
use parley_core::presence::{Fenced, PresenceBook, PresenceView, RemoteState};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;

/// Why a presence operation failed.
#[derive(Debug, Error)]
pub enum PresenceError {
    /// The instance is not the current holder of its id (older epoch, or lapsed lease): the write was refused.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The store could not be reached or failed; nothing is known about the write.
    #[error("presence store failed: {0}")]
    Backend(#[from] BackendError),
}

/// A registration: the instance's new epoch, and who went offline because its earlier epochs' entries were
/// dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The new epoch (1 for the first registration of an id).
    pub epoch: u64,
    /// Users whose status changed, sorted by user.
    pub changes: Vec<PresenceView>,
}

/// The shared presence book and user→gateway registry.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Registers (or re-registers after a restart) an instance with a lease; entries of its earlier epochs are
    /// dropped at once.
    async fn register_instance(&self, instance: &str, lease: Duration) -> Result<Registration, PresenceError>;
    /// Extends the lease of the instance's current epoch.
    async fn renew(&self, instance: &str, epoch: u64, lease: Duration) -> Result<(), PresenceError>;
    /// Records a connection of `user` on (instance, epoch); returns the user's new view if it changed.
    async fn connect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError>;
    /// Removes a connection of `user` from (instance, epoch); returns the user's new view if it changed.
    async fn disconnect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError>;
    /// Sets or clears "away" for a connected user; returns the new view if it changed.
    async fn set_away(&self, user: &str, away: bool) -> Result<Option<PresenceView>, PresenceError>;
    /// Drops every entry of instances whose lease lapsed; returns who went offline, sorted by user.
    async fn expire(&self) -> Result<Vec<PresenceView>, PresenceError>;
    /// Records what another region said of users (its mirrored presence feed), each report kept only if it is
    /// not older than the one held (see [`parley_core::presence::newer`]); returns the users whose held report
    /// changed, sorted. Shown views ([`PresenceStore::views`]) merge these reports; this region's own changes
    /// (`connect`, `disconnect`, ...) never include them.
    async fn apply_remote(
        &self,
        region: &str,
        reports: Vec<(String, RemoteState)>,
    ) -> Result<Vec<String>, PresenceError>;
    /// Forgets everything `region` said (it was marked failed: its users are no longer known online there);
    /// returns the users it spoke of, sorted.
    async fn forget_region(&self, region: &str) -> Result<Vec<String>, PresenceError>;
    /// The views of `users`, in the same order, as shown: this region's entries merged with other regions'
    /// reports.
    async fn views(&self, users: &[String]) -> Result<Vec<PresenceView>, PresenceError>;
    /// For each of `users` (same order), the instances holding a connection of theirs, sorted.
    async fn locate(&self, users: &[String]) -> Result<Vec<Vec<String>>, PresenceError>;
    /// How many of `users` are online or away.
    async fn online_count(&self, users: &[String]) -> Result<usize, PresenceError>;
}

/// Milliseconds since the Unix epoch by this process's clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)
}

/// The embedded driver: the [`PresenceBook`] of this process behind a mutex, on the process's wall clock.
#[derive(Debug, Default)]
pub struct EmbeddedPresenceStore {
    book: Mutex<PresenceBook>,
}

impl EmbeddedPresenceStore {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, PresenceBook> {
        // A poisoned lock only means a panic elsewhere mid-update of plain maps; the book stays usable.
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`PresenceStore::register_instance`] without `.await`, for callers that must register before any task
    /// runs (the embedded driver never waits).
    pub fn register_now(&self, instance: &str, lease: Duration) -> Registration {
        let (epoch, changes) = self.lock().register_instance(instance, lease_ms(lease), unix_ms());
        Registration { epoch, changes }
    }
}

#[async_trait]
impl PresenceStore for EmbeddedPresenceStore {
    async fn register_instance(&self, instance: &str, lease: Duration) -> Result<Registration, PresenceError> {
        Ok(self.register_now(instance, lease))
    }

    async fn renew(&self, instance: &str, epoch: u64, lease: Duration) -> Result<(), PresenceError> {
        Ok(self.lock().renew(instance, epoch, lease_ms(lease), unix_ms())?)
    }

    async fn connect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError> {
        Ok(self.lock().connect(user, instance, epoch, unix_ms())?)
    }

    async fn disconnect(&self, user: &str, instance: &str, epoch: u64) -> Result<Option<PresenceView>, PresenceError> {
        Ok(self.lock().disconnect(user, instance, epoch, unix_ms())?)
    }

    async fn set_away(&self, user: &str, away: bool) -> Result<Option<PresenceView>, PresenceError> {
        Ok(self.lock().set_away(user, away))
    }

    async fn expire(&self) -> Result<Vec<PresenceView>, PresenceError> {
        Ok(self.lock().expire(unix_ms()))
    }

    async fn apply_remote(
        &self,
        region: &str,
        reports: Vec<(String, RemoteState)>,
    ) -> Result<Vec<String>, PresenceError> {
        let mut book = self.lock();
        let mut changed: Vec<String> = reports
            .into_iter()
            .filter(|(user, state)| book.apply_remote(region, user, *state))
            .map(|(user, _)| user)
            .collect();
        changed.sort();
        changed.dedup();
        Ok(changed)
    }

    async fn forget_region(&self, region: &str) -> Result<Vec<String>, PresenceError> {
        Ok(self.lock().forget_region(region))
    }

    async fn views(&self, users: &[String]) -> Result<Vec<PresenceView>, PresenceError> {
        let book = self.lock();
        Ok(users.iter().map(|user| book.view(user)).collect())
    }

    async fn locate(&self, users: &[String]) -> Result<Vec<Vec<String>>, PresenceError> {
        let book = self.lock();
        Ok(users.iter().map(|user| book.locate(user)).collect())
    }

    async fn online_count(&self, users: &[String]) -> Result<usize, PresenceError> {
        Ok(self.lock().online_count(users.iter().map(String::as_str)))
    }
}
