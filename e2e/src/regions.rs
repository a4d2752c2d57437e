//! Two regions on loopback for the multi-region tests and the cross-region bench: each region has its own Kafka,
//! Redis, router and gateway; one Cassandra cluster has a datacenter per region; MirrorMaker 2 carries each
//! region's topics to the other. The engines come from `e2e/stack/up.sh --region2`.

use parley_client::ClientConfig;
use parley_test_support::{binary, engine, Engine, Spawned};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Child;

/// The gateways' JWT secret.
pub const SECRET: &str = "global-test-secret-0123456789abcdef";
/// The routers' peer token.
pub const PEER_TOKEN: &str = "global-peer-token";

/// A token for `user`.
pub fn token(user: &str) -> String {
    parley_test_support::hs256_token(SECRET, user, Duration::from_secs(3600))
}

/// The engines of the two regions, or `None` (skipped) without them.
pub struct Engines {
    #[allow(missing_docs)]
    pub redis: [String; 2],
    #[allow(missing_docs)]
    pub kafka: [String; 2],
    #[allow(missing_docs)]
    pub cassandra: [String; 2],
    #[allow(missing_docs)]
    pub mm2_run: PathBuf,
    #[allow(missing_docs)]
    pub client_properties: PathBuf,
    #[allow(missing_docs)]
    pub cql: PathBuf,
}

fn variable(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("the second region's engines are up but {name} is not set"))
}

/// The engines of the environment, or `None` without them (a test then skips; the full test command fails).
pub fn engines() -> Option<Engines> {
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
pub const REGIONS: [(&str, &str); 2] = [("eu", "dc1"), ("us", "dc2")];

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
pub fn mm2_properties(engines: &Engines, prefix: &str) -> String {
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
pub struct Process {
    /// The process.
    pub child: Child,
    /// Its client address.
    pub address: SocketAddr,
    /// Its admin (metrics) address.
    pub admin: SocketAddr,
}

/// Two regions and the MirrorMaker 2 between them.
pub struct World {
    dir: tempfile::TempDir,
    /// The routers, one per region (index as in [`REGIONS`]).
    pub routers: Vec<Process>,
    /// The gateways, one per region.
    pub gateways: Vec<Process>,
    mm2: Child,
    keyspace: String,
    cql: std::process::Command,
}

impl World {
    /// Starts both regions and MirrorMaker 2 between them.
    pub async fn start(engines: &Engines) -> World {
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
            routers.push(Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] });
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
            gateways.push(Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] });
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

    /// The WebSocket URL of `region`'s gateway.
    pub fn url(&self, region: usize) -> String {
        format!("ws://{}", self.gateways[region].address)
    }

    /// A client homed in `region` whose reconnects go to the other region's gateway when its own is gone.
    pub fn config(&self, region: usize, user: &str) -> ClientConfig {
        let mut config = ClientConfig::new(self.url(region), token(user));
        config.alternate_urls = vec![self.url(1 - region)];
        config.backoff.base = Duration::from_millis(100);
        config.backoff.cap = Duration::from_secs(1);
        config
    }

    /// The MirrorMaker 2 log, for a failure message.
    pub fn mm2_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("mm2.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops every process and drops the keyspace.
    pub async fn stop(mut self) {
        for process in self.gateways.iter_mut().chain(self.routers.iter_mut()) {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
        let _ = self.mm2.start_kill();
        let _ = self.mm2.wait().await;
        let _ = self.cql.arg(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace)).status();
    }
}
