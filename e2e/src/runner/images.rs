//! The image → binary map: which workspace binary stands in for a container image, and what the image itself would
//! add to the process (its `ENTRYPOINT`, `CMD` and `ENV`, from `docker/*.Dockerfile`).
//!
//! An image is looked up by its repository, without tag or digest (`parley/gateway:0.1.0` and
//! `parley/gateway@sha256:…` both name `parley/gateway`); a `docker.io/` (or `index.docker.io/`) registry prefix
//! is ignored. The built-in entries are the two images the operator runs:
//!
//! | repository | binary | entrypoint in the image | image `ENV` |
//! | --- | --- | --- | --- |
//! | `parley/gateway` | `parley` | `/usr/local/bin/parley` | `PARLEY_LISTEN=0.0.0.0:8080`, `PARLEY_ADMIN_LISTEN=0.0.0.0:9090`, `PARLEY_DATA_DIR=/var/lib/parley` |
//! | `parley/router` | `parley-router` | `/usr/local/bin/parley-router` | `PARLEY_ROUTER_LISTEN=0.0.0.0:7070`, `PARLEY_ROUTER_ADMIN_LISTEN=0.0.0.0:9090`, `PARLEY_DATA_DIR=/var/lib/parley-router` |
//!
//! More come from `--image REPOSITORY=BINARY` (entrypoint `/usr/local/bin/BINARY`, no `ENV`). A unit test checks the
//! built-in entries against the Dockerfiles.
//!
//! MirrorMaker 2 pods run Apache Kafka's image (`apache/kafka`) with `command:
//! [/opt/kafka/bin/connect-mirror-maker.sh, <mm2.properties>, --clusters, <alias>]`. `--mm2-launcher
//! [REPOSITORY=]LAUNCHER` ([`ImageMap::add_mirror_maker`]) maps that script of that image (by default `apache/kafka`)
//! to a launcher outside the binaries directory, `e2e/stack`'s `bin/mm2-run`, which takes the same arguments. Such
//! an entry has no `ENTRYPOINT` or `CMD` of its own: the container must name the script in `command`.

use std::path::{Path, PathBuf};

/// The repository of the Apache Kafka image, whose `connect-mirror-maker.sh` runs MirrorMaker 2.
pub const MIRROR_MAKER_REPOSITORY: &str = "apache/kafka";
/// The script of the Apache Kafka image that starts MirrorMaker 2 in dedicated mode.
pub const MIRROR_MAKER_SCRIPT: &str = "/opt/kafka/bin/connect-mirror-maker.sh";

/// What stands in for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Repository, without tag or digest (`parley/gateway`).
    pub repository: String,
    /// What is run: a file name of the binaries directory (a workspace binary), or an absolute path (a launcher
    /// such as `e2e/stack`'s `bin/mm2-run`).
    pub binary: String,
    /// The image's `ENTRYPOINT` executable, as a container's `command` would name it.
    pub entrypoint: String,
    /// The image's own `ENTRYPOINT`/`CMD` are not provided: a container must name `entrypoint` in its `command`.
    pub command_required: bool,
    /// The image's `CMD` (arguments when the container gives neither `command` nor `args`).
    pub cmd: Vec<String>,
    /// The image's `ENV`, in order; the container's own environment overrides it.
    pub env: Vec<(String, String)>,
}

/// The map the runner uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMap {
    entries: Vec<ImageEntry>,
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
}

impl ImageMap {
    /// The operator's two images (`docker/gateway.Dockerfile`, `docker/router.Dockerfile`).
    pub fn builtin() -> ImageMap {
        ImageMap {
            entries: vec![
                ImageEntry {
                    repository: "parley/gateway".to_owned(),
                    binary: "parley".to_owned(),
                    entrypoint: "/usr/local/bin/parley".to_owned(),
                    command_required: false,
                    cmd: Vec::new(),
                    env: pairs(&[
                        ("PARLEY_LISTEN", "0.0.0.0:8080"),
                        ("PARLEY_ADMIN_LISTEN", "0.0.0.0:9090"),
                        ("PARLEY_DATA_DIR", "/var/lib/parley"),
                    ]),
                },
                ImageEntry {
                    repository: "parley/router".to_owned(),
                    binary: "parley-router".to_owned(),
                    entrypoint: "/usr/local/bin/parley-router".to_owned(),
                    command_required: false,
                    cmd: Vec::new(),
                    env: pairs(&[
                        ("PARLEY_ROUTER_LISTEN", "0.0.0.0:7070"),
                        ("PARLEY_ROUTER_ADMIN_LISTEN", "0.0.0.0:9090"),
                        ("PARLEY_DATA_DIR", "/var/lib/parley-router"),
                    ]),
                },
            ],
        }
    }

