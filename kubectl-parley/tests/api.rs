//! The `kubectl-parley` binary against a real API server (kube-apiserver with kwok's fake nodes; no operator runs):
//! start it with `e2e/k8s/up.sh /tmp/parley-k8s` and `. /tmp/parley-k8s/env`. Without `KUBECONFIG` a plain
//! `cargo test` skips these tests and the full test command fails them (`parley_test_support::engines`).
//!
//! Each test installs the CRDs from the Rust types (server-side apply, so the schema has every status field the
//! binary reads), makes its own namespace, creates the ChatCluster and Regions with their statuses written through
//! the status subresource, and runs the built binary.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parley_crds::common::{DRAIN_ANNOTATION, RESTART_AT_ANNOTATION, ROLLOUT_PAUSED_ANNOTATION};
use parley_crds::{ChatCluster, Region};
use serde_json::{json, Value};

const FIELD_MANAGER: &str = "kubectl-parley-tests";

/// Whether the control plane is there (skips, or fails under `PARLEY_REQUIRE_ENGINES=1`, without it).
fn control_plane() -> bool {
    parley_test_support::engine(parley_test_support::Engine::Kubernetes).is_some()
}

/// Runs the plugin binary with `args` (and the test's `KUBECONFIG`).
fn plugin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-parley")).args(args).output().expect("run kubectl-parley")
}

/// Runs the plugin and returns its stdout; fails the test when it fails.
fn plugin_ok(args: &[&str]) -> String {
    let output = plugin(args);
    assert!(
        output.status.success(),
        "kubectl-parley {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the plugin, expects it to fail, and returns its stderr.
fn plugin_fails(args: &[&str]) -> String {
    let output = plugin(args);
    assert!(
        !output.status.success(),
        "kubectl-parley {args:?} should fail, printed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn kubectl_ok(args: &[&str]) -> String {
    let output = Command::new("kubectl").args(args).output().expect("run kubectl (on PATH from the k8s env)");
    assert!(output.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Installs the CRDs as the Rust types describe them and waits until they are established.
async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in parley_crds::crds() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let current = crds.get(&name).await.expect("get CRD");
            let established = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not established after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A namespace for one test, deleted when the test ends (also when it fails).
struct TestNamespace {
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, prefix: &str) -> TestNamespace {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
        let name = format!("{prefix}-{}-{:x}", std::process::id(), nanos.unwrap_or(0));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        namespaces.create(&PostParams::default(), &namespace).await.expect("create namespace");
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl").args(["delete", "namespace", &self.name, "--wait=false"]).output();
    }
}

fn chat_cluster(name: &str) -> ChatCluster {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
        "metadata": {"name": name},
        "spec": {
            "version": "0.4.2",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "cassandra": {"contactPoints": ["cassandra"], "keyspace": "parley"},
            "redis": {"url": "redis://redis:6379"},
            "auth": {"jwtKeySecret": {"name": "jwt", "key": "secret"}}
        }
    }))
    .expect("ChatCluster")
}

fn region(name: &str, region_name: &str, cluster: &str) -> Region {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "Region",
        "metadata": {"name": name},
        "spec": {"clusterRef": cluster, "regionName": region_name, "cassandra": {"datacenter": region_name},
                 "gateway": {"minReplicas": 2, "maxReplicas": 6}}
    }))
    .expect("Region")
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": Timestamp::from_second(Timestamp::now().as_second() - 600).expect("time").to_string()})
}

fn ago(seconds: i64) -> String {
    Timestamp::from_second(Timestamp::now().as_second() - seconds).expect("time").to_string()
}

