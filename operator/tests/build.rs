//! The build stage, from YAML fixtures: the objects a Region turns into.

mod common;

use std::collections::BTreeMap;

use clap::CommandFactory;
use common::{cluster, eu, fixture, secured, us};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec, Volume};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use parley_crds::region::RegionSpec;
use parley_crds::{ChatCluster, MachineIdAllocation, MachineIdBlock, Region};
use parley_operator::build::{build, config_hash, RegionResources, CONFIG_HASH_ANNOTATION};
use parley_operator::validate::{validate, Dereferenced, ValidatedRegion};
use parley_operator::{internal_token, machine_ids, plan, Error, Plan};
use serde_json::json;

fn validated_eu() -> ValidatedRegion {
    validate(Dereferenced { region: eu(), cluster: Some(cluster()), regions: vec![eu(), us()] }).expect("valid")
}

/// eu needs 10 gateway IDs (gateway.maxReplicas) + 4 router IDs (router.maxReplicas).
const EU_BLOCK: MachineIdBlock = MachineIdBlock { start: 100, size: 14 };

fn resources() -> RegionResources {
    build(&validated_eu(), EU_BLOCK).expect("build")
}

fn metas(resources: &RegionResources) -> Vec<&ObjectMeta> {
    vec![
        &resources.gateway_config_map.metadata,
        &resources.router_config_map.metadata,
        &resources.gateway_headless_service.metadata,
        &resources.gateway_service.metadata,
        &resources.gateway_stateful_set.metadata,
        &resources.gateway_disruption_budget.metadata,
        &resources.router_headless_service.metadata,
        &resources.router_stateful_set.metadata,
        &resources.router_disruption_budget.metadata,
        &resources.network_policies[0].metadata,
        &resources.network_policies[1].metadata,
    ]
}

fn pod_spec(set: &StatefulSet) -> &PodSpec {
    set.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
}

fn container(set: &StatefulSet) -> &Container {
    &pod_spec(set).containers[0]
}

fn env<'a>(container: &'a Container, name: &str) -> &'a EnvVar {
    container.env.iter().flatten().find(|e| e.name == name).unwrap_or_else(|| panic!("env {name} missing"))
}

fn literal(container: &Container, name: &str) -> String {
    env(container, name).value.clone().unwrap_or_else(|| panic!("env {name} is not a literal"))
}

fn secret_of(container: &Container, name: &str) -> (String, String, Option<bool>) {
    let selector =
        env(container, name).value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secret ref");
    (selector.name.clone(), selector.key.clone(), selector.optional)
}

#[test]
fn every_object_is_named_labelled_and_owned_by_the_region() {
    let resources = resources();
    let names: Vec<&str> = metas(&resources).iter().map(|m| m.name.as_deref().expect("name")).collect();
    assert_eq!(
        names,
        [
            "chat-eu-gateway-config",
            "chat-eu-router-config",
            "chat-eu-gateway-headless",
            "chat-eu-gateway",
            "chat-eu-gateway",
            "chat-eu-gateway",
            "chat-eu-router-headless",
            "chat-eu-router",
            "chat-eu-router",
            "chat-eu-gateway",
            "chat-eu-router"
        ]
    );
    for meta in metas(&resources) {
        assert_eq!(meta.namespace.as_deref(), Some("parley"));
        let owners = meta.owner_references.as_ref().expect("owners");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Region");
        assert_eq!(owners[0].name, "chat-eu");
        assert_eq!(owners[0].uid, "0a9e7d10-0000-4000-8000-0000000000e1");
        assert_eq!(owners[0].controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["parley.dev/cluster"], "chat");
        assert_eq!(labels["parley.dev/region"], "chat-eu");
        assert_eq!(labels["parley.dev/region-name"], "eu");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "parley-operator");
        assert_eq!(labels["app.kubernetes.io/version"], "0.1.0");
    }
}

#[test]
fn gateway_stateful_set() {
    let resources = resources();
    let set = &resources.gateway_stateful_set;
    let spec = set.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2), "starts at minReplicas");
    assert_eq!(spec.service_name.as_deref(), Some("chat-eu-gateway-headless"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    // The operator replaces gateway pods itself, each drained first.
    assert_eq!(spec.update_strategy.as_ref().and_then(|u| u.type_.as_deref()), Some("OnDelete"));
    let router = resources.router_stateful_set.spec.as_ref().expect("router spec");
    assert_eq!(router.pod_management_policy.as_deref(), Some("OrderedReady"));
    assert_eq!(router.update_strategy.as_ref().and_then(|u| u.type_.as_deref()), Some("RollingUpdate"));
    let selector = spec.selector.match_labels.clone().expect("selector");
    assert_eq!(
        selector,
        BTreeMap::from([
            ("app.kubernetes.io/component".to_owned(), "gateway".to_owned()),
            ("parley.dev/cluster".to_owned(), "chat".to_owned()),
            ("parley.dev/region".to_owned(), "chat-eu".to_owned()),
        ])
    );
    let template_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("template labels");
    for (key, value) in &selector {
        assert_eq!(template_labels.get(key), Some(value), "pod template carries selector label {key}");
    }
    let container = container(set);
    assert_eq!(container.image.as_deref(), Some("registry.example.com/parley/gateway:0.1.0"));
    assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let ports: Vec<(Option<&str>, i32)> =
        container.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("client"), 8080), (Some("admin"), 9090)]);
    let readiness = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness");
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    assert_eq!(container.resources.as_ref().and_then(|r| r.requests.as_ref()).map(|r| r["cpu"].0.as_str()), Some("1"));
    let pull_secrets = pod_spec(set).image_pull_secrets.as_ref().expect("pull secrets");
    assert_eq!(pull_secrets[0].name, "registry-credentials");
}

#[test]
fn gateway_drain_fits_in_the_grace_period() {
    let resources = resources();
    let pod = pod_spec(&resources.gateway_stateful_set);
    let pre_stop = container(&resources.gateway_stateful_set)
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .expect("preStop sleep");
    assert_eq!(pre_stop.seconds, 7);
    // 7 s preStop + 90.5 s drain deadline (rounded up) + 10 s to exit.
    assert_eq!(pod.termination_grace_period_seconds, Some(108));
    let grace_ms = pod.termination_grace_period_seconds.expect("grace") * 1000;
    assert!(grace_ms >= pre_stop.seconds * 1000 + 90_500, "SIGKILL would cut the drain short");
    // Routers do not drain connections.
    let router = container(&resources.router_stateful_set);
    assert!(router.lifecycle.is_none());
}

#[test]
fn pods_run_as_non_root_with_a_read_only_root_filesystem() {
    let resources = resources();
    for set in [&resources.gateway_stateful_set, &resources.router_stateful_set] {
        let pod = pod_spec(set);
        let pod_security = pod.security_context.as_ref().expect("pod security context");
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(pod_security.run_as_user, Some(65532));
        assert_eq!(pod_security.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
        let security = container(set).security_context.as_ref().expect("container security context");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
        // Only the gateways' pod agent calls the API server, as its own ServiceAccount.
        let gateway = std::ptr::eq(set, &resources.gateway_stateful_set);
        assert_eq!(pod.automount_service_account_token, Some(gateway));
        assert_eq!(pod.service_account_name.as_deref(), gateway.then_some("chat-eu-gateway"));
        let mounts = container(set).volume_mounts.clone().expect("mounts");
        assert!(mounts.iter().any(|m| m.mount_path == "/tmp"), "a writable /tmp on a read-only root");
    }
}

#[test]
fn each_pod_derives_its_machine_id_from_the_block_and_its_ordinal() {
    let resources = resources();
    let gateway = container(&resources.gateway_stateful_set);
    let router = container(&resources.router_stateful_set);
    assert_eq!(literal(gateway, "PARLEY_MACHINE_ID_BASE"), "100");
    assert_eq!(literal(gateway, "PARLEY_MACHINE_ID_COUNT"), "10");
    assert_eq!(literal(router, "PARLEY_MACHINE_ID_BASE"), "110");
    assert_eq!(literal(router, "PARLEY_MACHINE_ID_COUNT"), "4");
    for container in [gateway, router] {
        let index = env(container, "PARLEY_POD_INDEX").value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(index.map(|f| f.field_path.as_str()), Some("metadata.labels['apps.kubernetes.io/pod-index']"));
    }
    let too_small = MachineIdBlock { start: 0, size: 13 };
    let error = build(&validated_eu(), too_small).expect_err("block too small");
    assert_eq!(error, Error::InvalidMachineIdBlock { region: "chat-eu".into(), size: 13, needed: 14 });
}

fn keys(data: &BTreeMap<String, String>) -> Vec<&str> {
    data.keys().map(String::as_str).collect()
}

fn template_hash(set: &StatefulSet) -> String {
    let annotations = set.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.annotations.as_ref());
    annotations.map(|a| a[CONFIG_HASH_ANNOTATION].clone()).expect("config hash annotation")
}

