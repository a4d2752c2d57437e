//! Two gateway processes and a router process (the distributed layout), sharing a real Redis for delivery and
//! presence. Clients use the workspace's client library (`parley-client`), which resumes on the other gateway.
//!
//! - `kill_9_one_gateway_mid_stream`: `kill -9` one gateway while two senders stream into a channel; every
//!   client ends up with exactly the stored history (zero loss, zero duplicates, same order).
//! - `drain_one_of_two_gateways_with_1000_clients_under_load_kafka_cassandra`: drain one gateway with 1,000 clients
//!   connected and a steady send load; every client reconnects to the other within the window, spread over it (the
//!   histograms are printed), and nothing is lost. (The drain is the gateways' own; the routers' storage only
//!   carries the load, so one backend is enough. `e2e/tests/region.rs` drains the operator's gateways the same way.)
//! - `an_offline_member_gets_a_push_from_the_router_kafka_cassandra`: the router sends the pushes of the distributed
//!   layout (devices and mutes in Cassandra) to a stand-in APNs endpoint: offline members get them, online and
//!   muted ones do not.
//!
//! The tests of this file run one at a time (each starts its own processes and loads the machine), so that the
//! figures they print describe one cluster.
//!
//! Needs `PARLEY_REDIS_URL` (`e2e/stack/up.sh --only redis <dir>`, then source `<dir>/stack.env`) and the
//! `parley` and `parley-router` binaries (`cargo build --workspace`). Without Redis a plain `cargo test` skips
//! them and the full test command fails them (`parley_test_support::engines`). Every process binds port 0 and
//! reports the address it got.

use parley_client::{Client, ClientConfig, Event, Status};
use parley_e2e::observe::{stored_at_least, wait_presence};
use parley_test_support::{binary, engine, report, Engine, Spawned};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::mpsc;

/// One test of this file at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "cluster-test-secret-0123456789abcdef";
const ADMIN_TOKEN: &str = "cluster-admin-token";

fn redis_url() -> Option<String> {
    engine(Engine::Redis)
}

/// Redis Cluster seed nodes (comma-separated), as `--redis-url` takes them.
fn redis_cluster_urls() -> Option<String> {
    engine(Engine::RedisCluster)
}

fn token(user: &str) -> String {
    parley_test_support::hs256_token(SECRET, user, Duration::from_secs(3600))
}

/// A child process and the addresses it printed.
struct Process {
    child: Child,
    address: SocketAddr,
    admin: SocketAddr,
}

/// Starts `program` (its ports at 0) and reads back the addresses it bound.
async fn spawn(program: PathBuf, args: &[String]) -> Process {
    let spawned = Spawned::server(program, args).await;
    Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] }
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
    let kafka = engine(Engine::Kafka)?;
    let cassandra = engine(Engine::Cassandra)?;
    let unique = parley_test_support::unique("").replace('-', "_");
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
        let prefix = parley_test_support::unique("parley-cluster-test:") + ":";
        let mut router_args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
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
        // A restart comes back on the port the router bound, where the gateways look for it.
        if let Some(at) = router_args.iter().position(|arg| arg == "--listen") {
            router_args[at + 1] = router.address.to_string();
        }
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

    /// SIGKILLs the router, then starts it again with the same port and data after `down_for`.
    async fn kill_and_restart_router(&mut self, down_for: Duration) {
        self.kill_router().await;
        // The outage's length: a deliberate time with no router, not a wait for something.
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
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `seen` holds at least `count` messages (its channels' senders are that far into their streams), at
/// most 60 s.
async fn received_at_least(seen: &Arc<Mutex<Seen>>, count: usize) {
    let what = format!("a client to receive {count} messages");
    parley_test_support::eventually(&what, Duration::from_secs(60), || {
        let received = seen.lock().expect("seen").messages.len();
        async move { (received >= count).then_some(()) }
    })
    .await;
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
                // Pacing: a stream over seconds, so that the kill lands in its middle.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (client, receipts)
        })
    };
    let first = stream(s0, "s0");
    let second = stream(s1, "s1");

    // Mid-stream (60 of the 300 messages through, so 240 to go): SIGKILL gateway 0 (no drain, no goodbye).
    received_at_least(&s0_seen, 60).await;
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
async fn drain_one_of_two_gateways_with_1000_clients_under_load_kafka_cassandra() {
    drain_one_of_two_gateways_with_1000_clients_under_load(Backend::KafkaCassandra).await;
}

