//! Two Regions of one ChatCluster, run for real on Kubernetes: a real control plane (`e2e/k8s/up.sh`), both regions'
//! engines of the stack (`e2e/stack/up.sh --region2`: Kafka A and B, Redis A and B, Cassandra dc1 and dc2), the
//! `parley-operator` binary as a local process and `parley-pod-runner` playing kubelet for three nodes of its own (as
//! in `tests/region.rs`). The operator builds everything from a ChatCluster and two Regions, `eu` and `us`, each
//! replicating `messages` and `memberships` to the other: per Region a gateway, a router and a MirrorMaker 2
//! Deployment (`<region>-mirrormaker`, Apache Kafka's image running `connect-mirror-maker.sh` on the `mm2.properties`
//! of the ConfigMap the operator generated), which the runner runs through the stack's `bin/mm2-run`
//! (`PARLEY_MM2_RUN`). It also sets the keyspace's datacenter map by CQL.
//!
//! `two_regions_chat_through_the_operators_mirror_makers` checks, in order:
//!
//! 1. both Regions Ready, each with its MirrorMaker 2 pod running the MirrorMaker JVM (read from `/proc/<pid>`);
//! 2. the keyspace's replication, read with the stack's `PARLEY_CQL`, names `dc1` and `dc2` with factor 1;
//!    `CassandraRebuildRequired` is True (with its `nodetool rebuild` command) on the Region whose datacenter the
//!    operator added second, and only there; the annotation `parley.dev/cassandra-rebuilt` turns it False;
//! 3. users homed in each region (connected to their region's gateway pod at the address the runner gave it) chat in
//!    a group channel created in eu and in a DM opened from us, senders in both regions: every member is shown one
//!    identical, gap-free order, equal to the stored history, and the history read through either region is the same;
//! 4. deleting Region `us` is refused while the keyspace replicates to dc2 (the `DeletionBlocked` condition and a
//!    Warning Event; the Region stays), and once `parley.dev/cassandra-release-datacenter: "dc2"` is set the Region
//!    goes and the keyspace's map loses dc2.
//!
//! It prints one figures line (messages, time to Ready, MirrorMaker 2's time to the first mirrored record).
//!
//! Needs `KUBECONFIG` (and `kubectl` on PATH), `PARLEY_REDIS_URL`, `PARLEY_KAFKA_BOOTSTRAP`,
//! `PARLEY_CASSANDRA_CONTACT`, and the second region's `PARLEY_KAFKA_B_BOOTSTRAP`, `PARLEY_REDIS_B_URL`,
//! `PARLEY_CASSANDRA_CONTACT_DC2`, `PARLEY_MM2_RUN` and `PARLEY_CQL`, with the stack's TLS and credential variables
//! (which the ChatCluster uses through Secrets, as in `tests/region.rs`); and the `parley`, `parley-router` and
//! `parley-operator` binaries. Without the engines a plain `cargo test` skips it and `PARLEY_REQUIRE_ENGINES=1`
//! fails it. Logs of a failed run stay in the work dir its message names (runner, operator, and every container
//! under `runner/logs/<namespace>/<pod>/`); `PARLEY_REGION_KEEP=1` keeps them after a pass too.

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client as KubeClient, ResourceExt};
use parley_client::{Client, ClientConfig, ClientError, ErrorCode};
use parley_crds::{ChatCluster, Region};
use parley_e2e::observe::{check_one_order, record, stored_at_least, wait_received, Seen};
use parley_test_support::{binary, engine, report, Engine};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The HS256 secret of the clients' tokens (the ChatCluster's `auth.jwtKeySecret`).
const JWT_SECRET: &str = "regions-k8s-e2e-hs256-secret-0123456789";
/// The gateways' client port (the ChatCluster's default `gateway.port`).
const CLIENT_PORT: u16 = 8080;
/// The label the operator puts on pods with their component.
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The label the operator puts on a Region's objects with the Region's name.
const REGION_LABEL: &str = "parley.dev/region";
/// The runner's node label and taint key; the value is the test's namespace.
const RUNNER_KEY: &str = "parley.dev/pod-runner";
/// The annotation that acknowledges a datacenter's `nodetool rebuild`.
const REBUILT_ANNOTATION: &str = "parley.dev/cassandra-rebuilt";
/// The annotation that lets a Region whose datacenter the keyspace replicates to be deleted.
const RELEASE_ANNOTATION: &str = "parley.dev/cassandra-release-datacenter";
/// How long the pods may take to become ready (the routers create their topics and tables first).
const READY_WITHIN: Duration = Duration::from_secs(150);
/// Messages each sender sends.
const PER_SENDER: usize = 25;
/// The two regions: (`regionName`, Cassandra datacenter).
const REGIONS: [(&str, &str); 2] = [("eu", "dc1"), ("us", "dc2")];

