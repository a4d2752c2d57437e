//! The Parley bus: how the writer reaches gateways, and how gateways share presence.
//!
//! - [`pubsub`]: the [`pubsub::PubSub`] trait (topics `ch:<channel>`, `gw:<instance>`, `gw`), the event envelope
//!   ([`pubsub::Event`]) that the writer encodes once and gateways decode, and the in-process driver.
//! - [`presence`]: the [`presence::PresenceStore`] trait (the fenced presence book and user→gateway registry of
//!   [`parley_core::presence`], async and batched) and its embedded driver.
//! - [`redis`]: the Redis drivers of both traits, standalone or Redis Cluster.
//!
//! The router publishes through this crate and gateways subscribe through it; neither needs the other's crate.

pub mod presence;
pub mod pubsub;
pub mod redis;