/// A ChatCluster `chat` and its three Regions (plus a Region of another ChatCluster), with statuses as the operator
/// writes them: `eu` rolling out with a pod draining, `us` receiving two MirrorMaker flows, `ap` paused and not
/// ready; and Warning Events about them, one of them through events.k8s.io like the operator's.
async fn three_regions(client: &Client, namespace: &str) {
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), namespace);
    clusters.create(&PostParams::default(), &chat_cluster("chat")).await.expect("create ChatCluster");
    let status = json!({"status": {
        "observedGeneration": 1,
        "conditions": [
            condition("Ready", "False", "RegionsNotReady", "2 of 3 regions ready"),
            condition("Progressing", "True", "RegionsProgressing", "rolling out: ap, eu"),
            condition("Degraded", "True", "RegionDegraded", "degraded: us"),
        ],
        "regionsReady": "2/3",
        "machineIdsAllocated": 48,
        "machineIdAllocation": {
            "blocks": [{"region": "eu", "block": {"start": 0, "size": 16}},
                       {"region": "us", "block": {"start": 16, "size": 16}},
                       {"region": "ap", "block": {"start": 32, "size": 16}}],
            "quarantined": [{"region": "old", "block": {"start": 48, "size": 16}, "releasedAt": ago(10)}]
        }
    }});
    clusters.patch_status("chat", &PatchParams::default(), &Patch::Merge(&status)).await.expect("ChatCluster status");

    let regions: Api<Region> = Api::namespaced(client.clone(), namespace);
    let statuses = [
        (
            "eu",
            "eu-west",
            "chat",
            json!({
                "observedGeneration": 1,
                "conditions": [condition("Ready", "True", "AllPodsReady", "all pods ready"),
                               condition("Progressing", "True", "RollingOut", "rolling eu-gateway-2"),
                               condition("Degraded", "False", "Reconciled", "the spec is valid and applied")],
                "gatewaysReady": 3, "gatewaysDesired": 3, "routersReady": 2, "routersDesired": 2,
                "gateways": "3/3", "routers": "2/2",
                "machineIdBlock": {"start": 0, "size": 16}, "machineIds": "0-15",
                "rollout": {"updateRevision": "eu-gateway-5d8f", "currentRevision": "eu-gateway-4b1e", "updated": 1,
                            "total": 3, "phase": "Draining",
                            "draining": {"pod": "eu-gateway-2", "connections": 120, "since": ago(40)},
                            "lastResumeRate": 0.985, "paused": false,
                            "message": "rolling eu-gateway-2: draining, 120 connections left"},
                "scaling": {"current": 3, "desired": 4, "min": 2, "max": 6, "targetConnectionsPerPod": 5000,
                            "connections": 17250, "reason": "17250 connections need 4 pods at 5000 per pod"},
                "gatewayConnections": 17250
            }),
        ),
        (
            "us",
            "us-east",
            "chat",
            json!({
                "observedGeneration": 1,
                "conditions": [condition("Ready", "True", "AllPodsReady", "all pods ready"),
                               condition("Progressing", "False", "RolloutComplete", "rollout complete"),
                               condition("Degraded", "True", "MirrorLatencyOverBudget",
                                         "ap-south: 1450 ms over the 1000 ms budget")],
                "gatewaysReady": 2, "gatewaysDesired": 2, "routersReady": 1, "routersDesired": 1,
                "machineIdBlock": {"start": 16, "size": 16}, "machineIds": "16-31",
                "mirroredRegions": ["ap-south", "eu-west"], "mirrorMaker": "1/1",
                "incomingFlows": [
                    {"region": "eu-west", "deliveryLatencyMs": 180, "messages": 42, "mirrorLagMs": 95, "reportedAt": ago(8)},
                    {"region": "ap-south", "deliveryLatencyMs": 1450, "messages": 7, "reportedAt": ago(12)}],
                "rollout": {"updateRevision": "us-gateway-7c9a", "currentRevision": "us-gateway-7c9a", "updated": 2,
                            "total": 2, "phase": "Idle", "paused": false, "message": "all gateway pods updated"},
                "scaling": {"current": 2, "desired": 2, "min": 2, "max": 6, "targetConnectionsPerPod": 5000,
                            "connections": 3100, "reason": "3100 connections fit 2 pods"},
                "gatewayConnections": 3100
            }),
        ),
        (
            "ap",
            "ap-south",
            "chat",
            json!({
                "observedGeneration": 1,
                "conditions": [condition("Ready", "False", "PodsNotReady", "1 of 2 gateway pods ready"),
                               condition("Progressing", "True", "RolloutPaused", "paused by parley.dev/rollout-paused"),
                               condition("Degraded", "False", "Reconciled", "the spec is valid and applied")],
                "gatewaysReady": 1, "gatewaysDesired": 2, "routersReady": 1, "routersDesired": 1,
                "machineIdBlock": {"start": 32, "size": 16}, "machineIds": "32-47",
                "rollout": {"updateRevision": "ap-gateway-2222", "currentRevision": "ap-gateway-1111", "updated": 0,
                            "total": 2, "phase": "Paused", "paused": true, "message": "paused before ap-gateway-1"}
            }),
        ),
        ("lab", "lab", "other", json!({"gatewaysReady": 9, "gatewaysDesired": 9})),
    ];
    for (name, region_name, cluster, status) in statuses {
        let created =
            regions.create(&PostParams::default(), &region(name, region_name, cluster)).await.expect("Region");
        let patch = json!({"status": status});
        let patched = regions.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("status");
        assert!(created.status.is_none());
        // The schema keeps every field the plugin reads (a field missing from the CRD would be pruned).
        if name == "eu" {
            let rollout = patched.status.as_ref().and_then(|s| s.rollout.as_ref()).expect("rollout kept");
            assert_eq!(rollout.draining.as_ref().map(|d| d.connections), Some(120));
        }
    }

    // Warning Events: one through events.k8s.io/v1 (as the operator's Recorder writes them), others through the
    // core API; a Normal Event and a Warning about another cluster's Region are not shown.
    let region_uid = |name: &str| {
        let regions = regions.clone();
        let name = name.to_owned();
        async move { regions.get(&name).await.expect("Region").uid().unwrap_or_default() }
    };
    let new_events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    let micro = |seconds: i64| ago(seconds).replace('Z', ".000000Z");
    let recorded: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "ap.pods-not-ready"},
        "eventTime": micro(20), "reportingController": "parley-operator", "reportingInstance": "parley-operator-0",
        "action": "Reconcile", "reason": "PodsNotReady", "type": "Warning", "note": "ap-gateway-1 is not ready",
        "regarding": {"apiVersion": "parley.dev/v1alpha1", "kind": "Region", "name": "ap", "namespace": namespace,
                      "uid": region_uid("ap").await}
    }))
    .expect("events.k8s.io Event");
    new_events.create(&PostParams::default(), &recorded).await.expect("create events.k8s.io Event");
    let core_events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let core = |name: &str, kind: &str, object: &str, type_: &str, reason: &str, message: &str, seconds: i64| {
        serde_json::from_value::<k8s_openapi::api::core::v1::Event>(json!({
            "metadata": {"name": name},
            "involvedObject": {"apiVersion": "parley.dev/v1alpha1", "kind": kind, "name": object,
                               "namespace": namespace},
            "type": type_, "reason": reason, "message": message, "count": 3,
            "firstTimestamp": ago(seconds + 300), "lastTimestamp": ago(seconds),
            "source": {"component": "parley-operator"}
        }))
        .expect("core Event")
    };
    for event in [
        core("chat.degraded", "ChatCluster", "chat", "Warning", "RegionDegraded", "degraded: us", 5),
        core("us.latency", "Region", "us", "Warning", "MirrorLatencyOverBudget", "ap-south: 1450 ms", 90),
        core("eu.applied", "Region", "eu", "Normal", "Applied", "applied gateway StatefulSet", 1),
        core("lab.broken", "Region", "lab", "Warning", "Unrelated", "not this cluster", 2),
    ] {
        core_events.create(&PostParams::default(), &event).await.expect("create core Event");
    }
}

