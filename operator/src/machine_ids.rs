//! Snowflake machine-ID allocation: the 10-bit space (1,024 IDs) of one ChatCluster is shared by its Regions,
//! each holding one contiguous block sized for the most gateway pods plus the most router pods it may run
//! (`gateway.maxReplicas` and `router.maxReplicas`, or their defaults). The block depends on those bounds only, not
//! on the replica counts: scaling within them keeps the block, and so every pod's machine ID.
//!
//! The functions here are pure: they change a [`MachineIdAllocation`] (persisted in the ChatCluster's status and
//! written back with optimistic concurrency) and take the current time as an argument. Invariants:
//!
//! - no two blocks, held or quarantined, share an ID;
//! - a released block (a Region deleted, shrunk or moved) is quarantined and no ID of it is handed out again
//!   before the quarantine has passed since its release;
//! - when no free run is large enough, the Region gets [`Error::MachineIdsExhausted`] and nothing changes.
//!
//! Gateway pod `i` of a Region uses ID `start + i`; router pod `j` uses `start + G + j`, where `G` is the gateway
//! bound ([`parley_crds::region::RegionGateway::max_replicas_bound`]).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use parley_crds::common::{AllocatedBlock, QuarantinedBlock};
use parley_crds::region::RegionSpec;
use parley_crds::{MachineIdAllocation, MachineIdBlock, MACHINE_ID_SPACE};

use crate::error::Error;

/// The number of IDs a Region needs: the most gateway pods plus the most router pods its spec allows
/// ([`parley_crds::region::RegionGateway::max_replicas_bound`], [`parley_crds::region::RegionRouter::max_replicas_bound`]).
/// It does not change when `replicas` (or `minReplicas`) changes within those bounds.
pub fn block_size(spec: &RegionSpec) -> u32 {
    let gateways = u32::try_from(spec.gateway.max_replicas_bound()).unwrap_or(0);
    let routers = u32::try_from(spec.router.max_replicas_bound()).unwrap_or(0);
    gateways + routers
}

/// The block held by a Region, if any.
pub fn block_of(state: &MachineIdAllocation, region: &str) -> Option<MachineIdBlock> {
    state.blocks.iter().find(|held| held.region == region).map(|held| held.block)
}

/// The number of IDs held by Regions (quarantined ones excluded).
pub fn allocated(state: &MachineIdAllocation) -> u32 {
    state.blocks.iter().map(|held| u32::from(held.block.size)).sum()
}

/// Drops quarantined blocks whose quarantine has passed.
pub fn expire(state: &mut MachineIdAllocation, now: Timestamp, quarantine: Duration) {
    state.quarantined.retain(|released| !quarantine_over(&released.released_at, now, quarantine));
}

fn quarantine_over(released_at: &Time, now: Timestamp, quarantine: Duration) -> bool {
    let quarantine_ms = i64::try_from(quarantine.as_millis()).unwrap_or(i64::MAX);
    now.as_millisecond().saturating_sub(released_at.0.as_millisecond()) >= quarantine_ms
}

/// Makes sure `region` holds a block of exactly `size` IDs and returns it.
///
/// An existing block of the right size is kept. A smaller size shrinks the block in place (its tail is
/// quarantined). A larger size grows it in place if the IDs after it are free, and otherwise moves the Region to
/// the lowest free run that fits, quarantining its old block. A new Region gets the lowest free run that fits.
pub fn ensure(
    state: &mut MachineIdAllocation,
    region: &str,
    size: u32,
    now: Timestamp,
    quarantine: Duration,
) -> Result<MachineIdBlock, Error> {
    let size = match u16::try_from(size) {
        Ok(size) if (1..=MACHINE_ID_SPACE).contains(&size) => size,
        _ => return Err(Error::InvalidMachineIdBlock { region: region.to_owned(), size, needed: size }),
    };
    expire(state, now, quarantine);
    let released_at = Time(now);
    let current = state.blocks.iter().position(|held| held.region == region);
    let Some(index) = current else {
        let start = first_fit(&occupied(state, None), size).ok_or_else(|| exhausted(state, region, size))?;
        let block = MachineIdBlock { start, size };
        state.blocks.push(AllocatedBlock { region: region.to_owned(), block });
        return Ok(block);
    };
    let held = state.blocks[index].block;
    if size == held.size {
        return Ok(held);
    }
    if size < held.size {
        let kept = MachineIdBlock { start: held.start, size };
        let tail = MachineIdBlock { start: held.start + size, size: held.size - size };
        state.blocks[index].block = kept;
        state.quarantined.push(QuarantinedBlock { region: region.to_owned(), block: tail, released_at });
        return Ok(kept);
    }
    let grown = MachineIdBlock { start: held.start, size };
    let others = occupied(state, Some(region));
    if grown.end() <= u32::from(MACHINE_ID_SPACE) && !others.iter().any(|taken| taken.overlaps(&grown)) {
        state.blocks[index].block = grown;
        return Ok(grown);
    }
    let start = first_fit(&occupied(state, None), size).ok_or_else(|| exhausted(state, region, size))?;
    let moved = MachineIdBlock { start, size };
    state.blocks[index].block = moved;
    state.quarantined.push(QuarantinedBlock { region: region.to_owned(), block: held, released_at });
    Ok(moved)
}

/// Releases the block of `region` (its finalizer runs this when the Region is deleted): the block is
/// quarantined from `now`. Returns the released block, or `None` when the Region held none.
pub fn release(state: &mut MachineIdAllocation, region: &str, now: Timestamp) -> Option<MachineIdBlock> {
    let index = state.blocks.iter().position(|held| held.region == region)?;
    let held = state.blocks.remove(index);
    state.quarantined.push(QuarantinedBlock { region: held.region, block: held.block, released_at: Time(now) });
    Some(held.block)
}

