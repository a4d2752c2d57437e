//! `parley-global-bench`: send→deliver latency between two regions separated by a WAN (Toxiproxy latency toxics,
//! the same latency each way), on the real engines of `e2e/stack/up.sh --region2 --kafka-wan`.
//!
//! It starts the two regions of [`parley_e2e::regions`] with a [`Wan`]: each router reaches the other region's
//! routers through a proxy, and one MirrorMaker 2 per target region reads its source Kafka through that Kafka's
//! WAN proxy. Senders in both regions send, at a steady total rate, into group channels homed in each region;
//! receivers in both regions are members of every channel. Each delivery is timed from the send on one clock
//! (all clients live in this process), and put on one of four paths: a local send (the sender's region is the
//! channel's home) delivered in the home region or in the other region (through MirrorMaker 2), and a carried
//! send (from the other region, forwarded to the home's routers) delivered at the home or back in the sender's
//! region. The split: send→confirm (for a carried send, the cross-region round trip plus the home's append),
//! send→append (the message `ts`, set by the home's writer on this machine's clock), append→deliver in the home
//! region (fan-out through its Redis) and in the other region (mirroring plus fan-out), and samples of the routers'
//! `parley_router_mirror_delay_ms` (append → hand-over to the publisher in the other region).
//!
//! Before the load, probes send one message at a time per (sender region, home region) and wait until the other
//! region delivers it, first with the latency toxics off and then on, on the same processes: the WAN's own cost,
//! without queueing.
//!
//! It checks the WAN path too: the TCP connections of each MirrorMaker 2 (to its source Kafka: through the proxy,
//! none direct) and of each router (to the other region's routers: through the proxy), from `ss -tnp`.
//!
//! Bounded: warm-up plus duration of sending, then at most `--drain` seconds of waiting for deliveries. Prints a
//! Markdown table and one JSON line (also appended to `--out`).

use anyhow::{bail, Context as _};
use clap::Parser;
use parley_client::{Client, ClientConfig, Event};
use parley_e2e::hist::Hist;
use parley_e2e::regions::{engines, set_latency, token, Engines, Wan, World, WorldOptions, REGIONS};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(name = "parley-global-bench", about = "Cross-region send→deliver latency through a WAN proxy")]
struct Args {
    /// Sends per second, in total (spread evenly over sender region × home region).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of measured sending.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds of sending before the measurement (not counted).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Latency added by the WAN proxies in each direction, in milliseconds (0: proxies without toxics).
    #[arg(long, default_value_t = 40)]
    wan_latency_ms: u64,
    /// Group channels homed in each region.
    #[arg(long, default_value_t = 2)]
    channels_per_region: usize,
    /// Sending users per region.
    #[arg(long, default_value_t = 2)]
    senders_per_region: usize,
    /// Receiving users per region (members of every channel).
    #[arg(long, default_value_t = 2)]
    receivers_per_region: usize,
    /// Probes before the load: one send at a time per (sender region, home region), each waited for until the
    /// other region delivers it (the WAN's cost without queueing).
    #[arg(long, default_value_t = 10)]
    probes: usize,
    /// Seconds to wait for the last deliveries after sending stops.
    #[arg(long, default_value_t = 15)]
    drain: u64,
    /// Seconds allowed for the setup (regions, MirrorMaker 2, memberships crossing the regions).
    #[arg(long, default_value_t = 240)]
    setup_timeout: u64,
    /// Directory of the `parley` and `parley-router` binaries (default: this binary's directory).
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// Append the JSON result line to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Where one delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Path {
    /// A local send, delivered in the home region.
    LocalAtHome,
    /// A local send, delivered in the other region (MirrorMaker 2).
    LocalAtOther,
    /// A carried send, delivered in the home region.
    CarriedAtHome,
    /// A carried send, delivered back in the sender's region (MirrorMaker 2).
    CarriedAtSender,
}

impl Path {
    const ALL: [Path; 4] = [Path::LocalAtHome, Path::LocalAtOther, Path::CarriedAtHome, Path::CarriedAtSender];

