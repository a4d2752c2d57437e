//! The router's Kafka and Cassandra settings for tests (feature `router`), built from the environment that
//! `e2e/stack/up.sh` writes into `stack.env`: the same variables `parley-router` reads, so a test's drivers connect
//! the way a router started with that environment does (TLS and credentials when the variables name them,
//! plaintext without them).
//!
//! - Kafka: `PARLEY_KAFKA_TLS`, `PARLEY_KAFKA_TLS_CA_FILE`, `PARLEY_KAFKA_SASL_MECHANISM`,
//!   `PARLEY_KAFKA_SASL_USERNAME`, `PARLEY_KAFKA_SASL_PASSWORD`.
//! - Cassandra: `PARLEY_CASSANDRA_TLS`, `PARLEY_CASSANDRA_TLS_CA_FILE`, `PARLEY_CASSANDRA_USERNAME`,
//!   `PARLEY_CASSANDRA_PASSWORD`.
//!
//! A test that starts a stack of its own reads that stack's `stack.env` with [`StackEnv`] and builds its settings
//! with [`kafka_config_with`] / [`cassandra_config_with`]. Raw Kafka clients of a test take
//! [`KafkaConfig::client_config`], which carries the same settings.

use parley_router::cassandra::{CassandraConfig, CassandraCredentials};
use parley_router::kafka::{KafkaConfig, KafkaSasl, SaslMechanism};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The variables of one `stack.env` (`KEY=VALUE` lines, as `up.sh` writes them).
#[derive(Debug, Clone, Default)]
pub struct StackEnv {
    values: HashMap<String, String>,
}

impl StackEnv {
    /// Reads `<state dir>/stack.env`.
    pub fn read(state_dir: &Path) -> std::io::Result<StackEnv> {
        let text = std::fs::read_to_string(state_dir.join("stack.env"))?;
        Ok(StackEnv::parse(&text))
    }

    /// Parses `KEY=VALUE` lines; other lines are ignored.
    pub fn parse(text: &str) -> StackEnv {
        let values = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.trim().trim_start_matches("export ").to_owned(), value.trim().to_owned()))
            .collect();
        StackEnv { values }
    }

    /// A variable's value, when set and not empty.
    pub fn get(&self, name: &str) -> Option<String> {
        self.values.get(name).filter(|value| !value.is_empty()).cloned()
    }
}

/// The process environment's value of `name`, when set and not empty.
fn from_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// A boolean variable as clap reads it: anything but `0`, `false`, `no`, `off`, `n`, `f` is true.
fn flag(value: Option<String>) -> bool {
    value.is_some_and(|value| !["0", "false", "no", "off", "n", "f"].contains(&value.to_ascii_lowercase().as_str()))
}

/// [`KafkaConfig::new`] for `bootstrap`, with TLS and SASL as the process environment says.
pub fn kafka_config(bootstrap: &str) -> KafkaConfig {
    kafka_config_with(bootstrap, from_env)
}

/// [`KafkaConfig::new`] for `bootstrap`, with TLS and SASL as `lookup` says (e.g. a [`StackEnv`]'s `get`).
/// Panics, naming the variable, on a SASL mechanism the router does not know.
pub fn kafka_config_with(bootstrap: &str, lookup: impl Fn(&str) -> Option<String>) -> KafkaConfig {
    let mut config = KafkaConfig::new(bootstrap);
    config.tls = flag(lookup("PARLEY_KAFKA_TLS"));
    config.tls_ca_file = lookup("PARLEY_KAFKA_TLS_CA_FILE").map(PathBuf::from);
    if let Some(username) = lookup("PARLEY_KAFKA_SASL_USERNAME") {
        let mechanism = match lookup("PARLEY_KAFKA_SASL_MECHANISM") {
            Some(name) => name.parse().unwrap_or_else(|error| panic!("PARLEY_KAFKA_SASL_MECHANISM: {error}")),
            None => SaslMechanism::default(),
        };
        let password = lookup("PARLEY_KAFKA_SASL_PASSWORD").unwrap_or_default();
        config.sasl = Some(KafkaSasl { mechanism, username, password });
    }
    config
}

/// [`CassandraConfig::new`] for `contact` (comma-separated `host:port`) and `keyspace`, with TLS and credentials as
/// the process environment says.
pub fn cassandra_config(contact: &str, keyspace: impl Into<String>) -> CassandraConfig {
    cassandra_config_with(contact, keyspace, from_env)
}

