//! Two regions on loopback, each with its own Kafka, Redis, router and gateway, one Cassandra cluster with a
//! datacenter per region, and MirrorMaker 2 carrying each region's topics to the other (the real engines of
//! `e2e/stack/up.sh --region2`).
//!
//! - `users_of_two_regions_share_channels_and_dms`: users homed in each region chat in a group channel homed in
//!   one region and in a DM homed in the other; every client sees one identical, gap-free order, equal to the
//!   stored history, and the history read through either region is the same.
//! - `clients_of_a_region_whose_gateways_die_resume_in_the_other`: every gateway of a region dies; its clients
//!   reconnect to the other region's gateway, resume gap-free and keep chatting.
//!
//! Needs the first region's engines (`PARLEY_REDIS_URL`, `PARLEY_KAFKA_BOOTSTRAP`, `PARLEY_CASSANDRA_CONTACT`)
//! and the second's (`PARLEY_KAFKA_B_BOOTSTRAP`, `PARLEY_REDIS_B_URL`, `PARLEY_CASSANDRA_CONTACT_DC2`,
//! `PARLEY_MM2_RUN`, `PARLEY_KAFKA_CLIENT_PROPERTIES`, `PARLEY_CQL`).

use parley_client::{Client, ClientConfig, Event, HistoryQuery};
use parley_test_support::{binary, engine, report, Engine, Spawned};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::mpsc;

/// One test of this file at a time: each starts two regions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "global-test-secret-0123456789abcdef";
const PEER_TOKEN: &str = "global-peer-token";

fn token(user: &str) -> String {
    parley_test_support::hs256_token(SECRET, user, Duration::from_secs(3600))
}

/// The engines of the two regions, or `None` (skipped) without them.
struct Engines {
    redis: [String; 2],
    kafka: [String; 2],
    cassandra: [String; 2],
    mm2_run: PathBuf,
    client_properties: PathBuf,
    cql: PathBuf,
}

fn variable(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("the second region's engines are up but {name} is not set"))
}

fn engines() -> Option<Engines> {
    let redis_a = engine(Engine::Redis)?;
    let kafka_a = engine(Engine::Kafka)?;
    let cassandra_a = engine(Engine::Cassandra)?;
    let kafka_b = engine(Engine::SecondRegion)?;
    Some(Engines {
        redis: [redis_a, variable("PARLEY_REDIS_B_URL")],
        kafka: [kafka_a, kafka_b],
        cassandra: [cassandra_a, variable("PARLEY_CASSANDRA_CONTACT_DC2")],
        mm2_run: variable("PARLEY_MM2_RUN").into(),
        client_properties: variable("PARLEY_KAFKA_CLIENT_PROPERTIES").into(),
        cql: variable("PARLEY_CQL").into(),
    })
}

/// The regions: name, Cassandra datacenter.
const REGIONS: [(&str, &str); 2] = [("eu", "dc1"), ("us", "dc2")];

/// The stack's `cql` tool, at the first datacenter's node.
fn cql(engines: &Engines) -> std::process::Command {
    let (host, port) = engines.cassandra[0].rsplit_once(':').expect("PARLEY_CASSANDRA_CONTACT is host:port");
    let mut command = std::process::Command::new(&engines.cql);
    command.args(["-h", host, "-p", port]);
    command
}

/// A free loopback port (the peer URLs must be known before the routers start).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// `mm2.properties` for MirrorMaker 2 between the two regions: the exact topics each way, `read_committed` sources.
fn mm2_properties(engines: &Engines, prefix: &str) -> String {
    let client = std::fs::read_to_string(&engines.client_properties).expect("the stack's Kafka client properties");
    let mut text = String::from("clusters=eu,us\n");
    for (index, (region, _)) in REGIONS.iter().enumerate() {
        text.push_str(&format!("{region}.bootstrap.servers={}\n", engines.kafka[index]));
        for line in client.lines().filter(|line| !line.trim().is_empty() && !line.starts_with('#')) {
            text.push_str(&format!("{region}.{line}\n"));
        }
        text.push_str(&format!("{region}.consumer.isolation.level=read_committed\n"));
    }
    for (source, target) in [("eu", "us"), ("us", "eu")] {
        text.push_str(&format!(
            "{source}->{target}.enabled=true\n{source}->{target}.topics={prefix}messages,{prefix}memberships\n"
        ));
    }
    text.push_str(
        "replication.factor=1\ncheckpoints.topic.replication.factor=1\nheartbeats.topic.replication.factor=1\n\
         offset-syncs.topic.replication.factor=1\noffset.storage.replication.factor=1\n\
         status.storage.replication.factor=1\nconfig.storage.replication.factor=1\n\
         refresh.topics.interval.seconds=5\nsync.topic.configs.enabled=false\nsync.topic.acls.enabled=false\n\
         emit.checkpoints.enabled=false\nsync.group.offsets.enabled=false\ntasks.max=1\n",
    );
    text
}

