//! The harness of the operator's tests on a real Kubernetes API server (`tests/k8s.rs`, `tests/defects.rs`): the
//! control plane from `e2e/k8s/up.sh`, the CRDs installed once per test binary, a namespace per test with the Helm
//! chart's ServiceAccount and RBAC, and the `parley-operator` binary run as a child process as that ServiceAccount.
//! Include it with `#[path = "common/k8s.rs"] mod harness;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use parley_crds::{ChatCluster, Region};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const START_K8S: &str = "start the control plane with `e2e/k8s/up.sh /tmp/parley-k8s` and \
     `source /tmp/parley-k8s/env` (stop it with `e2e/k8s/down.sh /tmp/parley-k8s --clean`)";
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the control plane is there (`parley_test_support::engines`: a plain `cargo test` skips these tests
/// without it, the full test command fails them).
pub fn control_plane() -> bool {
    parley_test_support::engine(parley_test_support::Engine::Kubernetes).is_some()
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".."))
}

pub fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|error| panic!("cannot run kubectl (is it on PATH? {START_K8S}): {error}"))
}

pub fn kubectl_ok(args: &[&str]) -> String {
    let output = kubectl(args);
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Installs the CRDs once per test binary, from the operator's own `crd` subcommand, and waits until they are
/// established.
pub fn install_crds() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let crds =
            Command::new(env!("CARGO_BIN_EXE_parley-operator")).arg("crd").output().expect("parley-operator crd");
        assert!(crds.status.success(), "parley-operator crd failed");
        let file = std::env::temp_dir().join(format!("parley-crds-{}.yaml", std::process::id()));
        std::fs::write(&file, &crds.stdout).expect("write crds");
        let path = file.to_string_lossy().into_owned();
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &path]);
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/chatclusters.parley.dev",
            "crd/regions.parley.dev",
        ]);
        let _ = std::fs::remove_file(file);
    });
}

/// The chart's release name in the tests; its ServiceAccount is `parley-operator`.
pub const RELEASE: &str = "parley";
/// The ServiceAccount the chart renders for [`RELEASE`].
pub const SERVICE_ACCOUNT: &str = "parley-operator";

/// The helm binary, from `e2e/helm/build.sh` (built once and cached; a no-op when warm).
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let output = Command::new("bash")
            .arg("e2e/helm/build.sh")
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output()
            .expect("run e2e/helm/build.sh");
        assert!(output.status.success(), "e2e/helm/build.sh failed (it builds helm from its Go module)");
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
}

