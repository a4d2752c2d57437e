//! `--pod-agent` needs the pod it watches and annotates: without `--pod-name` or `--pod-namespace` the gateway
//! refuses to start, in process and as the `parley` binary, naming what is missing. (The agent itself runs in a pod
//! in `e2e/tests/pod_agent.rs`.)

use clap::Parser;
use parley_gateway::config::StandaloneArgs;
use parley_test_support::server::{arguments, ANY_PORT};
use std::time::Duration;

#[tokio::test]
async fn the_pod_agent_without_its_pod_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = arguments(dir.path(), Some("pod-agent-test-secret-0123456789"), ANY_PORT, &["--pod-agent"]);
    let refused = parley_server::start(StandaloneArgs::parse_from(&args)).await;
    let message = refused.expect_err("no pod: no start").to_string();
    assert!(
        message.contains("--pod-agent (PARLEY_POD_AGENT) needs --pod-name (PARLEY_POD_NAME) and --pod-namespace"),
        "{message}"
    );
    assert!(std::fs::read_dir(dir.path()).expect("data dir").next().is_none(), "nothing was opened: {message}");

    let mut named = args.clone();
    named.extend(["--pod-name".to_owned(), "eu-gateway-0".to_owned()]);
    let binary = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(&named[1..])
        .env_remove("PARLEY_POD_NAMESPACE")
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(30), binary).await.expect("parley exits at once").expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("needs --pod-namespace (PARLEY_POD_NAMESPACE)"), "{stderr}");
    assert!(!stderr.contains("--pod-name (PARLEY_POD_NAME)"), "the pod name was given: {stderr}");
}
