//! `parley-chaos`: a bounded chaos run of the distributed layout on real engines (see `parley_e2e::chaos` and
//! `e2e/chaos/run.sh`, which starts the engines and calls this). It starts one router (Kafka + Cassandra) and two
//! gateways (Redis) beside this binary, runs a seeded load while it kills and restarts gateways, the router, Redis
//! and the Kafka broker, lets everything settle, and checks every client's stream against the stored history.
//!
//! Progress goes to stderr; the summary goes to stdout, and one line of it to `PARLEY_FIGURES_FILE` when set. Exit
//! status 0 when every kill was survived and the checker found nothing, 1 otherwise, 2 on a usage error.

use clap::Parser;
use parley_e2e::chaos::{self, plan::Fault, Config, Stack};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "parley-chaos",
    about = "Kill and restart Parley's components under load, then check every client's history"
)]
struct Args {
    /// Planned length of the load, in seconds (it runs on until every fault was applied once).
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// Seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// `e2e/stack` state dirs whose `stack.env` and pid files give Redis, Kafka and Cassandra (one dir with all,
    /// or one per engine); default `PARLEY_STACK_DIR`.
    #[arg(long = "stack-dir")]
    stack_dirs: Vec<PathBuf>,
    /// Which faults to apply (comma-separated: gateway,router,redis,kafka).
    #[arg(long, default_value = "gateway,router,redis,kafka")]
    faults: String,
    /// The small scale of the test command's smoke run, each fault once with short waits.
    #[arg(long)]
    smoke: bool,
    /// Longest time a killed component stays down before it is started again, in seconds (default 3, 1 with
    /// --smoke; a Kafka broker is unreachable longer: its stop and start come on top).
    #[arg(long)]
    max_down: Option<f64>,
    /// Multiplies every sender's rate.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Where the processes' logs and data go (default: a new dir under the temp dir, deleted after a pass).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work dir after a pass.
    #[arg(long)]
    keep: bool,
    /// Where `parley` and `parley-router` are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(error) => {
            eprintln!("parley-chaos: {error}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

fn run(args: Args) -> Result<bool, String> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_micros() as u64)
            .unwrap_or(1)
    });
    let mut faults = Vec::new();
    for name in args.faults.split(',').filter(|name| !name.trim().is_empty()) {
        faults
            .push(Fault::parse(name).ok_or_else(|| format!("unknown fault {name:?} (gateway, router, redis, kafka)"))?);
    }
    let mut dirs = args.stack_dirs.clone();
    if dirs.is_empty() {
        let dir = std::env::var_os("PARLEY_STACK_DIR")
            .ok_or("no --stack-dir and no PARLEY_STACK_DIR: start the engines with e2e/stack/up.sh (or use run.sh)")?;
        dirs.push(PathBuf::from(dir));
    }
    let stack = Stack::from_dirs(&dirs)?;
    let binary = |name: &str| match &args.bin_dir {
        Some(dir) => Ok(dir.join(name)),
        None => chaos::beside_self(name),
    };
    let (parley, router) = (binary("parley")?, binary("parley-router")?);
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(parley_test_support::unique("parley-chaos-")));
    std::fs::create_dir_all(&work_dir).map_err(|error| format!("cannot create {}: {error}", work_dir.display()))?;
    let mut config = if args.smoke {
        Config { seconds: args.seconds, ..Config::smoke(seed, parley, router, stack, work_dir.clone()) }
    } else {
        Config::full(args.seconds, seed, parley, router, stack, work_dir.clone())
    };
    config.faults = faults;
    if let Some(seconds) = args.max_down {
        config.pacing.max_down =
            Duration::try_from_secs_f64(seconds).map_err(|error| format!("--max-down {seconds}: {error}"))?;
    }
    config.scale = config.scale.with_rate(args.rate);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the runtime: {error}"))?;
    let summary = runtime.block_on(async {
        tokio::select! {
            summary = chaos::run(config) => Ok(summary),
            // Dropping the run kills its router and gateways and starts again an engine it had stopped.
            signal = interrupted() => Err(format!("stopped by {signal}")),
        }
    })?;
    println!("{}", summary.render());
    parley_test_support::figures::report(&summary.figure_line());
    let passed = summary.passed();
    if passed && !args.keep {
        chaos::remove_work_dir(&work_dir);
    }
    Ok(passed)
}
