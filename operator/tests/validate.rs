//! The validate stage: cross-object rules, from YAML fixtures.

mod common;

use common::{cluster, eu, fixture, us};
use parley_crds::Region;
use parley_operator::validate::{validate, Dereferenced};
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
fn replication_target_must_be_a_region_of_the_cluster() {
    let error = validate(input(eu(), vec![eu()])).expect_err("us is missing");
    assert_eq!(
        error,
        Error::UnknownReplicationTarget { region: "chat-eu".into(), target: "us".into(), cluster: "chat".into() }
    );
    assert_eq!(error.reason(), "UnknownReplicationTarget");
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
fn settings_no_binary_honours_are_refused() {
    let mut tls = cluster();
    tls.spec.kafka.tls = true;
    let error =
        validate(Dereferenced { region: us(), cluster: Some(tls), regions: vec![eu(), us()] }).expect_err("kafka tls");
    assert_eq!(error.reason(), "Unsupported");
    assert!(error.to_string().contains("kafka.tls on chat cluster chat"), "{error}");
    let mut secured = eu();
    secured.spec.redis.url = Some("rediss://redis-eu:6380".into());
    let error = validate(input(secured, vec![eu(), us()])).expect_err("rediss");
    assert!(error.to_string().contains("rediss://"), "{error}");
    let mut routers = eu();
    routers.spec.router.replicas = 2;
    let error = validate(input(routers, vec![eu(), us()])).expect_err("two routers");
    assert!(error.to_string().contains("router.replicas 2"), "{error}");
}

#[test]
fn a_region_without_uid_cannot_own_objects() {
    let mut region = us();
    region.metadata.uid = None;
    let error = validate(input(region, vec![eu(), us()])).expect_err("no uid");
    assert_eq!(error, Error::MissingMetadata { kind: "Region", name: "chat-us".into(), field: "uid" });
}
