//! Kafka over SASL_SSL and Cassandra with client-to-node TLS and `PasswordAuthenticator`, as `e2e/stack/up.sh`
//! starts them: the drivers connect with the credentials and the CA of the environment (`stack.env`), and a wrong
//! password or a certificate from another CA fails at once, with an error that names the engine and what failed,
//! both in the drivers ([`BackendError::Refused`]) and at the start of `parley-router`, which exits.
//!
//! Needs `PARLEY_KAFKA_BOOTSTRAP` and `PARLEY_CASSANDRA_CONTACT` with their TLS and credential variables (start the
//! engines with `e2e/stack/up.sh --only kafka,cassandra <state dir>` and source `<state dir>/stack.env`); the other
//! CA is made in each test with the `openssl` command. Every other Kafka and Cassandra test of the workspace runs
//! through the same TLS and credentials, since `parley_test_support::{kafka_config, cassandra_config}` read them.

use parley_api::BackendError;
use parley_core::protocol::MessageView;
use parley_router::backend::{HistoryQuery, MessageStore};
use parley_router::cassandra::{CassandraConfig, CassandraStore};
use parley_router::kafka::{ensure_topics, KafkaConfig};
use parley_test_support::{cassandra_config, engine, kafka_config, unique, Engine};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The stack's Kafka settings, which must use SASL_SSL, or `None` when engine tests are skipped.
fn secured_kafka() -> Option<KafkaConfig> {
    let bootstrap = engine(Engine::Kafka)?;
    let config = kafka_config(&bootstrap).with_prefix(unique("parley-security-") + "-").with_partitions(1);
    assert_eq!(
        config.security_protocol(),
        "sasl_ssl",
        "the test stack's Kafka takes SASL_SSL only: the environment must name its CA and user \
         (PARLEY_KAFKA_TLS_CA_FILE, PARLEY_KAFKA_SASL_USERNAME/PASSWORD in stack.env)"
    );
    Some(config)
}

/// The stack's Cassandra settings (own keyspace), which must use TLS and credentials, or `None` when skipped.
fn secured_cassandra() -> Option<CassandraConfig> {
    let contact = engine(Engine::Cassandra)?;
    let mut config = cassandra_config(&contact, unique("parley_security_").replace('-', "_"));
    config.local_datacenter = std::env::var("PARLEY_CASSANDRA_DC").ok().filter(|dc| !dc.is_empty());
    assert!(
        config.uses_tls() && config.credentials.is_some(),
        "the test stack's Cassandra takes TLS and PasswordAuthenticator: the environment must name its CA and role \
         (PARLEY_CASSANDRA_TLS_CA_FILE, PARLEY_CASSANDRA_USERNAME/PASSWORD in stack.env)"
    );
    Some(config)
}

/// A CA of its own (not the stack's), made with the `openssl` command: `<dir>/other-ca.crt`.
fn other_ca(dir: &Path) -> PathBuf {
    let certificate = dir.join("other-ca.crt");
    let output = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=another parley test CA"])
        .arg("-keyout")
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&certificate)
        .output()
        .expect("run openssl");
    assert!(output.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&output.stderr));
    certificate
}

/// How `parley-router` ended when started with `env` (on top of the test's environment) and an empty data dir.
struct Exit {
    success: bool,
    stderr: String,
    took: Duration,
}