/// Every block that may not be handed out: held blocks (except those of `except_region`, whose own block may
/// grow in place) and quarantined blocks, sorted by start.
fn occupied(state: &MachineIdAllocation, except_region: Option<&str>) -> Vec<MachineIdBlock> {
    let mut taken: Vec<MachineIdBlock> = state
        .blocks
        .iter()
        .filter(|held| Some(held.region.as_str()) != except_region)
        .map(|held| held.block)
        .chain(state.quarantined.iter().map(|released| released.block))
        .collect();
    taken.sort_by_key(|block| block.start);
    taken
}

/// Free runs between the taken blocks, as `(start, length)`, lowest first.
fn free_runs(taken: &[MachineIdBlock]) -> Vec<(u16, u16)> {
    let mut runs = Vec::new();
    let mut cursor: u32 = 0;
    for block in taken {
        let start = u32::from(block.start);
        if start > cursor {
            runs.push((cursor, start - cursor));
        }
        cursor = cursor.max(block.end());
    }
    let space = u32::from(MACHINE_ID_SPACE);
    if cursor < space {
        runs.push((cursor, space - cursor));
    }
    runs.into_iter()
        .filter_map(|(start, length)| Some((u16::try_from(start).ok()?, u16::try_from(length).ok()?)))
        .collect()
}

fn first_fit(taken: &[MachineIdBlock], size: u16) -> Option<u16> {
    free_runs(taken).into_iter().find(|&(_, length)| length >= size).map(|(start, _)| start)
}

fn exhausted(state: &MachineIdAllocation, region: &str, requested: u16) -> Error {
    let largest_free = free_runs(&occupied(state, None)).into_iter().map(|(_, length)| length).max().unwrap_or(0);
    Error::MachineIdsExhausted { region: region.to_owned(), requested, largest_free }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUARANTINE: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp")
    }

    #[test]
    fn regions_get_contiguous_disjoint_blocks() {
        let mut state = MachineIdAllocation::default();
        let eu = ensure(&mut state, "eu", 44, at(0), QUARANTINE).expect("eu");
        let us = ensure(&mut state, "us", 64, at(0), QUARANTINE).expect("us");
        assert_eq!(eu, MachineIdBlock { start: 0, size: 44 });
        assert_eq!(us, MachineIdBlock { start: 44, size: 64 });
        assert_eq!(ensure(&mut state, "eu", 44, at(1), QUARANTINE), Ok(eu), "idempotent");
        assert_eq!(allocated(&state), 108);
    }

    #[test]
    fn released_block_is_quarantined_then_reused() {
        let mut state = MachineIdAllocation::default();
        ensure(&mut state, "eu", 1000, at(0), QUARANTINE).expect("eu");
        assert_eq!(release(&mut state, "eu", at(10)), Some(MachineIdBlock { start: 0, size: 1000 }));
        let error = ensure(&mut state, "us", 100, at(69), QUARANTINE).expect_err("still quarantined");
        assert_eq!(error.reason(), "MachineIdsExhausted");
        assert_eq!(error, Error::MachineIdsExhausted { region: "us".into(), requested: 100, largest_free: 24 });
        assert_eq!(ensure(&mut state, "us", 100, at(70), QUARANTINE), Ok(MachineIdBlock { start: 0, size: 100 }));
        assert!(state.quarantined.is_empty());
    }

    #[test]
    fn shrink_quarantines_the_tail_and_grow_moves_when_blocked() {
        let mut state = MachineIdAllocation::default();
        ensure(&mut state, "eu", 20, at(0), QUARANTINE).expect("eu");
        ensure(&mut state, "us", 10, at(0), QUARANTINE).expect("us");
        assert_eq!(ensure(&mut state, "eu", 15, at(1), QUARANTINE), Ok(MachineIdBlock { start: 0, size: 15 }));
        assert_eq!(state.quarantined[0].block, MachineIdBlock { start: 15, size: 5 });
        // Growing back would reuse its own quarantined tail: the Region moves instead.
        assert_eq!(ensure(&mut state, "eu", 20, at(2), QUARANTINE), Ok(MachineIdBlock { start: 30, size: 20 }));
        // us can grow in place into free IDs after it.
        let mut fresh = MachineIdAllocation::default();
        ensure(&mut fresh, "a", 10, at(0), QUARANTINE).expect("a");
        assert_eq!(ensure(&mut fresh, "a", 30, at(0), QUARANTINE), Ok(MachineIdBlock { start: 0, size: 30 }));
    }

    #[test]
    fn invalid_sizes() {
        let mut state = MachineIdAllocation::default();
        for size in [0, 1025] {
            let error = ensure(&mut state, "eu", size, at(0), QUARANTINE).expect_err("invalid");
            assert_eq!(error.reason(), "InvalidMachineIdBlock");
        }
        assert_eq!(ensure(&mut state, "eu", 1024, at(0), QUARANTINE), Ok(MachineIdBlock { start: 0, size: 1024 }));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut state = MachineIdAllocation::default();
        ensure(&mut state, "eu", 8, at(0), QUARANTINE).expect("eu");
        ensure(&mut state, "us", 8, at(0), QUARANTINE).expect("us");
        release(&mut state, "eu", at(5));
        let json = serde_json::to_value(&state).expect("serialize");
        assert_eq!(json["quarantined"][0]["releasedAt"], "2027-01-15T08:00:05Z");
        let back: MachineIdAllocation = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, state);
    }
}
