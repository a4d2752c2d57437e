//! Does creating a large channel stall everybody else's sends? `--senders` tasks send in a closed loop (one
//! message, wait for its confirmation, the next) to small channels through one router writer, on the embedded
//! log and store (`--backend embedded`, the default) or on Kafka and Cassandra (`--backend kafka-cassandra`, from
//! `PARLEY_KAFKA_BOOTSTRAP` and `PARLEY_CASSANDRA_CONTACT`), with Redis pub/sub. The run measures their confirmation latency twice for `--seconds` each: once alone
//! (baseline), and once while another task creates `--members`-member channels back to back (each creation
//! writes the members and announces every one of them to the gateways). Prints both, and how long each
//! creation took.
//!
//! ```sh
//! e2e/stack/up.sh --only redis /tmp/parley-bench-redis && set -a && . /tmp/parley-bench-redis/stack.env && set +a
//! cargo run --release -p parley-router --example create_stall -- --seconds 5 --senders 16 --members 10000
//! e2e/stack/down.sh /tmp/parley-bench-redis
//! ```
//!
//! On the embedded driver the log and the membership tables share one redb database, whose write transactions
//! are serialised: a send's append waits while a large membership write holds it. With Kafka and Cassandra the
//! two writes go to different engines.
//!
//! `--pubsub local` uses the in-process pub/sub instead of Redis (no network round trips to wait for).

use parley_api::Router;
use parley_bus::pubsub::{LocalPubSub, PubSub};
use parley_bus::redis::{RedisConfig, RedisPubSub};
use parley_core::UserId;
use parley_router::cassandra::CassandraStore;
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::{KafkaLog, StoreWriter};
use parley_router::RouterConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Options {
    seconds: u64,
    senders: usize,
    members: usize,
    pubsub: String,
    backend: String,
}

fn options() -> Result<Options, String> {
    let mut options =
        Options { seconds: 5, senders: 16, members: 10_000, pubsub: "redis".into(), backend: "embedded".into() };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => options.seconds = value()?.parse().map_err(|error| format!("--seconds: {error}"))?,
            "--senders" => options.senders = value()?.parse().map_err(|error| format!("--senders: {error}"))?,
            "--members" => options.members = value()?.parse().map_err(|error| format!("--members: {error}"))?,
            "--pubsub" => options.pubsub = value()?,
            "--backend" => options.backend = value()?,
            other => {
                return Err(format!(
                    "unknown argument {other} (--seconds --senders --members --pubsub redis|local \
                     --backend embedded|kafka-cassandra)"
                ))
            }
        }
    }
    if options.senders == 0 || options.members < 2 || options.seconds == 0 {
        return Err("--senders and --seconds must be positive, --members at least 2".into());
    }
    Ok(options)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Closed-loop senders for `seconds`; with `create`, a task creates large channels during the same window.
