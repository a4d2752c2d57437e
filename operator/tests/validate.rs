//! The validate stage: cross-object rules, from YAML fixtures.

mod common;

use common::{cluster, eu, fixture, secured, us};
use parley_crds::{ChatCluster, Region};
use parley_operator::validate::{
    check_names, derived_names, missing_replication_targets, redis_scheme_is_tls, validate, Dereferenced, NameRule,
};
use parley_operator::Error;

fn input(region: Region, regions: Vec<Region>) -> Dereferenced {
    Dereferenced { region, cluster: Some(cluster()), regions }
}

#[test]
fn a_valid_region_resolves_its_endpoints_and_owner() {
    let validated = validate(input(eu(), vec![eu(), us()])).expect("valid");
    assert_eq!(validated.name, "chat-eu");
    assert_eq!(validated.namespace, "parley");
    assert_eq!(validated.cluster_name, "chat");
    // The Region's own endpoints win over the ChatCluster's defaults...
    assert_eq!(validated.kafka_bootstrap_servers, "kafka-eu:9093");
    assert_eq!(validated.redis_url, "redis://redis-eu:6380");
    // ...which apply when the Region gives none.
    let us = validate(input(us(), vec![eu(), us()])).expect("valid");
    assert_eq!(us.kafka_bootstrap_servers, "kafka-default:9092");
    assert_eq!(us.redis_url, "redis://redis-default:6379");
    assert_eq!(validated.owner.kind, "Region");
    assert_eq!(validated.owner.api_version, "parley.dev/v1alpha1");
    assert_eq!(validated.owner.uid, "0a9e7d10-0000-4000-8000-0000000000e1");
    assert_eq!(validated.owner.controller, Some(true));
}

#[test]
fn the_later_of_two_regions_with_one_name_is_refused() {
    let duplicate: Region = fixture("region-eu-duplicate.yaml");
    let all = vec![eu(), us(), duplicate.clone()];
    let error = validate(input(duplicate, all.clone())).expect_err("duplicate");
    assert_eq!(error.reason(), "DuplicateRegion");
    assert_eq!(
        error,
        Error::DuplicateRegion {
            region: "chat-eu-again".into(),
            region_name: "eu".into(),
            existing: "chat-eu".into(),
            cluster: "chat".into()
        }
    );
    assert!(error.to_string().contains("already uses"), "{error}");
    // The Region created first keeps running.
    validate(input(eu(), all)).expect("the first Region stays valid");
}

#[test]
fn same_region_name_in_another_cluster_is_fine() {
    let mut other = fixture::<Region>("region-eu-duplicate.yaml");
    other.spec.cluster_ref = "other".into();
    validate(input(eu(), vec![eu(), us(), other])).expect("different clusters");
}

#[test]
fn missing_cluster() {
    let error = validate(Dereferenced { region: eu(), cluster: None, regions: vec![eu()] }).expect_err("no cluster");
    assert_eq!(error.reason(), "ClusterNotFound");
    assert_eq!(
        error.to_string(),
        "region chat-eu belongs to chat cluster chat, which does not exist in namespace parley"
    );
}

#[test]
fn a_missing_replication_target_is_waited_for_not_refused() {
    // chat-eu replicates to "us", which no Region has yet: valid, without the flow.
    let validated = validate(input(eu(), vec![eu()])).expect("us may come later");
    assert_eq!(missing_replication_targets(&validated), ["us"]);
    assert!(validated.peers.is_empty());
    let validated = validate(input(eu(), vec![eu(), us()])).expect("valid");
    assert!(missing_replication_targets(&validated).is_empty());
}

#[test]
fn a_name_its_objects_cannot_carry_is_refused_naming_the_object_and_its_rule() {
    let mut dotted = eu();
    dotted.metadata.name = Some("eu.west".into());
    let error = validate(input(dotted.clone(), vec![dotted.clone(), us()])).expect_err("a '.' in the name");
    assert_eq!(error.reason(), "InvalidName");
    assert!(error.is_invalid_spec());
    let message = error.to_string();
    assert!(message.contains("its Service eu.west-gateway must be a DNS-1035 label"), "{message}");
    // A Region of that name is no peer of the others, and holds no region name.
    let validated = validate(input(us(), vec![dotted, us()])).expect("us is valid");
    assert!(validated.peers.is_empty());

    // A digit first: a valid pod name, but no Service name.
    let mut digit = us();
    digit.metadata.name = Some("1us".into());
    let message = validate(input(digit, vec![eu()])).expect_err("a digit first").to_string();
    assert!(message.contains("Service 1us-gateway"), "{message}");
    // Long enough for every Service, but not for the StatefulSet's controller-revision-hash label.
    let mut long = us();
    long.metadata.name = Some("a".repeat(45));
    let message = validate(input(long, vec![eu()])).expect_err("too long").to_string();
    assert!(message.contains(&format!("StatefulSet {}-gateway must be a DNS-1123 label of at most 52", "a".repeat(45))));
    // The longest name CEL allows fits every object, at the highest pod ordinals.
    let mut longest = us();
    longest.metadata.name = Some("a".repeat(40));
    longest.spec.gateway.max_replicas = Some(512);
    longest.spec.router.max_replicas = Some(64);
    check_names(&longest).expect("40 characters fit");
}

