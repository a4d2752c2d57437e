//! Snowflake IDs: 41 bits of milliseconds since a configurable epoch, 10 bits of machine id and 12 bits of
//! per-millisecond sequence, in a positive `i64`-compatible `u64`.
//!
//! The generator is pure: the caller passes the current time. It never emits a duplicate or a smaller id. When
//! the clock steps back it keeps issuing from the last millisecond it used while that millisecond's sequence
//! lasts, and otherwise refuses with [`SnowflakeError::ClockBehind`] (the caller waits and retries). When the
//! sequence of a millisecond runs out it refuses with [`SnowflakeError::SequenceExhausted`] until the clock
//! reaches the next millisecond.

use thiserror::Error;

/// Bits of the per-millisecond sequence.
pub const SEQUENCE_BITS: u32 = 12;
/// Bits of the machine id.
pub const MACHINE_BITS: u32 = 10;
/// Bits of the timestamp.
pub const TIME_BITS: u32 = 41;
/// Largest machine id (1,023).
pub const MAX_MACHINE_ID: u16 = (1 << MACHINE_BITS) - 1;
const MAX_SEQUENCE: u16 = (1 << SEQUENCE_BITS) - 1;
const MAX_TIME: u64 = (1 << TIME_BITS) - 1;

/// Default epoch: 2025-01-01T00:00:00Z in Unix milliseconds.
pub const DEFAULT_EPOCH_MS: u64 = 1_735_689_600_000;

/// Why an id could not be issued now.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnowflakeError {
    /// The machine id does not fit in 10 bits.
    #[error("machine id {0} is out of range (0..=1023)")]
    MachineIdOutOfRange(u16),
    /// The clock is before the configured epoch.
    #[error("clock {now_ms} is before the snowflake epoch {epoch_ms}")]
    BeforeEpoch {
        /// Current Unix milliseconds.
        now_ms: u64,
        /// Configured epoch.
        epoch_ms: u64,
    },
    /// The 41-bit timestamp space is used up (about 69 years after the epoch).
    #[error("snowflake timestamp space exhausted")]
    TimeExhausted,
    /// The clock went backwards past what the last millisecond's sequence can absorb; retry at `retry_at_ms`.
    #[error("clock moved backwards by {behind_ms} ms; retry at {retry_at_ms}")]
    ClockBehind {
        /// How far behind the last used millisecond the clock is.
        behind_ms: u64,
        /// Unix milliseconds at which a retry can succeed.
        retry_at_ms: u64,
    },
    /// All 4,096 ids of the current millisecond are used; retry at `retry_at_ms`.
    #[error("sequence exhausted for this millisecond; retry at {retry_at_ms}")]
    SequenceExhausted {
        /// Unix milliseconds at which a retry can succeed.
        retry_at_ms: u64,
    },
}

impl SnowflakeError {
    /// When the caller may retry, if the condition is temporary.
    pub fn retry_at_ms(&self) -> Option<u64> {
        match self {
            SnowflakeError::ClockBehind { retry_at_ms, .. } | SnowflakeError::SequenceExhausted { retry_at_ms } => {
                Some(*retry_at_ms)
            }
            _ => None,
        }
    }
}

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnowflakeParts {
    /// Unix milliseconds.
    pub unix_ms: u64,
    /// Machine id.
    pub machine_id: u16,
    /// Sequence within the millisecond.
    pub sequence: u16,
}

/// Splits an id into its parts.
pub fn decompose(id: u64, epoch_ms: u64) -> SnowflakeParts {
    SnowflakeParts {
        unix_ms: (id >> (MACHINE_BITS + SEQUENCE_BITS)) + epoch_ms,
        machine_id: ((id >> SEQUENCE_BITS) & u64::from(MAX_MACHINE_ID)) as u16,
        sequence: (id & u64::from(MAX_SEQUENCE)) as u16,
    }
}

/// A generator for one machine id. Not thread-safe by itself; wrap it in a mutex or own it in one task.
#[derive(Debug, Clone)]
pub struct Snowflake {
    epoch_ms: u64,
    machine_id: u16,
    last_ms: u64,
    sequence: u16,
    /// How far back the clock may step before we refuse instead of borrowing from the last millisecond.
    issued: bool,
}

impl Snowflake {
    /// A generator for `machine_id` with ids relative to `epoch_ms` (Unix milliseconds).
    pub fn new(machine_id: u16, epoch_ms: u64) -> Result<Self, SnowflakeError> {
        if machine_id > MAX_MACHINE_ID {
            return Err(SnowflakeError::MachineIdOutOfRange(machine_id));
        }
        Ok(Self { epoch_ms, machine_id, last_ms: 0, sequence: 0, issued: false })
    }

    /// Resumes after a restart: ids will be strictly greater than `last_id`.
    pub fn resume_after(&mut self, last_id: u64) {
        let parts = decompose(last_id, self.epoch_ms);
        let relative = parts.unix_ms.saturating_sub(self.epoch_ms);
        if !self.issued || relative > self.last_ms || (relative == self.last_ms && parts.sequence > self.sequence) {
            self.last_ms = relative;
            self.sequence = parts.sequence;
            self.issued = true;
        }
    }

    /// The configured machine id.
    pub fn machine_id(&self) -> u16 {
        self.machine_id
    }

