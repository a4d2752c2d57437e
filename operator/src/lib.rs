//! The Parley operator's core: it turns `ChatCluster` and `Region` resources (crate `parley-crds`) into the
//! Kubernetes objects that run the platform, and allocates Snowflake machine IDs.
//!
//! Each Region is reconciled as a staged pipeline:
//!
//! ```text
//! dereference → validate → build → apply → update_status
//! ```
//!
//! - `dereference` ([`controller`], needs a client) reads the Region, its ChatCluster and the other Regions into
//!   a [`validate::Dereferenced`].
//! - [`validate`] (pure) checks the rules that span objects and CEL cannot express, such as two Regions with one
//!   region name ([`Error::DuplicateRegion`]). An invalid Region is not applied at all.
//! - [`machine_ids`] (pure) gives the Region its block of the ChatCluster's 1,024 machine IDs, with quarantine of
//!   released blocks; the caller persists the allocation in the ChatCluster's status with optimistic concurrency.
//! - [`build`] (pure) turns the validated Region and its block into plain objects: a ConfigMap per component,
//!   StatefulSets, Services, PodDisruptionBudgets and NetworkPolicies, all owned by the Region, with the backends'
//!   TLS and credentials wired into the pods.
//! - [`mm2`] (pure, part of `build`) derives the MirrorMaker 2 of a Region that other Regions replicate topics
//!   into: its `mm2.properties` and Deployment; `build` also gives the routers their peers
//!   (`PARLEY_PEER_ROUTERS`), the regions mirrored into them (`PARLEY_MIRRORED_REGIONS`) and the ChatCluster's
//!   peer token (`PARLEY_PEER_TOKEN`).
//! - [`keyspace`] decides the Cassandra keyspace's `NetworkTopologyStrategy` map (pure) and runs it over CQL (its
//!   `CassandraAdmin` adapter): each Region adds its own datacenter once it has nodes, and a Region being deleted
//!   waits while the keyspace replicates to its datacenter.
//! - `apply` and `update_status` ([`controller`], need a client) persist the allocation with optimistic
//!   concurrency, create the Region's internal token Secret once ([`internal_token`]), server-side apply the
//!   objects under the field manager [`build::FIELD_MANAGER`] (skipping those already in place, so a no-op
//!   reconcile writes nothing), delete orphans and write conditions; [`status`] (pure) computes those conditions
//!   and the ChatCluster's per-Region summaries.
//!
//! [`cluster`] is the ChatCluster side: it gives each Region an ownerReference to its ChatCluster (so deleting the
//! ChatCluster garbage-collects its Regions) and writes the status of a ChatCluster that no Region names.
//!
//! [`plan`] runs the pure stages in order, so the controller's reconcile only adds the I/O around it.
//!
//! Around the controller: [`leader`] runs it only while this replica holds a coordination.k8s.io Lease, and
//! [`metrics`] counts reconciles, errors, durations and writes, served on the admin port with `/healthz`. The
//! `parley-operator` binary (`src/main.rs`) wires them together behind the `crd` and `run` subcommands.

pub mod build;
pub mod cluster;
pub mod controller;
pub mod error;
pub mod gateways;
pub mod internal_token;
pub mod keyspace;
pub mod leader;
pub mod machine_ids;
pub mod metrics;
pub mod mm2;
pub mod rollout;
pub mod status;
pub mod validate;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use parley_crds::{MachineIdAllocation, MachineIdBlock};

pub use error::Error;

/// The outcome of the pure stages for one Region.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The validated Region.
    pub validated: validate::ValidatedRegion,
    /// Its machine-ID block.
    pub block: MachineIdBlock,
    /// The ChatCluster's allocation after this Region's block was ensured; persist it before applying.
    pub allocation: MachineIdAllocation,
    /// The objects to apply.
    pub resources: build::RegionResources,
}

/// Runs validate, machine-ID allocation and build for one Region. `allocation` is the ChatCluster's current
/// allocation (empty for a new ChatCluster); it is not changed when any stage fails.
pub fn plan(input: validate::Dereferenced, allocation: &MachineIdAllocation, now: Timestamp) -> Result<Plan, Error> {
    let validated = validate::validate(input)?;
    let quarantine_seconds = u64::try_from(validated.cluster.spec.snowflake.machine_id_quarantine_seconds).unwrap_or(0);
    let mut allocation = allocation.clone();
    let block = machine_ids::ensure(
        &mut allocation,
        &validated.name,
        machine_ids::block_size(&validated.region.spec),
        now,
        Duration::from_secs(quarantine_seconds),
    )?;
    let resources = build::build(&validated, block)?;
    Ok(Plan { validated, block, allocation, resources })
}