#[test]
fn every_derived_name_is_checked_against_its_rule() {
    let names = derived_names(&us());
    let find = |kind: &str, name: &str| names.iter().find(|derived| derived.kind == kind && derived.name == name);
    assert_eq!(find("Service", "chat-us-router-headless").map(|d| d.rule), Some(NameRule::Dns1035Label));
    assert_eq!(find("Pod", "chat-us-gateway-7").map(|d| d.rule), Some(NameRule::Dns1123Label), "{names:?}");
    assert_eq!(find("StatefulSet", "chat-us-router").map(|d| d.rule), Some(NameRule::StatefulSetName));
    for (kind, name) in [
        ("ConfigMap", "chat-us-gateway-config"),
        ("ConfigMap", "chat-us-mirrormaker-config"),
        ("Secret", "chat-us-internal-token"),
        ("Deployment", "chat-us-mirrormaker"),
        ("ServiceAccount", "chat-us-gateway"),
        ("Role", "chat-us-gateway-pod-agent"),
        ("RoleBinding", "chat-us-gateway-pod-agent"),
        ("NetworkPolicy", "chat-us-router"),
        ("PodDisruptionBudget", "chat-us-gateway"),
    ] {
        assert!(find(kind, name).is_some(), "{kind} {name} not checked: {names:?}");
    }
    assert!(NameRule::Dns1123Subdomain.allows("eu.west-gateway-config"));
    assert!(!NameRule::Dns1035Label.allows("eu.west-gateway"));
    assert!(!NameRule::Dns1123Label.allows("eu.west-gateway-0"));
    assert!(NameRule::LabelValue.allows("eu.west") && !NameRule::LabelValue.allows("-eu"));
    assert!(!NameRule::PathSegment.allows("a/b") && NameRule::PathSegment.allows("a.b"));
}

#[test]
fn endpoints_must_come_from_the_region_or_its_cluster() {
    let mut cluster = cluster();
    cluster.spec.kafka.bootstrap_servers = None;
    let error = validate(Dereferenced { region: us(), cluster: Some(cluster.clone()), regions: vec![eu(), us()] })
        .expect_err("no kafka");
    assert_eq!(error.reason(), "MissingKafkaBootstrap");
    cluster.spec.kafka.bootstrap_servers = Some("k:9092".into());
    cluster.spec.redis.url = None;
    let error = validate(Dereferenced { region: us(), cluster: Some(cluster), regions: vec![eu(), us()] })
        .expect_err("no redis");
    assert_eq!(error.reason(), "MissingRedisUrl");
}

#[test]
fn several_routers_tls_and_credentials_are_valid() {
    let mut routers = eu();
    routers.spec.router.replicas = 3;
    let validated = validate(input(routers, vec![eu(), us()])).expect("three routers");
    assert_eq!(validated.region.spec.router.replicas, 3);
    // The secured ChatCluster's Redis is rediss://, which a Region may also choose for itself.
    let tls = validate(Dereferenced { region: us(), cluster: Some(secured()), regions: vec![us()] }).expect("tls");
    assert!(tls.redis_tls);
    let mut own = eu();
    own.spec.redis.url = Some("rediss://redis-eu:6380,rediss://redis-eu-2:6380".into());
    let validated = validate(Dereferenced { region: own, cluster: Some(secured()), regions: vec![eu(), us()] })
        .expect("the region's own rediss:// url");
    assert!(validated.redis_tls);
    assert!(!validate(input(eu(), vec![eu(), us()])).expect("plain").redis_tls);
}

/// The problem `validate` reports for `cluster` with the Region `region`, which must be an invalid backend setting.
fn backend_problem(cluster: ChatCluster, region: Region) -> String {
    let error = validate(Dereferenced { region, cluster: Some(cluster), regions: vec![eu(), us()] })
        .expect_err("inconsistent backend settings");
    assert_eq!(error.reason(), "InvalidBackendSettings", "{error}");
    error.to_string()
}

#[test]
fn inconsistent_backend_settings_are_refused_with_what_to_do() {
    let mut kafka = secured();
    kafka.spec.kafka.tls = false;
    let message = backend_problem(kafka, us());
    assert!(message.contains("kafka.tlsCaSecret on chat cluster chat needs kafka.tls: true"), "{message}");
    let mut sasl = secured();
    sasl.spec.kafka.credentials = None;
    let message = backend_problem(sasl, us());
    assert!(message.contains("kafka.saslMechanism on chat cluster chat needs kafka.credentials"), "{message}");
    let mut cassandra = secured();
    cassandra.spec.cassandra.tls = false;
    let message = backend_problem(cassandra, us());
    assert!(message.contains("cassandra.tlsCaSecret on chat cluster chat needs cassandra.tls: true"), "{message}");
    // The ChatCluster's Redis CA bundle with a Region whose own Redis URL is plain: CEL cannot see both.
    let message = backend_problem(secured(), eu());
    assert_eq!(
        message,
        "region chat-eu cannot be built: redis.tlsCaSecret on chat cluster chat is only used with TLS, but the \
         region's redis url redis://redis-eu:6380 is not rediss://: use rediss:// or remove redis.tlsCaSecret"
    );
    let mut mixed = eu();
    mixed.spec.redis.url = Some("redis://a:6379,rediss://b:6380".into());
    let message = backend_problem(cluster(), mixed);
    assert!(message.contains("all of one scheme"), "{message}");
}

#[test]
fn redis_schemes() {
    assert_eq!(redis_scheme_is_tls("redis://a:6379"), Some(false));
    assert_eq!(redis_scheme_is_tls("rediss://a:6380"), Some(true));
    assert_eq!(redis_scheme_is_tls("rediss://a:6380, rediss://b:6380"), Some(true));
    assert_eq!(redis_scheme_is_tls("redis://a:6379,rediss://b:6380"), None);
    assert_eq!(redis_scheme_is_tls("http://a"), None);
}

#[test]
fn a_region_without_uid_cannot_own_objects() {
    let mut region = us();
    region.metadata.uid = None;
    let error = validate(input(region, vec![eu(), us()])).expect_err("no uid");
    assert_eq!(error, Error::MissingMetadata { kind: "Region", name: "chat-us".into(), field: "uid" });
}
