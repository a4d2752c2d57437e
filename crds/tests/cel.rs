//! The CRDs' CEL rules, evaluated client-side with kube's CEL implementation: valid objects pass, and each kind of
//! mistake is rejected with its message. (The e2e suite checks the same against a real API server.)

use kube::core::cel::Validator;
use kube::CustomResourceExt;
use parley_crds::{ChatCluster, Region};
use serde_json::{json, Value};

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()))
        .expect("schema")
}

fn cluster() -> Value {
    json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {
            "version": "0.1.0",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "cassandra": {"contactPoints": ["cassandra"], "keyspace": "parley"},
            "redis": {"url": "redis://redis:6379"},
            "auth": {"jwtKeySecret": {"name": "jwt", "key": "hs256"}}
        }
    })
}

fn region() -> Value {
    json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "Region",
        "metadata": {"name": "chat-eu", "namespace": "default"},
        "spec": {
            "clusterRef": "chat",
            "regionName": "eu",
            "cassandra": {"datacenter": "dc1"},
            "gateway": {"replicas": 3},
            "replication": [{"topics": ["*"], "toRegions": ["us"]}]
        }
    })
}

/// The messages of every failed rule, or an empty list.
fn failures<K: CustomResourceExt>(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema::<K>(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let target = object.pointer_mut(parent).and_then(Value::as_object_mut).expect("parent object");
    if value.is_null() {
        target.remove(key);
    } else {
        target.insert(key.to_owned(), value);
    }
    object
}

fn assert_rejected<K: CustomResourceExt>(object: &Value, old: Option<&Value>, expected: &str) {
    let failures = failures::<K>(object, old);
    assert!(
        failures.iter().any(|m| m.contains(expected)),
        "expected a failure containing {expected:?}, got {failures:?}"
    );
}

#[test]
fn valid_objects_pass() {
    assert_eq!(failures::<ChatCluster>(&cluster(), None), Vec::<String>::new());
    assert_eq!(failures::<Region>(&region(), None), Vec::<String>::new());
    let scaling = with(region(), "/spec/gateway", json!({"minReplicas": 2, "maxReplicas": 10}));
    assert_eq!(failures::<Region>(&scaling, None), Vec::<String>::new());
    // An update that changes neither immutable field passes the transition rules.
    let bigger = with(region(), "/spec/gateway/replicas", json!(5));
    assert_eq!(failures::<Region>(&bigger, Some(&region())), Vec::<String>::new());
}

#[test]
fn snowflake_epoch_is_immutable() {
    let old = with(cluster(), "/spec/snowflake", json!({"epochMs": 1_735_689_600_000_i64}));
    let new = with(cluster(), "/spec/snowflake", json!({"epochMs": 1_700_000_000_000_i64}));
    assert_rejected::<ChatCluster>(&new, Some(&old), "snowflake.epochMs is immutable");
    assert_eq!(failures::<ChatCluster>(&new, None), Vec::<String>::new(), "any epoch is fine at creation");
}

#[test]
fn region_name_and_cluster_ref_are_immutable() {
    let renamed = with(region(), "/spec/regionName", json!("eu2"));
    assert_rejected::<Region>(&renamed, Some(&region()), "regionName is immutable");
    let moved = with(region(), "/spec/clusterRef", json!("other"));
    assert_rejected::<Region>(&moved, Some(&region()), "clusterRef is immutable");
}

#[test]
fn gateway_replicas_fixed_or_range() {
    let both = with(region(), "/spec/gateway", json!({"replicas": 3, "minReplicas": 1, "maxReplicas": 4}));
    assert_rejected::<Region>(&both, None, "set either gateway.replicas");
    let half = with(region(), "/spec/gateway", json!({"minReplicas": 1}));
    assert_rejected::<Region>(&half, None, "set either gateway.replicas");
    let neither = with(region(), "/spec/gateway", json!({}));
    assert_rejected::<Region>(&neither, None, "set either gateway.replicas");
    let inverted = with(region(), "/spec/gateway", json!({"minReplicas": 5, "maxReplicas": 2}));
    assert_rejected::<Region>(&inverted, None, "gateway.minReplicas must not exceed gateway.maxReplicas");
    // A fixed count may declare the maximum its machine IDs are sized for, but not exceed it.
    let bounded = with(region(), "/spec/gateway", json!({"replicas": 3, "maxReplicas": 12}));
    assert_eq!(failures::<Region>(&bounded, None), Vec::<String>::new());
    let over = with(region(), "/spec/gateway", json!({"replicas": 13, "maxReplicas": 12}));
    assert_rejected::<Region>(&over, None, "gateway.replicas must not exceed gateway.maxReplicas");
}

#[test]
fn router_replicas_within_their_maximum() {
    for router in [json!({"replicas": 3}), json!({"replicas": 3, "maxReplicas": 3}), json!({"maxReplicas": 64})] {
        let region = with(region(), "/spec/router", router.clone());
        assert_eq!(failures::<Region>(&region, None), Vec::<String>::new(), "{router}");
    }
    let over = with(region(), "/spec/router", json!({"replicas": 5, "maxReplicas": 4}));
    assert_rejected::<Region>(&over, None, "router.replicas must not exceed router.maxReplicas");
    for max in [0, 65] {
        let region = with(region(), "/spec/router", json!({"replicas": 1, "maxReplicas": max}));
        assert_rejected::<Region>(&region, None, "router.maxReplicas must be between 1 and 64");
    }
}

#[test]
fn bounds() {
    assert_rejected::<Region>(&with(region(), "/spec/gateway/replicas", json!(513)), None, "between 1 and 512");
    assert_rejected::<Region>(&with(region(), "/spec/gateway/replicas", json!(0)), None, "between 1 and 512");
    for replicas in [0, 65] {
        let routers = with(region(), "/spec/router", json!({ "replicas": replicas }));
        assert_rejected::<Region>(&routers, None, "router.replicas must be between 1 and 64");
    }
    // Several routers share the Region's partitions.
    for replicas in [1, 3, 64] {
        let routers = with(region(), "/spec/router", json!({ "replicas": replicas }));
        assert_eq!(failures::<Region>(&routers, None), Vec::<String>::new(), "{replicas} routers");
    }
    let heartbeat = with(cluster(), "/spec/gateway", json!({"heartbeatIntervalMs": 10}));
    assert_rejected::<ChatCluster>(&heartbeat, None, "heartbeatIntervalMs must be between 1000 and 300000");
    let quarantine = with(cluster(), "/spec/snowflake", json!({"machineIdQuarantineSeconds": 1}));
    assert_rejected::<ChatCluster>(&quarantine, None, "machineIdQuarantineSeconds must be between 5 and 86400");
}

#[test]
fn gateway_cross_field_rules() {
    let idle = with(cluster(), "/spec/gateway", json!({"heartbeatIntervalMs": 60000, "idleTimeoutMs": 30000}));
    assert_rejected::<ChatCluster>(&idle, None, "idleTimeoutMs must be greater than heartbeatIntervalMs");
    let drain = with(cluster(), "/spec/gateway", json!({"drainWindowMs": 90000, "drainDeadlineMs": 60000}));
    assert_rejected::<ChatCluster>(&drain, None, "drainDeadlineMs must be at least drainWindowMs");
    let target = with(cluster(), "/spec/gateway", json!({"maxConnections": 1000, "connectionsPerPodTarget": 5000}));
    assert_rejected::<ChatCluster>(&target, None, "connectionsPerPodTarget must not exceed maxConnections");
}

#[test]
fn a_region_cannot_replicate_to_itself() {
    let looped = with(region(), "/spec/replication", json!([{"topics": ["*"], "toRegions": ["us", "eu"]}]));
    assert_rejected::<Region>(&looped, None, "a Region cannot replicate to itself");
}

#[test]
fn formats_and_names() {
    let keyspace = with(cluster(), "/spec/cassandra/keyspace", json!("Bad-Keyspace"));
    assert_rejected::<ChatCluster>(&keyspace, None, "cassandra.keyspace must start with a lowercase letter");
    let redis = with(cluster(), "/spec/redis/url", json!("http://redis:6379"));
    assert_rejected::<ChatCluster>(&redis, None, "redis.url must be redis://host:port, or rediss://host:port");
    let image = with(cluster(), "/spec/images", json!({"gateway": "parley/gateway:latest"}));
    assert_rejected::<ChatCluster>(&image, None, "images.gateway must be a repository without tag");
    let registry_port = with(cluster(), "/spec/images", json!({"gateway": "registry:5000/parley/gateway"}));
    assert_eq!(failures::<ChatCluster>(&registry_port, None), Vec::<String>::new(), "a registry port is no tag");
    let long = with(cluster(), "/metadata/name", json!("a".repeat(41)));
    assert_rejected::<ChatCluster>(&long, None, "a ChatCluster name must be at most 40 characters");
    let region_name = with(region(), "/spec/regionName", json!("EU_West"));
    assert_rejected::<Region>(&region_name, None, "regionName must be lowercase letters");
}

/// TLS and credentials for every engine, as a production ChatCluster sets them.
fn secured_cluster() -> Value {
    let cluster = with(
        cluster(),
        "/spec/kafka",
        json!({"bootstrapServers": "kafka:9093", "tls": true, "tlsCaSecret": {"name": "kafka-ca", "key": "ca.crt"},
               "saslMechanism": "SCRAM-SHA-256", "credentials": {"secretName": "kafka-user"}}),
    );
    let cluster = with(
        cluster,
        "/spec/cassandra",
        json!({"contactPoints": ["cassandra"], "keyspace": "parley", "tls": true,
               "tlsCaSecret": {"name": "cassandra-ca", "key": "ca.pem"},
               "credentials": {"secretName": "cassandra-user", "usernameKey": "user", "passwordKey": "pass"}}),
    );
    with(
        cluster,
        "/spec/redis",
        json!({"url": "rediss://redis:6380", "tlsCaSecret": {"name": "redis-ca", "key": "ca.crt"},
               "credentials": {"secretName": "redis-user"}}),
    )
}

#[test]
fn tls_and_credentials_are_accepted_for_every_engine() {
    assert_eq!(failures::<ChatCluster>(&secured_cluster(), None), Vec::<String>::new());
    // TLS without a CA bundle trusts the system's roots.
    let system_roots = with(secured_cluster(), "/spec/kafka/tlsCaSecret", Value::Null);
    assert_eq!(failures::<ChatCluster>(&system_roots, None), Vec::<String>::new());
    // Credentials without TLS are allowed (the field documentation warns).
    let plaintext = with(cluster(), "/spec/kafka/credentials", json!({"secretName": "kafka-user"}));
    let plaintext = with(plaintext, "/spec/cassandra/credentials", json!({"secretName": "cassandra-user"}));
    let plaintext = with(plaintext, "/spec/redis/credentials", json!({"secretName": "redis-user"}));
    assert_eq!(failures::<ChatCluster>(&plaintext, None), Vec::<String>::new());
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
        let sasl = with(secured_cluster(), "/spec/kafka/saslMechanism", json!(mechanism));
        assert_eq!(failures::<ChatCluster>(&sasl, None), Vec::<String>::new(), "{mechanism}");
    }
    // A Region picks TLS for its own Redis with a rediss:// URL; a Redis Cluster lists its seeds.
    let region_tls = with(region(), "/spec/redis", json!({"url": "rediss://redis-eu:6380"}));
    assert_eq!(failures::<Region>(&region_tls, None), Vec::<String>::new());
    let seeds = with(region(), "/spec/redis", json!({"url": "rediss://a:6380,rediss://b:6380, rediss://c:6380"}));
    assert_eq!(failures::<Region>(&seeds, None), Vec::<String>::new());
}

