//! Snowflake machine-ID leases: which ID of a block a process may claim, and when.
//!
//! A router with a block of machine IDs (`[base, base + count)`) does not derive its ID from its pod's ordinal: it
//! leases one, so that no two live processes ever issue Snowflake IDs with the same machine ID, and so that an ID
//! a process gave up (or stopped renewing) stays unused for a quarantine covering the clock skew between machines.
//! The store keeps one row per ID ever leased ([`LeaseRow`]); this module decides, from those rows and the clock,
//! which ID to claim ([`choose`]). The claim itself is a compare-and-set on the row as it was read, done by the
//! store.
//!
//! The rules, with `ttl` the lease's time to live and `quarantine` the wait after a lease ends:
//!
//! - an ID is **free** when no row names it (never held), when its holder released it at least `quarantine` ago,
//!   or when its holder stopped renewing at least `ttl + quarantine` ago (a holder that crashed);
//! - a holder renews every `ttl / 3` and stops issuing IDs once `ttl` has passed since the start of its last
//!   successful renewal (self-fencing), so another process that claims its ID after `ttl + quarantine` by its own
//!   clock never overlaps with it while the clocks differ by less than `quarantine`;
//! - the lowest free ID is chosen, except that the ID the same pod held last is preferred when it is free, so a
//!   pod's ID stays stable across restarts once the quarantine allows it;
//! - when no ID is free, [`choose`] says when the first one becomes free.
//!
//! Times are Unix milliseconds of the machine that wrote them.

use crate::snowflake::MAX_MACHINE_ID;
use thiserror::Error;

/// One machine ID's lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The machine ID.
    pub id: u16,
    /// The process incarnation that holds (or last held) it: `<pod>#<nonce>` ([`incarnation`]).
    pub holder: String,
    /// When the holder last claimed or renewed it (Unix ms, the holder's clock).
    pub renewed_at_ms: u64,
    /// When the holder released it (Unix ms, the holder's clock); `None` while held.
    pub released_at_ms: Option<u64>,
}

impl LeaseRow {
    /// When this row's ID becomes free for another process: `quarantine` after its release, or `ttl + quarantine`
    /// after its last renewal, whichever comes first.
    pub fn free_at_ms(&self, timings: LeaseTimings) -> u64 {
        let abandoned = self.renewed_at_ms.saturating_add(timings.ttl_ms).saturating_add(timings.quarantine_ms);
        match self.released_at_ms {
            Some(released) => released.saturating_add(timings.quarantine_ms).min(abandoned),
            None => abandoned,
        }
    }

    /// Whether the row's ID is free at `now_ms`.
    pub fn is_free(&self, now_ms: u64, timings: LeaseTimings) -> bool {
        now_ms >= self.free_at_ms(timings)
    }
}

/// The durations that govern leases, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a lease lasts after its last renewal.
    pub ttl_ms: u64,
    /// How long an ID stays unused after its lease ended (released or expired).
    pub quarantine_ms: u64,
}

impl LeaseTimings {
    /// Checks the durations: a lease of at least 30 ms (renewed every third of it).
    pub fn new(ttl_ms: u64, quarantine_ms: u64) -> Result<Self, LeaseError> {
        if ttl_ms < MIN_TTL_MS {
            return Err(LeaseError::TtlTooShort { ttl_ms });
        }
        Ok(Self { ttl_ms, quarantine_ms })
    }

    /// How often a holder renews: a third of the time to live.
    pub fn renew_every_ms(&self) -> u64 {
        (self.ttl_ms / 3).max(1)
    }
}

/// The shortest time to live a lease may have.
pub const MIN_TTL_MS: u64 = 30;

/// What to do to get a machine ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// This incarnation already holds `id` (a claim whose answer was lost went through): renew it.
    Held {
        /// The ID.
        id: u16,
    },
    /// Claim `id`, replacing `expected` (the row as read, compared and set by the store), or creating its row
    /// when `expected` is `None` (never held).
    Claim {
        /// The ID.
        id: u16,
        /// The row the claim replaces.
        expected: Option<LeaseRow>,
    },
    /// No ID of the block is free now; `id` is the first to become free, at `free_at_ms`.
    Wait {
        /// The ID that becomes free first.
        id: u16,
        /// When (Unix ms, this machine's clock).
        free_at_ms: u64,
    },
}

/// Why no choice can be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LeaseError {
    /// The block holds no ID.
    #[error("the machine-id block starting at {base} is empty")]
    EmptyBlock {
        /// First ID of the block.
        base: u16,
    },
    /// The block reaches past the 10-bit machine-ID space.
    #[error("the machine-id block of {count} ids starting at {base} reaches past {MAX_MACHINE_ID}")]
    BlockOutOfRange {
        /// First ID of the block.
        base: u16,
        /// Its size.
        count: u16,
    },
    /// The lease's time to live is too short to be renewed in time.
    #[error("a machine-id lease of {ttl_ms} ms is too short (at least {MIN_TTL_MS} ms)")]
    TtlTooShort {
        /// The configured time to live.
        ttl_ms: u64,
    },
}