    /// Issues the next id given the current Unix time in milliseconds.
    pub fn next_id(&mut self, now_unix_ms: u64) -> Result<u64, SnowflakeError> {
        if now_unix_ms < self.epoch_ms {
            return Err(SnowflakeError::BeforeEpoch { now_ms: now_unix_ms, epoch_ms: self.epoch_ms });
        }
        let now = now_unix_ms - self.epoch_ms;
        if now > MAX_TIME {
            return Err(SnowflakeError::TimeExhausted);
        }
        if !self.issued || now > self.last_ms {
            self.last_ms = now;
            self.sequence = 0;
            self.issued = true;
        } else if self.sequence < MAX_SEQUENCE {
            // Same millisecond, or the clock stepped back: keep using the last millisecond while it lasts.
            self.sequence += 1;
        } else if now < self.last_ms {
            return Err(SnowflakeError::ClockBehind {
                behind_ms: self.last_ms - now,
                retry_at_ms: self.last_ms + 1 + self.epoch_ms,
            });
        } else {
            return Err(SnowflakeError::SequenceExhausted { retry_at_ms: self.last_ms + 1 + self.epoch_ms });
        }
        Ok((self.last_ms << (MACHINE_BITS + SEQUENCE_BITS))
            | (u64::from(self.machine_id) << SEQUENCE_BITS)
            | u64::from(self.sequence))
    }
}

/// The machine id of a pod: `machine_id` when no block is assigned, else the block's `base` plus the pod's
/// ordinal `index`, which must lie inside the block (`count` ids) and the 10-bit space.
pub fn machine_id_from_block(
    machine_id: u16,
    base: Option<u16>,
    count: Option<u16>,
    index: Option<u16>,
) -> Result<u16, String> {
    let Some(base) = base else {
        return Ok(machine_id);
    };
    let index = index.ok_or("PARLEY_MACHINE_ID_BASE is set but PARLEY_POD_INDEX is not")?;
    if let Some(count) = count {
        if index >= count {
            return Err(format!("pod index {index} is outside the machine-id block of {count} ids starting at {base}"));
        }
    }
    let id = u32::from(base) + u32::from(index);
    if id > u32::from(MAX_MACHINE_ID) {
        return Err(format!("machine id {id} (block {base} + pod {index}) is above {MAX_MACHINE_ID}"));
    }
    Ok(id as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_round_trips() {
        let mut generator = Snowflake::new(513, DEFAULT_EPOCH_MS).expect("valid machine id");
        let id = generator.next_id(DEFAULT_EPOCH_MS + 12_345).expect("id");
        assert_eq!(
            decompose(id, DEFAULT_EPOCH_MS),
            SnowflakeParts { unix_ms: DEFAULT_EPOCH_MS + 12_345, machine_id: 513, sequence: 0 }
        );
        assert!(id < (1 << 63), "fits a signed 64-bit integer");
    }

    #[test]
    fn rejects_large_machine_id() {
        assert_eq!(Snowflake::new(1024, 0).err(), Some(SnowflakeError::MachineIdOutOfRange(1024)));
    }

    #[test]
    fn sequence_exhaustion_refuses_until_next_millisecond() {
        let mut generator = Snowflake::new(1, 0).expect("generator");
        for _ in 0..4096 {
            generator.next_id(100).expect("within the millisecond");
        }
        assert_eq!(generator.next_id(100), Err(SnowflakeError::SequenceExhausted { retry_at_ms: 101 }));
        assert!(generator.next_id(101).is_ok());
    }

    #[test]
    fn clock_step_back_borrows_then_refuses() {
        let mut generator = Snowflake::new(1, 0).expect("generator");
        let first = generator.next_id(1_000).expect("id");
        let second = generator.next_id(900).expect("borrowed from the last millisecond");
        assert!(second > first);
        for _ in 0..4094 {
            generator.next_id(900).expect("borrowed");
        }
        assert_eq!(generator.next_id(900), Err(SnowflakeError::ClockBehind { behind_ms: 100, retry_at_ms: 1_001 }));
    }

    #[test]
    fn resume_after_restart_stays_above_last_id() {
        let mut before = Snowflake::new(7, 0).expect("generator");
        let last = before.next_id(5_000).expect("id");
        let mut after = Snowflake::new(7, 0).expect("generator");
        after.resume_after(last);
        assert!(after.next_id(4_000).expect("id") > last, "clock behind after restart");
    }

    proptest! {
        /// Whatever the clock does (forward, stuck, backward), issued ids are strictly increasing, hence unique.
        #[test]
        fn ids_strictly_increase(steps in proptest::collection::vec(-50i64..50, 1..3000)) {
            let mut generator = Snowflake::new(3, 1_000).expect("generator");
            let mut clock: i64 = 10_000;
            let mut last: Option<u64> = None;
            for step in steps {
                clock = (clock + step).max(1_000);
                match generator.next_id(clock as u64) {
                    Ok(id) => {
                        if let Some(previous) = last { prop_assert!(id > previous, "{id} <= {previous}"); }
                        last = Some(id);
                    }
                    Err(error) => prop_assert!(error.retry_at_ms().is_some(), "unexpected {error}"),
                }
            }
        }

        /// Many ids in the same millisecond: never a duplicate, and refusal exactly after 4,096.
        #[test]
        fn burst_never_duplicates(count in 1usize..6000) {
            let mut generator = Snowflake::new(9, 0).expect("generator");
            let mut seen = std::collections::HashSet::new();
            for index in 0..count {
                match generator.next_id(42) {
                    Ok(id) => prop_assert!(seen.insert(id)),
                    Err(_) => { prop_assert_eq!(index, 4096); break; }
                }
            }
        }
    }
}
