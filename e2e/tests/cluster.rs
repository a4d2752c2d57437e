//! Two gateway processes and a router process (the distributed layout), sharing a real Redis for delivery and
//! presence. Clients use the workspace's client library (`parley-client`), which resumes on the other gateway.
//!
//! - `kill_9_one_gateway_mid_stream`: `kill -9` one gateway while two senders stream into a channel; every
//!   client ends up with exactly the stored history (zero loss, zero duplicates, same order).
//! - `drain_one_of_two_gateways_with_1000_clients_under_load`: drain one gateway with 1,000 clients connected
//!   and a steady send load; every client reconnects to the other within the window, spread over it (the
//!   histograms are printed), and nothing is lost.
//!
//! The tests of this file run one at a time (each starts its own processes and loads the machine), so that the
//! figures they print describe one cluster.
//!
//! Needs `PARLEY_REDIS_URL` (`e2e/stack/up.sh --only redis <dir>`, then source `<dir>/stack.env`) and the
//! `parley` and `parley-router` binaries (`cargo build -p parley-gateway -p parley-router`). Without Redis the
//! tests fail unless `PARLEY_SKIP_ENGINE_TESTS=1`.

use parley_client::{Client, ClientConfig, Event, HistoryQuery};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Prints a figure line, and appends it to `PARLEY_FIGURES_FILE` when set (the test command prints that file in its
/// summary, since a passing test's output is captured).
fn report(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os("PARLEY_FIGURES_FILE") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// One test of this file at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "cluster-test-secret-0123456789abcdef";
const ADMIN_TOKEN: &str = "cluster-admin-token";

fn redis_url() -> Option<String> {
    redis_from("PARLEY_REDIS_URL")
}

/// Redis Cluster seed nodes (comma-separated), as `--redis-url` takes them.
fn redis_cluster_urls() -> Option<String> {
    redis_from("PARLEY_REDIS_CLUSTER_URLS")
}

fn redis_from(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("PARLEY_SKIP_ENGINE_TESTS").is_ok_and(|value| value == "1") => {
            eprintln!("SKIPPED: cluster test needs Redis (PARLEY_SKIP_ENGINE_TESTS=1)");
            None
        }
        _ => panic!(
            "{variable} is not set, so the two-gateway tests cannot run: start Redis with \
             `e2e/stack/up.sh --only redis,redis-cluster /tmp/parley-stack` and \
             `set -a; . /tmp/parley-stack/stack.env; set +a`, or set PARLEY_SKIP_ENGINE_TESTS=1"
        ),
    }
}

/// `target/<profile>/<name>`, next to this test's own directory (`target/<profile>/deps`).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p parley-gateway -p parley-router`",
        path.display()
    );
    path
}

fn token(user: &str) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let exp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { sub: user, exp },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// A child process and the addresses it printed.
struct Process {
    child: Child,
    address: SocketAddr,
    admin: SocketAddr,
}

/// Starts `program` and waits for its "listening on http://A (metrics on http://B/metrics)" line.
async fn spawn(program: PathBuf, args: &[String]) -> Process {
    let mut child = Command::new(&program)
        .args(args)
        .env("PARLEY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", program.display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("listening on http://") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("{} did not report its address", program.display()));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addresses: Vec<SocketAddr> =
        line.split("http://").skip(1).filter_map(|part| part.split([' ', '/', ')']).next()?.parse().ok()).collect();
    assert_eq!(addresses.len(), 2, "unexpected start-up line: {line}");
    Process { child, address: addresses[0], admin: addresses[1] }
}

/// Where the router keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The embedded log and store (redb in the router's data directory).
    Embedded,
    /// Kafka as the log and Cassandra as the store (`PARLEY_KAFKA_BOOTSTRAP`, `PARLEY_CASSANDRA_CONTACT`).
    KafkaCassandra,
}

/// The router's storage arguments for `backend`, each run with its own topic prefix and keyspace; `None` when the
/// engines are missing and engine tests are skipped.
fn storage_args(backend: Backend, dir: &std::path::Path) -> Option<Vec<String>> {
    let mut args = vec!["--data-dir".to_owned(), dir.join("router").display().to_string()];
    if backend == Backend::Embedded {
        return Some(args);
    }
    let kafka = std::env::var("PARLEY_KAFKA_BOOTSTRAP").ok().filter(|value| !value.is_empty());
    let cassandra = std::env::var("PARLEY_CASSANDRA_CONTACT").ok().filter(|value| !value.is_empty());
    let (Some(kafka), Some(cassandra)) = (kafka, cassandra) else {
        if std::env::var("PARLEY_SKIP_ENGINE_TESTS").is_ok_and(|value| value == "1") {
            eprintln!("SKIPPED: cluster test on Kafka + Cassandra (PARLEY_SKIP_ENGINE_TESTS=1)");
            return None;
        }
        panic!(
            "PARLEY_KAFKA_BOOTSTRAP and PARLEY_CASSANDRA_CONTACT must be set for the cluster tests on the real \
             stack: start them with `e2e/stack/up.sh --only redis,kafka,cassandra /tmp/parley-stack` and \
             `set -a; . /tmp/parley-stack/stack.env; set +a`, or set PARLEY_SKIP_ENGINE_TESTS=1"
        );
    };
    let unique = format!("{}_{}", std::process::id(), rand_suffix() % 1_000_000_007);
    args.extend([
        "--kafka-bootstrap-servers".into(),
        kafka,
        "--kafka-topic-prefix".into(),
        format!("pct-{unique}-"),
        "--kafka-partitions".into(),
        "4".into(),
        "--cassandra-contact-points".into(),
        cassandra,
        "--cassandra-keyspace".into(),
        format!("parley_ct_{unique}"),
    ]);
    Some(args)
}

