//! A MirrorMaker 2 pod through the pod runner, against the stack's two Kafkas: a Deployment of Apache Kafka's image
//! (`apache/kafka`) running `/opt/kafka/bin/connect-mirror-maker.sh <mm2.properties> --clusters <target>`, its
//! properties file from a ConfigMap, the Kafka CA from a Secret and the SASL passwords as `${env:…}` references to
//! Secret-backed environment variables (what the operator builds for a Region pair). `parley-pod-runner
//! --mm2-launcher` runs `e2e/stack`'s `bin/mm2-run` for it. A record produced to `<prefix>-messages` on Kafka A must
//! arrive as `<source alias>.<prefix>-messages` on Kafka B; deleting the Deployment stops the process.
//!
//! Needs `KUBECONFIG` (`e2e/k8s/up.sh`), and `PARLEY_KAFKA_BOOTSTRAP`, `PARLEY_KAFKA_B_BOOTSTRAP` and
//! `PARLEY_MM2_RUN` (`e2e/stack/up.sh --only kafka --kafka2`, or `--region2`) with the stack's TLS and SASL
//! variables. Without them a plain `cargo test` skips it; `PARLEY_REQUIRE_ENGINES=1` fails it. The runner's and
//! the pod's logs stay in the work dir the failure message names.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use parley_test_support::{engine, report, Engine};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The runner's node label and taint key; the value is the test's namespace.
const RUNNER_KEY: &str = "parley.dev/pod-runner";
/// Where the pod mounts its properties file and the Kafka CA (created on the host as empty mount points).
const MOUNTS: &str = "/var/tmp/parley-runner-mm2";
/// The script of the Apache Kafka image that the operator's MirrorMaker 2 container runs.
const SCRIPT: &str = "/opt/kafka/bin/connect-mirror-maker.sh";

fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// A variable this test needs beyond the engines of [`Engine`]: skipped (or, with `PARLEY_REQUIRE_ENGINES=1`,
/// failed) as an engine test is.
fn needed(name: &str, how: &str) -> Option<String> {
    let value = variable(name);
    if value.is_none() {
        let message = format!("runner_mm2: needs {name} ({how})");
        let required = variable("PARLEY_REQUIRE_ENGINES")
            .is_some_and(|value| !["0", "false", "no", "off", "n", "f"].contains(&value.to_ascii_lowercase().as_str()));
        assert!(!required, "{message}");
        eprintln!("SKIPPED {message}");
    }
    value
}

