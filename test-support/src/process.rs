//! The workspace's binaries as child processes. Each is started with its ports at 0 and reports what it bound on
//! its first line of stdout (`… listening on http://A (metrics on http://B/metrics)`), so a test never picks a
//! port that another process could take before the child binds it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `target/<profile>/<name>`: a binary of the workspace, next to the running test's own directory
/// (`target/<profile>/deps`). Panics with how to build it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first with `cargo build --workspace`", path.display());
    path
}

/// The addresses in a start-up line, in order: every `http://host:port` in it.
pub fn addresses(line: &str) -> Vec<SocketAddr> {
    line.split("http://").skip(1).filter_map(|part| part.split([' ', '/', ')']).next()?.parse().ok()).collect()
}

/// A child process and the addresses it reported.
#[derive(Debug)]
pub struct Spawned {
    /// The process (killed when dropped).
    pub child: Child,
    /// Every address of its start-up line, in order (client address first, then the admin address).
    pub addresses: Vec<SocketAddr>,
}

impl Spawned {
    /// Starts `program` with `args` and `envs` (stderr inherited, `PARLEY_LOG=warn` unless given) and waits up to
    /// 60 s for a stdout line containing `marker` with at least `count` addresses. stdout goes on being read, so
    /// the child never blocks on a full pipe.
    pub async fn start(
        program: PathBuf,
        args: &[String],
        envs: &[(&str, &str)],
        marker: &str,
        count: usize,
    ) -> Spawned {
        let mut command = Command::new(&program);
        command.args(args).env("PARLEY_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap_or_else(|error| panic!("cannot start {}: {error}", program.display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(marker) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{} did not report its addresses (a line with {marker:?})", program.display()));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addresses = addresses(&line);
        assert!(addresses.len() >= count, "expected {count} addresses in the start-up line: {line}");
        Spawned { child, addresses }
    }

    /// A Parley server binary (`parley`, `parley-router`): its client and admin addresses.
    pub async fn server(program: PathBuf, args: &[String]) -> Spawned {
        Self::start(program, args, &[], "listening on http://", 2).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_lines_give_their_addresses_in_order() {
        let line = "parley-router listening on http://127.0.0.1:4100 (metrics on http://127.0.0.1:4101/metrics)";
        let expected: Vec<SocketAddr> =
            vec!["127.0.0.1:4100".parse().expect("address"), "127.0.0.1:4101".parse().expect("address")];
        assert_eq!(addresses(line), expected);
        assert!(addresses("no address here").is_empty());
    }
}
