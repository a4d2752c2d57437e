//! Which router owns which channel: the map routers publish and gateways route by.
//!
//! The messages topic of a Region has a fixed number of partitions, and a channel lives in one of them
//! ([`parley_core::partition::partition_for`]). Each partition has exactly one owning router at a time, the single
//! writer of every channel in it (the routers agree through a Kafka consumer group, and a deposed owner is fenced
//! by Kafka's transactions, so it can never confirm a send). Every router publishes a [`RouterEntry`]: where it
//! listens, and the partitions it owns since when. It publishes again whenever that changes, and at least every
//! [`PUBLISH_EVERY`]. A gateway reads every entry and builds an [`OwnerTable`] (pure): entries older than
//! [`ENTRY_MAX_AGE`] are ignored (their router stopped publishing, so it is presumably gone), and when two routers
//! claim a partition during a handover, the later claim wins. A call that reaches a router that does not own the
//! channel is refused with `not_owner`, and the gateway reads the map again and retries at the owner.

use crate::error::BackendError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How often a router publishes its entry when nothing changes.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Entries older than this are ignored.
pub const ENTRY_MAX_AGE: Duration = Duration::from_secs(5);

/// A partition a router owns, and since when (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedPartition {
    /// The partition.
    pub partition: i32,
    /// When this router acquired it (after it fenced the previous owner).
    pub since_ms: u64,
}

/// What one router publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEntry {
    /// The URL gateways reach this router at (also the entry's key).
    pub url: String,
    /// Partitions of the messages topic.
    pub partitions: i32,
    /// The partitions it owns.
    pub owned: Vec<OwnedPartition>,
    /// When it published this (Unix ms).
    pub at_ms: u64,
}

/// Where routers publish their entries and gateways read them (Redis in a Region; in memory in tests).
#[async_trait]
pub trait RouterDirectory: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes (or replaces) a router's entry.
    async fn publish(&self, entry: &RouterEntry) -> Result<(), BackendError>;
    /// Removes a router's entry (it stops).
    async fn withdraw(&self, url: &str) -> Result<(), BackendError>;
    /// Every published entry (stale ones included; the reader decides).
    async fn entries(&self) -> Result<Vec<RouterEntry>, BackendError>;
}

/// An in-process [`RouterDirectory`], for tests and single-process layouts.
#[derive(Debug, Default)]
pub struct MemoryRouterDirectory {
    entries: Mutex<HashMap<String, RouterEntry>>,
}

impl MemoryRouterDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RouterEntry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl RouterDirectory for MemoryRouterDirectory {
    async fn publish(&self, entry: &RouterEntry) -> Result<(), BackendError> {
        self.lock().insert(entry.url.clone(), entry.clone());
        Ok(())
    }

    async fn withdraw(&self, url: &str) -> Result<(), BackendError> {
        self.lock().remove(url);
        Ok(())
    }

    async fn entries(&self) -> Result<Vec<RouterEntry>, BackendError> {
        Ok(self.lock().values().cloned().collect())
    }
}

/// Who owns each partition, as a gateway sees it. Pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerTable {
    partitions: i32,
    /// Per partition: the owner's URL, if any router claims it.
    owners: Vec<Option<String>>,
    /// Every live router's URL, sorted.
    routers: Vec<String>,
}

impl OwnerTable {
    /// Builds the table from published entries at `now_ms`: entries older than `max_age` are left out; a
    /// partition claimed by several routers goes to the latest claim (ties: the greatest URL, so that every
    /// gateway decides alike). The partition count is the one most live entries give.
    pub fn build(entries: &[RouterEntry], now_ms: u64, max_age: Duration) -> Self {
        let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        let live: Vec<&RouterEntry> = entries
            .iter()
            .filter(|entry| entry.partitions > 0 && now_ms.saturating_sub(entry.at_ms) <= max_age_ms)
            .collect();
        let mut counts: HashMap<i32, usize> = HashMap::new();
        for entry in &live {
            *counts.entry(entry.partitions).or_default() += 1;
        }
        let Some(partitions) =
            counts.into_iter().max_by_key(|(partitions, count)| (*count, *partitions)).map(|(p, _)| p)
        else {
            return Self::default();
        };
        let mut claims: Vec<Option<(u64, &str)>> = vec![None; partitions as usize];
        let mut routers = Vec::new();
        for entry in live.iter().filter(|entry| entry.partitions == partitions) {
            routers.push(entry.url.clone());
            for owned in &entry.owned {
                let Some(slot) = usize::try_from(owned.partition).ok().and_then(|index| claims.get_mut(index)) else {
                    continue;
                };
                let claim = (owned.since_ms, entry.url.as_str());
                if slot.is_none_or(|current| claim > current) {
                    *slot = Some(claim);
                }
            }
        }
        routers.sort();
        routers.dedup();
        Self {
            partitions,
            owners: claims.into_iter().map(|claim| claim.map(|(_, url)| url.to_owned())).collect(),
            routers,
        }
    }