async fn run_router(dir: &Path, env: &[(&str, String)]) -> Exit {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley-router"));
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        // Not reached: the backends are opened first.
        .args(["--redis-url", "redis://127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.join("router"))
        .env("PARLEY_LOG", "error")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("parley-router must exit when an engine refuses it, not hang")
        .expect("run parley-router");
    Exit {
        success: output.status.success(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// The environment of a router on the stack's Kafka (and Cassandra when given), as `config`s say.
fn router_env(kafka: &KafkaConfig, cassandra: Option<&CassandraConfig>) -> Vec<(&'static str, String)> {
    let sasl = kafka.sasl.as_ref().expect("SASL");
    let mut env = vec![
        ("PARLEY_KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers.clone()),
        ("PARLEY_KAFKA_TOPIC_PREFIX", kafka.prefix.clone()),
        ("PARLEY_KAFKA_PARTITIONS", "1".to_owned()),
        ("PARLEY_KAFKA_TLS_CA_FILE", kafka.tls_ca_file.as_ref().expect("CA file").display().to_string()),
        ("PARLEY_KAFKA_SASL_MECHANISM", sasl.mechanism.to_string()),
        ("PARLEY_KAFKA_SASL_USERNAME", sasl.username.clone()),
        ("PARLEY_KAFKA_SASL_PASSWORD", sasl.password.clone()),
    ];
    if let Some(cassandra) = cassandra {
        let credentials = cassandra.credentials.as_ref().expect("credentials");
        env.extend([
            ("PARLEY_CASSANDRA_CONTACT_POINTS", cassandra.contact_points.join(",")),
            ("PARLEY_CASSANDRA_KEYSPACE", cassandra.keyspace.clone()),
            ("PARLEY_CASSANDRA_TLS_CA_FILE", cassandra.tls_ca_file.as_ref().expect("CA file").display().to_string()),
            ("PARLEY_CASSANDRA_USERNAME", credentials.username.clone()),
            ("PARLEY_CASSANDRA_PASSWORD", credentials.password.clone()),
        ]);
        if let Some(datacenter) = &cassandra.local_datacenter {
            env.push(("PARLEY_CASSANDRA_LOCAL_DATACENTER", datacenter.clone()));
        }
    }
    env
}

fn message(channel: &str, seq: u64) -> MessageView {
    MessageView {
        channel: channel.to_owned(),
        seq,
        id: 1_000 + seq,
        sender: "alice".to_owned(),
        text: format!("over TLS {seq}"),
        ts: 1_700_000_000_000 + seq,
        client_msg_id: format!("m{seq}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drivers_connect_with_tls_and_credentials() {
    let Some(kafka) = secured_kafka() else { return };
    let Some(cassandra) = secured_cassandra() else { return };
    assert_eq!(ensure_topics(&kafka).await.expect("topics over SASL_SSL"), 1);

    let store = CassandraStore::connect(cassandra.clone()).await.expect("Cassandra over TLS as the stack's role");
    store.write(vec![message("g:tls", 1), message("g:tls", 2)]).await.expect("write");
    let page = store.history("g:tls", HistoryQuery { before: None, after: Some(0), limit: 10 }).await.expect("read");
    let texts: Vec<&str> = page.messages.iter().map(|message| message.text.as_str()).collect();
    assert_eq!(texts, ["over TLS 1", "over TLS 2"]);
    store.drop_keyspace().await.expect("drop keyspace");

    // The engines do insist: no credentials, or no TLS, and they refuse.
    let anonymous = CassandraConfig { credentials: None, ..cassandra.clone() };
    let error = CassandraStore::connect(anonymous).await.expect_err("credentials are required");
    assert!(matches!(error, BackendError::Refused { engine: "Cassandra", .. }), "{error:?}");
    assert!(error.to_string().contains("authentication failed"), "{error}");
    let plaintext = CassandraConfig { tls: false, tls_ca_file: None, ..cassandra };
    let error = CassandraStore::connect(plaintext).await.expect_err("TLS is required");
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kafka_password_fails_fast_with_a_clear_error() {
    let Some(mut kafka) = secured_kafka() else { return };
    if let Some(sasl) = &mut kafka.sasl {
        sasl.password = "not-the-password".to_owned();
    }
    let expected = format!("Kafka at {}: SASL authentication failed", kafka.bootstrap_servers);

    let started = Instant::now();
    let error = ensure_topics(&kafka).await.expect_err("a wrong password is refused");
    let took = started.elapsed();
    assert!(matches!(error, BackendError::Refused { engine: "Kafka", .. }), "{error:?}");
    assert!(error.to_string().starts_with(&expected), "{error}");
    assert!(took < kafka.request_timeout, "refused after {took:?}, not within the request timeout");

    let dir = tempfile::tempdir().expect("tempdir");
    let exit = run_router(dir.path(), &router_env(&kafka, None)).await;
    assert!(!exit.success, "parley-router must not start with a wrong Kafka password");
    assert!(exit.stderr.contains(&expected), "parley-router's error names the cause: {}", exit.stderr);
    assert!(exit.took < Duration::from_secs(10), "parley-router took {:?} to give up", exit.took);
    eprintln!("wrong Kafka password: the driver gave up after {took:?}, parley-router exited after {:?}", exit.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_certificate_from_another_ca_fails_fast() {
    let Some(mut kafka) = secured_kafka() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    kafka.tls_ca_file = Some(other_ca(dir.path()));
    let expected = format!("Kafka at {}: TLS handshake failed: certificate verify failed", kafka.bootstrap_servers);

    let started = Instant::now();
    let error = ensure_topics(&kafka).await.expect_err("a broker the CA did not sign is refused");
    let took = started.elapsed();
    assert!(matches!(error, BackendError::Refused { engine: "Kafka", .. }), "{error:?}");
    assert!(error.to_string().starts_with(&expected), "{error}");
    assert!(took < kafka.request_timeout, "refused after {took:?}, not within the request timeout");

    let exit = run_router(dir.path(), &router_env(&kafka, None)).await;
    assert!(!exit.success, "parley-router must not start on a broker it cannot trust");
    assert!(exit.stderr.contains(&expected), "parley-router's error names the cause: {}", exit.stderr);
    assert!(exit.took < Duration::from_secs(10), "parley-router took {:?} to give up", exit.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cassandra_password_fails_fast_with_a_clear_error() {
    let Some(kafka) = secured_kafka() else { return };
    let Some(mut cassandra) = secured_cassandra() else { return };
    if let Some(credentials) = &mut cassandra.credentials {
        credentials.password = "not-the-password".to_owned();
    }
    let expected = format!("Cassandra at {}: authentication failed", cassandra.contact_points.join(","));

    let started = Instant::now();
    let error = CassandraStore::connect(cassandra.clone()).await.expect_err("a wrong password is refused");
    let took = started.elapsed();
    assert!(matches!(error, BackendError::Refused { engine: "Cassandra", .. }), "{error:?}");
    assert!(error.to_string().starts_with(&expected), "{error}");
    assert!(took < cassandra.request_timeout, "refused after {took:?}, not within the request timeout");

    let dir = tempfile::tempdir().expect("tempdir");
    let exit = run_router(dir.path(), &router_env(&kafka, Some(&cassandra))).await;
    assert!(!exit.success, "parley-router must not start with a wrong Cassandra password");
    assert!(exit.stderr.contains(&expected), "parley-router's error names the cause: {}", exit.stderr);
    assert!(exit.took < Duration::from_secs(15), "parley-router took {:?} to give up", exit.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_certificate_from_another_ca_fails_fast() {
    let Some(kafka) = secured_kafka() else { return };
    let Some(mut cassandra) = secured_cassandra() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    cassandra.tls_ca_file = Some(other_ca(dir.path()));
    let expected = format!("Cassandra at {}: TLS handshake failed", cassandra.contact_points.join(","));

    let started = Instant::now();
    let error = CassandraStore::connect(cassandra.clone()).await.expect_err("a node the CA did not sign is refused");
    let took = started.elapsed();
    assert!(matches!(error, BackendError::Refused { engine: "Cassandra", .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.starts_with(&expected) && text.contains("certificate verify failed"), "{text}");
    assert!(took < cassandra.request_timeout, "refused after {took:?}, not within the request timeout");

    let exit = run_router(dir.path(), &router_env(&kafka, Some(&cassandra))).await;
    assert!(!exit.success, "parley-router must not start on a node it cannot trust");
    assert!(exit.stderr.contains(&expected), "parley-router's error names the cause: {}", exit.stderr);
    assert!(exit.took < Duration::from_secs(15), "parley-router took {:?} to give up", exit.took);
}
