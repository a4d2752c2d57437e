//! The `parley` server (standalone: embedded router and storage) in the test's own process, on 127.0.0.1, for the
//! integration tests of `parley-server` and `parley-client`. Feature `server`.
//!
//! In-process, its timers (ACK timeout, idle timeout, token expiry, drain departures) follow tokio's clock, so a
//! `#[tokio::test(start_paused = true)]` runs them on paused time.

use clap::Parser;
use parley_gateway::config::StandaloneArgs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

pub use parley_server::Running;

/// The HS256 secret the servers of [`start`] are usually given, and [`token`] signs with.
pub const SECRET: &str = "parley-test-secret-0123456789abcdef";

/// `127.0.0.1:0`: any free port.
pub const ANY_PORT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// How long [`start`] keeps retrying on a fixed port, and how long [`stop`] waits for the server to end.
const PATIENCE: Duration = Duration::from_secs(30);

/// The command line of [`start`] (pure, for tests).
pub fn arguments(data_dir: &Path, secret: Option<&str>, listen: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "parley".to_owned(),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        ANY_PORT.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--log".into(),
        "warn".into(),
    ];
    if let Some(secret) = secret {
        args.extend(["--jwt-hs256-secret".to_owned(), secret.to_owned()]);
    }
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

/// Starts the server on `listen` ([`ANY_PORT`] for any port; its admin listener always on any port) with
/// `data_dir`, the HS256 `secret` (`None`: none, `extra` says how clients log in) and the `extra` arguments.
/// Returns once it accepts connections.
///
/// On a fixed port (a restart on the port of a server that just stopped) a failed start is retried every 100 ms
/// for up to 30 s, since the port may not be free again at once; on port 0 a failure panics at once.
pub async fn start(data_dir: &Path, secret: Option<&str>, listen: SocketAddr, extra: &[&str]) -> Running {
    let args = arguments(data_dir, secret, listen, extra);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match parley_server::start(StandaloneArgs::parse_from(&args)).await {
            Ok(running) => return running,
            Err(error) if listen.port() != 0 && tokio::time::Instant::now() < deadline => {
                eprintln!("the server does not start on {listen} yet ({error}); retrying");
                // The retry interval of a bounded wait for the port, not a guess at how long that takes.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the server does not start on {listen}: {error}"),
        }
    }
}

/// Shuts the server down gracefully (its connections are closed with 1001) and waits until it has stopped;
/// panics when that takes more than 30 s.
pub async fn stop(running: Running) {
    let _ = running.shutdown.send(true);
    let stopped = tokio::time::timeout(PATIENCE, running.task).await;
    assert!(stopped.is_ok(), "the server did not stop within {PATIENCE:?} of the shutdown request");
}

/// A token for `user` that the servers given [`SECRET`] accept, valid for an hour.
pub fn token(user: &str) -> String {
    crate::hs256_token(SECRET, user, Duration::from_secs(3600))
}

/// Like [`token`], issued at `iat` (Unix seconds; the `iat` claim revocations compare).
pub fn token_issued_at(user: &str, iat: u64) -> String {
    crate::hs256_token_with(SECRET, None, user, Some(iat), Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_and_carries_what_was_asked() {
        let dir = Path::new("/tmp/parley-data");
        let listen: SocketAddr = "127.0.0.1:4100".parse().expect("address");
        let args = arguments(dir, Some(SECRET), listen, &["--max-connections", "3"]);
        assert!(args.windows(2).any(|pair| pair == ["--jwt-hs256-secret", SECRET]), "{args:?}");
        assert!(args.ends_with(&["--max-connections".to_owned(), "3".to_owned()]), "{args:?}");
        let parsed = StandaloneArgs::parse_from(&args);
        assert_eq!((parsed.listen, parsed.admin_listen), (listen, ANY_PORT));
        let args = arguments(dir, None, ANY_PORT, &["--insecure-dev-login"]);
        assert!(!args.iter().any(|arg| arg == "--jwt-hs256-secret"), "{args:?}");
        StandaloneArgs::parse_from(&args);
    }
}
