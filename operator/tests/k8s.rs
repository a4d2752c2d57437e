//! End-to-end tests of the operator on a real Kubernetes API server (kube-apiserver, etcd, controller-manager,
//! scheduler, and kwok's fake nodes that make pods Running and Ready). Start the control plane with
//! `e2e/k8s/up.sh /tmp/parley-k8s` and `source /tmp/parley-k8s/env` (stop it with `e2e/k8s/down.sh
//! /tmp/parley-k8s --clean`). Without `KUBECONFIG` a plain `cargo test` skips these tests and the full test
//! command fails them (`parley_test_support::engines`).
//!
//! The CRDs are installed once per run; each test makes its own namespace and runs the `parley-operator` binary
//! as a child process scoped to it (with its own Lease), and reads the operator's `/metrics` on loopback.
//!
//! The operator runs as the Helm chart's ServiceAccount with exactly the chart's RBAC: each test namespace gets the
//! chart's ServiceAccount, Roles and RoleBindings as `helm template` renders them for an operator watching that
//! namespace (helm from `e2e/helm/build.sh`), and the operator's kubeconfig holds a token of that ServiceAccount
//! from the TokenRequest API. A right the operator uses but the chart does not grant fails the tests that need it;
//! `the_chart_grants_the_operator_exactly_what_it_uses` fails on a right granted beyond what it uses.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parley_crds::{ChatCluster, MachineIdBlock, Region};
use serde::Deserialize;
use serde_json::json;

#[path = "common/k8s.rs"]
mod harness;

use harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_example_reconciles_scales_and_releases_its_ids_and_a_noop_writes_nothing() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "dev").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let operator = Operator::start(&ns, "dev-a");
    operator.ready().await;

    // StatefulSets and Services appear with the right spec.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let gateway = eventually("gateway StatefulSet", || get(&sets, "dev-local-gateway")).await;
    let spec = gateway.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("dev-local-gateway-headless"));
    let owner = &gateway.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Region", "dev-local", Some(true)));
    assert_eq!(env_value(&gateway, "PARLEY_MACHINE_ID_BASE").as_deref(), Some("0"));
    let router = eventually("router StatefulSet", || get(&sets, "dev-local-router")).await;
    // 1 gateway and 1 router without declared maximums: IDs for 8 of each.
    assert_eq!(env_value(&router, "PARLEY_MACHINE_ID_BASE").as_deref(), Some("8"));
    let headless = eventually("headless Service", || get(&services, "dev-local-gateway-headless")).await;
    assert_eq!(headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("None"));
    let client_service = eventually("client Service", || get(&services, "dev-local-gateway")).await;
    let client_spec = client_service.spec.as_ref().expect("spec");
    assert_eq!(client_spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(client_spec.ports.as_ref().expect("ports")[0].name.as_deref(), Some("client"));
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let config = eventually("gateway ConfigMap", || get(&config_maps, "dev-local-gateway-config")).await;
    assert_eq!(config.data.as_ref().and_then(|d| d.get("PARLEY_REGION")).map(String::as_str), Some("local"));
    let config = eventually("router ConfigMap", || get(&config_maps, "dev-local-router-config")).await;
    assert_eq!(
        config.data.as_ref().and_then(|d| d.get("PARLEY_KAFKA_TOPIC_PREFIX")).map(String::as_str),
        Some("parley-")
    );
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    eventually("gateway PDB", || get(&budgets, "dev-local-gateway")).await;
    // The gateways bootstrap from every router; each router advertises its own pod.
    let gateway_config = get(&config_maps, "dev-local-gateway-config").await.expect("gateway ConfigMap");
    let router_url = gateway_config.data.as_ref().and_then(|d| d.get("PARLEY_ROUTER_URL")).cloned();
    assert_eq!(router_url, Some(format!("http://dev-local-router-headless.{}.svc:7070", ns.name)));
    assert_eq!(
        env_value(&router, "PARLEY_ROUTER_ADVERTISE_URL"),
        Some(format!("http://$(PARLEY_POD_NAME).dev-local-router-headless.{}.svc:7070", ns.name))
    );

    // The internal token: created once by the operator (which may not read it back), owned by the Region.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let token = eventually("internal token Secret", || internal_token(&secrets, "dev-local")).await;
    assert_eq!(token.len(), 43, "32 random bytes, base64url: {token}");
    let secret = get(&secrets, "dev-local-internal-token").await.expect("secret");
    let owner = &secret.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Region", "dev-local", Some(true)));
    assert_eq!(secret.immutable, Some(true));
    // The NetworkPolicies: the routers' internal port only from the Region's gateways.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    let router_policy = eventually("router NetworkPolicy", || get(&policies, "dev-local-router")).await;
    let ingress = router_policy.spec.as_ref().and_then(|s| s.ingress.clone()).expect("ingress");
    let from = ingress[0].from.as_ref().and_then(|from| from[0].pod_selector.as_ref()?.match_labels.clone());
    assert_eq!(from.as_ref().map(|labels| labels["app.kubernetes.io/component"].as_str()), Some("gateway"));
    eventually("gateway NetworkPolicy", || get(&policies, "dev-local-gateway")).await;

    // kwok makes the pods Ready, and the status follows.
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let region = region_ready(&regions, "dev-local").await;
    let status = region.status.as_ref().expect("status");
    assert_eq!(status.gateways.as_deref(), Some("1/1"));
    assert_eq!(status.routers.as_deref(), Some("1/1"));
    assert_eq!(status.machine_id_block, Some(MachineIdBlock { start: 0, size: 16 }));
    assert_eq!(condition(&status.conditions, "Degraded").map(|c| c.0).as_deref(), Some("False"));
    assert_eq!(status.internal_token_secret.as_deref(), Some("dev-local-internal-token"));
    assert_eq!(status.network_policies, ["dev-local-gateway", "dev-local-router"]);
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    let cluster = eventually("ChatCluster Ready", || async {
        let cluster = get(&clusters, "dev").await?;
        let status = cluster.status.as_ref()?;
        (condition(&status.conditions, "Ready")?.0 == "True").then_some(cluster)
    })
    .await;
    let cluster_status = cluster.status.as_ref().expect("status");
    assert_eq!(cluster_status.regions_ready.as_deref(), Some("1/1"));
    assert_eq!(cluster_status.machine_ids_allocated, Some(16));
    assert_eq!(cluster_status.regions[0].gateways_ready, 1);

    // kubectl shows the printer columns, and the category lists both kinds.
    let table = kubectl_ok(&["get", "chatclusters,regions", "-n", &ns.name]);
    for column in ["VERSION", "REGIONS", "MACHINE IDS", "READY", "REASON", "CLUSTER", "GATEWAYS", "ROUTERS"] {
        assert!(table.contains(column), "missing column {column} in:\n{table}");
    }
    assert!(table.contains("AllRegionsReady") && table.contains("0-15") && table.contains("1/1"), "{table}");
    let category = kubectl_ok(&["get", "parley", "-n", &ns.name]);
    assert!(
        category.contains("chatcluster.parley.dev/dev") && category.contains("region.parley.dev/dev-local"),
        "{category}"
    );

    // A no-op reconcile writes nothing: touch an unrelated annotation of the ChatCluster (which reconciles its
    // Regions), then restart the operator (which reconciles everything); no resourceVersion moves.
    settle(&operator).await;
    let before = operator.metrics().await;
    kubectl_ok(&["annotate", "-n", &ns.name, "chatcluster/dev", "e2e.parley.dev/touched=1"]);
    let versions = resource_versions(&client, &ns.name).await;
    reconciles_after(&operator, before.reconciles(), 1.0).await;
    assert_eq!(resource_versions(&client, &ns.name).await, versions, "a no-op reconcile changed an object");
    assert_eq!(operator.metrics().await.writes(), before.writes(), "a no-op reconcile wrote");
    operator.terminate();
    let operator = Operator::start(&ns, "dev-b");
    operator.ready().await;
    reconciles_after(&operator, 0.0, 1.0).await;
    assert_eq!(resource_versions(&client, &ns.name).await, versions, "a restarted operator changed an object");
    assert_eq!(operator.metrics().await.writes(), 0.0, "a restarted operator wrote:\n{}", operator.metrics().await.0);
    assert_eq!(internal_token(&secrets, "dev-local").await, Some(token), "the token Secret is never overwritten");

    // An object labelled with the Region and controlled by it, but no longer built, is deleted as an orphan.
    let region = get(&regions, "dev-local").await.expect("region");
    let orphan: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "dev-local-stale", "labels": {"parley.dev/region": "dev-local",
                     "app.kubernetes.io/managed-by": "parley-operator"},
                     "ownerReferences": [{"apiVersion": "parley.dev/v1alpha1", "kind": "Region", "name": "dev-local",
                                          "uid": region.uid().expect("uid"), "controller": true}]},
        "data": {"old": "setting"}
    }))
    .expect("config map");
    config_maps.create(&PostParams::default(), &orphan).await.expect("create orphan");
    eventually("orphan deleted", || async { get(&config_maps, "dev-local-stale").await.is_none().then_some(()) }).await;
    // The reconcile that deleted it also records an "Applied" Event, maybe a moment after the delete is visible:
    // wait for it to finish, then count the writes to objects.
    settle(&operator).await;
    let metrics = operator.metrics().await;
    assert_eq!(metrics.writes_of("delete"), 1.0, "the orphan's delete:\n{}", metrics.0);
    assert_eq!(metrics.writes_of("apply"), 0.0, "nothing else applied:\n{}", metrics.0);
    for name in ["dev-local-gateway-config", "dev-local-router-config"] {
        assert!(get(&config_maps, name).await.is_some(), "the desired ConfigMap {name} stays");
    }

    // The StatefulSet follows the Region's replicas, and scaling within the maximums changes nothing else: the
    // other StatefulSet and both ConfigMaps keep their resourceVersion, the pod template stays as it was (so no pod
    // restarts), and the machine-ID block stays.
    for (component, replicas, other) in [("gateway", 3, "router"), ("router", 2, "gateway")] {
        let set_name = format!("dev-local-{component}");
        let before = get(&sets, &set_name).await.expect("StatefulSet");
        let other_before = get(&sets, &format!("dev-local-{other}")).await.expect("other StatefulSet");
        let config_versions = |maps: Vec<ConfigMap>| -> Vec<Option<String>> {
            maps.iter().map(|map| map.metadata.resource_version.clone()).collect()
        };
        let config_before = config_versions(config_maps.list(&ListParams::default()).await.expect("list").items);
        let patched = Instant::now();
        regions
            .patch(
                "dev-local",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {component: {"replicas": replicas}}})),
            )
            .await
            .expect("scale");
        let after = eventually(&format!("{component} StatefulSet scaled to {replicas}"), || async {
            let set = get(&sets, &set_name).await?;
            (set.spec.as_ref()?.replicas == Some(replicas)).then_some(set)
        })
        .await;
        eprintln!("{component} StatefulSet scaled {:.2} s after the Region patch", patched.elapsed().as_secs_f64());
        let region = eventually(&format!("Region with {replicas} ready {component}s"), || async {
            let region = get(&regions, "dev-local").await?;
            let status = region.status.as_ref()?;
            let wanted = format!("{replicas}/{replicas}");
            let counts = if component == "gateway" { &status.gateways } else { &status.routers };
            (counts.as_deref() == Some(wanted.as_str())
                && status.observed_generation == region.metadata.generation
                && condition(&status.conditions, "Ready")?.0 == "True")
                .then_some(region)
        })
        .await;
        let template = |set: &StatefulSet| set.spec.as_ref().map(|spec| spec.template.clone());
        assert_eq!(template(&after), template(&before), "scaling the {component}s changed their pod template");
        let other_after = get(&sets, &format!("dev-local-{other}")).await.expect("other StatefulSet");
        assert_eq!(
            other_after.metadata.resource_version, other_before.metadata.resource_version,
            "scaling the {component}s wrote the {other} StatefulSet"
        );
        let config_after = config_versions(config_maps.list(&ListParams::default()).await.expect("list").items);
        assert_eq!(config_after, config_before, "scaling the {component}s wrote a ConfigMap");
        let block = region.status.as_ref().and_then(|s| s.machine_id_block);
        assert_eq!(block, Some(MachineIdBlock { start: 0, size: 16 }), "scaling the {component}s moved the block");
    }
    let block = MachineIdBlock { start: 0, size: 16 };

    // A gateway-only setting changes the gateways' ConfigMap and pod template only: the routers' StatefulSet and
    // ConfigMap are not written, so no router restarts.
    let router_set = get(&sets, "dev-local-router").await.expect("router StatefulSet");
    let router_config = get(&config_maps, "dev-local-router-config").await.expect("router ConfigMap");
    let gateway_hash = |set: &StatefulSet| {
        set.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("parley.dev/config-hash").cloned()
    };
    let hash_before = gateway_hash(&get(&sets, "dev-local-gateway").await.expect("gateway StatefulSet"));
    let idle = json!({"spec": {"gateway": {"idleTimeoutMs": 91000}}});
    clusters.patch("dev", &PatchParams::default(), &Patch::Merge(idle)).await.expect("a gateway-only setting");
    eventually("the gateways' template follows their new ConfigMap", || async {
        let set = get(&sets, "dev-local-gateway").await?;
        (gateway_hash(&set) != hash_before).then_some(())
    })
    .await;
    settle(&operator).await;
    let router_after = get(&sets, "dev-local-router").await.expect("router StatefulSet");
    assert_eq!(
        router_after.metadata.resource_version, router_set.metadata.resource_version,
        "a gateway-only setting wrote the router StatefulSet"
    );
    let router_config_after = get(&config_maps, "dev-local-router-config").await.expect("router ConfigMap");
    assert_eq!(router_config_after.metadata.resource_version, router_config.metadata.resource_version);

    // NetworkPolicies turned off: the operator deletes the ones it made.
    let off = json!({"spec": {"networkPolicy": {"enabled": false}}});
    clusters.patch("dev", &PatchParams::default(), &Patch::Merge(off)).await.expect("turn NetworkPolicies off");
    eventually("NetworkPolicies deleted", || async {
        let none = policies.list(&ListParams::default()).await.ok()?.items.is_empty();
        let status = get(&regions, "dev-local").await?.status?;
        (none && status.network_policies.is_empty()).then_some(())
    })
    .await;

    // Deleting the Region: the finalizer keeps it while the keyspace may still replicate to its datacenter (here
    // the operator cannot reach this Cassandra, so it cannot tell), with a condition that says what to do.
    regions.delete("dev-local", &DeleteParams::default()).await.expect("delete region");
    let blocked = eventually("Region kept with DeletionBlocked", || async {
        let region = get(&regions, "dev-local").await?;
        let blocked = region.status?.conditions.into_iter().find(|c| c.type_ == "DeletionBlocked")?;
        (blocked.status == "True").then_some(blocked)
    })
    .await;
    assert_eq!(blocked.reason, "CassandraUnavailable");
    assert!(
        blocked.message.contains("parley.dev/cassandra-release-datacenter: \"datacenter1\""),
        "{}",
        blocked.message
    );
    assert!(get(&sets, "dev-local-gateway").await.is_some(), "nothing is deleted while the Region waits");
    // Released by the user: the finalizer quarantines its block, and the owned objects go.
    kubectl_ok(&[
        "annotate",
        "-n",
        &ns.name,
        "region/dev-local",
        "parley.dev/cassandra-release-datacenter=datacenter1",
    ]);
    eventually("Region gone", || async { get(&regions, "dev-local").await.is_none().then_some(()) }).await;
    let cluster = get(&clusters, "dev").await.expect("cluster");
    let allocation = cluster.status.as_ref().and_then(|s| s.machine_id_allocation.clone()).expect("allocation");
    assert!(allocation.blocks.is_empty(), "{allocation:?}");
    assert!(
        allocation.quarantined.iter().any(|q| q.region == "dev-local" && q.block == block),
        "released block not quarantined: {allocation:?}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await.expect("events").items.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.iter().any(|r| r == "MachineIdsReleased"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "CassandraUnchecked"), "{reasons:?}");
    eventually("owned StatefulSets garbage-collected", || async {
        sets.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    eventually("the token Secret and the NetworkPolicies garbage-collected", || async {
        let gone = get(&secrets, "dev-local-internal-token").await.is_none()
            && policies.list(&ListParams::default()).await.ok()?.items.is_empty();
        gone.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_regions_get_disjoint_machine_ids_and_become_ready() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "prod").await;
    apply_file(&ns.name, "examples/production.yaml");
    // A token Secret that exists before the operator (made by a person, say) is kept as it is.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let preset: Secret = serde_json::from_value(json!({
        "metadata": {"name": "chat-us-east-internal-token"}, "stringData": {"token": "a-token-made-by-a-person"}
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &preset).await.expect("create the token Secret");
    let _operator = Operator::start(&ns, "prod");
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let names = ["chat-eu-west", "chat-us-east", "chat-ap-south"];
    let mut blocks = Vec::new();
    for name in names {
        let region = region_ready(&regions, name).await;
        let block = region.status.as_ref().and_then(|s| s.machine_id_block).expect("block");
        let gateway = get(&sets, &format!("{name}-gateway")).await.expect("gateway set");
        let router = get(&sets, &format!("{name}-router")).await.expect("router set");
        let gateway_base: u32 = env_value(&gateway, "PARLEY_MACHINE_ID_BASE").expect("base").parse().expect("number");
        let router_base: u32 = env_value(&router, "PARLEY_MACHINE_ID_BASE").expect("base").parse().expect("number");
        let router_count: u32 = env_value(&router, "PARLEY_MACHINE_ID_COUNT").expect("count").parse().expect("number");
        assert_eq!(gateway_base, u32::from(block.start), "{name}");
        assert!(router_base > gateway_base && router_base + router_count == block.end(), "{name}: {block:?}");
        // Several routers per Region, with machine IDs for as many as it may run; the API server accepted the TLS
        // volumes.
        let replicas = region.spec.router.replicas;
        assert_eq!(router.spec.as_ref().and_then(|s| s.replicas), Some(replicas), "{name}");
        let bound = region.spec.router.max_replicas_bound();
        assert_eq!(router_count, u32::try_from(bound).expect("positive"), "{name}");
        assert_eq!(
            router_base - gateway_base,
            u32::try_from(region.spec.gateway.max_replicas_bound()).expect("positive")
        );
        assert!(replicas > 1, "{name}: the production example runs several routers");
        let volumes: Vec<String> = router
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref()?.volumes.clone())
            .into_iter()
            .flatten()
            .map(|v| v.name)
            .collect();
        for volume in ["kafka-tls-ca", "cassandra-tls-ca", "redis-tls-ca"] {
            assert!(volumes.iter().any(|v| v == volume), "{name}: no {volume} in {volumes:?}");
        }
        assert!(internal_token(&secrets, name).await.is_some(), "{name}: no internal token Secret");
        blocks.push((name, block));
    }
    for (i, (a, block_a)) in blocks.iter().enumerate() {
        for (b, block_b) in &blocks[i + 1..] {
            assert!(!block_a.overlaps(block_b), "{a} {block_a:?} overlaps {b} {block_b:?}");
        }
    }
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    let cluster = eventually("ChatCluster 3/3 Ready", || async {
        let cluster = get(&clusters, "chat").await?;
        let status = cluster.status.as_ref()?;
        (status.regions_ready.as_deref() == Some("3/3") && condition(&status.conditions, "Ready")?.0 == "True")
            .then_some(cluster)
    })
    .await;
    assert_eq!(internal_token(&secrets, "chat-us-east").await.as_deref(), Some("a-token-made-by-a-person"));
    // Every Region receives topics from the two others: each runs MirrorMaker 2 with two pods, and the routers share
    // the ChatCluster's peer token.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    for name in names {
        let deployment = get(&deployments, &format!("{name}-mirrormaker")).await.expect("MirrorMaker 2");
        assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2), "{name}");
    }
    let peer = get(&secrets, "chat-peer-token").await.expect("peer token Secret");
    assert_eq!(peer.owner_references()[0].kind, "ChatCluster");
    let status = cluster.status.expect("status");
    let total: u32 = blocks.iter().map(|(_, block)| u32::from(block.size)).sum();
    assert_eq!(status.machine_ids_allocated, Some(i32::try_from(total).expect("fits")));
    assert_eq!(status.regions.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_reject_invalid_specs_with_their_messages() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "cel").await;
    let region = |region_name: &str, extra: serde_json::Value| {
        let mut spec = json!({"clusterRef": "dev", "regionName": region_name, "cassandra": {"datacenter": "dc1"},
                              "gateway": {"replicas": 1}, "router": {"replicas": 1}});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value::<Region>(json!({"apiVersion": "parley.dev/v1alpha1", "kind": "Region",
            "metadata": {"name": "r"}, "spec": spec}))
        .expect("region")
    };
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let self_replicating = region("eu", json!({"replication": [{"topics": ["*"], "toRegions": ["eu"]}]}));
    let error = regions.create(&PostParams::default(), &self_replicating).await.expect_err("self replication");
    assert!(error.to_string().contains("a Region cannot replicate to itself"), "{error}");
    let none = region("eu", json!({"router": {"replicas": 0}}));
    let error = regions.create(&PostParams::default(), &none).await.expect_err("no router");
    assert!(error.to_string().contains("router.replicas must be between 1 and 64"), "{error}");
    let peer = region("eu", json!({"router": {"replicas": 1, "peerUrl": "ftp://routers.example.com"}}));
    let error = regions.create(&PostParams::default(), &peer).await.expect_err("not an http URL");
    assert!(error.to_string().contains("router.peerUrl must be an http:// or https:// URL"), "{error}");
    let factor = region("eu", json!({"kafka": {"replicationFactor": 0}}));
    let error = regions.create(&PostParams::default(), &factor).await.expect_err("no replicas");
    assert!(error.to_string().contains("kafka.replicationFactor must be between 1 and 9"), "{error}");
    let mixed = region("eu", json!({"redis": {"url": "redis://a:6379,rediss://b:6380"}}));
    let error = regions.create(&PostParams::default(), &mixed).await.expect_err("mixed schemes");
    assert!(error.to_string().contains("must all use the same scheme"), "{error}");
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    let cluster = |name: &str, kafka: serde_json::Value, redis: serde_json::Value| -> ChatCluster {
        serde_json::from_value(json!({"apiVersion": "parley.dev/v1alpha1",
            "kind": "ChatCluster", "metadata": {"name": name}, "spec": {"version": "0.1.0", "kafka": kafka,
            "cassandra": {"contactPoints": ["cassandra"], "keyspace": "chat", "tls": true,
                          "tlsCaSecret": {"name": "cassandra-ca", "key": "ca.crt"},
                          "credentials": {"secretName": "cassandra"}},
            "redis": redis, "auth": {"jwtAlgorithm": "HS256", "jwtKeySecret": {"name": "jwt", "key": "hs256"}}}}))
        .expect("cluster")
    };
    // TLS and credentials for every engine are accepted (and the API server defaults tls to false).
    let secured = cluster(
        "secured",
        json!({"bootstrapServers": "kafka:9093", "tls": true, "tlsCaSecret": {"name": "kafka-ca", "key": "ca.crt"},
               "saslMechanism": "SCRAM-SHA-256", "credentials": {"secretName": "kafka"}}),
        json!({"url": "rediss://redis:6380", "tlsCaSecret": {"name": "redis-ca", "key": "ca.crt"},
               "credentials": {"secretName": "redis"}}),
    );
    clusters.create(&PostParams::default(), &secured).await.expect("TLS and credentials are accepted");
    let inconsistent = cluster(
        "inconsistent",
        json!({"bootstrapServers": "kafka:9092", "tlsCaSecret": {"name": "kafka-ca", "key": "ca.crt"},
               "saslMechanism": "PLAIN"}),
        json!({"url": "redis://redis:6379", "tlsCaSecret": {"name": "redis-ca", "key": "ca.crt"}}),
    );
    let mut slow = serde_json::to_value(&secured).expect("json");
    slow["metadata"] = json!({"name": "slow"});
    slow["spec"]["mirrorMaker"] = json!({"replicas": 0, "refreshTopicsIntervalSeconds": 600});
    let slow: ChatCluster = serde_json::from_value(slow).expect("cluster");
    let error = clusters.create(&PostParams::default(), &slow).await.expect_err("MirrorMaker 2 bounds");
    for message in [
        "mirrorMaker.replicas must be between 1 and 16",
        "mirrorMaker.refreshTopicsIntervalSeconds must be between 5 and 60",
    ] {
        assert!(error.to_string().contains(message), "{message}: {error}");
    }
    let error = clusters.create(&PostParams::default(), &inconsistent).await.expect_err("CA bundles without TLS");
    for message in [
        "kafka.tlsCaSecret needs kafka.tls: true",
        "kafka.saslMechanism needs kafka.credentials",
        "redis.tlsCaSecret needs a rediss:// (TLS) redis.url",
    ] {
        assert!(error.to_string().contains(message), "{message}: {error}");
    }
    // A mechanism the router does not know (the Rust type cannot even hold it, so kubectl sends it).
    let mut unknown = serde_json::to_value(&secured).expect("json");
    unknown["metadata"] = json!({"name": "unknown", "namespace": ns.name});
    unknown["spec"]["kafka"]["saslMechanism"] = json!("GSSAPI");
    let file = std::env::temp_dir().join(format!("parley-unknown-sasl-{}.json", ns.name));
    std::fs::write(&file, unknown.to_string()).expect("write");
    let output = kubectl(&["create", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("saslMechanism") && stderr.contains("GSSAPI"), "{stderr}");
    regions.create(&PostParams::default(), &region("eu", json!({}))).await.expect("valid region");
    let error = regions
        .patch("r", &PatchParams::default(), &Patch::Merge(json!({"spec": {"regionName": "us"}})))
        .await
        .expect_err("immutable");
    assert!(error.to_string().contains("regionName is immutable"), "{error}");
    // kubectl shows the same message.
    let output =
        kubectl(&["patch", "-n", &ns.name, "region/r", "--type=merge", "-p", r#"{"spec":{"clusterRef":"other"}}"#]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("clusterRef is immutable"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_region_name_is_degraded_with_an_event_and_nothing_applied() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "dup").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let mut duplicate = get(&regions, "dev-local").await.expect("dev-local");
    duplicate.metadata = serde_json::from_value(json!({"name": "dev-local-2"})).expect("metadata");
    duplicate.status = None;
    regions.create(&PostParams::default(), &duplicate).await.expect("create duplicate");
    let _operator = Operator::start(&ns, "dup");
    region_ready(&regions, "dev-local").await;
    let degraded = eventually("dev-local-2 Degraded", || async {
        let region = get(&regions, "dev-local-2").await?;
        let status = region.status?;
        let degraded = status.conditions.into_iter().find(|c| c.type_ == "Degraded")?;
        (degraded.status == "True").then_some(degraded)
    })
    .await;
    assert_eq!(degraded.reason, "DuplicateRegion");
    assert!(
        degraded.message.contains("which region dev-local of chat cluster dev already uses"),
        "{}",
        degraded.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("DuplicateRegion Event", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("DuplicateRegion")
                    && e.regarding.and_then(|r| r.name).as_deref() == Some("dev-local-2")
            })
            .then_some(())
    })
    .await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let theirs = sets.list(&ListParams::default().labels("parley.dev/region=dev-local-2")).await.expect("list");
    assert!(theirs.items.is_empty(), "a degraded Region got objects");
    let cluster = get(&Api::<ChatCluster>::namespaced(client.clone(), &ns.name), "dev").await.expect("cluster");
    let allocation = cluster.status.and_then(|s| s.machine_id_allocation).expect("allocation");
    assert!(allocation.blocks.iter().all(|b| b.region != "dev-local-2"), "a degraded Region got machine ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_another_replica_takes_over() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "lease").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let first = Operator::start(&ns, "replica-a");
    let second = Operator::start(&ns, "replica-b");
    first.ready().await;
    second.ready().await;
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    region_ready(&regions, "dev-local").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = get(&leases, "parley-operator")
        .await
        .and_then(|lease| lease.spec?.holder_identity)
        .expect("the lease has a holder");
    let (leader, follower) = if holder == first.identity { (first, second) } else { (second, first) };
    assert_eq!(leader.identity, holder);
    let leader_metrics = leader.metrics().await;
    let follower_metrics = follower.metrics().await;
    assert!(leader_metrics.reconciles() >= 1.0 && leader_metrics.writes() >= 1.0);
    assert_eq!(leader_metrics.value("parley_operator_leader"), 1.0);
    assert_eq!(follower_metrics.reconciles(), 0.0, "the follower reconciled");
    assert_eq!(follower_metrics.writes(), 0.0, "the follower wrote");
    assert_eq!(follower_metrics.value("parley_operator_leader"), 0.0);

    // The leader dies without releasing the Lease: the follower takes over once it expires (6 s).
    leader.kill();
    let killed = Instant::now();
    regions
        .patch("dev-local", &PatchParams::default(), &Patch::Merge(json!({"spec": {"gateway": {"replicas": 2}}})))
        .await
        .expect("scale gateways");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    eventually("the new leader scales the gateways", || async {
        let set = get(&sets, "dev-local-gateway").await?;
        (set.spec.as_ref()?.replicas == Some(2)).then_some(())
    })
    .await;
    eprintln!("takeover after {:?}", killed.elapsed());
    let holder = get(&leases, "parley-operator").await.and_then(|lease| lease.spec?.holder_identity);
    assert_eq!(holder.as_deref(), Some(follower.identity.as_str()));
    assert_eq!(follower.metrics().await.value("parley_operator_leader"), 1.0);

    // Someone else takes the Lease: the holder stops at once (its watchdog sees the new holder) and exits with
    // an error, so it never writes next to another leader.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    leases
        .patch(
            "parley-operator",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 60}}),
            ),
        )
        .await
        .expect("steal the lease");
    let stolen = Instant::now();
    let mut follower = follower;
    let status = loop {
        if let Some(status) = follower.child.try_wait().expect("wait") {
            break status;
        }
        assert!(stolen.elapsed() < Duration::from_secs(5), "the deposed leader kept running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "a deposed leader exits with an error");
    let log = std::fs::read_to_string(&follower.log).unwrap_or_default();
    assert!(log.contains("is held by intruder"), "{}", follower.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_machine_ids_degrade_a_region_until_a_quarantined_block_expires() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "ids").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    clusters
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"snowflake": {"machineIdQuarantineSeconds": 5}}})),
        )
        .await
        .expect("short quarantine");
    // Two Regions that may each grow to 512 gateways + 8 routers (the default bound): 520 IDs each, and dev-local
    // holds 16 of 1024.
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    for (name, region_name) in [("big-a", "a"), ("big-b", "b")] {
        let region: Region = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "Region", "metadata": {"name": name},
            "spec": {"clusterRef": "dev", "regionName": region_name, "cassandra": {"datacenter": "dc1"},
                     "gateway": {"minReplicas": 1, "maxReplicas": 512}, "router": {"replicas": 1}}
        }))
        .expect("region");
        regions.create(&PostParams::default(), &region).await.expect("create region");
    }
    let _operator = Operator::start(&ns, "ids");
    region_ready(&regions, "dev-local").await;
    let (winner, loser) = eventually("one big region ready and one exhausted", || async {
        let a = get(&regions, "big-a").await?;
        let b = get(&regions, "big-b").await?;
        let state = |region: &Region| {
            let conditions = region.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
            (condition(&conditions, "Ready"), condition(&conditions, "Degraded"))
        };
        let exhausted =
            |region: &Region| state(region).1 == Some(("True".to_owned(), "MachineIdsExhausted".to_owned()));
        let ready = |region: &Region| state(region).0.is_some_and(|ready| ready.0 == "True");
        if ready(&a) && exhausted(&b) {
            Some((a, b))
        } else if ready(&b) && exhausted(&a) {
            Some((b, a))
        } else {
            None
        }
    })
    .await;
    let loser_name = loser.name_any();
    let message = loser
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("needs 520 contiguous machine ids"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("MachineIdsExhausted Event", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("MachineIdsExhausted")
                    && e.regarding.and_then(|r| r.name).as_deref() == Some(loser_name.as_str())
            })
            .then_some(())
    })
    .await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let theirs =
        sets.list(&ListParams::default().labels(&format!("parley.dev/region={loser_name}"))).await.expect("list");
    assert!(theirs.items.is_empty(), "an exhausted Region got objects");

    // The winner goes (its datacenter released up front: this Cassandra cannot be reached); its block is
    // quarantined for 5 s, then the other Region gets it.
    let winner_block = winner.status.as_ref().and_then(|s| s.machine_id_block).expect("block");
    let release = format!("parley.dev/cassandra-release-datacenter={}", winner.spec.cassandra.datacenter);
    kubectl_ok(&["annotate", "-n", &ns.name, &format!("region/{}", winner.name_any()), &release]);
    regions.delete(&winner.name_any(), &DeleteParams::default()).await.expect("delete");
    let deleted = Instant::now();
    let cluster = eventually("block quarantined", || async {
        let cluster = get(&clusters, "dev").await?;
        let allocation = cluster.status.as_ref()?.machine_id_allocation.clone()?;
        allocation.quarantined.iter().any(|q| q.block == winner_block).then_some(allocation)
    })
    .await;
    assert!(cluster.blocks.iter().all(|held| !held.block.overlaps(&winner_block)), "quarantined block reused at once");
    let region = region_ready(&regions, &loser_name).await;
    assert!(deleted.elapsed() >= Duration::from_secs(4), "the block was reused within its quarantine");
    let block = region.status.as_ref().and_then(|s| s.machine_id_block).expect("block");
    assert_eq!(block.size, 520);
}