#[test]
fn each_component_reads_its_own_config_map_with_only_its_settings() {
    let resources = resources();
    let gateway_data = resources.gateway_config_map.data.as_ref().expect("gateway data");
    let router_data = resources.router_config_map.data.as_ref().expect("router data");
    // Exactly what `parley` reads as a gateway of a router: no Kafka, Cassandra, retention or Snowflake epoch (the
    // router's), no message limits (a gateway reads them from the router).
    assert_eq!(
        keys(gateway_data),
        [
            "PARLEY_ACK_TIMEOUT_MS",
            "PARLEY_ADMIN_LISTEN",
            "PARLEY_CLUSTER",
            "PARLEY_DRAIN_DEADLINE_MS",
            "PARLEY_DRAIN_WINDOW_MS",
            "PARLEY_FANOUT_THRESHOLD",
            "PARLEY_HEARTBEAT_INTERVAL_MS",
            "PARLEY_IDLE_TIMEOUT_MS",
            "PARLEY_LISTEN",
            "PARLEY_MAX_CONNECTIONS",
            "PARLEY_MAX_FRAME_BYTES",
            "PARLEY_MAX_IN_FLIGHT",
            "PARLEY_MAX_RETRANSMITS",
            "PARLEY_MAX_UNACKED",
            "PARLEY_OUTBOUND_QUEUE",
            "PARLEY_REDIS_URL",
            "PARLEY_REGION",
            "PARLEY_ROUTER_URL",
            "PARLEY_SEND_BURST",
            "PARLEY_SEND_RATE_PER_SEC",
        ]
    );
    // Exactly what `parley-router` reads: no client listener, connection limit, drain or delivery setting.
    assert_eq!(
        keys(router_data),
        [
            "PARLEY_CASSANDRA_CONTACT_POINTS",
            "PARLEY_CASSANDRA_KEYSPACE",
            "PARLEY_CASSANDRA_LOCAL_DATACENTER",
            "PARLEY_CASSANDRA_REPLICATION_FACTOR",
            "PARLEY_CLUSTER",
            "PARLEY_FANOUT_THRESHOLD",
            "PARLEY_KAFKA_BOOTSTRAP_SERVERS",
            "PARLEY_KAFKA_TOPIC_PREFIX",
            "PARLEY_MACHINE_ID_QUARANTINE_MS",
            "PARLEY_MAX_CHANNEL_MEMBERS",
            "PARLEY_MAX_TEXT_BYTES",
            "PARLEY_MEMBERSHIP_POLICY",
            "PARLEY_PEER_ROUTERS",
            "PARLEY_REDIS_URL",
            "PARLEY_REGION",
            "PARLEY_RETENTION_DAYS",
            "PARLEY_ROUTER_ADMIN_LISTEN",
            "PARLEY_ROUTER_LISTEN",
            "PARLEY_SNOWFLAKE_EPOCH_MS",
        ]
    );
    for (key, value) in [
        ("PARLEY_REGION", "eu"),
        ("PARLEY_CLUSTER", "chat"),
        ("PARLEY_LISTEN", "0.0.0.0:8080"),
        ("PARLEY_ADMIN_LISTEN", "0.0.0.0:9090"),
        ("PARLEY_HEARTBEAT_INTERVAL_MS", "25000"),
        ("PARLEY_IDLE_TIMEOUT_MS", "75000"),
        ("PARLEY_DRAIN_WINDOW_MS", "30000"),
        ("PARLEY_DRAIN_DEADLINE_MS", "90500"),
        ("PARLEY_MAX_CONNECTIONS", "80000"),
        ("PARLEY_FANOUT_THRESHOLD", "500"),
        ("PARLEY_ACK_TIMEOUT_MS", "5000"),
        ("PARLEY_MAX_RETRANSMITS", "3"),
        ("PARLEY_MAX_UNACKED", "1024"),
        ("PARLEY_REDIS_URL", "redis://redis-eu:6380"),
    ] {
        assert_eq!(gateway_data.get(key).map(String::as_str), Some(value), "gateway {key}");
    }
    for (key, value) in [
        ("PARLEY_REGION", "eu"),
        ("PARLEY_CLUSTER", "chat"),
        ("PARLEY_ROUTER_LISTEN", "0.0.0.0:7070"),
        ("PARLEY_ROUTER_ADMIN_LISTEN", "0.0.0.0:9090"),
        ("PARLEY_FANOUT_THRESHOLD", "500"),
        ("PARLEY_MAX_TEXT_BYTES", "4096"),
        ("PARLEY_MAX_CHANNEL_MEMBERS", "10000"),
        ("PARLEY_RETENTION_DAYS", "30"),
        ("PARLEY_SNOWFLAKE_EPOCH_MS", "1735689600000"),
        ("PARLEY_MACHINE_ID_QUARANTINE_MS", "90000"),
        ("PARLEY_KAFKA_BOOTSTRAP_SERVERS", "kafka-eu:9093"),
        ("PARLEY_CASSANDRA_CONTACT_POINTS", "cassandra-0,cassandra-1"),
        ("PARLEY_CASSANDRA_KEYSPACE", "chat"),
        ("PARLEY_CASSANDRA_LOCAL_DATACENTER", "eu-dc"),
        ("PARLEY_CASSANDRA_REPLICATION_FACTOR", "3"),
        ("PARLEY_REDIS_URL", "redis://redis-eu:6380"),
    ] {
        assert_eq!(router_data.get(key).map(String::as_str), Some(value), "router {key}");
    }
    for (set, config_map) in [
        (&resources.gateway_stateful_set, &resources.gateway_config_map),
        (&resources.router_stateful_set, &resources.router_config_map),
    ] {
        let from = container(set).env_from.as_ref().expect("envFrom");
        assert_eq!(from.len(), 1, "one ConfigMap per container");
        assert_eq!(from[0].config_map_ref.as_ref().map(|c| &c.name), config_map.metadata.name.as_ref());
        assert_eq!(template_hash(set), config_hash(config_map.data.as_ref()));
        let component = set.metadata.labels.as_ref().map(|labels| &labels["app.kubernetes.io/component"]);
        assert_eq!(config_map.metadata.labels.as_ref().map(|labels| &labels["app.kubernetes.io/component"]), component);
    }
    assert_ne!(template_hash(&resources.gateway_stateful_set), template_hash(&resources.router_stateful_set));
    assert_eq!(router_data["PARLEY_ROUTER_LISTEN"], format!("0.0.0.0:{}", container_port(&resources, "internal")));
    // Gateways bootstrap from every router, through the routers' headless Service.
    let router_service = resources.router_headless_service.metadata.name.clone().expect("router service");
    assert_eq!(gateway_data["PARLEY_ROUTER_URL"], format!("http://{router_service}.parley.svc:7070"));
    let internal = resources.router_headless_service.spec.as_ref().and_then(|spec| spec.ports.as_ref());
    assert!(internal.is_some_and(|ports| ports.iter().any(|port| port.port == 7070)), "{internal:?}");
}

fn container_port(resources: &RegionResources, name: &str) -> i32 {
    let ports = container(&resources.router_stateful_set).ports.clone().expect("router ports");
    ports.iter().find(|port| port.name.as_deref() == Some(name)).expect("port").container_port
}