    fn of(from: usize, home: usize, at: usize) -> Path {
        match (from == home, at == home) {
            (true, true) => Path::LocalAtHome,
            (true, false) => Path::LocalAtOther,
            (false, true) => Path::CarriedAtHome,
            (false, false) => Path::CarriedAtSender,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::LocalAtHome => "local_send_at_home",
            Path::LocalAtOther => "local_send_at_other_region",
            Path::CarriedAtHome => "carried_send_at_home",
            Path::CarriedAtSender => "carried_send_at_sender_region",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path::LocalAtHome => "local send → home region (same region)",
            Path::LocalAtOther => "local send → other region (MM2 over the WAN)",
            Path::CarriedAtHome => "carried send → home region",
            Path::CarriedAtSender => "carried send → sender's region (MM2 back)",
        }
    }
}

/// One send.
#[derive(Debug)]
struct Sent {
    from: usize,
    home: usize,
    measured: bool,
    at: Instant,
    wall_us: u64,
    confirmed: Option<Instant>,
    ts_ms: Option<u64>,
    failed: bool,
}

/// One delivery to a receiver.
#[derive(Debug)]
struct Delivery {
    client_msg_id: String,
    region: usize,
    at: Instant,
    wall_us: u64,
}

fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_micros() as u64).unwrap_or(0)
}

/// What a client's event loop keeps: the channels it knows it is in, and (receivers) its deliveries.
#[derive(Debug, Default)]
struct Seen {
    channels: HashSet<String>,
}

fn watch(
    mut events: mpsc::Receiver<Event>,
    region: usize,
    deliveries: Option<Arc<Mutex<Vec<Delivery>>>>,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Message(message) => {
                    if let Some(deliveries) = &deliveries {
                        let delivery = Delivery {
                            client_msg_id: message.client_msg_id,
                            region,
                            at: Instant::now(),
                            wall_us: wall_us(),
                        };
                        deliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(delivery);
                    }
                }
                Event::Channel(view) => {
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).channels.insert(view.id);
                }
                Event::Connected { channels, .. } => {
                    let mut seen = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    seen.channels.extend(channels.into_iter().map(|view| view.id));
                }
                Event::Closed { .. } => break,
                _ => {}
            }
        }
    });
    seen
}

/// A connected user.
struct User {
    name: String,
    client: Client,
    seen: Arc<Mutex<Seen>>,
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 100.0).round() / 10.0
}

fn figures(hist: &Hist) -> serde_json::Value {
    json!({
        "count": hist.count(),
        "p50_ms": ms(hist.quantile(0.50)),
        "p90_ms": ms(hist.quantile(0.90)),
        "p99_ms": ms(hist.quantile(0.99)),
        "max_ms": ms(hist.max()),
    })
}

fn row(label: &str, hist: &Hist) -> String {
    format!(
        "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        hist.count(),
        ms(hist.quantile(0.50)),
        ms(hist.quantile(0.90)),
        ms(hist.quantile(0.99)),
        ms(hist.max())
    )
}

/// Established TCP connections per (pid, peer port), from `ss -tnpH`.
fn connections() -> anyhow::Result<Vec<(u32, u16)>> {
    let output = std::process::Command::new("ss").args(["-tnpH", "state", "established"]).output().context("run ss")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    for line in text.lines() {
        let columns: Vec<&str> = line.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer users:(("name",pid=N,fd=M),...)
        let Some(peer) = columns.get(3).and_then(|peer| peer.rsplit_once(':')).and_then(|(_, port)| port.parse().ok())
        else {
            continue;
        };
        for part in line.split("pid=").skip(1) {
            if let Some(pid) = part.split(|c: char| !c.is_ascii_digit()).next().and_then(|pid| pid.parse().ok()) {
                found.push((pid, peer));
            }
        }
    }
    Ok(found)
}

fn port(address: &str) -> u16 {
    address.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or(0)
}

/// How each MirrorMaker 2 and each router reaches the other region: connections through the proxy and direct.
fn wan_check(world: &World, engines: &Engines, wan: &Wan) -> anyhow::Result<serde_json::Value> {
    let found = connections()?;
    let count = |pid: Option<u32>, peer: u16| found.iter().filter(|(p, port)| Some(*p) == pid && *port == peer).count();
    let mut checks = Vec::new();
    for (target, (region, _)) in REGIONS.iter().enumerate() {
        let source = 1 - target;
        let pid = world.mm2.get(target).and_then(|child| child.id());
        checks.push(json!({
            "process": format!("mm2 in {region}"),
            "to": format!("{} Kafka", REGIONS[source].0),
            "through_proxy": count(pid, port(&wan.kafka[source])),
            "direct": count(pid, port(&engines.kafka[source])),
            "to_own_kafka": count(pid, port(&engines.kafka[target])),
        }));
        let pid = world.routers[target].child.id();
        checks.push(json!({
            "process": format!("router in {region}"),
            "to": format!("{} routers", REGIONS[source].0),
            "through_proxy": world.peer_proxies.get(source).map_or(0, |proxy| count(pid, proxy.port())),
            "direct": count(pid, world.routers[source].address.port()),
        }));
    }
    Ok(json!(checks))
}

