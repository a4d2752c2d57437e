//! Token revocation: which users' tokens issued before a time are refused, shared by every gateway and kept across
//! restarts.
//!
//! The application's backend revokes a user's tokens through the gateway's server API (`POST
//! /server/v1/users/{user}/revoke`): every token of the user issued before a time (`iat` < `before`, in Unix
//! seconds) is refused from then on, at connect, and the user's live sessions holding such a token are closed (a
//! [`crate::pubsub::ControlEvent::Revoked`] on the all-gateways topic tells them). A [`RevocationStore`] keeps one
//! entry per user, the latest such time: a later revocation with an earlier time changes nothing. A token without
//! `iat` cannot be placed in time, so any revocation of its user revokes it ([`is_revoked`]).
//!
//! An entry is needed only while a token issued before its time can still be valid: the stores drop it once
//! `before + ttl` has passed, where `ttl` is the longest token lifetime the deployment issues
//! ([`DEFAULT_TTL`], 30 days, unless configured otherwise). A token that lives longer than `ttl` would be accepted
//! again after that.
//!
//! Drivers: [`EmbeddedRevocationStore`] (in memory, persisted in a JSON file of the data directory, for the
//! standalone layout) and [`crate::redis::RedisRevocationStore`] (a hash `<prefix>revoked`, user → Unix seconds,
//! for the distributed layout). Both read time from this process's clock.

use async_trait::async_trait;
use parley_api::BackendError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long an entry is kept after its time by default: the longest token lifetime a deployment is expected to issue.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The revocations of every user.
#[async_trait]
pub trait RevocationStore: Send + Sync + std::fmt::Debug + 'static {
    /// Revokes every token of `user` issued before `before` (Unix seconds). An entry in force with a later time
    /// stays as it is. Answers the time in force for the user afterwards.
    async fn revoke(&self, user: &str, before: u64) -> Result<u64, BackendError>;
    /// The time before which the user's tokens are revoked, when an entry is in force (not expired).
    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, BackendError>;
}

/// Whether a token issued at `issued_at` (its `iat`, Unix seconds) is revoked by a revocation of the tokens issued
/// before `before`. A token without `iat` is revoked by any revocation.
pub fn is_revoked(issued_at: Option<u64>, before: u64) -> bool {
    issued_at.is_none_or(|issued_at| issued_at < before)
}

/// Seconds since the Unix epoch by this process's clock.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// Whether an entry of time `before` is expired at `now` with this `ttl`.
pub(crate) fn expired(before: u64, ttl: Duration, now: u64) -> bool {
    before.saturating_add(ttl.as_secs()) <= now
}

/// The embedded driver: the entries in memory, written to a JSON file (`{"user": before, ...}`) on every
/// revocation when a path is given (written to a temporary file, synced, then renamed over the old one, so a crash
/// leaves the old or the new file, never half of one).
#[derive(Debug, Clone)]
pub struct EmbeddedRevocationStore {
    entries: Arc<Mutex<HashMap<String, u64>>>,
    path: Option<PathBuf>,
    ttl: Duration,
}

fn io_error(error: std::io::Error) -> BackendError {
    BackendError::Embedded(Box::new(error))
}

impl EmbeddedRevocationStore {
    /// A store that keeps its entries in memory only (tests, or a process that may forget them).
    pub fn in_memory(ttl: Duration) -> Self {
        Self { entries: Arc::default(), path: None, ttl }
    }

    /// A store persisted in the file `path`, with the entries it holds (none if it does not exist yet).
    pub fn open(path: impl Into<PathBuf>, ttl: Duration) -> Result<Self, BackendError> {
        let path = path.into();
        let entries: HashMap<String, u64> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(BackendError::Decode)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(error) => return Err(io_error(error)),
        };
        Ok(Self { entries: Arc::new(Mutex::new(entries)), path: Some(path), ttl })
    }

    fn lock(entries: &Mutex<HashMap<String, u64>>) -> MutexGuard<'_, HashMap<String, u64>> {
        // A poisoned lock only means a panic elsewhere mid-update of a plain map; it stays usable.
        entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the entries to `path` atomically (temporary file, sync, rename).
    fn persist(path: &Path, entries: &HashMap<String, u64>) -> Result<(), BackendError> {
        use std::io::Write;
        let json = serde_json::to_vec(entries).map_err(BackendError::Encode)?;
        let temporary = path.with_extension("tmp");
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        let mut file = std::fs::File::create(&temporary).map_err(io_error)?;
        file.write_all(&json).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        std::fs::rename(&temporary, path).map_err(io_error)
    }
}

#[async_trait]
impl RevocationStore for EmbeddedRevocationStore {
    async fn revoke(&self, user: &str, before: u64) -> Result<u64, BackendError> {
        let (entries, path, ttl, user) = (self.entries.clone(), self.path.clone(), self.ttl, user.to_owned());
        // The file is written under the lock, so concurrent revocations reach it in the order they took effect.
        tokio::task::spawn_blocking(move || {
            let now = unix_secs();
            let mut entries = Self::lock(&entries);
            entries.retain(|_, at| !expired(*at, ttl, now));
            let in_force = entries.entry(user).or_insert(before);
            *in_force = (*in_force).max(before);
            let in_force = *in_force;
            if let Some(path) = &path {
                Self::persist(path, &entries)?;
            }
            Ok(in_force)
        })
        .await
        .map_err(|error| BackendError::Task(error.to_string()))?
    }

    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, BackendError> {
        let now = unix_secs();
        Ok(Self::lock(&self.entries).get(user).copied().filter(|before| !expired(*before, self.ttl, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_issued_before_the_time_or_without_iat_is_revoked() {
        assert!(is_revoked(Some(99), 100));
        assert!(!is_revoked(Some(100), 100), "issued in the second of the revocation: kept");
        assert!(!is_revoked(Some(101), 100));
        assert!(is_revoked(None, 100), "no iat: revoked by any revocation");
        assert!(is_revoked(None, 0));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let ttl = Duration::from_secs(60);
        assert!(!expired(1_000, ttl, 1_059));
        assert!(expired(1_000, ttl, 1_060));
        assert!(!expired(u64::MAX, ttl, u64::MAX - 1), "no overflow");
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked.json");
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(EmbeddedRevocationStore::open(&path, DEFAULT_TTL), Err(BackendError::Decode(_))));
    }
}