#[test]
fn kafka_topics_are_named_prefix_dash_name() {
    // `kafka.topicPrefix: chat` gives the router `chat-`, so its topics are `chat-messages`, `chat-receipts` and
    // `chat-presence` (the router appends the names to the prefix as is).
    let resources = resources();
    let data = resources.router_config_map.data.as_ref().expect("data");
    assert_eq!(data["PARLEY_KAFKA_TOPIC_PREFIX"], "chat-");
    // The CRD's default prefix gives the router's own default, `parley-`.
    let mut defaults = validated_eu();
    defaults.cluster.spec.kafka = serde_json::from_value(serde_json::json!({})).expect("kafka defaults");
    let resources = build(&defaults, EU_BLOCK).expect("build");
    let data = resources.router_config_map.data.as_ref().expect("data");
    assert_eq!(data["PARLEY_KAFKA_TOPIC_PREFIX"], "parley-");
    let router_default = parley_router::args::Args::command()
        .get_arguments()
        .find(|arg| arg.get_env().is_some_and(|env| env == "PARLEY_KAFKA_TOPIC_PREFIX"))
        .map(|arg| arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>());
    assert_eq!(router_default, Some(vec!["parley-".to_owned()]));
}

/// The names of a container's env entries that come from a Secret.
fn secret_env(container: &Container) -> Vec<&str> {
    container
        .env
        .iter()
        .flatten()
        .filter(|env| env.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).is_some())
        .map(|env| env.name.as_str())
        .collect()
}

#[test]
fn secrets_are_referenced_never_copied() {
    let resources = resources();
    let gateway = container(&resources.gateway_stateful_set);
    assert_eq!(secret_of(gateway, "PARLEY_JWT_HS256_SECRET"), ("chat-jwt".into(), "hs256".into(), None));
    assert_eq!(secret_of(gateway, "PARLEY_ADMIN_TOKEN"), ("chat-admin".into(), "token".into(), None));
    assert_eq!(secret_env(gateway), ["PARLEY_INTERNAL_TOKEN", "PARLEY_JWT_HS256_SECRET", "PARLEY_ADMIN_TOKEN"]);
    // The router serves no client and no admin endpoint: without backend credentials its only Secrets are the
    // Region's internal token and the ChatCluster's peer token.
    let router = container(&resources.router_stateful_set);
    assert_eq!(secret_env(router), ["PARLEY_INTERNAL_TOKEN", "PARLEY_PEER_TOKEN"]);
    assert_eq!(secret_of(router, "PARLEY_PEER_TOKEN"), ("chat-peer-token".into(), "token".into(), None));
    for config_map in [&resources.gateway_config_map, &resources.router_config_map] {
        let config = serde_json::to_string(config_map).expect("json");
        assert!(!config.contains("hs256") && !config.contains("chat-jwt"), "no secret material in the ConfigMap");
    }
}

#[test]
fn rs256_key_is_mounted_from_its_secret() {
    let cluster: ChatCluster = fixture("chatcluster-rs256.yaml");
    let validated =
        validate(Dereferenced { region: us(), cluster: Some(cluster), regions: vec![us()] }).expect("valid");
    let resources = build(&validated, US_BLOCK).expect("build");
    let gateway = container(&resources.gateway_stateful_set);
    assert!(gateway.env.iter().flatten().all(|e| e.name != "PARLEY_JWT_HS256_SECRET"));
    let data = resources.gateway_config_map.data.as_ref().expect("data");
    assert_eq!(data["PARLEY_JWT_RS256_PUBLIC_KEY"], "/etc/parley/jwt/public.pem");
    let router_data = resources.router_config_map.data.as_ref().expect("router data");
    assert!(!router_data.contains_key("PARLEY_JWT_RS256_PUBLIC_KEY"));
    let router_pod = pod_spec(&resources.router_stateful_set);
    assert!(router_pod.volumes.iter().flatten().all(|v| v.name != "jwt"), "the router mounts no key");
    let mount = gateway.volume_mounts.iter().flatten().find(|m| m.name == "jwt").expect("jwt mount");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/parley/jwt", Some(true)));
    let volume = pod_spec(&resources.gateway_stateful_set).volumes.iter().flatten().find(|v| v.name == "jwt");
    assert_eq!(volume.and_then(|v| v.secret.as_ref()).and_then(|s| s.secret_name.as_deref()), Some("chat-jwt"));
    assert_eq!(container(&resources.gateway_stateful_set).image.as_deref(), Some("parley/gateway:0.2.0"));
    // us: 3 fixed gateways and 1 router without declared maximums: IDs for 8 of each.
    assert_eq!(literal(gateway, "PARLEY_MACHINE_ID_COUNT"), "8");
    assert_eq!(literal(container(&resources.router_stateful_set), "PARLEY_MACHINE_ID_BASE"), "8");
    assert_eq!(literal(container(&resources.router_stateful_set), "PARLEY_MACHINE_ID_COUNT"), "8");
}

#[test]
fn services_and_disruption_budgets() {
    let resources = resources();
    let client = resources.gateway_service.spec.as_ref().expect("spec");
    assert_eq!(client.type_.as_deref(), Some("LoadBalancer"));
    let annotations = resources.gateway_service.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["service.beta.kubernetes.io/aws-load-balancer-type"], "nlb");
    let port = &client.ports.as_ref().expect("ports")[0];
    assert_eq!((port.port, port.target_port.clone()), (8080, Some(IntOrString::String("client".into()))));
    let gateway_selector = resources.gateway_stateful_set.spec.as_ref().map(|s| s.selector.match_labels.clone());
    assert_eq!(client.selector.clone(), gateway_selector.clone().flatten());
    for service in [&resources.gateway_headless_service, &resources.router_headless_service] {
        assert_eq!(service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("None"));
    }
    for (budget, set) in [
        (&resources.gateway_disruption_budget, &resources.gateway_stateful_set),
        (&resources.router_disruption_budget, &resources.router_stateful_set),
    ] {
        let spec = budget.spec.as_ref().expect("pdb spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.as_ref().and_then(|s| s.match_labels.clone()),
            set.spec.as_ref().and_then(|s| s.selector.match_labels.clone())
        );
    }
}

#[test]
fn build_is_deterministic() {
    assert_eq!(resources(), resources());
    let json = serde_json::to_value(&resources().gateway_stateful_set).expect("json");
    assert_eq!((json["apiVersion"].as_str(), json["kind"].as_str()), (Some("apps/v1"), Some("StatefulSet")));
}

/// Whether `change` changes the config hash of the gateway's pod template, and of the router's (which rolls them).
fn rolled(change: impl FnOnce(&mut ValidatedRegion)) -> (bool, bool) {
    let before = resources();
    let mut changed = validated_eu();
    change(&mut changed);
    let after = build(&changed, EU_BLOCK).expect("build");
    (
        template_hash(&after.gateway_stateful_set) != template_hash(&before.gateway_stateful_set),
        template_hash(&after.router_stateful_set) != template_hash(&before.router_stateful_set),
    )
}

#[test]
fn a_gateway_only_setting_rolls_only_the_gateways() {
    let only_gateways = (true, false);
    assert_eq!(rolled(|v| v.cluster.spec.gateway.heartbeat_interval_ms = 20_000), only_gateways);
    assert_eq!(rolled(|v| v.cluster.spec.gateway.max_connections = 1_000), only_gateways);
    assert_eq!(rolled(|v| v.cluster.spec.gateway.drain_window_ms = 10_000), only_gateways);
    // spec.router's delivery settings are per connection, on the gateways: they never restart the writer.
    assert_eq!(rolled(|v| v.cluster.spec.router.ack_timeout_ms = 2_000), only_gateways);
    assert_eq!(rolled(|v| v.cluster.spec.router.max_retransmits = 5), only_gateways);
    assert_eq!(rolled(|v| v.cluster.spec.router.max_unacked = 10), only_gateways);
}

