//! `parley-floor`: the machine's floor for a fan-out, with no chat server in the way. One process (the "server")
//! writes one small frame to each of N loopback TCP connections with one `write()` each, the way a gateway sends
//! one WebSocket frame per member; receiver processes (the "clients", on the same cores, as the load tool's are)
//! read them. It reports the wall time of a fan-out, the delivery latency (send start → receive), and the CPU
//! each side spent per delivery: what no server can beat on this machine.
//!
//!   parley-floor --connections 10000 --rounds 20 --interval-ms 200 --bytes 200 --sender-threads 2
//!
//! Loopback only; bounded by `--rounds` and `--timeout`. Progress goes to stderr, the summary to stdout, then one
//! JSON line with every figure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use parley_e2e::hist::{Hist, SparseHist};
use parley_e2e::sys;
use serde_json::json;

#[derive(Parser)]
#[command(name = "parley-floor", about = "The loopback floor of a fan-out: one write() per connection, no server")]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Connections (members of the fan-out).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Fan-outs (one frame to every connection each).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Milliseconds between fan-outs.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Bytes per frame (at least 16: a send time and a round number lead it), like a `message` frame.
    #[arg(long, default_value_t = 200)]
    bytes: usize,
    /// Threads writing a fan-out (the connections split evenly between them).
    #[arg(long, default_value_t = 2)]
    sender_threads: usize,
    /// Receiver processes (the connections split evenly between them).
    #[arg(long, default_value_t = 1)]
    receivers: usize,
    /// Abort after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Subcommand)]
enum Mode {
    /// Internal: a receiver process.
    #[command(name = "__receiver", hide = true)]
    Receiver {
        /// The sender's address.
        #[arg(long)]
        addr: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        connections: usize,
        /// Frames to read on each connection.
        #[arg(long)]
        rounds: usize,
        /// Bytes per frame.
        #[arg(long)]
        bytes: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::Receiver { addr, connections, rounds, bytes }) => receiver(addr, connections, rounds, bytes),
        None => {
            let (done, deadline) = std::sync::mpsc::channel::<()>();
            let timeout = Duration::from_secs(cli.timeout);
            std::thread::spawn(move || {
                if deadline.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    eprintln!("parley-floor: no result within {}s; giving up", timeout.as_secs());
                    std::process::exit(2);
                }
            });
            let result = sender(&cli);
            let _ = done.send(());
            result
        }
    }
}

