//! Two regions on loopback for the multi-region tests and the cross-region bench: each region has its own Kafka,
//! Redis, router and gateway; one Cassandra cluster has a datacenter per region; MirrorMaker 2 carries each
//! region's topics to the other. The engines come from `e2e/stack/up.sh --region2`.
//!
//! [`World::start_with`] can put a WAN between the regions ([`Wan`], from `up.sh --region2 --kafka-wan`): every
//! router reaches the other region's routers through a Toxiproxy proxy, and one MirrorMaker 2 per target region
//! (as deployed in production: in the target region) reads its source Kafka through that Kafka's WAN proxy and
//! writes its own Kafka directly. Latency toxics on those proxies (each direction) make the WAN. Cassandra's
//! inter-datacenter traffic stays direct: it is not on the delivery path.

use parley_client::ClientConfig;
use parley_test_support::{binary, engine, Engine, Spawned};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Child;

/// The gateways' JWT secret.
pub const SECRET: &str = "global-test-secret-0123456789abcdef";
/// The gateways' server API key (`--server-api-key`).
pub const ADMIN_TOKEN: &str = "global-admin-token";
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

/// A WAN between the two regions, through the stack's Toxiproxy (`up.sh --kafka-wan`).
#[derive(Debug, Clone)]
pub struct Wan {
    /// Toxiproxy's API (`PARLEY_TOXIPROXY_URL`).
    pub toxiproxy: String,
    /// Each region's Kafka as seen across the WAN: the bootstrap of its WAN listener's proxy
    /// (`PARLEY_KAFKA_WAN_BOOTSTRAP`, `PARLEY_KAFKA_B_WAN_BOOTSTRAP`).
    pub kafka: [String; 2],
    /// The names of those two proxies (`PARLEY_KAFKA_WAN_PROXY`, `PARLEY_KAFKA_B_WAN_PROXY`).
    pub kafka_proxies: [String; 2],
    /// The latency added in each direction (zero: the proxies without toxics).
    pub latency: Duration,
}

impl Wan {
    /// The stack's WAN proxies with `latency` each way, or `None` when the stack was started without `--kafka-wan`.
    pub fn from_env(latency: Duration) -> Option<Wan> {
        let read = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Some(Wan {
            toxiproxy: read("PARLEY_TOXIPROXY_URL")?,
            kafka: [read("PARLEY_KAFKA_WAN_BOOTSTRAP")?, read("PARLEY_KAFKA_B_WAN_BOOTSTRAP")?],
            kafka_proxies: [read("PARLEY_KAFKA_WAN_PROXY")?, read("PARLEY_KAFKA_B_WAN_PROXY")?],
            latency,
        })
    }
}

/// How [`World::start_with`] starts the regions.
#[derive(Debug, Clone, Default)]
pub struct WorldOptions {
    /// The directory holding `parley` and `parley-router` (default: the build directory of the running test).
    pub binaries: Option<PathBuf>,
    /// A WAN between the regions (default: none, everything direct on loopback).
    pub wan: Option<Wan>,
    /// The gateways' `--send-rate-per-sec` (default 200; the burst is twice it).
    pub send_rate_per_sec: Option<u32>,
    /// More arguments for each region's router (index as in [`REGIONS`]).
    pub router_args: [Vec<String>; 2],
}

/// One call to Toxiproxy's API (`base` is `http://host:port`); its status and body.
pub async fn toxiproxy(base: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let address: SocketAddr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|error| panic!("the Toxiproxy API {base:?} is not http://ip:port: {error}"));
    let response = parley_test_support::http::request(address, method, path, None, body).await;
    (response.status, response.json())
}

/// Sets `proxy`'s latency toxics (`wan-latency-upstream`, `wan-latency-downstream`) to `latency`; zero removes them.
pub async fn set_latency(base: &str, proxy: &str, latency: Duration) {
    for stream in ["upstream", "downstream"] {
        let name = format!("wan-latency-{stream}");
        let _ = toxiproxy(base, "DELETE", &format!("/proxies/{proxy}/toxics/{name}"), "").await;
        if latency.is_zero() {
            continue;
        }
        let toxic = serde_json::json!({
            "name": name, "type": "latency", "stream": stream, "toxicity": 1.0,
            "attributes": {"latency": latency.as_millis() as u64, "jitter": 0},
        });
        let (status, answer) = toxiproxy(base, "POST", &format!("/proxies/{proxy}/toxics"), &toxic.to_string()).await;
        assert!(status == 200, "adding the {stream} latency toxic to proxy {proxy} failed: {status} {answer}");
    }
}

/// Makes the Toxiproxy proxy `name` (on a free loopback port) in front of `upstream`; returns its address.
async fn make_proxy(base: &str, name: &str, upstream: SocketAddr) -> SocketAddr {
    let proxy = serde_json::json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream.to_string(),
        "enabled": true});
    let (status, answer) = toxiproxy(base, "POST", "/proxies", &proxy.to_string()).await;
    assert!(status == 201 || status == 200, "creating the Toxiproxy proxy {name} failed: {status} {answer}");
    answer["listen"]
        .as_str()
        .and_then(|listen| listen.parse().ok())
        .unwrap_or_else(|| panic!("Toxiproxy did not say where proxy {name} listens: {answer}"))
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
    let bootstraps = [engines.kafka[0].as_str(), engines.kafka[1].as_str()];
    mm2_properties_with(engines, prefix, bootstraps, &[("eu", "us"), ("us", "eu")])
}