    /// Adds (or replaces) `repository` → `binary`, from `REPOSITORY=BINARY`.
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (repository, binary) = spec
            .split_once('=')
            .filter(|(repository, binary)| !repository.is_empty() && !binary.is_empty() && !binary.contains('/'))
            .ok_or_else(|| format!("--image takes REPOSITORY=BINARY (a file name of --binaries), not {spec:?}"))?;
        let repository = self::repository(repository).to_owned();
        self.entries.retain(|entry| entry.repository != repository);
        self.entries.push(ImageEntry {
            entrypoint: format!("/usr/local/bin/{binary}"),
            repository,
            binary: binary.to_owned(),
            command_required: false,
            cmd: Vec::new(),
            env: Vec::new(),
        });
        Ok(())
    }

    /// Adds (or replaces) a MirrorMaker 2 image, from `[REPOSITORY=]LAUNCHER`: a container of `REPOSITORY` (default
    /// [`MIRROR_MAKER_REPOSITORY`]) whose `command` starts with [`MIRROR_MAKER_SCRIPT`] runs `LAUNCHER`, an absolute
    /// path, with the container's arguments (`<mm2.properties> --clusters <alias>`).
    pub fn add_mirror_maker(&mut self, spec: &str) -> Result<(), String> {
        let (repository, launcher) = match spec.split_once('=') {
            Some((repository, launcher)) if !repository.starts_with('/') => (repository, launcher),
            _ => (MIRROR_MAKER_REPOSITORY, spec),
        };
        if repository.is_empty() || !launcher.starts_with('/') || launcher.ends_with('/') {
            return Err(format!(
                "--mm2-launcher takes [REPOSITORY=]LAUNCHER, LAUNCHER an absolute path (e2e/stack's bin/mm2-run), not \
                 {spec:?}"
            ));
        }
        let repository = self::repository(repository).to_owned();
        self.entries.retain(|entry| entry.repository != repository);
        self.entries.push(ImageEntry {
            repository,
            binary: launcher.to_owned(),
            entrypoint: MIRROR_MAKER_SCRIPT.to_owned(),
            command_required: true,
            cmd: Vec::new(),
            env: Vec::new(),
        });
        Ok(())
    }

    /// The entry of a container's `image`.
    pub fn lookup(&self, image: &str) -> Option<&ImageEntry> {
        let repository = repository(image);
        self.entries.iter().find(|entry| entry.repository == repository)
    }

    /// Every entry.
    pub fn entries(&self) -> &[ImageEntry] {
        &self.entries
    }
}

impl ImageEntry {
    /// The file that is run: `binaries/<binary>`, or `binary` itself when it is an absolute path.
    pub fn program(&self, binaries: &Path) -> PathBuf {
        if self.binary.starts_with('/') {
            PathBuf::from(&self.binary)
        } else {
            binaries.join(&self.binary)
        }
    }
}

/// The last component of a path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The repository of an image reference: without `@digest`, without `:tag` (a `:` after the last `/`), and without
/// a `docker.io/` or `index.docker.io/` prefix (and `library/` after it).
pub fn repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _digest)| name);
    let last_slash = image.rfind('/').map_or(0, |index| index + 1);
    let image = match image[last_slash..].rfind(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    };
    let image = image.strip_prefix("docker.io/").or_else(|| image.strip_prefix("index.docker.io/")).unwrap_or(image);
    image.strip_prefix("library/").unwrap_or(image)
}

/// The program and arguments of a container, the way a container runtime combines them with the image: `command`
/// replaces the `ENTRYPOINT` (and drops the `CMD`), `args` replace the `CMD`. The program must be the image's
/// entrypoint (by path or by file name, or the binary's file name): it becomes [`ImageEntry::program`], with the
/// image path as `argv[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The file to execute.
    pub program: PathBuf,
    /// `argv[0]`, as the image names the program.
    pub arg0: String,
    /// The arguments (before `$(VAR)` expansion).
    pub args: Vec<String>,
}