/// A free loopback port (bound and released at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A router and its gateways.
struct Cluster {
    _dir: tempfile::TempDir,
    router: Process,
    /// How the router was started, to start it again on the same port and data.
    router_args: Vec<String>,
    gateways: Vec<Process>,
}

impl Cluster {
    async fn start(redis_url: &str, gateways: usize, backend: Backend) -> Option<Cluster> {
        Self::start_with(redis_url, gateways, backend, &[]).await
    }

    /// Like [`Cluster::start`], with extra router arguments.
    async fn start_with(redis_url: &str, gateways: usize, backend: Backend, router_extra: &[&str]) -> Option<Cluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("parley-cluster-test:{}:{}:", std::process::id(), rand_suffix());
        let mut router_args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--redis-url".into(),
            redis_url.into(),
            "--redis-prefix".into(),
            prefix.clone(),
            "--internal-token".into(),
            "internal-secret".into(),
        ];
        router_args.extend(storage_args(backend, dir.path())?);
        router_args.extend(router_extra.iter().map(|arg| arg.to_string()));
        let router = spawn(binary("parley-router"), &router_args).await;
        let mut started = Vec::new();
        for n in 0..gateways {
            started.push(
                spawn(
                    binary("parley"),
                    &[
                        "--listen".into(),
                        "127.0.0.1:0".into(),
                        "--admin-listen".into(),
                        "127.0.0.1:0".into(),
                        "--router-url".into(),
                        format!("http://{}", router.address),
                        "--internal-token".into(),
                        "internal-secret".into(),
                        "--redis-url".into(),
                        redis_url.into(),
                        "--redis-prefix".into(),
                        prefix.clone(),
                        "--jwt-hs256-secret".into(),
                        SECRET.into(),
                        "--admin-token".into(),
                        ADMIN_TOKEN.into(),
                        "--data-dir".into(),
                        dir.path().join(format!("gateway{n}")).display().to_string(),
                        // Generous limits: the test's senders are paced by the client library anyway.
                        "--send-rate-per-sec".into(),
                        "200".into(),
                        "--send-burst".into(),
                        "400".into(),
                    ],
                )
                .await,
            );
        }
        Some(Cluster { _dir: dir, router, router_args, gateways: started })
    }

    /// SIGKILLs the router, then starts it again with the same port and data.
    async fn kill_and_restart_router(&mut self, down_for: Duration) {
        self.kill_router().await;
        tokio::time::sleep(down_for).await;
        self.restart_router().await;
    }

    /// SIGKILLs the router.
    async fn kill_router(&mut self) {
        self.router.child.start_kill().expect("kill -9 the router");
        let _ = self.router.child.wait().await;
    }

    /// Starts the router again with the same port and data.
    async fn restart_router(&mut self) {
        self.router = spawn(binary("parley-router"), &self.router_args).await;
    }

    /// The router's Kafka topic prefix (`None` on the embedded backend).
    fn kafka_prefix(&self) -> Option<String> {
        let at = self.router_args.iter().position(|arg| arg == "--kafka-topic-prefix")?;
        self.router_args.get(at + 1).cloned()
    }

    fn url(&self, gateway: usize) -> String {
        format!("ws://{}", self.gateways[gateway].address)
    }

    /// A client on `gateway` that rotates to the others when it reconnects.
    fn config(&self, gateway: usize, user: &str, lightweight: bool) -> ClientConfig {
        let mut config = if lightweight {
            ClientConfig::lightweight(self.url(gateway), token(user))
        } else {
            ClientConfig::new(self.url(gateway), token(user))
        };
        config.alternate_urls =
            (1..self.gateways.len()).map(|step| self.url((gateway + step) % self.gateways.len())).collect();
        config.backoff.base = Duration::from_millis(100);
        config.backoff.cap = Duration::from_secs(1);
        config
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// (channel, seq, id) in arrival order.
    messages: Vec<(String, u64, u64)>,
    /// When each connection came up.
    connected: Vec<Instant>,
    /// When each connection dropped.
    disconnected: Vec<Instant>,
    /// Failed connection attempts.
    failed: Vec<String>,
}

/// Collects a client's events until the stream ends.
fn record(mut events: mpsc::Receiver<Event>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let now = Instant::now();
            let mut seen = sink.lock().expect("seen lock");
            match event {
                Event::Message(message) => seen.messages.push((message.channel, message.seq, message.id)),
                Event::Connected { .. } => seen.connected.push(now),
                Event::Disconnected { .. } => seen.disconnected.push(now),
                Event::ConnectFailed { error, .. } => seen.failed.push(error),
                Event::Closed { .. } => break,
                _ => {}
            }
        }
    });
    seen
}