/// One receiver process as the sender sees it.
struct Receiver {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

fn sender(cli: &Cli) -> anyhow::Result<()> {
    if cli.bytes < 16 {
        bail!("--bytes must be at least 16");
    }
    if cli.connections == 0 || cli.receivers == 0 || cli.sender_threads == 0 || cli.rounds == 0 {
        bail!("--connections, --receivers, --sender-threads and --rounds must be at least 1");
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("listen on loopback")?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut receivers = Vec::new();
    let per_receiver = cli.connections.div_ceil(cli.receivers);
    let mut remaining = cli.connections;
    while remaining > 0 {
        let count = per_receiver.min(remaining);
        remaining -= count;
        let mut child = Command::new(&exe)
            .args(["__receiver", "--addr", &addr.to_string(), "--connections", &count.to_string()])
            .args(["--rounds", &cli.rounds.to_string(), "--bytes", &cli.bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start a receiver process")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("receiver stdout")?);
        receivers.push(Receiver { child, stdin, stdout });
    }
    let mut sockets = Vec::with_capacity(cli.connections);
    let started = Instant::now();
    while sockets.len() < cli.connections {
        let (socket, _) = listener.accept().context("accept")?;
        socket.set_nodelay(true)?;
        sockets.push(socket);
    }
    eprintln!("{} connections in {:.2}s", sockets.len(), started.elapsed().as_secs_f64());
    // Every receiver says when all its connections are up.
    for receiver in &mut receivers {
        let mut line = String::new();
        receiver.stdout.read_line(&mut line)?;
        if line.trim() != "connected" {
            bail!("a receiver did not connect: {line:?}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));

    let ticks = sys::clock_ticks_per_sec() as f64;
    let receiver_ticks = |receivers: &[Receiver]| -> u64 {
        receivers.iter().filter_map(|receiver| sys::cpu_ticks(receiver.child.id())).sum()
    };
    let sender_before = sys::self_cpu_ticks();
    let receivers_before = receiver_ticks(&receivers);
    let mut send_loop = Hist::new();
    let chunk = sockets.len().div_ceil(cli.sender_threads);
    for round in 0..cli.rounds {
        let sent_at = sys::now_nanos();
        let mut frame = vec![b'x'; cli.bytes];
        frame[..8].copy_from_slice(&sent_at.to_le_bytes());
        frame[8..16].copy_from_slice(&(round as u64).to_le_bytes());
        let begun = Instant::now();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let handles: Vec<_> = sockets
                .chunks_mut(chunk)
                .map(|part| {
                    let frame = &frame;
                    scope.spawn(move || -> std::io::Result<()> {
                        for socket in part {
                            socket.write_all(frame)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for handle in handles {
                handle.join().map_err(|_| anyhow::anyhow!("a sender thread panicked"))??;
            }
            Ok(())
        })?;
        send_loop.record(begun.elapsed().as_micros() as u64);
        std::thread::sleep(Duration::from_millis(cli.interval_ms));
    }
    // Each receiver answers once it read every frame: its latency histogram, then it waits for its stdin to close.
    let mut latency = Hist::new();
    for receiver in &mut receivers {
        let mut line = String::new();
        receiver.stdout.read_line(&mut line)?;
        let sparse: SparseHist =
            serde_json::from_str(line.trim()).with_context(|| format!("receiver said {line:?}"))?;
        latency.merge_sparse(&sparse);
    }
    let sender_cpu = (sys::self_cpu_ticks() - sender_before) as f64 / ticks;
    let receivers_cpu = (receiver_ticks(&receivers) - receivers_before) as f64 / ticks;
    for receiver in &mut receivers {
        drop(receiver.stdin.take());
        let _ = receiver.child.wait();
    }
    let deliveries = (cli.connections * cli.rounds) as f64;
    let micros_per = |seconds: f64| seconds * 1e6 / deliveries;
    let ms = |micros: u64| micros as f64 / 1000.0;
    println!("== floor: {} connections, {} fan-outs of {} bytes ==", cli.connections, cli.rounds, cli.bytes);
    println!(
        "write loop per fan-out ({} threads): p50 {:.1} ms, max {:.1} ms",
        cli.sender_threads,
        ms(send_loop.quantile(0.5)),
        ms(send_loop.max())
    );
    println!(
        "delivery latency (send start -> receive): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
        ms(latency.quantile(0.5)),
        ms(latency.quantile(0.99)),
        ms(latency.max()),
        latency.count()
    );
    println!(
        "CPU per delivery: sender {:.1} µs, receivers {:.1} µs (sender {sender_cpu:.2}s, receivers {receivers_cpu:.2}s)",
        micros_per(sender_cpu),
        micros_per(receivers_cpu)
    );
    println!(
        "{}",
        json!({
            "mode": "floor",
            "connections": cli.connections,
            "rounds": cli.rounds,
            "bytes": cli.bytes,
            "sender_threads": cli.sender_threads,
            "receivers": cli.receivers,
            "write_loop_p50_ms": ms(send_loop.quantile(0.5)),
            "write_loop_max_ms": ms(send_loop.max()),
            "latency_p50_ms": ms(latency.quantile(0.5)),
            "latency_p99_ms": ms(latency.quantile(0.99)),
            "latency_max_ms": ms(latency.max()),
            "deliveries": latency.count(),
            "sender_cpu_us_per_delivery": micros_per(sender_cpu),
            "receiver_cpu_us_per_delivery": micros_per(receivers_cpu),
        })
    );
    if latency.count() != deliveries as u64 {
        bail!("{} of {} frames received", latency.count(), deliveries);
    }
    Ok(())
}

/// A receiver process: opens its connections, tells the sender, reads `rounds` frames on each (recording each
/// frame's latency from the send time it carries), answers the histogram, and waits for its stdin to close.
fn receiver(addr: SocketAddr, connections: usize, rounds: usize, bytes: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let latency = runtime.block_on(async move {
        let mut streams = Vec::with_capacity(connections);
        for _ in 0..connections {
            let stream = tokio::net::TcpStream::connect(addr).await.context("connect to the sender")?;
            stream.set_nodelay(true)?;
            streams.push(stream);
        }
        println!("connected");
        std::io::stdout().flush()?;
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut latency = Hist::new();
                    let mut buffer = vec![0u8; bytes * 4];
                    let mut filled = 0;
                    let mut frames = 0;
                    while frames < rounds {
                        let read = stream.read(&mut buffer[filled..]).await?;
                        if read == 0 {
                            anyhow::bail!("the sender closed a connection after {frames} frames");
                        }
                        let now = sys::now_nanos();
                        filled += read;
                        let mut offset = 0;
                        while filled - offset >= bytes {
                            let mut sent_at = [0u8; 8];
                            sent_at.copy_from_slice(&buffer[offset..offset + 8]);
                            latency.record(now.saturating_sub(u64::from_le_bytes(sent_at)) / 1000);
                            offset += bytes;
                            frames += 1;
                        }
                        buffer.copy_within(offset..filled, 0);
                        filled -= offset;
                    }
                    Ok::<_, anyhow::Error>(latency)
                })
            })
            .collect();
        let mut latency = Hist::new();
        for task in tasks {
            latency.merge(&task.await.context("a receiver task")??);
        }
        Ok::<_, anyhow::Error>(latency)
    })?;
    println!("{}", serde_json::to_string(&latency.to_sparse())?);
    std::io::stdout().flush()?;
    // Stay (so the sender can read this process's CPU time) until the sender closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}
