//! `parley-load`: protocol-level load generator for Parley (idle connections, fan-out latency, broadcast
//! throughput). Loopback targets only; every run is bounded in count and time and stops by itself.
//! `--protocol centrifugo` runs `idle` and `fanout` against Centrifugo v6 instead, for comparison.
//!
//! Progress goes to stderr; the summary goes to stdout and ends with one JSON line holding the figures.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand};
use parley_core::protocol::{ClientFrame, ServerFrame};
use parley_e2e::centrifugo::{self, ApiTarget, Publisher};
use parley_e2e::client::{self, Counts, SendPlan, SenderStats, Shared, Target};
use parley_e2e::hist::Hist;
use parley_e2e::sys;
use parley_e2e::worker::{call_all, worker_main, Batch, Cmd, Evt, Protocol, WorkerConfig, WorkerHandle};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

#[derive(Parser)]
#[command(name = "parley-load", about = "Load generator for the Parley wire protocol v1 (loopback only)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Open N idle connections and measure the server's memory per connection.
    Idle(IdleArgs),
    /// One sender, N members in one channel: client-observed delivery latency.
    Fanout(FanoutArgs),
    /// K senders flood a channel of N members: deliveries per second and per server CPU second.
    Throughput(ThroughputArgs),
    /// Wait until GET /readyz (or --path) answers 200.
    WaitReady {
        /// Server URL (ws://host:port or http://host:port).
        #[arg(long)]
        url: String,
        /// Path to poll (Centrifugo: /health on its internal port).
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Fail at once if this process exits while waiting.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Internal: a tiny in-memory server for checking this tool (not Parley).
    #[command(name = "__mock", hide = true)]
    Mock {
        /// Listen address (loopback).
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: String,
        /// HS256 secret.
        #[arg(long)]
        secret: String,
    },
    /// Internal: a worker process.
    #[command(name = "__worker", hide = true)]
    Worker {
        /// JSON worker config.
        config: String,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Server WebSocket URL, e.g. ws://127.0.0.1:8080 (path defaults to /v1/ws?v=1, or
    /// /connection/websocket with --protocol centrifugo).
    #[arg(long)]
    url: String,
    /// The server's protocol: parley, or centrifugo (Centrifugo v6, JSON protocol; idle and fanout only).
    #[arg(long, value_enum, default_value_t = Protocol::Parley)]
    protocol: Protocol,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "PARLEY_JWT_SECRET")]
    secret: String,
    /// Worker processes (default: as many as the open-file limit needs).
    #[arg(long)]
    procs: Option<usize>,
    /// Runtime threads per worker process (1 = single-threaded, 0 = one per core).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Concurrent handshakes in flight (over all workers): connections ramp up in waves of this size. Keep it
    /// below the server's listen backlog (the gateway listens with 128): an overflowing accept queue drops
    /// SYNs, which costs the client a 1 s retransmission each.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Source addresses to spread connections over, e.g. 127.0.0.1,127.0.0.2 (loopback only).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Users are named <prefix><n>.
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// Server process id, for RSS and CPU figures.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Per-connection handshake timeout, seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Abort the whole run after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open.
    #[arg(long)]
    connections: u64,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Seconds to hold the connections open after measuring (connections must all survive).
    #[arg(long, default_value_t = 5)]
    hold: u64,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Channel members (including the sender); at most the server's max_channel_members.
    #[arg(long)]
    members: u64,
    /// Messages the sender sends, one at a time.
    #[arg(long, default_value_t = 20)]
    messages: u64,
    /// Milliseconds between sends.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Concurrent joins (short-lived connections) while enrolling members.
    #[arg(long, default_value_t = 200)]
    join_concurrency: usize,
    /// Channel name (default: a fresh fan-<time>).
    #[arg(long)]
    channel: Option<String>,
    /// Pad message texts to this many bytes.
    #[arg(long, default_value_t = 64)]
    text_bytes: usize,
    /// Centrifugo: the server HTTP API the publisher uses, e.g. http://127.0.0.1:18192/api.
    #[arg(long)]
    centrifugo_api: Option<String>,
    /// Centrifugo: the server API key (sent as X-API-Key).
    #[arg(long, env = "CENTRIFUGO_API_KEY", hide_env_values = true)]
    centrifugo_api_key: Option<String>,
    /// Centrifugo: the channel namespace (history and client subscribe on); the channel is <namespace>:<name>.
    #[arg(long, default_value = "chat")]
    centrifugo_namespace: String,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// Channel members (including the senders).
    #[arg(long)]
    members: u64,
    /// Sending connections.
    #[arg(long, default_value_t = 4)]
    senders: u64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Sends per second per sender (default: 95% of the server's send_rate_per_sec).
    #[arg(long)]
    rate_per_sender: Option<f64>,
    /// Unanswered sends allowed per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Concurrent joins while enrolling members.
    #[arg(long, default_value_t = 200)]
    join_concurrency: usize,
    /// Pad message texts to this many bytes.
    #[arg(long, default_value_t = 64)]
    text_bytes: usize,
    /// Channel name (default: a fresh tp-<time>).
    #[arg(long)]
    channel: Option<String>,
    /// Processes whose CPU time (utime + stime from /proc/<pid>/stat) is read at the start and the end of the
    /// measured window, as name=pid pairs (e.g. gateway=123,router=456): reported per name in seconds, per
    /// confirmed message and per delivery ("process_cpu" in the JSON line).
    #[arg(long, value_delimiter = ',', value_parser = parse_named_pid)]
    cpu_pids: Vec<(String, u32)>,
}

fn parse_named_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text.split_once('=').ok_or_else(|| format!("expected name=pid, got {text:?}"))?;
    let pid = pid.trim().parse().map_err(|_| format!("not a process id in {text:?}"))?;
    if name.trim().is_empty() {
        return Err(format!("empty name in {text:?}"));
    }
    Ok((name.trim().to_owned(), pid))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Worker { config } => worker_main(&config),
        mode => run(mode),
    };
    if let Err(error) = result {
        eprintln!("parley-load: error: {error:#}");
        std::process::exit(1);
    }
}