#[test]
fn a_router_only_setting_rolls_only_the_router() {
    let only_router = (false, true);
    assert_eq!(rolled(|v| v.cluster.spec.router.retention_days = 7), only_router);
    assert_eq!(rolled(|v| v.cluster.spec.router.max_channel_members = 50), only_router);
    assert_eq!(rolled(|v| v.cluster.spec.kafka.topic_prefix = "other".to_owned()), only_router);
    assert_eq!(rolled(|v| v.kafka_bootstrap_servers = "kafka-eu-2:9093".to_owned()), only_router);
    assert_eq!(rolled(|v| v.region.spec.cassandra.replication_factor = 5), only_router);
    // The router enforces the text limit; gateways of a router read it from the router.
    assert_eq!(rolled(|v| v.cluster.spec.gateway.max_text_bytes = 1_000), only_router);
    let invite = parley_crds::chat_cluster::MembershipPolicy::Invite;
    assert_eq!(rolled(|v| v.cluster.spec.membership_policy = invite), only_router);
}

#[test]
fn a_setting_both_read_rolls_both() {
    assert_eq!(rolled(|v| v.cluster.spec.fanout_threshold = 100), (true, true));
    assert_eq!(rolled(|v| v.redis_url = "redis://redis-eu-2:6380".to_owned()), (true, true));
}

#[test]
fn plan_allocates_disjoint_blocks_and_changes_nothing_on_failure() {
    let now = Timestamp::from_second(1_800_000_000).expect("time");
    let regions = vec![eu(), us()];
    let input = |region| Dereferenced { region, cluster: Some(cluster()), regions: regions.clone() };
    let first = plan(input(eu()), &MachineIdAllocation::default(), now).expect("eu");
    assert_eq!(first.block, MachineIdBlock { start: 0, size: 14 });
    let second = plan(input(us()), &first.allocation, now).expect("us");
    assert_eq!(second.block, MachineIdBlock { start: 14, size: 16 });
    assert_eq!(machine_ids::allocated(&second.allocation), 30);
    let again = plan(input(eu()), &second.allocation, now).expect("eu again");
    assert_eq!(again.allocation, second.allocation, "a no-op reconcile allocates nothing");
    let duplicate = fixture("region-eu-duplicate.yaml");
    let mut all = regions.clone();
    all.push(fixture("region-eu-duplicate.yaml"));
    let error =
        plan(Dereferenced { region: duplicate, cluster: Some(cluster()), regions: all }, &second.allocation, now)
            .expect_err("duplicate");
    assert_eq!(error.reason(), "DuplicateRegion");
}

fn validated_secured() -> ValidatedRegion {
    validate(Dereferenced { region: us(), cluster: Some(secured()), regions: vec![us()] }).expect("valid")
}

/// us: 3 fixed gateways and 1 router, without declared maximums: 8 gateway IDs + 8 router IDs.
const US_BLOCK: MachineIdBlock = MachineIdBlock { start: 0, size: 16 };

fn secured_resources() -> RegionResources {
    build(&validated_secured(), US_BLOCK).expect("build")
}

fn volume<'a>(set: &'a StatefulSet, name: &str) -> Option<&'a Volume> {
    pod_spec(set).volumes.iter().flatten().find(|volume| volume.name == name)
}

fn env_names(container: &Container) -> Vec<&str> {
    container.env.iter().flatten().map(|env| env.name.as_str()).collect()
}

#[test]
fn tls_switches_and_ca_paths_go_to_the_config_maps_of_the_pods_that_connect() {
    let resources = secured_resources();
    let router = resources.router_config_map.data.as_ref().expect("router data");
    let gateway = resources.gateway_config_map.data.as_ref().expect("gateway data");
    for (key, value) in [
        ("PARLEY_KAFKA_TLS", "true"),
        ("PARLEY_KAFKA_TLS_CA_FILE", "/etc/parley/tls/kafka/ca.crt"),
        ("PARLEY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
        ("PARLEY_CASSANDRA_TLS", "true"),
        ("PARLEY_CASSANDRA_TLS_CA_FILE", "/etc/parley/tls/cassandra/ca.crt"),
        ("PARLEY_REDIS_TLS_CA_FILE", "/etc/parley/tls/redis/ca.crt"),
        ("PARLEY_REDIS_URL", "rediss://redis-default:6380"),
    ] {
        assert_eq!(router.get(key).map(String::as_str), Some(value), "router {key}");
    }
    // Gateways talk to Redis only.
    assert_eq!(gateway.get("PARLEY_REDIS_TLS_CA_FILE").map(String::as_str), Some("/etc/parley/tls/redis/ca.crt"));
    assert_eq!(gateway.get("PARLEY_REDIS_URL").map(String::as_str), Some("rediss://redis-default:6380"));
    let backend_keys: Vec<&str> =
        keys(gateway).into_iter().filter(|key| key.contains("KAFKA") || key.contains("CASSANDRA")).collect();
    assert!(backend_keys.is_empty(), "gateway ConfigMap has {backend_keys:?}");
    // No credential reaches a ConfigMap, neither a Secret's name nor a key.
    for config_map in [&resources.router_config_map, &resources.gateway_config_map] {
        let text = serde_json::to_string(config_map).expect("json");
        for secret in ["kafka-user", "cassandra-user", "redis-user", "USERNAME", "PASSWORD", "\"pass\""] {
            assert!(!text.contains(secret), "{secret} in ConfigMap {:?}", config_map.metadata.name);
        }
    }
}

#[test]
fn credentials_are_secret_key_refs_of_the_pods_that_connect() {
    let resources = secured_resources();
    let router = container(&resources.router_stateful_set);
    let gateway = container(&resources.gateway_stateful_set);
    assert_eq!(secret_of(router, "PARLEY_KAFKA_SASL_USERNAME"), ("kafka-user".into(), "username".into(), None));
    assert_eq!(secret_of(router, "PARLEY_KAFKA_SASL_PASSWORD"), ("kafka-user".into(), "password".into(), None));
    assert_eq!(secret_of(router, "PARLEY_CASSANDRA_USERNAME"), ("cassandra-user".into(), "user".into(), None));
    assert_eq!(secret_of(router, "PARLEY_CASSANDRA_PASSWORD"), ("cassandra-user".into(), "pass".into(), None));
    for container in [router, gateway] {
        // Redis' username is optional: a Secret with only a password uses the `default` user.
        assert_eq!(secret_of(container, "PARLEY_REDIS_USERNAME"), ("redis-user".into(), "username".into(), Some(true)));
        assert_eq!(secret_of(container, "PARLEY_REDIS_PASSWORD"), ("redis-user".into(), "password".into(), None));
        for env in container.env.iter().flatten().filter(|env| env.name.ends_with("PASSWORD")) {
            assert!(env.value.is_none(), "{} is a literal", env.name);
        }
    }
    assert_eq!(
        secret_env(gateway),
        ["PARLEY_INTERNAL_TOKEN", "PARLEY_REDIS_USERNAME", "PARLEY_REDIS_PASSWORD", "PARLEY_JWT_HS256_SECRET"]
    );
    assert_eq!(
        secret_env(router),
        [
            "PARLEY_INTERNAL_TOKEN",
            "PARLEY_REDIS_USERNAME",
            "PARLEY_REDIS_PASSWORD",
            "PARLEY_PEER_TOKEN",
            "PARLEY_KAFKA_SASL_USERNAME",
            "PARLEY_KAFKA_SASL_PASSWORD",
            "PARLEY_CASSANDRA_USERNAME",
            "PARLEY_CASSANDRA_PASSWORD"
        ]
    );
}

#[test]
fn ca_bundles_are_secret_volumes_mounted_read_only_where_the_config_points() {
    let resources = secured_resources();
    let cases = [
        (&resources.router_stateful_set, &resources.router_config_map, "kafka", "kafka-ca", "ca.pem"),
        (&resources.router_stateful_set, &resources.router_config_map, "cassandra", "cassandra-ca", "bundle.crt"),
        (&resources.router_stateful_set, &resources.router_config_map, "redis", "redis-ca", "ca.crt"),
        (&resources.gateway_stateful_set, &resources.gateway_config_map, "redis", "redis-ca", "ca.crt"),
    ];
    for (set, config_map, backend, secret_name, key) in cases {
        let name = format!("{backend}-tls-ca");
        let source = volume(set, &name).and_then(|v| v.secret.as_ref()).unwrap_or_else(|| panic!("volume {name}"));
        assert_eq!(source.secret_name.as_deref(), Some(secret_name));
        let items = source.items.clone().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!((items[0].key.as_str(), items[0].path.as_str()), (key, "ca.crt"), "the key becomes ca.crt");
        let mount = container(set).volume_mounts.iter().flatten().find(|m| m.name == name).expect("mount");
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(mount.mount_path, format!("/etc/parley/tls/{backend}"));
        let variable = format!("PARLEY_{}_TLS_CA_FILE", backend.to_uppercase());
        let data = config_map.data.as_ref().expect("data");
        assert_eq!(data[&variable], format!("{}/{}", mount.mount_path, items[0].path), "{variable}");
    }
    // Gateways mount no Kafka or Cassandra CA.
    assert!(volume(&resources.gateway_stateful_set, "kafka-tls-ca").is_none());
    assert!(volume(&resources.gateway_stateful_set, "cassandra-tls-ca").is_none());
}

#[test]
fn without_tls_or_credentials_nothing_of_them_reaches_the_pods() {
    let resources = resources();
    for (set, config_map) in [
        (&resources.gateway_stateful_set, &resources.gateway_config_map),
        (&resources.router_stateful_set, &resources.router_config_map),
    ] {
        let data = config_map.data.as_ref().expect("data");
        let tls: Vec<&str> = keys(data).into_iter().filter(|key| key.contains("TLS") || key.contains("SASL")).collect();
        assert!(tls.is_empty(), "{tls:?}");
        let volumes: Vec<&str> = pod_spec(set).volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["tmp"]);
        let names = env_names(container(set));
        assert!(names.iter().all(|name| !name.contains("USERNAME") && !name.contains("PASSWORD")), "{names:?}");
    }
}

