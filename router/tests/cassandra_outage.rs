//! Cassandra stops while messages flow, on the real stack (Kafka as the log, Cassandra as the store): sends are
//! still confirmed and delivered live, the store writer lags, and once Cassandra is back it catches up with every
//! confirmed message exactly once, in order.
//!
//! Cassandra is frozen with SIGSTOP (every request to it times out, as with a dead node) and thawed with SIGCONT,
//! also when the test fails. Its pid comes from the state dir of `e2e/stack/up.sh` (`PARLEY_STACK_DIR`). This test
//! is alone in its file, so no other test uses the frozen node meanwhile. Needs `PARLEY_KAFKA_BOOTSTRAP`,
//! `PARLEY_CASSANDRA_CONTACT` and `PARLEY_STACK_DIR` (`e2e/stack/up.sh --only kafka,cassandra <dir>`, then source
//! `<dir>/stack.env`); without them a plain `cargo test` skips it and the full test command fails it.

use parley_api::RouterError;
use parley_bus::pubsub::{channel_topic, Event, LocalPubSub, PubSub};
use parley_core::UserId;
use parley_router::backend::{HistoryQuery, MessageStore};
use parley_router::cassandra::CassandraStore;
use parley_router::kafka::{KafkaLog, StoreWriter};
use parley_router::RouterConfig;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const START_STACK: &str = "start the engines with `e2e/stack/up.sh --only kafka,cassandra /tmp/parley-stack` and \
     `set -a; . /tmp/parley-stack/stack.env; set +a`";

use parley_test_support::{eventually, report};

/// The stack's settings, or `None` when engine tests are skipped.
fn stack() -> Option<(String, String, PathBuf)> {
    use parley_test_support::{engine, Engine};
    let kafka = engine(Engine::Kafka)?;
    let cassandra = engine(Engine::Cassandra)?;
    let dir = std::env::var("PARLEY_STACK_DIR").ok().filter(|dir| !dir.is_empty()).unwrap_or_else(|| {
        panic!("PARLEY_STACK_DIR must name the e2e/stack state dir (its stack.env sets it): {START_STACK}")
    });
    Some((kafka, cassandra, PathBuf::from(dir)))
}

/// Sends a signal to a process with `kill`.
fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|status| status.success()), "kill -{name} {pid} failed");
}

/// Thaws the frozen Cassandra when dropped, whatever happened.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// Every stored message of `channel`, oldest first.
async fn stored(store: &CassandraStore, channel: &str) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let query = HistoryQuery { before: None, after: Some(after), limit: 500 };
        let page = store.history(channel, query).await.expect("history");
        all.extend(page.messages.iter().map(|message| (message.seq, message.text.clone())));
        match page.messages.last() {
            Some(last) if page.has_more => after = last.seq,
            _ => return all,
        }
    }
}