/// Whether the client's user may do `verb` on `resource` (`resource/subresource`) of `group` in `namespace` (empty:
/// all namespaces, or a cluster-scoped resource), on the object `name` (empty: any), by a SelfSubjectAccessReview.
async fn can(client: &Client, verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> bool {
    let (resource, subresource) = resource.split_once('/').map_or((resource, None), |(r, s)| (r, Some(s)));
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource: subresource.map(str::to_owned),
                namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
                name: (!name.is_empty()).then(|| name.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = reviews.create(&PostParams::default(), &review).await.expect("SelfSubjectAccessReview");
    answer.status.is_some_and(|status| status.allowed)
}

const MANAGE: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// What the operator uses in the namespaces it watches, as (API group, resource, verbs): exactly what the chart must
/// grant there.
const USED: &[(&str, &str, &[&str])] = &[
    ("parley.dev", "chatclusters", &["get", "list", "watch", "patch", "update"]),
    ("parley.dev", "regions", &["get", "list", "watch", "patch", "update"]),
    ("parley.dev", "chatclusters/status", &["patch", "update"]),
    ("parley.dev", "regions/status", &["patch", "update"]),
    ("parley.dev", "chatclusters/finalizers", &["update"]),
    ("parley.dev", "regions/finalizers", &["update"]),
    ("apps", "statefulsets", MANAGE),
    ("policy", "poddisruptionbudgets", MANAGE),
    ("", "services", MANAGE),
    ("", "configmaps", MANAGE),
    ("networking.k8s.io", "networkpolicies", MANAGE),
    // MirrorMaker 2 of the Regions that receive topics.
    ("apps", "deployments", MANAGE),
    // Each Region's internal token Secret and the ChatCluster's peer token Secret, created once and never read.
    ("", "secrets", &["create"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // Gateway rollouts: the pods' reports read, a drain annotation set, a drained pod deleted (get and watch because
    // the gateways' pod-agent Role grants them, and a Role may only grant what its creator holds).
    ("", "pods", &["get", "list", "watch", "patch", "delete"]),
    // The gateways' pod-agent ServiceAccount, Role and RoleBinding, server-side applied.
    ("", "serviceaccounts", &["list", "create", "patch"]),
    ("rbac.authorization.k8s.io", "roles", &["list", "create", "patch"]),
    ("rbac.authorization.k8s.io", "rolebindings", &["list", "create", "patch"]),
];

/// The operator's Lease (the chart's `leaderElection.leaseName`, the operator's `--lease-name` default).
const LEASE: &str = "parley-operator";

/// Every (group, resource, verb, resourceNames) the rendered Roles and ClusterRoles grant.
fn granted(rendered: &str) -> Vec<(String, String, String, Vec<String>)> {
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(rendered) {
        let value = serde_json::Value::deserialize(document).expect("rendered YAML");
        if !matches!(value["kind"].as_str(), Some("Role" | "ClusterRole")) {
            continue;
        }
        for rule in value["rules"].as_array().into_iter().flatten() {
            let strings = |field: &str| -> Vec<String> {
                rule[field].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for verb in strings("verbs") {
                        out.push((group.clone(), resource.clone(), verb, strings("resourceNames")));
                    }
                }
            }
        }
    }
    out
}

/// Deletes cluster-scoped objects when dropped.
struct ClusterScoped(Vec<String>);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for object in &self.0 {
            let _ = kubectl(&["delete", object, "--ignore-not-found", "--wait=false"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_the_operator_exactly_what_it_uses() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "rbac").await;
    let operator = client_from(&ns.kubeconfig).await;
    let namespace = ns.name.as_str();

    // Everything the operator uses is granted in its namespace...
    let mut missing = Vec::new();
    for (group, resource, verbs) in USED {
        for verb in *verbs {
            if !can(&operator, verb, group, resource, namespace, "").await {
                missing.push(format!("{verb} {group}/{resource}"));
            }
        }
    }
    for verb in ["get", "update", "patch"] {
        if !can(&operator, verb, "coordination.k8s.io", "leases", namespace, LEASE).await {
            missing.push(format!("{verb} lease {LEASE}"));
        }
    }
    if !can(&operator, "create", "coordination.k8s.io", "leases", namespace, "").await {
        missing.push("create leases".to_owned());
    }
    assert!(missing.is_empty(), "the chart's ServiceAccount may not: {missing:?}");

    // ...and the chart grants nothing else: every rule it renders is one of those.
    let rendered = chart_rbac(RELEASE, namespace, &[format!("watchNamespace={namespace}")]);
    let extra: Vec<_> = granted(&rendered)
        .into_iter()
        .filter(|(group, resource, verb, names)| {
            let used = USED.iter().any(|(g, r, verbs)| g == group && r == resource && verbs.contains(&verb.as_str()));
            let lease = group == "coordination.k8s.io"
                && resource == "leases"
                && match verb.as_str() {
                    "get" | "update" | "patch" => names == &[LEASE.to_owned()],
                    "create" => names.is_empty(),
                    _ => false,
                };
            !used && !lease
        })
        .collect();
    assert!(extra.is_empty(), "the chart grants rights the operator does not use: {extra:?}");

    // Rights the operator must not have, checked on the API server.
    let own_token = "dev-local-internal-token";
    let denied: &[(&str, &str, &str, &str, &str)] = &[
        ("get", "", "secrets", namespace, own_token),
        ("get", "", "secrets", namespace, ""),
        ("list", "", "secrets", namespace, ""),
        ("watch", "", "secrets", namespace, ""),
        ("update", "", "secrets", namespace, own_token),
        ("patch", "", "secrets", namespace, own_token),
        ("delete", "", "secrets", namespace, own_token),
        ("list", "", "secrets", "", ""),
        ("create", "", "pods", namespace, ""),
        ("update", "", "pods", namespace, ""),
        ("create", "", "pods/eviction", namespace, ""),
        ("create", "", "serviceaccounts/token", namespace, SERVICE_ACCOUNT),
        ("list", "parley.dev", "regions", "", ""),
        ("get", "parley.dev", "regions", "default", ""),
        ("create", "apps", "statefulsets", "default", ""),
        ("create", "apps", "daemonsets", namespace, ""),
        ("update", "apps", "statefulsets", namespace, ""),
        ("get", "coordination.k8s.io", "leases", namespace, "another-lease"),
        ("update", "coordination.k8s.io", "leases", namespace, "another-lease"),
        ("patch", "coordination.k8s.io", "leases", namespace, "another-lease"),
        ("delete", "coordination.k8s.io", "leases", namespace, LEASE),
        ("list", "coordination.k8s.io", "leases", namespace, ""),
        ("get", "coordination.k8s.io", "leases", "kube-system", LEASE),
        ("delete", "rbac.authorization.k8s.io", "rolebindings", namespace, ""),
        ("update", "rbac.authorization.k8s.io", "roles", namespace, ""),
        ("escalate", "rbac.authorization.k8s.io", "roles", namespace, ""),
        ("bind", "rbac.authorization.k8s.io", "roles", namespace, ""),
        ("create", "rbac.authorization.k8s.io", "clusterroles", "", ""),
    ];
    let mut excess = Vec::new();
    for (verb, group, resource, where_, name) in denied {
        if can(&operator, verb, group, resource, where_, name).await {
            excess.push(format!("{verb} {group}/{resource} {name} in {where_:?}"));
        }
    }
    assert!(excess.is_empty(), "the chart's ServiceAccount may: {excess:?}");

    // rbac.readableSecrets: get on exactly those Secrets (the Cassandra CA and credentials), nothing more.
    let values = [format!("watchNamespace={namespace}"), "rbac.readableSecrets={cassandra-user}".to_owned()];
    kubectl_apply(&chart_rbac(RELEASE, namespace, &values), &format!("{namespace}-secrets"));
    eventually("get on the named Secret", || async {
        can(&operator, "get", "", "secrets", namespace, "cassandra-user").await.then_some(())
    })
    .await;
    for (verb, name) in [("get", own_token), ("get", "another-secret"), ("list", ""), ("watch", "")] {
        assert!(!can(&operator, verb, "", "secrets", namespace, name).await, "readableSecrets: may {verb} {name:?}");
    }

    // The default install watches every namespace, with a ClusterRole: the same rules everywhere, the Lease rights
    // still only in the release namespace, and still no Secret to read or pod to list anywhere.
    let release = format!("parley-rbac-{:x}", std::process::id());
    let account = format!("{release}-operator");
    let _cluster_scoped =
        ClusterScoped(vec![format!("clusterrole/{account}"), format!("clusterrolebinding/{account}")]);
    kubectl_apply(&chart_rbac(&release, namespace, &[]), &release);
    let kubeconfig = service_account_kubeconfig(namespace, &account);
    let everywhere = client_from(&kubeconfig).await;
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(can(&everywhere, "list", "parley.dev", "regions", "", "").await, "list Regions in every namespace");
    assert!(can(&everywhere, "patch", "apps", "statefulsets", "default", "").await);
    assert!(can(&everywhere, "get", "coordination.k8s.io", "leases", namespace, LEASE).await);
    for (verb, group, resource, where_, name) in [
        ("create", "", "pods", "default", ""),
        ("get", "", "secrets", "default", ""),
        ("list", "", "secrets", "", ""),
        ("watch", "", "secrets", "", ""),
        ("create", "apps", "daemonsets", "default", ""),
        ("get", "coordination.k8s.io", "leases", "default", LEASE),
        ("create", "coordination.k8s.io", "leases", "default", ""),
    ] {
        assert!(!can(&everywhere, verb, group, resource, where_, name).await, "ClusterRole: may {verb} {resource}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_that_may_not_create_the_token_secret_says_so_and_applies_nothing() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "token").await;
    // The chart's Role without its Secret rule.
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns.name);
    let complete = get(&roles, SERVICE_ACCOUNT).await.expect("the chart's Role");
    let mut without = complete.clone();
    let rules = without.rules.get_or_insert_with(Vec::new);
    rules.retain(|rule| !rule.resources.iter().flatten().any(|resource| resource == "secrets"));
    roles.replace(SERVICE_ACCOUNT, &PostParams::default(), &without).await.expect("drop the Secret rule");
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let _operator = Operator::start(&ns, "token");

    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let degraded = eventually("dev-local Degraded for its token", || async {
        let status = get(&regions, "dev-local").await?.status?;
        let degraded = status.conditions.into_iter().find(|c| c.type_ == "Degraded")?;
        (degraded.status == "True").then_some(degraded)
    })
    .await;
    assert_eq!(degraded.reason, "InternalTokenSecretFailed");
    assert!(
        degraded.message.contains("creating Secret")
            && degraded.message.contains("dev-local-internal-token")
            && degraded.message.contains("forbidden")
            && degraded.message.contains("HTTP 403"),
        "{}",
        degraded.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("InternalTokenSecretFailed Event", || async {
        let items = events.list(&ListParams::default()).await.ok()?.items;
        items.iter().any(|e| e.reason.as_deref() == Some("InternalTokenSecretFailed")).then_some(())
    })
    .await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    assert!(sets.list(&ListParams::default()).await.expect("list").items.is_empty(), "pods that cannot start");

    // Granted again: the retry creates the Secret, and the Region becomes Ready.
    let mut restored = get(&roles, SERVICE_ACCOUNT).await.expect("Role");
    restored.rules = complete.rules;
    roles.replace(SERVICE_ACCOUNT, &PostParams::default(), &restored).await.expect("restore the Secret rule");
    let region = region_ready(&regions, "dev-local").await;
    let status = region.status.expect("status");
    assert_eq!(condition(&status.conditions, "Degraded"), Some(("False".to_owned(), "Reconciled".to_owned())));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(internal_token(&secrets, "dev-local").await.is_some());
}

/// The ChatCluster `dev` of `examples/dev-chatcluster.yaml` with one more Region `name` (region name
/// `region_name`) replicating `topics` to `to`.
fn replicating_region(name: &str, region_name: &str, datacenter: &str, rules: serde_json::Value) -> Region {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "Region", "metadata": {"name": name},
        "spec": {"clusterRef": "dev", "regionName": region_name,
                 "cassandra": {"datacenter": datacenter, "replicationFactor": 1},
                 "kafka": {"bootstrapServers": format!("kafka-{region_name}:9092"), "replicationFactor": 1},
                 "gateway": {"replicas": 1}, "router": {"replicas": 1}, "replication": rules}
    }))
    .expect("region")
}

fn data(config_map: &ConfigMap, key: &str) -> Option<String> {
    config_map.data.as_ref()?.get(key).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_maker_follows_the_replication_rules() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "mm2").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    // dev-local (region "local") receives every topic of "eu".
    let eu = replicating_region("dev-eu", "eu", "dc-eu", json!([{"topics": ["*"], "toRegions": ["local"]}]));
    regions.create(&PostParams::default(), &eu).await.expect("create eu");
    let operator = Operator::start(&ns, "mm2");
    operator.ready().await;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let config = eventually("MirrorMaker 2 ConfigMap", || get(&config_maps, "dev-local-mirrormaker-config")).await;
    let properties = data(&config, "mm2.properties").expect("mm2.properties");
    for line in [
        "clusters=local,eu",
        "eu.bootstrap.servers=kafka-eu:9092",
        "local.bootstrap.servers=kafka.dev.svc:9092",
        "eu->local.enabled=true",
        "eu->local.topics=^parley-beacons$,^parley-memberships$,^parley-messages$,^parley-presence$,^parley-receipts$",
        "local->eu.enabled=false",
        "eu.consumer.isolation.level=read_committed",
        "replication.factor=3",
    ] {
        assert!(properties.lines().any(|l| l == line), "no {line} in:\n{properties}");
    }
    let deployment = eventually("MirrorMaker 2 Deployment", || get(&deployments, "dev-local-mirrormaker")).await;
    let owner = &deployment.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Region", "dev-local", Some(true)));
    let command =
        deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].command.clone());
    assert_eq!(
        command.flatten().map(|c| c.join(" ")).as_deref(),
        Some("/opt/kafka/bin/connect-mirror-maker.sh /etc/parley/mirrormaker/mm2.properties --clusters local")
    );
    assert!(get(&deployments, "dev-eu-mirrormaker").await.is_none(), "nothing replicates into eu");
    // The routers: local mirrors eu, both know each other, and both read the ChatCluster's peer token.
    let router_config = |name: &'static str| {
        let config_maps = config_maps.clone();
        async move { get(&config_maps, &format!("{name}-router-config")).await }
    };
    let local = eventually("local router ConfigMap", || router_config("dev-local")).await;
    assert_eq!(data(&local, "PARLEY_MIRRORED_REGIONS").as_deref(), Some("eu"));
    assert_eq!(
        data(&local, "PARLEY_PEER_ROUTERS"),
        Some(format!("eu=http://dev-eu-router-headless.{}.svc:7070", ns.name))
    );
    let eu_config = eventually("eu router ConfigMap", || router_config("dev-eu")).await;
    assert_eq!(data(&eu_config, "PARLEY_MIRRORED_REGIONS"), None);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let peer = eventually("peer token", || get(&secrets, "dev-peer-token")).await;
    assert_eq!(peer.owner_references()[0].kind, "ChatCluster");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let router = eventually("eu routers", || get(&sets, "dev-eu-router")).await;
    let token =
        router.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|p| {
            p.containers[0].env.as_ref()?.iter().find(|e| e.name == "PARLEY_PEER_TOKEN")?.value_from.clone()
        });
    assert_eq!(token.and_then(|t| t.secret_key_ref).map(|r| r.name).as_deref(), Some("dev-peer-token"));

    // A third Region sends its messages to local too: the flow joins the same MirrorMaker 2, which rolls.
    let hash = |deployment: &Deployment| {
        deployment
            .spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get("parley.dev/config-hash")
            .cloned()
    };
    let first_hash = hash(&deployment);
    let ap = replicating_region("dev-ap", "ap", "dc-ap", json!([{"topics": ["messages"], "toRegions": ["local"]}]));
    regions.create(&PostParams::default(), &ap).await.expect("create ap");
    let config = eventually("the ap flow", || async {
        let config = get(&config_maps, "dev-local-mirrormaker-config").await?;
        data(&config, "mm2.properties")?
            .contains("ap->local.topics=^parley-beacons$,^parley-messages$")
            .then_some(config)
    })
    .await;
    let properties = data(&config, "mm2.properties").expect("properties");
    assert!(properties.lines().any(|l| l == "clusters=local,ap,eu"), "{properties}");
    assert!(properties.lines().any(|l| l == "ap->eu.enabled=false"), "{properties}");
    eventually("MirrorMaker 2 rolled", || async {
        let deployment = get(&deployments, "dev-local-mirrormaker").await?;
        (hash(&deployment) != first_hash).then_some(())
    })
    .await;
    eventually("local routers mirror ap and eu", || async {
        let config = router_config("dev-local").await?;
        (data(&config, "PARLEY_MIRRORED_REGIONS").as_deref() == Some("ap,eu")).then_some(())
    })
    .await;
    // The Region's status names the regions mirrored into it, and its MirrorMaker 2's pods (kwok makes them ready).
    eventually("local status shows its MirrorMaker 2", || async {
        let status = get(&regions, "dev-local").await?.status?;
        (status.mirrored_regions == ["ap", "eu"] && status.mirror_maker.as_deref() == Some("1/1")).then_some(())
    })
    .await;

    // No rule targets local any more: its MirrorMaker 2 goes.
    for name in ["dev-eu", "dev-ap"] {
        regions
            .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replication": null}})))
            .await
            .expect("drop the rules");
    }
    eventually("MirrorMaker 2 deleted", || async {
        let gone = get(&deployments, "dev-local-mirrormaker").await.is_none()
            && get(&config_maps, "dev-local-mirrormaker-config").await.is_none();
        gone.then_some(())
    })
    .await;
    eventually("local routers mirror nothing", || async {
        let config = router_config("dev-local").await?;
        data(&config, "PARLEY_MIRRORED_REGIONS").is_none().then_some(())
    })
    .await;
    eventually("local status without MirrorMaker 2", || async {
        let status = get(&regions, "dev-local").await?.status?;
        (status.mirrored_regions.is_empty() && status.mirror_maker.is_none()).then_some(())
    })
    .await;
    // The Regions keep the Cassandra condition that says the operator could not reach this Cassandra.
    let region = get(&regions, "dev-local").await.expect("region");
    let replication = region.status.expect("status").conditions.into_iter().find(|c| c.type_ == "CassandraReplication");
    assert_eq!(
        replication.map(|c| (c.status, c.reason)),
        Some(("False".to_owned(), "CassandraUnavailable".to_owned()))
    );
    drop(operator);
}

