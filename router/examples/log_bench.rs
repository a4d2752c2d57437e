//! Sustained sends through the router's single writer, with the embedded log and with the Kafka log, under the
//! same closed-loop load: `--senders` tasks each send one message, wait for its confirmation, and send the next,
//! spread over `--channels` channels, for `--seconds` per log. Prints sends/s and confirmation latency.
//!
//! ```sh
//! e2e/stack/up.sh --only kafka /tmp/parley-bench-kafka && set -a && . /tmp/parley-bench-kafka/stack.env && set +a
//! cargo run --release -p parley-router --example log_bench -- --seconds 10 --senders 256 --channels 64
//! e2e/stack/down.sh /tmp/parley-bench-kafka
//! ```
//!
//! With the Kafka log, a store writer copies the topic into the embedded store during the run (as in
//! production), and the run ends by checking that the store holds every confirmed message.

use parley_api::Router;
use parley_bus::pubsub::LocalPubSub;
use parley_core::UserId;
use parley_router::backend::{MessageLog, MessageStore};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::{KafkaLog, StoreWriter};
use parley_router::RouterConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Options {
    seconds: u64,
    senders: usize,
    channels: usize,
    partitions: i32,
    only: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut options = Options { seconds: 10, senders: 256, channels: 64, partitions: 8, only: None };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => options.seconds = value()?.parse().map_err(|error| format!("--seconds: {error}"))?,
            "--senders" => options.senders = value()?.parse().map_err(|error| format!("--senders: {error}"))?,
            "--channels" => options.channels = value()?.parse().map_err(|error| format!("--channels: {error}"))?,
            "--partitions" => {
                options.partitions = value()?.parse().map_err(|error| format!("--partitions: {error}"))?
            }
            "--only" => options.only = Some(value()?),
            other => {
                return Err(format!(
                    "unknown argument {other} (--seconds --senders --channels --partitions --only embedded|kafka)"
                ))
            }
        }
    }
    Ok(options)
}

struct Outcome {
    sends: usize,
    failures: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn drive(router: Router, options: &Options, users: &[UserId], channels: &[String]) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for sender in 0..options.senders {
        let router = router.clone();
        let stop = stop.clone();
        let user = users[sender % users.len()].clone();
        let channel = channels[sender % channels.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            let mut counter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                counter += 1;
                let sent = Instant::now();
                match router.send(&user, &channel, &format!("{sender}-{counter}"), "benchmark message text").await {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(_) => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        if let Ok((mut task_latencies, task_failures)) = task.await {
            latencies.append(&mut task_latencies);
            failures += task_failures;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Outcome { sends: latencies.len(), failures, elapsed, latencies }
}

async fn setup(router: &Router, options: &Options) -> Result<(Vec<UserId>, Vec<String>), Box<dyn std::error::Error>> {
    let users: Vec<UserId> = (0..8).map(|index| UserId::new(format!("bench{index}"))).collect::<Result<_, _>>()?;
    let members: Vec<String> = users[1..].iter().map(|user| user.as_str().to_owned()).collect();
    let mut channels = Vec::new();
    for index in 0..options.channels {
        let name = format!("bench-{index}");
        router.create_channel(&users[0], &name, &members).await?;
        channels.push(format!("g:{name}"));
    }
    Ok((users, channels))
}

fn report(name: &str, options: &Options, outcome: &Outcome) {
    let rate = outcome.sends as f64 / outcome.elapsed.as_secs_f64();
    println!(
        "{name:>8}: {rate:>9.0} sends/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>7.2} ms  ({} confirmed, {} failed, {} senders, {} channels, {:.1} s)",
        percentile(&outcome.latencies, 0.50),
        percentile(&outcome.latencies, 0.99),
        percentile(&outcome.latencies, 0.999),
        percentile(&outcome.latencies, 1.0),
        outcome.sends,
        outcome.failures,
        options.senders,
        options.channels,
        outcome.elapsed.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = options()?;
    let run = |name: &str| options.only.as_deref().is_none_or(|only| only == name);
    if run("embedded") {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default())?);
        let (router, _task) = parley_router::start(
            RouterConfig::default(),
            store.clone(),
            store.clone(),
            store.clone(),
            Arc::new(LocalPubSub::new()),
        )?;
        let (users, channels) = setup(&router, &options).await?;
        let outcome = drive(router, &options, &users, &channels).await;
        report("embedded", &options, &outcome);
    }
    if run("kafka") {
        let bootstrap = std::env::var("PARLEY_KAFKA_BOOTSTRAP").map_err(|_| {
            "PARLEY_KAFKA_BOOTSTRAP is not set: start Kafka with `e2e/stack/up.sh --only kafka /tmp/parley-bench-kafka` \
             and source its stack.env (or pass --only embedded)"
        })?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        // With the TLS and SASL of the environment (stack.env).
        let config = parley_test_support::kafka_config(&bootstrap)
            .with_prefix(format!("parley-bench-{nanos}-"))
            .with_partitions(options.partitions);
        let dir = tempfile::tempdir()?;
        let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default())?);
        let log: Arc<dyn MessageLog> = Arc::new(KafkaLog::open(config.clone(), store.clone(), None).await?);
        let writer = StoreWriter::start(config.clone(), store.clone()).await?;
        let (router, _task) = parley_router::start(
            RouterConfig::default(),
            log,
            store.clone(),
            store.clone(),
            Arc::new(LocalPubSub::new()),
        )?;
        let (users, channels) = setup(&router, &options).await?;
        let outcome = drive(router, &options, &users, &channels).await;
        report("kafka", &options, &outcome);
        let caught_up = Instant::now();
        let deadline = caught_up + Duration::from_secs(120);
        while writer.lag().await? > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut stored = 0u64;
        for channel in &channels {
            stored += store.last_stored_seq(channel).await?;
        }
        println!(
            "   store: {stored} messages stored of {} confirmed ({} ms after the load stopped; store writer wrote {} in {} batches)",
            outcome.sends,
            caught_up.elapsed().as_millis(),
            writer.stats().written.load(Ordering::Relaxed),
            writer.stats().batches.load(Ordering::Relaxed),
        );
        writer.stop().await?;
    }
    Ok(())
}