fn run(mode: Mode) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")?;
    let result = runtime.block_on(async move {
        match mode {
            Mode::Idle(mut args) => {
                args.common.set_default_path();
                bounded(args.common.timeout, idle(args)).await
            }
            Mode::Fanout(mut args) if args.common.protocol == Protocol::Centrifugo => {
                args.common.set_default_path();
                bounded(args.common.timeout, fanout_centrifugo(args)).await
            }
            Mode::Fanout(args) => bounded(args.common.timeout, fanout(args)).await,
            Mode::Throughput(args) if args.common.protocol == Protocol::Centrifugo => {
                Err(anyhow!("throughput is not implemented for --protocol centrifugo (idle and fanout are)"))
            }
            Mode::Throughput(args) => bounded(args.common.timeout, throughput(args)).await,
            Mode::WaitReady { url, path, timeout, server_pid } => wait_ready(&url, &path, timeout, server_pid).await,
            Mode::Mock { listen, secret } => parley_e2e::mock::serve(&listen, &secret).await,
            Mode::Worker { .. } => Err(anyhow!("unreachable")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn bounded(secs: u64, work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(secs), work)
        .await
        .map_err(|_| anyhow!("run exceeded --timeout {secs}s; aborted (workers are killed)"))?
}

async fn wait_ready(url: &str, path: &str, timeout: u64, server_pid: Option<u32>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ws_url = url.replacen("http://", "ws://", 1);
    let target = Target::parse(&ws_url)?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Some(pid) = server_pid {
            if !sys::alive(pid) {
                bail!("server process {pid} exited before it was ready");
            }
        }
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(target.addr).await?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target.authority);
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<String, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(response)) if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") => {
                eprintln!("server at {} is ready", target.authority);
                return Ok(());
            }
            Ok(Ok(response)) => last = response.lines().next().unwrap_or("").to_owned(),
            Ok(Err(error)) => last = error.to_string(),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("server at {} not ready after {timeout}s (last: {last})", target.authority)
}

// ---------------------------------------------------------------------------------------------------------
// Shared orchestration

struct Pool {
    workers: Vec<WorkerHandle>,
    ticks_per_sec: u64,
}

fn plan_procs(common: &Common, count: u64) -> anyhow::Result<usize> {
    let limit = sys::nofile_soft_limit().unwrap_or(1024);
    let per_proc = limit.saturating_sub(100).max(1);
    let needed = count.div_ceil(per_proc).max(1) as usize;
    let procs = common.procs.unwrap_or(needed).max(1);
    if procs < needed {
        bail!(
            "{count} connections need at least {needed} processes with an open-file limit of {limit} \
             (raise `ulimit -n` or pass --procs {needed})"
        );
    }
    let sources = effective_sources(common, count);
    let ports = 28_000 * sources.len().max(1) as u64;
    if count > ports {
        bail!("{count} connections exceed the ~28k ephemeral ports per source address: pass more --sources");
    }
    for source in &sources {
        if !source.is_loopback() {
            bail!("source address {source} is not loopback");
        }
    }
    Ok(procs)
}

/// Connections per source address above which the tool spreads over more loopback addresses by itself: the
/// kernel's ephemeral port search (`__inet_hash_connect`) gets slow when one (source, destination) pair holds
/// tens of thousands of ports (19k connections from one address: 774/s and 23 s of client CPU; from four:
/// 4,900/s).
const PER_SOURCE: u64 = 5_000;

fn effective_sources(common: &Common, count: u64) -> Vec<IpAddr> {
    if !common.sources.is_empty() || count <= PER_SOURCE {
        return common.sources.clone();
    }
    match Target::parse(&common.url).map(|target| target.addr.ip()) {
        Ok(IpAddr::V4(ip)) if ip.is_loopback() => (0..count.div_ceil(PER_SOURCE))
            .map(|index| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1 + index as u8)))
            .collect(),
        _ => Vec::new(),
    }
}

impl Pool {
    /// Starts workers for users `first..first+count`, split evenly.
    fn start(
        common: &Common,
        first: u64,
        count: u64,
        channel: Option<String>,
        record_latency: bool,
        join_concurrency: usize,
    ) -> anyhow::Result<Pool> {
        let procs = plan_procs(common, count)?;
        let exe = std::env::current_exe().context("locating own executable")?;
        let sources = effective_sources(common, count);
        if common.sources.is_empty() && !sources.is_empty() {
            eprintln!(
                "spreading {count} connections over source addresses {}",
                sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            );
        }
        let share = count.div_ceil(procs as u64);
        let mut workers = Vec::new();
        let mut next = first;
        for index in 0..procs {
            let take = share.min(first + count - next);
            if take == 0 {
                break;
            }
            let config = WorkerConfig {
                index,
                url: common.url.clone(),
                secret: common.secret.clone(),
                user_prefix: common.user_prefix.clone(),
                first_user: next,
                count: take,
                sources: sources.clone(),
                concurrency: common.concurrency.div_ceil(procs).max(1),
                join_concurrency: join_concurrency.div_ceil(procs).max(1),
                channel: channel.clone(),
                record_latency,
                token_ttl_secs: 6 * 3600,
                connect_timeout_ms: common.connect_timeout * 1000,
                threads: common.worker_threads,
                protocol: common.protocol,
            };
            workers.push(WorkerHandle::spawn(&exe, &config)?);
            next += take;
        }
        eprintln!("started {} worker process(es) for {count} connections", workers.len());
        Ok(Pool { workers, ticks_per_sec: sys::clock_ticks_per_sec() })
    }

    async fn batch(&mut self, cmd: Cmd, timeout: Duration) -> anyhow::Result<Batch> {
        let mut total = Batch::default();
        for evt in call_all(&mut self.workers, cmd, timeout).await? {
            match evt {
                Evt::Enrolled(batch) | Evt::Connected(batch) => total.add(&batch),
                other => bail!("unexpected worker answer {other:?}"),
            }
        }
        Ok(total)
    }

    /// Summed counters, worker CPU seconds, worker RSS KiB.
    async fn progress(&mut self) -> anyhow::Result<(Counts, f64, u64)> {
        let mut counts = Counts::default();
        let mut ticks = 0;
        let mut rss = 0;
        for evt in call_all(&mut self.workers, Cmd::Progress, Duration::from_secs(30)).await? {
            if let Evt::Progress { counts: more, cpu_ticks, rss_kib } = evt {
                counts.add(&more);
                ticks += cpu_ticks;
                rss += rss_kib;
            }
        }
        Ok((counts, ticks as f64 / self.ticks_per_sec as f64, rss))
    }

