//! End-to-end tooling for Parley: the pieces of the `parley-load` load tool.
//!
//! - [`client`]: tokens, connecting, and per-connection loops that count deliveries, check `seq` order and
//!   measure latency;
//! - [`worker`]: child processes that each hold a share of the connections;
//! - [`hist`]: a mergeable latency histogram;
//! - [`sys`]: RSS, CPU time and file limits from `/proc`;
//! - [`mock`]: a tiny in-memory server, only for checking the tool itself.

pub mod client;
pub mod hist;
pub mod mock;
pub mod sys;
pub mod worker;