    /// Whether no live router published anything.
    pub fn is_empty(&self) -> bool {
        self.routers.is_empty()
    }

    /// Partitions of the messages topic (0 when empty).
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The URL of the router that owns `channel`'s partition, if one claims it.
    pub fn owner(&self, channel: &str) -> Option<&str> {
        if self.partitions == 0 {
            return None;
        }
        let partition = parley_core::partition::partition_for(channel, self.partitions);
        self.owners.get(partition as usize).and_then(|owner| owner.as_deref())
    }

    /// Live routers, sorted.
    pub fn routers(&self) -> &[String] {
        &self.routers
    }

    /// Partitions no live router claims.
    pub fn orphans(&self) -> usize {
        self.owners.iter().filter(|owner| owner.is_none()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, owned: &[(i32, u64)], at_ms: u64) -> RouterEntry {
        RouterEntry {
            url: url.to_owned(),
            partitions: 4,
            owned: owned.iter().map(|&(partition, since_ms)| OwnedPartition { partition, since_ms }).collect(),
            at_ms,
        }
    }

    fn owner_of_partition(table: &OwnerTable, partition: i32) -> Option<String> {
        // A channel name that lands in `partition` (found by search: the function is Kafka's).
        let channel = (0..10_000)
            .map(|n| format!("g:c{n}"))
            .find(|channel| parley_core::partition::partition_for(channel, 4) == partition)
            .expect("some channel lands in every partition");
        table.owner(&channel).map(str::to_owned)
    }

    #[test]
    fn each_partition_goes_to_its_claimer_and_stale_entries_are_ignored() {
        let entries = vec![
            entry("http://a", &[(0, 10), (1, 10)], 10_000),
            entry("http://b", &[(2, 10)], 9_000),
            entry("http://gone", &[(3, 10)], 10_000 - 6_000),
        ];
        let table = OwnerTable::build(&entries, 10_000, ENTRY_MAX_AGE);
        assert_eq!(table.partitions(), 4);
        assert_eq!(owner_of_partition(&table, 0).as_deref(), Some("http://a"));
        assert_eq!(owner_of_partition(&table, 1).as_deref(), Some("http://a"));
        assert_eq!(owner_of_partition(&table, 2).as_deref(), Some("http://b"));
        assert_eq!(owner_of_partition(&table, 3), None, "the stale router's partition is an orphan");
        assert_eq!(table.orphans(), 1);
        assert_eq!(table.routers(), ["http://a".to_owned(), "http://b".to_owned()]);
    }

    #[test]
    fn during_a_handover_the_later_claim_wins() {
        let entries = vec![entry("http://old", &[(0, 100)], 5_000), entry("http://new", &[(0, 200)], 5_000)];
        let table = OwnerTable::build(&entries, 5_000, ENTRY_MAX_AGE);
        assert_eq!(owner_of_partition(&table, 0).as_deref(), Some("http://new"));
        // The same whatever order the entries come in.
        let reversed: Vec<RouterEntry> = entries.into_iter().rev().collect();
        assert_eq!(
            owner_of_partition(&OwnerTable::build(&reversed, 5_000, ENTRY_MAX_AGE), 0).as_deref(),
            Some("http://new")
        );
    }

    #[test]
    fn nothing_published_is_an_empty_table() {
        let table = OwnerTable::build(&[], 0, ENTRY_MAX_AGE);
        assert!(table.is_empty());
        assert_eq!(table.owner("g:general"), None);
        let nonsense = vec![RouterEntry { url: "http://x".into(), partitions: 0, owned: vec![], at_ms: 0 }];
        assert!(OwnerTable::build(&nonsense, 0, ENTRY_MAX_AGE).is_empty());
    }

    #[test]
    fn out_of_range_claims_are_ignored() {
        let entries = vec![entry("http://a", &[(-1, 1), (4, 1), (9, 1), (1, 1)], 0)];
        let table = OwnerTable::build(&entries, 0, ENTRY_MAX_AGE);
        assert_eq!(owner_of_partition(&table, 1).as_deref(), Some("http://a"));
        assert_eq!(table.orphans(), 3);
    }
}
