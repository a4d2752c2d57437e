//! The operator as a user meets it, on a real Kubernetes API server (the harness of `tests/k8s.rs`: start the
//! control plane with `e2e/k8s/up.sh /tmp/parley-k8s` and `source /tmp/parley-k8s/env`): a Region whose name its
//! objects cannot carry, Regions applied before the Regions they replicate to, deleting a ChatCluster, a
//! ChatCluster without Regions, and a new version promoted one Region at a time.

#[path = "common/k8s.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parley_crds::region::{REGION_NAME_MESSAGE, REGION_NAME_RULE};
use parley_crds::{ChatCluster, Region};
use serde_json::json;

/// Creates the Secret `jwt` and the ChatCluster `chat` (version 0.1.0, quick drains) in the namespace.
async fn chat_cluster(client: &Client, namespace: &str) -> ChatCluster {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "jwt"}, "stringData": {"hs256": "a-test-secret-of-16+"}}))
            .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("create the jwt Secret");
    let cluster: ChatCluster = serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": "chat"},
        "spec": {"version": "0.1.0", "kafka": {"bootstrapServers": "kafka:9092"},
                 "cassandra": {"contactPoints": ["cassandra"], "keyspace": "chat"},
                 "redis": {"url": "redis://redis:6379"},
                 "gateway": {"drainWindowMs": 0, "drainDeadlineMs": 1000, "preStopDelaySeconds": 0},
                 "auth": {"jwtAlgorithm": "HS256", "jwtKeySecret": {"name": "jwt", "key": "hs256"}}}
    }))
    .expect("cluster");
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), namespace);
    clusters.create(&PostParams::default(), &cluster).await.expect("create the ChatCluster")
}

/// A Region `name` of the ChatCluster `chat`, region name `region_name`, one gateway and one router, replicating
/// `rules`.
fn region(name: &str, region_name: &str, rules: serde_json::Value) -> Region {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "Region", "metadata": {"name": name},
        "spec": {"clusterRef": "chat", "regionName": region_name,
                 "cassandra": {"datacenter": format!("dc-{region_name}"), "replicationFactor": 1},
                 "kafka": {"bootstrapServers": format!("kafka-{region_name}:9092"), "replicationFactor": 1},
                 "gateway": {"replicas": 1}, "router": {"replicas": 1}, "replication": rules}
    }))
    .expect("region")
}

/// A condition of a Region or ChatCluster: status, reason and message.
fn condition_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| (condition.status.clone(), condition.reason.clone(), condition.message.clone()))
}

/// The Events about the Region `name`: `(type, reason)`, once per occurrence (the recorder counts repeats of one
/// Event in its series).
async fn events_of(client: &Client, namespace: &str, name: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    events
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|event| event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .flat_map(|event| {
            let count = event.series.as_ref().map_or(1, |series| usize::try_from(series.count).unwrap_or(1));
            std::iter::repeat_n((event.type_.unwrap_or_default(), event.reason.unwrap_or_default()), count)
        })
        .collect()
}

