//! The region e2e: the operator's pods really run. A real control plane (`e2e/k8s/up.sh`), the stack's engines
//! (`e2e/stack/up.sh`), the `parley-operator` binary as a local process, and `parley-pod-runner` playing kubelet for
//! three nodes of its own: the operator turns a ChatCluster and a Region into StatefulSets, the scheduler puts their
//! pods on the runner's nodes, the runner starts `parley` and `parley-router` for them (environment, volumes,
//! probes, status, each pod on its own loopback address; `e2e/runner/README.md`), and clients chat through the
//! gateway pods. Every test ends with the history checker (`parley_e2e::history`) over every client's log: every
//! message confirmed, none lost, none duplicated, one order per channel on every member.
//!
//! - `three_gateways_and_three_routers_survive_a_router_deletion_and_a_router_scale_down`: 200 clients in 20
//!   channels on 3 gateways and 3 routers; a router pod deleted (its successor at the same ordinal leases another
//!   machine ID, and no two live routers share one, read from their `/metrics`), then routers scaled 3→2 through
//!   `spec.router.replicas` (within the default `router.maxReplicas` of 8, so the machine-ID block stays): no
//!   gateway pod restarts (same UIDs, restartCount 0) and the surviving routers neither; it reports how long the
//!   operator took from the Region patch to the StatefulSet change. (Routers joining come in the rollout test, where
//!   each router is replaced under load.)
//! - `the_operator_rolls_and_scales_the_gateways_one_drained_pod_at_a_time`: 1,000 clients (600 in 60 channels
//!   with a steady load, 400 idle) on 3 gateways and 2 routers. A new gateway image: the operator drains, replaces and
//!   waits for one gateway at a time (never two out); every client is back within the drain window, every resume
//!   succeeds (the Region's `status.rollout.lastResumeRate`), and the reconnect times and let-go moments are
//!   reported as histograms. Then the Region becomes a range of 2-5 gateways at 400 connections per pod: 900 more
//!   idle clients scale it to 5, and when the 1,300 idle clients leave it drains its way down to 2.
//! - `the_runner_runs_pods_like_a_kubelet`: the runner alone (needs only the control plane), with `parley` and
//!   `parley-router` as images: environment, volumes, hosts file, read-only root, probes, restarts, waiting reasons
//!   and deletion, checked through the API and `/proc/<pid>`.
//!
//! When the stack's environment names TLS CAs and credentials (`PARLEY_REDIS_TLS_CA_FILE`, `PARLEY_REDIS_USERNAME`,
//! `PARLEY_KAFKA_TLS_CA_FILE`, `PARLEY_KAFKA_SASL_USERNAME`, `PARLEY_CASSANDRA_TLS_CA_FILE`,
//! `PARLEY_CASSANDRA_USERNAME`, ... as `e2e/stack/up.sh` writes them), the ChatCluster uses them, through Secrets
//! (`tlsCaSecret`, `credentials`); otherwise it speaks plaintext.
//!
//! Which nodes: the test namespace carries `scheduler.alpha.kubernetes.io/node-selector` and
//! `scheduler.alpha.kubernetes.io/defaultTolerations` (admission plugins PodNodeSelector and
//! PodTolerationRestriction, which `e2e/k8s/up.sh` enables), so its pods go to the runner's nodes only; the runner's
//! nodes are tainted, so no other namespace's pod lands on them. kwok's nodes are left alone.
//!
//! Needs `KUBECONFIG` (and `kubectl` on PATH), `PARLEY_REDIS_URL`, `PARLEY_KAFKA_BOOTSTRAP`,
//! `PARLEY_CASSANDRA_CONTACT` (and `PARLEY_CASSANDRA_DC`, default `dc1`), and the `parley`, `parley-router` and
//! `parley-operator` binaries (`cargo build --workspace`); without the engines a plain `cargo test` skips these
//! tests and the full test command fails them. The tests run one at a time. Logs of a failed test stay in the work
//! dir its message names (runner, operator, and every container under `runner/logs/<namespace>/<pod>/`);
//! `PARLEY_REGION_KEEP=1` keeps them after a pass too.

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parley_client::ClientConfig;
use parley_crds::{ChatCluster, Region};
use parley_e2e::chaos::load::{self, ChannelPlan, Counters, Member, Phase, Scenario};
use parley_e2e::chaos::plan::Rng;
use parley_e2e::history::{self, Input, Report, Stored};
use parley_test_support::{binary, engine, report, Engine};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The HS256 secret of the clients' tokens (the ChatCluster's `auth.jwtKeySecret`).
const JWT_SECRET: &str = "region-e2e-hs256-secret-0123456789abcdef";
/// The gateways' client port (the ChatCluster's default `gateway.port`).
const CLIENT_PORT: u16 = 8080;
/// The label the operator puts on pods with their component.
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The runner's node label and taint key; the value is the test's namespace.
const RUNNER_KEY: &str = "parley.dev/pod-runner";
/// How long pods may take to become ready (the router creates its topics and keyspace first).
const READY_WITHIN: Duration = Duration::from_secs(150);

/// The tests share the stack's Redis under the binaries' default key prefix: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The engines, from the environment (`stack.env`).
#[derive(Debug, Clone)]
struct Engines {
    redis_url: String,
    kafka_bootstrap: String,
    cassandra_contact: String,
    cassandra_datacenter: String,
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// The engines when every variable is set; `None` (after a SKIPPED line) when the test is skipped.
fn engines() -> Option<Engines> {
    engine(Engine::Kubernetes)?;
    Some(Engines {
        redis_url: engine(Engine::Redis)?,
        kafka_bootstrap: engine(Engine::Kafka)?,
        cassandra_contact: engine(Engine::Cassandra)?,
        cassandra_datacenter: variable("PARLEY_CASSANDRA_DC").unwrap_or_else(|| "dc1".to_owned()),
    })
}

/// A short lowercase tag, unique per test run: users, channels, the namespace, the topic prefix and the keyspace
/// carry it, so a run never meets an earlier run's data in the shared engines.
fn tag() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut rng = Rng::new((nanos as u64) ^ u64::from(std::process::id()).rotate_left(32));
    // A letter first: Region names (made from it) must be DNS-1035 labels.
    (0..6)
        .map(|i| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.below(if i == 0 { 26 } else { 36 })]))
        .collect()
}

fn kubectl(args: &[&str]) -> Result<String, String> {
    let output = Command::new("kubectl")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run kubectl (on PATH from e2e/k8s/up.sh's env file?): {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The CRDs, from the operator's own `crd` subcommand.
fn install_crds(work: &Path) {
    let crds = Command::new(binary("parley-operator")).arg("crd").output().expect("parley-operator crd");
    assert!(crds.status.success(), "parley-operator crd failed");
    let file = work.join("crds.yaml");
    std::fs::write(&file, &crds.stdout).expect("write the CRDs");
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &file.to_string_lossy()]).expect("apply the CRDs");
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/chatclusters.parley.dev",
        "crd/regions.parley.dev",
    ])
    .expect("CRDs established");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running Region: its namespace, the runner, the operator, and what happened when.
struct RegionTest {
    client: Client,
    namespace: String,
    region: String,
    tag: String,
    work: PathBuf,
    runner: Option<Child>,
    operator: Option<Child>,
    started: Instant,
    timeline: Vec<String>,
    /// The ChatCluster's `spec.gateway`.
    cluster_gateway: serde_json::Value,
}

