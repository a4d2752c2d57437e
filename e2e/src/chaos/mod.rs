//! A chaos run: the distributed layout on real engines under a bounded load, while components are killed and
//! started again at seeded moments, ending with the [history checker](crate::history) over every client's log.
//!
//! - [`plan`]: the seeded generator and the kill schedule (pure);
//! - [`engines`]: Redis and the Kafka broker of an `e2e/stack` state dir, stopped and started again through their
//!   pid files;
//! - [`cluster`]: the router (Kafka + Cassandra) and the gateways (Redis), as child processes restarted on their
//!   ports;
//! - [`load`]: the scenario (one large channel, small ones, DMs; senders; members that restart on their own) and
//!   the client applications, on `parley-client` with every gateway in `alternate_urls`.
//!
//! [`run`] goes through four phases: start (router, gateways, clients, channels); load with kills (every fault
//! chosen at least once, then random ones, each followed by a wait for recovery: a component that cannot be
//! started again, or a system that confirms nothing within [`Config::recovery`] after it is back, fails the run);
//! settle (senders finish their last message, the store catches up, every client catches up to the stored
//! history, all bounded); check. Everything it starts it stops; an engine it stopped is started again even when
//! the run fails.

pub mod cluster;
pub mod engines;
pub mod load;
pub mod plan;

use crate::history::{self, Input, Report};
use cluster::{Cluster, Settings};
use engines::{StackEngine, Stop};
use load::{Counters, Member, Phase, Scale};
use parley_client::ClientConfig;
use plan::{Fault, Kill, Pacing, Rng};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The engines of the run, read from the `stack.env` of `e2e/stack` state dirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    /// `PARLEY_REDIS_URL`.
    pub redis_url: String,
    /// The state dir holding `pids/redis.pid`.
    pub redis_state: PathBuf,
    /// `PARLEY_KAFKA_BOOTSTRAP`.
    pub kafka_bootstrap: String,
    /// The state dir holding `pids/kafka.pid`.
    pub kafka_state: PathBuf,
    /// `PARLEY_CASSANDRA_CONTACT`.
    pub cassandra_contact: String,
    /// What else the binaries need to reach the engines, from the same `stack.env` as the engine's address
    /// ([`Stack::SETTINGS`]): Redis's ACL user, password and TLS CA file; Kafka's CA file and SASL user; Cassandra's CA
    /// file and role. Given to the router and the gateways as their environment.
    pub env: Vec<(String, String)>,
}

impl Stack {
    /// The settings of an engine's `stack.env` that go with its address (variable of the address, then the
    /// variables the binaries read), all taken from the dir that names the address.
    pub const SETTINGS: &[(&str, &[&str])] = &[
        ("PARLEY_REDIS_URL", &["PARLEY_REDIS_USERNAME", "PARLEY_REDIS_PASSWORD", "PARLEY_REDIS_TLS_CA_FILE"]),
        (
            "PARLEY_KAFKA_BOOTSTRAP",
            &[
                "PARLEY_KAFKA_TLS",
                "PARLEY_KAFKA_TLS_CA_FILE",
                "PARLEY_KAFKA_SASL_MECHANISM",
                "PARLEY_KAFKA_SASL_USERNAME",
                "PARLEY_KAFKA_SASL_PASSWORD",
            ],
        ),
        (
            "PARLEY_CASSANDRA_CONTACT",
            &[
                "PARLEY_CASSANDRA_TLS",
                "PARLEY_CASSANDRA_TLS_CA_FILE",
                "PARLEY_CASSANDRA_USERNAME",
                "PARLEY_CASSANDRA_PASSWORD",
            ],
        ),
    ];

