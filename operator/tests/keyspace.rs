//! The keyspace adapter ([`parley_operator::keyspace::CassandraAdmin`]) against a real Cassandra cluster of two
//! datacenters: `e2e/stack/up.sh --only cassandra --dc2 /tmp/parley-stack`, then
//! `set -a; . /tmp/parley-stack/stack.env; set +a` (`PARLEY_CASSANDRA_CONTACT`, `PARLEY_CASSANDRA_CONTACT_DC2`, the
//! TLS CA and the credentials). Without them a plain `cargo test` skips this test and the full test command
//! (`PARLEY_REQUIRE_ENGINES=1`) fails it.
//!
//! It drives the same pure decisions the controller uses ([`keyspace::decide`], [`keyspace::release`]) and checks
//! what Cassandra then holds.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use parley_operator::keyspace::{self, CassandraAccess, CassandraAdmin, Decision, Release, Replication};
use parley_test_support::Engine;

/// The stack's Cassandra with its second datacenter, or `None` when the test is skipped.
fn two_datacenters() -> Option<CassandraAccess> {
    let contact = parley_test_support::engine(Engine::Cassandra)?;
    let second = std::env::var("PARLEY_CASSANDRA_CONTACT_DC2").ok().filter(|value| !value.trim().is_empty());
    if second.is_none() {
        let message = "PARLEY_CASSANDRA_CONTACT_DC2 is not set: start the stack with `e2e/stack/up.sh --only \
                       cassandra --dc2 /tmp/parley-stack` and `set -a; . /tmp/parley-stack/stack.env; set +a`";
        if std::env::var("PARLEY_REQUIRE_ENGINES").is_ok_and(|value| value == "1") {
            panic!("{message}");
        }
        let _ = writeln!(std::io::stderr().lock(), "SKIPPED keyspace: needs a second Cassandra datacenter ({message})");
        return None;
    }
    let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let ca_pem = variable("PARLEY_CASSANDRA_TLS_CA_FILE")
        .map(|path| std::fs::read(&path).unwrap_or_else(|error| panic!("read the CA file {path}: {error}")));
    let credentials = variable("PARLEY_CASSANDRA_USERNAME")
        .map(|username| (username, variable("PARLEY_CASSANDRA_PASSWORD").unwrap_or_default()));
    Some(CassandraAccess {
        contact_points: vec![contact],
        tls: ca_pem.is_some(),
        ca_pem,
        credentials,
        timeout: Duration::from_secs(10),
    })
}

fn map(entries: &[(&str, i32)]) -> Replication {
    Replication::NetworkTopology(entries.iter().map(|(name, factor)| ((*name).to_owned(), *factor)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyspace_gains_each_present_datacenter_and_loses_a_released_one() {
    let Some(access) = two_datacenters() else { return };
    let admin = CassandraAdmin::connect(&access).await.expect("connect");
    let present = admin.datacenters().await.expect("datacenters");
    assert_eq!(present, BTreeSet::from(["dc1".to_owned(), "dc2".to_owned()]), "system.local + system.peers_v2");
    // Both tables are read from one node, whichever the driver would pick for each query: always both datacenters.
    for _ in 0..10 {
        assert_eq!(admin.datacenters().await.expect("datacenters"), present);
    }

    let name = parley_test_support::unique("opr_ks_").replace('-', "_");
    assert_eq!(admin.replication(&name).await.expect("read"), None, "a new keyspace does not exist yet");

    // The first Region's datacenter creates the keyspace: nothing to rebuild.
    let decision = keyspace::decide(&name, None, "dc1", 1, &present);
    let Decision::Create { statement } = &decision else { panic!("create, got {decision:?}") };
    admin.execute(statement).await.expect("create");
    let current = admin.replication(&name).await.expect("read").expect("created");
    assert_eq!(current, map(&[("dc1", 1)]));
    assert_eq!(keyspace::decide(&name, Some(&current), "dc1", 1, &present), Decision::Unchanged);

    // A Region whose datacenter has no node changes nothing.
    let absent = keyspace::decide(&name, Some(&current), "dc9", 1, &present);
    assert_eq!(absent, Decision::DatacenterAbsent { present: present.clone() });

    // The second datacenter is added, and must be rebuilt from the first.
    let decision = keyspace::decide(&name, Some(&current), "dc2", 1, &present);
    let Decision::Alter { statement, rebuild_from, .. } = &decision else { panic!("alter, got {decision:?}") };
    assert_eq!(rebuild_from.as_deref(), Some("dc1"));
    admin.execute(statement).await.expect("alter");
    let current = admin.replication(&name).await.expect("read").expect("exists");
    assert_eq!(current, map(&[("dc1", 1), ("dc2", 1)]));
    let (holds, reason, _) = keyspace::replication_condition(&name, "dc2", 1, &decision);
    assert_eq!((holds, reason), (true, "DatacenterReplicated"));

    // Deleting the dc2 Region waits until it is released; then dc2 leaves the map, and the last one stays.
    let Release::Blocked { message } = keyspace::release(&name, Some(&current), "dc2", None) else { panic!("blocked") };
    assert!(message.contains("cassandra-release-datacenter"), "{message}");
    let Release::Drop { statement } = keyspace::release(&name, Some(&current), "dc2", Some("dc2")) else {
        panic!("drop")
    };
    admin.execute(&statement).await.expect("drop dc2");
    let current = admin.replication(&name).await.expect("read").expect("exists");
    assert_eq!(current, map(&[("dc1", 1)]));
    assert_eq!(keyspace::release(&name, Some(&current), "dc2", None), Release::NotReplicated);
    assert_eq!(keyspace::release(&name, Some(&current), "dc1", Some("dc1")), Release::LastDatacenter);

    admin.execute(&format!("DROP KEYSPACE IF EXISTS {name}")).await.expect("drop the test keyspace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_an_error_that_names_cassandra() {
    let Some(mut access) = two_datacenters() else { return };
    if access.credentials.is_none() {
        return;
    }
    access.credentials = Some(("parley".to_owned(), "not-the-password".to_owned()));
    let error = CassandraAdmin::connect(&access).await.err().expect("refused");
    assert_eq!(error.reason(), "CassandraUnavailable");
    assert!(error.to_string().contains("connect to cassandra at"), "{error}");
}
