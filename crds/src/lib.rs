//! Parley's Kubernetes custom resources, group `parley.dev`, version `v1alpha1`.
//!
//! - [`chat_cluster`]: `ChatCluster`, one Parley installation: images, gateway and router settings, fan-out
//!   threshold, Snowflake settings, backends and auth. Its status carries per-Region summaries and the machine-ID
//!   allocation.
//! - [`region`]: `Region`, one region of a ChatCluster: replicas, regional backend endpoints and replication
//!   targets.
//! - [`common`]: Secret references, machine-ID blocks and the allocation state, condition types.
//!
//! The types are the single source of the CRD YAML (decision 8): [`generated_files`] renders every file that
//! `crdgen` writes into `crds/` and `charts/parley/crds/`, and a test fails when the committed files differ.
//! Bounds, immutability and cross-field rules are CEL rules (`x-kubernetes-validations`) on the types, so the API
//! server enforces them; rules that span objects are checked by the operator.
//!
//! This crate holds types only: no client, no reconcile logic.

pub mod chat_cluster;
pub mod common;
pub mod region;

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use chat_cluster::{ChatCluster, ChatClusterSpec, ChatClusterStatus};
pub use common::{MachineIdAllocation, MachineIdBlock, MACHINE_ID_SPACE};
pub use region::{Region, RegionSpec, RegionStatus};

/// The API group of every Parley kind.
pub const GROUP: &str = "parley.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// The command that regenerates the committed CRD YAML.
pub const REGENERATE_COMMAND: &str = "cargo run -p parley-crds --bin crdgen -- --write";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRD could not be rendered as YAML.
    #[error("failed to render the {kind} CRD as YAML")]
    RenderYaml {
        /// The kind whose CRD failed.
        kind: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A generated file could not be written.
    #[error("failed to write {path}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Every CRD of this crate, with its kind.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![("ChatCluster", ChatCluster::crd()), ("Region", Region::crd())]
}

/// Renders one CRD as a YAML document with a header saying where it comes from.
pub fn render_crd(kind: &'static str, crd: &CustomResourceDefinition) -> Result<String, Error> {
    let body = serde_yaml_ng::to_string(crd).map_err(|source| Error::RenderYaml { kind, source })?;
    Ok(format!(
        "# Generated from the Rust types in crds/src by crdgen; do not edit.\n# Regenerate with: {REGENERATE_COMMAND}\n{body}"
    ))
}

/// Every file `crdgen --write` produces, as paths relative to the workspace root and their contents: one file per
/// kind in `crds/` and the same in the Helm chart's `charts/parley/crds/`.
pub fn generated_files() -> Result<Vec<(PathBuf, String)>, Error> {
    let mut files = Vec::new();
    for (kind, crd) in crds() {
        let yaml = render_crd(kind, &crd)?;
        let file_name = format!("{}.yaml", kind.to_lowercase());
        files.push((Path::new("crds").join(&file_name), yaml.clone()));
        files.push((Path::new("charts/parley/crds").join(&file_name), yaml));
    }
    Ok(files)
}

/// The workspace root, as seen when this crate was compiled.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}