    /// Reads `stack.env` of each dir; each engine comes from the first dir that names it (one dir holding all
    /// three, or one dir per engine), with its [`Stack::SETTINGS`] from that same dir.
    pub fn from_dirs(dirs: &[PathBuf]) -> Result<Stack, String> {
        let mut found: HashMap<&str, (String, PathBuf)> = HashMap::new();
        let mut env = Vec::new();
        for dir in dirs {
            let path = dir.join("stack.env");
            let text =
                std::fs::read_to_string(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            let lines = parse_env(&text);
            for (key, value) in &lines {
                for wanted in ["PARLEY_REDIS_URL", "PARLEY_KAFKA_BOOTSTRAP", "PARLEY_CASSANDRA_CONTACT"] {
                    if key == wanted && !found.contains_key(wanted) {
                        found.insert(wanted, (value.clone(), dir.clone()));
                        let settings = Self::SETTINGS.iter().filter(|(address, _)| *address == wanted);
                        for name in settings.flat_map(|(_, names)| names.iter()) {
                            env.extend(lines.iter().filter(|(key, _)| key == name).cloned());
                        }
                    }
                }
            }
        }
        let mut take = |name: &str| {
            found
                .remove(name)
                .ok_or_else(|| format!("no stack.env of {dirs:?} sets {name} (start it with e2e/stack/up.sh)"))
        };
        let (redis_url, redis_state) = take("PARLEY_REDIS_URL")?;
        let (kafka_bootstrap, kafka_state) = take("PARLEY_KAFKA_BOOTSTRAP")?;
        let (cassandra_contact, _) = take("PARLEY_CASSANDRA_CONTACT")?;
        Ok(Stack { redis_url, redis_state, kafka_bootstrap, kafka_state, cassandra_contact, env })
    }
}

/// `KEY=VALUE` lines (no quoting, as `up.sh` writes them).
fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .map(|(key, value)| (key.trim().trim_start_matches("export ").to_owned(), value.trim().to_owned()))
        .collect()
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Planned length of the load; it goes on past it until every fault was applied once (and its recovery
    /// followed by [`Config::tail`]).
    pub seconds: u64,
    /// Seeds every choice (schedule, senders, restarting members, their timing).
    pub seed: u64,
    /// The `parley` binary.
    pub parley: PathBuf,
    /// The `parley-router` binary.
    pub router: PathBuf,
    /// The engines.
    pub stack: Stack,
    /// Logs and data of the run's processes.
    pub work_dir: PathBuf,
    /// The load.
    pub scale: Scale,
    /// The spacing of kills.
    pub pacing: Pacing,
    /// Which faults to apply.
    pub faults: Vec<Fault>,
    /// Gateways.
    pub gateways: usize,
    /// Load without kills after the last recovery, so every channel gets messages after it.
    pub tail: Duration,
    /// How long the system may take to confirm sends again after a component is back.
    pub recovery: Duration,
    /// Bound of each wait of the settle phase.
    pub settle: Duration,
    /// Channels above this many members are fanned out on read (the large channel is, by default).
    pub fanout_threshold: u32,
    /// Print progress lines on stderr.
    pub progress: bool,
}

impl Config {
    /// The full run's settings for `seconds`, `seed` and the engines of `stack`; binaries and work dir given.
    pub fn full(seconds: u64, seed: u64, parley: PathBuf, router: PathBuf, stack: Stack, work_dir: PathBuf) -> Self {
        Config {
            seconds,
            seed,
            parley,
            router,
            stack,
            work_dir,
            scale: Scale::full(),
            pacing: Pacing {
                min_wait: Duration::from_secs(4),
                max_wait: Duration::from_secs(15),
                max_down: Duration::from_secs(3),
            },
            faults: Fault::ALL.to_vec(),
            gateways: 2,
            tail: Duration::from_secs(10),
            recovery: Duration::from_secs(120),
            settle: Duration::from_secs(90),
            fanout_threshold: 100,
            progress: true,
        }
    }

    /// The smoke run of the test command: the smoke scale, each fault once with short waits, a short tail.
    pub fn smoke(seed: u64, parley: PathBuf, router: PathBuf, stack: Stack, work_dir: PathBuf) -> Self {
        Config {
            scale: Scale::smoke(),
            pacing: Pacing {
                min_wait: Duration::from_secs(1),
                max_wait: Duration::from_secs(3),
                max_down: Duration::from_secs(1),
            },
            tail: Duration::from_secs(6),
            fanout_threshold: 20,
            ..Config::full(10, seed, parley, router, stack, work_dir)
        }
    }
}

/// One kill and what followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillRecord {
    /// What was killed.
    pub fault: Fault,
    /// Which process or engine.
    pub target: String,
    /// When, from the start of the load.
    pub at: Duration,
    /// From the kill to the component answering again.
    pub back_after: Duration,
    /// From then to sends being confirmed and messages shown again (`None`: not within the bound).
    pub recovered_after: Option<Duration>,
    /// From then to the stored history holding every message confirmed when sends were confirmed again (`None`:
    /// not within the bound, or the store stopped moving).
    pub stored_after: Option<Duration>,
    /// Why it did not survive.
    pub error: Option<String>,
}

impl KillRecord {
    /// Restarted and recovered.
    pub fn survived(&self) -> bool {
        self.error.is_none() && self.recovered_after.is_some() && self.stored_after.is_some()
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// The planned load.
    pub seconds: u64,
    /// The load as run.
    pub load: Duration,
    /// The settle phase.
    pub settle: Duration,
    /// Start to end.
    pub total: Duration,
    /// Gateways.
    pub gateways: usize,
    /// Client applications.
    pub clients: usize,
    /// Channels, with their member counts.
    pub channels: Vec<(String, usize)>,
    /// Every kill.
    pub kills: Vec<KillRecord>,
    /// Sends started.
    pub attempts: u64,
    /// Sends confirmed.
    pub confirmed: u64,
    /// Confirmations answered `duplicate` (a retry of a send that was already durable).
    pub duplicates: u64,
    /// Sends refused and retried, by error.
    pub refusals: BTreeMap<String, u64>,
    /// Send attempts that timed out and were asked again.
    pub timeouts: u64,
    /// Restarts of members on their own.
    pub restarts: u64,
    /// Connections up, lost, and failed attempts.
    pub connections: (u64, u64, u64),
    /// The checker's report.
    pub report: Report,
    /// Why the run failed besides violations (a component not restarted, a setup step, a bound reached).
    pub failures: Vec<String>,
    /// Notes that do not fail the run (a wait that ran into its bound before the check).
    pub notes: Vec<String>,
    /// Where the logs are.
    pub work_dir: PathBuf,
}

impl Summary {
    /// No violation, and every component came back.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.report.is_clean() && self.kills.iter().all(KillRecord::survived)
    }

