//! Worker processes: each holds a share of the member connections (a process may open at most ~20,000 files)
//! and answers the parent's commands, one JSON line per command on stdin and one per event on stdout.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use parley_core::protocol::{ClientFrame, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{self, Counts, Shared, Target};
use crate::hist::{Hist, SparseHist};
use crate::{centrifugo, sys};

/// Which server the connections speak to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Parley's wire protocol v1.
    #[default]
    Parley,
    /// Centrifugo v6's JSON client protocol (connect, subscribe; no channel membership).
    Centrifugo,
}

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Worker number (for messages).
    pub index: usize,
    /// Server URL.
    pub url: String,
    /// HS256 secret.
    pub secret: String,
    /// Users are `<prefix><n>`.
    pub user_prefix: String,
    /// First user number.
    pub first_user: u64,
    /// How many users (connections).
    pub count: u64,
    /// Source addresses to spread connections over (empty: the kernel picks).
    pub sources: Vec<IpAddr>,
    /// Concurrent handshakes (connect) or joins (enroll).
    pub concurrency: usize,
    /// Concurrent connections while enrolling.
    pub join_concurrency: usize,
    /// The channel to enroll into and count deliveries of.
    pub channel: Option<String>,
    /// Record per-delivery latency.
    pub record_latency: bool,
    /// Token lifetime.
    pub token_ttl_secs: u64,
    /// Per-connection handshake timeout.
    pub connect_timeout_ms: u64,
    /// Runtime threads (1: a single-threaded runtime, which wakes connections without cross-thread
    /// handoffs; 0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// The server's protocol. Centrifugo connections subscribe to `channel` (when set) right after connecting.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Parent → worker.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Join every user to the channel: connect, `join`, close.
    Enroll,
    /// Open every connection and keep it open.
    Connect,
    /// Current counters.
    Progress,
    /// Counters and the latency histogram.
    Report,
    /// Close everything and exit.
    Stop,
}

/// Outcome of a batch of connection attempts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Succeeded.
    pub ok: u64,
    /// Succeeded without work (enroll: already a member).
    pub already: u64,
    /// Failed.
    pub failed: u64,
    /// Wall time.
    pub secs: f64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// One example message per failure kind.
    pub samples: BTreeMap<String, String>,
    /// Connect (TCP + handshake + ready) latency, µs.
    pub latency: SparseHist,
    /// Connected users whose `ready` did not list the channel as joined.
    pub not_member: u64,
}

impl Batch {
    /// Adds another batch (wall time: the longest).
    pub fn add(&mut self, other: &Batch) {
        self.ok += other.ok;
        self.already += other.already;
        self.failed += other.failed;
        self.secs = self.secs.max(other.secs);
        self.not_member += other.not_member;
        let mut latency = Hist::new();
        latency.merge_sparse(&self.latency);
        latency.merge_sparse(&other.latency);
        self.latency = latency.to_sparse();
        for (key, value) in &other.errors {
            *self.errors.entry(key.clone()).or_default() += value;
        }
        for (key, value) in &other.samples {
            self.samples.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }

    fn fail(&mut self, kind: String, detail: String) {
        self.failed += 1;
        *self.errors.entry(kind.clone()).or_default() += 1;
        self.samples.entry(kind).or_insert(detail);
    }
}

/// Worker → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "evt", rename_all = "snake_case")]
pub enum Evt {
    /// Enroll finished.
    Enrolled(Batch),
    /// Connect finished.
    Connected(Batch),
    /// Counters.
    Progress {
        /// Counters.
        counts: Counts,
        /// This worker's CPU time in clock ticks.
        cpu_ticks: u64,
        /// This worker's RSS.
        rss_kib: u64,
    },
    /// Counters and latency.
    Report {
        /// Counters.
        counts: Counts,
        /// Delivery latency, µs.
        latency: SparseHist,
        /// This worker's CPU time in clock ticks.
        cpu_ticks: u64,
        /// This worker's RSS.
        rss_kib: u64,
    },
    /// Closed everything.
    Stopped,
    /// The command failed.
    Failed {
        /// Why.
        error: String,
    },
}

struct Worker {
    config: WorkerConfig,
    target: Target,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    holders: Vec<JoinHandle<()>>,
}

fn user(config: &WorkerConfig, offset: u64) -> String {
    format!("{}{}", config.user_prefix, config.first_user + offset)
}

fn source(config: &WorkerConfig, offset: u64) -> Option<IpAddr> {
    if config.sources.is_empty() {
        None
    } else {
        let global = config.first_user + offset;
        config.sources.get((global % config.sources.len() as u64) as usize).copied()
    }
}

impl Worker {
    fn new(config: WorkerConfig) -> anyhow::Result<Worker> {
        let target = Target::parse(&config.url)?;
        let shared = Arc::new(Shared::new(config.channel.clone(), config.record_latency));
        let (stop, _) = watch::channel(false);
        Ok(Worker { config, target, shared, stop, holders: Vec::new() })
    }

