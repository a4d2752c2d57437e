//! The gateway's pod agent on a real API server, in a pod that `parley-pod-runner` runs (a kubelet stand-in,
//! `e2e/runner/README.md`): the `parley/gateway` pod gets the `kubernetes` Service's variables (naming the API server
//! the runner uses) and its ServiceAccount token volume (`kube-api-access-*`, with the API server's CA), so its
//! in-cluster client reaches the API server, with only the RBAC of its ServiceAccount.
//!
//! - `the_pod_agent_reports_and_drains_through_its_own_pod`: a Role on the pod's name alone (get, list, watch,
//!   patch). The `parley.dev/gateway-status` annotation appears with 0 connections, rises with WebSocket clients;
//!   `parley.dev/drain` asks every client to reconnect, the annotation then says draining with 0 connections, and
//!   the process stays up, not ready, past its drain deadline; deleting the pod ends it at once.
//! - `a_pod_agent_that_may_not_patch_logs_forbidden_and_the_gateway_serves_on`: a Role without `patch`: the agent
//!   logs a forbidden error and the gateway is ready and serves clients.
//!
//! Needs only the control plane (`e2e/k8s/up.sh`, `KUBECONFIG` and `kubectl` on PATH) and the `parley` binary
//! (`cargo build -p parley-server`); without `KUBECONFIG` the tests print SKIPPED. A failed test keeps its work dir
//! (the runner's log and the container logs under `runner/logs/<namespace>/<pod>/`).

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use parley_core::protocol::{ClientFrame, ServerFrame};
use parley_e2e::client::{self, Target, Ws};
use parley_test_support::{binary, engine, Engine};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The HS256 secret of the clients' tokens.
const JWT_SECRET: &str = "pod-agent-e2e-hs256-secret-0123456789";
/// The runner's node label and taint key; the value is the test's namespace.
const RUNNER_KEY: &str = "parley.dev/pod-runner";
/// The gateway's drain: reconnect requests over 1 s, stop (or hold) after 4 s.
const DRAIN_WINDOW_MS: u64 = 1_000;
const DRAIN_DEADLINE_MS: u64 = 4_000;
/// Where a kubelet mounts the ServiceAccount token volume.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// One test at a time: each runs its own runner, on pod addresses of its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A namespace pinned to a runner's node, and the runner.
struct AgentTest {
    client: Client,
    namespace: String,
    work: PathBuf,
    runner: Option<Child>,
}

