//! The Parley router: it accepts sends, orders them per channel, makes them durable, and fans them out.
//!
//! What callers see of a router (the operations, their values and errors, the remote client) is `parley-api`;
//! the pub/sub and presence it publishes to is `parley-bus`. This crate holds the writer and the storage engines:
//!
//! - [`backend`] defines the traits every storage engine implements: the durable [`backend::MessageLog`],
//!   the [`backend::MessageStore`] for history, and the [`backend::MembershipStore`] for channels and members.
//!   Each has an embedded driver (this crate) and a real-engine driver (Kafka, Cassandra/ScyllaDB).
//! - [`embedded`] is the embedded driver: one redb database on local disk, synced on every commit, which is at
//!   once the log and the store.
//! - [`kafka`] holds the Kafka driver of [`backend::MessageLog`] (a fenced transactional writer per partition)
//!   and the store writer that copies the log into a [`backend::MessageStore`].
//! - [`cassandra`] holds the Cassandra/ScyllaDB driver of [`backend::MessageStore`] and
//!   [`backend::MembershipStore`], with its versioned schema.
//! - [`feed`] holds the in-memory feeds of large channels (fan-out on read).
//! - [`router`] is the single writer: a task that takes commands in batches, decides order with
//!   [`parley_core::sequencer`], writes the batch durably, confirms the senders, and hands the batch over to
//! - [`publisher`], the task that announces durable batches on pub/sub (batched, with a deadline, counted), so
//!   the writer never waits for Redis.
//! - [`machine_lease`] leases the writer's Snowflake machine ID from the router's block, renews it, and fences the
//!   writer when the lease lapses.
//! - [`metrics`] is the `parley-router` process's registry (writer, Kafka log, store writer, Redis).
//! - [`service`] runs `parley_api` calls on the writer ([`LocalRouter`] is a `parley_api::RouterService`),
//!   starts in-process writers, and serves the internal HTTP API of the `parley-router` binary.

pub mod args;
pub mod backend;
pub mod cassandra;
pub mod embedded;
pub mod feed;
pub mod global;
pub mod kafka;
pub mod machine_lease;
pub mod metrics;
pub mod publisher;
pub mod push;
pub mod router;
pub mod service;

pub use router::{LocalRouter, RouterConfig};
pub use service::{start, start_with_directory, start_with_tap};