/// The stack's Cassandra (two datacenters) as a ChatCluster sees it: contact point, CA and credentials, or `None`
/// when the test is skipped.
fn stack_cassandra() -> Option<(String, Vec<u8>, String, String)> {
    let contact = parley_test_support::engine(parley_test_support::Engine::Cassandra)?;
    let variable = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (stack.env)"));
    let ca = std::fs::read(variable("PARLEY_CASSANDRA_TLS_CA_FILE")).expect("read the Cassandra CA");
    Some((contact, ca, variable("PARLEY_CASSANDRA_USERNAME"), variable("PARLEY_CASSANDRA_PASSWORD")))
}

async fn region_condition(regions: &Api<Region>, name: &str, type_: &str) -> Option<(String, String, String)> {
    let region = get(regions, name).await?;
    let condition = region.status?.conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((condition.status, condition.reason, condition.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyspace_follows_the_regions_datacenters_and_a_region_waits_for_its_release() {
    if !control_plane() {
        return;
    }
    let Some((contact, ca, username, password)) = stack_cassandra() else { return };
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "keyspace").await;
    // The operator may read exactly the Cassandra CA and credentials Secrets.
    let values = [format!("watchNamespace={}", ns.name), "rbac.readableSecrets={cassandra-ca,cassandra-user}".into()];
    kubectl_apply(&chart_rbac(RELEASE, &ns.name, &values), &format!("{}-secrets", ns.name));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for secret in [
        json!({"metadata": {"name": "cassandra-ca"}, "stringData": {"ca.crt": String::from_utf8_lossy(&ca)}}),
        json!({"metadata": {"name": "cassandra-user"}, "stringData": {"username": username, "password": password}}),
        json!({"metadata": {"name": "jwt"}, "stringData": {"hs256": "a-secret-of-at-least-16-bytes"}}),
    ] {
        let secret: Secret = serde_json::from_value(secret).expect("secret");
        secrets.create(&PostParams::default(), &secret).await.expect("create secret");
    }
    let keyspace_name = parley_test_support::unique("opr_k8s_").replace('-', "_");
    let cluster: ChatCluster = serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": "chat"},
        "spec": {"version": "0.1.0", "kafka": {"bootstrapServers": "kafka:9092"},
                 "cassandra": {"contactPoints": [contact], "keyspace": keyspace_name, "tls": true,
                               "tlsCaSecret": {"name": "cassandra-ca", "key": "ca.crt"},
                               "credentials": {"secretName": "cassandra-user"}},
                 "redis": {"url": "redis://redis:6379"},
                 "auth": {"jwtKeySecret": {"name": "jwt", "key": "hs256"}}}
    }))
    .expect("cluster");
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    clusters.create(&PostParams::default(), &cluster).await.expect("create cluster");
    let region = |name: &str, datacenter: &str| -> Region {
        serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "Region", "metadata": {"name": name},
            "spec": {"clusterRef": "chat", "regionName": name, "cassandra": {"datacenter": datacenter,
                     "replicationFactor": 1}, "gateway": {"replicas": 1}, "router": {"replicas": 1}}
        }))
        .expect("region")
    };
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    regions.create(&PostParams::default(), &region("one", "dc1")).await.expect("create one");
    let operator = Operator::start(&ns, "keyspace");
    operator.ready().await;

    // The first Region creates the keyspace in its datacenter: nothing to rebuild.
    let replicated = |name: &'static str| {
        let regions = regions.clone();
        async move {
            let condition = region_condition(&regions, name, "CassandraReplication").await?;
            (condition.0 == "True").then_some(condition)
        }
    };
    let (_, reason, message) = eventually("one replicated", || replicated("one")).await;
    assert_eq!(reason, "DatacenterReplicated", "{message}");
    assert!(region_condition(&regions, "one", "CassandraRebuildRequired").await.is_none());

    // A second Region in dc2: added, and it must be rebuilt from dc1.
    regions.create(&PostParams::default(), &region("two", "dc2")).await.expect("create two");
    eventually("two replicated", || replicated("two")).await;
    let (status, reason, message) =
        eventually("two's rebuild", || region_condition(&regions, "two", "CassandraRebuildRequired")).await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "DatacenterAdded"), "{message}");
    assert!(message.contains(&format!("`nodetool rebuild -ks {keyspace_name} -- dc1`")), "{message}");
    // A Region whose datacenter has no node: not added, and it says so.
    regions.create(&PostParams::default(), &region("nine", "dc9")).await.expect("create nine");
    let (status, _, message) = eventually("nine absent", || async {
        region_condition(&regions, "nine", "CassandraReplication").await.filter(|c| c.1 == "DatacenterAbsent")
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains("dc1, dc2"), "{message}");

    // What Cassandra holds, read with the operator's own adapter.
    let access = parley_operator::keyspace::CassandraAccess {
        contact_points: vec![contact.clone()],
        tls: true,
        ca_pem: Some(ca.clone()),
        credentials: Some((username.clone(), password.clone())),
        timeout: Duration::from_secs(10),
    };
    let admin = parley_operator::keyspace::CassandraAdmin::connect(&access).await.expect("connect");
    let nts = |entries: &[(&str, i32)]| {
        Some(parley_operator::keyspace::Replication::NetworkTopology(
            entries.iter().map(|(dc, rf)| ((*dc).to_owned(), *rf)).collect(),
        ))
    };
    assert_eq!(admin.replication(&keyspace_name).await.expect("read"), nts(&[("dc1", 1), ("dc2", 1)]));

    // The rebuild is acknowledged with the annotation.
    kubectl_ok(&["annotate", "-n", &ns.name, "region/two", "parley.dev/cassandra-rebuilt=dc2"]);
    eventually("rebuild acknowledged", || async {
        region_condition(&regions, "two", "CassandraRebuildRequired").await.filter(|c| c.0 == "False")
    })
    .await;

    // A Region annotated failed is marked in the routers' `failed_regions` table (created here by the routers'
    // schema, as a router of the ChatCluster would), and unmarked when annotated back.
    let mut store_config = parley_router::cassandra::CassandraConfig::new(vec![contact.clone()], keyspace_name.clone());
    store_config.tls_ca_file = Some(std::path::PathBuf::from(
        std::env::var("PARLEY_CASSANDRA_TLS_CA_FILE").expect("PARLEY_CASSANDRA_TLS_CA_FILE"),
    ));
    store_config.credentials = Some(parley_router::cassandra::CassandraCredentials {
        username: std::env::var("PARLEY_CASSANDRA_USERNAME").expect("username"),
        password: std::env::var("PARLEY_CASSANDRA_PASSWORD").expect("password"),
    });
    store_config.local_datacenter = Some("dc1".into());
    let store = parley_router::cassandra::CassandraStore::connect(store_config).await.expect("the routers' schema");
    use parley_router::backend::MembershipStore;
    kubectl_ok(&["annotate", "-n", &ns.name, "region/two", "parley.dev/region-failed=true"]);
    eventually("two marked failed", || async {
        let failed = store.failed_regions().await.ok()?;
        (failed == vec!["two".to_owned()]).then_some(())
    })
    .await;
    kubectl_ok(&["annotate", "--overwrite", "-n", &ns.name, "region/two", "parley.dev/region-failed=false"]);
    eventually("two back", || async { store.failed_regions().await.ok()?.is_empty().then_some(()) }).await;
    drop(store);

    // Deleting two waits while the keyspace replicates to dc2, and says how to release it.
    regions.delete("two", &DeleteParams::default()).await.expect("delete two");
    let (_, reason, message) = eventually("two kept", || async {
        region_condition(&regions, "two", "DeletionBlocked").await.filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(reason, "CassandraDatacenterInUse", "{message}");
    assert!(message.contains("parley.dev/cassandra-release-datacenter: \"dc2\""), "{message}");
    assert!(message.contains(&format!("nodetool repair -full {keyspace_name}")), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(get(&regions, "two").await.is_some(), "the Region stays until released");
    kubectl_ok(&["annotate", "-n", &ns.name, "region/two", "parley.dev/cassandra-release-datacenter=dc2"]);
    eventually("two gone", || async { get(&regions, "two").await.is_none().then_some(()) }).await;
    assert_eq!(admin.replication(&keyspace_name).await.expect("read"), nts(&[("dc1", 1)]));
    // A Region whose datacenter the keyspace does not name goes at once.
    regions.delete("nine", &DeleteParams::default()).await.expect("delete nine");
    eventually("nine gone", || async { get(&regions, "nine").await.is_none().then_some(()) }).await;
    drop(operator);
    admin.execute(&format!("DROP KEYSPACE IF EXISTS {keyspace_name}")).await.expect("drop the keyspace");
}
