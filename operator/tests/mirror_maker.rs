//! The `mm2.properties` the operator renders ([`parley_operator::mm2::properties`]), run by a real MirrorMaker 2
//! (Apache Kafka's `connect-mirror`, dedicated mode) between two real Kafka brokers with SASL_SSL: start them with
//! `e2e/stack/up.sh --only kafka --kafka2 /tmp/parley-stack` and `set -a; . /tmp/parley-stack/stack.env; set +a`
//! (`PARLEY_KAFKA_BOOTSTRAP`, `PARLEY_KAFKA_B_BOOTSTRAP`, the CA and the SCRAM user; `--region2` gives the same).
//! MirrorMaker 2 runs through the stack's `bin/mm2-run` (`PARLEY_MM2_RUN`), else from the connect-mirror jars
//! `e2e/stack/install.sh` puts next to the broker's. Without them a plain `cargo test` skips this test and the full
//! test command (`PARLEY_REQUIRE_ENGINES=1`) fails it.
//!
//! It checks what the unit tests cannot: that the property names reach MirrorMaker 2 as meant. Only the rule's
//! exact topics are mirrored (as `<source>.<topic>`), a record crosses, the source consumer reads committed records
//! only, and the SASL password reaches it through `${env:...}`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parley_crds::chat_cluster::SaslMechanism;
use parley_operator::mm2::{self, Alias, Flow, KafkaSecurity, MirrorMakerConfig};
use parley_test_support::Engine;

/// What the test needs from the stack.
struct Stack {
    source: String,
    target: String,
    client_properties: String,
    kafka_run: String,
    ca_file: String,
    username: String,
    password: String,
    mirror_maker: MirrorMakerCommand,
}

/// How MirrorMaker 2 is started.
enum MirrorMakerCommand {
    /// The stack's `bin/mm2-run MM2_PROPERTIES [--clusters ...]`.
    Script(String),
    /// `java -cp <jars>/* org.apache.kafka.connect.mirror.MirrorMaker`.
    Jars(PathBuf),
}

fn skip_or_fail(message: &str) -> Option<Stack> {
    if std::env::var("PARLEY_REQUIRE_ENGINES").is_ok_and(|value| value == "1") {
        panic!("{message}");
    }
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED mirror_maker: {message}");
    None
}

fn stack() -> Option<Stack> {
    let source = parley_test_support::engine(Engine::Kafka)?;
    let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
    let Some(target) = variable("PARLEY_KAFKA_B_BOOTSTRAP") else {
        return skip_or_fail(
            "PARLEY_KAFKA_B_BOOTSTRAP is not set: start the stack with `e2e/stack/up.sh --only kafka --kafka2 \
             /tmp/parley-stack` and `set -a; . /tmp/parley-stack/stack.env; set +a`",
        );
    };
    let jars = variable("PARLEY_KAFKA_LIB").and_then(|broker| {
        let lib = PathBuf::from(broker).parent()?.parent()?.join("mm2/lib");
        lib.is_dir().then_some(lib)
    });
    let mirror_maker = match (variable("PARLEY_MM2_RUN"), jars) {
        (Some(script), _) => MirrorMakerCommand::Script(script),
        (None, Some(jars)) => MirrorMakerCommand::Jars(jars),
        (None, None) => {
            return skip_or_fail("no MirrorMaker 2: PARLEY_MM2_RUN is not set and no connect-mirror jars are installed")
        }
    };
    let needed = |name: &str| variable(name).unwrap_or_else(|| panic!("{name} is not set (stack.env)"));
    Some(Stack {
        source,
        target,
        client_properties: needed("PARLEY_KAFKA_CLIENT_PROPERTIES"),
        kafka_run: needed("PARLEY_KAFKA_RUN"),
        ca_file: needed("PARLEY_KAFKA_TLS_CA_FILE"),
        username: needed("PARLEY_KAFKA_SASL_USERNAME"),
        password: needed("PARLEY_KAFKA_SASL_PASSWORD"),
        mirror_maker,
    })
}

impl Stack {
    /// Runs a Kafka tool class against `bootstrap`, with `input` on stdin; returns stdout.
    fn tool(&self, class: &str, bootstrap: &str, args: &[&str], input: Option<&str>) -> String {
        let mut command = Command::new(&self.kafka_run);
        command.arg(class).args(["--bootstrap-server", bootstrap]).args(args);
        command.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|error| panic!("run {}: {error}", self.kafka_run));
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        let output = child.wait_with_output().expect("wait");
        assert!(output.status.success(), "{class} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn create_topic(&self, topic: &str) {
        let config = ["--command-config", &self.client_properties];
        let args = [&config[..], &["--create", "--if-not-exists", "--topic", topic, "--partitions", "1"][..]].concat();
        let args = [&args[..], &["--replication-factor", "1"][..]].concat();
        self.tool("org.apache.kafka.tools.TopicCommand", &self.source, &args, None);
    }

    fn target_topics(&self) -> Vec<String> {
        let output = self.tool(
            "org.apache.kafka.tools.TopicCommand",
            &self.target,
            &["--command-config", &self.client_properties, "--list"],
            None,
        );
        output.lines().map(str::to_owned).collect()
    }
}

/// The MirrorMaker 2 process; killed when dropped.
struct MirrorMaker {
    child: Child,
    log: PathBuf,
}