    async fn report(&mut self, latency: &mut Hist) -> anyhow::Result<(Counts, f64, u64)> {
        let mut counts = Counts::default();
        let mut ticks = 0;
        let mut rss = 0;
        for evt in call_all(&mut self.workers, Cmd::Report, Duration::from_secs(30)).await? {
            if let Evt::Report { counts: more, latency: sparse, cpu_ticks, rss_kib } = evt {
                counts.add(&more);
                latency.merge_sparse(&sparse);
                ticks += cpu_ticks;
                rss += rss_kib;
            }
        }
        Ok((counts, ticks as f64 / self.ticks_per_sec as f64, rss))
    }

    async fn stop(mut self) {
        if let Err(error) = call_all(&mut self.workers, Cmd::Stop, Duration::from_secs(30)).await {
            eprintln!("warning: stopping workers: {error:#}");
        }
        for worker in self.workers {
            worker.wait(Duration::from_secs(5)).await;
        }
    }
}

impl Common {
    /// With `--protocol centrifugo`, a URL without a path means Centrifugo's WebSocket endpoint.
    fn set_default_path(&mut self) {
        if self.protocol != Protocol::Centrifugo {
            return;
        }
        let rest = self.url.strip_prefix("ws://").unwrap_or(&self.url);
        if !rest.trim_end_matches('/').contains('/') {
            self.url = format!("{}{}", self.url.trim_end_matches('/'), centrifugo::WS_PATH);
        }
    }
}

fn connect_timeout(common: &Common, count: u64) -> Duration {
    // Generous: waves of `concurrency` handshakes, each bounded by --connect-timeout.
    let waves = count.div_ceil(common.concurrency.max(1) as u64);
    Duration::from_secs(120 + waves * common.connect_timeout)
}

fn check_server(common: &Common) -> anyhow::Result<()> {
    if let Some(pid) = common.server_pid {
        if !sys::alive(pid) {
            bail!("server pid {pid} is not running");
        }
    }
    Ok(())
}

fn server_cpu_secs(common: &Common, ticks_per_sec: u64) -> Option<f64> {
    common.server_pid.and_then(sys::cpu_ticks).map(|ticks| ticks as f64 / ticks_per_sec as f64)
}

fn describe_batch(what: &str, batch: &Batch) {
    eprintln!(
        "{what}: {} ok, {} already, {} failed in {:.2}s{}",
        batch.ok,
        batch.already,
        batch.failed,
        batch.secs,
        if batch.errors.is_empty() { String::new() } else { format!(" errors {:?}", batch.errors) }
    );
    for (kind, sample) in &batch.samples {
        eprintln!("  e.g. {kind}: {sample}");
    }
}

fn latency_json(hist: &Hist) -> serde_json::Value {
    let ms = |micros: u64| micros as f64 / 1000.0;
    json!({
        "count": hist.count(),
        "p50_ms": ms(hist.quantile(0.50)),
        "p90_ms": ms(hist.quantile(0.90)),
        "p99_ms": ms(hist.quantile(0.99)),
        "p999_ms": ms(hist.quantile(0.999)),
        "max_ms": ms(hist.max()),
        "mean_ms": hist.mean() / 1000.0,
    })
}

fn latency_line(hist: &Hist) -> String {
    let ms = |micros: u64| micros as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (n={})",
        ms(hist.quantile(0.5)),
        ms(hist.quantile(0.9)),
        ms(hist.quantile(0.99)),
        ms(hist.quantile(0.999)),
        ms(hist.max()),
        hist.count()
    )
}

fn fresh_name(prefix: &str) -> String {
    format!("{prefix}-{}", sys::now_nanos() / 1_000_000)
}

/// Connects one user from the parent (senders, channel creator).
async fn connect_user(common: &Common, target: &Target, index: u64) -> anyhow::Result<(client::Ws, client::Ready)> {
    let user = format!("{}{index}", common.user_prefix);
    let token = client::mint_token(&common.secret, &user, 6 * 3600)?;
    let source = if common.sources.is_empty() {
        None
    } else {
        common.sources.get((index % common.sources.len() as u64) as usize).copied()
    };
    client::connect(target, &token, source, Duration::from_secs(common.connect_timeout))
        .await
        .map_err(|error| anyhow!("connecting {user}: {error}"))
}