/// A child process and its addresses.
struct Process {
    child: Child,
    address: SocketAddr,
}

/// Two regions and the MirrorMaker 2 between them.
struct World {
    dir: tempfile::TempDir,
    routers: Vec<Process>,
    gateways: Vec<Process>,
    mm2: Child,
    keyspace: String,
    cql: std::process::Command,
}

impl World {
    async fn start(engines: &Engines) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let unique = parley_test_support::unique("").replace('-', "_");
        let prefix = format!("pgl-{unique}-");
        let keyspace = format!("parley_gl_{unique}");
        // The keyspace spans both datacenters (the operator derives this map from the Regions).
        let created = cql(engines)
            .arg(format!(
                "CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'NetworkTopologyStrategy', 'dc1': 1, 'dc2': 1}}"
            ))
            .status()
            .expect("run the stack's cql");
        assert!(created.success(), "creating keyspace {keyspace} failed");
        let ports = [free_port(), free_port()];
        let mut routers = Vec::new();
        for (index, (region, datacenter)) in REGIONS.iter().enumerate() {
            let other = 1 - index;
            let args: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{}", ports[index]),
                "--admin-listen".into(),
                "127.0.0.1:0".into(),
                "--redis-url".into(),
                engines.redis[index].clone(),
                "--redis-prefix".into(),
                format!("pgl-{unique}:"),
                "--internal-token".into(),
                format!("internal-{region}"),
                "--data-dir".into(),
                dir.path().join(format!("router-{region}")).display().to_string(),
                "--kafka-bootstrap-servers".into(),
                engines.kafka[index].clone(),
                "--kafka-topic-prefix".into(),
                prefix.clone(),
                "--kafka-partitions".into(),
                "4".into(),
                "--cassandra-contact-points".into(),
                engines.cassandra[index].clone(),
                "--cassandra-local-datacenter".into(),
                (*datacenter).into(),
                "--cassandra-keyspace".into(),
                keyspace.clone(),
                "--region".into(),
                (*region).into(),
                "--peer-routers".into(),
                format!("{}=http://127.0.0.1:{}", REGIONS[other].0, ports[other]),
                "--mirrored-regions".into(),
                REGIONS[other].0.into(),
                "--peer-token".into(),
                PEER_TOKEN.into(),
                "--machine-id".into(),
                (index + 1).to_string(),
            ];
            let spawned = Spawned::server(binary("parley-router"), &args).await;
            routers.push(Process { child: spawned.child, address: spawned.addresses[0] });
        }
        let mut gateways = Vec::new();
        for (index, (region, _)) in REGIONS.iter().enumerate() {
            let args: Vec<String> = vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--admin-listen".into(),
                "127.0.0.1:0".into(),
                "--router-url".into(),
                format!("http://{}", routers[index].address),
                "--internal-token".into(),
                format!("internal-{region}"),
                "--redis-url".into(),
                engines.redis[index].clone(),
                "--redis-prefix".into(),
                format!("pgl-{unique}:"),
                "--jwt-hs256-secret".into(),
                SECRET.into(),
                "--data-dir".into(),
                dir.path().join(format!("gateway-{region}")).display().to_string(),
                "--send-rate-per-sec".into(),
                "200".into(),
                "--send-burst".into(),
                "400".into(),
            ];
            let spawned = Spawned::server(binary("parley"), &args).await;
            gateways.push(Process { child: spawned.child, address: spawned.addresses[0] });
        }
        let properties = dir.path().join("mm2.properties");
        std::fs::write(&properties, mm2_properties(engines, &prefix)).expect("write mm2.properties");
        let log = std::fs::File::create(dir.path().join("mm2.log")).expect("mm2 log");
        let mm2 = tokio::process::Command::new(&engines.mm2_run)
            .arg(&properties)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start MirrorMaker 2");
        World { dir, routers, gateways, mm2, keyspace, cql: cql(engines) }
    }

    fn url(&self, region: usize) -> String {
        format!("ws://{}", self.gateways[region].address)
    }

    /// A client homed in `region` whose reconnects go to the other region's gateway when its own is gone.
    fn config(&self, region: usize, user: &str) -> ClientConfig {
        let mut config = ClientConfig::new(self.url(region), token(user));
        config.alternate_urls = vec![self.url(1 - region)];
        config.backoff.base = Duration::from_millis(100);
        config.backoff.cap = Duration::from_secs(1);
        config
    }

    /// The MirrorMaker 2 log, for a failure message.
    fn mm2_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("mm2.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn stop(mut self) {
        for process in self.gateways.iter_mut().chain(self.routers.iter_mut()) {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
        let _ = self.mm2.start_kill();
        let _ = self.mm2.wait().await;
        let _ = self.cql.arg(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace)).status();
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// (channel, seq, id) in arrival order.
    messages: Vec<(String, u64, u64)>,
    /// Channels it was told it is a member of.
    channels: Vec<String>,
    /// When each connection came up.
    connected: Vec<Instant>,
}

