//! Cassandra store bench: write throughput (messages/s, in batches of N) and history read latency (p50/p99).
//!
//! ```sh
//! e2e/stack/up.sh --only cassandra /tmp/parley-stack && set -a && . /tmp/parley-stack/stack.env && set +a
//! cargo run --release -p parley-router --example cassandra-bench -- [messages] [batch] [writers] [channels] [reads]
//! ```
//!
//! Defaults: 50,000 messages, batches of 100, 4 concurrent writers, 20 channels, 2,000 history reads (latest page
//! and a random older page of 50, alternately). It creates the keyspace `parley_bench_<pid>` and drops it at
//! the end.

use parley_core::protocol::MessageView;
use parley_router::backend::{HistoryQuery, MessageStore};
use parley_router::cassandra::CassandraStore;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn argument(index: usize, default: u64) -> u64 {
    std::env::args().nth(index).and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages = argument(1, 50_000);
    let batch = argument(2, 100).max(1);
    let writers = argument(3, 4).max(1);
    let channels = argument(4, 20).max(1);
    let reads = argument(5, 2_000);
    let contact = std::env::var("PARLEY_CASSANDRA_CONTACT")
        .map_err(|_| "PARLEY_CASSANDRA_CONTACT is not set: start Cassandra with e2e/stack/up.sh --only cassandra")?;
    // With the TLS and credentials of the environment (stack.env).
    let mut config = parley_test_support::cassandra_config(&contact, format!("parley_bench_{}", std::process::id()));
    config.local_datacenter = std::env::var("PARLEY_CASSANDRA_DC").ok();
    config.request_timeout = Duration::from_secs(10);
    let store = Arc::new(CassandraStore::connect(config).await?);
    let start_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let per_channel = messages / channels;

    // Writes: each writer owns a set of channels and writes them in sequence order, `batch` messages a call.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::with_capacity(batch as usize);
            let mut latencies = Vec::new();
            for channel in (0..channels).filter(|channel| channel % writers == writer) {
                for seq in 1..=per_channel {
                    let ts = start_ms + seq * 10;
                    pending.push(MessageView {
                        channel: format!("g:bench{channel}"),
                        seq,
                        id: (ts << 22) | seq,
                        sender: format!("user{}", seq % 50),
                        text: format!("benchmark message number {seq} with a typical short text"),
                        ts,
                        client_msg_id: format!("c{channel}-{seq}"),
                    });
                    if pending.len() as u64 == batch {
                        let call = Instant::now();
                        store.write(std::mem::take(&mut pending)).await?;
                        latencies.push(call.elapsed());
                    }
                }
            }
            if !pending.is_empty() {
                store.write(pending).await?;
            }
            Ok::<_, parley_api::BackendError>(latencies)
        }));
    }
    let mut write_latencies = Vec::new();
    for task in tasks {
        write_latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let written = per_channel * channels;
    write_latencies.sort();
    println!(
        "write: {written} messages in {:.2} s = {:.0} messages/s (batch {batch}, {writers} writers, {channels} \
         channels); batch latency p50 {:.1} ms, p99 {:.1} ms",
        elapsed.as_secs_f64(),
        written as f64 / elapsed.as_secs_f64(),
        percentile(&write_latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&write_latencies, 0.99).as_secs_f64() * 1000.0,
    );

    // Reads: the latest page, then a page before a pseudo-random sequence, alternately, one at a time.
    let mut read_latencies = Vec::with_capacity(reads as usize);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for read in 0..reads {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let channel = format!("g:bench{}", state % channels);
        let before = if read % 2 == 0 { None } else { Some(1 + state % per_channel.max(1)) };
        let call = Instant::now();
        let page = store.history(&channel, HistoryQuery { before, after: None, limit: 50 }).await?;
        read_latencies.push(call.elapsed());
        if before.is_none() && page.messages.len() != 50.min(per_channel as usize) {
            return Err(format!("latest page of {channel} has {} messages", page.messages.len()).into());
        }
    }
    read_latencies.sort();
    println!(
        "history: {reads} reads of 50 (latest and random older pages): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&read_latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&read_latencies, 0.99).as_secs_f64() * 1000.0,
        read_latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    store.drop_keyspace().await?;
    Ok(())
}
