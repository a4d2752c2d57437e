//! Starting a container's process in its own mount and UTS namespaces, and signalling it.
//!
//! The runner starts `unshare --mount --uts --propagation private -- <runner> pod-exec <spec.json>` with the
//! container's environment only (nothing of the runner's). `unshare` execs the runner's `pod-exec` mode, which sets the
//! hostname, makes the bind mounts of [`ExecSpec`] (the pod's hosts file over `/etc/hosts`, then the volumes),
//! remounts `/` read-only when the container asks for `readOnlyRootFilesystem`, changes to the working directory and
//! execs the binary. Every step execs, so the pid the runner started is the container's process, the leader of its
//! own process group. Sources are opened before anything is mounted and mounted through `/proc/<pid>/fd/<n>`, so a
//! volume mounted over a parent of the runner's state dir (an `emptyDir` at `/tmp`, say) cannot hide another
//! volume's source. The program's own directory is opened first as well and, when a volume hid the program, mounted
//! back (read-only) at its path, so a launcher under `/tmp` still runs in a pod with an `emptyDir` at `/tmp`.

use super::volumes::Mount;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// What `pod-exec` does, written as JSON next to the container's log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecSpec {
    /// The pod's hostname (the UTS namespace's).
    pub hostname: String,
    /// Bind mounts, in order (the hosts file first among equals, parents before children).
    pub mounts: Vec<Mount>,
    /// Remount `/` read-only after the mounts.
    pub read_only_root: bool,
    /// The working directory (`/` unless the container sets `workingDir`).
    pub working_dir: PathBuf,
    /// The `mount` program.
    pub mount_program: PathBuf,
    /// The file to execute.
    pub program: PathBuf,
    /// Its `argv[0]`.
    pub arg0: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Finds `name` on the runner's `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Starts the container process described by `spec_path` with exactly `env`; stdout and stderr go to `log`.
pub fn spawn(
    unshare: &Path,
    runner: &Path,
    spec_path: &Path,
    env: &BTreeMap<String, String>,
    log: &Path,
) -> std::io::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    tokio::process::Command::new(unshare)
        .args(["--mount", "--uts", "--propagation", "private", "--"])
        .arg(runner)
        .arg("pod-exec")
        .arg(spec_path)
        .env_clear()
        .envs(env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Sends `signal` (`TERM`, `KILL`) to the process, or to its whole process group.
pub fn signal(pid: u32, signal: &str, group: bool) {
    let target = if group { format!("-{pid}") } else { pid.to_string() };
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn run(program: &Path, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("cannot run {}: {error}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{} {args:?} failed: {}", program.display(), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The `pod-exec` mode: runs inside the new namespaces, sets them up and execs the container's program. Returns
/// only on failure.
pub fn pod_exec(spec_path: &Path) -> Result<Infallible, String> {
    use std::os::unix::process::CommandExt;
    let text = std::fs::read_to_string(spec_path)
        .map_err(|error| format!("cannot read the exec spec {}: {error}", spec_path.display()))?;
    let spec: ExecSpec = serde_json::from_str(&text)
        .map_err(|error| format!("cannot parse the exec spec {}: {error}", spec_path.display()))?;
    std::fs::write("/proc/sys/kernel/hostname", &spec.hostname)
        .map_err(|error| format!("cannot set the hostname {:?}: {error}", spec.hostname))?;
    // Every source is opened first: a mount over one of their parents cannot hide them afterwards.
    let mut sources = Vec::new();
    for mount in &spec.mounts {
        let file = std::fs::File::open(&mount.source)
            .map_err(|error| format!("cannot open the mount source {}: {error}", mount.source.display()))?;
        sources.push(file);
    }
    // The program's directory too: a volume over one of its parents (the MirrorMaker 2 pods' `emptyDir` at `/tmp`
    // over a launcher in a stack under `/tmp`) would hide it, and it is mounted back at its path then.
    let program_dir = spec.program.parent().filter(|dir| dir.is_absolute()).map(|dir| (dir, std::fs::File::open(dir)));
    let pid = std::process::id();
    for (mount, source) in spec.mounts.iter().zip(&sources) {
        let is_dir = source.metadata().map_err(|error| format!("{}: {error}", mount.source.display()))?.is_dir();
        if is_dir {
            std::fs::create_dir_all(&mount.target)
                .map_err(|error| format!("cannot create the mount point {}: {error}", mount.target.display()))?;
        } else if !mount.target.exists() {
            if let Some(parent) = mount.target.parent() {
                std::fs::create_dir_all(parent).map_err(|error| {
                    format!("cannot create the mount point's directory {}: {error}", parent.display())
                })?;
            }
            std::fs::write(&mount.target, b"")
                .map_err(|error| format!("cannot create the mount point {}: {error}", mount.target.display()))?;
        }
        let fd = PathBuf::from(format!("/proc/{pid}/fd/{}", source.as_raw_fd()));
        run(
            &spec.mount_program,
            &["--no-canonicalize".as_ref(), "--bind".as_ref(), fd.as_os_str(), mount.target.as_os_str()],
        )?;
        if mount.read_only {
            run(
                &spec.mount_program,
                &["--no-canonicalize".as_ref(), "-o".as_ref(), "remount,bind,ro".as_ref(), mount.target.as_os_str()],
            )?;
        }
    }
    if let Some((dir, Ok(source))) = program_dir.as_ref().filter(|_| !spec.program.exists()) {
        std::fs::create_dir_all(dir).map_err(|error| {
            format!("a volume hides {}, and its directory cannot be made again: {error}", spec.program.display())
        })?;
        let fd = PathBuf::from(format!("/proc/{pid}/fd/{}", source.as_raw_fd()));
        run(&spec.mount_program, &["--no-canonicalize".as_ref(), "--bind".as_ref(), fd.as_os_str(), dir.as_os_str()])?;
        run(
            &spec.mount_program,
            &["--no-canonicalize".as_ref(), "-o".as_ref(), "remount,bind,ro".as_ref(), dir.as_os_str()],
        )?;
    }
    if spec.read_only_root {
        run(&spec.mount_program, &["-o".as_ref(), "remount,bind,ro".as_ref(), "/".as_ref()])?;
    }
    drop(sources);
    drop(program_dir);
    let error = std::process::Command::new(&spec.program)
        .arg0(&spec.arg0)
        .args(&spec.args)
        .current_dir(&spec.working_dir)
        .exec();
    Err(format!("cannot execute {}: {error}", spec.program.display()))
}