#[tokio::test]
async fn status_shows_a_chat_cluster_with_three_regions() {
    if !control_plane() {
        return;
    }
    let client = Client::try_default().await.expect("client");
    install_crds(&client).await;
    let namespace = TestNamespace::create(&client, "kp-status").await;
    let ns = namespace.name.as_str();

    let stderr = plugin_fails(&["status", "-n", ns]);
    assert!(stderr.contains(&format!("no ChatCluster in namespace {ns}")), "{stderr}");
    let stderr = plugin_fails(&["status", "missing", "-n", ns]);
    assert!(stderr.contains(&format!("ChatCluster missing not found in namespace {ns}")), "{stderr}");

    three_regions(&client, ns).await;
    let text = plugin_ok(&["status", "-n", ns]);
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    for line in [
        "ChatCluster chat",
        &format!("Namespace {ns}"),
        "Version 0.4.2",
        "Generation 1 (reconciled)",
        "Regions ready 2/3",
        "Ready False RegionsNotReady 2 of 3 regions ready",
        "Progressing True RegionsProgressing rolling out: ap, eu",
        "Degraded True RegionDegraded degraded: us",
        "Machine IDs: 48/1024 allocated",
        "0-15 16 eu held",
        "48-63 16 old quarantined, reusable in 50s",
        "ap ap-south False 1/2 1/1 - 32-47 0/2 Paused -",
        "eu eu-west True 3/3 2/2 17250 0-15 1/3 Draining 4/2/6",
        "us us-east True 2/2 1/1 3100 16-31 2/2 Idle 2/2/6",
        "ap: Ready False (PodsNotReady): 1 of 2 gateway pods ready",
        "Rollout of Region eu (eu-west): 1/3 updated, Draining",
        "Draining eu-gateway-2, 120 connections left, since 40s ago",
        "Last resume rate 98.5%",
        "Rollout of Region ap (ap-south): 0/2 updated, Paused",
        "us-east ap-south 1/1 1450 ms no beacon yet 7 12s ago over budget",
        "us-east eu-west 1/1 180 ms 95 ms 42 8s ago ok",
    ] {
        // Ages may be a second or two later than written on a slow machine: compare without them.
        assert!(lines.iter().any(|l| without_ages(l) == without_ages(line)), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("lab"), "another cluster's Region is not shown:\n{text}");
    let warnings: Vec<&str> = lines.iter().copied().skip_while(|l| !l.starts_with("Warning events")).skip(2).collect();
    let reasons: Vec<&str> = warnings.iter().filter_map(|l| l.split_whitespace().nth(3)).collect();
    assert_eq!(reasons, ["RegionDegraded", "PodsNotReady", "MirrorLatencyOverBudget"], "{text}");
    assert!(warnings[1].contains("Region/ap") && warnings[1].contains("ap-gateway-1 is not ready"), "{text}");

    let json: Value = serde_json::from_str(&plugin_ok(&["status", "chat", "-n", ns, "-o", "json"])).expect("JSON");
    assert_eq!(json["cluster"]["name"], "chat");
    assert_eq!(json["cluster"]["namespace"], ns);
    assert_eq!(json["machineIds"]["allocated"], 48);
    let regions = json["regions"].as_array().expect("regions");
    assert_eq!(regions.iter().map(|r| r["name"].as_str().unwrap_or_default()).collect::<Vec<_>>(), ["ap", "eu", "us"]);
    assert_eq!(regions[1]["rollout"]["draining"]["pod"], "eu-gateway-2");
    assert_eq!(
        regions[1]["scaling"],
        json!({"current": 3, "desired": 4, "min": 2, "max": 6, "connections": 17250,
        "targetConnectionsPerPod": 5000, "reason": "17250 connections need 4 pods at 5000 per pod",
        "lastScaleTime": null})
    );
    assert_eq!(regions[2]["incomingFlows"][0]["overBudget"], true);
    assert_eq!(json["warnings"][0]["count"], 3);
    assert_eq!(json["warnings"].as_array().map(Vec::len), Some(3));

    // A second ChatCluster: the name becomes required.
    Api::<ChatCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &chat_cluster("other"))
        .await
        .expect("second ChatCluster");
    let stderr = plugin_fails(&["status", "-n", ns]);
    assert!(stderr.contains(&format!("2 ChatClusters in namespace {ns} (chat, other)")), "{stderr}");
    let other = plugin_ok(&["status", "other", "-n", ns]);
    assert!(other.lines().any(|l| l.split_whitespace().take(2).eq(["lab", "lab"])), "{other}");
}

