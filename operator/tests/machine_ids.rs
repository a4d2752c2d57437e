//! Property test of the machine-ID allocator: random sequences of Region add/resize/remove and time passing never
//! produce overlapping blocks, never hand out an ID inside its quarantine, and report exhaustion only when no
//! free run is large enough.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use parley_crds::{MachineIdAllocation, MachineIdBlock, MACHINE_ID_SPACE};
use parley_operator::{machine_ids, Error};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Add a Region, or resize it (its max gateways + routers changed).
    Ensure { region: usize, size: u32 },
    /// Delete a Region (its finalizer releases the block).
    Release { region: usize },
    /// Time passes.
    Advance { seconds: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6usize, prop_oneof![3 => 1..80u32, 1 => 80..600u32]).prop_map(|(region, size)| Op::Ensure { region, size }),
        2 => (0..6usize).prop_map(|region| Op::Release { region }),
        2 => (0..150i64).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

fn region_name(index: usize) -> String {
    format!("region-{index}")
}

/// Owner of each live ID.
fn live_ids(state: &MachineIdAllocation) -> HashMap<u16, String> {
    let mut ids = HashMap::new();
    for held in &state.blocks {
        for id in held.block.start..held.block.start + held.block.size {
            ids.insert(id, held.region.clone());
        }
    }
    ids
}

fn check_disjoint(state: &MachineIdAllocation) -> Result<(), TestCaseError> {
    let blocks: Vec<MachineIdBlock> =
        state.blocks.iter().map(|h| h.block).chain(state.quarantined.iter().map(|q| q.block)).collect();
    for (i, a) in blocks.iter().enumerate() {
        prop_assert!(a.size >= 1 && a.end() <= u32::from(MACHINE_ID_SPACE), "block {a:?} out of the space");
        for b in &blocks[i + 1..] {
            prop_assert!(!a.overlaps(b), "blocks overlap: {a:?} and {b:?} in {state:?}");
        }
    }
    let mut regions: Vec<&str> = state.blocks.iter().map(|h| h.region.as_str()).collect();
    regions.sort_unstable();
    let before = regions.len();
    regions.dedup();
    prop_assert_eq!(before, regions.len(), "a Region holds two blocks");
    Ok(())
}

/// Whether some run of `size` IDs is free of every held and quarantined block.
fn free_run_exists(state: &MachineIdAllocation, size: u16) -> bool {
    let mut taken = vec![false; usize::from(MACHINE_ID_SPACE)];
    for block in state.blocks.iter().map(|h| h.block).chain(state.quarantined.iter().map(|q| q.block)) {
        for id in block.start..block.start + block.size {
            taken[usize::from(id)] = true;
        }
    }
    let mut run = 0u16;
    for used in taken {
        run = if used { 0 } else { run + 1 };
        if run >= size {
            return true;
        }
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn blocks_never_overlap_and_quarantine_is_honoured(
        quarantine_seconds in 5..120u64,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let quarantine = Duration::from_secs(quarantine_seconds);
        let quarantine_ms = i64::try_from(quarantine.as_millis()).expect("ms");
        let mut state = MachineIdAllocation::default();
        let mut now = Timestamp::from_second(1_800_000_000).expect("time");
        // When each ID last stopped being held.
        let mut released_at: HashMap<u16, Timestamp> = HashMap::new();
        for op in ops {
            let before = live_ids(&state);
            match op {
                Op::Advance { seconds } => {
                    now = Timestamp::from_second(now.as_second() + seconds).expect("time");
                    machine_ids::expire(&mut state, now, quarantine);
                }
                Op::Release { region } => {
                    let name = region_name(region);
                    let held = machine_ids::block_of(&state, &name);
                    prop_assert_eq!(machine_ids::release(&mut state, &name, now), held);
                    prop_assert_eq!(machine_ids::block_of(&state, &name), None);
                }
                Op::Ensure { region, size } => {
                    let name = region_name(region);
                    let unchanged = state.clone();
                    match machine_ids::ensure(&mut state, &name, size, now, quarantine) {
                        Ok(block) => {
                            prop_assert_eq!(u32::from(block.size), size);
                            prop_assert_eq!(machine_ids::block_of(&state, &name), Some(block));
                        }
                        Err(Error::MachineIdsExhausted { requested, .. }) => {
                            prop_assert_eq!(u32::from(requested), size);
                            prop_assert_eq!(&state.blocks, &unchanged.blocks, "a failed ensure changes no block");
                            prop_assert!(!free_run_exists(&state, requested), "exhausted although a free run of {} exists: {:?}", requested, state);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {other}"),
                    }
                }
            }
            check_disjoint(&state)?;
            let after = live_ids(&state);
            for (id, owner) in &before {
                if after.get(id) != Some(owner) {
                    released_at.insert(*id, now);
                }
            }
            for (id, owner) in &after {
                if before.get(id) == Some(owner) {
                    continue;
                }
                if let Some(released) = released_at.get(id) {
                    let waited = now.as_millisecond() - released.as_millisecond();
                    prop_assert!(
                        waited >= quarantine_ms,
                        "id {} handed to {} {} ms after its release (quarantine {} ms)", id, owner, waited, quarantine_ms
                    );
                }
            }
        }
    }
}