#[test]
fn inconsistent_tls_settings_are_refused_with_what_to_do() {
    for (pointer, value, expected) in [
        ("/spec/kafka/tls", json!(false), "kafka.tlsCaSecret needs kafka.tls: true"),
        ("/spec/cassandra/tls", json!(false), "cassandra.tlsCaSecret needs cassandra.tls: true"),
        ("/spec/redis/url", json!("redis://redis:6379"), "redis.tlsCaSecret needs a rediss:// (TLS) redis.url"),
        ("/spec/kafka/credentials", Value::Null, "kafka.saslMechanism needs kafka.credentials"),
    ] {
        assert_rejected::<ChatCluster>(&with(secured_cluster(), pointer, value), None, expected);
    }
    // Absent tls (the API server defaults it to false) is no TLS either.
    let kafka = with(cluster(), "/spec/kafka/tlsCaSecret", json!({"name": "kafka-ca", "key": "ca.crt"}));
    assert_rejected::<ChatCluster>(&kafka, None, "kafka.tlsCaSecret needs kafka.tls: true");
    let mixed = with(secured_cluster(), "/spec/redis/url", json!("rediss://a:6380,redis://b:6379"));
    assert_rejected::<ChatCluster>(&mixed, None, "must all use the same scheme");
    let region_mixed = with(region(), "/spec/redis", json!({"url": "redis://a:6379,rediss://b:6380"}));
    assert_rejected::<Region>(&region_mixed, None, "must all use the same scheme");
}

#[test]
fn network_policy_admin_peers_are_network_policy_peers() {
    let peers = with(
        cluster(),
        "/spec/networkPolicy",
        json!({"enabled": true, "adminFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            {"ipBlock": {"cidr": "10.0.0.0/8"}}
        ]}),
    );
    assert_eq!(failures::<ChatCluster>(&peers, None), Vec::<String>::new());
    let off = with(cluster(), "/spec/networkPolicy", json!({"enabled": false}));
    assert_eq!(failures::<ChatCluster>(&off, None), Vec::<String>::new());
}