/// Checks that `[base, base + count)` is a non-empty block inside the machine-ID space.
pub fn check_block(base: u16, count: u16) -> Result<(), LeaseError> {
    if count == 0 {
        return Err(LeaseError::EmptyBlock { base });
    }
    if u32::from(base) + u32::from(count) > u32::from(MAX_MACHINE_ID) + 1 {
        return Err(LeaseError::BlockOutOfRange { base, count });
    }
    Ok(())
}

/// The holder name of one process incarnation: the pod's name and a nonce that differs at every start.
pub fn incarnation(pod: &str, nonce: u64) -> String {
    format!("{pod}#{nonce:016x}")
}

/// The pod part of a holder name (`web-0` of `web-0#00ab...`); a name without a nonce is all pod.
pub fn holder_pod(holder: &str) -> &str {
    holder.rsplit_once('#').map_or(holder, |(pod, _)| pod)
}

/// Decides which ID of the block `[base, base + count)` the incarnation `holder` (of pod [`holder_pod`]) should
/// claim at `now_ms`, given the rows the store holds for the block (rows of other IDs are ignored).
pub fn choose(
    base: u16,
    count: u16,
    rows: &[LeaseRow],
    holder: &str,
    now_ms: u64,
    timings: LeaseTimings,
) -> Result<Choice, LeaseError> {
    check_block(base, count)?;
    let end = base + count;
    let in_block = |row: &&LeaseRow| (base..end).contains(&row.id);
    if let Some(row) = rows.iter().filter(in_block).find(|row| row.holder == holder && row.released_at_ms.is_none()) {
        return Ok(Choice::Held { id: row.id });
    }
    let row_of = |id: u16| rows.iter().find(|row| row.id == id);
    // The ID this pod held last, when it is free.
    let pod = holder_pod(holder);
    let previous = rows
        .iter()
        .filter(in_block)
        .filter(|row| holder_pod(&row.holder) == pod && row.is_free(now_ms, timings))
        .max_by_key(|row| (row.released_at_ms.unwrap_or(row.renewed_at_ms), std::cmp::Reverse(row.id)));
    if let Some(row) = previous {
        return Ok(Choice::Claim { id: row.id, expected: Some(row.clone()) });
    }
    let mut first_free: Option<(u16, u64)> = None;
    for id in base..end {
        match row_of(id) {
            None => return Ok(Choice::Claim { id, expected: None }),
            Some(row) if row.is_free(now_ms, timings) => {
                return Ok(Choice::Claim { id, expected: Some(row.clone()) });
            }
            Some(row) => {
                let free_at_ms = row.free_at_ms(timings);
                if first_free.is_none_or(|(_, earliest)| free_at_ms < earliest) {
                    first_free = Some((id, free_at_ms));
                }
            }
        }
    }
    // Every ID has a row and none is free (the block is not empty, so there is a first one).
    let (id, free_at_ms) = first_free.unwrap_or((base, now_ms));
    Ok(Choice::Wait { id, free_at_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMINGS: LeaseTimings = LeaseTimings { ttl_ms: 15_000, quarantine_ms: 60_000 };

    fn held(id: u16, holder: &str, renewed_at_ms: u64) -> LeaseRow {
        LeaseRow { id, holder: holder.into(), renewed_at_ms, released_at_ms: None }
    }

    fn released(id: u16, holder: &str, renewed_at_ms: u64, released_at_ms: u64) -> LeaseRow {
        LeaseRow { id, holder: holder.into(), renewed_at_ms, released_at_ms: Some(released_at_ms) }
    }

    #[test]
    fn an_empty_store_gives_the_lowest_id() {
        assert_eq!(choose(10, 4, &[], "router-1#1", 1_000, TIMINGS), Ok(Choice::Claim { id: 10, expected: None }));
    }

    #[test]
    fn held_ids_are_skipped_and_a_gap_is_taken() {
        let rows = [held(10, "router-0#a", 1_000), held(12, "router-2#c", 1_000)];
        assert_eq!(choose(10, 4, &rows, "router-1#b", 2_000, TIMINGS), Ok(Choice::Claim { id: 11, expected: None }));
    }

    #[test]
    fn a_released_id_waits_out_the_quarantine() {
        let rows = [released(10, "router-0#a", 1_000, 5_000)];
        // Replaced at the same ordinal right away: the predecessor's ID is not handed out again yet.
        assert_eq!(choose(10, 1, &rows, "router-0#b", 5_001, TIMINGS), Ok(Choice::Wait { id: 10, free_at_ms: 65_000 }));
        assert_eq!(
            choose(10, 1, &rows, "router-0#b", 64_999, TIMINGS),
            Ok(Choice::Wait { id: 10, free_at_ms: 65_000 })
        );
        assert_eq!(
            choose(10, 1, &rows, "router-0#b", 65_000, TIMINGS),
            Ok(Choice::Claim { id: 10, expected: Some(rows[0].clone()) })
        );
        // With a spare ID, the replacement takes the spare at once.
        assert_eq!(choose(10, 2, &rows, "router-0#b", 5_001, TIMINGS), Ok(Choice::Claim { id: 11, expected: None }));
    }

    #[test]
    fn a_crashed_holders_id_is_free_after_ttl_and_quarantine() {
        let rows = [held(3, "router-0#a", 1_000)];
        let free_at_ms = 1_000 + 15_000 + 60_000;
        assert_eq!(choose(3, 1, &rows, "router-1#b", free_at_ms - 1, TIMINGS), Ok(Choice::Wait { id: 3, free_at_ms }));
        assert_eq!(
            choose(3, 1, &rows, "router-1#b", free_at_ms, TIMINGS),
            Ok(Choice::Claim { id: 3, expected: Some(rows[0].clone()) })
        );
    }

    #[test]
    fn a_release_ends_the_wait_earlier_than_expiry_never_later() {
        let row = released(0, "a#1", 1_000, 70_000);
        // Released long after the last renewal (a holder that went on past its lease): the expiry counts.
        assert_eq!(row.free_at_ms(TIMINGS), 76_000);
        let row = released(0, "a#1", 1_000, 2_000);
        assert_eq!(row.free_at_ms(TIMINGS), 62_000);
    }

    #[test]
    fn the_same_pods_free_id_is_preferred() {
        let rows = [
            released(5, "router-3#old", 1_000, 2_000),
            released(6, "router-1#old", 1_000, 2_000),
            released(7, "router-2#old", 1_000, 2_000),
        ];
        let later = 2_000 + 60_000;
        assert_eq!(
            choose(5, 3, &rows, "router-2#new", later, TIMINGS),
            Ok(Choice::Claim { id: 7, expected: Some(rows[2].clone()) })
        );
        // Not yet free: the pod takes the lowest free ID instead (here none is free, so it waits).
        assert_eq!(choose(5, 3, &rows, "router-2#new", 3_000, TIMINGS), Ok(Choice::Wait { id: 5, free_at_ms: 62_000 }));
        // Another pod takes the lowest free one.
        assert_eq!(
            choose(5, 3, &rows, "router-9#new", later, TIMINGS),
            Ok(Choice::Claim { id: 5, expected: Some(rows[0].clone()) })
        );
    }

    #[test]
    fn the_wait_names_the_earliest_free_id() {
        let rows = [held(1, "a#1", 50_000), released(2, "b#1", 1_000, 10_000), held(3, "c#1", 20_000)];
        assert_eq!(choose(1, 3, &rows, "d#1", 30_000, TIMINGS), Ok(Choice::Wait { id: 2, free_at_ms: 70_000 }));
    }

    #[test]
    fn an_id_this_incarnation_holds_is_renewed_not_claimed() {
        let rows = [held(4, "a#1", 1_000), held(5, "me#1", 1_000)];
        assert_eq!(choose(4, 2, &rows, "me#1", 500_000, TIMINGS), Ok(Choice::Held { id: 5 }));
    }

    #[test]
    fn rows_outside_the_block_are_ignored() {
        let rows = [held(9, "me#1", 1_000), held(20, "a#1", 1_000)];
        assert_eq!(choose(20, 2, &rows, "me#1", 1_000, TIMINGS), Ok(Choice::Claim { id: 21, expected: None }));
    }

    #[test]
    fn blocks_and_timings_are_checked() {
        assert_eq!(choose(0, 0, &[], "a#1", 0, TIMINGS), Err(LeaseError::EmptyBlock { base: 0 }));
        assert_eq!(check_block(1020, 4), Ok(()));
        assert_eq!(check_block(1020, 5), Err(LeaseError::BlockOutOfRange { base: 1020, count: 5 }));
        assert_eq!(LeaseTimings::new(10, 0), Err(LeaseError::TtlTooShort { ttl_ms: 10 }));
        assert_eq!(LeaseTimings::new(15_000, 60_000).map(|timings| timings.renew_every_ms()), Ok(5_000));
    }

    #[test]
    fn holder_names_carry_the_pod() {
        let holder = incarnation("parley-eu-router-2", 0xab);
        assert_eq!(holder, "parley-eu-router-2#00000000000000ab");
        assert_eq!(holder_pod(&holder), "parley-eu-router-2");
        assert_eq!(holder_pod("bare"), "bare");
    }
}
