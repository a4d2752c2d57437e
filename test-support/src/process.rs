//! The workspace's binaries as child processes. Each is started with its ports at 0 and reports what it bound on
//! its first line of stdout (`… listening on http://A (metrics on http://B/metrics)`), so a test never picks a
//! port that another process could take before the child binds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

    /// Like [`Spawned::start`], for a caller that must live with a failed start (a chaos run restarting a
    /// process on a port that may not be free yet): an error instead of a panic, stderr where the caller says (a
    /// log file, say; `PARLEY_LOG=warn` unless `envs` sets it), and `within` as the limit. The child is killed
    /// when the start fails.
    pub async fn try_start(
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        marker: &str,
        count: usize,
        stderr: Stdio,
        within: Duration,
    ) -> Result<Spawned, String> {
        let mut command = Command::new(program);
        command.args(args).env("PARLEY_LOG", "warn").stdout(Stdio::piped()).stderr(stderr).kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().map_err(|error| format!("cannot start {}: {error}", program.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| "stdout is not piped".to_owned())?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(within, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(marker) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(line) = line else {
            let _ = child.start_kill();
            let status = child.wait().await.map(|status| status.to_string()).unwrap_or_else(|error| error.to_string());
            return Err(format!(
                "{} did not report its addresses (a line with {marker:?}) within {within:?}; {status}",
                program.display()
            ));
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addresses = addresses(&line);
        if addresses.len() < count {
            let _ = child.start_kill();
            return Err(format!("expected {count} addresses in the start-up line: {line}"));
        }
        Ok(Spawned { child, addresses })
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

    #[tokio::test]
    async fn try_start_reads_the_addresses_or_says_why_not() {
        let shell = Path::new("/bin/sh");
        let script = |line: &str| vec!["-c".to_owned(), format!("echo '{line}'; sleep 30")];
        let line = "x listening on http://127.0.0.1:4100 (metrics on http://127.0.0.1:4101/metrics)";
        let mut started = Spawned::try_start(
            shell,
            &script(line),
            &[],
            "listening on http://",
            2,
            Stdio::null(),
            Duration::from_secs(10),
        )
        .await
        .expect("started");
        assert_eq!(started.addresses, addresses(line));
        let _ = started.child.start_kill();
        let silent = Spawned::try_start(
            shell,
            &["-c".into(), "exit 3".into()],
            &[],
            "listening",
            1,
            Stdio::null(),
            Duration::from_secs(10),
        )
        .await
        .expect_err("no start-up line");
        assert!(silent.contains("did not report its addresses") && silent.contains("exit status: 3"), "{silent}");
        let short = Spawned::try_start(
            shell,
            &script("listening nowhere"),
            &[],
            "listening",
            1,
            Stdio::null(),
            Duration::from_secs(10),
        )
        .await
        .expect_err("no address");
        assert!(short.contains("expected 1 addresses"), "{short}");
    }
}