/// The chart's ServiceAccount and RBAC templates as `helm template` renders them, for the release [`RELEASE`] (or
/// `release`) in `namespace`, with `values` (`key=value`, for `--set`).
pub fn chart_rbac(release: &str, namespace: &str, values: &[String]) -> String {
    let mut command = Command::new(helm());
    command.args(["template", release, "charts/parley", "--namespace", namespace]);
    for value in values {
        command.args(["--set", value]);
    }
    command.args(["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]);
    let output = command.current_dir(root()).output().expect("run helm template");
    assert!(output.status.success(), "helm template failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Applies YAML with kubectl (as the admin of the control plane).
pub fn kubectl_apply(yaml: &str, what: &str) {
    let file = std::env::temp_dir().join(format!("parley-{what}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).expect("write yaml");
    kubectl_ok(&["apply", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(file);
}

/// Writes a kubeconfig that authenticates as `namespace`'s ServiceAccount `account` with a token from the
/// TokenRequest API, for the API server the admin kubeconfig names, and returns its path.
pub fn service_account_kubeconfig(namespace: &str, account: &str) -> PathBuf {
    let token = kubectl_ok(&["create", "token", account, "-n", namespace, "--duration=2h"]).trim().to_owned();
    let admin: serde_json::Value =
        serde_json::from_str(&kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"])).expect("kubeconfig");
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster["server"],
                      "certificate-authority-data": cluster["certificate-authority-data"]}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": account, "namespace": namespace}}],
        "current-context": "e2e"
    });
    let path = std::env::temp_dir().join(format!("parley-kubeconfig-{namespace}-{account}.json"));
    std::fs::write(&path, kubeconfig.to_string()).expect("write kubeconfig");
    path
}

/// A kube client authenticated by a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// A namespace of one test, with the chart's ServiceAccount and RBAC for an operator watching it, and a kubeconfig
/// of that ServiceAccount; deleted (without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
    /// The operator's kubeconfig: the chart's ServiceAccount, by a TokenRequest token.
    pub kubeconfig: PathBuf,
}

impl TestNamespace {
    pub async fn new(client: &Client, test: &str) -> TestNamespace {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("e2e-{test}-{:x}", nanos ^ std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        namespaces.create(&PostParams::default(), &namespace).await.expect("create namespace");
        kubectl_apply(&chart_rbac(RELEASE, &name, &[format!("watchNamespace={name}")]), &name);
        let kubeconfig = service_account_kubeconfig(&name, SERVICE_ACCOUNT);
        TestNamespace { name, kubeconfig }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A `parley-operator run` child process; killed when dropped.
pub struct Operator {
    pub child: Child,
    pub admin: SocketAddr,
    pub identity: String,
    pub log: PathBuf,
}

impl Operator {
    /// Starts the operator on `namespace` as the chart's ServiceAccount.
    pub fn start(namespace: &TestNamespace, identity: &str) -> Operator {
        let kubeconfig = &namespace.kubeconfig;
        let namespace = namespace.name.as_str();
        let log = std::env::temp_dir().join(format!("parley-operator-{namespace}-{identity}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-operator"))
            .args([
                "run",
                "--namespace",
                namespace,
                "--admin-listen",
                "127.0.0.1:0",
                "--identity",
                identity,
                "--lease-duration-seconds",
                "6",
                "--lease-grace-seconds",
                "2",
            ])
            .env("PARLEY_OPERATOR_LOG", "info,kube=warn,parley_operator=debug")
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("start parley-operator");
        // The operator binds port 0 and prints what it got; stdout goes on being read so it never blocks.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(admin) = parley_test_support::process::addresses(&line).first() {
                    let _ = found.send(*admin);
                }
            }
        });
        let admin = address
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the operator did not report its admin address; log {}", log.display()));
        Operator { child, admin, identity: identity.to_owned(), log }
    }

    /// SIGTERM: the operator finishes its reconciles and releases the Lease.
    pub fn terminate(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "operator exited with {status}; log {}", self.log.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("operator did not stop within 20 s of SIGTERM; log {}", self.log.display());
    }

    /// SIGKILL: nothing is released.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn metrics(&self) -> Metrics {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.expect("connect to the admin port");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("response");
        Metrics(text)
    }

    /// Waits until the admin port answers.
    pub async fn ready(&self) {
        eventually("operator admin port", || async {
            tokio::net::TcpStream::connect(self.admin).await.ok().map(|_| ())
        })
        .await;
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- operator {} log ({}) ---\n{}", self.identity, self.log.display(), self.log_tail());
        }
    }
}

pub struct Metrics(pub String);

impl Metrics {
    /// Sum of every sample of the metric (all label sets).
    pub fn value(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split([' ', '{']).next() == Some(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn reconciles(&self) -> f64 {
        self.value("parley_operator_reconciles_total")
    }

    pub fn writes(&self) -> f64 {
        self.value("parley_operator_writes_total")
    }

    /// Writes of one kind (`apply`, `delete`, `status`, `event`).
    pub fn writes_of(&self, kind: &str) -> f64 {
        let labelled = format!("parley_operator_writes_total{{kind=\"{kind}\"}}");
        self.0
            .lines()
            .filter(|line| line.split(' ').next() == Some(labelled.as_str()))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn get<K>(api: &Api<K>, name: &str) -> Option<K>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.expect("get")
}

pub fn condition(
    region_or_cluster_conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String)> {
    region_or_cluster_conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| (condition.status.clone(), condition.reason.clone()))
}

pub async fn region_ready(regions: &Api<Region>, name: &str) -> Region {
    eventually(&format!("Region {name} Ready"), || async {
        let region = get(regions, name).await?;
        let status = region.status.as_ref()?;
        let ready = condition(&status.conditions, "Ready")?;
        (ready.0 == "True" && status.observed_generation == region.metadata.generation).then_some(region)
    })
    .await
}

pub fn env_value(stateful_set: &StatefulSet, name: &str) -> Option<String> {
    stateful_set.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|var| var.name == name)?
        .value
        .clone()
}

/// resourceVersions of every object owned by Regions in the namespace, and of the Regions and ChatClusters.
pub async fn resource_versions(client: &Client, namespace: &str) -> BTreeMap<String, String> {
    async fn collect<K>(client: &Client, namespace: &str, out: &mut BTreeMap<String, String>)
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        for object in api.list(&ListParams::default()).await.expect("list").items {
            out.insert(
                format!("{} {}", K::kind(&()), object.name_any()),
                object.resource_version().unwrap_or_default(),
            );
        }
    }
    let mut out = BTreeMap::new();
    collect::<StatefulSet>(client, namespace, &mut out).await;
    collect::<Service>(client, namespace, &mut out).await;
    collect::<ConfigMap>(client, namespace, &mut out).await;
    collect::<PodDisruptionBudget>(client, namespace, &mut out).await;
    collect::<NetworkPolicy>(client, namespace, &mut out).await;
    collect::<Secret>(client, namespace, &mut out).await;
    collect::<Region>(client, namespace, &mut out).await;
    collect::<ChatCluster>(client, namespace, &mut out).await;
    out.retain(|key, _| !key.starts_with("ConfigMap kube-root-ca.crt"));
    out
}

/// Waits until the operator has run at least `more` reconciles beyond `since`, then until it is idle.
pub async fn reconciles_after(operator: &Operator, since: f64, more: f64) {
    eventually("more reconciles", || async { (operator.metrics().await.reconciles() >= since + more).then_some(()) })
        .await;
    settle(operator).await;
}

/// Waits until the reconcile counter stays still for one second.
pub async fn settle(operator: &Operator) {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = operator.metrics().await.reconciles();
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "the operator kept reconciling for {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let current = operator.metrics().await.reconciles();
        if current != last {
            last = current;
            still_since = Instant::now();
        }
    }
}

pub async fn client() -> Client {
    Client::try_default().await.expect("kube client from KUBECONFIG")
}

/// The token in a Region's internal token Secret, if the Secret exists.
pub async fn internal_token(secrets: &Api<Secret>, region: &str) -> Option<String> {
    let secret = get(secrets, &format!("{region}-internal-token")).await?;
    let token = secret.data.as_ref()?.get("token")?;
    Some(String::from_utf8_lossy(&token.0).into_owned())
}

pub fn apply_file(namespace: &str, file: &str) {
    kubectl_ok(&["apply", "-n", namespace, "-f", file]);
}