async fn drain_one_of_two_gateways_with_1000_clients_under_load(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 2, backend).await else { return };
    const CLIENTS: usize = 1_000;
    const CHANNELS: usize = 10;
    const WINDOW_MS: u64 = 16_000;
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

    // Steady load: every sender sends one message every 250 ms (40 msg/s in all, 4,000 deliveries/s), from before
    // the drain to 1 s past the end of its window.
    let drain_at: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let load_ends = Duration::from_millis(WINDOW_MS + 1_000);
    let mut load = Vec::new();
    for (c, (client, _, channel)) in senders.iter().enumerate() {
        let client = client.clone();
        let channel = channel.clone();
        let drain_at = drain_at.clone();
        load.push(tokio::spawn(async move {
            let mut sent = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while drain_at.get().is_none_or(|at| at.elapsed() < load_ends) {
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

    // The drain starts once the load flows: every sender has received 8 of its own messages (2 s of load).
    for (_, seen, _) in &senders {
        received_at_least(seen, 8).await;
    }
    let drain_started = Instant::now();
    drain_at.set(drain_started).expect("the drain starts once");
    let body = format!(r#"{{"window_ms":{WINDOW_MS},"deadline_ms":60000}}"#);
    let admin = cluster.gateways[0].admin;
    let response = parley_test_support::http::request(admin, "POST", "/admin/drain", Some(ADMIN_TOKEN), &body).await;
    assert_eq!(response.status, 202, "drain accepted: {response:?}");

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
                            // The retry interval while the router is down (the loop ends at a confirmation).
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                // Pacing: a stream over seconds, so that the kill lands in its middle.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (client, seqs)
        }));
    }
    // Mid-stream (40 of the 200 messages through): kill the router, for 500 ms.
    received_at_least(&seen[0].0, 40).await;
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

/// A counter from a process's `/metrics`.
async fn metric(address: SocketAddr, name: &str) -> u64 {
    parley_test_support::metric(address, name).await as u64
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

    // The membership changes come at points of the stream: j0 and j1 join after 30 messages (7 members: fanned
    // out on read), j1 leaves after 70 (6: pushed) and joins again after 110 (7). The sender streams on meanwhile,
    // but holds at 40, 80 and 120 until the change before is made, so that every phase has messages however
    // loaded the machine.
    let (progress, mut sent) = tokio::sync::watch::channel(0usize);
    let (allow, allowed) = tokio::sync::watch::channel(40usize);
    let sender = {
        let owner = owner.clone();
        let channel = channel.clone();
        let mut allowed = allowed;
        tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(MESSAGES);
            for n in 0..MESSAGES {
                allowed.wait_for(|limit| n < *limit).await.expect("the test holds the limit");
                let receipt = owner
                    .send_with_id(channel.clone(), format!("x-{n}"), format!("crossing {n}"))
                    .await
                    .unwrap_or_else(|error| panic!("send {n} failed: {error}"));
                seqs.push(receipt.seq);
                let _ = progress.send(n + 1);
                // Pacing: a stream, not a burst.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seqs
        })
    };
    let mut reached = async |count: usize| {
        let waited = tokio::time::timeout(Duration::from_secs(60), sent.wait_for(|sent| *sent >= count)).await;
        let reached = waited.is_ok_and(|sent| sent.is_ok());
        assert!(reached, "the sender did not reach {count} messages");
    };
    reached(30).await;
    j0.join(channel.clone()).await.expect("j0 joins");
    j1.join(channel.clone()).await.expect("j1 joins: 7 members, above the threshold");
    allow.send_replace(80);
    reached(70).await;
    j1.leave(channel.clone()).await.expect("j1 leaves: 6, pushed again");
    allow.send_replace(120);
    reached(110).await;
    j1.join(channel.clone()).await.expect("j1 joins again: 7");
    allow.send_replace(MESSAGES);
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
    use rdkafka::{Offset, TopicPartitionList};
    // The router's settings for this broker: TLS and SASL as the environment (stack.env) says.
    let consumer: BaseConsumer = parley_test_support::kafka_config(bootstrap)
        .client_config()
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
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Presence changes seen by the gateway processes reach `{prefix}presence` on Kafka through the router, keyed by
/// user and in order; a change made while the router is down (kill -9) is recorded once it is back. A watcher on
/// the other gateway hears each change of a user connected to the first (the users' presence topics on Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_reach_the_kafka_presence_topic_even_across_a_router_restart() {
    let _serial = SERIAL.lock().await;
    let Some(redis_url) = redis_url() else { return };
    let Some(mut cluster) = Cluster::start(&redis_url, 2, Backend::KafkaCassandra).await else { return };
    let bootstrap = std::env::var("PARLEY_KAFKA_BOOTSTRAP").expect("set for the Kafka + Cassandra backend");
    let topic = format!("{}presence", cluster.kafka_prefix().expect("a Kafka prefix"));

    // dave (gateway 1) watches alice and carol, who connect to gateway 0.
    let (dave, dave_events) = Client::connect(cluster.config(1, "dave", false)).await.expect("dave connects");
    let dave_seen = parley_e2e::observe::record(dave_events);
    let now = dave.watch_presence(["alice", "carol"]).await.expect("dave watches");
    assert!(now.iter().all(|view| view.status == Status::Offline), "nobody is connected yet: {now:?}");
    let (alice, _alice_events) = Client::connect(cluster.config(0, "alice", false)).await.expect("alice connects");
    let (bob, _bob_events) = Client::connect(cluster.config(1, "bob", false)).await.expect("bob connects");
    let within = Duration::from_secs(10);
    let heard = wait_presence(&dave_seen, "alice", Status::Online, 0, within).await;
    assert_eq!(alice.set_away(true).await.expect("alice is away").status, Status::Away);
    let heard = wait_presence(&dave_seen, "alice", Status::Away, heard, within).await;
    alice.close().await;
    wait_presence(&dave_seen, "alice", Status::Offline, heard, within).await;
    let alice_records = presence_of(&bootstrap, &topic, "alice", &["online", "away", "offline"]).await;
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
    wait_presence(&dave_seen, "carol", Status::Online, 0, within).await;
    cluster.kill_router().await;
    carol.close().await;
    let admin = cluster.gateways[0].admin;
    let failures =
        parley_test_support::eventually("the journal to meet the dead router", Duration::from_secs(60), || async {
            let failures = metric(admin, "parley_gateway_presence_journal_failures_total").await;
            (failures > 0).then_some(failures)
        })
        .await;
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
    assert_eq!(recorded, 5, "alice online, away and offline, carol online and offline (each once)");
    bob.close().await;
    dave.close().await;
}

/// The distributed layout's pushes: a router on Kafka and Cassandra, with APNs credentials and a stand-in APNs
/// endpoint, and a gateway. Devices and a mute are registered through the gateway (kept in Cassandra by the
/// router); of a channel's members, offline bob gets a push for each message, online carol none, and offline dave,
/// who muted the channel, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_gets_a_push_from_the_router_kafka_cassandra() {
    use parley_test_support::apns::ApnsStub;
    let Some(redis_url) = redis_url() else { return };
    let _serial = SERIAL.lock().await;
    let apns = ApnsStub::start().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let flags = apns.flags(keys.path());
    let apns_args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let Some(cluster) = Cluster::start_with(&redis_url, 1, Backend::KafkaCassandra, &apns_args).await else {
        return;
    };
    let gateway = cluster.gateways[0].address;
    let http = |method: &'static str, path: &'static str, user: &'static str, body: String| async move {
        parley_test_support::http::request(gateway, method, path, Some(&token(user)), &body).await.status
    };
    let device = |token: &str| format!(r#"{{"platform":"apns","token":"{token}"}}"#);
    let (bob_token, dave_token) = ("b0b0".repeat(16), "dddd".repeat(16));
    assert_eq!(http("POST", "/v1/devices", "bob", device(&bob_token)).await, 201);
    assert_eq!(http("POST", "/v1/devices", "dave", device(&dave_token)).await, 201);
    assert_eq!(http("POST", "/v1/devices", "carol", device("c0c0")).await, 201);
    assert_eq!(http("POST", "/v1/devices", "bob", r#"{"platform":"pager","token":"x"}"#.into()).await, 400);

    let (alice, _alice_events) = Client::connect(cluster.config(0, "alice", false)).await.expect("alice connects");
    let (carol, _carol_events) = Client::connect(cluster.config(0, "carol", false)).await.expect("carol connects");
    // Carol counts as online from her `ready` on: the gateway writes her presence before it sends it.
    alice.create_channel("push", vec!["bob", "carol", "dave"]).await.expect("channel created");
    assert_eq!(http("PUT", "/v1/channels/g:push/mute", "dave", String::new()).await, 200);
    assert_eq!(http("PUT", "/v1/channels/g:push/mute", "mallory", String::new()).await, 403, "not a member");
    alice.send("g:push", "standup in 5").await.expect("sent");
    // One worker pushes the messages in order: once the marker's push to bob came, every earlier push came too.
    alice.send("g:push", "marker").await.expect("sent");
    let pushes = parley_test_support::eventually("bob's push for the marker", Duration::from_secs(30), || {
        let pushes = apns.pushes();
        async move { pushes.iter().any(|push| push.body["aps"]["alert"]["body"] == "marker").then_some(pushes) }
    })
    .await;
    let bob = format!("/3/device/{bob_token}");
    let to: Vec<&str> = pushes.iter().map(|push| push.path.as_str()).collect();
    assert_eq!(to, [bob.as_str(), bob.as_str()], "only offline bob, not online carol or muted dave: {pushes:?}");
    assert_eq!(pushes[0].body["aps"]["alert"]["body"], "standup in 5");
    assert_eq!(pushes[0].body["conversation_id"], "g:push");
    assert_eq!(metric(cluster.router.admin, "parley_router_push_sent_total").await, 2);
    assert_eq!(metric(cluster.router.admin, "parley_router_push_muted_total").await, 2, "dave, twice");
    carol.close().await;
    alice.close().await;
}
