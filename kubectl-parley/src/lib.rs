//! `kubectl parley`: a kubectl plugin for the operator's ChatClusters and Regions.
//!
//! - [`cli`]: the command line (`status`, `drain`, `rollout restart|pause|resume`) and the global flags
//!   (`-n/--namespace`, `--kubeconfig`, `--context`).
//! - [`report`]: pure functions from the fetched objects (a ChatCluster, its Regions, the namespace's Events) to a
//!   [`report::StatusReport`], and from that report to text or JSON. No client; unit-tested on fixtures.
//! - [`commands`]: everything that talks to the API server: loading the kubeconfig, reading what `status` shows,
//!   and the merge patches of `drain` and `rollout`.
//! - [`error`]: the crate's error enum; each message names the object and the namespace it is about.
//!
//! The annotations the commands set are the operator's contract (`parley_crds::common`): `parley.dev/drain` on a
//! gateway pod, `parley.dev/restart-at` and `parley.dev/rollout-paused` on a Region.

pub mod cli;
pub mod commands;
pub mod error;
pub mod report;

pub use error::Error;