/// The whole stored history of a channel, as (seq, id), oldest first.
async fn stored(client: &Client, channel: &str) -> Vec<(u64, u64)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .history(channel, HistoryQuery { after: Some(after), before: None, limit: Some(200) })
            .await
            .expect("history");
        all.extend(page.messages.iter().map(|message| (message.seq, message.id)));
        match page.messages.last() {
            Some(last) if page.has_more => after = last.seq,
            _ => break,
        }
    }
    all
}

/// The stored history once it holds at least `expected` messages (the store may trail the log while a store
/// writer catches up after a restart), or whatever it holds after 60 s.
async fn stored_at_least(client: &Client, channel: &str, expected: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = stored(client, channel).await;
        if all.len() >= expected || Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every client holds `expected[channel]` messages of each of its channels, or the deadline.
async fn wait_for_all(seen: &[(Arc<Mutex<Seen>>, String)], expected: &HashMap<String, usize>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let missing = seen
            .iter()
            .filter(|(seen, channel)| {
                let count = seen.lock().expect("seen").messages.iter().filter(|(c, _, _)| c == channel).count();
                count < expected[channel]
            })
            .count();
        if missing == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that every client received exactly the stored history of its channel; returns (lost, duplicates).
fn compare(seen: &[(Arc<Mutex<Seen>>, String)], history: &HashMap<String, Vec<(u64, u64)>>) -> (usize, usize) {
    let mut lost = 0;
    let mut duplicates = 0;
    for (index, (seen, channel)) in seen.iter().enumerate() {
        let seen = seen.lock().expect("seen");
        let got: Vec<(u64, u64)> =
            seen.messages.iter().filter(|(c, _, _)| c == channel).map(|(_, seq, id)| (*seq, *id)).collect();
        let stored = &history[channel];
        let mut unique = got.clone();
        unique.dedup();
        duplicates += got.len() - unique.len();
        lost += stored.iter().filter(|message| !unique.contains(message)).count();
        assert_eq!(&got, stored, "client {index} in {channel}: received stream differs from the stored history");
    }
    (lost, duplicates)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_gateway_mid_stream_embedded() {
    kill_9_one_gateway_mid_stream(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_gateway_mid_stream_kafka_cassandra() {
    kill_9_one_gateway_mid_stream(Backend::KafkaCassandra).await;
}

async fn kill_9_one_gateway_mid_stream(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 2, backend).await else { return };
    const RECEIVERS: usize = 40;
    const PER_SENDER: usize = 150;
    let channel = "g:killtest".to_owned();

    let (owner, owner_events) = Client::connect(cluster.config(1, "owner", false)).await.expect("owner connects");
    let _owner_seen = record(owner_events);
    let members: Vec<String> = (0..RECEIVERS).map(|n| format!("r{n}")).chain(["s0".into(), "s1".into()]).collect();
    owner.create_channel("killtest", members.clone()).await.expect("channel created");

    // Receivers alternate between the gateways; each rotates to the other when its connection drops.
    let mut receivers = Vec::new();
    for n in 0..RECEIVERS {
        let (client, events) =
            Client::connect(cluster.config(n % 2, &format!("r{n}"), false)).await.expect("receiver connects");
        receivers.push((client, record(events), n % 2));
    }
    let (s0, s0_events) = Client::connect(cluster.config(0, "s0", false)).await.expect("s0 connects");
    let (s1, s1_events) = Client::connect(cluster.config(1, "s1", false)).await.expect("s1 connects");
    let s0_seen = record(s0_events);
    let s1_seen = record(s1_events);

    let stream = |client: Client, name: &'static str| {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(PER_SENDER);
            for n in 0..PER_SENDER {
                let receipt = client
                    .send_with_id(channel.clone(), format!("{name}-{n}"), format!("{name} message {n}"))
                    .await
                    .unwrap_or_else(|error| panic!("{name} send {n} failed: {error}"));
                receipts.push(receipt);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (client, receipts)
        })
    };
    let first = stream(s0, "s0");
    let second = stream(s1, "s1");

    // Mid-stream: SIGKILL gateway 0 (no drain, no goodbye).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let killed_at = Instant::now();
    cluster.gateways[0].child.start_kill().expect("kill -9 gateway 0");
    let _ = cluster.gateways[0].child.wait().await;

    let (s0, s0_receipts) = tokio::time::timeout(Duration::from_secs(90), first).await.expect("s0 done").expect("s0");
    let (s1, s1_receipts) = tokio::time::timeout(Duration::from_secs(90), second).await.expect("s1 done").expect("s1");
    let mut confirmed: Vec<u64> = s0_receipts.iter().chain(&s1_receipts).map(|receipt| receipt.seq).collect();
    confirmed.sort_unstable();
    confirmed.dedup();
    assert_eq!(confirmed.len(), 2 * PER_SENDER, "every send was confirmed exactly once");

    let history = HashMap::from([(channel.clone(), stored_at_least(&owner, &channel, 2 * PER_SENDER).await)]);
    assert_eq!(history[&channel].len(), 2 * PER_SENDER, "the store has every confirmed message exactly once");
    assert_eq!(
        history[&channel].iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=(2 * PER_SENDER) as u64).collect::<Vec<_>>(),
        "gap-free order"
    );

    let mut seen: Vec<(Arc<Mutex<Seen>>, String)> =
        receivers.iter().map(|(_, seen, _)| (seen.clone(), channel.clone())).collect();
    seen.push((s0_seen.clone(), channel.clone()));
    seen.push((s1_seen, channel.clone()));
    let expected = HashMap::from([(channel.clone(), 2 * PER_SENDER)]);
    wait_for_all(&seen, &expected, Duration::from_secs(30)).await;
    let (lost, duplicates) = compare(&seen, &history);

    let mut resume_times: Vec<Duration> = receivers
        .iter()
        .filter(|(_, _, gateway)| *gateway == 0)
        .chain(std::iter::once(&(s0.clone(), s0_seen.clone(), 0)))
        .filter_map(|(_, seen, _)| {
            let seen = seen.lock().expect("seen");
            seen.connected.iter().find(|at| **at > killed_at).map(|at| at.duration_since(killed_at))
        })
        .collect();
    resume_times.sort_unstable();
    let moved = RECEIVERS / 2 + 1;
    report(&format!(
        "kill -9 figures ({backend:?}): {} of {moved} clients of the killed gateway resumed on the other; resume time p50 {:?}, max {:?}; \
         {} messages confirmed; lost {lost}; duplicates {duplicates}",
        resume_times.len(),
        percentile(&resume_times, 0.5),
        resume_times.last().copied().unwrap_or_default(),
        confirmed.len(),
    ));
    assert_eq!(resume_times.len(), moved, "every client of the killed gateway reconnected to the other one");
    assert_eq!((lost, duplicates), (0, 0));
    for (client, _, _) in &receivers {
        client.close().await;
    }
    s0.close().await;
    s1.close().await;
    owner.close().await;
    let _ = cluster.router.child.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_one_of_two_gateways_with_1000_clients_under_load_embedded() {
    drain_one_of_two_gateways_with_1000_clients_under_load(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_one_of_two_gateways_with_1000_clients_under_load_kafka_cassandra() {
    drain_one_of_two_gateways_with_1000_clients_under_load(Backend::KafkaCassandra).await;
}

async fn drain_one_of_two_gateways_with_1000_clients_under_load(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 2, backend).await else { return };
    const CLIENTS: usize = 1_000;
    const CHANNELS: usize = 10;
    const WINDOW_MS: u64 = 30_000;
    let per_channel = CLIENTS / CHANNELS;

    // Ten channels of 100 members, half of each on either gateway. One sender per channel, on gateway 0 (the one
    // that drains), so the senders move too.
    let (owner, owner_events) = Client::connect(cluster.config(1, "owner", false)).await.expect("owner connects");
    let _owner_seen = record(owner_events);
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("g:drain{c}")).collect();
    for (c, channel) in channels.iter().enumerate() {
        let members: Vec<String> =
            (0..per_channel).map(|n| format!("u{}", c * per_channel + n)).chain([format!("sender{c}")]).collect();
        owner.create_channel(channel.trim_start_matches("g:"), members).await.expect("channel created");
    }

    let mut clients = Vec::with_capacity(CLIENTS);
    for n in 0..CLIENTS {
        let gateway = n % 2;
        let config = cluster.config(gateway, &format!("u{n}"), true);
        let (client, events) = Client::connect(config).await.expect("client connects");
        clients.push((client, record(events), gateway, channels[n / per_channel].clone()));
    }
    let mut senders = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        let (client, events) =
            Client::connect(cluster.config(0, &format!("sender{c}"), false)).await.expect("sender connects");
        senders.push((client, record(events), channel.clone()));
    }

    // Steady load: every sender sends one message every 250 ms for 33 s (40 msg/s in all, 4,000 deliveries/s),
    // from 2 s before the drain to past the end of its window.
    let load_started = Instant::now();
    let mut load = Vec::new();
    for (c, (client, _, channel)) in senders.iter().enumerate() {
        let client = client.clone();
        let channel = channel.clone();
        load.push(tokio::spawn(async move {
            let mut sent = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while load_started.elapsed() < Duration::from_secs(33) {
                tick.tick().await;
                client
                    .send_with_id(channel.clone(), format!("m{c}-{sent}"), format!("load {c} {sent}"))
                    .await
                    .unwrap_or_else(|error| panic!("sender {c} send {sent} failed: {error}"));
                sent += 1;
            }
            sent
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let drain_started = Instant::now();
    let response = post_json(
        cluster.gateways[0].admin,
        "/admin/drain",
        ADMIN_TOKEN,
        &format!(r#"{{"window_ms":{WINDOW_MS},"deadline_ms":60000}}"#),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "drain accepted: {response}");

    let mut sent_per_channel = HashMap::new();
    for (task, channel) in load.into_iter().zip(&channels) {
        let sent = tokio::time::timeout(Duration::from_secs(60), task).await.expect("load ends").expect("load task");
        sent_per_channel.insert(channel.clone(), sent);
    }
    // The drained gateway exits by itself once its last connection is gone.
    let exit = tokio::time::timeout(Duration::from_secs(40), cluster.gateways[0].child.wait()).await;
    let drained_exit = drain_started.elapsed();
    assert!(matches!(exit, Ok(Ok(status)) if status.success()), "the drained gateway exits cleanly: {exit:?}");

    let mut history = HashMap::new();
    for channel in &channels {
        history.insert(channel.clone(), stored_at_least(&owner, channel, sent_per_channel[channel]).await);
        assert_eq!(history[channel].len(), sent_per_channel[channel], "{channel}: every confirmed send is stored once");
    }
    let seen: Vec<(Arc<Mutex<Seen>>, String)> = clients
        .iter()
        .map(|(_, seen, _, channel)| (seen.clone(), channel.clone()))
        .chain(senders.iter().map(|(_, seen, channel)| (seen.clone(), channel.clone())))
        .collect();
    let expected: HashMap<String, usize> = history.iter().map(|(channel, all)| (channel.clone(), all.len())).collect();
    wait_for_all(&seen, &expected, Duration::from_secs(60)).await;
    let (lost, duplicates) = compare(&seen, &history);

    // When the drained gateway let each of its clients go, and when each was back on the other gateway, from
    // the drain request.
    let moved: Vec<Arc<Mutex<Seen>>> = clients
        .iter()
        .filter(|(_, _, gateway, _)| *gateway == 0)
        .map(|(_, seen, _, _)| seen.clone())
        .chain(senders.iter().map(|(_, seen, _)| seen.clone()))
        .collect();
    let after_drain = |pick: fn(&Seen) -> &Vec<Instant>| -> Vec<Duration> {
        let mut times: Vec<Duration> = moved
            .iter()
            .filter_map(|seen| {
                let seen = seen.lock().expect("seen");
                pick(&seen).iter().find(|at| **at > drain_started).map(|at| at.duration_since(drain_started))
            })
            .collect();
        times.sort_unstable();
        times
    };
    let mut gaps: Vec<Duration> = moved
        .iter()
        .filter_map(|seen| {
            let seen = seen.lock().expect("seen");
            let left = seen.disconnected.iter().find(|at| **at > drain_started)?;
            let back = seen.connected.iter().find(|at| *at > left)?;
            Some(back.duration_since(*left))
        })
        .collect();
    gaps.sort_unstable();
    let told = after_drain(|seen| &seen.disconnected);
    let reconnects = after_drain(|seen| &seen.connected);
    let failures: usize = moved.iter().map(|seen| seen.lock().expect("seen").failed.len()).sum();
    let histogram = |times: &[Duration]| -> (usize, String) {
        let mut buckets: BTreeMap<u128, usize> = BTreeMap::new();
        for at in times {
            *buckets.entry(at.as_millis() / 500).or_default() += 1;
        }
        let largest = buckets.values().copied().max().unwrap_or(0);
        let rows: Vec<String> =
            buckets.iter().map(|(slot, count)| format!("{}-{} ms: {count}", slot * 500, (slot + 1) * 500)).collect();
        (largest, rows.join(", "))
    };
    let (largest_told, told_rows) = histogram(&told);
    let (_, reconnect_rows) = histogram(&reconnects);
    report(&format!(
        "drain figures ({backend:?}): {} clients on the drained gateway (window {WINDOW_MS} ms); let go p50 {:?} p99 {:?}; back \
         on the other gateway: {} of them, p50 {:?}, p99 {:?}, max {:?} after the drain request; failed attempts \
         {failures}; each client's own reconnect (let go → back) p50 {:?}, p99 {:?}; drained gateway exited after {drained_exit:?}; messages {}; lost {lost}; duplicates \
         {duplicates}\nlet-go histogram (500 ms buckets): {told_rows}\nreconnected histogram (500 ms buckets): \
         {reconnect_rows}",
        moved.len(),
        percentile(&told, 0.5),
        percentile(&told, 0.99),
        reconnects.len(),
        percentile(&reconnects, 0.5),
        percentile(&reconnects, 0.99),
        reconnects.last().copied().unwrap_or_default(),
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99),
        sent_per_channel.values().sum::<usize>(),
    ));
    assert_eq!(told.len(), moved.len(), "the drained gateway let every client go");
    assert_eq!(reconnects.len(), moved.len(), "every client of the drained gateway reconnected to the other one");
    assert_eq!((lost, duplicates), (0, 0));
    // The drain spreads the reconnects: clients are let go at uniformly random moments of the window's first four
    // fifths, so no 500 ms slice holds more than a quarter of them (a storm would put nearly all in the first).
    assert!(largest_told * 4 <= moved.len(), "clients are let go spread over the window: {told_rows}");
    assert!(
        // (+2 s: the moment is the client's, which sees the close later on a loaded machine)
        told.last().is_some_and(|last| *last <= Duration::from_millis(WINDOW_MS * 4 / 5 + 2_000)),
        "every client is let go within the first four fifths of the window: {told_rows}"
    );
    // And the remaining fifth is enough for the last of them to land: every client is back within the window.
    assert!(
        reconnects.last().is_some_and(|last| *last <= Duration::from_millis(WINDOW_MS)),
        "every client is back on the other gateway within the window: {reconnect_rows}"
    );
    for (client, _, _, _) in &clients {
        client.close().await;
    }
    for (client, _, _) in &senders {
        client.close().await;
    }
    owner.close().await;
    let _ = cluster.router.child.start_kill();
    let _ = cluster.gateways[1].child.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_router_mid_stream_embedded() {
    kill_9_the_router_mid_stream(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_router_mid_stream_kafka_cassandra() {
    kill_9_the_router_mid_stream(Backend::KafkaCassandra).await;
}

/// `kill -9` the router while two senders stream, start it again: sends fail with `unavailable` meanwhile (never a
/// false confirmation), the senders retry with the same ids, and afterwards the stored history holds every
/// confirmed message exactly once, in a gap-free order, which is exactly what every receiver got.
async fn kill_9_the_router_mid_stream(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 1, backend).await else { return };
    const RECEIVERS: usize = 10;
    const PER_SENDER: usize = 100;
    let channel = "g:routerkill".to_owned();
    let (owner, owner_events) = Client::connect(cluster.config(0, "owner", false)).await.expect("owner connects");
    let _owner_seen = record(owner_events);
    let members: Vec<String> = (0..RECEIVERS).map(|n| format!("r{n}")).chain(["s0".into(), "s1".into()]).collect();
    owner.create_channel("routerkill", members).await.expect("channel created");
    let mut seen = Vec::new();
    let mut receivers = Vec::new();
    for n in 0..RECEIVERS {
        let (client, events) =
            Client::connect(cluster.config(0, &format!("r{n}"), false)).await.expect("receiver connects");
        seen.push((record(events), channel.clone()));
        receivers.push(client);
    }
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Every member is connected before the first send, so each one's stream starts at seq 1.
    let mut connected = Vec::new();
    for name in ["s0", "s1"] {
        let (client, events) = Client::connect(cluster.config(0, name, false)).await.expect("sender connects");
        seen.push((record(events), channel.clone()));
        connected.push((name, client));
    }
    let mut streams = Vec::new();
    for (name, client) in connected {
        let channel = channel.clone();
        let refused = refused.clone();
        streams.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(PER_SENDER);
            for n in 0..PER_SENDER {
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    match client.send_with_id(channel.clone(), format!("{name}-{n}"), format!("{name} {n}")).await {
                        Ok(receipt) => {
                            seqs.push(receipt.seq);
                            break;
                        }
                        Err(error) => {
                            assert!(Instant::now() < deadline, "{name} send {n} never succeeded: {error}");
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (client, seqs)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let killed_at = Instant::now();
    cluster.kill_and_restart_router(Duration::from_millis(500)).await;
    let back_after = killed_at.elapsed();
    let mut confirmed = Vec::new();
    let mut senders = Vec::new();
    for stream in streams {
        let (client, seqs) =
            tokio::time::timeout(Duration::from_secs(180), stream).await.expect("stream").expect("task");
        confirmed.extend(seqs);
        senders.push(client);
    }
    confirmed.sort_unstable();
    let before = confirmed.len();
    confirmed.dedup();
    assert_eq!(before, confirmed.len(), "no sequence was confirmed twice");
    assert_eq!(confirmed.len(), 2 * PER_SENDER);
    let started_waiting = Instant::now();
    let history = HashMap::from([(channel.clone(), stored_at_least(&owner, &channel, 2 * PER_SENDER).await)]);
    let store_caught_up = started_waiting.elapsed();
    assert_eq!(
        history[&channel].iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=(2 * PER_SENDER) as u64).collect::<Vec<_>>(),
        "history holds every confirmed message exactly once, gap-free"
    );
    let expected = HashMap::from([(channel.clone(), 2 * PER_SENDER)]);
    wait_for_all(&seen, &expected, Duration::from_secs(30)).await;
    let (lost, duplicates) = compare(&seen, &history);
    report(&format!(
        "router kill -9 figures ({backend:?}): router back after {back_after:?}; {} sends refused while it was down \
         (retried with the same ids); store complete {store_caught_up:?} after the last confirmation; {} confirmed; \
         lost {lost}; duplicates {duplicates}",
        refused.load(std::sync::atomic::Ordering::Relaxed),
        confirmed.len()
    ));
    assert_eq!((lost, duplicates), (0, 0));
    for client in receivers.iter().chain(&senders) {
        client.close().await;
    }
    owner.close().await;
}

async fn post_json(address: SocketAddr, path: &str, token: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("admin connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("admin write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("admin read");
    String::from_utf8_lossy(&response).into_owned()
}

/// A counter from a process's `/metrics`.
async fn metric(address: SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("metrics connect");
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")).and_then(|value| value.trim().parse::<f64>().ok()))
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("metric {name} not exported:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_crossing_the_fanout_threshold_live_embedded() {
    a_channel_crossing_the_fanout_threshold_live(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_crossing_the_fanout_threshold_live_kafka_cassandra() {
    a_channel_crossing_the_fanout_threshold_live(Backend::KafkaCassandra).await;
}

/// The same on a three-master Redis Cluster: the router's registry lookups, the gateways' presence and
/// registry writes, and every publication go through the cluster drivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_crossing_the_fanout_threshold_live_redis_cluster() {
    let Some(urls) = redis_cluster_urls() else { return };
    crossing_on(&urls, Backend::KafkaCassandra).await;
}

/// Two gateways, a router whose fan-out threshold is 6, and a channel of 5 that two users join (7: fanned out
/// on read), one leaves (6: pushed) and joins again (7) while a sender streams. Members on both gateways see
/// every message once, in order; both gateways read the feed, and the router answered them from memory.
async fn a_channel_crossing_the_fanout_threshold_live(backend: Backend) {
    let Some(redis_url) = redis_url() else { return };
    crossing_on(&redis_url, backend).await;
}

async fn crossing_on(redis_url: &str, backend: Backend) {
    let _serial = SERIAL.lock().await;
    let redis = if redis_url.contains(',') { "Redis Cluster" } else { "Redis" };
    let Some(cluster) = Cluster::start_with(redis_url, 2, backend, &["--fanout-threshold", "6"]).await else {
        return;
    };
    const MESSAGES: usize = 150;
    let channel = "g:crossing".to_owned();
    let (owner, owner_events) = Client::connect(cluster.config(1, "owner", false)).await.expect("owner connects");
    let owner_seen = record(owner_events);
    let members: Vec<String> = (0..4).map(|n| format!("r{n}")).collect();
    owner.create_channel("crossing", members).await.expect("channel created");
    let mut seen = vec![(owner_seen, channel.clone())];
    let mut receivers = Vec::new();
    for n in 0..4 {
        let (client, events) =
            Client::connect(cluster.config(n % 2, &format!("r{n}"), false)).await.expect("receiver connects");
        seen.push((record(events), channel.clone()));
        receivers.push(client);
    }
    let (j0, j0_events) = Client::connect(cluster.config(0, "j0", false)).await.expect("j0 connects");
    let (j1, j1_events) = Client::connect(cluster.config(1, "j1", false)).await.expect("j1 connects");
    let j0_seen = record(j0_events);
    let j1_seen = record(j1_events);

    let sender = {
        let owner = owner.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(MESSAGES);
            for n in 0..MESSAGES {
                let receipt = owner
                    .send_with_id(channel.clone(), format!("x-{n}"), format!("crossing {n}"))
                    .await
                    .unwrap_or_else(|error| panic!("send {n} failed: {error}"));
                seqs.push(receipt.seq);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seqs
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    j0.join(channel.clone()).await.expect("j0 joins");
    j1.join(channel.clone()).await.expect("j1 joins: 7 members, above the threshold");
    tokio::time::sleep(Duration::from_millis(500)).await;
    j1.leave(channel.clone()).await.expect("j1 leaves: 6, pushed again");
    tokio::time::sleep(Duration::from_millis(400)).await;
    j1.join(channel.clone()).await.expect("j1 joins again: 7");
    let mut confirmed =
        tokio::time::timeout(Duration::from_secs(90), sender).await.expect("sender done").expect("task");
    confirmed.sort_unstable();
    assert_eq!(confirmed, (1..=MESSAGES as u64).collect::<Vec<_>>(), "every send confirmed once, gap-free");

    let history = HashMap::from([(channel.clone(), stored_at_least(&owner, &channel, MESSAGES).await)]);
    let expected = HashMap::from([(channel.clone(), MESSAGES)]);
    wait_for_all(&seen, &expected, Duration::from_secs(30)).await;
    let (lost, duplicates) = compare(&seen, &history);
    for (client_seen, _) in &seen {
        let order: Vec<u64> = client_seen.lock().expect("seen").messages.iter().map(|(_, seq, _)| *seq).collect();
        assert_eq!(order, (1..=MESSAGES as u64).collect::<Vec<_>>(), "one order for every member all along");
    }
    // The joiners got a gap-free run from where they joined (j0 stayed; j1 from its last join on).
    let j0_order: Vec<u64> = j0_seen.lock().expect("seen").messages.iter().map(|(_, seq, _)| *seq).collect();
    let first = *j0_order.first().expect("j0 received messages");
    assert_eq!(j0_order, (first..=MESSAGES as u64).collect::<Vec<_>>(), "j0: gap-free from its join");
    let j1_last = j1_seen.lock().expect("seen").messages.last().map(|(_, seq, _)| *seq);
    assert_eq!(j1_last, Some(MESSAGES as u64), "j1 follows the channel to its end");

    let mut gateway_reads = Vec::new();
    for gateway in &cluster.gateways {
        gateway_reads.push((
            metric(gateway.admin, "parley_gateway_feed_reads_total").await,
            metric(gateway.admin, "parley_gateway_feed_messages_total").await,
        ));
    }
    let notices = metric(cluster.router.admin, "parley_router_feed_notices_total").await;
    let fed = metric(cluster.router.admin, "parley_router_feed_messages_total").await;
    let from_memory = metric(cluster.router.admin, "parley_router_feed_reads_total").await;
    let from_store = metric(cluster.router.admin, "parley_router_feed_store_reads_total").await;
    report(&format!(
        "threshold crossing ({backend:?}, {redis}): {MESSAGES} messages, {fed} of them fanned out on read ({notices} notices); \
         gateway feed reads (reads, messages) {gateway_reads:?}; router answered {from_memory} from memory, \
         {from_store} from the store; lost {lost}; duplicates {duplicates}"
    ));
    assert_eq!((lost, duplicates), (0, 0));
    assert!(fed > 0 && (fed as usize) < MESSAGES, "both paths were taken: {fed} of {MESSAGES} read from the feed");
    for (reads, messages) in &gateway_reads {
        assert!(*reads > 0, "each gateway holding members read the feed");
        assert!(*messages <= fed, "a gateway read each fanned-out message at most once: {messages} of {fed}");
    }
    assert!(from_memory > 0);
    for client in receivers.iter().chain([&j0, &j1, &owner]) {
        client.close().await;
    }
}

/// One record of `{prefix}presence`: (key, user, status, instance).
type PresenceRecord = (String, String, String, String);

/// Every record of a topic so far, in partition order (`read_committed`, from the beginning).
fn read_presence_topic(bootstrap: &str, topic: &str) -> Vec<PresenceRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::{ClientConfig as KafkaClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = KafkaClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-test-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("Kafka reader");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("topic metadata");
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition_offset(topic, partition, Offset::Beginning).expect("offset");
    }
    consumer.assign(&list).expect("assign");
    let mut at_end = std::collections::HashSet::new();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_end.len() < partitions as usize {
        assert!(Instant::now() < deadline, "reading {topic} did not reach its end");
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(error)) => panic!("read error: {error}"),
            Some(Ok(message)) => {
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                let record: serde_json::Value =
                    serde_json::from_slice(message.payload().unwrap_or_default()).expect("a JSON presence record");
                let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
                records.push((key, field("user"), field("status"), field("instance")));
            }
        }
    }
    records
}

/// Polls the presence topic until `user`'s statuses are exactly `expected` (in order), at most 30 s.
async fn presence_of(bootstrap: &str, topic: &str, user: &str, expected: &[&str]) -> Vec<PresenceRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (bootstrap_owned, topic_owned) = (bootstrap.to_owned(), topic.to_owned());
        let records = tokio::task::spawn_blocking(move || read_presence_topic(&bootstrap_owned, &topic_owned))
            .await
            .expect("reader task");
        let mine: Vec<PresenceRecord> = records.into_iter().filter(|record| record.1 == user).collect();
        let statuses: Vec<&str> = mine.iter().map(|record| record.2.as_str()).collect();
        if statuses == expected {
            return mine;
        }
        assert!(Instant::now() < deadline, "{user}'s presence records: {statuses:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Presence changes seen by the gateway processes reach `{prefix}presence` on Kafka through the router, keyed by
/// user and in order; a change made while the router is down (kill -9) is recorded once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_reach_the_kafka_presence_topic_even_across_a_router_restart() {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 2, Backend::KafkaCassandra).await else { return };
    let bootstrap = std::env::var("PARLEY_KAFKA_BOOTSTRAP").expect("set for the Kafka + Cassandra backend");
    let topic = format!("{}presence", cluster.kafka_prefix().expect("a Kafka prefix"));

    let (alice, _alice_events) = Client::connect(cluster.config(0, "alice", false)).await.expect("alice connects");
    let (bob, _bob_events) = Client::connect(cluster.config(1, "bob", false)).await.expect("bob connects");
    alice.close().await;
    let alice_records = presence_of(&bootstrap, &topic, "alice", &["online", "offline"]).await;
    let bob_records = presence_of(&bootstrap, &topic, "bob", &["online"]).await;
    for (key, user, _, instance) in alice_records.iter().chain(&bob_records) {
        assert_eq!(key, user, "keyed by user");
        assert!(instance.starts_with("gw-"), "the gateway instance that saw it: {instance}");
    }
    assert_ne!(alice_records[0].3, bob_records[0].3, "alice and bob were seen by different gateways");

    // Carol comes online, then the router goes away and she leaves meanwhile (presence itself is in Redis). Her
    // change waits in the gateway's journal and is recorded once the router is back, after her earlier one.
    let (carol, _carol_events) = Client::connect(cluster.config(0, "carol", false)).await.expect("carol connects");
    presence_of(&bootstrap, &topic, "carol", &["online"]).await;
    cluster.kill_router().await;
    carol.close().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let failures = metric(cluster.gateways[0].admin, "parley_gateway_presence_journal_failures_total").await;
    cluster.restart_router().await;
    presence_of(&bootstrap, &topic, "carol", &["online", "offline"]).await;
    let recorded = metric(cluster.gateways[0].admin, "parley_gateway_presence_journal_records_total").await;
    let dropped = metric(cluster.gateways[0].admin, "parley_gateway_presence_journal_dropped_total").await;
    report(&format!(
        "presence journal: alice online→offline and bob online recorded by two gateways; carol's offline change \
         made while the router was down recorded after {failures} failed attempts; gateway 0 recorded \
         {recorded}, dropped {dropped}"
    ));
    assert!(failures > 0, "the journal met the dead router and kept the change");
    assert_eq!(dropped, 0);
    assert_eq!(recorded, 4, "alice online and offline, carol online and offline (each once)");
    bob.close().await;
}