/// Each run starts two regions on the shared engines: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both regions' engines, from the environment (`stack.env`), index 0 for eu and 1 for us.
#[derive(Debug, Clone)]
struct Engines {
    redis: [String; 2],
    kafka: [String; 2],
    cassandra: [String; 2],
    mm2_run: String,
    cql: PathBuf,
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// A variable that the second region's engines come with: a stack with Kafka B lacking it is broken.
fn second_region(name: &str) -> String {
    variable(name).unwrap_or_else(|| {
        panic!("the second region's engines are up (PARLEY_KAFKA_B_BOOTSTRAP) but {name} is not set: start the stack with e2e/stack/up.sh --region2")
    })
}

/// The engines when every variable is set; `None` (after a SKIPPED line) when the test is skipped.
fn engines() -> Option<Engines> {
    engine(Engine::Kubernetes)?;
    let redis = engine(Engine::Redis)?;
    let kafka = engine(Engine::Kafka)?;
    let cassandra = engine(Engine::Cassandra)?;
    let kafka_b = engine(Engine::SecondRegion)?;
    Some(Engines {
        redis: [redis, second_region("PARLEY_REDIS_B_URL")],
        kafka: [kafka, kafka_b],
        cassandra: [cassandra, second_region("PARLEY_CASSANDRA_CONTACT_DC2")],
        mm2_run: second_region("PARLEY_MM2_RUN"),
        cql: second_region("PARLEY_CQL").into(),
    })
}

/// A short lowercase tag, unique per run: users, channels, the namespace, the topic prefix and the keyspace carry it.
fn tag() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut state = (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32);
    // A letter first: Region names (made from it) must be DNS-1035 labels.
    (0..6u64)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[((state >> 33) % if i == 0 { 26 } else { 36 }) as usize])
        })
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

