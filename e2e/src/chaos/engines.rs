//! The engines of an `e2e/stack` state dir that a chaos run stops and starts again: Redis and Kafka.
//!
//! `e2e/stack/up.sh` starts each engine as the leader of its own session and writes `pids/<name>.pid` ("pid
//! starttime"); `down.sh` signals that process group after checking the start time. An engine is stopped the same
//! way here (SIGKILL for Redis; for Kafka SIGTERM, a clean stop as `down.sh` does, then SIGKILL after 30 s), and
//! started again as `router/tests/kafka.rs` restarts its broker: the same command line (read from `/proc`; for Redis,
//! which rewrites it, `redis-server <state>/redis/redis.conf`, the file `up.sh` started it from: TLS, ACL user and
//! all), in a new session, writing the pid file again, so `down.sh` still stops it. Stopping an engine that is no
//! longer the one of the pid file (its start time differs) is refused. Redis is back when `<state>/bin/redis-cli
//! ping` (TLS, the stack's user) answers `PONG`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long a clean stop may take before SIGKILL (as `down.sh`'s `STACK_STOP_TIMEOUT`).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One engine of a state dir.
#[derive(Debug)]
pub struct StackEngine {
    /// The pid file's name (`redis`, `kafka`).
    name: String,
    state: PathBuf,
    /// Its command line, to start it again.
    command: Vec<String>,
    /// Where it listens.
    address: SocketAddr,
    /// Stopped by us and not started again yet.
    stopped: bool,
}

/// How an engine is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL at once.
    Kill,
    /// SIGTERM, SIGKILL after 30 s.
    Clean,
}

