//! `kubectl-parley`, the `kubectl parley` plugin: put it on `PATH` and run `kubectl parley status`,
//! `kubectl parley drain POD`, `kubectl parley rollout restart|pause|resume REGION`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use kubectl_parley::cli::{Args, Command};
use kubectl_parley::commands;
use tracing_subscriber::EnvFilter;

/// The environment variable with the log filter (`tracing_subscriber::EnvFilter` syntax); logs go to stderr.
const LOG_ENV: &str = "KUBECTL_PARLEY_LOG";

/// Runs the command; an error is printed on one line with its causes (`error: a: b: c`), without a backtrace.
fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("unable to start the async runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let connection = commands::connect(&args.connection).await?;
    let stdout = match &args.command {
        Command::Status(status) => {
            let output = commands::status(&connection, status).await?;
            for note in &output.notes {
                eprintln!("note: {note}");
            }
            output.stdout
        }
        Command::Drain(drain) => commands::drain(&connection, &drain.pod).await?,
        Command::Rollout(rollout) => commands::rollout(&connection, rollout).await?,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(stdout.as_bytes()).and_then(|()| out.flush()).context("unable to write to stdout")?;
    Ok(())
}