/// The keyspace's replication as the stack's CQL tool prints it (`{'class': '...', 'dc1': '1'}`): datacenter →
/// factor, or `None` when the keyspace does not exist.
fn replication(engines: &Engines, keyspace: &str) -> Result<Option<BTreeMap<String, String>>, String> {
    let (host, port) = engines.cassandra[0].rsplit_once(':').ok_or("PARLEY_CASSANDRA_CONTACT is not host:port")?;
    let output = Command::new(&engines.cql)
        .args(["-h", host, "-p", port])
        .arg(format!("SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = '{keyspace}'"))
        .output()
        .map_err(|error| format!("cannot run {}: {error}", engines.cql.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed: {}", engines.cql.display(), String::from_utf8_lossy(&output.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(line) = text.lines().map(str::trim).find(|line| line.starts_with('{')) else { return Ok(None) };
    let mut map = BTreeMap::new();
    for entry in line.trim_matches(|c| c == '{' || c == '}').split(", ") {
        let (key, value) = entry.split_once(": ").ok_or_else(|| format!("unexpected replication {line:?}"))?;
        let (key, value) = (key.trim_matches('\''), value.trim_matches('\''));
        if key != "class" {
            map.insert(key.to_owned(), value.to_owned());
        }
    }
    Ok(Some(map))
}

/// A Region's condition of a type.
fn condition(region: &Region, type_: &str) -> Option<Condition> {
    region.status.as_ref()?.conditions.iter().find(|condition| condition.type_ == type_).cloned()
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|status| {
            status.pod_ip.as_deref().is_some_and(|ip| ip.starts_with("127."))
                && status
                    .conditions
                    .as_ref()
                    .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
}

/// The pid of a pod's first container while it runs (`containerID` is `parley-pod-runner://<pid>`).
fn pid_of(pod: &Pod) -> Option<u32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status.state.as_ref()?.running.as_ref()?;
    status.container_id.as_deref()?.strip_prefix("parley-pod-runner://")?.parse().ok()
}

/// The namespace, the runner, the operator, and what happened when.
struct World {
    client: KubeClient,
    namespace: String,
    tag: String,
    work: PathBuf,
    runner: Option<Child>,
    operator: Option<Child>,
    started: Instant,
    timeline: Vec<String>,
}

impl World {
    /// A namespace pinned to a new runner's three nodes, the CRDs and the operator.
    async fn new(engines: &Engines) -> World {
        let tag = tag();
        let namespace = format!("regions-{tag}");
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("regions-{tag}"));
        std::fs::create_dir_all(&work).expect("work dir");
        let client = KubeClient::try_default().await.expect("kube client from KUBECONFIG");
        let mut world = World {
            client,
            namespace,
            tag,
            work,
            runner: None,
            operator: None,
            started: Instant::now(),
            timeline: Vec::new(),
        };
        world.create_namespace().await;
        world.start_runner(&engines.mm2_run);
        install_crds(&world.work);
        world.start_operator();
        world
    }

    /// Name of the Region object of `region` (a `regionName`).
    fn region(&self, region: &str) -> String {
        format!("{}-{region}", self.tag)
    }

    fn keyspace(&self) -> String {
        format!("rk_{}", self.tag)
    }

    fn note(&mut self, what: &str) {
        let line = format!("+{:>5.1} s {what}", self.started.elapsed().as_secs_f64());
        eprintln!("[regions {}] {line}", self.tag);
        self.timeline.push(line);
    }

    fn timeline(&self) -> String {
        self.timeline.join("\n")
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
            "the API server did not add the namespace's node selector: restart the control plane with \
             e2e/k8s/up.sh (it enables PodNodeSelector and PodTolerationRestriction)"
        );
    }

    /// The runner, with the stack's MirrorMaker 2 launcher for the `apache/kafka` pods.
    fn start_runner(&mut self, mm2_run: &str) {
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
            .args(["--restart-backoff", "5", "--mm2-launcher", mm2_run])
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
            .args(["--identity", "regions-e2e", "--lease-duration-seconds", "6", "--lease-grace-seconds", "2"])
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

    /// Secrets, the ChatCluster (Cassandra reached through both datacenters' nodes) and both Regions, each
    /// replicating `messages` and `memberships` to the other.
    async fn apply(&mut self, engines: &Engines) {
        self.secret("jwt", BTreeMap::from([("hs256".to_owned(), JWT_SECRET.to_owned())])).await;
        let mut kafka = json!({"bootstrapServers": engines.kafka[0], "topicPrefix": format!("rk-{}", self.tag)});
        let mut cassandra = json!({"contactPoints": engines.cassandra, "keyspace": self.keyspace()});
        let mut redis = json!({"url": engines.redis[0]});
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
                "gateway": {"preStopDelaySeconds": 1, "drainWindowMs": 2000, "drainDeadlineMs": 5000},
                // New topics are found within 5 s (the routers create theirs when they start).
                "mirrorMaker": {"refreshTopicsIntervalSeconds": 5}
            }
        }))
        .expect("ChatCluster");
        let clusters: Api<ChatCluster> = Api::namespaced(self.client.clone(), &self.namespace);
        clusters.create(&PostParams::default(), &cluster).await.expect("create the ChatCluster");
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        for (index, (name, datacenter)) in REGIONS.iter().enumerate() {
            let other = REGIONS[1 - index].0;
            let small = json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}});
            let region: Region = serde_json::from_value(json!({
                "apiVersion": "parley.dev/v1alpha1",
                "kind": "Region",
                "metadata": {"name": self.region(name)},
                "spec": {
                    "clusterRef": self.tag,
                    "regionName": name,
                    "kafka": {"bootstrapServers": engines.kafka[index], "replicationFactor": 1},
                    "redis": {"url": engines.redis[index]},
                    "cassandra": {"datacenter": datacenter, "replicationFactor": 1},
                    "gateway": {"replicas": 1, "resources": small},
                    "router": {"replicas": 1, "resources": small},
                    "replication": [{"topics": ["messages", "memberships"], "toRegions": [other]}]
                }
            }))
            .expect("Region");
            regions.create(&PostParams::default(), &region).await.expect("create the Region");
        }
        let security = if secured.is_empty() { "plaintext engines".to_owned() } else { secured.join(", ") };
        self.note(&format!("ChatCluster and Regions eu and us applied ({security})"));
    }

    /// The pods of a component of a Region (by its `regionName`), sorted by name.
    async fn pods(&self, region: &str, component: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default()
            .labels(&format!("{COMPONENT_LABEL}={component},{REGION_LABEL}={}", self.region(region)));
        let mut list = pods.list(&params).await.map(|list| list.items).unwrap_or_default();
        list.sort_by_key(|pod| pod.name_any());
        list
    }

    async fn get_region(&self, region: &str) -> Option<Region> {
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        regions.get_opt(&self.region(region)).await.ok().flatten()
    }

    /// What is missing before both Regions count as up: Ready at their generation, one ready gateway and router
    /// each, and a running MirrorMaker 2 pod each (`None` when nothing is).
    async fn missing(&self) -> Option<String> {
        let mut missing = Vec::new();
        for (region, _) in REGIONS {
            let ready = self.get_region(region).await.is_some_and(|object| {
                object.status.as_ref().is_some_and(|status| status.observed_generation == object.metadata.generation)
                    && condition(&object, "Ready").is_some_and(|ready| ready.status == "True")
            });
            if !ready {
                missing.push(format!("Region {region} Ready"));
            }
            for component in ["gateway", "router", "mirrormaker"] {
                let pods = self.pods(region, component).await;
                let running = pods.iter().filter(|pod| is_ready(pod) && pid_of(pod).is_some()).count();
                if running != 1 || pods.len() != 1 {
                    missing.push(format!("{region} {component} ({running} of {} pods running)", pods.len()));
                }
            }
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    /// Waits until both Regions are up (see [`World::missing`]).
    async fn wait_up(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Some(missing) = self.missing().await {
            if Instant::now() > deadline {
                panic!("after {within:?} still waiting for: {missing}\n{}", self.diagnose().await);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Polls a Region until `check` holds for it (`None`: the Region is gone); panics after `within`.
    async fn wait_region(&self, region: &str, within: Duration, what: &str, check: impl Fn(Option<&Region>) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let object = self.get_region(region).await;
            if check(object.as_ref()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Region {region}: not {what} within {within:?}; status: {:?}\n{}",
                object.and_then(|object| object.status),
                self.diagnose().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Merges `annotations` into a Region's metadata.
    async fn annotate(&mut self, region: &str, key: &str, value: &str) {
        let regions: Api<Region> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = json!({"metadata": {"annotations": {key: value}}});
        regions
            .patch(&self.region(region), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|error| panic!("annotate Region {region} with {key}: {error}"));
        self.note(&format!("Region {region} annotated {key}: {value:?}"));
    }

    /// The gateway of a region as its clients reach it: the pod's loopback address from the runner.
    async fn gateway_url(&self, region: &str) -> String {
        let pods = self.pods(region, "gateway").await;
        let ip = pods.first().and_then(|pod| pod.status.as_ref()?.pod_ip.clone()).expect("the gateway pod's podIP");
        format!("ws://{ip}:{CLIENT_PORT}")
    }

    /// The reasons of the Warning Events about a Region (events.k8s.io, as the operator records them).
    async fn warnings(&self, region: &str) -> Vec<(String, String)> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = self.region(region);
        events
            .list(&ListParams::default())
            .await
            .map(|list| list.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|event| event.type_.as_deref() == Some("Warning"))
            .filter(|event| event.regarding.as_ref().and_then(|object| object.name.as_deref()) == Some(name.as_str()))
            .map(|event| (event.reason.unwrap_or_default(), event.note.unwrap_or_default()))
            .collect()
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
}

impl Drop for World {
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
            eprintln!("[regions {}] timeline:\n{}\nlogs kept in {}", self.tag, self.timeline(), self.work.display());
        } else if variable("PARLEY_REGION_KEEP").is_some() {
            eprintln!("[regions {}] logs kept in {} (PARLEY_REGION_KEEP)", self.tag, self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Waits until `seen` was told it is a member of `channel` (a membership change that crossed the regions through
/// MirrorMaker 2); when it was (within the 50 ms of a poll).
async fn wait_member(world: &World, seen: &Arc<Mutex<Seen>>, user: &str, channel: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if seen.lock().expect("seen").channels.iter().any(|known| known == channel) {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{user}, of the other region, never learned it is a member of {channel}: the membership change did not cross \
         the regions\n{}",
        world.diagnose().await
    );
}

/// Sends `count` messages from `client` to `channel`, paced; returns their sequences and how many sends were
/// refused first. A send the server refuses as `unavailable` or `rate_limited` (nothing written) is sent again with
/// the same key (the server deduplicates by it) for up to 60 s, as an application would.
fn stream(client: Client, name: String, channel: String, count: usize) -> tokio::task::JoinHandle<(Vec<u64>, u64)> {
    tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(count);
        let mut refused = 0;
        for n in 0..count {
            let key = format!("{name}-{n}");
            let deadline = Instant::now() + Duration::from_secs(60);
            let receipt = loop {
                match client.send_with_id(channel.clone(), key.clone(), format!("{name} says {n}")).await {
                    Ok(receipt) => break receipt,
                    Err(ClientError::Server { code: ErrorCode::Unavailable | ErrorCode::RateLimited, .. })
                    | Err(ClientError::Timeout { .. })
                        if Instant::now() < deadline =>
                    {
                        refused += 1;
                        // The retry interval of a refused send.
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(error) => panic!("{name} send {n} to {channel} failed: {error}"),
                }
            };
            seqs.push(receipt.seq);
            // Pacing: the regions' senders interleave.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (seqs, refused)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_chat_through_the_operators_mirror_makers() {
    let Some(engines) = engines() else { return };
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut world = World::new(&engines).await;
    let keyspace = world.keyspace();

    // 1. Both Regions up: gateways, routers and MirrorMaker 2 pods running through the runner.
    world.apply(&engines).await;
    let applied = Instant::now();
    world.wait_up(READY_WITHIN).await;
    let to_ready = applied.elapsed();
    world.note(&format!("both Regions Ready, gateway, router and MirrorMaker 2 pods running ({to_ready:.1?})"));
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(world.client.clone(), &world.namespace);
    for (index, (region, _)) in REGIONS.iter().enumerate() {
        let other = REGIONS[1 - index].0;
        let pods = world.pods(region, "mirrormaker").await;
        let pid = pid_of(&pods[0]).expect("the MirrorMaker 2 pod's pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains("org.apache.kafka.connect.mirror.MirrorMaker")
                && cmdline.contains(&format!("--clusters {region}")),
            "{region}'s MirrorMaker 2 pod runs the MirrorMaker JVM for its region: {cmdline}"
        );
        let name = format!("{}-mirrormaker-config", world.region(region));
        let config = config_maps.get(&name).await.unwrap_or_else(|error| panic!("ConfigMap {name}: {error}"));
        let properties = config.data.and_then(|mut data| data.remove("mm2.properties")).unwrap_or_default();
        let topics = format!(
            "{other}->{region}.topics=^rk-{}-beacons$,^rk-{}-memberships$,^rk-{}-messages$",
            world.tag, world.tag, world.tag
        );
        assert!(
            properties.contains(&topics),
            "{name} mirrors exactly {other}'s two topics and its beacons:\n{properties}"
        );
        let status = world.get_region(region).await.and_then(|object| object.status).expect("status");
        assert_eq!(status.mirrored_regions, vec![other.to_owned()], "{region} mirrors {other}");
        assert_eq!(status.mirror_maker.as_deref(), Some("1/1"), "{region}'s MirrorMaker 2 in its status");
    }

    // 2. The keyspace spans both datacenters, as the operator set it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let map = loop {
        let map = replication(&engines, &keyspace).unwrap_or_else(|error| panic!("read {keyspace}: {error}"));
        if map.as_ref().is_some_and(|map| map.len() == 2) || Instant::now() > deadline {
            break map;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let both = BTreeMap::from([("dc1".to_owned(), "1".to_owned()), ("dc2".to_owned(), "1".to_owned())]);
    assert_eq!(map.as_ref(), Some(&both), "keyspace {keyspace}'s replication (read by CQL)");
    world.note(&format!("keyspace {keyspace} replicates to {both:?}"));
    let mut second = None;
    for (index, (region, datacenter)) in REGIONS.iter().enumerate() {
        let object = world.get_region(region).await.expect("Region");
        let replicated = condition(&object, "CassandraReplication").expect("CassandraReplication");
        assert_eq!(replicated.status, "True", "{region}: {replicated:?}");
        if let Some(rebuild) = condition(&object, "CassandraRebuildRequired").filter(|c| c.status == "True") {
            let source = REGIONS[1 - index].1;
            let command = format!("nodetool rebuild -ks {keyspace} -- {source}");
            assert!(rebuild.message.contains(&command), "{region}'s rebuild condition names `{command}`: {rebuild:?}");
            assert!(second.replace((*region, *datacenter)).is_none(), "only one datacenter was added second");
        }
    }
    let (rebuilt, datacenter) = second.expect("CassandraRebuildRequired True on the Region added second");
    world.note(&format!("CassandraRebuildRequired on {rebuilt} ({datacenter} added second)"));
    world.annotate(rebuilt, REBUILT_ANNOTATION, datacenter).await;
    world
        .wait_region(rebuilt, Duration::from_secs(60), "rebuild acknowledged", |object| {
            object
                .and_then(|object| condition(object, "CassandraRebuildRequired"))
                .is_some_and(|condition| condition.status == "False" && condition.reason == "RebuildAcknowledged")
        })
        .await;
    world.note("CassandraRebuildRequired False");

    // Meanwhile: each Region's status comes to show its incoming flow, with the delivery latency its routers
    // observed and MirrorMaker 2's lag measured by the other region's beacons (routers report every 10 s; the
    // operator refreshes every 30 s).
    let flows = {
        let regions: Api<Region> = Api::namespaced(world.client.clone(), &world.namespace);
        let names = [("eu", "us", world.region("eu")), ("us", "eu", world.region("us"))];
        tokio::spawn(async move {
            let mut found = Vec::new();
            for (region, other, name) in names {
                let flow = parley_test_support::eventually(
                    &format!("{region}'s status to show MirrorMaker 2's lag from {other}"),
                    Duration::from_secs(90),
                    || async {
                        let status = regions.get_opt(&name).await.ok().flatten()?.status?;
                        status
                            .incoming_flows
                            .into_iter()
                            .find(|flow| flow.region == other && flow.mirror_lag_ms.is_some())
                    },
                )
                .await;
                found.push((region, other, flow));
            }
            found
        })
    };

    // 3. Users of both regions chat in a group homed in eu and a DM homed in us.
    let urls = [world.gateway_url("eu").await, world.gateway_url("us").await];
    let users = [("alice", 0), ("carol", 0), ("bob", 1), ("dave", 1)];
    let mut clients = HashMap::new();
    for (user, region) in users {
        let name = format!("{}-{user}", world.tag);
        let token = parley_test_support::hs256_token(JWT_SECRET, &name, Duration::from_secs(3600));
        let mut config = ClientConfig::new(urls[region].clone(), token);
        config.backoff.base = Duration::from_millis(100);
        config.backoff.cap = Duration::from_secs(1);
        let (client, events) = Client::connect(config)
            .await
            .unwrap_or_else(|error| panic!("{user} cannot connect to {}: {error}", urls[region]));
        clients.insert(user, (client, record(events), name));
    }
    world.note(&format!("alice, carol connected to eu ({}), bob, dave to us ({})", urls[0], urls[1]));
    let created = Instant::now();
    let members: Vec<String> = ["carol", "bob", "dave"].iter().map(|user| clients[user].2.clone()).collect();
    let group = clients["alice"]
        .0
        .create_channel(format!("{}-world", world.tag), members)
        .await
        .unwrap_or_else(|error| panic!("alice creates the group in eu: {error}"))
        .id;
    let mut learned = Vec::new();
    for user in ["bob", "dave"] {
        learned.push(wait_member(&world, &clients[user].1, user, &group).await);
    }
    let first_mirrored = learned.iter().min().map_or(Duration::ZERO, |at| at.duration_since(created));
    world.note(&format!("{group} created in eu; us learned its members {first_mirrored:.1?} later"));
    let opened = Instant::now();
    let dm = clients["bob"]
        .0
        .open_dm(clients["carol"].2.clone())
        .await
        .unwrap_or_else(|error| panic!("bob opens a DM with carol in us: {error}"))
        .id;
    let dm_crossed = wait_member(&world, &clients["carol"].1, "carol", &dm).await.duration_since(opened);
    world.note(&format!("DM {dm} opened in us; eu learned it {dm_crossed:.1?} later"));

    let sending = Instant::now();
    let mut streams = Vec::new();
    for (user, _) in users {
        streams.push(stream(clients[user].0.clone(), user.to_owned(), group.clone(), PER_SENDER));
    }
    streams.push(stream(clients["bob"].0.clone(), "bob-dm".into(), dm.clone(), PER_SENDER));
    streams.push(stream(clients["carol"].0.clone(), "carol-dm".into(), dm.clone(), PER_SENDER));
    let (mut confirmed, mut refused) = (0, 0);
    for handle in streams {
        let (seqs, again) =
            tokio::time::timeout(Duration::from_secs(150), handle).await.expect("senders done").expect("sender");
        confirmed += seqs.len();
        refused += again;
    }
    let sent_in = sending.elapsed();
    world.note(&format!("{confirmed} sends confirmed in {sent_in:.1?} ({refused} refused first and sent again)"));
    let group_seen: Vec<(&str, &Arc<Mutex<Seen>>)> = users.iter().map(|(user, _)| (*user, &clients[user].1)).collect();
    let dm_seen = [("bob", &clients["bob"].1), ("carol", &clients["carol"].1)];
    let all: Vec<&Arc<Mutex<Seen>>> = group_seen.iter().map(|(_, seen)| *seen).collect();
    wait_received(&all, &group, 4 * PER_SENDER, Duration::from_secs(60)).await;
    wait_received(&[&clients["bob"].1, &clients["carol"].1], &dm, 2 * PER_SENDER, Duration::from_secs(60)).await;
    let group_history = stored_at_least(&clients["alice"].0, &group, 4 * PER_SENDER).await;
    assert_eq!(
        stored_at_least(&clients["dave"].0, &group, 4 * PER_SENDER).await,
        group_history,
        "the group's history through us equals that through eu"
    );
    let dm_history = stored_at_least(&clients["carol"].0, &dm, 2 * PER_SENDER).await;
    assert_eq!(
        stored_at_least(&clients["bob"].0, &dm, 2 * PER_SENDER).await,
        dm_history,
        "the DM's history through eu equals that through us"
    );
    assert_eq!(group_history.len(), 4 * PER_SENDER, "every confirmed group message is stored once");
    assert_eq!(dm_history.len(), 2 * PER_SENDER, "every confirmed DM message is stored once");
    check_one_order(&group, &group_seen, &group_history);
    check_one_order(&dm, &dm_seen, &dm_history);
    let shown = 4 * group_history.len() + 2 * dm_history.len();
    world.note(&format!("{shown} messages shown, one order per channel on every member, history equal in both"));
    for (client, _, _) in clients.values() {
        client.close().await;
    }

    // Each Region's status shows its incoming flow (its watch ran while the users chatted).
    let flows = tokio::time::timeout(Duration::from_secs(90), flows).await.expect("flows in time").expect("flows");
    for (region, other, flow) in flows {
        let lag = flow.mirror_lag_ms.unwrap_or_default();
        world.note(&format!(
            "{region}'s status: from {other}, delivery latency {} ms, MirrorMaker 2 lag {lag} ms, {} messages \
             in the last window",
            flow.delivery_latency_ms, flow.messages
        ));
        assert!(lag < 10_000, "{region}: MirrorMaker 2 from {other} keeps up (lag {lag} ms)");
    }

    // 4. Deleting us waits while the keyspace replicates to dc2; released, it goes and dc2 leaves the map.
    let regions: Api<Region> = Api::namespaced(world.client.clone(), &world.namespace);
    regions.delete(&world.region("us"), &DeleteParams::default()).await.expect("delete Region us");
    world.note("Region us deleted");
    world
        .wait_region("us", Duration::from_secs(60), "blocked from deletion", |object| {
            object.is_some_and(|object| {
                object.metadata.deletion_timestamp.is_some()
                    && condition(object, "DeletionBlocked").is_some_and(|condition| {
                        condition.status == "True"
                            && condition.reason == "CassandraDatacenterInUse"
                            && condition.message.contains(RELEASE_ANNOTATION)
                    })
            })
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !world.warnings("us").await.iter().any(|(reason, _)| reason == "CassandraDatacenterInUse") {
        assert!(
            Instant::now() < deadline,
            "no Warning Event CassandraDatacenterInUse about us: {:?}",
            world.warnings("us").await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Blocked, not slow: a few seconds later it is still there and dc2 is still in the map.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(world.get_region("us").await.is_some(), "Region us stays while dc2 holds replicas");
    assert_eq!(replication(&engines, &keyspace).expect("read the keyspace").as_ref(), Some(&both));
    world.note("deletion of us blocked (DeletionBlocked, Warning Event), keyspace unchanged");
    world.annotate("us", RELEASE_ANNOTATION, "dc2").await;
    let released = Instant::now();
    world.wait_region("us", Duration::from_secs(60), "gone", |object| object.is_none()).await;
    let gone_in = released.elapsed();
    let only_dc1 = BTreeMap::from([("dc1".to_owned(), "1".to_owned())]);
    assert_eq!(
        replication(&engines, &keyspace).expect("read the keyspace").as_ref(),
        Some(&only_dc1),
        "dc2 left keyspace {keyspace}'s replication"
    );
    world.note(&format!("Region us gone {gone_in:.1?} after the release; keyspace replicates to dc1 only"));

    report(&format!(
        "two Regions on Kubernetes (operator + pod runner, MirrorMaker 2 pods from the operator's ConfigMaps): \
         {confirmed} sends confirmed in {:.1} s ({refused} refused first and sent again), {shown} messages shown in one order per channel, history equal \
         through both regions; Regions Ready with MirrorMaker 2 running {:.1} s after apply; first mirrored record \
         (group membership eu->us) {:.1} s after the group's creation, DM membership us->eu {:.1} s; keyspace \
         {{dc1, dc2}} set by the operator, rebuild acknowledged on {rebuilt}, us deletion blocked then released in \
         {:.1} s; {:.0} s in all",
        sent_in.as_secs_f64(),
        to_ready.as_secs_f64(),
        first_mirrored.as_secs_f64(),
        dm_crossed.as_secs_f64(),
        gone_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    eprintln!("{}", world.timeline());
}