#[test]
fn tls_with_the_system_roots_and_the_default_sasl_mechanism() {
    let mut validated = validated_secured();
    validated.cluster.spec.kafka.tls_ca_secret = None;
    validated.cluster.spec.kafka.sasl_mechanism = None;
    validated.cluster.spec.cassandra.tls_ca_secret = None;
    let resources = build(&validated, US_BLOCK).expect("build");
    let data = resources.router_config_map.data.as_ref().expect("data");
    assert_eq!(data["PARLEY_KAFKA_TLS"], "true");
    assert_eq!(data["PARLEY_CASSANDRA_TLS"], "true");
    assert_eq!(data["PARLEY_KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512", "the default mechanism");
    assert!(!data.contains_key("PARLEY_KAFKA_TLS_CA_FILE") && !data.contains_key("PARLEY_CASSANDRA_TLS_CA_FILE"));
    let router = &resources.router_stateful_set;
    assert!(volume(router, "kafka-tls-ca").is_none() && volume(router, "cassandra-tls-ca").is_none());
    // Credentials without TLS: the credentials still reach the pods (the CRD documentation warns).
    validated.cluster.spec.kafka.tls = false;
    let resources = build(&validated, US_BLOCK).expect("build");
    let data = resources.router_config_map.data.as_ref().expect("data");
    assert!(!data.contains_key("PARLEY_KAFKA_TLS"));
    assert!(env_names(container(&resources.router_stateful_set)).contains(&"PARLEY_KAFKA_SASL_PASSWORD"));
}

#[test]
fn routers_advertise_their_own_pod_and_all_of_them_run() {
    let mut validated = validated_eu();
    validated.region.spec.router.replicas = 3;
    // eu: 10 gateway IDs + 4 router IDs (router.maxReplicas), whatever router.replicas is.
    let resources = build(&validated, EU_BLOCK).expect("build");
    let set = &resources.router_stateful_set;
    assert_eq!(set.spec.as_ref().and_then(|s| s.replicas), Some(3), "router.replicas means what it says");
    let router = container(set);
    assert_eq!(literal(router, "PARLEY_MACHINE_ID_BASE"), "110");
    assert_eq!(literal(router, "PARLEY_MACHINE_ID_COUNT"), "4");
    // PARLEY_ROUTER_ADVERTISE_URL comes right after PARLEY_POD_NAME, which it references (the kubelet expands
    // $(VAR) from earlier entries only).
    let names = env_names(router);
    assert_eq!(names[..2], ["PARLEY_POD_NAME", "PARLEY_ROUTER_ADVERTISE_URL"]);
    assert_eq!(
        literal(router, "PARLEY_ROUTER_ADVERTISE_URL"),
        "http://$(PARLEY_POD_NAME).chat-eu-router-headless.parley.svc:7070"
    );
    assert_eq!(
        router.ports.iter().flatten().find(|p| p.name.as_deref() == Some("internal")).map(|p| p.container_port),
        Some(7070)
    );
    assert!(env_names(container(&resources.gateway_stateful_set)).iter().all(|n| *n != "PARLEY_ROUTER_ADVERTISE_URL"));
    let data = resources.gateway_config_map.data.as_ref().expect("gateway data");
    assert_eq!(data["PARLEY_ROUTER_URL"], "http://chat-eu-router-headless.parley.svc:7070", "every router");
    // At most one router down at a time in a voluntary disruption.
    let budget = resources.router_disruption_budget.spec.as_ref().expect("pdb");
    assert_eq!(budget.max_unavailable, Some(IntOrString::Int(1)));
    // Only the StatefulSet's replicas change with the router count.
    let one = build(&validated_eu(), EU_BLOCK).expect("build");
    assert_eq!(without_replicas(&one), without_replicas(&resources));
}

/// The objects with both StatefulSets' `spec.replicas` cleared: everything that must stay as it is when a Region
/// scales within its maximums.
fn without_replicas(resources: &RegionResources) -> RegionResources {
    let mut resources = resources.clone();
    for set in [&mut resources.gateway_stateful_set, &mut resources.router_stateful_set] {
        if let Some(spec) = set.spec.as_mut() {
            spec.replicas = None;
        }
    }
    resources
}

fn replicas(set: &StatefulSet) -> Option<i32> {
    set.spec.as_ref().and_then(|s| s.replicas)
}

fn template(set: &StatefulSet) -> &PodTemplateSpec {
    &set.spec.as_ref().expect("spec").template
}

/// A named change of a Region's spec.
type Step<'a> = (&'a str, &'a dyn Fn(&mut RegionSpec));

/// Plans `region` once per step (each changing its spec) in turn, as the controller reconciles a Region that is
/// edited: each plan starts from the allocation the previous one left, a minute later.
fn plans(region: Region, steps: &[Step]) -> Vec<(String, Plan)> {
    let mut allocation = MachineIdAllocation::default();
    let mut out = Vec::new();
    for (second, (what, step)) in (0..).step_by(60).zip(steps) {
        let mut region = region.clone();
        step(&mut region.spec);
        // eu replicates to us: both exist.
        let other = if region.metadata.name.as_deref() == Some("chat-eu") { us() } else { eu() };
        let regions = vec![region.clone(), other];
        let input = Dereferenced { region, cluster: Some(cluster()), regions };
        let now = Timestamp::from_second(1_800_000_000 + second).expect("time");
        let plan = plan(input, &allocation, now).unwrap_or_else(|error| panic!("{what}: {error}"));
        allocation = plan.allocation.clone();
        out.push(((*what).to_owned(), plan));
    }
    out
}

/// Every plan has the first one's block, allocation, pod templates, ConfigMaps and objects, `spec.replicas` of the
/// StatefulSets aside; no ID was released.
fn assert_only_replicas_change(plans: &[(String, Plan)]) {
    let (_, first) = &plans[0];
    for (what, plan) in plans {
        let (before, after) = (&first.resources, &plan.resources);
        assert_eq!(plan.block, first.block, "{what}: the machine-ID block");
        assert_eq!(plan.allocation, first.allocation, "{what}: the allocation");
        assert!(plan.allocation.quarantined.is_empty(), "{what}: no ID released");
        assert_eq!(after.gateway_config_map, before.gateway_config_map, "{what}: gateway ConfigMap");
        assert_eq!(after.router_config_map, before.router_config_map, "{what}: router ConfigMap");
        assert_eq!(
            template(&after.gateway_stateful_set),
            template(&before.gateway_stateful_set),
            "{what}: gateway pod template"
        );
        assert_eq!(
            template(&after.router_stateful_set),
            template(&before.router_stateful_set),
            "{what}: router pod template"
        );
        assert_eq!(without_replicas(after), without_replicas(before), "{what}: anything but spec.replicas");
    }
}

#[test]
fn scaling_the_routers_within_their_maximum_changes_only_the_router_replicas() {
    // eu declares router.maxReplicas 4; us declares none (8 by default).
    for region in [eu(), us()] {
        let to = |count: i32| move |spec: &mut RegionSpec| spec.router.replicas = count;
        let steps: [Step; 5] =
            [("3 routers", &to(3)), ("2 routers", &to(2)), ("3 again", &to(3)), ("1 router", &to(1)), ("4", &to(4))];
        let scaled = plans(region, &steps);
        assert_only_replicas_change(&scaled);
        let counts: Vec<Option<i32>> = scaled.iter().map(|(_, p)| replicas(&p.resources.router_stateful_set)).collect();
        assert_eq!(counts, [Some(3), Some(2), Some(3), Some(1), Some(4)]);
        let gateways: Vec<_> = scaled.iter().map(|(_, p)| p.resources.gateway_stateful_set.clone()).collect();
        assert!(gateways.iter().all(|set| *set == gateways[0]), "the gateway StatefulSet is never touched");
    }
    let eu_plans = plans(eu(), &[("eu", &|_: &mut RegionSpec| {})]);
    assert_eq!(eu_plans[0].1.block, MachineIdBlock { start: 0, size: 14 }, "10 gateway + 4 router IDs");
    let us_plans = plans(us(), &[("us", &|_: &mut RegionSpec| {})]);
    assert_eq!(us_plans[0].1.block, MachineIdBlock { start: 0, size: 16 }, "8 gateway + 8 router IDs");
}

#[test]
fn scaling_the_gateways_within_their_maximum_changes_only_the_gateway_replicas() {
    // eu: a range of 2-10, run at minReplicas.
    let min = |count: i32| move |spec: &mut RegionSpec| spec.gateway.min_replicas = Some(count);
    let steps: [Step; 4] = [("min 3", &min(3)), ("min 2", &min(2)), ("min 3 again", &min(3)), ("min 10", &min(10))];
    let ranged = plans(eu(), &steps);
    assert_only_replicas_change(&ranged);
    let counts: Vec<Option<i32>> = ranged.iter().map(|(_, p)| replicas(&p.resources.gateway_stateful_set)).collect();
    assert_eq!(counts, [Some(3), Some(2), Some(3), Some(10)]);
    // us: a fixed count without maxReplicas, sized for 8; and the same with a declared maxReplicas.
    for max in [None, Some(5)] {
        let fixed = move |count: i32| {
            move |spec: &mut RegionSpec| {
                spec.gateway.replicas = Some(count);
                spec.gateway.max_replicas = max;
            }
        };
        let steps: [Step; 4] =
            [("3 gateways", &fixed(3)), ("2 gateways", &fixed(2)), ("3 again", &fixed(3)), ("5", &fixed(5))];
        let fixed_plans = plans(us(), &steps);
        assert_only_replicas_change(&fixed_plans);
        let counts: Vec<Option<i32>> =
            fixed_plans.iter().map(|(_, p)| replicas(&p.resources.gateway_stateful_set)).collect();
        assert_eq!(counts, [Some(3), Some(2), Some(3), Some(5)], "maxReplicas {max:?}");
        let routers: Vec<_> = fixed_plans.iter().map(|(_, p)| p.resources.router_stateful_set.clone()).collect();
        assert!(routers.iter().all(|set| *set == routers[0]), "the router StatefulSet is never touched");
        let gateway = container(&fixed_plans[0].1.resources.gateway_stateful_set);
        assert_eq!(literal(gateway, "PARLEY_MACHINE_ID_COUNT"), max.unwrap_or(8).to_string());
    }
}

#[test]
fn only_a_changed_maximum_resizes_the_block() {
    let block = |change: &dyn Fn(&mut RegionSpec)| plans(us(), &[("us", change)])[0].1.block;
    let size = |change: &dyn Fn(&mut RegionSpec)| block(change).size;
    assert_eq!(size(&|_| {}), 16, "8 gateways and 8 routers by default");
    assert_eq!(size(&|spec| spec.router.max_replicas = Some(64)), 72);
    assert_eq!(size(&|spec| spec.gateway.max_replicas = Some(100)), 108);
    // Beyond the default bound without a declared maximum, the count itself sizes the block (so such a Region
    // should declare its maximum to scale without restarts).
    assert_eq!(size(&|spec| spec.router.replicas = 9), 17);
    assert_eq!(size(&|spec| spec.gateway.replicas = Some(12)), 20);
    // The bound never falls below the pods the Region runs, even if CEL were bypassed.
    assert_eq!(
        size(&|spec| {
            spec.router.replicas = 5;
            spec.router.max_replicas = Some(2);
        }),
        13
    );
    // Declaring the maximums as the counts a Region had keeps the block an operator sized by counts gave it (3
    // fixed gateways + 1 router: 4 IDs), so upgrading to bound-sized blocks restarts nothing.
    assert_eq!(
        size(&|spec| {
            spec.gateway.max_replicas = Some(3);
            spec.router.max_replicas = Some(1);
        }),
        4
    );
}

#[test]
fn both_components_read_the_internal_token_from_the_regions_secret() {
    let resources = resources();
    for set in [&resources.gateway_stateful_set, &resources.router_stateful_set] {
        assert_eq!(
            secret_of(container(set), "PARLEY_INTERNAL_TOKEN"),
            ("chat-eu-internal-token".into(), "token".into(), None)
        );
    }
    assert_eq!(internal_token::secret_name("chat-eu"), "chat-eu-internal-token");
}

#[test]
fn the_internal_token_secret_is_owned_immutable_and_holds_the_token() {
    let validated = validated_eu();
    let token = internal_token::generate().expect("random token");
    let secret = internal_token::secret(&validated, &token);
    assert_eq!(secret.metadata.name.as_deref(), Some("chat-eu-internal-token"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("parley"));
    let owners = secret.metadata.owner_references.as_ref().expect("owners");
    assert_eq!((owners[0].kind.as_str(), owners[0].name.as_str()), ("Region", "chat-eu"));
    assert_eq!(owners[0].controller, Some(true), "garbage-collected with the Region");
    let labels = secret.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["parley.dev/region"], "chat-eu");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "parley-operator");
    assert_eq!(secret.immutable, Some(true), "never overwritten");
    let data = secret.data.as_ref().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["token"]);
    assert_eq!(data["token"].0, token.as_bytes());
    let json = serde_json::to_value(&secret).expect("json");
    assert_eq!((json["apiVersion"].as_str(), json["kind"].as_str()), (Some("v1"), Some("Secret")));
}

