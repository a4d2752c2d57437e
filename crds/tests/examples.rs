//! The example manifests in `examples/` deserialize into the Rust types and pass the CRDs' CEL rules.

use kube::core::cel::Validator;
use kube::CustomResourceExt;
use parley_crds::chat_cluster::JwtAlgorithm;
use parley_crds::{workspace_root, ChatCluster, Region};
use serde::Deserialize;
use serde_json::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = workspace_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|error| panic!("parse {file}: {error}")))
        .collect()
}

fn check_cel<K: CustomResourceExt>(object: &Value) {
    let crd = K::crd();
    let schema = serde_json::to_value(crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()))
        .expect("schema");
    if let Err(errors) = Validator::new().validate(&schema, object, None) {
        panic!("{} {} fails its CEL rules: {errors}", K::crd_name(), object["metadata"]["name"]);
    }
}

/// Splits an example file into its ChatClusters and Regions, checking every document on the way.
fn load(file: &str) -> (Vec<ChatCluster>, Vec<Region>) {
    let mut clusters = Vec::new();
    let mut regions = Vec::new();
    for document in documents(file) {
        match document["kind"].as_str() {
            Some("ChatCluster") => {
                check_cel::<ChatCluster>(&document);
                clusters.push(serde_json::from_value(document).unwrap_or_else(|e| panic!("{file}: ChatCluster: {e}")));
            }
            Some("Region") => {
                check_cel::<Region>(&document);
                regions.push(serde_json::from_value(document).unwrap_or_else(|e| panic!("{file}: Region: {e}")));
            }
            Some("Secret") => {}
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    (clusters, regions)
}

#[test]
fn dev_example_is_one_cluster_with_one_region() {
    let (clusters, regions) = load("dev-chatcluster.yaml");
    assert_eq!(clusters.len(), 1);
    assert_eq!(regions.len(), 1);
    let cluster = &clusters[0];
    assert_eq!(regions[0].spec.cluster_ref, cluster.metadata.name.as_deref().expect("name"));
    // Everything not given takes the defaults the CRD also declares.
    assert_eq!(cluster.spec.gateway.heartbeat_interval_ms, 30_000);
    assert_eq!(cluster.spec.snowflake.machine_id_quarantine_seconds, 60);
    assert_eq!(cluster.spec.auth.jwt_algorithm, JwtAlgorithm::HS256);
}

#[test]
fn production_example_has_three_regions_replicating_to_each_other() {
    let (clusters, regions) = load("production.yaml");
    assert_eq!(clusters.len(), 1);
    assert_eq!(regions.len(), 3);
    let names: Vec<&str> = regions.iter().map(|r| r.spec.region_name.as_str()).collect();
    for region in &regions {
        assert_eq!(region.spec.cluster_ref, "chat");
        for rule in &region.spec.replication {
            for target in &rule.to_regions {
                assert!(names.contains(&target.as_str()), "{target} is not a Region of the example");
                assert_ne!(target, &region.spec.region_name);
            }
        }
    }
    assert_eq!(clusters[0].spec.auth.jwt_algorithm, JwtAlgorithm::RS256);
    // Production reaches every engine over TLS with credentials, and runs several routers per Region.
    let spec = &clusters[0].spec;
    assert!(spec.kafka.tls && spec.kafka.tls_ca_secret.is_some() && spec.kafka.credentials.is_some());
    assert!(spec.cassandra.tls && spec.cassandra.tls_ca_secret.is_some() && spec.cassandra.credentials.is_some());
    assert!(spec.redis.tls_ca_secret.is_some() && spec.redis.credentials.is_some());
    for region in &regions {
        let url = region.spec.redis.url.as_deref().unwrap_or_default();
        assert!(url.starts_with("rediss://"), "{}: {url}", region.spec.region_name);
        assert!(region.spec.router.replicas > 1, "{}: one router", region.spec.region_name);
    }
}
