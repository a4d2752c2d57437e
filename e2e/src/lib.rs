//! End-to-end tooling for Parley: the pieces of the `parley-load` load tool.
//!
//! - [`client`]: tokens, connecting, and per-connection loops that count deliveries, check `seq` order and
//!   measure latency;
//! - [`worker`]: child processes that each hold a share of the connections;
//! - [`centrifugo`]: Centrifugo v6's client protocol and server API, for comparison runs against it;
//! - [`hist`]: a mergeable latency histogram;
//! - [`sys`]: RSS, CPU time and file limits from `/proc`;
//! - [`mock`]: a tiny in-memory server, only for checking the tool itself;
//! - [`history`]: the history checker of the chaos run (pure): every client's log against the stored history;
//! - [`observe`]: what chat clients of the cross-process tests saw, and the one-order check;
//! - [`regions`]: two regions on loopback with MirrorMaker 2 between them (the multi-region tests and bench);
//! - [`chaos`]: the chaos run (`parley-chaos`, `e2e/chaos/run.sh`): kills and restarts under load, then the checker.

pub mod centrifugo;
pub mod chaos;
pub mod client;
pub mod hist;
pub mod history;
pub mod mock;
pub mod observe;
pub mod regions;
pub mod runner;
pub mod sys;
pub mod worker;
