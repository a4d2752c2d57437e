//! The Parley router: it accepts sends, orders them per channel, makes them durable, and fans them out.
//!
//! - [`backend`] defines the traits every storage engine implements: the durable [`backend::MessageLog`],
//!   the [`backend::MessageStore`] for history, the [`backend::MembershipStore`] for channels and members, and
//!   the [`pubsub::PubSub`] used for delivery. Each has an embedded driver (this crate) and a real-engine driver.
//! - [`embedded`] is the embedded driver: one redb database on local disk, synced on every commit, which is at
//!   once the log and the store.
//! - [`pubsub`] holds the pub/sub trait, its in-process driver, and the event envelope gateways decode.
//! - [`presence`] holds the [`presence::PresenceStore`] trait (the fenced presence book and user→gateway
//!   registry of [`parley_core::presence`], async and batched) and its embedded driver.
//! - [`kafka`] holds the Kafka driver of [`backend::MessageLog`] (a fenced transactional writer per partition)
//!   and the store writer that copies the log into a [`backend::MessageStore`].
//! - [`redis`] holds the Redis drivers of [`pubsub::PubSub`] and [`presence::PresenceStore`].
//! - [`cassandra`] holds the Cassandra/ScyllaDB driver of [`backend::MessageStore`] and
//!   [`backend::MembershipStore`], with its versioned schema.
//! - [`feed`] holds the in-memory feeds of large channels (fan-out on read).
//! - [`router`] is the single writer: a task that takes commands in batches, decides order with
//!   [`parley_core::sequencer`], writes the batch durably, and only then confirms and publishes.
//! - [`service`] is the handle callers use ([`Router`]: the in-process writer or a client of a `parley-router`
//!   process) and the router's internal HTTP API that the `parley-router` binary serves.
//! - [`error`] is the crate's error type, which maps to the protocol's stable error codes.

pub mod backend;
pub mod cassandra;
pub mod embedded;
pub mod error;
pub mod feed;
pub mod kafka;
pub mod presence;
pub mod pubsub;
pub mod redis;
pub mod router;
pub mod service;

pub use error::{BackendError, RouterError};
pub use router::{DurableMessage, LocalRouter, RouterConfig};
pub use service::{RemoteRouter, Router};