async fn phase(
    router: &Router,
    options: &Options,
    senders: &[(UserId, String)],
    create: Option<&str>,
) -> (Vec<Duration>, usize, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (index, (user, channel)) in senders.iter().enumerate() {
        let (router, stop, user, channel) = (router.clone(), stop.clone(), user.clone(), channel.clone());
        let tag = create.unwrap_or("base").to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failures, mut counter) = (Vec::new(), 0usize, 0u64);
            while !stop.load(Ordering::Relaxed) {
                counter += 1;
                let sent = Instant::now();
                match router.send(&user, &channel, &format!("{tag}-{index}-{counter}"), "a small message").await {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(_) => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let creator = create.map(|tag| {
        let (router, stop, members, tag) = (router.clone(), stop.clone(), options.members, tag.to_owned());
        tokio::spawn(async move {
            let mut took = Vec::new();
            let owner = UserId::new("owner").ok()?;
            let others: Vec<String> = (1..members).map(|n| format!("member{n}")).collect();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let started = Instant::now();
                router.create_channel(&owner, &format!("large-{tag}-{round}"), &others).await.ok()?;
                took.push(started.elapsed());
            }
            Some(took)
        })
    });
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for task in tasks {
        if let Ok((mut more, failed)) = task.await {
            latencies.append(&mut more);
            failures += failed;
        }
    }
    latencies.sort_unstable();
    let creations = match creator {
        Some(task) => task.await.ok().flatten().unwrap_or_default(),
        None => Vec::new(),
    };
    (latencies, failures, creations)
}

fn report(name: &str, seconds: u64, latencies: &[Duration], failures: usize) {
    println!(
        "{name:>22}: {:>7.0} sends/s  p50 {:>7.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} confirmed, {failures} failed)",
        latencies.len() as f64 / seconds as f64,
        percentile(latencies, 0.50),
        percentile(latencies, 0.99),
        percentile(latencies, 1.0),
        latencies.len(),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = options()?;
    let pubsub: Arc<dyn PubSub> = match options.pubsub.as_str() {
        "local" => Arc::new(LocalPubSub::new()),
        "redis" => {
            // The URL, and the TLS CA file and ACL user the stack's Redis wants, from the environment (stack.env).
            let redis = parley_bus::args::RedisArgs::from_env();
            if redis.url().is_none() {
                return Err("PARLEY_REDIS_URL is not set: start Redis with `e2e/stack/up.sh --only redis \
                            /tmp/parley-bench-redis` and source its stack.env (or pass --pubsub local)"
                    .into());
            }
            let config: RedisConfig = redis.config()?.with_prefix("parley-bench:");
            Arc::new(RedisPubSub::connect(config).await?)
        }
        other => return Err(format!("--pubsub {other}: expected redis or local").into()),
    };
    let dir = tempfile::tempdir()?;
    let config = RouterConfig { max_channel_members: options.members as u32, ..RouterConfig::default() };
    let mut _store_writer = None;
    let (router, _task) = match options.backend.as_str() {
        "embedded" => {
            let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default())?);
            parley_router::start(config, store.clone(), store.clone(), store.clone(), pubsub)?
        }
        "kafka-cassandra" => {
            let variable = |name: &str| {
                std::env::var(name).map_err(|_| {
                    format!("{name} is not set: start Kafka and Cassandra with `e2e/stack/up.sh --only redis,kafka,cassandra DIR` and source its stack.env")
                })
            };
            let (bootstrap, contact) = (variable("PARLEY_KAFKA_BOOTSTRAP")?, variable("PARLEY_CASSANDRA_CONTACT")?);
            let unique =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 1_000_000_000;
            // With the TLS and credentials of the environment (stack.env).
            let cassandra = parley_test_support::cassandra_config(&contact, format!("bench_{unique}"));
            let store = Arc::new(CassandraStore::connect(cassandra).await?);
            let kafka = parley_test_support::kafka_config(&bootstrap).with_prefix(format!("bench-{unique}-"));
            let log = Arc::new(KafkaLog::open(kafka.clone(), store.clone(), None).await?);
            _store_writer = Some(StoreWriter::start(kafka, store.clone()).await?);
            parley_router::start(config, log, store.clone(), store, pubsub)?
        }
        other => return Err(format!("--backend {other}: expected embedded or kafka-cassandra").into()),
    };
    let mut senders = Vec::new();
    for index in 0..options.senders {
        let user = UserId::new(format!("sender{index}"))?;
        let name = format!("small-{index}");
        router.create_channel(&user, &name, &[format!("peer{index}")]).await?;
        senders.push((user, format!("g:{name}")));
    }
    println!(
        "{} senders on small channels, {} s per phase, {}-member creations, {} pub/sub, {} backend",
        options.senders, options.seconds, options.members, options.pubsub, options.backend
    );
    let (latencies, failures, _) = phase(&router, &options, &senders, None).await;
    report("alone", options.seconds, &latencies, failures);
    let (latencies, failures, creations) = phase(&router, &options, &senders, Some("run")).await;
    report("during large creations", options.seconds, &latencies, failures);
    let mut creations = creations;
    creations.sort_unstable();
    println!(
        "{:>22}: {} channels of {} members, each p50 {:.0} ms, max {:.0} ms",
        "creations",
        creations.len(),
        options.members,
        percentile(&creations, 0.5),
        percentile(&creations, 1.0),
    );
    let counters = router.stats().counters();
    let counter = |name: &str| counters.iter().find(|(key, _, _)| *key == name).map(|(_, _, value)| *value);
    println!(
        "{:>22}: {} publications in {} round trips, {} failed, {} timed out",
        "publisher",
        counter("published").unwrap_or(0),
        counter("publish_batches").unwrap_or(0),
        counter("publish_failures").unwrap_or(0),
        counter("publish_timeouts").unwrap_or(0),
    );
    Ok(())
}