    /// Kills survived per fault: (survived, total).
    pub fn kills_by_fault(&self) -> BTreeMap<Fault, (usize, usize)> {
        let mut by_fault = BTreeMap::new();
        for kill in &self.kills {
            let entry: &mut (usize, usize) = by_fault.entry(kill.fault).or_default();
            entry.1 += 1;
            if kill.survived() {
                entry.0 += 1;
            }
        }
        by_fault
    }

    fn kills_line(&self) -> String {
        let by_fault = self.kills_by_fault();
        Fault::ALL
            .iter()
            .map(|fault| {
                let (survived, total) = by_fault.get(fault).copied().unwrap_or_default();
                format!("{} {survived}/{total}", fault.name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The summary for people, several lines.
    pub fn render(&self) -> String {
        let counts = &self.report.counts;
        let mut out = String::new();
        let _ = writeln!(out, "parley-chaos summary (seed {})", self.seed);
        let _ = writeln!(
            out,
            "  duration: load {:.1} s (planned {} s), settle {:.1} s, total {:.1} s",
            self.load.as_secs_f64(),
            self.seconds,
            self.settle.as_secs_f64(),
            self.total.as_secs_f64()
        );
        let channels: Vec<String> = self.channels.iter().map(|(id, members)| format!("{id} ({members})")).collect();
        let _ = writeln!(
            out,
            "  cluster: 1 router (Kafka + Cassandra), {} gateways (Redis); {} clients; channels: {}",
            self.gateways,
            self.clients,
            channels.join(", ")
        );
        let _ = writeln!(out, "  kills survived: {}", self.kills_line());
        for kill in &self.kills {
            let later = |after: Option<Duration>| {
                after.map_or_else(|| "never".to_owned(), |after| format!("{:.1} s later", after.as_secs_f64()))
            };
            let _ = writeln!(
                out,
                "    +{:>6.1} s {:<9} back after {:>5.1} s, sends confirmed again {}, history caught up {}{}",
                kill.at.as_secs_f64(),
                kill.target,
                kill.back_after.as_secs_f64(),
                later(kill.recovered_after),
                later(kill.stored_after),
                kill.error.as_ref().map(|error| format!(" — FAILED: {error}")).unwrap_or_default()
            );
        }
        let refusals: Vec<String> = self.refusals.iter().map(|(code, count)| format!("{code} {count}")).collect();
        let _ = writeln!(
            out,
            "  sends: {} started, {} confirmed ({} of them answered as duplicates of an earlier attempt), {} \
             unconfirmed at the end ({} of those stored anyway); refused and retried: {}; attempts timed out and \
             asked again: {}",
            self.attempts,
            self.confirmed,
            self.duplicates,
            counts.unconfirmed,
            counts.unconfirmed_stored,
            if refusals.is_empty() { "none".to_owned() } else { refusals.join(", ") },
            self.timeouts
        );
        let _ = writeln!(
            out,
            "  messages: {} stored in {} channels, {} shown to {} clients",
            counts.messages, counts.channels, counts.shown, counts.clients
        );
        let _ = writeln!(
            out,
            "  clients: {} restarts on their own; {} connections up, {} lost, {} failed attempts",
            self.restarts, self.connections.0, self.connections.1, self.connections.2
        );
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        let kinds: Vec<String> = self.report.by_kind().iter().map(|(kind, count)| format!("{kind} {count}")).collect();
        let _ = writeln!(
            out,
            "  violations: {}{}",
            self.report.violations.len(),
            if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
        );
        for violation in self.report.violations.iter().take(60) {
            let _ = writeln!(out, "    {violation}");
        }
        if self.report.violations.len() > 60 {
            let _ = writeln!(out, "    ... and {} more", self.report.violations.len() - 60);
        }
        for failure in &self.failures {
            let _ = writeln!(out, "  FAILURE: {failure}");
        }
        let _ = writeln!(out, "  logs: {}", self.work_dir.display());
        let _ = write!(out, "  result: {}", if self.passed() { "PASS" } else { "FAIL" });
        out
    }

    /// One line for `PARLEY_FIGURES_FILE`.
    pub fn figure_line(&self) -> String {
        let counts = &self.report.counts;
        format!(
            "chaos run (seed {}, load {:.0} s, total {:.0} s): kills survived {}; {} sends confirmed, {} stored, {} \
             shown to {} clients; {} restarts on their own; violations {}; {}",
            self.seed,
            self.load.as_secs_f64(),
            self.total.as_secs_f64(),
            self.kills_line(),
            self.confirmed,
            counts.messages,
            counts.shown,
            counts.clients,
            self.restarts,
            self.report.violations.len(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// Progress lines on stderr.
struct Progress {
    started: Instant,
    on: bool,
}

impl Progress {
    fn say(&self, line: &str) {
        if self.on {
            eprintln!("[chaos {:>6.1}s] {line}", self.started.elapsed().as_secs_f64());
        }
    }
}

/// The HS256 secret of the run's client tokens.
const SECRET: &str = "parley-chaos-secret-0123456789abcdef";

/// Runs the whole chaos run; failures end up in the summary, never in a panic.
pub async fn run(config: Config) -> Summary {
    let started = Instant::now();
    let progress = Progress { started, on: config.progress };
    let mut summary = Summary {
        seed: config.seed,
        seconds: config.seconds,
        gateways: config.gateways,
        work_dir: config.work_dir.clone(),
        ..Summary::default()
    };
    let wanted = |fault: Fault| config.faults.contains(&fault);
    let mut redis = None;
    let mut kafka = None;
    if wanted(Fault::Redis) {
        match StackEngine::open(&config.stack.redis_state, "redis", &config.stack.redis_url) {
            Ok(engine) => redis = Some(engine),
            Err(error) => summary.failures.push(error),
        }
    }
    if wanted(Fault::Kafka) {
        match StackEngine::open(&config.stack.kafka_state, "kafka", &config.stack.kafka_bootstrap) {
            Ok(engine) => kafka = Some(engine),
            Err(error) => summary.failures.push(error),
        }
    }
    if !summary.failures.is_empty() {
        summary.total = started.elapsed();
        return summary;
    }
    let settings = Settings {
        parley: config.parley.clone(),
        router: config.router.clone(),
        redis_url: config.stack.redis_url.clone(),
        kafka_bootstrap: config.stack.kafka_bootstrap.clone(),
        cassandra_contact: config.stack.cassandra_contact.clone(),
        unique: parley_test_support::unique("chaos-"),
        secret: SECRET.to_owned(),
        work_dir: config.work_dir.clone(),
        fanout_threshold: config.fanout_threshold,
        env: config.stack.env.clone(),
    };
    progress.say(&format!(
        "seed {}; starting the router (Kafka {}, Cassandra {}) and {} gateways (Redis {}); logs in {}",
        config.seed,
        settings.kafka_bootstrap,
        settings.cassandra_contact,
        config.gateways,
        settings.redis_url,
        config.work_dir.display()
    ));
    let mut cluster = match Cluster::start(&settings, config.gateways).await {
        Ok(cluster) => cluster,
        Err(error) => {
            summary.failures.push(format!("the cluster did not start: {error}"));
            summary.total = started.elapsed();
            return summary;
        }
    };
    let outcome = drive(&config, &progress, &mut cluster, &mut redis, &mut kafka, &mut summary).await;
    if let Err(error) = outcome {
        summary.failures.push(error);
    }
    cluster.stop().await;
    for engine in [&mut redis, &mut kafka].into_iter().flatten() {
        engine.ensure_running();
    }
    summary.total = started.elapsed();
    progress.say(&format!("done: {}", if summary.passed() { "PASS" } else { "FAIL" }));
    summary
}

/// Start, load with kills, settle, check.
async fn drive(
    config: &Config,
    progress: &Progress,
    cluster: &mut Cluster,
    redis: &mut Option<StackEngine>,
    kafka: &mut Option<StackEngine>,
    summary: &mut Summary,
) -> Result<(), String> {
    let scenario = load::scenario(&config.scale, config.seed);
    summary.clients = scenario.users.len();
    summary.channels = scenario.channels.iter().map(|channel| (channel.id.clone(), channel.members.len())).collect();
    let counters = Arc::new(Counters::default());
    let phase = Arc::new(Phase::default());
    let urls = cluster.urls();

    // Creators first (they make the channels), then everyone else (their `ready` lists the channels).
    let creators: Vec<usize> = {
        let mut creators: Vec<usize> = scenario.channels.iter().map(|channel| channel.members[0]).collect();
        creators.sort_unstable();
        creators.dedup();
        creators
    };
    let mut members: BTreeMap<usize, Arc<Member>> = BTreeMap::new();
    let connect = |index: usize| {
        let user = scenario.users[index].clone();
        let mut client = ClientConfig::lightweight(
            urls[index % urls.len()].clone(),
            crate::client::mint_token(SECRET, &user, 24 * 3600).unwrap_or_default(),
        );
        client.alternate_urls = (1..urls.len()).map(|step| urls[(index + step) % urls.len()].clone()).collect();
        client.backoff.base = Duration::from_millis(100);
        client.backoff.cap = Duration::from_secs(2);
        let channels: Vec<String> =
            scenario.channels_of(index).iter().map(|channel| channel.id.clone()).collect::<Vec<_>>();
        let counters = counters.clone();
        async move {
            let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
            Member::connect(index, &user, client, &channels, counters)
                .await
                .map(|member| (index, Arc::new(member)))
                .map_err(|error| format!("{user} could not connect: {error}"))
        }
    };
    for index in &creators {
        let (index, member) = connect(*index).await?;
        members.insert(index, member);
    }
    for channel in &scenario.channels {
        let creator = &members[&channel.members[0]];
        let others: Vec<String> = channel.members[1..].iter().map(|index| scenario.users[*index].clone()).collect();
        let created = match channel.group_name() {
            Some(name) => creator.client().create_channel(name, others).await,
            None => creator.client().open_dm(others[0].clone()).await,
        };
        created.map_err(|error| format!("{} could not be created: {error}", channel.id))?;
    }
    {
        use futures_util::StreamExt;
        let rest: Vec<usize> = (0..scenario.users.len()).filter(|index| !members.contains_key(index)).collect();
        let mut connecting = futures_util::stream::iter(rest.into_iter().map(connect)).buffer_unordered(8);
        while let Some(connected) = connecting.next().await {
            let (index, member) = connected?;
            members.insert(index, member);
        }
    }
    progress.say(&format!(
        "{} clients connected, {} channels made; load of about {:.0} messages/s for {} s",
        members.len(),
        scenario.channels.len(),
        config.scale.total_rate(),
        config.seconds
    ));

    // The load.
    let load_started = Instant::now();
    let mut senders = Vec::new();
    for channel in &scenario.channels {
        for sender in &channel.senders {
            let rng = Rng::derive(config.seed, 1_000 + (senders.len() as u64));
            senders.push(tokio::spawn(load::send_loop(
                members[sender].clone(),
                channel.id.clone(),
                channel.rate_millis,
                rng,
                phase.clone(),
                counters.clone(),
            )));
        }
    }
    let mut restarters = Vec::new();
    for index in &scenario.restarting {
        let rng = Rng::derive(config.seed, 100_000 + *index as u64);
        restarters.push(tokio::spawn(load::restart_loop(
            members[index].clone(),
            rng,
            config.scale.restart_min,
            config.scale.restart_max,
            phase.clone(),
        )));
    }

    let probe = StoreProbe {
        channels: scenario
            .channels
            .iter()
            .map(|channel| (channel.id.clone(), members[&channel.members[0]].clone()))
            .collect(),
        members: members.values().cloned().collect(),
    };

    // Kills, until the planned end (past it while a fault has not been applied once).
    let planned_end = load_started + Duration::from_secs(config.seconds);
    let schedule = plan::schedule(config.seed, &config.faults, config.gateways, config.pacing, 1_000);
    let mut load_end = planned_end;
    let mut failed = false;
    for kill in schedule {
        if !kill.mandatory && Instant::now() + kill.wait + config.tail > planned_end {
            break;
        }
        // The seeded wait between a recovery and the next kill.
        tokio::time::sleep(kill.wait).await;
        let record = apply(&kill, config, cluster, redis, kafka, &counters, &probe, load_started, progress).await;
        let survived = record.survived();
        summary.kills.push(record);
        load_end = load_end.max(Instant::now() + config.tail);
        if !survived {
            failed = true;
            break;
        }
    }
    if !failed {
        tokio::time::sleep_until(load_end.into()).await;
    }
    phase.load_over.store(true, Ordering::Relaxed);
    summary.load = load_started.elapsed();
    progress.say(&format!(
        "load over: {} sends started, {} confirmed; settling",
        counters.attempts.load(Ordering::Relaxed),
        counters.confirmed.load(Ordering::Relaxed)
    ));

    // Settle: restarts and senders finish, the store and the clients catch up. After a component that did not
    // come back, waiting for a full catch-up is pointless: the waits are short, the check still runs.
    let settle_started = Instant::now();
    let settle = if failed { Duration::from_secs(10) } else { config.settle };
    let finished = |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().all(tokio::task::JoinHandle::is_finished);
    load::wait_until(Instant::now() + Duration::from_secs(30), || finished(&restarters)).await;
    if !load::wait_until(Instant::now() + settle, || finished(&senders)).await {
        summary.notes.push(format!("senders still retrying after {settle:?}: their last sends count as unconfirmed"));
        phase.give_up.store(true, Ordering::Relaxed);
        load::wait_until(Instant::now() + Duration::from_secs(30), || finished(&senders)).await;
    }
    let heads = confirmed_heads(&members);
    let mut stored = read_all(&scenario, &members, &heads, settle).await?;
    let targets: HashMap<String, u64> = scenario
        .channels
        .iter()
        .map(|channel| {
            let stored_last = stored.get(&channel.id).and_then(|messages| messages.last()).map_or(0, |last| last.seq);
            let shown_last =
                channel.members.iter().map(|index| members[index].position(&channel.id)).max().unwrap_or(0);
            (channel.id.clone(), stored_last.max(shown_last).max(heads.get(&channel.id).copied().unwrap_or(0)))
        })
        .collect();
    let caught_up = {
        let (members, targets) = (&members, &targets);
        let behind = || {
            scenario
                .channels
                .iter()
                .flat_map(|channel| {
                    channel
                        .members
                        .iter()
                        .map(move |index| targets[&channel.id].saturating_sub(members[index].position(&channel.id)))
                })
                .sum::<u64>()
        };
        load::wait_for_progress(Instant::now() + settle, STALL, behind).await
    };
    if !caught_up {
        let members = &members;
        let behind: Vec<String> = scenario
            .channels
            .iter()
            .flat_map(|channel| {
                let target = targets[&channel.id];
                channel.members.iter().filter_map(move |index| {
                    let position = members[index].position(&channel.id);
                    (position < target)
                        .then(|| format!("{} {} at {position}/{target}", members[index].user, channel.id))
                })
            })
            .take(20)
            .collect();
        summary.notes.push(format!("clients still behind at the end of the settle phase: {}", behind.join(", ")));
    }
    // Read the history again: messages stored late (durable, their confirmation lost) are in it now.
    let final_heads: HashMap<String, u64> = targets.clone();
    stored = read_all(&scenario, &members, &final_heads, Duration::from_secs(30)).await?;
    summary.settle = settle_started.elapsed();
    for member in members.values() {
        member.close().await;
    }

    // Check.
    let input = Input { clients: members.values().map(|member| member.log(true)).collect(), stored };
    summary.report = history::check(&input);
    summary.attempts = counters.attempts.load(Ordering::Relaxed);
    summary.confirmed = counters.confirmed.load(Ordering::Relaxed);
    summary.duplicates = counters.duplicates.load(Ordering::Relaxed);
    summary.timeouts = counters.timeouts.load(Ordering::Relaxed);
    summary.restarts = counters.restarts.load(Ordering::Relaxed);
    summary.refusals = counters.refusals();
    summary.connections = (
        counters.connects.load(Ordering::Relaxed),
        counters.disconnects.load(Ordering::Relaxed),
        counters.connect_failures.load(Ordering::Relaxed),
    );
    if !summary.report.is_clean() {
        let path = config.work_dir.join("chaos-logs.json");
        let written = serde_json::to_vec(&input).ok().is_some_and(|bytes| std::fs::write(&path, bytes).is_ok());
        summary.notes.push(if written {
            format!("every client log and the stored history: {}", path.display())
        } else {
            format!("could not write {}", path.display())
        });
    }
    Ok(())
}

/// The highest confirmed seq per channel, over all members.
fn confirmed_heads(members: &BTreeMap<usize, Arc<Member>>) -> HashMap<String, u64> {
    let mut heads: HashMap<String, u64> = HashMap::new();
    for member in members.values() {
        for (channel, head) in member.confirmed_heads() {
            let entry = heads.entry(channel).or_default();
            *entry = (*entry).max(head);
        }
    }
    heads
}

/// How long a settle wait goes on without any progress before it gives up (the check then says what is missing).
const STALL: Duration = Duration::from_secs(30);

/// Reads the stored history of every channel (through one of its members), waiting up to `within` for each to
/// reach `heads[channel]` (the store may trail the log), and no longer than [`STALL`] without any channel's store
/// moving on.
async fn read_all(
    scenario: &load::Scenario,
    members: &BTreeMap<usize, Arc<Member>>,
    heads: &HashMap<String, u64>,
    within: Duration,
) -> Result<BTreeMap<String, Vec<history::Stored>>, String> {
    let deadline = Instant::now() + within;
    let mut stored: BTreeMap<String, Vec<history::Stored>> = BTreeMap::new();
    let mut progressed = Instant::now();
    loop {
        for channel in &scenario.channels {
            let head = heads.get(&channel.id).copied().unwrap_or(0);
            let had = stored.get(&channel.id).and_then(|messages| messages.last()).map(|last| last.seq);
            if had.is_some_and(|last| last >= head) {
                continue;
            }
            let reader = &members[&channel.members[0]];
            let messages = load::read_stored(&reader.client(), &channel.id).await?;
            let last = messages.last().map(|message| message.seq);
            if had.is_none() || last > had {
                progressed = Instant::now();
            }
            stored.insert(channel.id.clone(), messages);
        }
        let behind = scenario.channels.iter().any(|channel| {
            let last = stored.get(&channel.id).and_then(|messages| messages.last()).map_or(0, |last| last.seq);
            last < heads.get(&channel.id).copied().unwrap_or(0)
        });
        // Caught up; or the bound; or a store that stopped moving (a healthy one moves within seconds).
        if !behind || Instant::now() > deadline || progressed.elapsed() > STALL {
            return Ok(stored);
        }
        // The poll interval of a bounded wait for the store writer.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Applies one kill and waits for the recovery.
#[allow(clippy::too_many_arguments)]
async fn apply(
    kill: &Kill,
    config: &Config,
    cluster: &mut Cluster,
    redis: &mut Option<StackEngine>,
    kafka: &mut Option<StackEngine>,
    counters: &Counters,
    probe: &StoreProbe,
    load_started: Instant,
    progress: &Progress,
) -> KillRecord {
    let at = load_started.elapsed();
    let killed = Instant::now();
    let victim = kill.gateway.min(cluster.gateways.len().saturating_sub(1));
    let target = match kill.fault {
        Fault::Gateway => cluster.gateways[victim].name.clone(),
        Fault::Router => "router".to_owned(),
        Fault::Redis => "redis".to_owned(),
        Fault::Kafka => "kafka".to_owned(),
    };
    progress.say(&format!("kill {target} (down for {:.1} s)", kill.down_for.as_secs_f64()));
    let restarted: Result<(), String> = async {
        match kill.fault {
            Fault::Gateway => {
                let gateway = &mut cluster.gateways[victim];
                gateway.kill().await;
                // The outage's length: a deliberate time down.
                tokio::time::sleep(kill.down_for).await;
                gateway.restart(Duration::from_secs(60)).await
            }
            Fault::Router => {
                cluster.router.kill().await;
                tokio::time::sleep(kill.down_for).await;
                cluster.router.restart(Duration::from_secs(90)).await
            }
            Fault::Redis | Fault::Kafka => {
                let (engine, how, within) = match kill.fault {
                    Fault::Redis => (redis.as_mut(), Stop::Kill, Duration::from_secs(60)),
                    _ => (kafka.as_mut(), Stop::Clean, Duration::from_secs(180)),
                };
                let engine = engine.ok_or_else(|| format!("{target} is not known to this run"))?;
                engine.stop(how).await?;
                tokio::time::sleep(kill.down_for).await;
                engine.start(within).await
            }
        }
    }
    .await;
    let back_after = killed.elapsed();
    if let Err(error) = restarted {
        progress.say(&format!("{target} could not be started again: {error}"));
        return KillRecord {
            fault: kill.fault,
            target,
            at,
            back_after,
            recovered_after: None,
            stored_after: None,
            error: Some(error),
        };
    }
    let back = Instant::now();
    let (confirmed, shown) = (counters.confirmed.load(Ordering::Relaxed), counters.shown.load(Ordering::Relaxed));
    let recovered = load::wait_until(back + config.recovery, || {
        counters.confirmed.load(Ordering::Relaxed) >= confirmed + 3
            && counters.shown.load(Ordering::Relaxed) >= shown + 3
    })
    .await;
    let recovered_after = recovered.then(|| back.elapsed());
    let mut error =
        (!recovered).then(|| format!("no send was confirmed within {:?} after {target} was back", config.recovery));
    let mut stored_after = None;
    if recovered {
        match probe.caught_up(back + config.recovery).await {
            Ok(()) => stored_after = Some(back.elapsed()),
            Err(lacking) => error = Some(lacking),
        }
    }
    progress.say(&format!(
        "{target} back after {:.1} s; {}; {}",
        back_after.as_secs_f64(),
        match recovered_after {
            Some(after) => format!("sends confirmed again {:.1} s later", after.as_secs_f64()),
            None => "sends NOT confirmed again".to_owned(),
        },
        match (stored_after, &error) {
            (Some(after), _) => format!("history caught up {:.1} s later", after.as_secs_f64()),
            (None, Some(error)) => format!("FAILED: {error}"),
            (None, None) => "history not checked".to_owned(),
        }
    ));
    KillRecord { fault: kill.fault, target, at, back_after, recovered_after, stored_after, error }
}

/// Where the stored history stands compared with the confirmations: after a recovery the store (written from the
/// log by the router's store writer) must catch up, or history reads, gap fills and resumes miss messages.
struct StoreProbe {
    /// Each channel with the member that reads its history.
    channels: Vec<(String, Arc<Member>)>,
    /// Every member (their confirmations).
    members: Vec<Arc<Member>>,
}

impl StoreProbe {
    /// Waits until the newest stored message of every channel is at least the highest seq confirmed now, at most
    /// until `deadline` and no longer than [`STALL`] without the store moving on.
    async fn caught_up(&self, deadline: Instant) -> Result<(), String> {
        let mut heads: HashMap<&str, u64> = HashMap::new();
        for member in &self.members {
            for (channel, head) in member.confirmed_heads() {
                if let Some((id, _)) = self.channels.iter().find(|(id, _)| *id == channel) {
                    let entry = heads.entry(id.as_str()).or_default();
                    *entry = (*entry).max(head);
                }
            }
        }
        let mut best = (u64::MAX, Instant::now());
        loop {
            let mut lacking = 0;
            for (channel, reader) in &self.channels {
                let head = heads.get(channel.as_str()).copied().unwrap_or(0);
                if head == 0 {
                    continue;
                }
                let query = parley_client::HistoryQuery { before: None, after: None, limit: Some(1) };
                let newest =
                    match tokio::time::timeout(Duration::from_secs(5), reader.client().history(channel, query)).await {
                        Ok(Ok(page)) => page.messages.last().map_or(0, |message| message.seq),
                        // The reader is reconnecting: no answer this round.
                        _ => 0,
                    };
                lacking += head.saturating_sub(newest);
            }
            if lacking == 0 {
                return Ok(());
            }
            if lacking < best.0 {
                best = (lacking, Instant::now());
            }
            if Instant::now() > deadline || best.1.elapsed() > STALL {
                return Err(format!(
                    "the stored history still lacks {lacking} messages confirmed before the recovery (it stopped \
                     moving for {:.0} s): the router's store writer is not writing the log into the store",
                    best.1.elapsed().as_secs_f64()
                ));
            }
            // The poll interval of a bounded wait for the store writer.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A binary beside the running executable (`target/<profile>/parley` for `target/<profile>/parley-chaos`).
pub fn beside_self(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|error| format!("cannot find the running executable: {error}"))?;
    let dir = exe.parent().ok_or_else(|| "the executable has no directory".to_owned())?;
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is missing: build it with `cargo build --workspace`", path.display()))
    }
}

/// Deletes a work dir (on success).
pub fn remove_work_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_come_from_the_first_stack_env_that_names_them() {
        let root = std::env::temp_dir().join(parley_test_support::unique("parley-chaos-stack-"));
        let (one, two) = (root.join("one"), root.join("two"));
        std::fs::create_dir_all(&one).expect("dir");
        std::fs::create_dir_all(&two).expect("dir");
        std::fs::write(
            one.join("stack.env"),
            "PARLEY_STACK_DIR=/x\nPARLEY_REDIS_USERNAME=u1\nPARLEY_REDIS_URL=rediss://127.0.0.1:1\n\
             PARLEY_REDIS_PASSWORD=p1\n",
        )
        .expect("write");
        std::fs::write(
            two.join("stack.env"),
            "PARLEY_REDIS_URL=redis://127.0.0.1:2\nPARLEY_REDIS_PASSWORD=p2\nPARLEY_KAFKA_BOOTSTRAP=127.0.0.1:3\n\
             PARLEY_KAFKA_SASL_PASSWORD=k2\nPARLEY_CASSANDRA_CONTACT=127.0.0.1:4\nPARLEY_CASSANDRA_USERNAME=c2\n",
        )
        .expect("write");
        let stack = Stack::from_dirs(&[one.clone(), two.clone()]).expect("stack");
        assert_eq!(
            stack,
            Stack {
                redis_url: "rediss://127.0.0.1:1".into(),
                redis_state: one.clone(),
                kafka_bootstrap: "127.0.0.1:3".into(),
                kafka_state: two.clone(),
                cassandra_contact: "127.0.0.1:4".into(),
                env: vec![
                    ("PARLEY_REDIS_USERNAME".into(), "u1".into()),
                    ("PARLEY_REDIS_PASSWORD".into(), "p1".into()),
                    ("PARLEY_KAFKA_SASL_PASSWORD".into(), "k2".into()),
                    ("PARLEY_CASSANDRA_USERNAME".into(), "c2".into()),
                ],
            }
        );
        let missing = Stack::from_dirs(&[one]).expect_err("no Kafka");
        assert!(missing.contains("PARLEY_KAFKA_BOOTSTRAP"), "{missing}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_summary_passes_only_with_no_violation_no_failure_and_every_kill_survived() {
        let kill = |recovered: bool| KillRecord {
            fault: Fault::Router,
            target: "router".into(),
            at: Duration::from_secs(3),
            back_after: Duration::from_secs(2),
            recovered_after: recovered.then_some(Duration::from_secs(1)),
            stored_after: recovered.then_some(Duration::from_secs(2)),
            error: None,
        };
        let mut summary = Summary { kills: vec![kill(true)], ..Summary::default() };
        assert!(summary.passed());
        assert!(summary.render().ends_with("result: PASS"), "{}", summary.render());
        assert!(summary.figure_line().contains("router 1/1"), "{}", summary.figure_line());
        summary.kills.push(kill(false));
        assert!(!summary.passed());
        assert!(summary.render().contains("router 1/2"));
        summary.kills.pop();
        summary.report.violations.push(history::Violation::NotAMember {
            client: "u001".into(),
            channel: "g:x".into(),
            count: 1,
        });
        assert!(!summary.passed());
        assert!(summary.render().contains("violations: 1 (not_a_member 1)"), "{}", summary.render());
    }
}