impl Drop for MirrorMaker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> =
                text.lines().filter(|line| line.contains("ERROR") || line.contains("WARN")).collect();
            eprintln!("--- MirrorMaker 2 warnings and errors ({}) ---\n{}", self.log.display(), lines.join("\n"));
        }
    }
}

#[test]
fn the_rendered_properties_mirror_exactly_the_rules_topics_with_committed_reads() {
    let Some(stack) = stack() else { return };
    let prefix = parley_test_support::unique("mmt-");
    let topic = |name: &str| format!("{prefix}-{name}");
    // The rule's topics, and two more that must stay behind (a third topic, and a name the rule's is a prefix of).
    for name in ["messages", "receipts", "presence", "messagesx"] {
        stack.create_topic(&topic(name));
    }
    let config = MirrorMakerConfig {
        cluster: "chat".into(),
        target: Alias { name: "us".into(), bootstrap_servers: stack.target.clone() },
        flows: vec![Flow {
            source: Alias { name: "eu".into(), bootstrap_servers: stack.source.clone() },
            topics: mm2::topic_names(&prefix, &["messages".into(), "receipts".into()]).into_iter().collect(),
        }],
        replication_factor: 1,
        refresh_topics_interval_seconds: 5,
        replicas: 1,
        security: KafkaSecurity {
            tls: true,
            ca_file: Some(stack.ca_file.clone()),
            sasl: Some(SaslMechanism::ScramSha512),
        },
    };
    let properties = mm2::properties(&config);
    assert!(!properties.contains(&stack.password), "no password in the properties");
    let directory = std::env::temp_dir().join(format!("parley-{prefix}"));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let file = directory.join("mm2.properties");
    std::fs::write(&file, &properties).expect("write mm2.properties");
    let log = directory.join("mm2.log");
    let output = std::fs::File::create(&log).expect("log file");
    let mut command = match &stack.mirror_maker {
        MirrorMakerCommand::Script(script) => Command::new(script),
        MirrorMakerCommand::Jars(jars) => {
            let log4j = directory.join("log4j2.properties");
            std::fs::write(
                &log4j,
                "rootLogger.level=INFO\nrootLogger.appenderRef.stdout.ref=STDOUT\nappender.stdout.type=Console\n\
                 appender.stdout.name=STDOUT\nappender.stdout.layout.type=PatternLayout\n\
                 appender.stdout.layout.pattern=[%d] %p %m (%c)%n\n",
            )
            .expect("write log4j2.properties");
            let mut command = Command::new(std::env::var("KAFKA_JAVA").unwrap_or_else(|_| "java".to_owned()));
            command
                .args(["-Xms128m", "-Xmx512m", "-Djava.net.preferIPv4Stack=true"])
                .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
                .arg("-cp")
                .arg(format!("{}/*", jars.display()))
                .arg("org.apache.kafka.connect.mirror.MirrorMaker");
            command
        }
    };
    let child = command
        .arg(&file)
        .args(["--clusters", "us"])
        .env(mm2::SASL_USERNAME_VARIABLE, &stack.username)
        .env(mm2::SASL_PASSWORD_VARIABLE, &stack.password)
        .env(mm2::POD_IP_VARIABLE, "127.0.0.1")
        .stdout(output.try_clone().expect("log file"))
        .stderr(output)
        .spawn()
        .expect("start MirrorMaker 2 (java)");
    let _mirror_maker = MirrorMaker { child, log: log.clone() };

    // The rule's topics appear in us as eu.<topic>; the others never do.
    let deadline = Instant::now() + Duration::from_secs(120);
    let wanted = [format!("eu.{}", topic("messages")), format!("eu.{}", topic("receipts"))];
    loop {
        let topics = stack.target_topics();
        if wanted.iter().all(|name| topics.contains(name)) {
            break;
        }
        assert!(Instant::now() < deadline, "MirrorMaker 2 did not create {wanted:?} in us within 120 s: {topics:?}");
        std::thread::sleep(Duration::from_secs(2));
    }
    // Two more topic refreshes: what was not copied by now is not matched.
    std::thread::sleep(Duration::from_secs(12));
    let topics = stack.target_topics();
    for name in ["presence", "messagesx"] {
        assert!(!topics.contains(&format!("eu.{}", topic(name))), "eu.{} was mirrored: {topics:?}", topic(name));
    }

    // A record crosses.
    let record = format!("hello-from-eu-{prefix}");
    stack.tool(
        "org.apache.kafka.tools.ConsoleProducer",
        &stack.source,
        &["--producer.config", &stack.client_properties, "--topic", &topic("messages")],
        Some(&format!("{record}\n")),
    );
    let consumed = stack.tool(
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
        &stack.target,
        &[
            "--consumer.config",
            &stack.client_properties,
            "--topic",
            &format!("eu.{}", topic("messages")),
            "--from-beginning",
            "--max-messages",
            "1",
            "--timeout-ms",
            "90000",
        ],
        None,
    );
    assert!(consumed.contains(&record), "consumed from us: {consumed:?}");

    // The source consumer reads committed records only.
    let text = std::fs::read_to_string(&log).expect("read the log");
    let consumer = text
        .split("ConsumerConfig values:")
        .find(|block| block.contains("client.id = eu->us|MirrorSourceConnector-0|replication-consumer"))
        .expect("the MirrorSourceConnector's consumer config in the log");
    assert!(consumer.contains("isolation.level = read_committed"), "{consumer}");
    let _ = std::fs::remove_dir_all(&directory);
}
