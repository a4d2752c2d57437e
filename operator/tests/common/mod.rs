//! Loading the YAML fixtures in `tests/fixtures/`.

#![allow(dead_code)]

use parley_crds::{ChatCluster, Region};
use serde::de::DeserializeOwned;

/// Parses `tests/fixtures/<file>`.
pub fn fixture<T: DeserializeOwned>(file: &str) -> T {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("parse {}: {error}", path.display()))
}

/// The ChatCluster `chat`.
pub fn cluster() -> ChatCluster {
    fixture("chatcluster.yaml")
}

/// The ChatCluster `chat` with TLS and credentials for Kafka, Cassandra and Redis (`rediss://`).
pub fn secured() -> ChatCluster {
    fixture("chatcluster-secured.yaml")
}

/// The Region `chat-eu` (gateways 2-10, 1 router of at most 4, its own Kafka and Redis, replicates to `us`).
pub fn eu() -> Region {
    fixture("region-eu.yaml")
}

/// The Region `chat-us` (3 fixed gateways, 1 router, no declared maximums: 8 and 8 by default).
pub fn us() -> Region {
    fixture("region-us.yaml")
}