/// `mm2.properties` with each region's Kafka at `bootstraps` (index as in [`REGIONS`]) and only the `flows`
/// (source, target) enabled.
pub fn mm2_properties_with(engines: &Engines, prefix: &str, bootstraps: [&str; 2], flows: &[(&str, &str)]) -> String {
    let client = std::fs::read_to_string(&engines.client_properties).expect("the stack's Kafka client properties");
    let mut text = String::from("clusters=eu,us\n");
    for (index, (region, _)) in REGIONS.iter().enumerate() {
        text.push_str(&format!("{region}.bootstrap.servers={}\n", bootstraps[index]));
        for line in client.lines().filter(|line| !line.trim().is_empty() && !line.starts_with('#')) {
            text.push_str(&format!("{region}.{line}\n"));
        }
        text.push_str(&format!("{region}.consumer.isolation.level=read_committed\n"));
    }
    for (source, target) in [("eu", "us"), ("us", "eu")] {
        if flows.contains(&(source, target)) {
            text.push_str(&format!(
                "{source}->{target}.enabled=true\n{source}->{target}.topics={prefix}messages,{prefix}memberships,{prefix}receipts,{prefix}presence,{prefix}beacons\n"
            ));
        } else {
            text.push_str(&format!("{source}->{target}.enabled=false\n"));
        }
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
    /// The MirrorMaker 2 processes: one for both directions, or with a WAN one per target region (index as in
    /// [`REGIONS`]).
    pub mm2: Vec<Child>,
    /// With a WAN: the address of each region's routers as the other region reaches them (a Toxiproxy proxy).
    pub peer_proxies: Vec<SocketAddr>,
    wan: Option<Wan>,
    proxies: Vec<String>,
    keyspace: String,
    cql: std::process::Command,
    /// How each router was started (its port is fixed: a restart comes back where the others look for it).
    router_args: Vec<Vec<String>>,
    router_program: PathBuf,
    /// How each MirrorMaker 2 was started: its name and target.
    mm2_runs: Vec<(String, Option<String>)>,
    mm2_run: PathBuf,
}

impl World {
    /// Starts both regions and MirrorMaker 2 between them.
    pub async fn start(engines: &Engines) -> World {
        World::start_with(engines, WorldOptions::default()).await
    }

    /// Starts both regions and MirrorMaker 2 between them, as `options` say; see the [module docs](self).
    pub async fn start_with(engines: &Engines, options: WorldOptions) -> World {
        let program = |name: &str| match &options.binaries {
            Some(dir) => dir.join(name),
            None => binary(name),
        };
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
        let mut router_args = Vec::new();
        // Each region's routers as the other region reaches them: directly, or through a proxy on the WAN.
        let mut peer_urls = ports.map(|port| format!("http://127.0.0.1:{port}"));
        let (mut peer_proxies, mut proxies) = (Vec::new(), Vec::new());
        if let Some(wan) = &options.wan {
            for (index, (region, _)) in REGIONS.iter().enumerate() {
                let name = format!("pgl-{unique}-routers-{region}");
                let upstream = SocketAddr::from(([127, 0, 0, 1], ports[index]));
                let address = make_proxy(&wan.toxiproxy, &name, upstream).await;
                set_latency(&wan.toxiproxy, &name, wan.latency).await;
                peer_urls[index] = format!("http://{address}");
                peer_proxies.push(address);
                proxies.push(name);
            }
            for proxy in &wan.kafka_proxies {
                set_latency(&wan.toxiproxy, proxy, wan.latency).await;
            }
        }
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
                format!("{}={}", REGIONS[other].0, peer_urls[other]),
                "--mirrored-regions".into(),
                REGIONS[other].0.into(),
                "--peer-token".into(),
                PEER_TOKEN.into(),
                "--machine-id".into(),
                (index + 1).to_string(),
            ];
            let args: Vec<String> = args.into_iter().chain(options.router_args[index].iter().cloned()).collect();
            let spawned = Spawned::server(program("parley-router"), &args).await;
            routers.push(Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] });
            router_args.push(args);
        }
        let mut gateways = Vec::new();
        let rate = options.send_rate_per_sec.unwrap_or(200);
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
                "--server-api-key".into(),
                ADMIN_TOKEN.into(),
                "--data-dir".into(),
                dir.path().join(format!("gateway-{region}")).display().to_string(),
                "--send-rate-per-sec".into(),
                rate.to_string(),
                "--send-burst".into(),
                (2 * rate).to_string(),
            ];
            let spawned = Spawned::server(program("parley"), &args).await;
            gateways.push(Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] });
        }
        let mut mm2 = Vec::new();
        let mut mm2_runs = Vec::new();
        match &options.wan {
            None => {
                let text = mm2_properties(engines, &prefix);
                mm2.push(start_mm2(engines, dir.path(), "mm2", &text, None));
                mm2_runs.push(("mm2".to_owned(), None));
            }
            Some(wan) => {
                // One MirrorMaker 2 per target region, in it: its source across the WAN, its target directly.
                for (target, (region, _)) in REGIONS.iter().enumerate() {
                    let source = 1 - target;
                    let mut bootstraps = [engines.kafka[0].as_str(), engines.kafka[1].as_str()];
                    bootstraps[source] = wan.kafka[source].as_str();
                    let text = mm2_properties_with(engines, &prefix, bootstraps, &[(REGIONS[source].0, region)]);
                    mm2.push(start_mm2(engines, dir.path(), &format!("mm2-{region}"), &text, Some(region)));
                    mm2_runs.push((format!("mm2-{region}"), Some((*region).to_owned())));
                }
            }
        }
        World {
            dir,
            routers,
            gateways,
            mm2,
            peer_proxies,
            wan: options.wan,
            proxies,
            keyspace,
            cql: cql(engines),
            router_args,
            router_program: program("parley-router"),
            mm2_runs,
            mm2_run: engines.mm2_run.clone(),
        }
    }

    /// Kills `region`'s router (`kill -9`).
    pub async fn kill_router(&mut self, region: usize) {
        let _ = self.routers[region].child.start_kill();
        let _ = self.routers[region].child.wait().await;
    }

    /// Starts `region`'s router again, with the same arguments, port and data.
    pub async fn restart_router(&mut self, region: usize) {
        self.kill_router(region).await;
        let spawned = Spawned::server(self.router_program.clone(), &self.router_args[region]).await;
        self.routers[region] =
            Process { child: spawned.child, address: spawned.addresses[0], admin: spawned.addresses[1] };
    }

    /// Kills every MirrorMaker 2 (`kill -9`): nothing crosses the regions until [`World::restart_mm2`].
    pub async fn kill_mm2(&mut self) {
        for mm2 in &mut self.mm2 {
            let _ = mm2.start_kill();
            let _ = mm2.wait().await;
        }
    }

    /// Starts every MirrorMaker 2 again with its configuration (it resumes from its committed offsets).
    pub async fn restart_mm2(&mut self) {
        self.kill_mm2().await;
        self.mm2 = self
            .mm2_runs
            .iter()
            .map(|(name, target)| {
                let path = self.dir.path().join(format!("{name}.properties"));
                let log = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.dir.path().join(format!("{name}.log")))
                    .expect("MirrorMaker 2 log");
                let mut command = tokio::process::Command::new(&self.mm2_run);
                command.arg(&path);
                if let Some(target) = target {
                    command.args(["--clusters", target]);
                }
                command
                    .stdout(log.try_clone().expect("log"))
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap_or_else(|error| panic!("start MirrorMaker 2 ({name}) again: {error}"))
            })
            .collect();
    }

    /// The names of the Toxiproxy proxies in front of each region's routers (empty without a WAN).
    pub fn proxy_names(&self) -> Vec<String> {
        self.proxies.clone()
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

    /// The MirrorMaker 2 log (the end of each), for a failure message.
    pub fn mm2_log(&self) -> String {
        let mut logs = Vec::new();
        for name in ["mm2", "mm2-eu", "mm2-us"] {
            let Ok(text) = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))) else { continue };
            let lines: Vec<&str> = text.lines().collect();
            logs.push(format!("{name}:\n{}", lines[lines.len().saturating_sub(30)..].join("\n")));
        }
        logs.join("\n")
    }

    /// Stops every process and drops the keyspace.
    pub async fn stop(mut self) {
        for process in self.gateways.iter_mut().chain(self.routers.iter_mut()) {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
        for mm2 in &mut self.mm2 {
            let _ = mm2.start_kill();
            let _ = mm2.wait().await;
        }
        if let Some(wan) = &self.wan {
            for proxy in &self.proxies {
                let _ = toxiproxy(&wan.toxiproxy, "DELETE", &format!("/proxies/{proxy}"), "").await;
            }
            for proxy in &wan.kafka_proxies {
                set_latency(&wan.toxiproxy, proxy, Duration::ZERO).await;
            }
        }
        let _ = self.cql.arg(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace)).status();
    }
}

/// Starts MirrorMaker 2 with `properties` (for the `target` cluster alone, when given), logging to `<name>.log`.
fn start_mm2(engines: &Engines, dir: &Path, name: &str, properties: &str, target: Option<&str>) -> Child {
    let path = dir.join(format!("{name}.properties"));
    std::fs::write(&path, properties).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("MirrorMaker 2 log");
    let mut command = tokio::process::Command::new(&engines.mm2_run);
    command.arg(&path);
    if let Some(target) = target {
        command.args(["--clusters", target]);
    }
    command
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("start MirrorMaker 2 ({name}): {error}"))
}