impl RegionTest {
    /// A namespace pinned to a new runner's three nodes (`restart_backoff`: the runner's first restart delay).
    async fn new(restart_backoff: &str) -> RegionTest {
        let tag = tag();
        let namespace = format!("region-{tag}");
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("region-{tag}"));
        std::fs::create_dir_all(&work).expect("work dir");
        let client = Client::try_default().await.expect("kube client from KUBECONFIG");
        let mut test = RegionTest {
            client,
            namespace: namespace.clone(),
            region: format!("{tag}-r"),
            tag: tag.clone(),
            work: work.clone(),
            runner: None,
            operator: None,
            started: Instant::now(),
            timeline: Vec::new(),
            // Short drains, so a scale-down takes seconds: 1 s preStop, clients moved within 2 s, stopped by 5 s.
            cluster_gateway: json!({"preStopDelaySeconds": 1, "drainWindowMs": 2000, "drainDeadlineMs": 5000}),
        };
        test.create_namespace().await;
        test.start_runner(restart_backoff);
        test
    }

    /// A namespace and runner, then the operator, Secrets, ChatCluster and Region (`gateway`: the Region's
    /// `spec.gateway`, running `gateways` pods); waits until every pod is ready.
    async fn start(engines: &Engines, gateway: serde_json::Value, gateways: i32, routers: i32) -> RegionTest {
        let mut test = RegionTest::new("10").await;
        install_crds(&test.work);
        test.start_operator();
        test.apply(engines, gateway, routers).await;
        test.wait_ready(gateways, routers, READY_WITHIN).await;
        test.note(&format!("{gateways} gateway and {routers} router pods ready"));
        test
    }

    fn note(&mut self, what: &str) {
        let line = format!("+{:>5.1} s {what}", self.started.elapsed().as_secs_f64());
        eprintln!("[region {}] {line}", self.tag);
        self.timeline.push(line);
    }

    /// The namespace, pinned to the runner's nodes; checks that the API server enforces the pinning.
    async fn create_namespace(&mut self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let tolerations =
            json!([{"key": RUNNER_KEY, "operator": "Equal", "value": self.namespace, "effect": "NoSchedule"}]);
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": self.namespace,
                "annotations": {
                    "scheduler.alpha.kubernetes.io/node-selector": format!("{RUNNER_KEY}={}", self.namespace),
                    "scheduler.alpha.kubernetes.io/defaultTolerations": tolerations.to_string(),
                }
            }
        }))
        .expect("namespace");
        namespaces.create(&PostParams::default(), &namespace).await.expect("create the namespace");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let probe: Pod = serde_json::from_value(json!({
            "metadata": {"name": "pinning-check"},
            "spec": {"containers": [{"name": "c", "image": "parley/none:0"}]}
        }))
        .expect("pod");
        let dry = pods.create(&PostParams { dry_run: true, ..PostParams::default() }, &probe).await.expect("dry run");
        let selector = dry.spec.and_then(|spec| spec.node_selector).unwrap_or_default();
        assert_eq!(
            selector.get(RUNNER_KEY),
            Some(&self.namespace),
            "the API server did not add the namespace's node selector: it lacks the PodNodeSelector admission \
             plugin; restart the control plane with e2e/k8s/up.sh (it enables PodNodeSelector and \
             PodTolerationRestriction)"
        );
    }

    fn start_runner(&mut self, restart_backoff: &str) {
        let log = std::fs::File::create(self.work.join("runner.log")).expect("runner log");
        let parley = binary("parley");
        binary("parley-router");
        let binaries = parley.parent().expect("binaries dir").to_string_lossy().into_owned();
        let prefix = format!("127.{}", 2 + std::process::id() % 250);
        let label = format!("{RUNNER_KEY}={}", self.namespace);
        let taint = format!("{label}:NoSchedule");
        let state = self.work.join("runner").to_string_lossy().into_owned();
        let node_prefix = format!("{}-runner", self.namespace);
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-pod-runner"))
            .args(["run", "--binaries", &binaries, "--state-dir", &state, "--node-prefix", &node_prefix])
            .args(["--nodes", "3", "--node-label", &label, "--node-taint", &taint, "--address-prefix", &prefix])
            .args(["--restart-backoff", restart_backoff])
            .env("PARLEY_POD_RUNNER_LOG", "info,kube=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start parley-pod-runner");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (serving, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("serving nodes") {
                    let _ = serving.send(());
                }
            }
        });
        self.runner = Some(child);
        if wait.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("parley-pod-runner did not start serving; log:\n{}", tail(&self.work.join("runner.log"), 30));
        }
        self.note("runner serving 3 nodes");
    }

    fn start_operator(&mut self) {
        let log = std::fs::File::create(self.work.join("operator.log")).expect("operator log");
        let child = Command::new(binary("parley-operator"))
            .args(["run", "--namespace", &self.namespace, "--admin-listen", "127.0.0.1:0"])
            .args(["--identity", "region-e2e", "--lease-duration-seconds", "6", "--lease-grace-seconds", "2"])
            .env("PARLEY_OPERATOR_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start parley-operator");
        self.operator = Some(child);
    }

    /// A Secret in the test namespace.
    async fn secret(&self, name: &str, data: BTreeMap<String, String>) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).expect("secret");
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap_or_else(|error| panic!("create Secret {name}: {error}"));
    }

    /// Secrets, the ChatCluster and the Region.
    async fn apply(&mut self, engines: &Engines, gateway: serde_json::Value, routers: i32) {
        self.secret("jwt", BTreeMap::from([("hs256".to_owned(), JWT_SECRET.to_owned())])).await;
        let mut kafka =
            json!({"bootstrapServers": engines.kafka_bootstrap, "topicPrefix": format!("region-{}", self.tag)});
        let mut cassandra =
            json!({"contactPoints": [engines.cassandra_contact], "keyspace": format!("region_{}", self.tag)});
        let mut redis = json!({"url": engines.redis_url});
        let mut secured = Vec::new();
        for (backend, object, ca, user, password) in [
            (
                "kafka",
                &mut kafka,
                "PARLEY_KAFKA_TLS_CA_FILE",
                "PARLEY_KAFKA_SASL_USERNAME",
                "PARLEY_KAFKA_SASL_PASSWORD",
            ),
            (
                "cassandra",
                &mut cassandra,
                "PARLEY_CASSANDRA_TLS_CA_FILE",
                "PARLEY_CASSANDRA_USERNAME",
                "PARLEY_CASSANDRA_PASSWORD",
            ),
            ("redis", &mut redis, "PARLEY_REDIS_TLS_CA_FILE", "PARLEY_REDIS_USERNAME", "PARLEY_REDIS_PASSWORD"),
        ] {
            if let Some(ca_file) = variable(ca) {
                let ca = std::fs::read_to_string(&ca_file).unwrap_or_else(|error| panic!("{ca}={ca_file}: {error}"));
                let name = format!("{backend}-ca");
                self.secret(&name, BTreeMap::from([("ca.crt".to_owned(), ca)])).await;
                if backend != "redis" {
                    object["tls"] = json!(true);
                }
                object["tlsCaSecret"] = json!({"name": name, "key": "ca.crt"});
                secured.push(format!("{backend} TLS"));
            }
            if let Some(password) = variable(password) {
                let name = format!("{backend}-credentials");
                let username = variable(user).unwrap_or_else(|| "default".to_owned());
                self.secret(
                    &name,
                    BTreeMap::from([("username".to_owned(), username), ("password".to_owned(), password)]),
                )
                .await;
                object["credentials"] = json!({"secretName": name});
                secured.push(format!("{backend} credentials"));
            }
        }
        if let Some(mechanism) = variable("PARLEY_KAFKA_SASL_MECHANISM") {
            kafka["saslMechanism"] = json!(mechanism);
        }
        let cluster: ChatCluster = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1",
            "kind": "ChatCluster",
            "metadata": {"name": self.tag},
            "spec": {
                "version": "0.1.0",
                "kafka": kafka,
                "cassandra": cassandra,
                "redis": redis,
                "auth": {"jwtAlgorithm": "HS256", "jwtKeySecret": {"name": "jwt", "key": "hs256"}},
                "gateway": self.cluster_gateway,
            }
        }))
        .expect("ChatCluster");
        let region: Region = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1",
            "kind": "Region",
            "metadata": {"name": self.region},
            "spec": {
                "clusterRef": self.tag,
                "regionName": "local",
                "cassandra": {"datacenter": engines.cassandra_datacenter, "replicationFactor": 1},
                "gateway": gateway,
                "router": {"replicas": routers}
            }
        }))
        .expect("Region");
        let clusters: Api<ChatCluster> = Api::namespaced(self.client.clone(), &self.namespace);
        clusters.create(&PostParams::default(), &cluster).await.expect("create the ChatCluster");
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        regions.create(&PostParams::default(), &region).await.expect("create the Region");
        let security = if secured.is_empty() { "plaintext engines".to_owned() } else { secured.join(", ") };
        self.note(&format!("ChatCluster and Region applied ({security})"));
    }

    async fn pods(&self, component: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default().labels(&format!("{COMPONENT_LABEL}={component}"));
        let mut list = pods.list(&params).await.map(|list| list.items).unwrap_or_default();
        list.sort_by_key(|pod| pod.name_any());
        list
    }

    /// Ready pods of a component (and how many exist).
    async fn ready(&self, component: &str) -> (usize, usize) {
        let pods = self.pods(component).await;
        let ready = pods
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .filter(|pod| {
                let status = pod.status.as_ref();
                let ip_is_loopback =
                    status.and_then(|status| status.pod_ip.as_deref()).is_some_and(|ip| ip.starts_with("127."));
                let ready = status
                    .and_then(|status| status.conditions.as_ref())
                    .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                ip_is_loopback && ready
            })
            .count();
        (ready, pods.len())
    }

    /// Waits until exactly `gateways` and `routers` pods exist and are ready, and the Region says so.
    async fn wait_ready(&self, gateways: i32, routers: i32, within: Duration) {
        let deadline = Instant::now() + within;
        let wanted = (usize::try_from(gateways).unwrap_or(0), usize::try_from(routers).unwrap_or(0));
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        loop {
            let (gateways_ready, gateways_total) = self.ready("gateway").await;
            let (routers_ready, routers_total) = self.ready("router").await;
            let region_ready = regions.get_opt(&self.region).await.ok().flatten().is_some_and(|region| {
                region.status.as_ref().is_some_and(|status| {
                    status.observed_generation == region.metadata.generation
                        && status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                })
            });
            if (gateways_ready, routers_ready) == wanted && (gateways_total, routers_total) == wanted && region_ready {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "after {within:?}: gateways {gateways_ready}/{gateways_total} ready, routers \
                     {routers_ready}/{routers_total} ready (wanted {wanted:?}), Region Ready: {region_ready}\n{}",
                    self.diagnose().await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The gateways' WebSocket URLs (their pods' loopback addresses), by pod name.
    async fn gateway_urls(&self) -> Vec<String> {
        self.pods("gateway")
            .await
            .iter()
            .filter_map(|pod| pod.status.as_ref()?.pod_ip.clone())
            .map(|ip| format!("ws://{ip}:{CLIENT_PORT}"))
            .collect()
    }

    /// Each ready router pod's leased Snowflake machine ID (`parley_router_machine_id` on its admin port, which the
    /// test reaches at the pod's loopback address), by pod name.
    async fn router_machine_ids(&self) -> BTreeMap<String, i64> {
        let mut ids = BTreeMap::new();
        for pod in self.pods("router").await.iter().filter(|pod| pod.metadata.deletion_timestamp.is_none()) {
            let Some(ip) = pod.status.as_ref().and_then(|status| status.pod_ip.clone()) else { continue };
            let port = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.containers.first())
                .and_then(|container| container.ports.as_ref())
                .and_then(|ports| ports.iter().find(|port| port.name.as_deref() == Some("admin")))
                .map_or(9090, |port| port.container_port);
            let Ok(mut stream) = tokio::net::TcpStream::connect(format!("{ip}:{port}")).await else { continue };
            let request = format!("GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n");
            if tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await.is_err() {
                continue;
            }
            let mut answer = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await;
            let id = answer
                .lines()
                .find_map(|line| line.strip_prefix("parley_router_machine_id "))
                .and_then(|value| value.trim().parse::<f64>().ok());
            if let Some(id) = id {
                ids.insert(pod.name_any(), id as i64);
            }
        }
        ids
    }

    /// `kubectl delete pod`, as an operator of the cluster would.
    fn delete_pod(&mut self, name: &str) {
        kubectl(&["delete", "pod", name, "-n", &self.namespace, "--wait=false"]).expect("kubectl delete pod");
        self.note(&format!("kubectl delete pod {name}"));
    }

    /// Patches the Region's `spec.<component>.<field>`; returns how long the operator took to set the component's
    /// StatefulSet to `replicas` after the patch (polled every 50 ms).
    async fn scale(&mut self, component: &str, field: &str, replicas: i32) -> Duration {
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        let sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let set_name = format!("{}-{component}", self.region);
        let patch = json!({"spec": {component: {field: replicas}}});
        regions.patch(&self.region, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the Region");
        let patched = Instant::now();
        self.note(&format!("Region spec.{component}.{field} = {replicas}"));
        loop {
            let set = sets.get_opt(&set_name).await.ok().flatten();
            if set.and_then(|set| set.spec?.replicas) == Some(replicas) {
                break;
            }
            assert!(
                patched.elapsed() < READY_WITHIN,
                "StatefulSet {set_name} not at {replicas} replicas {READY_WITHIN:?} after the Region patch\n{}",
                self.diagnose().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = patched.elapsed();
        self.note(&format!(
            "StatefulSet {set_name} at {replicas} replicas {:.2} s after the patch",
            took.as_secs_f64()
        ));
        took
    }

    /// Each pod of a component (not being deleted), by name: its UID and its container's restart count.
    async fn incarnations(&self, component: &str) -> BTreeMap<String, (String, i32)> {
        self.pods(component)
            .await
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(|pod| (pod.name_any(), (pod.uid().unwrap_or_default(), container_status(pod).restart_count)))
            .collect()
    }

    /// Asserts that each pod of `before` still runs as the same pod (same UID) and has not restarted since.
    async fn assert_not_restarted(&self, component: &str, before: &BTreeMap<String, (String, i32)>, what: &str) {
        let now = self.incarnations(component).await;
        for (name, (uid, restarts)) in before {
            let current = now.get(name);
            assert_eq!(
                current.map(|(uid, _)| uid),
                Some(uid),
                "{what}: {component} pod {name} was replaced (before: {before:?}, now: {now:?})\ntimeline:\n{}",
                self.timeline()
            );
            assert_eq!(
                current.map(|(_, restarts)| restarts),
                Some(restarts),
                "{what}: {component} pod {name} restarted (before: {before:?}, now: {now:?})\ntimeline:\n{}",
                self.timeline()
            );
        }
    }

    /// What the pods say, and the tails of the logs, for a failure message.
    async fn diagnose(&self) -> String {
        let pods = kubectl(&["get", "pods", "-n", &self.namespace, "-o", "wide"]).unwrap_or_else(|error| error);
        let mut out = format!(
            "pods:\n{pods}\nrunner log (tail): {}\n{}\n",
            self.work.join("runner.log").display(),
            tail(&self.work.join("runner.log"), 15)
        );
        out.push_str(&format!("operator log (tail):\n{}\n", tail(&self.work.join("operator.log"), 10)));
        let logs = self.work.join("runner").join("logs").join(&self.namespace);
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                out.push_str(&format!("{} (tail):\n{}\n", file.path().display(), tail(&file.path(), 8)));
            }
        }
        out
    }

    fn timeline(&self) -> String {
        self.timeline.join("\n")
    }
}

impl Drop for RegionTest {
    fn drop(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            let _ = operator.kill();
            let _ = operator.wait();
        }
        if let Some(mut runner) = self.runner.take() {
            // SIGTERM: the runner stops every process and deletes its nodes.
            let _ = Command::new("kill").args(["-TERM", &runner.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(45);
            while Instant::now() < deadline && matches!(runner.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = runner.kill();
            let _ = runner.wait();
        }
        let _ = kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
        if std::thread::panicking() {
            eprintln!("[region {}] timeline:\n{}\nlogs kept in {}", self.tag, self.timeline(), self.work.display());
        } else if variable("PARLEY_REGION_KEEP").is_some() {
            eprintln!("[region {}] logs kept in {} (PARLEY_REGION_KEEP)", self.tag, self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The clients of a test and their load.
struct Chat {
    scenario: Scenario,
    members: BTreeMap<usize, Arc<Member>>,
    counters: Arc<Counters>,
    phase: Arc<Phase>,
    senders: Vec<JoinHandle<()>>,
}

/// The shape of the load.
struct Load {
    users: usize,
    channels: usize,
    members_per_channel: usize,
    senders_per_channel: usize,
    /// Messages per second of each sender.
    rate: f64,
}

impl Chat {
    /// Connects every user (user `i` to gateway `i mod n`, the others as alternates), makes the channels, and starts
    /// the senders.
    async fn start(tag: &str, urls: &[String], shape: &Load, seed: u64) -> Chat {
        assert!(!urls.is_empty(), "no gateway URL");
        let users: Vec<String> = (0..shape.users).map(|index| format!("{tag}-u{index:03}")).collect();
        let channels: Vec<ChannelPlan> = (0..shape.channels)
            .map(|k| {
                let members: Vec<usize> =
                    (0..shape.members_per_channel).map(|j| (k * shape.members_per_channel + j) % shape.users).collect();
                ChannelPlan {
                    id: format!("g:{tag}-c{k:02}"),
                    senders: members[..shape.senders_per_channel.min(members.len())].to_vec(),
                    members,
                    rate_millis: (shape.rate * 1000.0).round() as u64,
                }
            })
            .collect();
        let scenario = Scenario { users, channels, restarting: Vec::new() };
        let counters = Arc::new(Counters::default());
        let connect = |index: usize| {
            let user = scenario.users[index].clone();
            let token = parley_e2e::client::mint_token(JWT_SECRET, &user, 3600).expect("token");
            let mut config = ClientConfig::lightweight(urls[index % urls.len()].clone(), token);
            config.alternate_urls = (1..urls.len()).map(|step| urls[(index + step) % urls.len()].clone()).collect();
            config.backoff.base = Duration::from_millis(100);
            config.backoff.cap = Duration::from_secs(2);
            let channels: Vec<String> = scenario.channels_of(index).iter().map(|channel| channel.id.clone()).collect();
            let counters = counters.clone();
            async move {
                let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
                let member = Member::connect(index, &user, config, &channels, counters)
                    .await
                    .unwrap_or_else(|error| panic!("{user} could not connect: {error}"));
                (index, Arc::new(member))
            }
        };
        let mut members = BTreeMap::new();
        let mut creators: Vec<usize> = scenario.channels.iter().map(|channel| channel.members[0]).collect();
        creators.sort_unstable();
        creators.dedup();
        for index in creators {
            let (index, member) = connect(index).await;
            members.insert(index, member);
        }
        for channel in &scenario.channels {
            let creator = &members[&channel.members[0]];
            let others: Vec<String> = channel.members[1..].iter().map(|index| scenario.users[*index].clone()).collect();
            let name = channel.group_name().expect("group channel");
            creator
                .client()
                .create_channel(name, others)
                .await
                .unwrap_or_else(|error| panic!("{} could not be created: {error}", channel.id));
        }
        let rest: Vec<usize> = (0..scenario.users.len()).filter(|index| !members.contains_key(index)).collect();
        let mut connecting = futures_util::stream::iter(rest.into_iter().map(connect)).buffer_unordered(48);
        while let Some((index, member)) = connecting.next().await {
            members.insert(index, member);
        }
        drop(connecting);
        let phase = Arc::new(Phase::default());
        let mut senders = Vec::new();
        for channel in &scenario.channels {
            for sender in &channel.senders {
                let rng = Rng::derive(seed, senders.len() as u64);
                senders.push(tokio::spawn(load::send_loop(
                    members[sender].clone(),
                    channel.id.clone(),
                    channel.rate_millis,
                    rng,
                    phase.clone(),
                    counters.clone(),
                )));
            }
        }
        Chat { scenario, members, counters, phase, senders }
    }

    fn confirmed(&self) -> u64 {
        self.counters.confirmed.load(Ordering::Relaxed)
    }

    fn shown(&self) -> u64 {
        self.counters.shown.load(Ordering::Relaxed)
    }

    /// Waits until `more` sends were confirmed and shown beyond now; how long it took.
    async fn progress(&self, more: u64, within: Duration, what: &str) -> Duration {
        let started = Instant::now();
        let (confirmed, shown) = (self.confirmed(), self.shown());
        let moved =
            load::wait_until(started + within, || self.confirmed() >= confirmed + more && self.shown() >= shown + more)
                .await;
        assert!(moved, "{what}: fewer than {more} sends confirmed and shown within {within:?}");
        started.elapsed()
    }

    /// Stops the load, lets the senders finish their last message, the store and every client catch up, then runs
    /// the history checker.
    async fn finish(self) -> (Report, u64) {
        let Chat { scenario, members, counters, phase, senders } = self;
        phase.load_over.store(true, Ordering::Relaxed);
        let finished = |tasks: &[JoinHandle<()>]| tasks.iter().all(JoinHandle::is_finished);
        if !load::wait_until(Instant::now() + Duration::from_secs(60), || finished(&senders)).await {
            phase.give_up.store(true, Ordering::Relaxed);
            load::wait_until(Instant::now() + Duration::from_secs(30), || finished(&senders)).await;
        }
        let mut heads: HashMap<String, u64> = HashMap::new();
        for member in members.values() {
            for (channel, head) in member.confirmed_heads() {
                let entry = heads.entry(channel).or_default();
                *entry = (*entry).max(head);
            }
        }
        let mut stored = read_stored(&scenario, &members, &heads, Duration::from_secs(60)).await;
        let targets: HashMap<String, u64> = scenario
            .channels
            .iter()
            .map(|channel| {
                let stored_last = stored.get(&channel.id).and_then(|messages| messages.last()).map_or(0, |m| m.seq);
                (channel.id.clone(), stored_last.max(heads.get(&channel.id).copied().unwrap_or(0)))
            })
            .collect();
        let (members_ref, targets_ref) = (&members, &targets);
        let behind = || {
            scenario
                .channels
                .iter()
                .flat_map(|channel| {
                    let target = targets_ref[&channel.id];
                    channel
                        .members
                        .iter()
                        .map(move |index| target.saturating_sub(members_ref[index].position(&channel.id)))
                })
                .sum::<u64>()
        };
        load::wait_for_progress(Instant::now() + Duration::from_secs(60), Duration::from_secs(30), behind).await;
        stored = read_stored(&scenario, &members, &targets, Duration::from_secs(30)).await;
        for member in members.values() {
            member.close().await;
        }
        let input = Input { clients: members.values().map(|member| member.log(true)).collect(), stored };
        (history::check(&input), counters.attempts.load(Ordering::Relaxed))
    }
}

/// The stored history of every channel (through its first member), waiting up to `within` for each to reach
/// `heads[channel]`.
async fn read_stored(
    scenario: &Scenario,
    members: &BTreeMap<usize, Arc<Member>>,
    heads: &HashMap<String, u64>,
    within: Duration,
) -> BTreeMap<String, Vec<Stored>> {
    let deadline = Instant::now() + within;
    let mut stored = BTreeMap::new();
    loop {
        for channel in &scenario.channels {
            let reader = members[&channel.members[0]].client();
            let messages = load::read_stored(&reader, &channel.id).await.unwrap_or_else(|error| panic!("{error}"));
            stored.insert(channel.id.clone(), messages);
        }
        let caught_up = scenario.channels.iter().all(|channel| {
            let last = stored.get(&channel.id).and_then(|messages: &Vec<Stored>| messages.last()).map_or(0, |m| m.seq);
            last >= heads.get(&channel.id).copied().unwrap_or(0)
        });
        if caught_up || Instant::now() > deadline {
            return stored;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Asserts the checker found nothing and every send was confirmed; returns a summary line.
fn assert_clean(test: &RegionTest, report: &Report, attempts: u64, what: &str) -> String {
    let counts = &report.counts;
    let violations: Vec<String> = report.violations.iter().take(40).map(ToString::to_string).collect();
    assert!(
        report.is_clean(),
        "{what}: the history checker found {} violations ({:?}):\n{}\ntimeline:\n{}",
        report.violations.len(),
        report.by_kind(),
        violations.join("\n"),
        test.timeline()
    );
    assert_eq!(counts.unconfirmed, 0, "{what}: every send must end confirmed ({attempts} attempted)");
    assert_eq!(counts.confirmed as u64, attempts, "{what}: confirmations");
    assert_eq!(counts.complete_clients, counts.clients, "{what}: every client ran to the end");
    assert!(counts.messages > 0 && counts.shown >= counts.messages, "{what}: the load ran: {counts:?}");
    format!(
        "{what}: {} messages confirmed and stored in {} channels, {} shown to {} clients, 0 violations",
        counts.confirmed, counts.channels, counts.shown, counts.clients
    )
}

/// The full load: 200 clients in 20 channels of 10, two senders each at 0.5 msg/s (20 msg/s in all).
fn full_load() -> Load {
    Load { users: 200, channels: 20, members_per_channel: 10, senders_per_channel: 2, rate: 0.5 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_and_three_routers_survive_a_router_deletion_and_a_router_scale_down() {
    let Some(engines) = engines() else { return };
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut test = RegionTest::start(&engines, json!({"minReplicas": 3, "maxReplicas": 3}), 3, 3).await;
    let urls = test.gateway_urls().await;
    let chat = Chat::start(&test.tag, &urls, &full_load(), 3).await;
    test.note(&format!("200 clients connected to {} gateways, 20 channels made", urls.len()));
    chat.progress(100, Duration::from_secs(60), "the load before any fault").await;

    let router = format!("{}-router-1", test.region);
    let ids_before = test.router_machine_ids().await;
    test.delete_pod(&router);
    test.wait_ready(3, 3, READY_WITHIN).await;
    test.note("router-1 back and ready");
    chat.progress(40, Duration::from_secs(120), "sends after the router deletion").await;
    // The successor at the same ordinal leases another machine ID: its predecessor's waits out the quarantine.
    let ids_after = test.router_machine_ids().await;
    assert_eq!(ids_before.len(), 3, "{ids_before:?}");
    assert_ne!(ids_after.get(&router), ids_before.get(&router), "router-1's successor reused its machine ID");
    let mut live: Vec<i64> = ids_after.values().copied().collect();
    live.sort_unstable();
    live.dedup();
    assert_eq!(live.len(), ids_after.len(), "two live routers share a machine ID: {ids_after:?}");
    test.note(&format!("machine IDs before {ids_before:?}, after {ids_after:?}"));

    // Scaling the routers within router.maxReplicas (8 by default) changes only the router StatefulSet's replicas:
    // no gateway restarts (each keeps its clients), and neither do the routers that stay.
    let gateways = test.incarnations("gateway").await;
    assert_eq!(gateways.len(), 3, "{gateways:?}");
    assert!(gateways.values().all(|(_, restarts)| *restarts == 0), "a gateway restarted before scaling: {gateways:?}");
    let mut routers = test.incarnations("router").await;
    let down = test.scale("router", "replicas", 2).await;
    test.wait_ready(3, 2, READY_WITHIN).await;
    test.note("router-2 gone");
    routers.remove(&format!("{}-router-2", test.region));
    test.assert_not_restarted("gateway", &gateways, "routers 3→2").await;
    test.assert_not_restarted("router", &routers, "routers 3→2").await;
    chat.progress(40, Duration::from_secs(120), "sends on 2 routers").await;
    test.assert_not_restarted("gateway", &gateways, "after the load").await;
    test.note("no gateway and no surviving router restarted");

    let (checked, attempts) = chat.finish().await;
    test.note("settled; history checked");
    let line = assert_clean(&test, &checked, attempts, "region of 3 gateways and 3 routers");
    report(&format!(
        "{line}; router deleted (its successor leased another machine ID), routers 3→2 with no gateway or surviving \
         router restarted (Region patch to StatefulSet: {:.2} s); {:.0} s",
        down.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    eprintln!("{}", test.timeline());
}

/// A process's environment (`/proc/<pid>/environ`).
fn environ(pid: u32) -> BTreeMap<String, String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    bytes
        .split(|byte| *byte == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            entry.split_once('=').map(|(key, value)| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// The pid of a pod's first container (`containerID` is `parley-pod-runner://<pid>`).
fn pid_of(pod: &Pod) -> Option<u32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status.state.as_ref()?.running.as_ref()?;
    status.container_id.as_deref()?.strip_prefix("parley-pod-runner://")?.parse().ok()
}

/// The first container's status of pod `name`, once `check` holds for it (polls every 250 ms, `within` at most).
async fn eventually_pod(
    pods: &Api<Pod>,
    name: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = Instant::now() + within;
    loop {
        let pod = pods.get_opt(name).await.ok().flatten();
        if let Some(pod) = pod.as_ref().filter(|pod| check(pod)) {
            return pod.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not {what} within {within:?}; last seen: {:?}",
            pod.map(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn container_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.clone())
        .and_then(|mut all| all.pop())
        .unwrap_or_default()
}

fn waiting_reason(pod: &Pod) -> Option<(String, String)> {
    let waiting = container_status(pod).state?.waiting?;
    Some((waiting.reason.unwrap_or_default(), waiting.message.unwrap_or_default()))
}

/// The runner's kubelet behaviour on its own, with `parley` and `parley-router` as images and no engine: the
/// environment and volumes a process gets (read from `/proc/<pid>`), the hosts file it sees, a read-only root,
/// readiness, a liveness failure and a crash restarting the process, the waiting reasons of what cannot start, and
/// a deletion that stops the process and finalizes the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_runs_pods_like_a_kubelet() {
    if engine(Engine::Kubernetes).is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let test = RegionTest::new("1").await;
    let ns = test.namespace.clone();
    let secret = "runner-test-secret-0123456789abcdef";
    test.secret("keys", BTreeMap::from([("hs256".to_owned(), secret.to_owned())])).await;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(test.client.clone(), &ns);
    let settings = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"PARLEY_LISTEN": "0.0.0.0:8080", "PARLEY_ADMIN_LISTEN": "[::]:9090", "SHARED": "from-config"}
    }))
    .expect("config map");
    config_maps.create(&PostParams::default(), &settings).await.expect("create the ConfigMap");
    let gateway = |name: &str, extra: serde_json::Value| {
        let mut container = json!({
            "name": "gateway", "image": "parley/gateway:test",
            "ports": [{"name": "client", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "env": [
                {"name": "PARLEY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
                {"name": "PARLEY_JWT_HS256_SECRET", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "hs256"}}},
                {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": true}}},
                {"name": "GREETING", "value": "$(NOTE) from $(PARLEY_POD_NAME) $$(NOTE)"},
                {"name": "SHARED", "value": "from-env"},
                {"name": "PARLEY_DRAIN_WINDOW_MS", "value": "0"},
                {"name": "PARLEY_DRAIN_DEADLINE_MS", "value": "1000"}
            ],
            "volumeMounts": [
                {"name": "data", "mountPath": "/var/lib/parley"},
                {"name": "keys", "mountPath": "/var/tmp/parley-pod-runner-test/keys", "readOnly": true}
            ],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "client"}, "periodSeconds": 1},
            "securityContext": {"readOnlyRootFilesystem": true}
        });
        if let (Some(container), Some(extra)) = (container.as_object_mut(), extra.as_object()) {
            container.extend(extra.clone());
        }
        serde_json::from_value::<Pod>(json!({
            "metadata": {"name": name, "labels": {"app": name}, "annotations": {"note": "hello"}},
            "spec": {
                "hostname": name, "subdomain": name, "terminationGracePeriodSeconds": 10,
                "containers": [container],
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "keys", "secret": {"secretName": "keys", "items": [{"key": "hs256", "path": "jwt/hs256"}]}}
                ]
            }
        }))
        .expect("pod")
    };
    let plain = |name: &str, container: serde_json::Value| {
        serde_json::from_value::<Pod>(json!({"metadata": {"name": name}, "spec": {"containers": [container]}}))
            .expect("pod")
    };
    let pods: Api<Pod> = Api::namespaced(test.client.clone(), &ns);
    let create = |pod: Pod| {
        let pods = pods.clone();
        async move { pods.create(&PostParams::default(), &pod).await.expect("create a pod") }
    };
    create(gateway("web", json!({}))).await;
    create(gateway("live", json!({"livenessProbe": {"httpGet": {"path": "/no-such-path", "port": "admin"}, "periodSeconds": 1, "failureThreshold": 2}}))).await;
    create(plain("crash", json!({"name": "router", "image": "parley/router:test", "args": ["--no-such-flag"]}))).await;
    create(plain("unknown", json!({"name": "c", "image": "busybox:1"}))).await;
    create(plain(
        "nosecret",
        json!({"name": "c", "image": "parley/router:test",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}),
    ))
    .await;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(test.client.clone(), &ns);
    let service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"name": "client", "port": 8080}]}
    }))
    .expect("service");
    services.create(&PostParams::default(), &service).await.expect("create the Service");

    // Ready, on its own loopback address, answering there.
    let ready = |pod: &Pod| {
        pod.status.as_ref().and_then(|status| status.conditions.as_ref()).is_some_and(|conditions| {
            conditions.iter().any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
    };
    let web = eventually_pod(&pods, "web", Duration::from_secs(60), "ready", ready).await;
    let status = web.status.clone().expect("status");
    let ip = status.pod_ip.clone().expect("podIP");
    assert!(ip.starts_with("127.") && ip != "127.0.0.1", "{ip}");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let web_status = container_status(&web);
    assert!(web_status.ready && web_status.started == Some(true) && web_status.restart_count == 0, "{web_status:?}");
    let node = web.spec.as_ref().and_then(|spec| spec.node_name.clone()).unwrap_or_default();
    assert!(node.starts_with(&format!("{ns}-runner-")), "scheduled to a runner node: {node}");
    let mut stream = tokio::net::TcpStream::connect(format!("{ip}:8080")).await.expect("connect to the pod address");
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /healthz HTTP/1.0\r\n\r\n").await.expect("request");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The process's environment: env over envFrom, fieldRefs, $(VAR), secrets, the rewrite, the image's ENV.
    let pid = pid_of(&web).expect("pid");
    let env = environ(pid);
    let get = |name: &str| env.get(name).map(String::as_str);
    assert_eq!(get("PARLEY_LISTEN"), Some(format!("{ip}:8080").as_str()), "0.0.0.0:PORT is the pod's address");
    assert_eq!(get("PARLEY_ADMIN_LISTEN"), Some(format!("{ip}:9090").as_str()), "[::]:PORT too");
    assert_eq!(get("PARLEY_POD_NAME"), Some("web"));
    assert_eq!(get("GREETING"), Some("hello from web $(NOTE)"));
    assert_eq!(get("SHARED"), Some("from-env"));
    assert_eq!(get("PARLEY_JWT_HS256_SECRET"), Some(secret));
    assert_eq!(get("MAYBE"), None);
    assert_eq!(get("PARLEY_DATA_DIR"), Some("/var/lib/parley"), "the image's ENV");
    assert_eq!(get("HOSTNAME"), Some("web"));
    assert_eq!(get("KUBECONFIG"), None, "nothing of the runner's environment");

    // Its mount namespace: the Secret volume, a read-only root, a writable emptyDir, its own hosts file.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let key = std::fs::read_to_string(root.join("var/tmp/parley-pod-runner-test/keys/jwt/hs256")).expect("secret file");
    assert_eq!(key, secret);
    assert!(std::fs::write(root.join("var/tmp/parley-pod-runner-test-write"), b"x").is_err(), "read-only root");
    std::fs::write(root.join("var/lib/parley/written-from-outside"), b"x").expect("the emptyDir is writable");
    let hosts_path = root.join("etc/hosts");
    let own = format!("{ip} web.web.{ns}.svc.cluster.local web");
    let service_line = format!("{ip} web.{ns}.svc.cluster.local web.{ns}.svc web.{ns} web");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = std::fs::read_to_string(&hosts_path).expect("the pod's /etc/hosts");
        if hosts.lines().any(|line| line == own) && hosts.lines().any(|line| line == service_line) {
            assert!(hosts.contains("localhost"), "{hosts}");
            break;
        }
        assert!(Instant::now() < deadline, "the pod's /etc/hosts lacks {own:?} or {service_line:?}:\n{hosts}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A crash restarts with back-off; a failed liveness probe restarts; what cannot start says why.
    let crash = eventually_pod(&pods, "crash", Duration::from_secs(60), "restarted", |pod| {
        container_status(pod).restart_count >= 1
    })
    .await;
    let last = container_status(&crash).last_state.and_then(|state| state.terminated).expect("lastState");
    assert_eq!(last.exit_code, 2, "clap's exit code for an unknown flag");
    eventually_pod(&pods, "crash", Duration::from_secs(30), "in CrashLoopBackOff", |pod| {
        waiting_reason(pod).is_some_and(|(reason, _)| reason == "CrashLoopBackOff")
    })
    .await;
    eventually_pod(&pods, "live", Duration::from_secs(60), "restarted by its liveness probe", |pod| {
        container_status(pod).restart_count >= 1
    })
    .await;
    let unknown = eventually_pod(&pods, "unknown", Duration::from_secs(30), "waiting", |pod| {
        waiting_reason(pod).is_some_and(|(reason, _)| reason == "ErrImagePull")
    })
    .await;
    assert!(
        waiting_reason(&unknown).is_some_and(|(_, message)| message.contains("image map")),
        "{:?}",
        waiting_reason(&unknown)
    );
    let nosecret = eventually_pod(&pods, "nosecret", Duration::from_secs(30), "waiting", |pod| {
        waiting_reason(pod).is_some_and(|(reason, _)| reason == "CreateContainerConfigError")
    })
    .await;
    assert!(waiting_reason(&nosecret).is_some_and(|(_, message)| message.contains("\"nope\"")));
    assert_eq!(nosecret.status.and_then(|status| status.phase).as_deref(), Some("Pending"));

    // A deletion stops the process (SIGTERM: the gateway drains and exits) and finalizes the pod.
    let deleted = Instant::now();
    kubectl(&["delete", "pod", "web", "-n", &ns, "--wait=true", "--timeout=30s"]).expect("delete the pod");
    let took = deleted.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a gateway that drains in 1 s is gone long before its 10 s grace: {took:?}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}/environ")).exists() || !environ(pid).contains_key("PARLEY_POD_NAME"),
        "the process is gone"
    );
    let log = test.work.join("runner/logs").join(&ns).join("web/gateway.log");
    assert!(std::fs::read_to_string(&log).unwrap_or_default().contains("exited with code 0"), "{}", log.display());
}

/// What a Region's status said during a test, as a poller saw it every 250 ms.
#[derive(Debug, Default)]
struct StatusLog {
    /// Each change of the rollout or scaling: `+<s> <phase> <updated>/<total> ...`.
    lines: Vec<String>,
    /// When the operator asked each pod to drain (`status.rollout.draining.since`), in order.
    drains: Vec<(String, std::time::SystemTime)>,
    /// The resume rates reported after each step.
    resume_rates: Vec<f64>,
    /// The most gateways `status.scaling.desired` asked for, and the fewest after that.
    desired: Vec<i32>,
}

/// Polls the Region's status until the returned handle is aborted, recording each change.
fn watch_status(test: &RegionTest, log: Arc<std::sync::Mutex<StatusLog>>) -> JoinHandle<()> {
    let regions: Api<Region> = Api::namespaced(test.client.clone(), &test.namespace);
    let name = test.region.clone();
    let started = test.started;
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            if let Ok(Some(region)) = regions.get_opt(&name).await {
                let status = region.status.unwrap_or_default();
                let rollout = status.rollout.unwrap_or_default();
                let draining = rollout
                    .draining
                    .as_ref()
                    .map(|pod| format!(" draining {} ({} connections)", pod.pod, pod.connections))
                    .unwrap_or_default();
                let scaling = status
                    .scaling
                    .as_ref()
                    .map(|scaling| {
                        format!(
                            " scaling {}→{} ({} connections)",
                            scaling.current, scaling.desired, scaling.connections
                        )
                    })
                    .unwrap_or_default();
                let line = format!(
                    "{} {}/{} gateways {}{draining}{scaling}",
                    rollout.phase,
                    rollout.updated,
                    rollout.total,
                    status.gateways.unwrap_or_default()
                );
                let mut log = log.lock().expect("status log");
                if let Some(pod) = &rollout.draining {
                    let since = pod.since.parse::<k8s_openapi::jiff::Timestamp>().ok().map(std::time::SystemTime::from);
                    if let Some(since) = since {
                        // The first report of a drain has the operator's decision time, the next ones the
                        // annotation's (a few ms later): one drain per pod and minute.
                        let seen = log.drains.iter().any(|(name, at)| {
                            name == &pod.pod && since.duration_since(*at).unwrap_or_default() < Duration::from_secs(60)
                        });
                        if !seen {
                            log.drains.push((pod.pod.clone(), since));
                        }
                    }
                }
                if let Some(rate) = rollout.last_resume_rate {
                    if log.resume_rates.last() != Some(&rate) {
                        log.resume_rates.push(rate);
                    }
                }
                if let Some(scaling) = &status.scaling {
                    if log.desired.last() != Some(&scaling.desired) {
                        log.desired.push(scaling.desired);
                    }
                }
                if line != last {
                    log.lines.push(format!("+{:>5.1} s {line}", started.elapsed().as_secs_f64()));
                    last = line;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Idle clients in no channel: connections that count for the scaling and reconnect like the others.
async fn ballast(tag: &str, range: std::ops::Range<usize>, urls: &[String]) -> Vec<Arc<Member>> {
    let counters = Arc::new(Counters::default());
    let connect = |index: usize| {
        let user = format!("{tag}-b{index:04}");
        let token = parley_e2e::client::mint_token(JWT_SECRET, &user, 3600).expect("token");
        let mut config = ClientConfig::lightweight(urls[index % urls.len()].clone(), token);
        config.alternate_urls = (1..urls.len()).map(|step| urls[(index + step) % urls.len()].clone()).collect();
        config.backoff.base = Duration::from_millis(100);
        config.backoff.cap = Duration::from_secs(2);
        let counters = counters.clone();
        async move {
            let member = Member::connect(index, &user, config, &[], counters)
                .await
                .unwrap_or_else(|error| panic!("{user} could not connect: {error}"));
            Arc::new(member)
        }
    };
    futures_util::stream::iter(range.map(connect)).buffer_unordered(64).collect().await
}

/// Waits until the Region's gateway StatefulSet has `replicas` ready pods and the rollout is idle.
async fn wait_gateways(test: &RegionTest, replicas: i32, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    let regions: Api<Region> = Api::namespaced(test.client.clone(), &test.namespace);
    loop {
        let (ready, total) = test.ready("gateway").await;
        let idle =
            regions.get_opt(&test.region).await.ok().flatten().and_then(|region| region.status).is_some_and(|status| {
                status.rollout.as_ref().is_some_and(|rollout| rollout.phase == "Idle" && rollout.total == replicas)
            });
        if idle && ready == total && total == usize::try_from(replicas).unwrap_or(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: gateways {ready}/{total} ready (wanted {replicas}), rollout idle: {idle}, after {within:?}\n{}",
            test.diagnose().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The reconnects of `members` that began at or after `from`: (offset from `from`, time away).
fn reconnects_after(members: &[Arc<Member>], from: std::time::SystemTime) -> Vec<(Duration, Duration)> {
    members
        .iter()
        .flat_map(|member| member.reconnects())
        .filter_map(|(at, away)| at.duration_since(from).ok().map(|offset| (offset, away)))
        .collect()
}

/// A histogram of `values` in buckets of `bucket`, one `[from s) count` entry per non-empty bucket.
fn histogram(values: impl Iterator<Item = Duration>, bucket: Duration) -> String {
    let mut counts: BTreeMap<u128, usize> = BTreeMap::new();
    for value in values {
        *counts.entry(value.as_millis() / bucket.as_millis().max(1)).or_default() += 1;
    }
    counts
        .iter()
        .map(|(index, count)| format!("[{:.1} s) {count}", (*index * bucket.as_millis()) as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rolls_and_scales_the_gateways_one_drained_pod_at_a_time() {
    let Some(engines) = engines() else { return };
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut test = RegionTest::new("10").await;
    install_crds(&test.work);
    test.start_operator();
    let window = Duration::from_secs(6);
    // 400 connections per pod is the scaling target; a drain asks every client to move within 6 s.
    test.cluster_gateway = json!({
        "preStopDelaySeconds": 0, "drainWindowMs": window.as_millis() as u64, "drainDeadlineMs": 20000,
        "connectionsPerPodTarget": 400
    });
    // Two routers: a router rolls by handing its partitions to the other, so sends go on meanwhile.
    test.apply(&engines, json!({"replicas": 3, "maxReplicas": 5, "scaleDownCooldownSeconds": 5}), 2).await;
    test.wait_ready(3, 2, READY_WITHIN).await;
    let status_log = Arc::new(std::sync::Mutex::new(StatusLog::default()));
    let watcher = watch_status(&test, status_log.clone());
    let urls = test.gateway_urls().await;
    // 1,000 clients: 600 chatting in 60 channels of 10 (one sender each at 0.3 msg/s, 18 msg/s in all) and 400 idle.
    let shape = Load { users: 600, channels: 60, members_per_channel: 10, senders_per_channel: 1, rate: 0.3 };
    let (chat, mut idle) = tokio::join!(Chat::start(&test.tag, &urls, &shape, 7), ballast(&test.tag, 0..400, &urls));
    test.note(&format!("1,000 clients connected to {} gateways (600 in 60 channels, 400 idle)", urls.len()));
    chat.progress(60, Duration::from_secs(60), "the load before the rollout").await;
    let everyone = |chat: &Chat, idle: &[Arc<Member>]| -> Vec<Arc<Member>> {
        chat.members.values().cloned().chain(idle.iter().cloned()).collect()
    };

    // A new version: the operator drains, replaces and waits for each gateway in turn.
    let gateways_before = test.incarnations("gateway").await;
    let rollout_from = std::time::SystemTime::now();
    let clusters: Api<ChatCluster> = Api::namespaced(test.client.clone(), &test.namespace);
    // A new gateway image (here the same binary from another registry path, `docker.io/parley/gateway`, which the
    // pod runner maps like `parley/gateway`): only the gateways roll. A new `version` would roll the routers too, at
    // the same time; while a router hands its partitions over, calls that need them wait (up to a few seconds), which
    // a short drain window does not absorb.
    let patch = json!({"spec": {"images": {"gateway": "docker.io/parley/gateway"}}});
    clusters.patch(&test.tag, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the gateway image");
    test.note("ChatCluster images.gateway parley/gateway → docker.io/parley/gateway");
    let rollout_started = Instant::now();
    // The pods go one at a time: never more than one gateway missing or not ready.
    let mut fewest_ready = usize::MAX;
    loop {
        let (ready, _) = test.ready("gateway").await;
        fewest_ready = fewest_ready.min(ready);
        let gateways = test.incarnations("gateway").await;
        let replaced =
            gateways_before.iter().all(|(name, (uid, _))| gateways.get(name).is_some_and(|(now, _)| now != uid));
        if replaced && ready == 3 {
            break;
        }
        assert!(
            rollout_started.elapsed() < Duration::from_secs(240),
            "rollout not done in 240 s\n{}",
            test.diagnose().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_gateways(&test, 3, Duration::from_secs(60), "after the rollout").await;
    let rollout_took = rollout_started.elapsed();
    test.note(&format!("every gateway replaced, drained one at a time, in {:.1} s", rollout_took.as_secs_f64()));
    assert!(fewest_ready >= 2, "at most one gateway out at a time; {fewest_ready} were ready at the lowest");
    chat.progress(40, Duration::from_secs(60), "sends after the rollout").await;
    let moved = reconnects_after(&everyone(&chat, &idle), rollout_from);
    let slowest = moved.iter().map(|(_, away)| *away).max().unwrap_or_default();
    assert!(moved.len() >= 900, "the drains moved (almost) every client: {} reconnects", moved.len());
    assert!(
        slowest <= window,
        "every client is back within the drain window ({window:?}); the slowest took {slowest:?}; times away: {}\n\
         status:\n{}\ntimeline:\n{}",
        histogram(moved.iter().map(|(_, away)| *away), Duration::from_secs(1)),
        status_log.lock().expect("log").lines.join("\n"),
        test.timeline()
    );
    let away_all = everyone(&chat, &idle).iter().filter(|member| member.away()).count();
    assert_eq!(away_all, 0, "every client is connected after the rollout");
    // The let-go moments within each pod's drain: spread over the window, not a storm.
    let drains = status_log.lock().expect("log").drains.clone();
    let offsets: Vec<Duration> = drains
        .iter()
        .flat_map(|(_, since)| {
            reconnects_after(&everyone(&chat, &idle), *since)
                .into_iter()
                .map(|(offset, _)| offset)
                .filter(|offset| *offset < window + Duration::from_secs(5))
                .collect::<Vec<_>>()
        })
        .collect();
    let spread = histogram(offsets.iter().copied(), Duration::from_secs(1));
    let back = histogram(moved.iter().map(|(_, away)| *away), Duration::from_millis(250));
    let rates = status_log.lock().expect("log").resume_rates.clone();
    assert!(!rates.is_empty() && rates.iter().all(|rate| *rate >= 0.999), "every resume succeeded: rates {rates:?}");
    test.note(&format!("drains: {drains:?}; resume rates after each step: {rates:?}"));

    // Scaling by connections: the Region becomes a range of 2-5 pods aiming at 400 connections each. Scaling starts
    // and stops only the pods concerned: the two gateways that stay and the routers run on untouched.
    let mut staying = test.incarnations("gateway").await;
    staying.remove(&format!("{}-gateway-2", test.region));
    let routers = test.incarnations("router").await;
    let regions: Api<Region> = Api::namespaced(test.client.clone(), &test.namespace);
    let patch = json!({"spec": {"gateway": {"replicas": null, "minReplicas": 2}}});
    regions.patch(&test.region, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the range");
    test.note("Region gateways: a range of 2-5 (1,000 connections: 3 pods)");
    let urls = test.gateway_urls().await;
    idle.extend(ballast(&test.tag, 400..1300, &urls).await);
    test.note("900 more idle clients: 1,900 connections");
    wait_gateways(&test, 5, Duration::from_secs(120), "scaling up by connections").await;
    test.note("5 gateways ready");
    chat.progress(30, Duration::from_secs(60), "sends on 5 gateways").await;
    let down_from = std::time::SystemTime::now();
    futures_util::future::join_all(idle.iter().map(|member| member.close())).await;
    test.note("the 1,300 idle clients left: 600 connections");
    wait_gateways(&test, 2, Duration::from_secs(180), "scaling down by connections").await;
    test.note("2 gateways left, each removal drained first");
    test.assert_not_restarted("gateway", &staying, "gateways 3→5→2").await;
    test.assert_not_restarted("router", &routers, "gateways 3→5→2").await;
    chat.progress(30, Duration::from_secs(60), "sends on 2 gateways").await;
    let chatting: Vec<Arc<Member>> = chat.members.values().cloned().collect();
    let moved_down = reconnects_after(&chatting, down_from);
    let slowest_down = moved_down.iter().map(|(_, away)| *away).max().unwrap_or_default();
    assert!(slowest_down <= window, "scale-down: every client back within the window; slowest {slowest_down:?}");
    assert_eq!(chatting.iter().filter(|member| member.away()).count(), 0, "every chat client is connected");
    watcher.abort();
    let desired = status_log.lock().expect("log").desired.clone();
    assert!(desired.contains(&5) && desired.last() == Some(&2), "scaling went 3 → 5 → 2: {desired:?}");

    let (checked, attempts) = chat.finish().await;
    test.note("settled; history checked");
    let line = assert_clean(&test, &checked, attempts, "gateway rollout and scaling");
    let status_lines = status_log.lock().expect("log").lines.join("\n");
    report(&format!(
        "{line}; rollout of 3 gateways under 1,000 clients in {:.1} s, one pod at a time, {} reconnects, every \
         client back within the {window:?} window (slowest {slowest:?}), resumes {rates:?}; reconnect-time \
         histogram: {back}; let-go moments after each drain began (1 s buckets): {spread}; scaling by connections \
         {desired:?} with each removal drained ({} reconnects, slowest {slowest_down:?}); {:.0} s",
        rollout_took.as_secs_f64(),
        moved.len(),
        moved_down.len(),
        started.elapsed().as_secs_f64()
    ));
    eprintln!("{}\nRegion status as it went:\n{status_lines}", test.timeline());
}