/// The words of a line, without ages such as `40s` or `12m`.
fn without_ages(line: &str) -> Vec<&str> {
    let age = |word: &str| {
        word.len() > 1
            && word.ends_with(['s', 'm', 'h', 'd'])
            && word[..word.len() - 1].chars().all(|c| c.is_ascii_digit())
    };
    line.split_whitespace().filter(|word| !age(word)).collect()
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": "parley/gateway:0.4.2"}]}
    }))
    .expect("Pod")
}

#[tokio::test]
async fn drain_annotates_gateway_pods_only() {
    if !control_plane() {
        return;
    }
    let client = Client::try_default().await.expect("client");
    install_crds(&client).await;
    let namespace = TestNamespace::create(&client, "kp-drain").await;
    let ns = namespace.name.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // The labels the operator puts on its pods (operator/src/build.rs `labels`).
    let parley = |component: &str| {
        json!({"app.kubernetes.io/name": "parley", "app.kubernetes.io/part-of": "parley",
               "app.kubernetes.io/component": component, "parley.dev/cluster": "chat", "parley.dev/region": "eu",
               "parley.dev/region-name": "eu-west"})
    };
    let status = json!({"parley.dev/gateway-status":
        r#"{"connections":37,"maxConnections":100000,"draining":false,"resumed":0,"resumeFailed":0,"at":"2026-01-01T00:00:00Z"}"#});
    for pod in [
        pod("eu-gateway-0", parley("gateway"), status),
        pod("eu-router-0", parley("router"), json!({})),
        pod("web", json!({"app.kubernetes.io/component": "gateway"}), json!({})),
        pod("plain", json!({}), json!({})),
    ] {
        pods.create(&PostParams::default(), &pod).await.expect("create pod");
    }

    let before = Timestamp::now() - SignedDuration::from_secs(1);
    let out = plugin_ok(&["drain", "eu-gateway-0", "-n", ns]);
    println!("{out}");
    assert!(
        out.contains(&format!("pod eu-gateway-0 (Region eu, ChatCluster chat, namespace {ns}): drain requested")),
        "{out}"
    );
    assert!(out.contains("its 37 clients"), "{out}");
    assert!(out.contains("stays up, not ready"), "{out}");
    let value = pods.get("eu-gateway-0").await.expect("pod").annotations().get(DRAIN_ANNOTATION).cloned();
    let at: Timestamp = value.as_deref().expect("drain annotation set").parse().expect("RFC 3339");
    assert!(at >= before && at <= Timestamp::now() + SignedDuration::from_secs(1), "{at}");

    // Again: already draining, the time of the request is kept.
    let again = plugin_ok(&["drain", "eu-gateway-0", "-n", ns]);
    assert!(again.contains("is already draining"), "{again}");
    let kept = pods.get("eu-gateway-0").await.expect("pod").annotations().get(DRAIN_ANNOTATION).cloned();
    assert_eq!(kept, value);

    for (name, why) in [
        ("eu-router-0", "its app.kubernetes.io/component label is router"),
        ("web", "it has no parley.dev/cluster label"),
        ("plain", "it has no app.kubernetes.io/component label"),
    ] {
        let stderr = plugin_fails(&["drain", name, "-n", ns]);
        assert!(stderr.contains(&format!("pod {name} in namespace {ns} is not a Parley gateway ({why})")), "{stderr}");
        let pod = pods.get(name).await.expect("pod");
        assert!(!pod.annotations().contains_key(DRAIN_ANNOTATION), "{name} must not be annotated");
    }
    let stderr = plugin_fails(&["drain", "eu-gateway-9", "-n", ns]);
    assert!(stderr.contains(&format!("Pod eu-gateway-9 not found in namespace {ns}")), "{stderr}");
}

/// A kubeconfig for a ServiceAccount with no rights, whose context's namespace is `namespace`.
fn powerless_kubeconfig(namespace: &str) -> std::path::PathBuf {
    kubectl_ok(&["create", "serviceaccount", "nobody", "-n", namespace]);
    let token = kubectl_ok(&["create", "token", "nobody", "-n", namespace, "--duration=1h"]).trim().to_owned();
    let admin: Value =
        serde_json::from_str(&kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"])).expect("kubeconfig");
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster["server"],
                      "certificate-authority-data": cluster["certificate-authority-data"]}}],
        "users": [{"name": "nobody", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "nobody", "namespace": namespace}}],
        "current-context": "e2e"
    });
    let path = std::env::temp_dir().join(format!("kubectl-parley-{namespace}.kubeconfig"));
    std::fs::write(&path, kubeconfig.to_string()).expect("write kubeconfig");
    path
}