    async fn enroll(&mut self) -> anyhow::Result<Batch> {
        if self.config.protocol == Protocol::Centrifugo {
            bail!("Centrifugo has no channel membership: connections subscribe when they connect");
        }
        let channel = self.config.channel.clone().ok_or_else(|| anyhow!("enroll needs a channel"))?;
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.config.join_concurrency.max(1)));
        let (results, mut outcomes) = mpsc::unbounded_channel::<Result<bool, (String, String)>>();
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        for offset in 0..self.config.count {
            let permit = permits.clone().acquire_owned().await.context("semaphore closed")?;
            let token =
                client::mint_token(&self.config.secret, &user(&self.config, offset), self.config.token_ttl_secs)?;
            let target = self.target.clone();
            let source = source(&self.config, offset);
            let channel = channel.clone();
            let results = results.clone();
            tokio::spawn(async move {
                let outcome = async {
                    let (mut ws, ready) = client::connect(&target, &token, source, timeout)
                        .await
                        .map_err(|error| (error.kind, error.detail))?;
                    if client::next_seq_from(&ready, Some(&channel)) != 0 {
                        let _ = ws.close(None).await;
                        return Ok(true);
                    }
                    let join = ClientFrame::Join { req_id: Some("j".into()), channel: channel.clone() };
                    let answer = client::request(&mut ws, &join, timeout).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                    match answer {
                        Ok(ServerFrame::Channel { channel: view, .. }) if view.joined => Ok(false),
                        Ok(other) => Err(("join_unexpected".to_owned(), format!("{other:?}"))),
                        Err(error) => {
                            let text = format!("{error:#}");
                            let kind = text
                                .strip_prefix("server answered ")
                                .and_then(|rest| rest.split(':').next())
                                .map(|code| format!("join_{code}"))
                                .unwrap_or_else(|| "join_failed".to_owned());
                            Err((kind, text))
                        }
                    }
                }
                .await;
                drop(permit);
                let _ = results.send(outcome);
            });
        }
        drop(results);
        let mut batch = Batch::default();
        while let Some(outcome) = outcomes.recv().await {
            match outcome {
                Ok(false) => batch.ok += 1,
                Ok(true) => batch.already += 1,
                Err((kind, detail)) => batch.fail(kind, detail),
            }
        }
        batch.secs = started.elapsed().as_secs_f64();
        Ok(batch)
    }

    async fn connect(&mut self) -> anyhow::Result<Batch> {
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let (results, mut outcomes) = mpsc::unbounded_channel::<Result<(u64, bool), (String, String)>>();
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        self.holders.reserve(self.config.count as usize);
        for offset in 0..self.config.count {
            let permit = permits.clone().acquire_owned().await.context("semaphore closed")?;
            let token =
                client::mint_token(&self.config.secret, &user(&self.config, offset), self.config.token_ttl_secs)?;
            let target = self.target.clone();
            let source = source(&self.config, offset);
            let shared = self.shared.clone();
            let stop = self.stop.subscribe();
            let results = results.clone();
            let phase = (self.config.first_user + offset).wrapping_mul(618) % 1000;
            if self.config.protocol == Protocol::Centrifugo {
                self.holders.push(tokio::spawn(async move {
                    let begun = Instant::now();
                    let outcome =
                        centrifugo::connect(&target, &token, source, shared.channel.as_deref(), timeout).await;
                    drop(permit);
                    drop(token);
                    match outcome {
                        Ok((ws, subscribed)) => {
                            let _ = results.send(Ok((begun.elapsed().as_micros() as u64, true)));
                            drop(results);
                            centrifugo::hold(ws, shared, subscribed, stop).await;
                        }
                        Err(error) => {
                            let _ = results.send(Err((error.kind, error.detail)));
                        }
                    }
                }));
                continue;
            }
            self.holders.push(tokio::spawn(async move {
                let begun = Instant::now();
                let outcome = client::connect(&target, &token, source, timeout).await;
                drop(permit);
                drop(token);
                match outcome {
                    Ok((ws, ready)) => {
                        let member =
                            shared.channel.is_none() || client::next_seq_from(&ready, shared.channel.as_deref()) != 0;
                        let _ = results.send(Ok((begun.elapsed().as_micros() as u64, member)));
                        drop(results);
                        client::hold(ws, shared, ready, phase, stop).await;
                    }
                    Err(error) => {
                        let _ = results.send(Err((error.kind, error.detail)));
                    }
                }
            }));
        }
        drop(results);
        let mut batch = Batch::default();
        let mut latency = Hist::new();
        for _ in 0..self.config.count {
            match outcomes.recv().await {
                Some(Ok((micros, member))) => {
                    batch.ok += 1;
                    latency.record(micros);
                    if !member {
                        batch.not_member += 1;
                    }
                }
                Some(Err((kind, detail))) => batch.fail(kind, detail),
                None => break,
            }
        }
        batch.latency = latency.to_sparse();
        batch.secs = started.elapsed().as_secs_f64();
        Ok(batch)
    }

    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        for holder in self.holders.drain(..) {
            let abort = holder.abort_handle();
            if tokio::time::timeout_at(deadline, holder).await.is_err() {
                abort.abort();
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) -> Evt {
        let result = match cmd {
            Cmd::Enroll => self.enroll().await.map(Evt::Enrolled),
            Cmd::Connect => self.connect().await.map(Evt::Connected),
            Cmd::Progress => Ok(Evt::Progress {
                counts: self.shared.counts(),
                cpu_ticks: sys::self_cpu_ticks(),
                rss_kib: sys::rss_kib(std::process::id()).unwrap_or(0),
            }),
            Cmd::Report => Ok(Evt::Report {
                counts: self.shared.counts(),
                latency: self.shared.latency_sparse(),
                cpu_ticks: sys::self_cpu_ticks(),
                rss_kib: sys::rss_kib(std::process::id()).unwrap_or(0),
            }),
            Cmd::Stop => {
                self.stop().await;
                Ok(Evt::Stopped)
            }
        };
        result.unwrap_or_else(|error| Evt::Failed { error: format!("worker {}: {error:#}", self.config.index) })
    }
}