async fn connect(world: &World, region: usize, name: &str, deliveries: Option<Arc<Mutex<Vec<Delivery>>>>) -> User {
    let config = ClientConfig::new(world.url(region), token(name));
    let (client, events) = Client::connect(config).await.unwrap_or_else(|error| panic!("{name} connects: {error}"));
    let seen = watch(events, region, deliveries);
    User { name: name.to_owned(), client, seen }
}

async fn run(args: Args, engines: Engines, wan: Wan) -> anyhow::Result<serde_json::Value> {
    let binaries = match args.binaries.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("this binary's directory")?.to_path_buf(),
    };
    for name in ["parley", "parley-router"] {
        if !binaries.join(name).exists() {
            bail!(
                "{} is missing: build parley-server and parley-router first (or pass --binaries)",
                binaries.join(name).display()
            );
        }
    }
    let senders_total = 2 * args.senders_per_region.max(1);
    let per_sender = args.rate / senders_total as f64;
    let options = WorldOptions {
        binaries: Some(binaries),
        wan: Some(wan.clone()),
        send_rate_per_sec: Some(((per_sender * 4.0).ceil() as u32).max(200)),
        ..WorldOptions::default()
    };
    eprintln!("[global-bench] starting two regions, WAN {} ms each way", args.wan_latency_ms);
    let world = World::start_with(&engines, options).await;
    let result = measure(&args, &engines, &wan, &world).await;
    if result.is_err() {
        eprintln!("[global-bench] MirrorMaker 2:\n{}", world.mm2_log());
    }
    world.stop().await;
    result
}

