//! The Parley processes of a chaos run: one router (Kafka + Cassandra) and its gateways, each a child process
//! whose stderr goes to a log file of the run. The first start binds port 0 and reads back the port; a restart
//! after a SIGKILL binds the same client port again (gateways: the clients know only those addresses; the router:
//! the gateways know its URL), retrying while the port is not free yet.

use parley_test_support::Spawned;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Child;

/// How long one start may take to report its addresses (a router on Kafka and Cassandra on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// One Parley process.
#[derive(Debug)]
pub struct Node {
    /// `router`, `gateway0`, ...
    pub name: String,
    program: PathBuf,
    /// Its arguments; `--listen` holds the bound address after the first start.
    args: Vec<String>,
    /// Its environment, beyond this process's own.
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// The client (or internal API) address.
    pub address: SocketAddr,
    /// The admin address of the current run of the process.
    pub admin: SocketAddr,
}

impl Node {
    /// Starts `program` with `args` (which bind `--listen 127.0.0.1:0`) and `env`, its stderr appended to `log`.
    pub async fn start(
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Result<Node, String> {
        let spawned = spawn(program, &args, &env, &log, START_TIMEOUT).await?;
        let mut node = Node {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            env,
            log,
            address: spawned.addresses[0],
            admin: spawned.addresses[1],
            child: Some(spawned.child),
        };
        if let Some(at) = node.args.iter().position(|arg| arg == "--listen") {
            node.args[at + 1] = node.address.to_string();
        }
        Ok(node)
    }

    /// SIGKILL, and waits for the exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same address, retrying for up to `within` while the port is not free.
    pub async fn restart(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
            match spawn(&self.program, &self.args, &self.env, &self.log, left.min(START_TIMEOUT)).await {
                Ok(spawned) => {
                    self.admin = spawned.addresses[1];
                    self.child = Some(spawned.child);
                    return Ok(());
                }
                Err(error) if Instant::now() < deadline => {
                    append(&self.log, &format!("chaos: {} did not start again ({error}); retrying", self.name));
                    // The retry interval of a bounded wait for the port.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => return Err(format!("{} could not be started again: {error}", self.name)),
            }
        }
    }

    /// Whether it is running (started and not exited).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

async fn spawn(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    within: Duration,
) -> Result<Spawned, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|error| format!("cannot open {}: {error}", log.display()))?;
    let env: Vec<(&str, &str)> = env.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
    Spawned::try_start(program, args, &env, "listening on http://", 2, Stdio::from(file), within).await
}

/// Adds a line of the run's own to a process log.
fn append(log: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{line}");
    }
}

/// Where the router and the gateways find the engines, and what they share.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `parley` (the gateway binary).
    pub parley: PathBuf,
    /// `parley-router`.
    pub router: PathBuf,
    /// Redis URL.
    pub redis_url: String,
    /// Kafka bootstrap servers.
    pub kafka_bootstrap: String,
    /// Cassandra contact points.
    pub cassandra_contact: String,
    /// This run's Redis prefix, Kafka topic prefix and Cassandra keyspace are made from it.
    pub unique: String,
    /// The HS256 secret of client tokens.
    pub secret: String,
    /// Where the processes keep data and logs.
    pub work_dir: PathBuf,
    /// Channels above this many members are fanned out on read.
    pub fanout_threshold: u32,
    /// The environment of every process (the engines' credentials and CA files, [`super::Stack::env`]).
    pub env: Vec<(String, String)>,
}

/// The router and gateways of a run.
#[derive(Debug)]
pub struct Cluster {
    /// The router.
    pub router: Node,
    /// The gateways.
    pub gateways: Vec<Node>,
}

const INTERNAL_TOKEN: &str = "chaos-internal-token";

impl Cluster {
    /// Starts the router, then `gateways` gateways.
    pub async fn start(settings: &Settings, gateways: usize) -> Result<Cluster, String> {
        let logs = settings.work_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|error| format!("cannot create {}: {error}", logs.display()))?;
        let prefix = format!("{}:", settings.unique);
        let threshold = settings.fanout_threshold.to_string();
        let keyspace = settings.unique.replace('-', "_");
        let router_args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--redis-url",
            &settings.redis_url,
            "--redis-prefix",
            &prefix,
            "--internal-token",
            INTERNAL_TOKEN,
            "--data-dir",
            &settings.work_dir.join("router").display().to_string(),
            "--fanout-threshold",
            &threshold,
            "--kafka-bootstrap-servers",
            &settings.kafka_bootstrap,
            "--kafka-topic-prefix",
            &format!("{}-", settings.unique),
            "--kafka-partitions",
            "4",
            "--cassandra-contact-points",
            &settings.cassandra_contact,
            "--cassandra-keyspace",
            &keyspace,
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        let router =
            Node::start("router", &settings.router, router_args, settings.env.clone(), logs.join("router.log")).await?;
        let mut started = Vec::new();
        for n in 0..gateways {
            let args: Vec<String> = [
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--router-url",
                &format!("http://{}", router.address),
                "--internal-token",
                INTERNAL_TOKEN,
                "--redis-url",
                &settings.redis_url,
                "--redis-prefix",
                &prefix,
                "--jwt-hs256-secret",
                &settings.secret,
                "--data-dir",
                &settings.work_dir.join(format!("gateway{n}")).display().to_string(),
                "--fanout-threshold",
                &threshold,
            ]
            .iter()
            .map(|arg| arg.to_string())
            .collect();
            let name = format!("gateway{n}");
            let log = logs.join(format!("{name}.log"));
            started.push(Node::start(&name, &settings.parley, args, settings.env.clone(), log).await?);
        }
        Ok(Cluster { router, gateways: started })
    }

    /// The gateways' WebSocket URLs, in order.
    pub fn urls(&self) -> Vec<String> {
        self.gateways.iter().map(|gateway| format!("ws://{}", gateway.address)).collect()
    }

    /// Kills every process (the end of the run).
    pub async fn stop(&mut self) {
        for gateway in &mut self.gateways {
            gateway.kill().await;
        }
        self.router.kill().await;
    }
}