/// Entry point of a worker child process: reads commands from stdin, writes events to stdout.
pub fn worker_main(config_json: &str) -> anyhow::Result<()> {
    let config: WorkerConfig = serde_json::from_str(config_json).context("bad worker config")?;
    let runtime = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        threads => tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build(),
    }
    .context("tokio runtime")?;
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(4);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Cmd>(&line) {
                Ok(cmd) => {
                    if cmd_tx.blocking_send(cmd).is_err() {
                        return;
                    }
                }
                Err(error) => eprintln!("worker: ignoring bad command {line:?}: {error}"),
            }
        }
        // The parent went away: stop.
        let _ = cmd_tx.blocking_send(Cmd::Stop);
    });
    runtime.block_on(async move {
        let mut worker = Worker::new(config)?;
        while let Some(cmd) = cmd_rx.recv().await {
            let evt = worker.handle(cmd).await;
            let line = serde_json::to_string(&evt).context("encoding event")?;
            let mut stdout = std::io::stdout().lock();
            if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                worker.stop().await;
                break;
            }
            if matches!(cmd, Cmd::Stop) {
                break;
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The parent's handle on one worker process.
pub struct WorkerHandle {
    index: usize,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerHandle {
    /// Starts `exe __worker <config>`.
    pub fn spawn(exe: &std::path::Path, config: &WorkerConfig) -> anyhow::Result<WorkerHandle> {
        let json = serde_json::to_string(config).context("encoding worker config")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("__worker")
            .arg(json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {}", config.index))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("worker stdout"))?;
        Ok(WorkerHandle { index: config.index, child, stdin, lines: BufReader::new(stdout).lines() })
    }

    /// Sends a command and waits for its event.
    pub async fn call(&mut self, cmd: Cmd, timeout: Duration) -> anyhow::Result<Evt> {
        let mut line = serde_json::to_string(&cmd).context("encoding command")?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.with_context(|| format!("worker {} is gone", self.index))?;
        self.stdin.flush().await.with_context(|| format!("worker {} is gone", self.index))?;
        let answer = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("worker {} did not answer {cmd:?} within {timeout:?}", self.index))?
            .with_context(|| format!("reading from worker {}", self.index))?
            .ok_or_else(|| anyhow!("worker {} exited (see its stderr above)", self.index))?;
        let evt: Evt = serde_json::from_str(&answer).with_context(|| format!("bad event {answer:?}"))?;
        if let Evt::Failed { error } = &evt {
            bail!("{error}");
        }
        Ok(evt)
    }

    /// Waits for the process to exit (after `Stop`), killing it after `timeout`.
    pub async fn wait(mut self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Sends `cmd` to every worker at once and collects the answers in order.
pub async fn call_all(workers: &mut [WorkerHandle], cmd: Cmd, timeout: Duration) -> anyhow::Result<Vec<Evt>> {
    let calls = workers.iter_mut().map(|worker| worker.call(cmd, timeout));
    futures_util::future::try_join_all(calls).await
}
