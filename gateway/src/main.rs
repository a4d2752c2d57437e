//! `parley`: the standalone chat server (gateway + router + embedded storage in one process).

use anyhow::Context;
use clap::Parser;
use parley_gateway::config::StandaloneArgs;
use tracing_subscriber::EnvFilter;

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
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let drain_plan = args.gateway.drain_plan();
    let running = parley_gateway::standalone::start(args).await.context("failed to start parley")?;
    println!("parley listening on http://{} (metrics on http://{}/metrics)", running.address, running.admin_address);
    let shutdown = running.shutdown;
    let drainer = running.drainer;
    let plan = drain_plan;
    tokio::spawn(async move {
        wait_for_signal().await;
        // The first signal drains: clients are asked to reconnect elsewhere, spread over the drain window.
        drainer.start(plan);
        wait_for_signal().await;
        tracing::info!("second signal: shutting down now, closing connections with 1001");
        let _ = shutdown.send(true);
    });
    running.task.await.context("server task failed")?.context("server failed")?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
