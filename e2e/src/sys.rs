//! Process figures read from `/proc`: resident memory, CPU time, open files, file limits.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (wall clock, shared by all processes on the machine).
pub fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_nanos() / 1_000_000_000
}

fn status_field_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(&pid.to_string(), "VmRSS:")
}

/// `VmHWM` (peak resident set) of a process in KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_field_kib(&pid.to_string(), "VmHWM:")
}

/// Number of threads of a process.
pub fn threads(pid: u32) -> Option<u64> {
    status_field_kib(&pid.to_string(), "Threads:")
}

/// Clock ticks per second for `/proc/*/stat` (asks `getconf CLK_TCK`, falls back to 100).
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

fn cpu_ticks_of(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime is field 14 overall => index 11 here, stime index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_of(&format!("/proc/{pid}/stat"))
}

/// utime + stime of this process in clock ticks.
pub fn self_cpu_ticks() -> u64 {
    cpu_ticks_of("/proc/self/stat").unwrap_or(0)
}

/// Number of open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The soft `RLIMIT_NOFILE` of this process.
pub fn nofile_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    match stat.rfind(')').and_then(|end| stat[end + 1..].split_whitespace().next()) {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_figures() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|rss| rss > 0));
        assert!(cpu_ticks(pid).is_some());
        assert!(open_fds(pid).is_some_and(|fds| fds >= 3));
        assert!(nofile_soft_limit().is_some_and(|limit| limit > 0));
        assert!(alive(pid));
    }
}
