//! `parley`: the standalone chat server (gateway + router + embedded storage in one process).

use anyhow::Context;
use clap::Parser;
use parley_gateway::config::StandaloneArgs;
use parley_telemetry::shutdown_signal;

fn main() -> anyhow::Result<()> {
    // Storage calls run on the blocking pool; a small pool keeps idle memory low (each thread has a stack).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("failed to start the tokio runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = StandaloneArgs::parse();
    parley_telemetry::init("parley", &args.telemetry)?;
    let drain_plan = args.gateway.drain_plan();
    let running = parley_server::start(args).await.context("failed to start parley")?;
    println!("parley listening on http://{} (metrics on http://{}/metrics)", running.address, running.admin_address);
    let shutdown = running.shutdown;
    let drainer = running.drainer;
    let plan = drain_plan;
    tokio::spawn(async move {
        shutdown_signal().await;
        // The first signal drains: clients are asked to reconnect elsewhere, spread over the drain window. A drain
        // the pod agent holds (asked for on the pod) is released: the process stops once it is over, at once if so.
        drainer.terminate(plan);
        shutdown_signal().await;
        tracing::info!("second signal: shutting down now, closing connections with 1001");
        let _ = shutdown.send(true);
    });
    running.task.await.context("server task failed")?.context("server failed")?;
    Ok(())
}