async fn measure(args: &Args, engines: &Engines, wan: &Wan, world: &World) -> anyhow::Result<serde_json::Value> {
    let deliveries: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let mut senders: Vec<Vec<User>> = vec![Vec::new(), Vec::new()];
    let mut receivers: Vec<User> = Vec::new();
    for (region, (name, _)) in REGIONS.iter().enumerate() {
        for k in 0..args.senders_per_region.max(1) {
            senders[region].push(connect(world, region, &format!("send-{name}-{k}"), None).await);
        }
        for k in 0..args.receivers_per_region.max(1) {
            receivers.push(connect(world, region, &format!("recv-{name}-{k}"), Some(deliveries.clone())).await);
        }
    }
    let everyone: Vec<&User> = senders.iter().flatten().chain(receivers.iter()).collect();
    // Channels: created by the first sender of their home region, with every other user as a member.
    let mut channels: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    for (home, (name, _)) in REGIONS.iter().enumerate() {
        let creator = &senders[home][0];
        let members: Vec<String> =
            everyone.iter().filter(|user| user.name != creator.name).map(|user| user.name.clone()).collect();
        for c in 0..args.channels_per_region.max(1) {
            let view = creator
                .client
                .create_channel(format!("bench-{name}-{c}"), members.clone())
                .await
                .with_context(|| format!("create channel bench-{name}-{c} in {name}"))?;
            channels[home].push(view.id);
        }
    }
    let all: Vec<String> = channels.iter().flatten().cloned().collect();
    let setup_deadline = Instant::now() + Duration::from_secs(args.setup_timeout);
    loop {
        let waiting: Vec<&str> = everyone
            .iter()
            .filter(|user| {
                let seen = user.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                !all.iter().all(|channel| seen.channels.contains(channel))
            })
            .map(|user| user.name.as_str())
            .collect();
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > setup_deadline {
            bail!("the memberships never crossed the regions within {}s: {waiting:?} still wait", args.setup_timeout);
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[global-bench] {} channels, memberships mirrored; sending {} /s for {}s warm-up + {}s",
        all.len(),
        args.rate,
        args.warmup,
        args.duration
    );

    // The WAN's own cost, on the same processes: the probes with the toxics off, then on (as for the load).
    let proxies: Vec<String> = world.proxy_names().into_iter().chain(wan.kafka_proxies.iter().cloned()).collect();
    for proxy in &proxies {
        set_latency(&wan.toxiproxy, proxy, Duration::ZERO).await;
    }
    let probes_without = probe(args, &senders, &channels, &deliveries, "off").await?;
    for proxy in &proxies {
        set_latency(&wan.toxiproxy, proxy, wan.latency).await;
    }
    let probes = probe(args, &senders, &channels, &deliveries, "on").await?;

    // Samples of each region's parley_router_mirror_delay_ms (the last mirrored message's delay), while measured.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let admins: Vec<SocketAddr> = world.routers.iter().map(|router| router.admin).collect();
        let (sampling, stop) = (sampling.clone(), stop_sampling.clone());
        tokio::spawn(async move {
            let mut hist = Hist::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    for admin in &admins {
                        let scrape = parley_test_support::scrape(*admin).await;
                        if let Some(value) = scrape.value("parley_router_mirror_delay_ms") {
                            hist.record((value * 1000.0) as u64);
                        }
                    }
                }
                // The sampling period.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            hist
        })
    };

    let sent: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    let combos = [(0usize, 0usize), (0, 1), (1, 0), (1, 1)];
    let mut tasks = Vec::new();
    let mut n = 0usize;
    loop {
        let due = started + interval.mul_f64(n as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let (from, home) = combos[n % combos.len()];
        let user = &senders[from][(n / combos.len()) % senders[from].len()];
        let channel = channels[home][(n / (combos.len() * senders[from].len())) % channels[home].len()].clone();
        let id = format!("gb-{n}");
        let now = Instant::now();
        sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(
            id.clone(),
            Sent {
                from,
                home,
                measured: now >= measure_from,
                at: now,
                wall_us: wall_us(),
                confirmed: None,
                ts_ms: None,
                failed: false,
            },
        );
        if now >= measure_from {
            sampling.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (client, book) = (user.client.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = client.send_with_id(channel, id.clone(), "x").await;
            let confirmed = Instant::now();
            let mut book = book.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(record) = book.get_mut(&id) {
                match outcome {
                    Ok(receipt) => {
                        record.confirmed = Some(confirmed);
                        record.ts_ms = Some(receipt.ts);
                    }
                    Err(_) => record.failed = true,
                }
            }
        }));
        n += 1;
    }
    let sending = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let confirm_deadline = Instant::now() + Duration::from_secs(args.drain);
    for task in tasks {
        let left = confirm_deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, task).await;
    }
    // Wait for the deliveries: every confirmed measured send reaches every receiver, or the drain time ends.
    let receivers_count = receivers.len();
    loop {
        let expected = {
            let book = sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            book.values().filter(|record| record.confirmed.is_some()).count() * receivers_count
        };
        let got = {
            let book = sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let delivered = deliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            delivered.iter().filter(|delivery| book.contains_key(&delivery.client_msg_id)).count()
        };
        if got >= expected || Instant::now() > confirm_deadline {
            break;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wan_paths = wan_check(world, engines, wan)?;
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let mirror_samples = sampler.await.unwrap_or_default();

    // The figures.
    let book = sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let delivered = deliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut paths: HashMap<Path, Hist> = Path::ALL.iter().map(|path| (*path, Hist::new())).collect();
    let (mut fanout_home, mut mirror_and_fanout) = (Hist::new(), Hist::new());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for delivery in delivered.iter() {
        let Some(record) = book.get(&delivery.client_msg_id) else { continue };
        if !record.measured {
            continue;
        }
        *seen.entry(delivery.client_msg_id.as_str()).or_default() += 1;
        let latency = delivery.at.saturating_duration_since(record.at).as_micros() as u64;
        let path = Path::of(record.from, record.home, delivery.region);
        if let Some(hist) = paths.get_mut(&path) {
            hist.record(latency);
        }
        if let Some(ts) = record.ts_ms {
            let after_append = delivery.wall_us.saturating_sub(ts * 1000);
            if delivery.region == record.home {
                fanout_home.record(after_append);
            } else {
                mirror_and_fanout.record(after_append);
            }
        }
    }
    let (mut confirm_local, mut confirm_carried, mut append_local, mut append_carried) =
        (Hist::new(), Hist::new(), Hist::new(), Hist::new());
    let (mut measured, mut confirmed, mut failed, mut lost) = (0u64, 0u64, 0u64, 0u64);
    for (id, record) in book.iter().filter(|(_, record)| record.measured) {
        measured += 1;
        failed += u64::from(record.failed);
        let Some(at) = record.confirmed else { continue };
        confirmed += 1;
        let local = record.from == record.home;
        let confirm = at.saturating_duration_since(record.at).as_micros() as u64;
        if local { &mut confirm_local } else { &mut confirm_carried }.record(confirm);
        if let Some(ts) = record.ts_ms {
            let append = (ts * 1000).saturating_sub(record.wall_us);
            if local { &mut append_local } else { &mut append_carried }.record(append);
        }
        lost += receivers_count.saturating_sub(seen.get(id.as_str()).copied().unwrap_or(0)) as u64;
    }
    let cross_p99 = [Path::LocalAtOther, Path::CarriedAtHome, Path::CarriedAtSender]
        .iter()
        .map(|path| ms(paths[path].quantile(0.99)))
        .fold(0.0f64, f64::max);

    println!(
        "\nCross-region send→deliver, WAN {} ms each way (Toxiproxy), {:.0} sends/s for {}s ({} measured sends, {} \
         receivers per region):\n",
        args.wan_latency_ms,
        args.rate,
        args.duration,
        measured,
        args.receivers_per_region.max(1)
    );
    println!("| path | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for path in Path::ALL {
        println!("{}", row(path.label(), &paths[&path]));
    }
    println!("| *split:* send→confirm, local send | {} |", split_cells(&confirm_local));
    println!(
        "| *split:* send→confirm, carried send (WAN round trip + home append) | {} |",
        split_cells(&confirm_carried)
    );
    println!("| *split:* send→append (`ts`), local send | {} |", split_cells(&append_local));
    println!("| *split:* send→append (`ts`), carried send | {} |", split_cells(&append_carried));
    println!("| *split:* append→deliver, home region (fan-out) | {} |", split_cells(&fanout_home));
    println!("| *split:* append→deliver, other region (mirroring + fan-out) | {} |", split_cells(&mirror_and_fanout));
    println!("| *split:* `parley_router_mirror_delay_ms`, sampled every 250 ms | {} |", split_cells(&mirror_samples));
    println!(
        "\nOne send at a time ({} probes per sender region × home region), the same processes with the toxics off, \
         then on ({} ms each way):\n",
        args.probes, args.wan_latency_ms
    );
    println!("| probe | toxics | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (label, off, on) in [
        ("send→confirm, local send", &probes_without.confirm_local, &probes.confirm_local),
        ("send→confirm, carried send", &probes_without.confirm_carried, &probes.confirm_carried),
        ("send→deliver in the other region, local send", &probes_without.deliver_local, &probes.deliver_local),
        (
            "send→deliver back in the sender's region, carried send",
            &probes_without.deliver_carried,
            &probes.deliver_carried,
        ),
        ("append→deliver in the other region (mirroring + fan-out)", &probes_without.mirror, &probes.mirror),
    ] {
        println!("{}", row(&format!("{label} | off"), off));
        println!("{}", row(&format!("{label} | on"), on));
    }
    println!(
        "\nconfirmed {confirmed}/{measured} (failed {failed}), deliveries lost {lost}; cross-region p99 {cross_p99:.1} ms \
         (target ≤ 300 ms: {})",
        if cross_p99 <= 300.0 { "met" } else { "missed" }
    );
    println!("WAN path (established TCP connections): {wan_paths}");

    let mut path_figures = serde_json::Map::new();
    for path in Path::ALL {
        path_figures.insert(path.key().to_owned(), figures(&paths[&path]));
    }
    Ok(json!({
        "bench": "global",
        "wan_latency_ms_each_way": args.wan_latency_ms,
        "rate_per_sec": args.rate,
        "duration_secs": args.duration,
        "sending_secs": sending.as_secs_f64(),
        "channels_per_region": args.channels_per_region,
        "senders_per_region": args.senders_per_region,
        "receivers_per_region": args.receivers_per_region,
        "measured_sends": measured,
        "confirmed": confirmed,
        "failed": failed,
        "lost_deliveries": lost,
        "paths": path_figures,
        "split": {
            "confirm_local": figures(&confirm_local),
            "confirm_carried": figures(&confirm_carried),
            "append_local": figures(&append_local),
            "append_carried": figures(&append_carried),
            "deliver_after_append_home": figures(&fanout_home),
            "deliver_after_append_other_region": figures(&mirror_and_fanout),
            "router_mirror_delay_samples": figures(&mirror_samples),
        },
        "probes": probes.figures(),
        "probes_toxics_off": probes_without.figures(),
        "cross_region_p99_ms": cross_p99,
        "target_met": cross_p99 <= 300.0,
        "wan_paths": wan_paths,
    }))
}

/// What the probes measured.
#[derive(Debug, Default)]
struct Probes {
    confirm_local: Hist,
    confirm_carried: Hist,
    deliver_local: Hist,
    deliver_carried: Hist,
    mirror: Hist,
}

impl Probes {
    fn figures(&self) -> serde_json::Value {
        json!({
            "confirm_local": figures(&self.confirm_local),
            "confirm_carried": figures(&self.confirm_carried),
            "deliver_other_region_local_send": figures(&self.deliver_local),
            "deliver_sender_region_carried_send": figures(&self.deliver_carried),
            "deliver_after_append_other_region": figures(&self.mirror),
        })
    }
}

/// One send at a time per (sender region, home region), each waited for until the region that is not the home
/// delivers it (through MirrorMaker 2), so no send queues behind another.
async fn probe(
    args: &Args,
    senders: &[Vec<User>],
    channels: &[Vec<String>],
    deliveries: &Arc<Mutex<Vec<Delivery>>>,
    tag: &str,
) -> anyhow::Result<Probes> {
    let mut probes = Probes::default();
    // Round 0 warms up (the first carried call opens the connection to the other region) and is not counted.
    for n in 0..=args.probes {
        for (from, home) in [(0usize, 0usize), (0, 1), (1, 0), (1, 1)] {
            let id = format!("probe-{tag}-{n}-{from}-{home}");
            let started = Instant::now();
            let receipt = senders[from][0]
                .client
                .send_with_id(channels[home][0].clone(), id.clone(), "probe")
                .await
                .with_context(|| format!("probe {id}"))?;
            let confirm = started.elapsed().as_micros() as u64;
            let deadline = Instant::now() + Duration::from_secs(10);
            let delivered = loop {
                let found = deliveries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .find(|delivery| delivery.client_msg_id == id && delivery.region != home)
                    .map(|delivery| (delivery.at, delivery.wall_us));
                if found.is_some() || Instant::now() > deadline {
                    // A pause before the next probe.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break found;
                }
                // The poll interval of a bounded wait.
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let Some((at, wall)) = delivered else {
                bail!("probe {id} was not delivered in the other region within 10 s")
            };
            let deliver = at.saturating_duration_since(started).as_micros() as u64;
            if n == 0 {
                continue;
            }
            if from == home {
                probes.confirm_local.record(confirm);
                probes.deliver_local.record(deliver);
            } else {
                probes.confirm_carried.record(confirm);
                probes.deliver_carried.record(deliver);
            }
            probes.mirror.record(wall.saturating_sub(receipt.ts * 1000));
        }
    }
    Ok(probes)
}

fn split_cells(hist: &Hist) -> String {
    let line = row("", hist);
    line.trim_start_matches("|  | ").trim_end_matches(" |").to_owned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.rate > 0.0 && args.rate <= 5000.0) {
        bail!("--rate must be above 0 and at most 5000 sends/s");
    }
    let Some(engines) = engines() else {
        bail!(
            "the engines are not set: start them with `e2e/stack/up.sh --only redis,kafka,cassandra --region2 \
             --kafka-wan DIR` and `set -a; . DIR/stack.env; set +a` (or run e2e/bench/global.sh)"
        );
    };
    let Some(wan) = Wan::from_env(Duration::from_millis(args.wan_latency_ms)) else {
        bail!("no WAN proxies: start the stack with `e2e/stack/up.sh ... --region2 --kafka-wan` (PARLEY_KAFKA_WAN_BOOTSTRAP)");
    };
    let out = args.out.clone();
    let result = run(args, engines, wan).await?;
    println!("{result}");
    if let Some(out) = out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .with_context(|| format!("open {}", out.display()))?;
        writeln!(file, "{result}").with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}