/// A short lowercase tag, unique per run: namespace, topic prefix and cluster aliases carry it.
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

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The namespace (pinned to the runner's nodes), the runner, and cleanup.
struct Harness {
    client: Client,
    namespace: String,
    work: PathBuf,
    runner: Option<Child>,
}

impl Harness {
    async fn start(tag: &str, launcher: &str) -> Harness {
        let namespace = format!("mm2-{tag}");
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("runner-mm2-{tag}"));
        std::fs::create_dir_all(&work).expect("work dir");
        let client = Client::try_default().await.expect("kube client from KUBECONFIG");
        let mut harness = Harness { client, namespace, work, runner: None };
        let tolerations =
            json!([{"key": RUNNER_KEY, "operator": "Equal", "value": harness.namespace, "effect": "NoSchedule"}]);
        let object: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": harness.namespace,
                "annotations": {
                    "scheduler.alpha.kubernetes.io/node-selector": format!("{RUNNER_KEY}={}", harness.namespace),
                    "scheduler.alpha.kubernetes.io/defaultTolerations": tolerations.to_string(),
                }
            }
        }))
        .expect("namespace");
        Api::<Namespace>::all(harness.client.clone())
            .create(&PostParams::default(), &object)
            .await
            .expect("create the namespace");
        harness.start_runner(launcher);
        harness
    }

    fn start_runner(&mut self, launcher: &str) {
        let log = std::fs::File::create(self.work.join("runner.log")).expect("runner log");
        let label = format!("{RUNNER_KEY}={}", self.namespace);
        let taint = format!("{label}:NoSchedule");
        let state = self.work.join("runner").to_string_lossy().into_owned();
        let node_prefix = format!("{}-runner", self.namespace);
        let prefix = format!("127.{}", 2 + std::process::id() % 250);
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-pod-runner"))
            .args(["run", "--state-dir", &state, "--node-prefix", &node_prefix, "--nodes", "1"])
            .args(["--node-label", &label, "--node-taint", &taint, "--address-prefix", &prefix])
            .args(["--mm2-launcher", launcher])
            .env("PARLEY_POD_RUNNER_LOG", "info,kube=warn")
            .env_remove("PARLEY_MM2_RUN")
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

    async fn create<K>(&self, value: serde_json::Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        let object: K = serde_json::from_value(value).expect("a valid object");
        Api::<K>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &object)
            .await
            .expect("create an object")
    }

    /// The container log of the MirrorMaker pod(s), for failure messages.
    fn pod_logs(&self) -> String {
        let dir = self.work.join("runner/logs").join(&self.namespace);
        let mut out = String::new();
        for pod in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let log = pod.path().join("mirror-maker.log");
            out.push_str(&format!("--- {}:\n{}\n", log.display(), tail(&log, 40)));
        }
        out
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
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
        let _ = Command::new("kubectl").args(["delete", "namespace", &self.namespace, "--wait=false"]).output();
        if std::thread::panicking() {
            eprintln!("runner_mm2: logs kept in {}", self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The running MirrorMaker pod: its pid once its container runs and is ready (no probe: ready once started).
async fn ready_pod(pods: &Api<Pod>, selector: &str, within: Duration) -> Result<(Pod, u32), String> {
    let deadline = Instant::now() + within;
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|error| error.to_string())?;
        for pod in &list.items {
            let Some(status) = pod.status.as_ref().and_then(|status| status.container_statuses.as_ref()) else {
                continue;
            };
            let Some(container) = status.first() else { continue };
            let pid = container
                .container_id
                .as_deref()
                .and_then(|id| id.strip_prefix("parley-pod-runner://"))
                .and_then(|pid| pid.parse().ok());
            if let (true, Some(pid)) = (container.ready, pid) {
                return Ok((pod.clone(), pid));
            }
        }
        if Instant::now() > deadline {
            let statuses: Vec<_> = list.items.iter().map(|pod| (pod.name_any(), pod.status.clone())).collect();
            return Err(format!("no ready MirrorMaker pod within {within:?}: {statuses:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads `topic` on `bootstrap` from the beginning until a record with `payload` comes (polls its metadata until the
/// topic exists). Blocking; `Err` after `within`.
fn wait_for_record(bootstrap: &str, topic: &str, payload: &[u8], within: Duration) -> Result<(), String> {
    let consumer: BaseConsumer = parley_test_support::kafka_config(bootstrap)
        .client_config()
        .set("group.id", format!("{topic}-runner-mm2-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|error| format!("Kafka reader: {error}"))?;
    let deadline = Instant::now() + within;
    let mut assigned = 0;
    let mut seen = 0usize;
    while Instant::now() < deadline {
        if assigned == 0 {
            let partitions = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|metadata| metadata.topics().first().map(|topic| topic.partitions().len()))
                .unwrap_or(0);
            if partitions == 0 {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            let mut list = TopicPartitionList::new();
            for partition in 0..partitions as i32 {
                list.add_partition_offset(topic, partition, Offset::Beginning).map_err(|error| error.to_string())?;
            }
            consumer.assign(&list).map_err(|error| format!("assign {topic}: {error}"))?;
            assigned = partitions;
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) if message.payload() == Some(payload) => return Ok(()),
            Some(Ok(_)) => seen += 1,
            Some(Err(error)) => eprintln!("runner_mm2: read {topic}: {error}"),
            None => {}
        }
    }
    Err(format!("{topic} on {bootstrap}: the record did not arrive within {within:?} ({seen} other records)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_maker_pod_replicates_kafka_a_to_kafka_b() {
    if engine(Engine::Kubernetes).is_none() {
        return;
    }
    let Some(bootstrap_a) = engine(Engine::Kafka) else { return };
    let how = "e2e/stack/up.sh --only kafka --kafka2";
    let Some(bootstrap_b) = needed("PARLEY_KAFKA_B_BOOTSTRAP", how) else { return };
    let Some(launcher) = needed("PARLEY_MM2_RUN", how) else { return };
    let ca = std::fs::read_to_string(variable("PARLEY_KAFKA_TLS_CA_FILE").expect("PARLEY_KAFKA_TLS_CA_FILE is set"))
        .expect("read the Kafka CA");
    let password = variable("PARLEY_KAFKA_SASL_PASSWORD").expect("PARLEY_KAFKA_SASL_PASSWORD is set");
    let mechanism = variable("PARLEY_KAFKA_SASL_MECHANISM").unwrap_or_else(|| "SCRAM-SHA-512".to_owned());
    let user = variable("PARLEY_KAFKA_SASL_USERNAME").expect("PARLEY_KAFKA_SASL_USERNAME is set");

    let tag = tag();
    let (source, target, prefix) = (format!("eu{tag}"), format!("us{tag}"), format!("mm2{tag}"));
    let harness = Harness::start(&tag, &launcher).await;

    // What the operator generates for the pair: one cluster per Region, passwords from the environment.
    let mut properties = format!(
        "clusters={source},{target}\n\
         config.providers=env\n\
         config.providers.env.class=org.apache.kafka.common.config.provider.EnvVarConfigProvider\n\
         {source}->{target}.enabled=true\n\
         {source}->{target}.topics={prefix}-.*\n\
         {target}->{source}.enabled=false\n\
         replication.factor=1\n\
         checkpoints.topic.replication.factor=1\n\
         heartbeats.topic.replication.factor=1\n\
         offset-syncs.topic.replication.factor=1\n\
         offset.storage.replication.factor=1\n\
         status.storage.replication.factor=1\n\
         config.storage.replication.factor=1\n\
         refresh.topics.interval.seconds=5\n\
         sync.topic.acls.enabled=false\n"
    );
    for (alias, bootstrap, variable) in
        [(&source, &bootstrap_a, "SOURCE_KAFKA_PASSWORD"), (&target, &bootstrap_b, "TARGET_KAFKA_PASSWORD")]
    {
        properties.push_str(&format!(
            "{alias}.bootstrap.servers={bootstrap}\n\
             {alias}.security.protocol=SASL_SSL\n\
             {alias}.sasl.mechanism={mechanism}\n\
             {alias}.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \
             username=\"{user}\" password=\"${{env:{variable}}}\";\n\
             {alias}.ssl.truststore.type=PEM\n\
             {alias}.ssl.truststore.location={MOUNTS}/kafka-ca/ca.crt\n"
        ));
    }
    let _: ConfigMap =
        harness.create(json!({"metadata": {"name": "mm2-config"}, "data": {"mm2.properties": properties}})).await;
    let _: Secret = harness.create(json!({"metadata": {"name": "kafka-ca"}, "stringData": {"ca.crt": ca}})).await;
    let _: Secret =
        harness.create(json!({"metadata": {"name": "kafka-credentials"}, "stringData": {"password": password}})).await;
    let password_from_secret = json!({"secretKeyRef": {"name": "kafka-credentials", "key": "password"}});
    let labels = json!({"app.kubernetes.io/name": "mirror-maker", "test": tag});
    let _: Deployment = harness
        .create(json!({
            "metadata": {"name": "mirror-maker"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "mirror-maker",
                            "image": "apache/kafka:4.1.0",
                            "command": [SCRIPT, format!("{MOUNTS}/config/mm2.properties"), "--clusters", target],
                            "env": [
                                {"name": "SOURCE_KAFKA_PASSWORD", "valueFrom": password_from_secret},
                                {"name": "TARGET_KAFKA_PASSWORD", "valueFrom": password_from_secret},
                                {"name": "KAFKA_HEAP_OPTS", "value": "-Xms64m -Xmx256m"}
                            ],
                            "volumeMounts": [
                                {"name": "config", "mountPath": format!("{MOUNTS}/config"), "readOnly": true},
                                {"name": "kafka-ca", "mountPath": format!("{MOUNTS}/kafka-ca"), "readOnly": true}
                            ],
                            "securityContext": {"readOnlyRootFilesystem": true}
                        }],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "mm2-config"}},
                            {"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}}
                        ]
                    }
                }
            }
        }))
        .await;

    let pods: Api<Pod> = Api::namespaced(harness.client.clone(), &harness.namespace);
    let selector = format!("test={tag}");
    let started = Instant::now();
    let (pod, pid) = match ready_pod(&pods, &selector, Duration::from_secs(120)).await {
        Ok(found) => found,
        Err(error) => panic!("{error}\n{}", harness.pod_logs()),
    };
    let ready_after = started.elapsed();
    // The container is the launcher's JVM, with the container's arguments and environment.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the container's command line");
    let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(&cmdline);
    let argv: Vec<String> = cmdline.split(|byte| *byte == 0).map(|arg| String::from_utf8_lossy(arg).into()).collect();
    let tail_args = [format!("{MOUNTS}/config/mm2.properties"), "--clusters".to_owned(), target.clone()];
    assert!(argv.iter().any(|arg| arg == "org.apache.kafka.connect.mirror.MirrorMaker"), "{argv:?}");
    assert!(argv.ends_with(&tail_args), "the container's arguments pass through: {argv:?}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the container's environment");
    assert!(
        environ.split(|byte| *byte == 0).any(|entry| entry == format!("SOURCE_KAFKA_PASSWORD={password}").as_bytes()),
        "the Secret reaches the environment"
    );

    // A record on A's `<prefix>-messages` arrives on B as `<source>.<prefix>-messages`.
    let topic = format!("{prefix}-messages");
    let payload = format!("hello from {source} {tag}");
    let producer: FutureProducer = parley_test_support::kafka_config(&bootstrap_a)
        .client_config()
        .set("acks", "all")
        .create()
        .expect("Kafka producer on A");
    let produced_at = Instant::now();
    producer
        .send(FutureRecord::to(&topic).key("k").payload(&payload), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .expect("produce to A");
    let mirrored = format!("{source}.{topic}");
    let (bootstrap, wanted, expected) = (bootstrap_b.clone(), mirrored.clone(), payload.clone().into_bytes());
    let arrived =
        tokio::task::spawn_blocking(move || wait_for_record(&bootstrap, &wanted, &expected, Duration::from_secs(180)))
            .await
            .expect("reader task");
    if let Err(error) = arrived {
        panic!("{error}\n{}", harness.pod_logs());
    }
    let replicated_after = produced_at.elapsed();
    report(&format!(
        "MirrorMaker 2 pod through the pod runner: ready {:.1} s after the Deployment, {mirrored} on Kafka B {:.1} s \
         after the record was produced to {topic} on Kafka A",
        ready_after.as_secs_f64(),
        replicated_after.as_secs_f64()
    ));

    // Deleting the Deployment stops the process.
    Api::<Deployment>::namespaced(harness.client.clone(), &harness.namespace)
        .delete("mirror-maker", &DeleteParams::foreground())
        .await
        .expect("delete the Deployment");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "pod {} (pid {pid}) still runs 60 s after the deletion", pod.name_any());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