/// Combines a container's `command` and `args` with its image entry.
pub fn invocation(
    entry: &ImageEntry,
    binaries: &Path,
    command: &[String],
    args: Option<&[String]>,
) -> Result<Invocation, String> {
    let (program, mut rest) = match command.split_first() {
        Some((program, rest)) => (program.clone(), rest.to_vec()),
        None if entry.command_required => {
            return Err(format!(
                "the container of image {} has no command: the runner runs only {:?} of it (as {}), named as the \
                 container's command",
                entry.repository, entry.entrypoint, entry.binary
            ))
        }
        None => (entry.entrypoint.clone(), if args.is_some() { Vec::new() } else { entry.cmd.clone() }),
    };
    if let Some(args) = args {
        rest.extend(args.iter().cloned());
    }
    let name = file_name(&program);
    if program != entry.entrypoint && name != file_name(&entry.entrypoint) && name != file_name(&entry.binary) {
        return Err(format!(
            "the container runs {program:?}, which image {} does not provide here: the runner only runs its entrypoint \
             {:?} (as {})",
            entry.repository, entry.entrypoint, entry.binary
        ));
    }
    Ok(Invocation { program: entry.program(binaries), arg0: program, args: rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_drop_tags_digests_and_the_default_registry() {
        assert_eq!(repository("parley/gateway:0.1.0"), "parley/gateway");
        assert_eq!(repository("parley/gateway"), "parley/gateway");
        assert_eq!(repository("parley/gateway@sha256:abc"), "parley/gateway");
        assert_eq!(repository("registry.example.com:5000/parley/router:1"), "registry.example.com:5000/parley/router");
        assert_eq!(repository("docker.io/parley/router:1"), "parley/router");
        assert_eq!(repository("docker.io/library/busybox"), "busybox");
    }

    #[test]
    fn the_map_finds_builtin_and_added_images() {
        let mut map = ImageMap::builtin();
        assert_eq!(map.lookup("parley/gateway:0.1.0").map(|entry| entry.binary.as_str()), Some("parley"));
        assert_eq!(map.lookup("docker.io/parley/router:9").map(|entry| entry.binary.as_str()), Some("parley-router"));
        assert!(map.lookup("registry.example.com/parley/gateway:0.1.0").is_none());
        map.add("registry.example.com/parley/gateway=parley").expect("add");
        assert_eq!(map.lookup("registry.example.com/parley/gateway:2").map(|e| e.binary.as_str()), Some("parley"));
        assert!(map.add("nothing").is_err());
        assert!(map.add("a=b/c").is_err());
    }

    #[test]
    fn command_and_args_combine_like_a_container_runtime() {
        let map = ImageMap::builtin();
        let entry = map.lookup("parley/router:1").expect("router");
        let bin = Path::new("/b");
        let plain = invocation(entry, bin, &[], None).expect("plain");
        assert_eq!(plain.program, Path::new("/b/parley-router"));
        assert_eq!(plain.arg0, "/usr/local/bin/parley-router");
        assert!(plain.args.is_empty());
        let with_args = invocation(entry, bin, &[], Some(&["--x".to_owned()])).expect("args");
        assert_eq!(with_args.args, vec!["--x".to_owned()]);
        let command = ["parley-router".to_owned(), "--y".to_owned()];
        let with_command = invocation(entry, bin, &command, Some(&["--z".to_owned()])).expect("command");
        assert_eq!((with_command.arg0.as_str(), with_command.args.len()), ("parley-router", 2));
        let error = invocation(entry, bin, &["/bin/sh".to_owned()], None).expect_err("no shell in the image");
        assert!(error.contains("/bin/sh") && error.contains("parley-router"), "{error}");
    }

    #[test]
    fn mirror_maker_pods_run_the_launcher_with_their_arguments() {
        let mut map = ImageMap::builtin();
        assert!(map.lookup("apache/kafka:4.1.0").is_none(), "not mapped without --mm2-launcher");
        map.add_mirror_maker("/st/bin/mm2-run").expect("default repository");
        map.add_mirror_maker("registry.example.com/apache/kafka=/st/bin/mm2-run").expect("own repository");
        for image in ["apache/kafka:4.1.0", "docker.io/apache/kafka@sha256:ab", "registry.example.com/apache/kafka:4"] {
            let entry = map.lookup(image).expect(image);
            assert_eq!((entry.binary.as_str(), entry.command_required), ("/st/bin/mm2-run", true), "{image}");
        }
        let entry = map.lookup("apache/kafka:4.1.0").expect("entry");
        let command: Vec<String> = [MIRROR_MAKER_SCRIPT, "/etc/mm2/mm2.properties", "--clusters", "us"]
            .iter()
            .map(|word| (*word).to_owned())
            .collect();
        let run = invocation(entry, Path::new("/b"), &command, None).expect("the script");
        assert_eq!(run.program, Path::new("/st/bin/mm2-run"), "the launcher, not a file of the binaries directory");
        assert_eq!(run.arg0, MIRROR_MAKER_SCRIPT);
        assert_eq!(run.args, command[1..].to_vec(), "the arguments pass through");
        // command + args combine as for any image; the script may be named by its file name.
        let split = invocation(
            entry,
            Path::new("/b"),
            &["connect-mirror-maker.sh".to_owned()],
            Some(&["/p".to_owned(), "--clusters".to_owned(), "eu".to_owned()]),
        )
        .expect("by file name, with args");
        assert_eq!((split.program.as_path(), split.args.len()), (Path::new("/st/bin/mm2-run"), 3));
        let error = invocation(entry, Path::new("/b"), &[], Some(&["/p".to_owned()])).expect_err("no command");
        assert!(error.contains("apache/kafka") && error.contains(MIRROR_MAKER_SCRIPT), "{error}");
        let error = invocation(entry, Path::new("/b"), &["/opt/kafka/bin/kafka-server-start.sh".to_owned()], None)
            .expect_err("another script of the image");
        assert!(error.contains("kafka-server-start.sh") && error.contains(MIRROR_MAKER_SCRIPT), "{error}");
        for bad in ["mm2-run", "apache/kafka=mm2-run", "=/st/bin/mm2-run", "/st/bin/"] {
            assert!(map.add_mirror_maker(bad).is_err(), "{bad}");
        }
    }

    /// `ENV`, `ENTRYPOINT` and `CMD` of the final stage of a Dockerfile (the subset the workspace's use).
    fn dockerfile(text: &str) -> (Vec<(String, String)>, Vec<String>, Vec<String>) {
        let joined = text.replace("\\\n", " ");
        let stage = joined.rsplit("\nFROM ").next().unwrap_or(&joined);
        let (mut env, mut entrypoint, mut cmd) = (Vec::new(), Vec::new(), Vec::new());
        for line in stage.lines().map(str::trim) {
            let json = |rest: &str| serde_json::from_str::<Vec<String>>(rest.trim()).expect("exec form");
            if let Some(rest) = line.strip_prefix("ENV ") {
                for pair in rest.split_whitespace() {
                    let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
                    env.push((key.to_owned(), value.to_owned()));
                }
            } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
                entrypoint = json(rest);
            } else if let Some(rest) = line.strip_prefix("CMD ") {
                cmd = json(rest);
            }
        }
        (env, entrypoint, cmd)
    }

    #[test]
    fn the_builtin_entries_match_the_dockerfiles() {
        let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker");
        for (file, repository) in [("gateway.Dockerfile", "parley/gateway"), ("router.Dockerfile", "parley/router")] {
            let text = std::fs::read_to_string(docker.join(file)).expect("read the Dockerfile");
            let (env, entrypoint, cmd) = dockerfile(&text);
            let map = ImageMap::builtin();
            let entry = map.lookup(repository).expect("entry");
            assert_eq!(entry.env, env, "{file}: ENV");
            assert_eq!(vec![entry.entrypoint.clone()], entrypoint, "{file}: ENTRYPOINT");
            assert_eq!(entry.cmd, cmd, "{file}: CMD");
            assert!(text.contains(&format!("--bin {}", entry.binary)), "{file} builds {}", entry.binary);
        }
    }
}