#[tokio::test]
async fn rollout_restart_pause_and_resume_set_the_region_annotations() {
    if !control_plane() {
        return;
    }
    let client = Client::try_default().await.expect("client");
    install_crds(&client).await;
    let namespace = TestNamespace::create(&client, "kp-rollout").await;
    let ns = namespace.name.as_str();
    let regions: Api<Region> = Api::namespaced(client.clone(), ns);
    Api::<ChatCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &chat_cluster("chat"))
        .await
        .expect("ChatCluster");
    regions.create(&PostParams::default(), &region("eu", "eu-west", "chat")).await.expect("Region");
    let annotation = |region: &Region, key: &str| region.annotations().get(key).cloned();

    let before = Timestamp::now() - SignedDuration::from_secs(1);
    let out = plugin_ok(&["rollout", "restart", "eu", "-n", ns]);
    println!("{out}");
    assert!(out.contains(&format!("Region eu (region eu-west, namespace {ns}): restart requested at")), "{out}");
    let eu = regions.get("eu").await.expect("Region");
    let at: Timestamp = annotation(&eu, RESTART_AT_ANNOTATION).expect("restart-at").parse().expect("RFC 3339");
    assert!(at >= before && at <= Timestamp::now() + SignedDuration::from_secs(1), "{at}");

    let out = plugin_ok(&["rollout", "pause", "eu", "-n", ns]);
    assert!(out.contains("rollout paused"), "{out}");
    let eu = regions.get("eu").await.expect("Region");
    assert_eq!(annotation(&eu, ROLLOUT_PAUSED_ANNOTATION).as_deref(), Some("true"));
    assert!(annotation(&eu, RESTART_AT_ANNOTATION).is_some(), "a merge patch keeps the other annotations");

    // A restart while paused says it waits for resume.
    let out = plugin_ok(&["rollout", "restart", "eu", "-n", ns]);
    assert!(out.contains("The rollout is paused"), "{out}");

    let out = plugin_ok(&["rollout", "resume", "eu", "-n", ns]);
    assert!(out.contains("rollout resumed"), "{out}");
    let eu = regions.get("eu").await.expect("Region");
    assert_eq!(annotation(&eu, ROLLOUT_PAUSED_ANNOTATION), None);

    let stderr = plugin_fails(&["rollout", "pause", "asia", "-n", ns]);
    assert!(stderr.contains(&format!("Region asia not found in namespace {ns}")), "{stderr}");

    // Credentials without rights: the error names the verb, the object and the namespace. The namespace comes
    // from the kubeconfig's context when -n is not given.
    let kubeconfig = powerless_kubeconfig(ns);
    let path = kubeconfig.to_string_lossy().into_owned();
    let pause = plugin(&["rollout", "pause", "eu", "--kubeconfig", &path]);
    let status = plugin(&["status", "--kubeconfig", &path]);
    let _ = std::fs::remove_file(kubeconfig);
    let stderr = String::from_utf8_lossy(&pause.stderr);
    assert!(!pause.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("forbidden to patch Region eu in namespace {ns}")), "{stderr}");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(!status.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("forbidden to list ChatClusters in namespace {ns}")), "{stderr}");
    let eu = regions.get("eu").await.expect("Region");
    assert_eq!(annotation(&eu, ROLLOUT_PAUSED_ANNOTATION), None);
}