/// [`CassandraConfig::new`] for `contact` and `keyspace`, with TLS and credentials as `lookup` says.
pub fn cassandra_config_with(
    contact: &str,
    keyspace: impl Into<String>,
    lookup: impl Fn(&str) -> Option<String>,
) -> CassandraConfig {
    let contact_points = contact.split(',').map(str::trim).filter(|point| !point.is_empty()).map(str::to_owned);
    let mut config = CassandraConfig::new(contact_points.collect(), keyspace);
    config.tls = flag(lookup("PARLEY_CASSANDRA_TLS"));
    config.tls_ca_file = lookup("PARLEY_CASSANDRA_TLS_CA_FILE").map(PathBuf::from);
    if let Some(username) = lookup("PARLEY_CASSANDRA_USERNAME") {
        let password = lookup("PARLEY_CASSANDRA_PASSWORD").unwrap_or_default();
        config.credentials = Some(CassandraCredentials { username, password });
    }
    // On a cluster of several datacenters a test keyspace lives in the contact point's datacenter alone (written
    // and read at LOCAL_QUORUM there), as the router does with `PARLEY_CASSANDRA_LOCAL_DATACENTER`.
    if let Some(datacenter) = lookup("PARLEY_CASSANDRA_LOCAL_DATACENTER").filter(|datacenter| !datacenter.is_empty()) {
        config.replication = parley_router::cassandra::Replication::NetworkTopology([(datacenter.clone(), 1)].into());
        config.local_datacenter = Some(datacenter);
    }
    config
}

/// Every message `store` holds of `channel`, oldest first (read page by page). Panics if a read fails.
pub async fn stored_history(
    store: &impl parley_router::backend::MessageStore,
    channel: &str,
) -> Vec<parley_core::protocol::MessageView> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let query = parley_router::backend::HistoryQuery { before: None, after: Some(after), limit: 500 };
        let page = store.history(channel, query).await.unwrap_or_else(|error| panic!("history of {channel}: {error}"));
        all.extend(page.messages.iter().cloned());
        match page.messages.last() {
            Some(last) if page.has_more => after = last.seq,
            _ => return all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_env_gives_tls_and_credentials() {
        let env = StackEnv::parse(
            "# written by up.sh\nPARLEY_KAFKA_BOOTSTRAP=127.0.0.1:9093\nPARLEY_KAFKA_TLS_CA_FILE=/s/tls/ca.crt\n\
             PARLEY_KAFKA_SASL_USERNAME=parley\nPARLEY_KAFKA_SASL_PASSWORD=pw=1\n\
             PARLEY_CASSANDRA_TLS_CA_FILE=/s/tls/ca.crt\nPARLEY_CASSANDRA_USERNAME=parley\nPARLEY_CASSANDRA_PASSWORD=pw2\n",
        );
        let kafka = kafka_config_with("127.0.0.1:9093", |name| env.get(name));
        assert_eq!(kafka.security_protocol(), "sasl_ssl");
        assert_eq!(kafka.tls_ca_file, Some(PathBuf::from("/s/tls/ca.crt")));
        let sasl = kafka.sasl.expect("SASL");
        assert_eq!(
            (sasl.mechanism, sasl.username.as_str(), sasl.password.as_str()),
            (SaslMechanism::ScramSha512, "parley", "pw=1")
        );
        let cassandra = cassandra_config_with("127.0.0.1:1, 127.0.0.2:1", "ks", |name| env.get(name));
        assert_eq!(cassandra.contact_points, vec!["127.0.0.1:1".to_owned(), "127.0.0.2:1".to_owned()]);
        assert!(cassandra.uses_tls());
        assert_eq!(cassandra.credentials.map(|credentials| credentials.password), Some("pw2".to_owned()));

        let plain = StackEnv::parse("PARLEY_KAFKA_BOOTSTRAP=127.0.0.1:9092\nPARLEY_KAFKA_TLS=0\n");
        let kafka = kafka_config_with("127.0.0.1:9092", |name| plain.get(name));
        assert_eq!(kafka.security_protocol(), "plaintext");
        assert!(flag(Some("true".into())) && flag(Some("1".into())) && !flag(Some("off".into())) && !flag(None));
    }
}