/// Deletes a Region whose datacenter the operator cannot check (no Cassandra here): released first, so that its
/// finalizer lets it go.
async fn delete_region(regions: &Api<Region>, name: &str, datacenter: &str) {
    let release = json!({"metadata": {"annotations": {"parley.dev/cassandra-release-datacenter": datacenter}}});
    regions.patch(name, &PatchParams::default(), &Patch::Merge(release)).await.expect("release the datacenter");
    regions.delete(name, &DeleteParams::default()).await.expect("delete the Region");
    eventually(&format!("Region {name} gone"), || async { get(regions, name).await.is_none().then_some(()) }).await;
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `bound`.
async fn within<T, F, Fut>(bound: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The JSON pointer of the Region CRD's root CEL rules.
const ROOT_RULES: &str = "/spec/versions/0/schema/openAPIV3Schema/x-kubernetes-validations";

/// The Region CRD without its name rule, as a CRD installed before the rule existed; the rule is put back when
/// dropped.
struct WithoutNameRule {
    index: usize,
    rule: serde_json::Value,
}

impl WithoutNameRule {
    fn remove() -> WithoutNameRule {
        let crd: serde_json::Value =
            serde_json::from_str(&kubectl_ok(&["get", "crd", "regions.parley.dev", "-o", "json"])).expect("crd");
        let rules = crd.pointer(ROOT_RULES).and_then(|rules| rules.as_array()).cloned().unwrap_or_default();
        let index = rules.iter().position(|rule| rule["rule"] == REGION_NAME_RULE).expect("the CRD has the name rule");
        let rule = rules[index].clone();
        let patch = json!([
            {"op": "test", "path": format!("{ROOT_RULES}/{index}/rule"), "value": REGION_NAME_RULE},
            {"op": "remove", "path": format!("{ROOT_RULES}/{index}")}
        ]);
        kubectl_ok(&["patch", "crd", "regions.parley.dev", "--type=json", "-p", &patch.to_string()]);
        WithoutNameRule { index, rule }
    }
}

impl Drop for WithoutNameRule {
    fn drop(&mut self) {
        let patch = json!([{"op": "add", "path": format!("{ROOT_RULES}/{}", self.index), "value": self.rule}]);
        let output = kubectl(&["patch", "crd", "regions.parley.dev", "--type=json", "-p", &patch.to_string()]);
        assert!(output.status.success() || std::thread::panicking(), "restoring the name rule failed: {output:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_name_its_objects_cannot_carry_gets_invalid_name_and_nothing_applied() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "names").await;
    chat_cluster(&client, &ns.name).await;
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    regions.create(&PostParams::default(), &region("chat-eu", "eu", json!([]))).await.expect("create chat-eu");

    // The API server refuses a name with a '.' (a valid ConfigMap name, but no Service or pod can carry it).
    let dotted = region("eu.west", "eu-west", json!([]));
    let error = regions.create(&PostParams::default(), &dotted).await.expect_err("a '.' in the name");
    assert!(error.to_string().contains(REGION_NAME_MESSAGE), "{error}");

    // A Region stored before that rule existed (the CRD without it, then restored, as by an upgrade).
    {
        let _relaxed = WithoutNameRule::remove();
        within(Duration::from_secs(30), "the Region CRD without its name rule", || async {
            regions.create(&PostParams::default(), &dotted).await.ok()
        })
        .await;
    }
    let operator = Operator::start(&ns, "names");
    operator.ready().await;
    region_ready(&regions, "chat-eu").await;
    let degraded = eventually("eu.west Degraded", || async {
        let status = get(&regions, "eu.west").await?.status?;
        let degraded = condition_of(&status.conditions, "Degraded")?;
        (degraded.0 == "True").then_some((degraded, status))
    })
    .await;
    let ((_, reason, message), status) = degraded;
    assert_eq!(reason, "InvalidName");
    assert!(message.contains("Service eu.west-gateway must be a DNS-1035 label"), "{message}");
    assert_eq!(condition_of(&status.conditions, "Ready").map(|c| c.1).as_deref(), Some("InvalidName"));

    // No retries: the Region waits for a change (its siblings' changes reconcile it again, and write nothing).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = std::fs::read_to_string(&operator.log).expect("operator log");
    let key = format!("region={}/eu.west ", ns.name);
    let degraded_at = log
        .lines()
        .position(|line| line.contains("region=\"eu.west\"") && line.contains("region cannot be reconciled"))
        .expect("the operator logged the invalid Region");
    let retries: Vec<&str> =
        log.lines().skip(degraded_at).filter(|line| line.contains(&key) && line.contains("retrying")).collect();
    assert!(retries.is_empty(), "the invalid Region is retried: {retries:#?}");
    let warnings: Vec<_> = events_of(&client, &ns.name, "eu.west").await;
    assert_eq!(warnings, [("Warning".to_owned(), "InvalidName".to_owned())], "one Warning Event");

    // Nothing applied or allocated for it.
    let selector = ListParams::default().labels("parley.dev/region=eu.west");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert!(config_maps.list(&selector).await.expect("list").items.is_empty(), "a ConfigMap was applied");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    assert!(sets.list(&selector).await.expect("list").items.is_empty(), "a StatefulSet was applied");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    assert!(services.list(&selector).await.expect("list").items.is_empty(), "a Service was applied");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(get(&secrets, "eu.west-internal-token").await.is_none(), "a token Secret was created");
    let cluster = get(&Api::<ChatCluster>::namespaced(client.clone(), &ns.name), "chat").await.expect("cluster");
    let allocation = cluster.status.and_then(|s| s.machine_id_allocation).expect("chat-eu's allocation");
    assert_eq!(allocation.blocks.iter().map(|b| b.region.as_str()).collect::<Vec<_>>(), ["chat-eu"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_applied_before_its_replication_target_runs_and_waits_for_it() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "waits").await;
    chat_cluster(&client, &ns.name).await;
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    // A replicates every topic to B, and is applied first (as `kubectl apply -f` of a file does).
    let a = region("chat-a", "a", json!([{"topics": ["*"], "toRegions": ["b"]}]));
    regions.create(&PostParams::default(), &a).await.expect("create chat-a");
    let operator = Operator::start(&ns, "waits");
    operator.ready().await;

    // Progressing True, reason WaitingForReplicationTarget (or a rollout's reason while one runs, whose message
    // then names the target too).
    let waiting = |regions: Api<Region>| async move {
        let region = region_ready(&regions, "chat-a").await;
        let status = region.status.expect("status");
        let progressing = condition_of(&status.conditions, "Progressing")?;
        (progressing.0 == "True" && progressing.2.contains("waiting for replication target b:"))
            .then_some((progressing, status))
    };
    let ((_, reason, _), status) = eventually("chat-a waiting for b", || waiting(regions.clone())).await;
    let settled = get(&regions, "chat-a").await.and_then(|region| region.status?.rollout).map(|r| r.phase);
    if settled.as_deref() == Some("Idle") {
        assert_eq!(reason, "WaitingForReplicationTarget");
    }
    assert_eq!(condition_of(&status.conditions, "Degraded").map(|c| c.0).as_deref(), Some("False"));
    assert_eq!(condition_of(&status.conditions, "Ready").map(|c| c.0).as_deref(), Some("True"), "about the pods");
    for name in ["chat-a-gateway", "chat-a-router"] {
        assert!(get(&sets, name).await.is_some(), "{name} was not applied");
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let peers = |config_maps: Api<ConfigMap>| async move {
        let config = get(&config_maps, "chat-a-router-config").await?;
        Some(config.data.unwrap_or_default().get("PARLEY_PEER_ROUTERS").cloned().unwrap_or_default())
    };
    assert_eq!(peers(config_maps.clone()).await.as_deref(), Some(""), "no peer yet");

    // B appears: A converges to the full topology (B's MirrorMaker 2 copies A's topics, A's routers call B's).
    regions.create(&PostParams::default(), &region("chat-b", "b", json!([]))).await.expect("create chat-b");
    eventually("chat-a with its flow to b", || async {
        let a = get(&regions, "chat-a").await?;
        let progressing = condition_of(&a.status?.conditions, "Progressing")?;
        let peers = peers(config_maps.clone()).await?;
        let b = get(&regions, "chat-b").await?.status?;
        let mirror_maker = get(&deployments, "chat-b-mirrormaker").await?;
        (!progressing.2.contains("waiting for replication target")
            && peers.starts_with("b=")
            && b.mirrored_regions == ["a"]
            && mirror_maker.metadata.name.is_some())
        .then_some(())
    })
    .await;

    // B goes: A keeps running and waits again.
    delete_region(&regions, "chat-b", "dc-b").await;
    eventually("chat-a waiting for b again", || waiting(regions.clone())).await;
    assert!(get(&sets, "chat-a-router").await.is_some(), "the router StatefulSet stays");
    eventually("b no peer any more", || async { peers(config_maps.clone()).await?.is_empty().then_some(()) }).await;
    let events = events_of(&client, &ns.name, "chat-a").await;
    assert!(events.iter().all(|(type_, _)| type_ == "Normal"), "a Warning about chat-a: {events:?}");
    let waits = events.iter().filter(|(_, reason)| reason == "WaitingForReplicationTarget").count();
    assert_eq!(waits, 2, "one Normal Event each time chat-a starts waiting: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_chat_cluster_deletes_its_regions_and_their_objects() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "gc").await;
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    let operator = Operator::start(&ns, "gc");
    operator.ready().await;
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    region_ready(&regions, "dev-local").await;
    let cluster = get(&clusters, "dev").await.expect("cluster");
    let owned_by_cluster = |region: &Region| {
        region.owner_references().iter().any(|owner| {
            owner.kind == "ChatCluster"
                && owner.name == "dev"
                && Some(&owner.uid) == cluster.metadata.uid.as_ref()
                && owner.controller == Some(false)
                && owner.block_owner_deletion == Some(true)
        })
    };
    eventually("dev-local owned by its ChatCluster", || async {
        get(&regions, "dev-local").await.filter(|region| owned_by_cluster(region))
    })
    .await;
    // A GitOps tool applying the same manifests again (client-side or server-side apply) keeps the reference.
    apply_file(&ns.name, "examples/dev-chatcluster.yaml");
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-n",
        &ns.name,
        "-f",
        "examples/dev-chatcluster.yaml",
    ]);
    let region = get(&regions, "dev-local").await.expect("dev-local");
    assert!(
        owned_by_cluster(&region),
        "re-applying the manifests dropped the reference: {:?}",
        region.owner_references()
    );

    // The garbage collector deletes the Region (its finalizer lets it go, its ChatCluster being gone), and the
    // Region's objects follow it.
    clusters.delete("dev", &DeleteParams::default()).await.expect("delete the ChatCluster");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let selector = ListParams::default().labels("parley.dev/region=dev-local");
    within(Duration::from_secs(120), "the Region and its objects garbage-collected", || async {
        let region = get(&regions, "dev-local").await;
        let sets = sets.list(&selector).await.ok()?.items;
        let config_maps = config_maps.list(&selector).await.ok()?.items;
        (region.is_none() && sets.is_empty() && config_maps.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_cluster_without_regions_says_so_in_its_status() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "empty").await;
    chat_cluster(&client, &ns.name).await;
    let operator = Operator::start(&ns, "empty");
    operator.ready().await;
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &ns.name);
    let no_regions = |clusters: Api<ChatCluster>| async move {
        let cluster = get(&clusters, "chat").await?;
        let status = cluster.status?;
        (status.observed_generation == cluster.metadata.generation).then_some(())?;
        let ready = condition_of(&status.conditions, "Ready")?;
        (ready.1 == "NoRegions").then_some((ready, status))
    };
    let (ready, status) = eventually("the ChatCluster's status", || no_regions(clusters.clone())).await;
    assert_eq!(ready, ("False".to_owned(), "NoRegions".to_owned(), "no Region names this ChatCluster".to_owned()));
    assert_eq!(condition_of(&status.conditions, "Progressing").map(|c| c.0).as_deref(), Some("False"));
    assert_eq!(condition_of(&status.conditions, "Degraded").map(|c| c.0).as_deref(), Some("False"));
    assert_eq!(status.regions_ready.as_deref(), Some("0/0"));
    let printed = kubectl_ok(&["get", "chatclusters", "-n", &ns.name]);
    assert!(printed.contains("0/0") && printed.contains("NoRegions"), "{printed}");

    // A spec change is observed.
    let change = json!({"spec": {"fanoutThreshold": 500}});
    clusters.patch("chat", &PatchParams::default(), &Patch::Merge(change)).await.expect("change the spec");
    eventually("the new generation observed", || no_regions(clusters.clone())).await;

    // With a Region, then without it again.
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    regions.create(&PostParams::default(), &region("chat-eu", "eu", json!([]))).await.expect("create chat-eu");
    region_ready(&regions, "chat-eu").await;
    eventually("1/1 regions", || async {
        let status = get(&clusters, "chat").await?.status?;
        (status.regions_ready.as_deref() == Some("1/1")).then_some(())
    })
    .await;
    delete_region(&regions, "chat-eu", "dc-eu").await;
    let (_, status) = eventually("no Regions again", || no_regions(clusters.clone())).await;
    assert_eq!(status.regions_ready.as_deref(), Some("0/0"));
    assert!(status.regions.is_empty());
}

/// The image of a StatefulSet's container, its generation and its update revision.
fn image_and_revision(set: &StatefulSet) -> (String, Option<i64>, Option<String>) {
    let image = set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .and_then(|pod| pod.containers.first())
        .and_then(|container| container.image.clone())
        .unwrap_or_default();
    (image, set.metadata.generation, set.status.as_ref().and_then(|status| status.update_revision.clone()))
}

/// [`image_and_revision`] of each named StatefulSet.
async fn images(sets: &Api<StatefulSet>, names: &[&str]) -> Vec<(String, Option<i64>, Option<String>)> {
    let mut out = Vec::new();
    for name in names {
        out.push(image_and_revision(&get(sets, name).await.unwrap_or_else(|| panic!("no StatefulSet {name}"))));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_version_overrides_the_chat_clusters_for_that_region_only() {
    if !control_plane() {
        return;
    }
    install_crds();
    let client = client().await;
    let ns = TestNamespace::new(&client, "version").await;
    chat_cluster(&client, &ns.name).await;
    let regions: Api<Region> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    for (name, region_name) in [("chat-a", "a"), ("chat-b", "b")] {
        regions.create(&PostParams::default(), &region(name, region_name, json!([]))).await.expect("create");
    }
    let operator = Operator::start(&ns, "version");
    operator.ready().await;
    for name in ["chat-a", "chat-b"] {
        let status = region_ready(&regions, name).await.status.expect("status");
        assert_eq!(status.version.as_deref(), Some("0.1.0"), "{name}");
    }
    let b_before = images(&sets, &["chat-b-gateway", "chat-b-router"]).await;
    assert!(b_before.iter().all(|(image, _, _)| image.ends_with(":0.1.0")), "{b_before:?}");

    // An image tag the API server refuses.
    let bad = json!({"spec": {"version": "0.2.0 beta"}});
    let error = regions.patch("chat-a", &PatchParams::default(), &Patch::Merge(bad)).await.expect_err("not a tag");
    assert!(error.to_string().contains("version must be a valid image tag"), "{error}");

    // chat-a runs 0.2.0; chat-b's StatefulSets are not touched.
    let promote = json!({"spec": {"version": "0.2.0"}});
    regions.patch("chat-a", &PatchParams::default(), &Patch::Merge(promote)).await.expect("promote chat-a");
    eventually("chat-a on 0.2.0", || async {
        let gateway = image_and_revision(&get(&sets, "chat-a-gateway").await?).0;
        let router = image_and_revision(&get(&sets, "chat-a-router").await?).0;
        (gateway.ends_with("/gateway:0.2.0") && router.ends_with("/router:0.2.0")).then_some(())
    })
    .await;
    // status.version follows once every pod of chat-a runs 0.2.0. The gateways roll by the operator's drain-aware
    // rollout, which waits for each new gateway to report its connections, and kwok's pods run no gateway: like
    // `kubectl delete pod`, replace a gateway left on the old revision for more than 10 s.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns.name);
    let promoted = Instant::now();
    within(Duration::from_secs(120), "chat-a's status.version 0.2.0", || async {
        let region = get(&regions, "chat-a").await?;
        if region.status.as_ref()?.version.as_deref() == Some("0.2.0") {
            return Some(());
        }
        let revision = get(&sets, "chat-a-gateway").await?.status?.update_revision?;
        if promoted.elapsed() > Duration::from_secs(10) {
            let gateways = ListParams::default().labels("parley.dev/region=chat-a,app.kubernetes.io/component=gateway");
            for pod in pods.list(&gateways).await.ok()?.items {
                if pod.labels().get("controller-revision-hash") != Some(&revision) {
                    let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
                }
            }
        }
        None
    })
    .await;
    settle(&operator).await;
    let b_after = images(&sets, &["chat-b-gateway", "chat-b-router"]).await;
    assert_eq!(b_after, b_before, "chat-b's StatefulSets changed");
    let b = get(&regions, "chat-b").await.expect("chat-b").status.expect("status");
    assert_eq!(b.version.as_deref(), Some("0.1.0"));
    let printed = kubectl_ok(&["get", "regions", "-n", &ns.name]);
    let header = printed.lines().next().unwrap_or_default();
    assert!(header.contains("VERSION"), "{printed}");
    let row = printed.lines().find(|line| line.starts_with("chat-a ")).unwrap_or_default();
    assert!(row.contains("0.2.0"), "{printed}");
}

/// The status of `region` as the operator writes it once its pods are all ready.
fn ready_status(region: &Region, version: &str) -> parley_crds::RegionStatus {
    use parley_operator::status::{region_ready, running_version, AppliedObjects, Rollout};
    let rolled = Rollout { desired: 1, ready: 1, updated: 1, observed: true };
    let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time");
    let block = parley_crds::MachineIdBlock { start: 0, size: 16 };
    let mut status = region_ready(region, block, rolled, rolled, AppliedObjects::default(), Vec::new(), now);
    status.version = running_version(region, version, rolled, rolled);
    status
}

#[test]
fn waiting_for_a_replication_target_is_progressing_not_degraded() {
    use parley_operator::status::wait_for_replication_targets;
    let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time");
    let mut a = region("chat-a", "a", json!([{"topics": ["*"], "toRegions": ["b", "c"]}]));
    a.metadata.generation = Some(1);
    let mut status = ready_status(&a, "0.1.0");
    assert!(wait_for_replication_targets(&mut status, &a, &["b".to_owned(), "c".to_owned()], now), "starts waiting");
    let progressing = condition_of(&status.conditions, "Progressing").expect("progressing");
    assert_eq!((progressing.0.as_str(), progressing.1.as_str()), ("True", "WaitingForReplicationTarget"));
    assert!(progressing.2.contains("waiting for replication target b, c:"), "{}", progressing.2);
    assert_eq!(condition_of(&status.conditions, "Ready").map(|c| c.0).as_deref(), Some("True"));
    assert_eq!(condition_of(&status.conditions, "Degraded").map(|c| c.0).as_deref(), Some("False"));
    // Stored, then recomputed: still waiting, no second Event, the same status.
    a.status = Some(status.clone());
    let mut again = ready_status(&a, "0.1.0");
    assert!(!wait_for_replication_targets(&mut again, &a, &["b".to_owned(), "c".to_owned()], now));
    assert_eq!(again, status, "a no-op reconcile writes nothing");
    // Nothing missing: Progressing as the pods say.
    let mut none = ready_status(&a, "0.1.0");
    assert!(!wait_for_replication_targets(&mut none, &a, &[], now));
    assert_eq!(condition_of(&none.conditions, "Progressing").map(|c| c.0).as_deref(), Some("False"));
}

#[test]
fn the_running_version_follows_the_pods() {
    use parley_operator::status::{running_version, Rollout};
    let mut a = region("chat-a", "a", json!([]));
    let rolled = Rollout { desired: 2, ready: 2, updated: 2, observed: true };
    let rolling = Rollout { desired: 2, ready: 2, updated: 1, observed: true };
    assert_eq!(running_version(&a, "0.1.0", rolled, rolled).as_deref(), Some("0.1.0"));
    assert_eq!(running_version(&a, "0.1.0", rolling, rolled), None, "nothing known yet");
    a.status = Some(parley_crds::RegionStatus { version: Some("0.1.0".into()), ..Default::default() });
    assert_eq!(running_version(&a, "0.2.0", rolling, rolled).as_deref(), Some("0.1.0"), "still rolling");
    assert_eq!(running_version(&a, "0.2.0", rolled, rolling).as_deref(), Some("0.1.0"), "routers still rolling");
    assert_eq!(running_version(&a, "0.2.0", rolled, rolled).as_deref(), Some("0.2.0"));
}