impl StackEngine {
    /// The engine `name` of the state dir `state`, listening on `address` (`host:port`, as in `stack.env`).
    pub fn open(state: &Path, name: &str, address: &str) -> Result<StackEngine, String> {
        let (pid, _) = read_pid_file(&state.join("pids").join(format!("{name}.pid")))?;
        let command: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|error| format!("cannot read the command line of {name} (pid {pid}): {error}"))?
            .split(|byte| *byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        if command.is_empty() {
            return Err(format!("{name} (pid {pid}) has no command line"));
        }
        let address: SocketAddr = address
            .trim_start_matches("rediss://")
            .trim_start_matches("redis://")
            .parse()
            .map_err(|error| format!("{name}: cannot parse the address {address:?}: {error}"))?;
        // Redis replaces its command line with a title ("redis-server 127.0.0.1:6379"): start it again the way
        // up.sh does, from its redis.conf.
        let mut command = if name == "redis" && command.len() == 1 { redis_command(state)? } else { command };
        // up.sh runs the engines under `nice -n $STACK_NICE`, which is not in the command line: keep the niceness.
        if let Some(nice) = niceness(pid).filter(|nice| *nice != 0) {
            command.splice(0..0, ["nice".to_owned(), "-n".to_owned(), nice.to_string()]);
        }
        Ok(StackEngine { name: name.to_owned(), state: state.to_owned(), command, address, stopped: false })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn pid_file(&self) -> PathBuf {
        self.state.join("pids").join(format!("{}.pid", self.name))
    }

    /// Stops it and waits until its process is gone.
    pub async fn stop(&mut self, how: Stop) -> Result<(), String> {
        let (pid, start) = read_pid_file(&self.pid_file())?;
        if !is_ours(pid, start.as_deref()) {
            return Err(format!("{} (pid {pid}) is not running, or not the process of its pid file", self.name));
        }
        self.stopped = true;
        signal_group(pid, if how == Stop::Kill { "KILL" } else { "TERM" });
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(pid) {
            if Instant::now() > deadline {
                signal_group(pid, "KILL");
            }
            // The poll interval of a bounded wait for the process to be gone.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Starts it again with the same command line and waits until it answers (`within` at most).
    pub async fn start(&mut self, within: Duration) -> Result<(), String> {
        let log_path = self.state.join(format!("{}-restarts.log", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| format!("cannot open {}: {error}", log_path.display()))?;
        let log_too = log.try_clone().map_err(|error| format!("cannot open {}: {error}", log_path.display()))?;
        let mut child = tokio::process::Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(r#"echo "$$ $(cut -d" " -f22 /proc/$$/stat)" >"$0"; exec "$@""#)
            .arg(self.pid_file())
            .args(&self.command)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .map_err(|error| format!("cannot start {} again: {error}", self.name))?;
        // Reaped when it exits (down.sh, or the next stop); it outlives this process otherwise, as up.sh's do.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        self.stopped = false;
        let deadline = Instant::now() + within;
        loop {
            if self.answers().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer on {} within {within:?} of its restart; log: {}",
                    self.name,
                    self.address,
                    log_path.display()
                ));
            }
            // The poll interval of a bounded wait for the engine.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether it takes connections (and, for Redis, answers PING over TLS as the stack's user).
    async fn answers(&self) -> bool {
        let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.address)).await;
        let Ok(Ok(_stream)) = connect else { return false };
        if self.name != "redis" {
            return true;
        }
        let ping = tokio::process::Command::new(self.state.join("bin").join("redis-cli"))
            .args(["-p", &self.address.port().to_string(), "ping"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(output)) => output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "PONG",
            _ => false,
        }
    }

    /// Starts it again, synchronously, if a stop left it down (a run that ends early must not leave the shared
    /// stack without an engine).
    pub fn ensure_running(&mut self) {
        if !self.stopped {
            return;
        }
        self.stopped = false;
        let _ = std::process::Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(r#"echo "$$ $(cut -d" " -f22 /proc/$$/stat)" >"$0"; exec "$@""#)
            .arg(self.pid_file())
            .args(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for StackEngine {
    fn drop(&mut self) {
        self.ensure_running();
    }
}

/// `up.sh`'s command line of its Redis: `redis-server <state>/redis/redis.conf`.
fn redis_command(state: &Path) -> Result<Vec<String>, String> {
    let conf = state.join("redis").join("redis.conf");
    if !conf.is_file() {
        return Err(format!(
            "{} is missing: Redis cannot be started again with the settings up.sh gave it (start the stack with \
             e2e/stack/up.sh)",
            conf.display()
        ));
    }
    Ok(vec!["redis-server".to_owned(), conf.display().to_string()])
}

/// "pid starttime" (the start time may be missing).
fn read_pid_file(path: &Path) -> Result<(u32, Option<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mut parts = text.split_whitespace();
    let pid = parts
        .next()
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| format!("{} holds no pid: {text:?}", path.display()))?;
    Ok((pid, parts.next().map(str::to_owned)))
}

/// The process's state and start time from `/proc/<pid>/stat` (fields 3 and 22).
fn stat(pid: u32) -> Option<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.to_string()))
}

/// The process's niceness (field 19 of `/proc/<pid>/stat`).
fn niceness(pid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// Alive, and not a zombie.
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// Alive and started at `start` (when known).
fn is_ours(pid: u32, start: Option<&str>) -> bool {
    stat(pid).is_some_and(|(state, started)| state != "Z" && start.is_none_or(|start| start == started))
}

/// Signals the process group led by `pid` (each engine leads its own session), or the process alone.
fn signal_group(pid: u32, signal: &str) {
    let group = std::process::Command::new("kill").arg(format!("-{signal}")).arg("--").arg(format!("-{pid}")).status();
    if !group.is_ok_and(|status| status.success()) {
        let _ = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_process_is_alive_and_its_start_time_is_read() {
        let pid = std::process::id();
        let (state, start) = stat(pid).expect("own stat");
        assert!(["R", "S", "D"].contains(&state.as_str()), "{state}");
        assert!(is_ours(pid, Some(&start)));
        assert!(!is_ours(pid, Some("1")));
        assert!(alive(pid));
        assert!(niceness(pid).is_some_and(|nice| (-20..=19).contains(&nice)));
    }

    #[test]
    fn pid_files_hold_a_pid_and_maybe_a_start_time() {
        let dir = std::env::temp_dir().join(parley_test_support::unique("parley-chaos-pid-"));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("x.pid");
        std::fs::write(&file, "123 456\n").expect("write");
        assert_eq!(read_pid_file(&file), Ok((123, Some("456".to_owned()))));
        std::fs::write(&file, "123\n").expect("write");
        assert_eq!(read_pid_file(&file), Ok((123, None)));
        std::fs::write(&file, "").expect("write");
        assert!(read_pid_file(&file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