/// Creates the channel with user 0 and joins users 1..senders from the parent. Returns the channel id and
/// `last_seq`.
async fn create_channel(
    conns: &mut [(client::Ws, client::Ready)],
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(String, u64)> {
    let (first, rest) = conns.split_first_mut().ok_or_else(|| anyhow!("no sender connection"))?;
    let create = ClientFrame::CreateChannel {
        req_id: Some("c".into()),
        name: name.to_owned(),
        members: Vec::new(),
        visibility: None,
        posting: None,
    };
    let (id, last_seq) = match client::request(&mut first.0, &create, timeout).await? {
        ServerFrame::Channel { channel, .. } => (channel.id, channel.last_seq),
        other => bail!("create_channel answered {other:?}"),
    };
    for (ws, _) in rest {
        let join = ClientFrame::Join { req_id: Some("j".into()), channel: id.clone() };
        match client::request(ws, &join, timeout).await? {
            ServerFrame::Channel { .. } => {}
            other => bail!("join answered {other:?}"),
        }
    }
    Ok((id, last_seq))
}

struct Senders {
    stop_sending: watch::Sender<bool>,
    close: watch::Sender<bool>,
    done: Vec<oneshot::Receiver<SenderStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Senders {
    fn start(
        conns: Vec<(client::Ws, client::Ready)>,
        shared: &Arc<Shared>,
        next_seq: u64,
        plan: impl Fn(usize) -> SendPlan,
    ) -> Senders {
        let (stop_sending, _) = watch::channel(false);
        let (close, _) = watch::channel(false);
        let mut done = Vec::new();
        let mut tasks = Vec::new();
        for (index, (ws, ready)) in conns.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            done.push(rx);
            tasks.push(tokio::spawn(client::drive_sender(
                ws,
                shared.clone(),
                next_seq,
                ready.heartbeat,
                plan(index),
                stop_sending.subscribe(),
                close.subscribe(),
                tx,
            )));
        }
        Senders { stop_sending, close, done, tasks }
    }

    /// Waits for every sender to finish sending; returns merged stats.
    async fn finished(&mut self, timeout: Duration) -> anyhow::Result<SenderStats> {
        let mut total = SenderStats::default();
        let deadline = Instant::now() + timeout;
        for done in self.done.drain(..) {
            let stats = tokio::time::timeout_at(deadline, done)
                .await
                .map_err(|_| anyhow!("senders did not finish within {timeout:?}"))?
                .map_err(|_| anyhow!("a sender task ended without stats"))?;
            total.sent += stats.sent;
            total.acked += stats.acked;
            total.duplicate += stats.duplicate;
            total.ack_timeouts += stats.ack_timeouts;
            total.ack_latency.merge(&stats.ack_latency);
            for (code, count) in stats.errors {
                *total.errors.entry(code).or_default() += count;
            }
            if let Some(failure) = stats.failure {
                total.failure.get_or_insert(failure);
            }
        }
        Ok(total)
    }

    async fn close(self) {
        let _ = self.stop_sending.send(true);
        let _ = self.close.send(true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Polls until `expected` deliveries are counted (or `timeout`); returns the final total.
async fn drain(pool: &mut Pool, shared: &Shared, expected: u64, timeout: Duration) -> anyhow::Result<Counts> {
    let deadline = Instant::now() + timeout;
    loop {
        let (mut counts, _, _) = pool.progress().await?;
        counts.add(&shared.counts());
        if counts.deliveries >= expected || Instant::now() >= deadline {
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_json(value: serde_json::Value) {
    println!("{value}");
}

/// The result line; a Centrifugo run says so in `server`.
fn print_result(common: &Common, mut value: serde_json::Value) {
    if common.protocol == Protocol::Centrifugo {
        value["server"] = json!("centrifugo");
    }
    print_json(value);
}

// ---------------------------------------------------------------------------------------------------------
// idle

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let common = &args.common;
    Target::parse(&common.url)?;
    check_server(common)?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let pid = common.server_pid;
    let rss_before = pid.and_then(sys::rss_kib);
    let fds_before = pid.and_then(sys::open_fds);
    let mut pool = Pool::start(common, 0, args.connections, None, false, 1)?;
    let started = Instant::now();
    let batch = match pool.batch(Cmd::Connect, connect_timeout(common, args.connections)).await {
        Ok(batch) => batch,
        Err(error) => {
            pool.stop().await;
            return Err(error);
        }
    };
    let connect_secs = started.elapsed().as_secs_f64();
    describe_batch("connect", &batch);
    let mut connect_latency = Hist::new();
    connect_latency.merge_sparse(&batch.latency);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_after = pid.and_then(sys::rss_kib);
    let fds_after = pid.and_then(sys::open_fds);
    let (counts_measured, client_cpu, client_rss) = pool.progress().await?;
    eprintln!("holding {} connections for {}s", counts_measured.open, args.hold);
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let rss_end = pid.and_then(sys::rss_kib);
    let hwm = pid.and_then(sys::hwm_kib);
    let threads = pid.and_then(sys::threads);
    let (counts, _, _) = pool.progress().await?;
    pool.stop().await;

    let delta = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(after as i64 - before as i64),
        _ => None,
    };
    let per_conn = delta.filter(|_| batch.ok > 0).map(|delta| delta as f64 / batch.ok as f64);
    let rate = batch.ok as f64 / connect_secs.max(1e-9);
    println!("== idle: {} connections to {} ==", args.connections, common.url);
    println!(
        "connected {} ok, {} failed in {:.2}s => {:.0} connections/s (handshake+ready {})",
        batch.ok,
        batch.failed,
        connect_secs,
        rate,
        latency_line(&connect_latency)
    );
    if !batch.errors.is_empty() {
        println!("connect failures: {:?}", batch.errors);
    }
    match (rss_before, rss_after, per_conn) {
        (Some(before), Some(after), Some(per)) => println!(
            "server RSS {before} KiB -> {after} KiB (+{} KiB) => {per:.2} KiB per connection; after hold {} KiB, \
             peak {} KiB, {} threads, fds {} -> {}",
            after as i64 - before as i64,
            rss_end.unwrap_or(0),
            hwm.unwrap_or(0),
            threads.unwrap_or(0),
            fds_before.unwrap_or(0),
            fds_after.unwrap_or(0)
        ),
        _ => println!("server RSS not measured (pass --server-pid)"),
    }
    println!(
        "after hold: {} open, {} dropped {:?}; client: {:.1} KiB RSS per connection, {:.2}s CPU",
        counts.open,
        counts.dropped,
        counts.events,
        client_rss as f64 / batch.ok.max(1) as f64,
        client_cpu
    );
    print_result(
        common,
        json!({
            "mode": "idle",
            "connections": args.connections,
            "connected": batch.ok,
            "failed": batch.failed,
            "errors": batch.errors,
            "connect_secs": connect_secs,
            "connect_rate_per_sec": rate,
            "connect_latency": latency_json(&connect_latency),
            "server_rss_before_kib": rss_before,
            "server_rss_after_kib": rss_after,
            "server_rss_after_hold_kib": rss_end,
            "server_rss_peak_kib": hwm,
            "server_rss_delta_kib": delta,
            "server_kib_per_connection": per_conn,
            "server_fds_after": fds_after,
            "server_threads": threads,
            "open_after_hold": counts.open,
            "dropped": counts.dropped,
            "events": counts.events,
            "client_rss_kib": client_rss,
            "client_cpu_secs": client_cpu,
            "procs": pool_size(common, args.connections),
        }),
    );
    if batch.ok < args.connections || counts.dropped > 0 {
        bail!("{} of {} connections failed, {} dropped", batch.failed, args.connections, counts.dropped);
    }
    Ok(())
}

fn pool_size(common: &Common, count: u64) -> usize {
    plan_procs(common, count).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// fanout

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    check_server(common)?;
    if args.members < 2 {
        bail!("--members must be at least 2");
    }
    let timeout = Duration::from_secs(common.connect_timeout);
    let name = args.channel.clone().unwrap_or_else(|| fresh_name("fan"));
    let mut conns = vec![connect_user(common, &target, 0).await?];
    let limits = conns[0].1.limits.clone();
    if args.members > u64::from(limits.max_channel_members) {
        eprintln!(
            "warning: {} members exceed the server's max_channel_members {}",
            args.members, limits.max_channel_members
        );
    }
    let (channel, last_seq) = create_channel(&mut conns, &name, timeout).await?;
    eprintln!("created {channel} (last_seq {last_seq}); enrolling {} members", args.members - 1);

    let mut pool = Pool::start(common, 1, args.members - 1, Some(channel.clone()), true, args.join_concurrency)?;
    let result = fanout_run(&args, &mut pool, conns, &channel, last_seq).await;
    pool.stop().await;
    result
}

async fn fanout_run(
    args: &FanoutArgs,
    pool: &mut Pool,
    conns: Vec<(client::Ws, client::Ready)>,
    channel: &str,
    last_seq: u64,
) -> anyhow::Result<()> {
    let common = &args.common;
    let enrolled = pool.batch(Cmd::Enroll, connect_timeout(common, args.members)).await?;
    describe_batch("enroll (connect, join, close)", &enrolled);
    let connected = pool.batch(Cmd::Connect, connect_timeout(common, args.members)).await?;
    describe_batch("connect", &connected);
    if connected.not_member > 0 {
        eprintln!("warning: {} connected members do not list {channel} in ready", connected.not_member);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let shared = Arc::new(Shared::new(Some(channel.to_owned()), true));
    let (_, workers_cpu_before, _) = pool.progress().await?;
    let own_cpu_before = sys::self_cpu_ticks();
    let cpu_before = server_cpu_secs(common, pool.ticks_per_sec);
    let started = Instant::now();
    let interval = Duration::from_millis(args.interval_ms);
    let id_prefix = format!("{}-f", sys::now_nanos() / 1_000_000);
    let mut senders = Senders::start(conns, &shared, last_seq + 1, |_| SendPlan {
        channel: channel.to_owned(),
        id_prefix: id_prefix.clone(),
        count: args.messages,
        interval,
        burst: 0,
        window: 1,
        text_bytes: args.text_bytes,
        ack_timeout: Duration::from_secs(10),
    });
    eprintln!("sending {} messages {} ms apart to {channel}", args.messages, args.interval_ms);
    let sent = senders.finished(interval * args.messages as u32 + Duration::from_secs(60)).await;
    let sent = match sent {
        Ok(sent) => sent,
        Err(error) => {
            senders.close().await;
            return Err(error);
        }
    };
    let members_connected = connected.ok + 1;
    let expected = sent.acked * members_connected;
    drain(pool, &shared, expected, Duration::from_secs(15)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = server_cpu_secs(common, pool.ticks_per_sec);
    let own_cpu = (sys::self_cpu_ticks() - own_cpu_before) as f64 / pool.ticks_per_sec as f64;
    senders.close().await;
    let mut latency = Hist::new();
    let (mut final_counts, workers_cpu_after, client_rss) = pool.report(&mut latency).await?;
    let client_cpu = workers_cpu_after - workers_cpu_before + own_cpu;
    latency.merge_sparse(&shared.latency_sparse());
    final_counts.add(&shared.counts());
    let lost = expected.saturating_sub(final_counts.deliveries);
    let extra = final_counts.deliveries.saturating_sub(expected);
    let server_cpu = cpu_before.zip(cpu_after).map(|(before, after)| after - before);

    println!("== fanout: {} members in {channel}, {} messages ==", args.members, args.messages);
    println!(
        "members connected {} of {} (enroll failures {}, connect failures {})",
        members_connected, args.members, enrolled.failed, connected.failed
    );
    println!(
        "sent {} acked {} errors {:?} ack timeouts {}; send->send_result {}",
        sent.sent,
        sent.acked,
        sent.errors,
        sent.ack_timeouts,
        latency_line(&sent.ack_latency)
    );
    println!("delivery latency (send -> member receive): {}", latency_line(&latency));
    println!(
        "deliveries {} of {} expected: lost {lost}, extra {extra}, seq gaps {}, dupes {}, dropped connections {}",
        final_counts.deliveries, expected, final_counts.gaps, final_counts.dupes, final_counts.dropped
    );
    if !final_counts.events.is_empty() {
        println!("events: {:?}", final_counts.events);
    }
    if let Some(cpu) = server_cpu {
        println!("while sending: server CPU {cpu:.2}s, client CPU {client_cpu:.2}s over {elapsed:.1}s; client RSS {client_rss} KiB");
    }
    print_json(json!({
        "mode": "fanout",
        "channel": channel,
        "members": args.members,
        "members_connected": members_connected,
        "messages": args.messages,
        "interval_ms": args.interval_ms,
        "sent": sent.sent,
        "acked": sent.acked,
        "send_errors": sent.errors,
        "ack_timeouts": sent.ack_timeouts,
        "ack_latency": latency_json(&sent.ack_latency),
        "latency": latency_json(&latency),
        "deliveries": final_counts.deliveries,
        "expected": expected,
        "lost": lost,
        "extra": extra,
        "seq_gaps": final_counts.gaps,
        "seq_dupes": final_counts.dupes,
        "dropped": final_counts.dropped,
        "events": final_counts.events,
        "enroll_secs": enrolled.secs,
        "enroll_failed": enrolled.failed,
        "connect_secs": connected.secs,
        "connect_failed": connected.failed,
        "server_cpu_secs": server_cpu,
        "client_cpu_secs": client_cpu,
    }));
    if lost > 0 || final_counts.gaps > 0 || final_counts.dupes > 0 || sent.acked < args.messages {
        bail!(
            "fan-out incomplete: {lost} deliveries lost, {} gaps, {} dupes, {} of {} sends acked",
            final_counts.gaps,
            final_counts.dupes,
            sent.acked,
            args.messages
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// fanout against Centrifugo

/// `fanout` against Centrifugo: every member (u0…) connects and subscribes to `<namespace>:fan-<time>`
/// (Centrifugo has no membership to enroll into), and one publisher on the server HTTP API publishes the
/// messages one at a time, the next once the previous API call has returned (like Parley's `send_result`).
async fn fanout_centrifugo(args: FanoutArgs) -> anyhow::Result<()> {
    let common = &args.common;
    Target::parse(&common.url)?;
    check_server(common)?;
    if args.members == 0 {
        bail!("--members must be at least 1");
    }
    let api = args.centrifugo_api.as_deref().ok_or_else(|| anyhow!("--protocol centrifugo needs --centrifugo-api"))?;
    let api = ApiTarget::parse(api)?;
    let key = args
        .centrifugo_api_key
        .clone()
        .ok_or_else(|| anyhow!("--protocol centrifugo needs --centrifugo-api-key (or CENTRIFUGO_API_KEY)"))?;
    let mut publisher = Publisher::new(api, key);
    let name = args.channel.clone().unwrap_or_else(|| fresh_name("fan"));
    let channel = format!("{}:{name}", args.centrifugo_namespace);
    eprintln!("connecting {} members, each subscribing to {channel}", args.members);
    let mut pool = Pool::start(common, 0, args.members, Some(channel.clone()), true, 1)?;
    let result = fanout_centrifugo_run(&args, &mut pool, &mut publisher, &channel).await;
    pool.stop().await;
    result
}

async fn fanout_centrifugo_run(
    args: &FanoutArgs,
    pool: &mut Pool,
    publisher: &mut Publisher,
    channel: &str,
) -> anyhow::Result<()> {
    let common = &args.common;
    let connected = pool.batch(Cmd::Connect, connect_timeout(common, args.members)).await?;
    describe_batch("connect and subscribe", &connected);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The parent holds no subscriber: this only feeds `drain`.
    let shared = Shared::new(Some(channel.to_owned()), true);
    let (_, workers_cpu_before, _) = pool.progress().await?;
    let own_cpu_before = sys::self_cpu_ticks();
    let cpu_before = server_cpu_secs(common, pool.ticks_per_sec);
    let started = Instant::now();
    let interval = Duration::from_millis(args.interval_ms);
    let pad = "x".repeat(args.text_bytes);
    let mut sent = SenderStats::default();
    let mut offsets = Vec::new();
    eprintln!("publishing {} messages {} ms apart to {channel} over the server API", args.messages, args.interval_ms);
    let mut slot = Instant::now();
    for index in 0..args.messages {
        tokio::time::sleep_until(slot).await;
        slot += interval;
        let at = sys::now_nanos();
        let mut text = format!("t{at} i{index} ");
        if text.len() < args.text_bytes {
            text.push_str(&pad[..args.text_bytes - text.len()]);
        }
        sent.sent += 1;
        match tokio::time::timeout(Duration::from_secs(10), publisher.publish(channel, &text)).await {
            Ok(Ok(published)) => {
                sent.acked += 1;
                sent.ack_latency.record(sys::now_nanos().saturating_sub(at) / 1000);
                offsets.push(published.offset);
            }
            Ok(Err(error)) => {
                let kind = match &error {
                    centrifugo::CentrifugoError::Api { code, .. } => format!("api_{code}"),
                    centrifugo::CentrifugoError::Status { status, .. } => format!("http_{status}"),
                    _ => "io".to_owned(),
                };
                if sent.errors.is_empty() {
                    eprintln!("publish failed: {error}");
                }
                *sent.errors.entry(kind).or_default() += 1;
            }
            Err(_) => {
                sent.ack_timeouts += 1;
                publisher.reset();
            }
        }
    }
    // With history on, every publication gets the next offset of the channel's stream.
    let offsets_checked = !offsets.is_empty() && offsets.iter().all(|offset| *offset > 0);
    if !offsets_checked {
        eprintln!("warning: publications carry no offset (history off in the namespace?): order is not checked");
    }
    let members_connected = connected.ok;
    let expected = sent.acked * members_connected;
    drain(pool, &shared, expected, Duration::from_secs(15)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = server_cpu_secs(common, pool.ticks_per_sec);
    let own_cpu = (sys::self_cpu_ticks() - own_cpu_before) as f64 / pool.ticks_per_sec as f64;
    let mut latency = Hist::new();
    let (final_counts, workers_cpu_after, client_rss) = pool.report(&mut latency).await?;
    let client_cpu = workers_cpu_after - workers_cpu_before + own_cpu;
    let lost = expected.saturating_sub(final_counts.deliveries);
    let extra = final_counts.deliveries.saturating_sub(expected);
    let server_cpu = cpu_before.zip(cpu_after).map(|(before, after)| after - before);
    let per_cpu = server_cpu.filter(|cpu| *cpu > 0.0).map(|cpu| final_counts.deliveries as f64 / cpu);

    println!("== fanout (centrifugo): {} members subscribed to {channel}, {} messages ==", args.members, args.messages);
    println!(
        "members connected {} of {} (connect/subscribe failures {})",
        members_connected, args.members, connected.failed
    );
    println!(
        "published {} acked {} errors {:?} timeouts {}; publish->API answer {}",
        sent.sent,
        sent.acked,
        sent.errors,
        sent.ack_timeouts,
        latency_line(&sent.ack_latency)
    );
    println!("delivery latency (publish -> member receive): {}", latency_line(&latency));
    println!(
        "deliveries {} of {} expected: lost {lost}, extra {extra}, offset gaps {}, dupes {}, dropped connections {}",
        final_counts.deliveries, expected, final_counts.gaps, final_counts.dupes, final_counts.dropped
    );
    if !final_counts.events.is_empty() {
        println!("events: {:?}", final_counts.events);
    }
    if let Some(cpu) = server_cpu {
        println!(
            "while publishing: server CPU {cpu:.2}s ({:.0} deliveries per server CPU second), client CPU \
             {client_cpu:.2}s over {elapsed:.1}s; client RSS {client_rss} KiB",
            per_cpu.unwrap_or(0.0)
        );
    }
    print_result(
        common,
        json!({
            "mode": "fanout",
            "channel": channel,
            "members": args.members,
            "members_connected": members_connected,
            "messages": args.messages,
            "interval_ms": args.interval_ms,
            "publisher": "http_api",
            "sent": sent.sent,
            "acked": sent.acked,
            "send_errors": sent.errors,
            "ack_timeouts": sent.ack_timeouts,
            "ack_latency": latency_json(&sent.ack_latency),
            "latency": latency_json(&latency),
            "deliveries": final_counts.deliveries,
            "expected": expected,
            "lost": lost,
            "extra": extra,
            "offsets_checked": offsets_checked,
            "seq_gaps": final_counts.gaps,
            "seq_dupes": final_counts.dupes,
            "dropped": final_counts.dropped,
            "events": final_counts.events,
            "enroll_secs": 0.0,
            "enroll_failed": 0,
            "connect_secs": connected.secs,
            "connect_failed": connected.failed,
            "server_cpu_secs": server_cpu,
            "deliveries_per_server_cpu_sec": per_cpu,
            "client_cpu_secs": client_cpu,
        }),
    );
    if lost > 0
        || final_counts.gaps > 0
        || final_counts.dupes > 0
        || sent.acked < args.messages
        || connected.ok < args.members
        || final_counts.dropped > 0
    {
        bail!(
            "fan-out incomplete: {} of {} members connected, {lost} deliveries lost, {} gaps, {} dupes, {} \
             dropped, {} of {} publishes acked",
            connected.ok,
            args.members,
            final_counts.gaps,
            final_counts.dupes,
            final_counts.dropped,
            sent.acked,
            args.messages
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// throughput

struct Snapshot {
    at: Instant,
    deliveries: u64,
    confirmed: u64,
    server_cpu: Option<f64>,
    /// CPU clock ticks of each `--cpu-pids` process, in its order (`None`: the process is gone).
    processes: Vec<Option<u64>>,
    client_cpu: f64,
}

async fn snapshot(pool: &mut Pool, shared: &Shared, args: &ThroughputArgs) -> anyhow::Result<Snapshot> {
    let ticks_per_sec = pool.ticks_per_sec as f64;
    let server_cpu = server_cpu_secs(&args.common, pool.ticks_per_sec);
    let processes = args.cpu_pids.iter().map(|(_, pid)| sys::cpu_ticks(*pid)).collect();
    let at = Instant::now();
    let confirmed = shared.confirmed.load(std::sync::atomic::Ordering::Relaxed);
    let (counts, worker_cpu, _) = pool.progress().await?;
    let own_cpu = sys::self_cpu_ticks() as f64 / ticks_per_sec;
    Ok(Snapshot {
        at,
        deliveries: counts.deliveries + shared.counts().deliveries,
        confirmed,
        server_cpu,
        processes,
        client_cpu: worker_cpu + own_cpu,
    })
}

/// Fails unless every `--cpu-pids` name is unique and its process is running.
fn check_cpu_pids(cpu_pids: &[(String, u32)]) -> anyhow::Result<()> {
    for (index, (name, pid)) in cpu_pids.iter().enumerate() {
        if cpu_pids[..index].iter().any(|(other, _)| other == name) {
            bail!("--cpu-pids: the name {name} is given twice");
        }
        if !sys::alive(*pid) || sys::cpu_ticks(*pid).is_none() {
            bail!("--cpu-pids: {name} (pid {pid}) is not running or its /proc/{pid}/stat is unreadable");
        }
    }
    Ok(())
}

async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let target = Target::parse(&common.url)?;
    check_server(common)?;
    check_cpu_pids(&args.cpu_pids)?;
    if args.senders == 0 || args.members <= args.senders {
        bail!("need --senders >= 1 and --members > --senders");
    }
    let timeout = Duration::from_secs(common.connect_timeout);
    let name = args.channel.clone().unwrap_or_else(|| fresh_name("tp"));
    let mut conns = Vec::new();
    for index in 0..args.senders {
        conns.push(connect_user(common, &target, index).await?);
    }
    let (channel, last_seq) = create_channel(&mut conns, &name, timeout).await?;
    eprintln!("created {channel}; enrolling {} members", args.members - args.senders);
    let mut pool = Pool::start(
        common,
        args.senders,
        args.members - args.senders,
        Some(channel.clone()),
        true,
        args.join_concurrency,
    )?;
    let result = throughput_run(&args, &mut pool, conns, &channel, last_seq).await;
    pool.stop().await;
    result
}

async fn throughput_run(
    args: &ThroughputArgs,
    pool: &mut Pool,
    conns: Vec<(client::Ws, client::Ready)>,
    channel: &str,
    last_seq: u64,
) -> anyhow::Result<()> {
    let common = &args.common;
    let enrolled = pool.batch(Cmd::Enroll, connect_timeout(common, args.members)).await?;
    describe_batch("enroll (connect, join, close)", &enrolled);
    let connected = pool.batch(Cmd::Connect, connect_timeout(common, args.members)).await?;
    describe_batch("connect", &connected);
    let members_connected = connected.ok + args.senders;

    let limits = conns[0].1.limits.clone();
    let server_rate = f64::from(limits.send_rate_per_sec.max(1));
    let rate = args.rate_per_sender.unwrap_or(server_rate * 0.95).max(0.1);
    if rate > server_rate {
        eprintln!("warning: --rate-per-sender {rate} exceeds the server's send_rate_per_sec {server_rate}");
    }
    if server_rate * (args.senders as f64) * (members_connected as f64) < 150_000.0 {
        eprintln!(
            "note: the server allows {} sends/s per connection: {} senders x {} members can reach at most {:.0} \
             deliveries/s; start the server with a higher --send-rate-per-sec for a throughput test",
            limits.send_rate_per_sec,
            args.senders,
            members_connected,
            server_rate * args.senders as f64 * members_connected as f64
        );
    }
    let burst = (limits.send_burst / 2).max(1);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let shared = Arc::new(Shared::new(Some(channel.to_owned()), true));
    let id_prefix = format!("{}-t", sys::now_nanos() / 1_000_000);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut senders = Senders::start(conns, &shared, last_seq + 1, |index| SendPlan {
        channel: channel.to_owned(),
        id_prefix: format!("{id_prefix}{index}-"),
        count: u64::MAX,
        interval,
        burst,
        window: args.window,
        text_bytes: args.text_bytes,
        ack_timeout: Duration::from_secs(10),
    });
    eprintln!(
        "{} senders at {rate:.0} sends/s each (window {}), {}s warm-up + {}s measured",
        args.senders, args.window, args.warmup, args.duration
    );
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let begin = snapshot(pool, &shared, args).await?;
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let end = snapshot(pool, &shared, args).await?;
    let _ = senders.stop_sending.send(true);
    let sent = senders.finished(Duration::from_secs(30)).await;
    let sent = match sent {
        Ok(sent) => sent,
        Err(error) => {
            senders.close().await;
            return Err(error);
        }
    };
    let expected = sent.acked * members_connected;
    drain(pool, &shared, expected, Duration::from_secs(15)).await?;
    senders.close().await;
    let mut latency = Hist::new();
    let (mut final_counts, _, client_rss) = pool.report(&mut latency).await?;
    latency.merge_sparse(&shared.latency_sparse());
    final_counts.add(&shared.counts());

    let wall = end.at.duration_since(begin.at).as_secs_f64();
    let window_deliveries = end.deliveries - begin.deliveries;
    let per_sec = window_deliveries as f64 / wall.max(1e-9);
    let server_cpu = begin.server_cpu.zip(end.server_cpu).map(|(a, b)| b - a);
    let per_core = server_cpu.filter(|cpu| *cpu > 0.0).map(|cpu| window_deliveries as f64 / cpu);
    let client_cpu = end.client_cpu - begin.client_cpu;
    let lost = expected.saturating_sub(final_counts.deliveries);
    let window_confirmed = end.confirmed - begin.confirmed;
    let process_cpu: Vec<(&str, Option<f64>)> = args
        .cpu_pids
        .iter()
        .zip(begin.processes.iter().zip(&end.processes))
        .map(|((name, _), (a, b))| {
            (name.as_str(), a.zip(*b).map(|(a, b)| b.saturating_sub(a) as f64 / pool.ticks_per_sec as f64))
        })
        .collect();

    println!(
        "== throughput: {} members ({} senders) in {channel}, {}s measured ==",
        members_connected, args.senders, args.duration
    );
    println!(
        "deliveries in window: {window_deliveries} in {wall:.2}s => {per_sec:.0} deliveries/s ({:.0} messages/s)",
        per_sec / members_connected as f64
    );
    match (server_cpu, per_core) {
        (Some(cpu), Some(per_core)) => println!(
            "server CPU {cpu:.2}s over {wall:.2}s ({:.0}% of one core) => {per_core:.0} deliveries per CPU second",
            100.0 * cpu / wall
        ),
        _ => println!("server CPU not measured (pass --server-pid)"),
    }
    println!("client CPU {client_cpu:.2}s over the window ({:.0}% of one core)", 100.0 * client_cpu / wall);
    if !process_cpu.is_empty() {
        print_process_cpu(&process_cpu, window_confirmed, window_deliveries, wall);
    }
    println!(
        "sent {} acked {} errors {:?} ack timeouts {}; send->send_result {}",
        sent.sent,
        sent.acked,
        sent.errors,
        sent.ack_timeouts,
        latency_line(&sent.ack_latency)
    );
    println!("delivery latency under load: {}", latency_line(&latency));
    println!(
        "deliveries total {} of {} expected: lost {lost}, seq gaps {}, dupes {}, dropped connections {} {:?}",
        final_counts.deliveries,
        expected,
        final_counts.gaps,
        final_counts.dupes,
        final_counts.dropped,
        final_counts.events
    );
    print_json(json!({
        "mode": "throughput",
        "channel": channel,
        "members": args.members,
        "members_connected": members_connected,
        "senders": args.senders,
        "rate_per_sender": rate,
        "server_send_rate_per_sec": limits.send_rate_per_sec,
        "server_send_burst": limits.send_burst,
        "window": args.window,
        "duration_secs": wall,
        "deliveries_in_window": window_deliveries,
        "confirmed_in_window": window_confirmed,
        "confirmed_per_sec": window_confirmed as f64 / wall.max(1e-9),
        "deliveries_per_sec": per_sec,
        "messages_per_sec": per_sec / members_connected as f64,
        "server_cpu_secs": server_cpu,
        "server_cpu_cores": server_cpu.map(|cpu| cpu / wall),
        "deliveries_per_server_cpu_sec": per_core,
        "client_cpu_secs": client_cpu,
        "process_cpu": process_cpu.iter().map(|(name, cpu)| ((*name).to_owned(), json!(cpu))).collect::<serde_json::Map<_, _>>(),
        "client_rss_kib": client_rss,
        "sent": sent.sent,
        "acked": sent.acked,
        "send_errors": sent.errors,
        "ack_timeouts": sent.ack_timeouts,
        "ack_latency": latency_json(&sent.ack_latency),
        "latency": latency_json(&latency),
        "deliveries_total": final_counts.deliveries,
        "expected_total": expected,
        "lost": lost,
        "seq_gaps": final_counts.gaps,
        "seq_dupes": final_counts.dupes,
        "dropped": final_counts.dropped,
        "events": final_counts.events,
    }));
    if let Some(failure) = sent.failure {
        bail!("a sender failed: {failure}");
    }
    let gone: Vec<&str> = process_cpu.iter().filter(|(_, cpu)| cpu.is_none()).map(|(name, _)| *name).collect();
    if !gone.is_empty() {
        bail!("--cpu-pids: {} exited during the measured window; its CPU time is not known", gone.join(", "));
    }
    Ok(())
}

/// One line per `--cpu-pids` process and their sum: CPU seconds over the window, µs per confirmed message and
/// per delivery.
fn print_process_cpu(process_cpu: &[(&str, Option<f64>)], confirmed: u64, deliveries: u64, wall: f64) {
    let per = |cpu: f64, count: u64| if count == 0 { f64::NAN } else { cpu * 1e6 / count as f64 };
    println!("CPU per process over the window ({confirmed} messages confirmed, {deliveries} deliveries):");
    let mut sum = 0.0;
    for (name, cpu) in process_cpu {
        match cpu {
            Some(cpu) => {
                sum += cpu;
                println!(
                    "  {name:<12} {cpu:>7.2}s ({:>3.0}% of one core) {:>8.1} µs/message {:>7.2} µs/delivery",
                    100.0 * cpu / wall,
                    per(*cpu, confirmed),
                    per(*cpu, deliveries)
                );
            }
            None => println!("  {name:<12} exited during the window"),
        }
    }
    println!(
        "  {:<12} {sum:>7.2}s ({:>3.0}% of one core) {:>8.1} µs/message {:>7.2} µs/delivery",
        "sum",
        100.0 * sum / wall,
        per(sum, confirmed),
        per(sum, deliveries)
    );
}

#[cfg(test)]
mod tests {
    use super::parse_named_pid;

    #[test]
    fn parses_name_pid_pairs() {
        assert_eq!(parse_named_pid("gateway=123"), Ok(("gateway".to_owned(), 123)));
        assert_eq!(parse_named_pid(" kafka = 7"), Ok(("kafka".to_owned(), 7)));
        assert!(parse_named_pid("gateway").is_err());
        assert!(parse_named_pid("=12").is_err());
        assert!(parse_named_pid("redis=x").is_err());
    }
}
