//! The Parley bus: how the writer reaches gateways, and how gateways share presence.
//!
//! - [`pubsub`]: the [`pubsub::PubSub`] trait (topics `ch:<channel>`, `gw:<instance>`, `gw`), the event envelope
//!   ([`pubsub::Event`]) that the writer encodes once and gateways decode, and the in-process driver.
//! - [`presence`]: the [`presence::PresenceStore`] trait (the fenced presence book and user→gateway registry of
//!   [`parley_core::presence`], async and batched) and its embedded driver.
//! - [`revocation`]: the [`revocation::RevocationStore`] trait (which users' tokens issued before a time are
//!   revoked, shared by every gateway and kept across restarts) and its embedded driver (in memory, persisted in a
//!   file of the data directory).
//! - [`redis`]: the Redis drivers of the three traits, standalone or Redis Cluster, over TLS (`rediss://`) and with
//!   ACL credentials when configured.
//! - [`args`]: the Redis settings both binaries flatten into their command line ([`args::RedisArgs`]), which make a
//!   [`redis::RedisConfig`].
//!
//! The router publishes through this crate and gateways subscribe through it; neither needs the other's crate.

pub mod args;
pub mod mirrored;
pub mod presence;
pub mod pubsub;
pub mod redis;
pub mod revocation;
