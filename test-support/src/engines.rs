//! Whether a test that needs a real engine runs.
//!
//! Each engine is named by one environment variable, which `e2e/stack/up.sh` (`stack.env`) or `e2e/k8s/up.sh`
//! (`env`) writes. [`engine`] returns its value when it is set. When it is not:
//!
//! - with `PARLEY_REQUIRE_ENGINES=1` (the full test command, `bash e2e/test-all.sh`, sets it) the test fails with a
//!   message saying how to start the engine: an engine test never passes without its engine there;
//! - otherwise (plain `cargo test`) the test is skipped: it returns at once and one line on stderr names it and the
//!   variable it lacks, so a run without engines still runs every engine-free test of every crate.
//!
//! `PARLEY_SKIP_ENGINE_TESTS=1` skips engine tests even when their variables are set; the full test command
//! refuses it.

use std::io::Write;

/// A real engine some tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A Redis server (`PARLEY_REDIS_URL`).
    Redis,
    /// A Redis Cluster (`PARLEY_REDIS_CLUSTER_URLS`, comma-separated seed URLs).
    RedisCluster,
    /// A Kafka broker (`PARLEY_KAFKA_BOOTSTRAP`).
    Kafka,
    /// A Cassandra node (`PARLEY_CASSANDRA_CONTACT`).
    Cassandra,
    /// A Kubernetes API server with kwok (`KUBECONFIG`, and `kubectl` on `PATH`).
    Kubernetes,
    /// A second region's engines next to the first's: a second Kafka (`PARLEY_KAFKA_B_BOOTSTRAP`), a second Redis
    /// (`PARLEY_REDIS_B_URL`), Cassandra's second datacenter (`PARLEY_CASSANDRA_CONTACT_DC2`) and MirrorMaker 2
    /// (`PARLEY_MM2_RUN`).
    SecondRegion,
}

impl Engine {
    /// The environment variable that names the engine.
    pub fn variable(self) -> &'static str {
        match self {
            Engine::Redis => "PARLEY_REDIS_URL",
            Engine::RedisCluster => "PARLEY_REDIS_CLUSTER_URLS",
            Engine::Kafka => "PARLEY_KAFKA_BOOTSTRAP",
            Engine::Cassandra => "PARLEY_CASSANDRA_CONTACT",
            Engine::Kubernetes => "KUBECONFIG",
            Engine::SecondRegion => "PARLEY_KAFKA_B_BOOTSTRAP",
        }
    }

    /// What the engine is, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Redis => "Redis",
            Engine::RedisCluster => "a Redis Cluster",
            Engine::Kafka => "Kafka",
            Engine::Cassandra => "Cassandra",
            Engine::Kubernetes => "a Kubernetes control plane",
            Engine::SecondRegion => "a second region (Kafka B, Redis B, Cassandra dc2, MirrorMaker 2)",
        }
    }

    /// How to start it by hand.
    pub fn how_to_start(self) -> &'static str {
        match self {
            Engine::Redis | Engine::RedisCluster | Engine::Kafka | Engine::Cassandra => {
                "start it with `e2e/stack/up.sh --only redis,redis-cluster,kafka,cassandra /tmp/parley-stack` and \
                 `set -a; . /tmp/parley-stack/stack.env; set +a`"
            }
            Engine::Kubernetes => "start it with `e2e/k8s/up.sh /tmp/parley-k8s` and `. /tmp/parley-k8s/env`",
            Engine::SecondRegion => {
                "start it with `e2e/stack/up.sh --only redis,kafka,cassandra --region2 /tmp/parley-stack` and \
                 `set -a; . /tmp/parley-stack/stack.env; set +a`"
            }
        }
    }
}

/// What to do about an engine test, from the environment (pure, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run it against this address (or file, for `KUBECONFIG`).
    Run(String),
    /// Skip it, for this reason.
    Skip(String),
    /// Fail it, with this message.
    Fail(String),
}