#[test]
fn internal_tokens_are_32_random_bytes_in_base64url() {
    let token = internal_token::generate().expect("random token");
    assert_eq!(token.len(), 43, "32 bytes, base64url without padding: {token}");
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{token}");
    assert_ne!(internal_token::generate().expect("random token"), token);
    // RFC 4648's test vectors, in the URL-safe alphabet without padding.
    for (input, expected) in [
        (&b""[..], ""),
        (b"f", "Zg"),
        (b"fo", "Zm8"),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg"),
        (b"fooba", "Zm9vYmE"),
        (b"foobar", "Zm9vYmFy"),
        (&[0xfb, 0xff, 0xbf], "-_-_"),
    ] {
        assert_eq!(internal_token::base64url(input), expected, "{input:?}");
    }
}

fn policy<'a>(resources: &'a RegionResources, name: &str) -> &'a NetworkPolicy {
    resources.network_policies.iter().find(|p| p.metadata.name.as_deref() == Some(name)).expect("policy")
}

#[test]
fn network_policies_open_the_client_port_and_keep_the_routers_to_their_gateways() {
    let resources = resources();
    assert_eq!(resources.network_policies.len(), 2);
    let gateway = serde_json::to_value(policy(&resources, "chat-eu-gateway")).expect("json");
    assert_eq!(gateway["apiVersion"], "networking.k8s.io/v1");
    let selector = |component: &str| {
        json!({"matchLabels": {"app.kubernetes.io/component": component, "parley.dev/cluster": "chat",
                               "parley.dev/region": "chat-eu"}})
    };
    // Egress is not restricted: only Ingress is a policy type.
    assert_eq!(
        gateway["spec"],
        json!({
            "podSelector": selector("gateway"),
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": 8080, "protocol": "TCP"}]},
                {"from": [{"podSelector": {}}], "ports": [{"port": 9090, "protocol": "TCP"}]}
            ]
        })
    );
    let router = serde_json::to_value(policy(&resources, "chat-eu-router")).expect("json");
    assert_eq!(
        router["spec"],
        json!({
            "podSelector": selector("router"),
            "policyTypes": ["Ingress"],
            "ingress": [
                // The Region's gateways, and the routers of the ChatCluster's other Regions.
                {"from": [{"podSelector": selector("gateway")},
                          {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "router",
                                                           "parley.dev/cluster": "chat"}}}],
                 "ports": [{"port": 7070, "protocol": "TCP"}]},
                {"from": [{"podSelector": {}}], "ports": [{"port": 9090, "protocol": "TCP"}]}
            ]
        })
    );
    // The selectors are the workloads' own.
    let gateway_pods = resources.gateway_stateful_set.spec.as_ref().map(|s| s.selector.clone());
    assert_eq!(policy(&resources, "chat-eu-gateway").spec.as_ref().and_then(|s| s.pod_selector.clone()), gateway_pods);
}