fn record(mut events: mpsc::Receiver<Event>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let mut seen = sink.lock().expect("seen");
            match event {
                Event::Message(message) => seen.messages.push((message.channel, message.seq, message.id)),
                Event::Channel(view) => seen.channels.push(view.id),
                Event::Connected { channels, .. } => {
                    seen.connected.push(Instant::now());
                    seen.channels.extend(channels.into_iter().map(|view| view.id));
                }
                Event::Closed { .. } => break,
                _ => {}
            }
        }
    });
    seen
}

/// The whole stored history of a channel as (seq, id), read through `client`'s region.
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

/// The history once it holds `expected` messages (the store trails the log), or what it holds after 60 s.
async fn stored_at_least(client: &Client, channel: &str, expected: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = stored(client, channel).await;
        if all.len() >= expected || Instant::now() > deadline {
            return all;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn received(seen: &Arc<Mutex<Seen>>, channel: &str) -> Vec<(u64, u64)> {
    seen.lock()
        .expect("seen")
        .messages
        .iter()
        .filter(|(c, _, _)| c == channel)
        .map(|(_, seq, id)| (*seq, *id))
        .collect()
}

/// Waits until every client of `clients` has `count` messages of `channel`, at most `within`.
async fn wait_received(clients: &[&Arc<Mutex<Seen>>], channel: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if clients.iter().all(|seen| received(seen, channel).len() >= count) {
            return;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `seen` was told it is a member of `channel` (a membership change that crossed the regions).
async fn wait_member(seen: &Arc<Mutex<Seen>>, channel: &str, world: &World) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if seen.lock().expect("seen").channels.iter().any(|known| known == channel) {
            return;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "a client of the other region never learned it is a member of {channel}; MirrorMaker 2:\n{}",
        world.mm2_log()
    );
}

/// Sends `count` messages from `client` to `channel`, paced, and returns their sequences.
fn stream(client: Client, name: String, channel: String, count: usize) -> tokio::task::JoinHandle<(Client, Vec<u64>)> {
    tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(count);
        for n in 0..count {
            let receipt = client
                .send_with_id(channel.clone(), format!("{name}-{n}"), format!("{name} says {n}"))
                .await
                .unwrap_or_else(|error| panic!("{name} send {n} to {channel} failed: {error}"));
            seqs.push(receipt.seq);
            // Pacing: the regions' senders interleave.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (client, seqs)
    })
}

fn check_one_order(channel: &str, clients: &[(&str, &Arc<Mutex<Seen>>)], history: &[(u64, u64)]) {
    assert_eq!(
        history.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "{channel}: the stored history is gap-free"
    );
    for (name, seen) in clients {
        assert_eq!(
            &received(seen, channel),
            history,
            "{name} in {channel}: what it was shown differs from the history"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_two_regions_share_channels_and_dms() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    let world = World::start(&engines).await;
    const PER_SENDER: usize = 40;
    // alice and carol are homed in eu (region 0), bob and dave in us (region 1).
    let users = [("alice", 0), ("carol", 0), ("bob", 1), ("dave", 1)];
    let mut clients = HashMap::new();
    for (user, region) in users {
        let (client, events) = Client::connect(world.config(region, user)).await.expect("connect");
        clients.insert(user, (client, record(events)));
    }
    let group = "g:world".to_owned();
    // A group homed in eu, with members of both regions.
    clients["alice"].0.create_channel("world", ["carol", "bob", "dave"]).await.expect("create the group in eu");
    for user in ["bob", "dave"] {
        wait_member(&clients[user].1, &group, &world).await;
    }
    // A DM homed in us, opened by bob with carol of eu.
    let dm = clients["bob"].0.open_dm("carol").await.expect("bob opens a DM in us").id;
    wait_member(&clients["carol"].1, &dm, &world).await;

    let started = Instant::now();
    let mut streams = Vec::new();
    for (user, _) in users {
        streams.push(stream(clients[user].0.clone(), user.to_owned(), group.clone(), PER_SENDER));
    }
    streams.push(stream(clients["bob"].0.clone(), "bob-dm".into(), dm.clone(), PER_SENDER));
    streams.push(stream(clients["carol"].0.clone(), "carol-dm".into(), dm.clone(), PER_SENDER));
    let mut confirmed = 0;
    for handle in streams {
        let (_, seqs) =
            tokio::time::timeout(Duration::from_secs(120), handle).await.expect("senders done").expect("sender");
        confirmed += seqs.len();
    }
    let sending = started.elapsed();

    let group_seen: Vec<(&str, &Arc<Mutex<Seen>>)> = users.iter().map(|(user, _)| (*user, &clients[user].1)).collect();
    let dm_seen = [("bob", &clients["bob"].1), ("carol", &clients["carol"].1)];
    let all: Vec<&Arc<Mutex<Seen>>> = group_seen.iter().map(|(_, seen)| *seen).collect();
    wait_received(&all, &group, 4 * PER_SENDER, Duration::from_secs(60)).await;
    wait_received(&[&clients["bob"].1, &clients["carol"].1], &dm, 2 * PER_SENDER, Duration::from_secs(60)).await;

    // The history read through each region (carried to the channel's home) is the same.
    let group_history = stored_at_least(&clients["alice"].0, &group, 4 * PER_SENDER).await;
    assert_eq!(stored_at_least(&clients["dave"].0, &group, 4 * PER_SENDER).await, group_history);
    let dm_history = stored_at_least(&clients["carol"].0, &dm, 2 * PER_SENDER).await;
    assert_eq!(stored_at_least(&clients["bob"].0, &dm, 2 * PER_SENDER).await, dm_history);
    assert_eq!(group_history.len(), 4 * PER_SENDER, "every confirmed group message is stored once");
    assert_eq!(dm_history.len(), 2 * PER_SENDER, "every confirmed DM message is stored once");
    check_one_order(&group, &group_seen, &group_history);
    check_one_order(&dm, &dm_seen, &dm_history);
    report(&format!(
        "two regions: {confirmed} sends confirmed in {sending:?} (half of them carried to the other region); \
         {} messages shown, each client in one identical order; 0 lost, 0 duplicated",
        4 * 4 * PER_SENDER + 2 * 2 * PER_SENDER
    ));
    for (client, _) in clients.values() {
        client.close().await;
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_region_whose_gateways_die_resume_in_the_other() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    let mut world = World::start(&engines).await;
    const BEFORE: usize = 30;
    const AFTER: usize = 30;
    let (erin, erin_events) = Client::connect(world.config(0, "erin")).await.expect("erin connects to eu");
    let (fred, fred_events) = Client::connect(world.config(1, "fred")).await.expect("fred connects to us");
    let (erin_seen, fred_seen) = (record(erin_events), record(fred_events));
    let channel = "g:resume".to_owned();
    erin.create_channel("resume", ["fred"]).await.expect("erin creates a channel in eu");
    wait_member(&fred_seen, &channel, &world).await;
    let (fred, _) = stream(fred.clone(), "fred".into(), channel.clone(), BEFORE).await.expect("fred streams");
    wait_received(&[&erin_seen], &channel, BEFORE, Duration::from_secs(30)).await;

    // Every gateway of eu dies (kill -9). fred (us) keeps sending meanwhile; erin reconnects to us.
    let killed_at = Instant::now();
    world.gateways[0].child.start_kill().expect("kill -9 the eu gateway");
    let _ = world.gateways[0].child.wait().await;
    let during = stream(fred.clone(), "fred-during".into(), channel.clone(), AFTER);
    let (_, _) = tokio::time::timeout(Duration::from_secs(120), during).await.expect("fred done").expect("fred");
    // erin, now on the us gateway, keeps chatting in the channel homed in eu.
    let (erin, _) = stream(erin.clone(), "erin-after".into(), channel.clone(), AFTER).await.expect("erin streams");
    let total = BEFORE + 2 * AFTER;
    wait_received(&[&erin_seen, &fred_seen], &channel, total, Duration::from_secs(60)).await;
    let history = stored_at_least(&fred, &channel, total).await;
    assert_eq!(history.len(), total, "every confirmed message is stored once");
    check_one_order(&channel, &[("erin", &erin_seen), ("fred", &fred_seen)], &history);
    let resumed = erin_seen
        .lock()
        .expect("seen")
        .connected
        .iter()
        .find(|at| **at > killed_at)
        .map(|at| at.duration_since(killed_at));
    let resumed = resumed.expect("erin reconnected to the other region's gateway");
    report(&format!(
        "cross-region resume: the eu gateway was killed; its client resumed on the us gateway after {resumed:?}, \
         gap-free ({total} messages, one order on both clients)"
    ));
    erin.close().await;
    fred.close().await;
    world.stop().await;
}