/// Decides, given the engine's variable and the two switches.
pub fn decide(engine: Engine, value: Option<&str>, require: bool, skip: bool) -> Verdict {
    let value = value.filter(|value| !value.trim().is_empty());
    match (value, require, skip) {
        (_, true, true) => Verdict::Fail(
            "PARLEY_SKIP_ENGINE_TESTS=1 and PARLEY_REQUIRE_ENGINES=1 are both set: the full test command runs every \
             engine test; unset PARLEY_SKIP_ENGINE_TESTS"
                .to_owned(),
        ),
        (Some(_), false, true) => Verdict::Skip("PARLEY_SKIP_ENGINE_TESTS=1".to_owned()),
        (Some(value), _, false) => Verdict::Run(value.to_owned()),
        (None, true, false) => Verdict::Fail(format!(
            "{} is not set, so this test cannot reach {}: {} (the full test command, `bash e2e/test-all.sh`, \
             starts every engine)",
            engine.variable(),
            engine.name(),
            engine.how_to_start()
        )),
        (None, false, _) => Verdict::Skip(format!("{} is not set", engine.variable())),
    }
}

fn switch(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| value == "1")
}

/// The engine's address when the test should run; `None` when it is skipped (after one line on stderr naming
/// the test). Panics, with how to start the engine, when engines are required and this one is missing.
pub fn engine(engine: Engine) -> Option<String> {
    let value = std::env::var(engine.variable()).ok();
    match decide(engine, value.as_deref(), switch("PARLEY_REQUIRE_ENGINES"), switch("PARLEY_SKIP_ENGINE_TESTS")) {
        Verdict::Run(value) => Some(value),
        Verdict::Fail(message) => panic!("{message}"),
        Verdict::Skip(reason) => {
            skipped(engine, &reason);
            None
        }
    }
}

/// Says on stderr that the current test is skipped. Written to the process's stderr directly: the test harness
/// captures only `print!` and `eprint!`, and a skip must be seen.
fn skipped(engine: Engine, reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let binary = std::env::current_exe()
        .ok()
        .and_then(|path| path.file_stem().map(|stem| stem.to_string_lossy().into_owned()))
        .map(|stem| stem.rsplit_once('-').map(|(name, _hash)| name.to_owned()).unwrap_or(stem))
        .unwrap_or_default();
    let line = format!("SKIPPED {binary}::{test}: needs {} ({reason})\n", engine.name());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_variable_runs_the_test() {
        assert_eq!(decide(Engine::Kafka, Some("127.0.0.1:9092"), false, false), Verdict::Run("127.0.0.1:9092".into()));
        assert_eq!(decide(Engine::Kafka, Some("127.0.0.1:9092"), true, false), Verdict::Run("127.0.0.1:9092".into()));
    }

    #[test]
    fn a_missing_engine_skips_plain_cargo_test_and_fails_the_full_command() {
        assert_eq!(decide(Engine::Redis, None, false, false), Verdict::Skip("PARLEY_REDIS_URL is not set".into()));
        assert_eq!(decide(Engine::Redis, Some(" "), false, false), Verdict::Skip("PARLEY_REDIS_URL is not set".into()));
        let Verdict::Fail(message) = decide(Engine::Cassandra, None, true, false) else { panic!("must fail") };
        assert!(message.contains("PARLEY_CASSANDRA_CONTACT is not set"), "{message}");
        assert!(message.contains("e2e/stack/up.sh"), "{message}");
    }

    #[test]
    fn skipping_is_refused_when_engines_are_required() {
        assert!(matches!(decide(Engine::Kubernetes, Some("/k"), true, true), Verdict::Fail(_)));
        assert!(matches!(decide(Engine::Kubernetes, None, true, true), Verdict::Fail(_)));
        assert_eq!(
            decide(Engine::Kubernetes, Some("/k"), false, true),
            Verdict::Skip("PARLEY_SKIP_ENGINE_TESTS=1".into())
        );
    }
}