#[test]
fn network_policy_admin_peers_and_switch() {
    let resources = secured_resources();
    let monitoring = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]);
    for name in ["chat-us-gateway", "chat-us-router"] {
        let policy = serde_json::to_value(policy(&resources, name)).expect("json");
        assert_eq!(policy["spec"]["ingress"][1]["from"], monitoring, "{name}");
    }
    let mut validated = validated_eu();
    validated.cluster.spec.network_policy.enabled = false;
    let resources = build(&validated, EU_BLOCK).expect("build");
    assert!(resources.network_policies.is_empty(), "disabled: none built, so the operator deletes its own");
}

// ---------------------------------------------------------------------------------------------------------------
// Between Regions: MirrorMaker 2, peers
// ---------------------------------------------------------------------------------------------------------------

fn validated_us(cluster: ChatCluster, regions: Vec<Region>) -> ValidatedRegion {
    validate(Dereferenced { region: us(), cluster: Some(cluster), regions }).expect("valid")
}

fn mm2_value<'a>(properties: &'a str, key: &str) -> Option<&'a str> {
    properties.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

fn properties(resources: &RegionResources) -> String {
    let mirror_maker = resources.mirror_maker.as_ref().expect("a MirrorMaker 2");
    mirror_maker.config_map.data.as_ref().expect("data")[parley_operator::mm2::PROPERTIES_KEY].clone()
}

#[test]
fn the_target_of_a_rule_runs_mirror_maker_and_its_routers_know_the_sources() {
    // eu replicates every topic to us: us runs MirrorMaker 2, eu none.
    assert!(resources().mirror_maker.is_none(), "nothing replicates into eu");
    let us_resources = build(&validated_us(cluster(), vec![eu(), us()]), US_BLOCK).expect("build");
    let mirror_maker = us_resources.mirror_maker.as_ref().expect("a MirrorMaker 2 in us");
    assert_eq!(mirror_maker.config_map.metadata.name.as_deref(), Some("chat-us-mirrormaker-config"));
    assert_eq!(mirror_maker.deployment.metadata.name.as_deref(), Some("chat-us-mirrormaker"));
    for meta in [&mirror_maker.config_map.metadata, &mirror_maker.deployment.metadata] {
        let owner = &meta.owner_references.as_ref().expect("owners")[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Region", "chat-us", Some(true)));
        assert_eq!(meta.labels.as_ref().expect("labels")["parley.dev/region"], "chat-us");
    }
    let text = properties(&us_resources);
    assert_eq!(mm2_value(&text, "clusters"), Some("us,eu"));
    // us has no Kafka of its own: the ChatCluster's; eu has its own.
    assert_eq!(mm2_value(&text, "us.bootstrap.servers"), Some("kafka-default:9092"));
    assert_eq!(mm2_value(&text, "eu.bootstrap.servers"), Some("kafka-eu:9093"));
    assert_eq!(mm2_value(&text, "eu->us.enabled"), Some("true"));
    assert_eq!(
        mm2_value(&text, "eu->us.topics"),
        Some("^chat-beacons$,^chat-memberships$,^chat-messages$,^chat-presence$,^chat-receipts$")
    );
    assert_eq!(mm2_value(&text, "us->eu.enabled"), Some("false"));
    assert_eq!(mm2_value(&text, "us->eu.emit.heartbeats.enabled"), Some("false"));
    assert_eq!(mm2_value(&text, "eu.consumer.isolation.level"), Some("read_committed"));
    // us' kafka.replicationFactor defaults to 3.
    assert_eq!(mm2_value(&text, "replication.factor"), Some("3"));
    assert_eq!(mm2_value(&text, "config.storage.replication.factor"), Some("3"));
    let deployment = mirror_maker.deployment.spec.as_ref().expect("spec");
    assert_eq!(deployment.replicas, Some(1));
    let pod = deployment.template.spec.as_ref().expect("pod");
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("apache/kafka:4.1.0"));
    assert_eq!(
        container.command.as_deref(),
        Some(
            &[
                "/opt/kafka/bin/connect-mirror-maker.sh".to_owned(),
                "/etc/parley/mirrormaker/mm2.properties".to_owned(),
                "--clusters".to_owned(),
                "us".to_owned()
            ][..]
        )
    );
    let hash = deployment.template.metadata.as_ref().and_then(|m| m.annotations.as_ref()).expect("annotations")
        [CONFIG_HASH_ANNOTATION]
        .clone();
    assert_eq!(hash, config_hash(mirror_maker.config_map.data.as_ref()), "a config change rolls the pods");

    // Routers: us mirrors eu; both know each other as peers.
    let us_router = us_resources.router_config_map.data.as_ref().expect("data");
    assert_eq!(us_router["PARLEY_MIRRORED_REGIONS"], "eu");
    assert_eq!(us_router["PARLEY_PEER_ROUTERS"], "eu=http://chat-eu-router-headless.parley.svc:7070");
    let eu_router = resources().router_config_map.data.expect("data");
    assert!(!eu_router.contains_key("PARLEY_MIRRORED_REGIONS"), "nothing is mirrored into eu");
    assert_eq!(eu_router["PARLEY_PEER_ROUTERS"], "us=http://chat-us-router-headless.parley.svc:7070");
}

#[test]
fn a_third_region_joins_the_flows_and_a_peer_url_overrides_the_service() {
    let mut ap = us();
    ap.metadata.name = Some("chat-ap".into());
    ap.metadata.uid = Some("0a9e7d10-0000-4000-8000-0000000000e3".into());
    ap.spec.region_name = "ap".into();
    ap.spec.kafka.bootstrap_servers = Some("kafka-ap:9093".into());
    ap.spec.router.peer_url = Some("https://routers.ap.example.com".into());
    ap.spec.replication = vec![parley_crds::region::ReplicationRule {
        topics: vec!["messages".into(), "messages".into()],
        to_regions: vec!["us".into()],
    }];
    let mut two_pods = cluster();
    two_pods.spec.mirror_maker.replicas = 2;
    two_pods.spec.mirror_maker.refresh_topics_interval_seconds = 10;
    let mut single_broker = us();
    single_broker.spec.kafka.replication_factor = 1;
    let validated =
        validate(Dereferenced { region: single_broker, cluster: Some(two_pods), regions: vec![eu(), ap.clone()] })
            .expect("valid");
    let resources = build(&validated, US_BLOCK).expect("build");
    let text = properties(&resources);
    assert_eq!(mm2_value(&text, "clusters"), Some("us,ap,eu"));
    assert_eq!(mm2_value(&text, "ap->us.topics"), Some("^chat-beacons$,^chat-messages$"));
    assert_eq!(mm2_value(&text, "ap->eu.enabled"), Some("false"));
    assert_eq!(mm2_value(&text, "eu->ap.enabled"), Some("false"));
    assert_eq!(mm2_value(&text, "replication.factor"), Some("1"));
    assert_eq!(mm2_value(&text, "heartbeats.topic.replication.factor"), Some("1"));
    assert_eq!(mm2_value(&text, "refresh.topics.interval.seconds"), Some("10"));
    assert_eq!(mm2_value(&text, "dedicated.mode.enable.internal.rest"), Some("true"));
    assert_eq!(mm2_value(&text, "tasks.max"), Some("2"));
    let deployment = resources.mirror_maker.as_ref().expect("mm2").deployment.spec.as_ref().expect("spec");
    assert_eq!(deployment.replicas, Some(2));
    let router = resources.router_config_map.data.as_ref().expect("data");
    assert_eq!(router["PARLEY_MIRRORED_REGIONS"], "ap,eu");
    assert_eq!(
        router["PARLEY_PEER_ROUTERS"],
        "ap=https://routers.ap.example.com,eu=http://chat-eu-router-headless.parley.svc:7070"
    );
    // Once no rule targets us, it has no MirrorMaker 2 (the controller deletes it as an orphan).
    let mut quiet_eu = eu();
    quiet_eu.spec.replication.clear();
    let validated =
        validate(Dereferenced { region: us(), cluster: Some(cluster()), regions: vec![quiet_eu] }).expect("valid");
    let resources = build(&validated, US_BLOCK).expect("build");
    assert!(resources.mirror_maker.is_none());
    assert!(!resources.router_config_map.data.expect("data").contains_key("PARLEY_MIRRORED_REGIONS"));
}