impl AgentTest {
    /// A namespace (`agent-<tag>`) whose pods go to a new runner's node only (`address`: the runner's pod address
    /// prefix's second octet).
    async fn new(tag: &str, address: u32) -> AgentTest {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let namespace = format!("agent-{tag}-{:06}", nanos % 1_000_000);
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&namespace);
        std::fs::create_dir_all(&work).expect("work dir");
        let client = Client::try_default().await.expect("kube client from KUBECONFIG");
        let mut test = AgentTest { client, namespace, work, runner: None };
        test.create_namespace().await;
        test.start_runner(address);
        test
    }

    async fn create_namespace(&self) {
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
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create the namespace");
    }

    fn start_runner(&mut self, address: u32) {
        let log = std::fs::File::create(self.work.join("runner.log")).expect("runner log");
        let binaries = binary("parley").parent().expect("binaries dir").to_string_lossy().into_owned();
        let prefix = format!("127.{}", 2 + (std::process::id() + address) % 250);
        let label = format!("{RUNNER_KEY}={}", self.namespace);
        let taint = format!("{label}:NoSchedule");
        let state = self.work.join("runner").to_string_lossy().into_owned();
        let node_prefix = format!("{}-runner", self.namespace);
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-pod-runner"))
            .args(["run", "--binaries", &binaries, "--state-dir", &state, "--node-prefix", &node_prefix])
            .args(["--nodes", "1", "--node-label", &label, "--node-taint", &taint, "--address-prefix", &prefix])
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
    }

    /// A ServiceAccount `name`, a Role on pod `pod` with `verbs`, and its RoleBinding.
    async fn account(&self, name: &str, pod: &str, verbs: &[&str]) {
        let ns = &self.namespace;
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).expect("account");
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &account)
            .await
            .expect("create the ServiceAccount");
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-pod-agent")},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "resourceNames": [pod], "verbs": verbs}]
        }))
        .expect("role");
        Api::<Role>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("create the Role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-pod-agent")},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("{name}-pod-agent")}
        }))
        .expect("role binding");
        Api::<RoleBinding>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("create the RoleBinding");
    }

    /// A bare `parley/gateway` pod with the pod agent on, running as `account`.
    async fn gateway(&self, name: &str, account: &str) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": account,
                "terminationGracePeriodSeconds": 30,
                "containers": [{
                    "name": "gateway", "image": "parley/gateway:test",
                    "ports": [{"name": "client", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
                    "env": [
                        {"name": "PARLEY_POD_AGENT", "value": "true"},
                        {"name": "PARLEY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "PARLEY_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "PARLEY_POD_STATUS_INTERVAL_MS", "value": "200"},
                        {"name": "PARLEY_JWT_HS256_SECRET", "value": JWT_SECRET},
                        {"name": "PARLEY_DRAIN_WINDOW_MS", "value": DRAIN_WINDOW_MS.to_string()},
                        {"name": "PARLEY_DRAIN_DEADLINE_MS", "value": DRAIN_DEADLINE_MS.to_string()}
                    ],
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/parley"}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "client"}, "periodSeconds": 1}
                }],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        }))
        .expect("pod");
        self.pods().create(&PostParams::default(), &pod).await.expect("create the gateway pod")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The container log of pod `name`.
    fn log(&self, name: &str) -> String {
        let path = self.work.join("runner/logs").join(&self.namespace).join(name).join("gateway.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Pod `name` once `check` holds for it (polled every 200 ms, `within` at most).
    async fn eventually(&self, name: &str, within: Duration, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
        let deadline = Instant::now() + within;
        loop {
            let pod = self.pods().get_opt(name).await.ok().flatten();
            if let Some(pod) = pod.as_ref().filter(|pod| check(pod)) {
                return pod.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{name}: not {what} within {within:?}; annotations {:?}, status {:?}\ncontainer log (tail):\n{}",
                pod.as_ref().map(|pod| &pod.metadata.annotations),
                pod.as_ref().map(|pod| &pod.status),
                self.log(name).lines().rev().take(15).collect::<Vec<_>>().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for AgentTest {
    fn drop(&mut self) {
        if let Some(mut runner) = self.runner.take() {
            // SIGTERM: the runner stops every process and deletes its node.
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
            eprintln!("[pod agent] logs kept in {}", self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The gateway's figures as its pod shows them.
fn status(pod: &Pod) -> Option<serde_json::Value> {
    let text = pod.metadata.annotations.as_ref()?.get("parley.dev/gateway-status")?;
    serde_json::from_str(text).ok()
}

fn connections(pod: &Pod) -> Option<u64> {
    status(pod)?.get("connections")?.as_u64()
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|condition| condition.type_ == type_).map(|condition| condition.status.clone())
}

fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|status| status.pod_ip.clone()).expect("podIP")
}

/// The pid of the pod's container (`containerID` is `parley-pod-runner://<pid>`), while it runs.
fn pid_of(pod: &Pod) -> Option<u32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status.state.as_ref()?.running.as_ref()?;
    status.container_id.as_deref()?.strip_prefix("parley-pod-runner://")?.parse().ok()
}

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

/// A plain HTTP/1.0 GET: the status code and the body.
async fn get(address: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap_or_else(|error| panic!("{address}: {error}"));
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("answer");
    let code = answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (code, body)
}

/// A client of user `user` on the gateway at `ip`.
async fn connect(ip: &str, user: &str) -> Ws {
    let target = Target::parse(&format!("ws://{ip}:8080")).expect("target");
    let token = client::mint_token(JWT_SECRET, user, 600).expect("token");
    let (ws, _ready) = client::connect(&target, &token, None, Duration::from_secs(10))
        .await
        .unwrap_or_else(|error| panic!("connect {user}: {error}"));
    ws
}

/// Reads until the server closes: whether it asked to reconnect first, and the close code.
async fn until_closed(mut ws: Ws, within: Duration) -> (bool, Option<u16>) {
    let mut asked = false;
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match message {
            Ok(Message::Text(text)) => {
                asked |= matches!(serde_json::from_str(text.as_str()), Ok(ServerFrame::Reconnect { .. }));
            }
            Ok(Message::Close(frame)) => return (asked, frame.map(|frame| u16::from(frame.code))),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    (asked, None)
}

/// The agent's pod is reached with its own ServiceAccount: it reports its connections, drains on request, holds
/// not ready, and ends at once when its pod is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_agent_reports_and_drains_through_its_own_pod() {
    if engine(Engine::Kubernetes).is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let test = AgentTest::new("drain", 0).await;
    test.account("gw", "gw-0", &["get", "list", "watch", "patch"]).await;
    let created = test.gateway("gw-0", "gw").await;
    let volumes = created.spec.as_ref().and_then(|spec| spec.volumes.clone()).unwrap_or_default();
    assert!(
        volumes.iter().any(|volume| volume.name.starts_with("kube-api-access-") && volume.projected.is_some()),
        "the API server's ServiceAccount admission adds the token volume: {volumes:?}"
    );

    // Ready, and the agent's first status: no connection yet.
    let ready = |pod: &Pod| condition(pod, "Ready").as_deref() == Some("True");
    let pod = test
        .eventually("gw-0", Duration::from_secs(60), "ready with a status of 0 connections", |pod| {
            ready(pod) && connections(pod) == Some(0)
        })
        .await;
    let first = status(&pod).expect("status");
    assert_eq!(first["maxConnections"], json!(100_000));
    assert_eq!((&first["draining"], &first["resumed"], &first["resumeFailed"]), (&json!(false), &json!(0), &json!(0)));
    assert!(first["at"].as_str().is_some_and(|at| at.ends_with('Z')), "{first}");

    // The in-cluster access the runner gives: the `kubernetes` Service names the runner's API server, and the token
    // volume holds the API server's CA (the kube-root-ca.crt ConfigMap) and the namespace.
    let ip = pod_ip(&pod);
    let pid = pid_of(&pod).expect("pid");
    let env = environ(pid);
    let api = std::env::var("KUBECONFIG")
        .ok()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.lines().find_map(|line| line.trim().strip_prefix("server: ").map(str::to_owned)))
        .expect("the kubeconfig's server");
    let authority = api.trim_start_matches("https://").trim_end_matches('/');
    assert_eq!(
        format!("{}:{}", env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]),
        authority,
        "KUBERNETES_SERVICE_HOST/PORT name the API server"
    );
    // `/var/run` is a symlink to `/run` on most hosts: resolved on the host (the container shares its root), since
    // an absolute symlink under `/proc/<pid>/root` would resolve against the test's own root.
    let var_run = std::fs::canonicalize("/var/run").unwrap_or_else(|_| PathBuf::from("/var/run"));
    let token_dir =
        Path::new(TOKEN_DIR).strip_prefix("/var/run").map(|rest| var_run.join(rest)).expect("under /var/run");
    let root = PathBuf::from(format!("/proc/{pid}/root")).join(token_dir.strip_prefix("/").expect("absolute"));
    let ca = Api::<ConfigMap>::namespaced(test.client.clone(), &test.namespace)
        .get("kube-root-ca.crt")
        .await
        .expect("kube-root-ca.crt")
        .data
        .and_then(|data| data.get("ca.crt").cloned())
        .expect("ca.crt");
    assert_eq!(std::fs::read_to_string(root.join("ca.crt")).expect("mounted ca.crt"), ca);
    assert_eq!(std::fs::read_to_string(root.join("namespace")).expect("mounted namespace"), test.namespace);
    assert!(!std::fs::read_to_string(root.join("token")).expect("mounted token").is_empty());

    // Clients: the count rises.
    let mut clients = Vec::new();
    for user in ["ada", "bob", "cyd"] {
        clients.push(connect(&ip, user).await);
    }
    test.eventually("gw-0", Duration::from_secs(10), "showing 3 connections", |pod| connections(pod) == Some(3)).await;

    // A drain requested on the pod: every client is asked to reconnect (and closed with 1012).
    let requested = Instant::now();
    let drain = json!({"metadata": {"annotations": {"parley.dev/drain": "2025-01-01T00:00:00Z"}}});
    test.pods().patch("gw-0", &PatchParams::default(), &Patch::Merge(&drain)).await.expect("request the drain");
    let readers: Vec<_> =
        clients.into_iter().map(|ws| tokio::spawn(until_closed(ws, Duration::from_secs(15)))).collect();
    for reader in readers {
        let (asked, code) = reader.await.expect("reader");
        assert!(asked && code == Some(1012), "asked to reconnect: {asked}, close code {code:?}");
    }
    let drained = test
        .eventually("gw-0", Duration::from_secs(15), "draining with 0 connections", |pod| {
            status(pod).is_some_and(|status| status["draining"] == json!(true) && status["connections"] == json!(0))
        })
        .await;
    assert_eq!(pid_of(&drained), Some(pid), "the same process");

    // It holds past its drain deadline: up, not ready, not accepting, still serving /readyz and /metrics.
    let deadline = Duration::from_millis(DRAIN_DEADLINE_MS + 2_000);
    tokio::time::sleep(deadline.saturating_sub(requested.elapsed())).await;
    let held = test
        .eventually("gw-0", Duration::from_secs(15), "running and not ready", |pod| {
            condition(pod, "Ready").as_deref() == Some("False") && pid_of(pod).is_some()
        })
        .await;
    assert_eq!(pid_of(&held), Some(pid), "the process is still the first one");
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the process is alive");
    let container = held.status.as_ref().and_then(|status| status.container_statuses.clone()).unwrap_or_default();
    assert_eq!(container.first().map(|status| status.restart_count), Some(0));
    let (code, body) = get(&format!("{ip}:8080"), "/readyz").await;
    assert!(code == 503 && body.contains("draining"), "/readyz: {code} {body}");
    let (code, metrics) = get(&format!("{ip}:9090"), "/metrics").await;
    assert!(code == 200 && metrics.contains("parley_gateway_draining 1"), "/metrics: {code}");
    let refused = Target::parse(&format!("ws://{ip}:8080")).expect("target");
    let token = client::mint_token(JWT_SECRET, "dan", 600).expect("token");
    let refusal =
        client::connect(&refused, &token, None, Duration::from_secs(5)).await.map(|_| ()).expect_err("refused");
    assert_eq!(refusal.kind, "http_503", "{refusal}");
    let log = test.log("gw-0");
    assert!(log.contains("holding, not ready and not accepting"), "{log}");
    assert!(!log.contains("exited with code"), "no exit while held:\n{log}");

    // Deleting the pod: SIGTERM ends it at once (its grace period is 30 s).
    let deleted = Instant::now();
    test.pods().delete("gw-0", &DeleteParams::default()).await.expect("delete the pod");
    let deadline = Instant::now() + Duration::from_secs(25);
    while test.pods().get_opt("gw-0").await.ok().flatten().is_some() {
        assert!(Instant::now() < deadline, "the pod is not gone within 25 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = deleted.elapsed();
    assert!(took < Duration::from_secs(5), "a held gateway stops at once on SIGTERM, took {took:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || !environ(pid).contains_key("PARLEY_POD_AGENT"));
    assert!(test.log("gw-0").contains("exited with code 0"), "{}", test.log("gw-0"));
}

/// A Role without `patch`: the agent logs the refusal (forbidden) and keeps retrying; the gateway is ready and
/// serves clients all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_agent_that_may_not_patch_logs_forbidden_and_the_gateway_serves_on() {
    if engine(Engine::Kubernetes).is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let test = AgentTest::new("nopatch", 1).await;
    test.account("gw", "gw-0", &["get", "list", "watch"]).await;
    test.gateway("gw-0", "gw").await;
    let pod = test
        .eventually("gw-0", Duration::from_secs(60), "ready", |pod| condition(pod, "Ready").as_deref() == Some("True"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = test.log("gw-0");
        if log.lines().any(|line| line.contains("cannot write the status on the pod") && line.contains("forbidden")) {
            break;
        }
        assert!(Instant::now() < deadline, "no forbidden error logged within 20 s:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(status(&test.pods().get("gw-0").await.expect("pod")).is_none(), "no status could be written");
    let ip = pod_ip(&pod);
    let (code, metrics) = get(&format!("{ip}:9090"), "/metrics").await;
    assert!(
        code == 200 && metrics.contains(r#"parley_gateway_pod_agent_errors_total{operation="patch"}"#),
        "{metrics}"
    );

    // The gateway serves: a client connects, creates a channel and answers a ping.
    let mut ws = connect(&ip, "ada").await;
    let created = client::request(
        &mut ws,
        &ClientFrame::CreateChannel {
            req_id: Some("c1".into()),
            name: "agent".into(),
            members: vec![],
            visibility: None,
            posting: None,
        },
        Duration::from_secs(10),
    )
    .await
    .expect("create a channel");
    let ServerFrame::Channel { channel, .. } = created else { panic!("not a channel: {created:?}") };
    let pong = client::request(&mut ws, &ClientFrame::Ping { req_id: Some("p1".into()) }, Duration::from_secs(10))
        .await
        .expect("ping");
    assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");
    assert!(!channel.id.is_empty());
    let pod = test.pods().get("gw-0").await.expect("pod");
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("True"), "still ready");
    let container = pod.status.as_ref().and_then(|status| status.container_statuses.clone()).unwrap_or_default();
    assert_eq!(container.first().map(|status| status.restart_count), Some(0), "never restarted");
}