/// The sequences of the next `count` messages published on the channel topic.
async fn published(events: &mut mpsc::Receiver<parley_bus::pubsub::Delivery>, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < count {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("a live message within 10 s")
            .expect("bus open");
        if let Some(Event::Message { seq, .. }) = Event::decode(&payload) {
            seqs.push(seq);
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cassandra_lets_sends_and_live_delivery_go_on_and_the_store_catches_up() {
    let Some((bootstrap, contact, state)) = stack() else { return };
    let pid_file = state.join("pids/cassandra1.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}; {START_STACK}", pid_file.display()))
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", pid_file.display()));

    let mut cassandra = parley_test_support::cassandra_config(
        &contact,
        parley_test_support::unique("parley_outage_").replace('-', "_"),
    );
    cassandra.local_datacenter = std::env::var("PARLEY_CASSANDRA_DC").ok().filter(|dc| !dc.is_empty());
    // Calls to a frozen node fail after this, like calls to a dead one.
    cassandra.request_timeout = Duration::from_secs(2);
    let store = Arc::new(CassandraStore::connect(cassandra).await.expect("Cassandra reachable"));
    let mut kafka = parley_test_support::kafka_config(&bootstrap)
        .with_prefix(parley_test_support::unique("parley-outage-") + "-")
        .with_partitions(3);
    kafka.store_batch_wait = Duration::from_millis(2);
    kafka.retry_min = Duration::from_millis(50);
    kafka.retry_max = Duration::from_millis(500);
    let log = Arc::new(KafkaLog::open(kafka.clone(), store.clone(), None).await.expect("Kafka log"));
    let writer = StoreWriter::start(kafka.clone(), store.clone()).await.expect("store writer");
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut events) = mpsc::channel(1024);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![channel_topic("g:outage")]).await.expect("subscribe");
    let (router, _task) =
        parley_router::start(RouterConfig::default(), log, store.clone(), store.clone(), bus).expect("router");
    let alice = UserId::new("alice").expect("user");
    router.create_channel(&alice, "outage", &["bob".to_owned()]).await.expect("create");

    let send = |index: u64| {
        let router = router.clone();
        let alice = alice.clone();
        async move { router.send_attempt(&alice, "g:outage", &format!("m{index}"), &format!("text {index}"), true).await }
    };
    for index in 1..=20 {
        assert_eq!(send(index).await.expect("confirmed").placement.seq, index);
    }
    assert_eq!(published(&mut events, 20).await, (1..=20).collect::<Vec<u64>>());
    eventually("the store writer to store the first 20", Duration::from_secs(30), || async {
        (store.last_stored_seq("g:outage").await.expect("last stored") >= 20).then_some(())
    })
    .await;

    // Cassandra stops.
    signal(pid, "STOP");
    let thaw = Thaw(pid);
    let frozen = Instant::now();
    for index in 21..=70 {
        let outcome = send(index).await.expect("a send is confirmed while Cassandra is down");
        assert_eq!(outcome.placement.seq, index);
    }
    let confirming = frozen.elapsed();
    // Delivery goes on: every message was published live, in order.
    assert_eq!(published(&mut events, 50).await, (21..=70).collect::<Vec<u64>>());
    // A send that may be a retry cannot be checked against storage now: refused, nothing confirmed, no gap.
    let maybe_retry = router.send(&alice, "g:outage", "never-sent-before", "unchecked").await;
    assert!(matches!(maybe_retry, Err(RouterError::Unavailable(_))), "{maybe_retry:?}");
    // The consumer lags: nothing after the outage began is committed.
    let lag = writer.lag().await.expect("lag from Kafka");
    assert!(lag >= 50, "the store writer lags by {lag}, expected at least 50");
    let failures = writer.stats().store_failures.load(std::sync::atomic::Ordering::Relaxed);
    report(&format!(
        "Cassandra outage: 50 sends confirmed in {confirming:?} while it was stopped; live delivery in order; \
         store writer lag {lag}, {failures} failed store writes so far"
    ));

    // Cassandra returns; the store writer catches up with nothing lost and nothing twice.
    drop(thaw);
    let thawed = Instant::now();
    let what = "the store writer to catch up within 90 s of Cassandra's return";
    eventually(what, Duration::from_secs(90), || async {
        // Errors are expected while Cassandra comes back.
        store.last_stored_seq("g:outage").await.ok().filter(|last| *last >= 70)
    })
    .await;
    let caught_up = thawed.elapsed();
    let expected: Vec<(u64, String)> = (1..=70).map(|index| (index, format!("text {index}"))).collect();
    assert_eq!(stored(&store, "g:outage").await, expected, "every confirmed message exactly once, in order");
    // The next send continues the sequence.
    assert_eq!(send(71).await.expect("confirmed").placement.seq, 71);
    report(&format!(
        "Cassandra outage: the store caught up {caught_up:?} after Cassandra returned; history 1..=70 exact"
    ));
    writer.stop().await.expect("stop");
    store.drop_keyspace().await.expect("drop keyspace");
}