#[test]
fn mirror_maker_gets_kafka_credentials_from_the_secret_and_the_ca_mounted() {
    let resources = build(&validated_us(secured(), vec![eu(), us()]), US_BLOCK).expect("build");
    let mirror_maker = resources.mirror_maker.as_ref().expect("mm2");
    let text = properties(&resources);
    for alias in ["us", "eu"] {
        assert_eq!(mm2_value(&text, &format!("{alias}.security.protocol")), Some("SASL_SSL"));
        assert_eq!(mm2_value(&text, &format!("{alias}.sasl.mechanism")), Some("SCRAM-SHA-256"));
        assert_eq!(mm2_value(&text, &format!("{alias}.ssl.truststore.type")), Some("PEM"));
        assert_eq!(mm2_value(&text, &format!("{alias}.ssl.truststore.location")), Some("/etc/parley/tls/kafka/ca.crt"));
    }
    assert!(text.contains("username=\"${env:PARLEY_KAFKA_SASL_USERNAME}\""), "{text}");
    let pod = mirror_maker.deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod");
    let container = &pod.containers[0];
    assert_eq!(secret_of(container, "PARLEY_KAFKA_SASL_USERNAME"), ("kafka-user".into(), "username".into(), None));
    assert_eq!(secret_of(container, "PARLEY_KAFKA_SASL_PASSWORD"), ("kafka-user".into(), "password".into(), None));
    let ca = pod.volumes.iter().flatten().find(|volume| volume.name == "kafka-tls-ca").expect("CA volume");
    let secret = ca.secret.as_ref().expect("secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("kafka-ca"));
    assert_eq!(secret.items.as_ref().expect("items")[0].key, "ca.pem");
    let mount = container.volume_mounts.iter().flatten().find(|mount| mount.name == "kafka-tls-ca").expect("mount");
    assert_eq!(mount.mount_path, "/etc/parley/tls/kafka");
    let security = container.security_context.as_ref().expect("security context");
    assert_eq!((security.read_only_root_filesystem, security.run_as_non_root), (Some(true), Some(true)));
    // No credential in the ConfigMap: only references.
    assert!(!text.contains("kafka-user") && !text.to_lowercase().contains("password=\"p"), "{text}");
}

#[test]
fn the_gateway_pod_agent_may_touch_only_its_own_pods() {
    let resources = resources();
    assert_eq!(resources.gateway_service_account.metadata.name.as_deref(), Some("chat-eu-gateway"));
    let rules = resources.gateway_role.rules.clone().expect("rules");
    assert_eq!(rules.len(), 1);
    let rule = &rules[0];
    assert_eq!(rule.resources, Some(vec!["pods".to_owned()]));
    assert_eq!(rule.verbs, vec!["get", "list", "watch", "patch"]);
    let names = rule.resource_names.clone().expect("resource names");
    let bound = usize::try_from(validated_eu().region.spec.gateway.max_replicas_bound()).expect("bound");
    assert_eq!(names.len(), bound);
    assert_eq!(names[0], "chat-eu-gateway-0");
    let binding = &resources.gateway_role_binding;
    assert_eq!(binding.role_ref.name, "chat-eu-gateway-pod-agent");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", "chat-eu-gateway"));
    let env = container(&resources.gateway_stateful_set).env.clone().expect("env");
    assert!(env.iter().any(|e| e.name == "PARLEY_POD_AGENT" && e.value.as_deref() == Some("true")));
}

#[test]
fn push_providers_are_mounted_into_the_routers_only() {
    let mut cluster = cluster();
    cluster.spec.push = Some(
        serde_json::from_value(json!({
            "apns": {
                "keySecret": {"name": "chat-push", "key": "AuthKey.p8"},
                "keyId": "KEY1234567",
                "teamId": "TEAM123456",
                "topic": "dev.parley.app",
            },
            "fcm": {"serviceAccountSecret": {"name": "chat-fcm", "key": "account.json"}, "projectId": "parley-prod"},
            "perUserPerMinute": 30,
        }))
        .expect("push spec"),
    );
    let validated =
        validate(Dereferenced { region: eu(), cluster: Some(cluster), regions: vec![eu(), us()] }).expect("valid");
    let resources = build(&validated, EU_BLOCK).expect("build");
    let data = resources.router_config_map.data.as_ref().expect("router data");
    for (key, value) in [
        ("PARLEY_APNS_KEY", "/etc/parley/push/apns.p8"),
        ("PARLEY_APNS_KEY_ID", "KEY1234567"),
        ("PARLEY_APNS_TEAM_ID", "TEAM123456"),
        ("PARLEY_APNS_TOPIC", "dev.parley.app"),
        ("PARLEY_FCM_SERVICE_ACCOUNT", "/etc/parley/push/fcm.json"),
        ("PARLEY_FCM_PROJECT_ID", "parley-prod"),
        ("PARLEY_PUSH_PER_USER_PER_MINUTE", "30"),
        ("PARLEY_PUSH_BURST_PER_USER", "5"),
    ] {
        assert_eq!(data.get(key).map(String::as_str), Some(value), "{key}");
    }
    let gateway_data = resources.gateway_config_map.data.as_ref().expect("gateway data");
    assert!(gateway_data.keys().all(|key| !key.contains("APNS") && !key.contains("FCM") && !key.contains("PUSH")));
    let router = container(&resources.router_stateful_set);
    let mount = router.volume_mounts.iter().flatten().find(|m| m.name == "push").expect("push mount");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/parley/push", Some(true)));
    let volume = pod_spec(&resources.router_stateful_set).volumes.iter().flatten().find(|v| v.name == "push");
    let sources = volume.and_then(|v| v.projected.as_ref()).and_then(|p| p.sources.as_ref()).expect("projected");
    let files: Vec<(String, String, String)> = sources
        .iter()
        .filter_map(|source| source.secret.as_ref())
        .flat_map(|secret| {
            secret.items.iter().flatten().map(|item| (secret.name.clone(), item.key.clone(), item.path.clone()))
        })
        .collect();
    assert_eq!(
        files,
        [
            ("chat-push".to_owned(), "AuthKey.p8".to_owned(), "apns.p8".to_owned()),
            ("chat-fcm".to_owned(), "account.json".to_owned(), "fcm.json".to_owned()),
        ]
    );
    assert!(pod_spec(&resources.gateway_stateful_set).volumes.iter().flatten().all(|v| v.name != "push"));
    // Every variable is one the router reads.
    let declared: Vec<String> = parley_router::args::Args::command()
        .get_arguments()
        .filter_map(|argument| argument.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for key in data.keys().filter(|key| key.contains("APNS") || key.contains("FCM") || key.contains("PUSH")) {
        assert!(declared.contains(key), "parley-router does not read {key}");
    }
}
