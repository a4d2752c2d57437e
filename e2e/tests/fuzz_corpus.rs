//! Replays the committed fuzz corpora on stable, with no libFuzzer: every file of `fuzz/corpus/<target>/` and of
//! `fuzz/regressions/<target>/` (crashes found once, kept as regression inputs) goes through the same target body,
//! with the same assertions, as under `cargo fuzz` (`fuzz/targets.rs`, included here). Fuzzing itself is
//! `e2e/fuzz/run.sh`; see `fuzz/README.md`.

#[path = "../../fuzz/targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Every input of a target, corpus first, then regressions, each sorted by name.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for kind in ["corpus", "regressions"] {
        let directory = fuzz.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|error| panic!("cannot list {}: {error}", directory.display()));
        paths.retain(|path| path.is_file());
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            inputs.push((path, bytes));
        }
    }
    inputs
}

/// Runs `body` on every input of `target`, and fails naming every input whose run panicked.
fn replay(target: &str, mut body: impl FnMut(&[u8])) -> usize {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "fuzz/corpus/{target} is empty or missing");
    let failed: Vec<String> = inputs
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| body(bytes))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} failed:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
    inputs.len()
}

#[test]
fn protocol_decode_corpus() {
    replay("protocol_decode", targets::protocol_decode);
}

#[test]
fn bus_event_decode_corpus() {
    replay("bus_event_decode", targets::bus_event_decode);
}

#[test]
fn websocket_frames_corpus() {
    let mut total = targets::WebSocketRead::default();
    let count = replay("websocket_frames", |data| {
        let read = targets::websocket_frames(data);
        total.messages += read.messages;
        total.closed_by_client |= read.closed_by_client;
        total.too_big |= read.too_big;
    });
    // The corpus reaches every ending, so the replay exercises the parser and its limit, not only its refusals.
    assert!(total.messages > 0, "no input of {count} gave a message");
    assert!(total.closed_by_client, "no input of {count} closed");
    assert!(total.too_big, "no input of {count} went over max_frame_bytes");
}

#[test]
fn connect_query_corpus() {
    replay("connect_query", targets::connect_query);
}

/// The settings the replay reads with are the gateway's limits, not tungstenite's defaults.
#[test]
fn websocket_reads_with_the_gateways_limits() {
    let config = targets::gateway_websocket_config();
    let gateway = parley_gateway::config::GatewayConfig::default();
    assert_eq!(config.max_message_size, Some(gateway.max_frame_bytes));
    assert_eq!(config.max_frame_size, Some(gateway.max_frame_bytes));
    assert_eq!(config.read_buffer_size, gateway.ws_read_buffer);
    assert!(!config.accept_unmasked_frames);
}
