//! Pure domain code shared by every Parley component.
//!
//! Nothing here performs I/O or depends on kube, Kafka, Cassandra or Redis clients, so every decision can be
//! unit-tested in isolation:
//!
//! - [`protocol`]: the v1 wire frames (one tagged enum per direction) and their pure decoder;
//! - [`snowflake`]: the 64-bit ID generator (41 bits of milliseconds, 10 bits of machine id, 12 bits of
//!   sequence) that never goes backwards;
//! - [`machine_lease`]: which machine ID of a block a process may lease, with a quarantine after each lease;
//! - [`conversation`]: user and channel ids, the deterministic DM id, and validation;
//! - [`sequencer`]: the per-channel single-writer sequence and send idempotency decisions;
//! - [`ratelimit`]: a token bucket driven by an explicit clock;
//! - [`delivery`]: per-connection ACK, retransmit and dedup decisions;
//! - [`presence`]: presence and the user→instance registry, fenced by instance epoch and lease;
//! - [`access`]: who may join, post, invite, remove, ban and set roles in a group channel, and DM blocks.

pub mod access;
pub mod conversation;
pub mod delivery;
pub mod machine_lease;
pub mod partition;
pub mod presence;
pub mod protocol;
pub mod ratelimit;
pub mod sequencer;
pub mod snowflake;

pub use conversation::{ChannelId, ChannelKind, UserId};
