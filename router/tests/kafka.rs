//! The Kafka log driver and the store writer against a real Kafka broker.
//!
//! The tests need `PARLEY_KAFKA_BOOTSTRAP` (start a broker with `e2e/stack/up.sh --only kafka <state dir>` and
//! source `<state dir>/stack.env`); each test uses its own topic prefix. Without the variable a plain `cargo test`
//! skips them and the full test command fails them (`parley_test_support::engines`). The broker-outage test starts its own
//! broker with `e2e/stack/up.sh` in a state dir of its own, stops it with `down.sh` and starts it again on the
//! same port.

use parley_api::{BackendError, Router, RouterError};
use parley_bus::pubsub::LocalPubSub;
use parley_core::presence::Status;
use parley_core::protocol::MessageView;
use parley_core::UserId;
use parley_router::backend::{HistoryQuery, MessageLog, MessageStore, PresenceUpdate, PriorSend};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::partition::partition_for;
use parley_router::kafka::{KafkaConfig, KafkaLog, StoreWriter};
use parley_router::RouterConfig;
use parley_test_support::eventually;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const START_KAFKA: &str = "start Kafka with `e2e/stack/up.sh --only kafka /tmp/parley-stack` and \
     `set -a; . /tmp/parley-stack/stack.env; set +a` (stop it with `e2e/stack/down.sh /tmp/parley-stack`)";

fn unique_prefix() -> String {
    parley_test_support::unique("parley-test-") + "-"
}

/// The configuration of one test (its own prefix, 3 partitions), or `None` when engine tests are skipped.
fn kafka_config() -> Option<KafkaConfig> {
    parley_test_support::engine(parley_test_support::Engine::Kafka).map(|bootstrap| test_config(&bootstrap))
}

fn test_config(bootstrap: &str) -> KafkaConfig {
    let mut config = parley_test_support::kafka_config(bootstrap).with_prefix(unique_prefix()).with_partitions(3);
    config.store_batch_wait = Duration::from_millis(2);
    config.retry_min = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    config
}

fn store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("store");
    (dir, Arc::new(store))
}

fn view(channel: &str, seq: u64, sender: &str, text: &str) -> MessageView {
    MessageView {
        channel: channel.to_owned(),
        seq,
        id: 1_000_000 + seq,
        sender: sender.to_owned(),
        text: text.to_owned(),
        ts: 1_700_000_000_000 + seq,
        client_msg_id: format!("{channel}/{seq}"),
    }
}

async fn open(config: &KafkaConfig, store: &Arc<EmbeddedStore>) -> KafkaLog {
    KafkaLog::open(config.clone(), store.clone(), None).await.unwrap_or_else(|error| {
        panic!("cannot open the Kafka log at {}: {error}; {START_KAFKA}", config.bootstrap_servers)
    })
}

/// A router (single writer, default config) on `log`, with `store` as its store and membership.
fn router_on(log: Arc<KafkaLog>, store: &Arc<EmbeddedStore>) -> Router {
    let (router, _task) =
        parley_router::start(RouterConfig::default(), log, store.clone(), store.clone(), Arc::new(LocalPubSub::new()))
            .expect("router");
    router
}

/// Every record a `read_committed` consumer sees in the messages topic, with its partition, in offset order
/// per partition.
async fn read_committed(config: &KafkaConfig) -> Vec<(i32, MessageView)> {
    read_topic(config, config.messages_topic())
        .await
        .into_iter()
        .map(|(partition, key, payload)| {
            let value: MessageView = serde_json::from_slice(&payload).expect("decodable record");
            assert_eq!(key.as_deref(), Some(value.channel.as_bytes()), "records are keyed by channel");
            (partition, value)
        })
        .collect()
}

fn by_channel(records: &[(i32, MessageView)]) -> BTreeMap<String, Vec<MessageView>> {
    let mut channels: BTreeMap<String, Vec<MessageView>> = BTreeMap::new();
    for (_, message) in records {
        channels.entry(message.channel.clone()).or_default().push(message.clone());
    }
    channels
}

async fn history(store: &EmbeddedStore, channel: &str) -> Vec<MessageView> {
    parley_test_support::router::stored_history(store, channel).await
}

/// Waits until the store holds `count` messages of `channel`.
async fn wait_stored(store: &EmbeddedStore, channel: &str, count: u64, within: Duration) {
    let what = format!("{channel}: the store to hold {count} messages");
    eventually(&what, within, || async {
        (store.last_stored_seq(channel).await.expect("last stored") >= count).then_some(())
    })
    .await;
}

/// Waits until `writer` has stored everything of its topics (no consumer lag).
async fn caught_up(writer: &StoreWriter) {
    eventually("the store writer to catch up", Duration::from_secs(30), || async {
        (writer.lag().await.expect("lag") == 0).then_some(())
    })
    .await;
}

fn assert_exactly_once_in_order(channel: &str, messages: &[MessageView], count: u64) {
    let seqs: Vec<u64> = messages.iter().map(|message| message.seq).collect();
    let expected: Vec<u64> = (1..=count).collect();
    assert_eq!(seqs, expected, "{channel}: every message exactly once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_read_back_in_order_on_the_channels_partition() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = open(&config, &store).await;
    assert_eq!(log.partitions(), 3);
    assert_eq!(log.owned(), vec![0, 1, 2]);
    let channels = ["g:alpha", "g:beta", "g:gamma", "d:alice:bob"];
    for round in 0..10u64 {
        let batch: Vec<MessageView> = channels
            .iter()
            .flat_map(|channel| (1..=3).map(move |step| view(channel, round * 3 + step, "alice", "hello")))
            .collect();
        log.append(batch).await.expect("append");
    }
    for channel in channels {
        assert_eq!(log.last_seq(channel).await.expect("last seq"), 30);
    }
    assert_eq!(log.last_seq("g:nothing").await.expect("last seq"), 0);
    let found = log
        .find_sends(vec![("alice".into(), "g:beta/7".into()), ("alice".into(), "g:beta/999".into())])
        .await
        .expect("find");
    assert_eq!(
        found[0].as_ref().map(|prior: &PriorSend| (prior.channel.as_str(), prior.placement.seq)),
        Some(("g:beta", 7))
    );
    assert!(found[1].is_none());

    let records = read_committed(&config).await;
    assert_eq!(records.len(), 120);
    for (partition, message) in &records {
        assert_eq!(*partition, partition_for(&message.channel, 3), "{} is on its key's partition", message.channel);
    }
    for (channel, messages) in by_channel(&records) {
        assert_exactly_once_in_order(&channel, &messages, 30);
    }
}

/// The driver computes partitions itself; librdkafka's `murmur2_random` partitioner (the Java client's
/// default) must put the same key on the same partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_of_a_key_matches_the_java_default_partitioner() {
    let Some(config) = kafka_config() else { return };
    let config = config.with_partitions(7);
    parley_router::kafka::ensure_topics(&config).await.expect("topics");
    let producer: FutureProducer =
        config.client_config().set("partitioner", "murmur2_random").create().expect("producer");
    let topic = config.receipts_topic();
    for index in 0..40 {
        let key = format!("g:channel-{index}");
        let delivered = producer
            .send(FutureRecord::to(&topic).key(key.as_bytes()).payload("x"), Duration::from_secs(10))
            .await
            .unwrap_or_else(|(error, _)| panic!("produce: {error}"));
        assert_eq!(delivered.partition, partition_for(&key, 7), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_confirms_sends_and_the_store_writer_fills_history_exactly_once() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let writer = StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    let router = router_on(log, &store);
    let alice = UserId::new("alice").expect("user");
    let rooms = ["one", "two", "three"];
    for room in rooms {
        router.create_channel(&alice, room, &[]).await.expect("create");
    }
    let mut sends = Vec::new();
    for index in 0..300u64 {
        let router = router.clone();
        let alice = alice.clone();
        let channel = format!("g:{}", rooms[(index % 3) as usize]);
        sends.push(tokio::spawn(async move {
            let outcome = router.send(&alice, &channel, &format!("m{index}"), &format!("text {index}")).await;
            (channel, index, outcome)
        }));
    }
    let mut confirmed: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for send in sends {
        let (channel, index, outcome) = send.await.expect("send task");
        let outcome = outcome.expect("confirmed");
        assert!(!outcome.duplicate);
        confirmed.entry(channel).or_default().push((outcome.placement.seq, format!("text {index}")));
    }
    // A retry is answered from the log without a second message.
    let retry = router.send(&alice, "g:one", "m0", "text 0").await.expect("retry");
    assert!(retry.duplicate);

    for (channel, mut sent) in confirmed {
        sent.sort();
        wait_stored(&store, &channel, 100, Duration::from_secs(30)).await;
        let stored = history(&store, &channel).await;
        assert_exactly_once_in_order(&channel, &stored, 100);
        let texts: Vec<(u64, String)> = stored.iter().map(|message| (message.seq, message.text.clone())).collect();
        assert_eq!(texts, sent, "{channel}: history is what was confirmed");
    }
    caught_up(&writer).await;
    assert!(writer.stats().written.load(Ordering::Relaxed) >= 300);
    writer.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_fences_the_old_one_and_its_failed_append_stays_invisible() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let old = open(&config, &store).await;
    let channel = "g:contested";
    old.append(vec![view(channel, 1, "alice", "from the old owner")]).await.expect("first append");

    let partition = partition_for(channel, 3);
    let new = KafkaLog::open(config.clone(), store.clone(), Some(vec![partition])).await.expect("takeover");
    assert_eq!(new.last_seq(channel).await.expect("last seq"), 1, "the new owner continues from the tail");

    let refused = old.append(vec![view(channel, 2, "alice", "stale writer")]).await;
    match refused {
        Err(BackendError::Fenced { partition: fenced, .. }) => assert_eq!(fenced, partition),
        other => panic!("the deposed writer's append must fail as fenced, got {other:?}"),
    }
    // Fenced for good: no later append of the old owner goes through either.
    assert!(matches!(old.append(vec![view(channel, 2, "alice", "again")]).await, Err(BackendError::Fenced { .. })));

    new.append(vec![view(channel, 2, "alice", "from the new owner")]).await.expect("new owner appends");
    let records = read_committed(&config).await;
    let texts: Vec<(u64, String)> = records.iter().map(|(_, message)| (message.seq, message.text.clone())).collect();
    assert_eq!(
        texts,
        vec![(1, "from the old owner".to_owned()), (2, "from the new owner".to_owned())],
        "nothing of the fenced append is visible to read_committed consumers"
    );
    // A channel of a partition the new log does not own is refused, not written.
    let elsewhere = (0..100).map(|index| format!("g:other-{index}")).find(|name| partition_for(name, 3) != partition);
    let elsewhere = elsewhere.expect("a channel on another partition");
    assert!(matches!(new.append(vec![view(&elsewhere, 1, "alice", "x")]).await, Err(BackendError::NotOwner { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_writer_continues_from_the_last_durable_seq_and_finds_earlier_sends() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let channel = "g:handover";
    {
        let first = open(&config, &store).await;
        for seq in 1..=5 {
            first.append(vec![view(channel, seq, "alice", "before the handover")]).await.expect("append");
        }
    }
    // No store writer ran: the store is empty and the new owner learns everything from the tail scan.
    assert_eq!(store.last_stored_seq(channel).await.expect("stored"), 0);
    let second = open(&config, &store).await;
    assert_eq!(second.tail_len(), 5);
    assert_eq!(second.last_seq(channel).await.expect("last seq"), 5);
    let found = second.find_sends(vec![("alice".into(), format!("{channel}/3"))]).await.expect("find");
    assert_eq!(found[0].as_ref().map(|prior| prior.placement.seq), Some(3));
    assert!(matches!(
        second.append(vec![view(channel, 5, "alice", "reused seq")]).await,
        Err(BackendError::SequenceConflict { expected: 6, got: 5, .. })
    ));
    second.append(vec![view(channel, 6, "alice", "after the handover")]).await.expect("continue");
    drop(second);

    // Once the store writer has caught up, a third owner's tail is empty and the store answers.
    let writer = StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    wait_stored(&store, channel, 6, Duration::from_secs(30)).await;
    caught_up(&writer).await;
    writer.stop().await.expect("stop");
    let third = open(&config, &store).await;
    assert_eq!(third.tail_len(), 0, "only the unstored tail is scanned");
    assert_eq!(third.last_seq(channel).await.expect("last seq"), 6);
    let found = third.find_sends(vec![("alice".into(), format!("{channel}/3"))]).await.expect("find");
    assert_eq!(
        found[0].as_ref().map(|prior| (prior.channel.clone(), prior.placement.seq)),
        Some((channel.to_owned(), 3))
    );
    third.append(vec![view(channel, 7, "alice", "third owner")]).await.expect("continue");
    assert_exactly_once_in_order(channel, &by_channel(&read_committed(&config).await)[channel], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_writer_crash_replays_with_no_loss_and_no_duplicates() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let channels = ["g:c1", "g:c2", "g:c3", "g:c4"];
    let per_channel = 150u64;
    let appender = {
        let log = log.clone();
        tokio::spawn(async move {
            for seq in 1..=per_channel {
                let batch = channels.iter().map(|channel| view(channel, seq, "bob", "streamed")).collect();
                log.append(batch).await.expect("append");
            }
        })
    };
    let first = StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    // Kill the first store writer mid-stream: once it has written 100 of the 600.
    eventually("the first store writer to write 100 messages", Duration::from_secs(30), || async {
        (first.stats().written.load(Ordering::Relaxed) >= 100).then_some(())
    })
    .await;
    let written_before_crash = first.stats().written.load(Ordering::Relaxed);
    first.kill().await;
    appender.await.expect("appender");

    let second = StoreWriter::start(config.clone(), store.clone()).await.expect("second store writer");
    for channel in channels {
        wait_stored(&store, channel, per_channel, Duration::from_secs(60)).await;
        assert_exactly_once_in_order(channel, &history(&store, channel).await, per_channel);
    }
    caught_up(&second).await;
    let written_after = second.stats().written.load(Ordering::Relaxed);
    eprintln!(
        "store writer: {written_before_crash} written before the crash, {written_after} after (replays included)"
    );
    assert!(written_before_crash < 600, "the crash happened mid-stream");
    assert!(written_before_crash + written_after >= 600);
    second.stop().await.expect("stop");
}

/// A store that fails on demand, standing for a database outage (the store itself is the real embedded one).
struct FlakyStore {
    inner: Arc<EmbeddedStore>,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl MessageStore for FlakyStore {
    async fn write(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable("database unplugged".into()));
        }
        self.inner.write(batch).await
    }
    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<parley_router::backend::HistoryPage, BackendError> {
        self.inner.history(channel, query).await
    }
    async fn first_retained_seq(&self, channel: &str) -> Result<u64, BackendError> {
        self.inner.first_retained_seq(channel).await
    }
    async fn last_stored_seq(&self, channel: &str) -> Result<u64, BackendError> {
        self.inner.last_stored_seq(channel).await
    }
    async fn find_stored_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        self.inner.find_stored_sends(keys).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_writer_retries_while_the_store_is_down_and_skips_nothing() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let flaky = Arc::new(FlakyStore { inner: store.clone(), down: AtomicBool::new(true) });
    let log = KafkaLog::open(config.clone(), flaky.clone(), None).await.expect("log");
    let writer = StoreWriter::start(config.clone(), flaky.clone()).await.expect("store writer");
    for seq in 1..=20 {
        log.append(vec![view("g:outage", seq, "carol", "while the database is down")]).await.expect("append");
    }
    eventually("the store writer to try (and fail) three writes", Duration::from_secs(30), || async {
        (writer.stats().store_failures.load(Ordering::Relaxed) >= 3).then_some(())
    })
    .await;
    assert!(writer.lag().await.expect("lag") >= 20, "nothing is committed while the store is down");
    assert_eq!(store.last_stored_seq("g:outage").await.expect("stored"), 0);
    assert_eq!(log.last_seq("g:outage").await.expect("last seq"), 20, "the log answers from its tail meanwhile");
    flaky.down.store(false, Ordering::SeqCst);
    wait_stored(&store, "g:outage", 20, Duration::from_secs(30)).await;
    assert_exactly_once_in_order("g:outage", &history(&store, "g:outage").await, 20);
    writer.stop().await.expect("stop");
}

/// A broker of this test's own, started with `e2e/stack/up.sh` in its own state dir.
#[derive(Clone)]
struct OwnBroker {
    state: PathBuf,
    bootstrap: String,
    command: Vec<String>,
    /// Its stack.env: its own CA and SASL password.
    env: parley_test_support::router::StackEnv,
}

/// Stops the test's broker and deletes its state dir, whatever happens.
struct Purge(PathBuf);

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash").arg(stack_script("down.sh")).arg("--purge").arg(&self.0).status();
    }
}

fn stack_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("e2e").join("stack").join(name)
}

impl OwnBroker {
    fn start() -> (Self, Purge) {
        let state = std::env::temp_dir().join(format!("parley-kafka-outage-{}", unique_prefix()));
        let purge = Purge(state.clone());
        let status = std::process::Command::new("bash")
            .arg(stack_script("up.sh"))
            .args(["--only", "kafka"])
            .arg(&state)
            .status()
            .expect("run e2e/stack/up.sh");
        assert!(status.success(), "e2e/stack/up.sh --only kafka {} failed", state.display());
        let env = std::fs::read_to_string(state.join("stack.env")).expect("stack.env");
        let bootstrap = env
            .lines()
            .find_map(|line| line.strip_prefix("PARLEY_KAFKA_BOOTSTRAP="))
            .expect("PARLEY_KAFKA_BOOTSTRAP in stack.env")
            .to_owned();
        let pid_line = std::fs::read_to_string(state.join("pids/kafka.pid")).expect("kafka pid file");
        let pid = pid_line.split_whitespace().next().expect("pid").to_owned();
        let command: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .expect("broker command line")
            .split(|byte| *byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        let env = parley_test_support::router::StackEnv::read(&state).expect("stack.env");
        (Self { state, bootstrap, command, env }, purge)
    }

    fn stop(&self) {
        let status = std::process::Command::new("bash").arg(stack_script("down.sh")).arg(&self.state).status();
        assert!(status.is_ok_and(|status| status.success()), "e2e/stack/down.sh failed");
    }

    /// Starts the same broker again (same ports, same data) the way up.sh does, so down.sh can stop it.
    fn restart(&self) {
        let log = std::fs::File::create(self.state.join("kafka/kafka-restart.log")).expect("log file");
        let mut broker = std::process::Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(r#"echo "$$ $(cut -d" " -f22 /proc/$$/stat)" >"$0"; exec "$@""#)
            .arg(self.state.join("pids/kafka.pid"))
            .args(&self.command)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restart the broker");
        // Reap it when down.sh stops it.
        std::thread::spawn(move || broker.wait());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_fails_sends_fast_and_they_recover_when_it_returns() {
    if kafka_config().is_none() {
        return;
    }
    let (broker, _purge) = tokio::task::spawn_blocking(OwnBroker::start).await.expect("broker");
    let mut config = test_config(&broker.bootstrap);
    let own = parley_test_support::router::kafka_config_with(&broker.bootstrap, |name| broker.env.get(name));
    (config.tls_ca_file, config.sasl) = (own.tls_ca_file, own.sasl);
    config.request_timeout = Duration::from_secs(2);
    config.append_timeout = Duration::from_secs(2);
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let router = router_on(log, &store);
    let dave = UserId::new("dave").expect("user");
    router.create_channel(&dave, "outage", &[]).await.expect("create");
    let first = router.send(&dave, "g:outage", "before", "before the outage").await.expect("confirmed");
    assert_eq!(first.placement.seq, 1);

    let stopping = broker.clone();
    tokio::task::spawn_blocking(move || stopping.stop()).await.expect("stop");

    for attempt in 0..2 {
        let started = Instant::now();
        let failed = router.send(&dave, "g:outage", &format!("during-{attempt}"), "during the outage").await;
        let elapsed = started.elapsed();
        match &failed {
            Err(error @ RouterError::Unavailable(_)) => {
                assert_eq!(error.code(), parley_core::protocol::ErrorCode::Unavailable);
                assert!(error.to_string().contains("kafka"), "the error names the cause: {error}");
                eprintln!("send {attempt} during the outage failed after {} ms: {error}", elapsed.as_millis());
            }
            other => panic!("a send while the broker is down must fail as unavailable, got {other:?}"),
        }
        assert!(elapsed < Duration::from_secs(12), "failing took {} ms", elapsed.as_millis());
    }

    let restarting = broker.clone();
    tokio::task::spawn_blocking(move || restarting.restart()).await.expect("restart");
    let deadline = Instant::now() + Duration::from_secs(90);
    let second = loop {
        match router.send(&dave, "g:outage", "after", "after the outage").await {
            Ok(outcome) => break outcome,
            Err(error) => {
                assert!(Instant::now() < deadline, "sends did not recover after the broker returned: {error}");
                // The retry interval while the broker comes back (the loop ends at the first confirmed send).
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert_eq!(second.placement.seq, 2, "no sequence was lost or reused by the failed sends");
    let records = read_committed(&config).await;
    let texts: Vec<(u64, String)> = records.iter().map(|(_, message)| (message.seq, message.text.clone())).collect();
    assert_eq!(texts, vec![(1, "before the outage".to_owned()), (2, "after the outage".to_owned())]);
}

/// A batch that spans partitions commits per partition: when one partition is fenced, the other partition's part
/// of the same batch may be durable although the send was reported failed. The router must then continue that
/// channel after what is durable (never reuse or skip a sequence), and a retry of such a send must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_failed_batch_never_makes_the_router_reuse_or_skip_a_sequence() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let router = router_on(log, &store);
    let erin = UserId::new("erin").expect("user");
    let (kept, lost) = ("kept", (0..100).map(|index| format!("lost{index}")));
    let kept_partition = partition_for(&format!("g:{kept}"), 3);
    let lost = lost.into_iter().find(|name| partition_for(&format!("g:{name}"), 3) != kept_partition).expect("name");
    router.create_channel(&erin, kept, &[]).await.expect("create");
    router.create_channel(&erin, &lost, &[]).await.expect("create");
    router.send(&erin, "g:kept", "warm-up", "first").await.expect("confirmed");

    // Another writer takes over the partition of g:lost only.
    let lost_channel = format!("g:{lost}");
    let _other = KafkaLog::open(config.clone(), store.clone(), Some(vec![partition_for(&lost_channel, 3)]))
        .await
        .expect("takeover");

    let mut sends = Vec::new();
    for index in 0..40 {
        let router = router.clone();
        let erin = erin.clone();
        let channel = if index % 2 == 0 { "g:kept".to_owned() } else { lost_channel.clone() };
        sends.push(tokio::spawn(async move {
            let outcome = router.send(&erin, &channel, &format!("c{index}"), "concurrent").await;
            (channel, index, outcome)
        }));
    }
    let mut failed_kept = Vec::new();
    for send in sends {
        let (channel, index, outcome) = send.await.expect("task");
        if channel == lost_channel {
            assert!(matches!(outcome, Err(RouterError::Unavailable(_))), "the fenced partition confirms nothing");
        } else if outcome.is_err() {
            failed_kept.push(index);
        }
    }
    // Retries of the failed sends of g:kept are found where they landed, or written now.
    for index in &failed_kept {
        router.send(&erin, "g:kept", &format!("c{index}"), "concurrent").await.expect("retry");
    }
    let last = router.send(&erin, "g:kept", "after", "after the takeover").await.expect("continues");
    let records = read_committed(&config).await;
    let channels = by_channel(&records);
    assert_exactly_once_in_order("g:kept", &channels["g:kept"], last.placement.seq);
    assert_eq!(last.placement.seq, 22, "1 warm-up + 20 concurrent + 1 after, each once");
    assert!(!channels.contains_key(&lost_channel), "nothing of the fenced partition is visible");
    eprintln!("{} sends of g:kept shared a failed batch with the fenced partition", failed_kept.len());
}

/// Every committed record of a topic (partition, key, payload) as a `read_committed` consumer sees it, read to its
/// end, in offset order per partition.
async fn read_topic(config: &KafkaConfig, topic: String) -> Vec<(i32, Option<Vec<u8>>, Vec<u8>)> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .client_config()
            .set("group.id", format!("{}test-reader", config.prefix))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .expect("reader");
        let metadata = consumer.fetch_metadata(Some(topic.as_str()), Duration::from_secs(5)).expect("metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition_offset(&topic, partition, Offset::Beginning).expect("offset");
        }
        consumer.assign(&list).expect("assign");
        let mut at_end = HashSet::new();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while at_end.len() < partitions as usize {
            assert!(Instant::now() < deadline, "reading {topic} did not reach its end");
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    at_end.insert(partition);
                }
                Some(Err(error)) => panic!("read error: {error}"),
                Some(Ok(message)) => records.push((
                    message.partition(),
                    message.key().map(<[u8]>::to_vec),
                    message.payload().expect("payload").to_vec(),
                )),
            }
        }
        records
    })
    .await
    .expect("reader task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cursors_are_recorded_in_the_receipts_topic_keyed_by_channel() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let router = router_on(log, &store);
    let alice = UserId::new("alice").expect("user");
    let bob = UserId::new("bob").expect("user");
    router.create_channel(&alice, "reading", &["bob".to_owned()]).await.expect("create");
    for index in 0..3 {
        router.send(&alice, "g:reading", &format!("r{index}"), "hello").await.expect("durable");
    }
    assert_eq!(router.mark_read(&bob, "g:reading", 2).await.expect("read"), 2);
    // Past the end is clamped to the last message; the record carries the cursor that was kept.
    assert_eq!(router.mark_read(&bob, "g:reading", 99).await.expect("read"), 3);
    let records = read_topic(&config, config.receipts_topic()).await;
    assert_eq!(records.len(), 2, "one record per cursor move");
    let partitions = log_partitions(&config).await;
    let mut cursors = Vec::new();
    for (partition, key, payload) in records {
        assert_eq!(key.as_deref(), Some(&b"g:reading"[..]), "keyed by channel");
        assert_eq!(partition, partition_for("g:reading", partitions), "on the channel's partition");
        let receipt: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        assert_eq!((receipt["channel"].as_str(), receipt["user"].as_str()), (Some("g:reading"), Some("bob")));
        assert!(receipt["ts"].as_u64().is_some_and(|ts| ts > 0));
        cursors.push(receipt["seq"].as_u64().expect("seq"));
    }
    assert_eq!(cursors, vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_are_recorded_in_the_presence_topic_keyed_by_user_in_order() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let router = router_on(log, &store);
    // Two gateways' changes: alice flaps on gw-1 (many changes in one batch keep their order), bob on gw-2.
    let change = |user: &str, status: Status, instance: &str, at: u64| PresenceUpdate {
        user: user.to_owned(),
        status,
        last_seen: at,
        instance: instance.to_owned(),
        at,
    };
    let mut first = Vec::new();
    for at in 1..=40u64 {
        let status = if at % 2 == 1 { Status::Online } else { Status::Offline };
        first.push(change("alice", status, "gw-1", at));
        if at % 10 == 0 {
            first.push(change("bob", Status::Away, "gw-2", at));
        }
    }
    router.record_presence(first.clone()).await.expect("recorded");
    router.record_presence(vec![change("alice", Status::Online, "gw-1", 41)]).await.expect("recorded");
    let records = read_topic(&config, config.presence_topic()).await;
    assert_eq!(records.len(), first.len() + 1, "one record per change");
    let partitions = log_partitions(&config).await;
    let mut by_user: BTreeMap<String, Vec<PresenceUpdate>> = BTreeMap::new();
    for (partition, key, payload) in records {
        let update: PresenceUpdate = serde_json::from_slice(&payload).expect("a presence record");
        assert_eq!(key.as_deref(), Some(update.user.as_bytes()), "keyed by user");
        assert_eq!(partition, partition_for(&update.user, partitions), "on the user's partition");
        by_user.entry(update.user.clone()).or_default().push(update);
    }
    let alice: Vec<u64> = by_user["alice"].iter().map(|update| update.at).collect();
    assert_eq!(alice, (1..=41).collect::<Vec<_>>(), "alice's changes in the order given");
    assert_eq!(by_user["alice"].last().map(|update| update.status), Some(Status::Online));
    assert_eq!(by_user["bob"].len(), 4);
    assert!(by_user["bob"].iter().all(|update| update.instance == "gw-2" && update.status == Status::Away));
    assert_eq!(router.stats().presence_records.load(Ordering::Relaxed), 45, "every change counted");
}

/// The partition count of the receipts topic (every topic of a prefix has the same).
async fn log_partitions(config: &KafkaConfig) -> i32 {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.client_config().create().expect("client");
        let topic = config.receipts_topic();
        let metadata = consumer.fetch_metadata(Some(topic.as_str()), Duration::from_secs(5)).expect("metadata");
        metadata.topics()[0].partitions().len() as i32
    })
    .await
    .expect("metadata task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_as_a_first_attempt_keeps_naming_its_first_message() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let writer = StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    let alice = UserId::new("alice").expect("user");
    {
        let router = router_on(Arc::new(open(&config, &store).await), &store);
        router.create_channel(&alice, "room", &[]).await.expect("create");
        let first = router.send_attempt(&alice, "g:room", "k", "one", true).await.expect("first");
        let again = router.send_attempt(&alice, "g:room", "k", "one again", true).await.expect("second");
        assert_eq!((first.placement.seq, again.placement.seq), (1, 2), "a used key as a first attempt: a 2nd message");
        // From the log's unstored tail: the key names the first message.
        let retry = router.send_attempt(&alice, "g:room", "k", "one", false).await.expect("retry");
        assert_eq!((retry.placement.seq, retry.duplicate), (1, true), "{retry:?}");
    }
    wait_stored(&store, "g:room", 2, Duration::from_secs(30)).await;
    caught_up(&writer).await;
    // A new writer (the old one fenced): its tail is empty, the store answers, and still names the first.
    let router = router_on(Arc::new(open(&config, &store).await), &store);
    let retry = router.send_attempt(&alice, "g:room", "k", "one", false).await.expect("retry from the store");
    assert_eq!((retry.placement.seq, retry.duplicate), (1, true), "{retry:?}");
    writer.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_store_writer_replaces_its_consumer_and_stores_on() {
    let Some(mut config) = kafka_config() else { return };
    // A static member, as the router runs it: a newer member with the same instance id fences this one, which is
    // what a broker outage longer than the session can lead to (librdkafka's fatal FencedInstanceId).
    config.store_writer_instance = Some(format!("{}store-writer-0", config.prefix));
    let (_dir, store) = store();
    let log = Arc::new(open(&config, &store).await);
    let writer = StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    let router = router_on(log, &store);
    let alice = UserId::new("alice").expect("user");
    router.create_channel(&alice, "room", &[]).await.expect("create");
    for n in 1..=10u64 {
        router.send(&alice, "g:room", &format!("a{n}"), "before").await.expect("send");
    }
    wait_stored(&store, "g:room", 10, Duration::from_secs(30)).await;

    // The impostor joins with the writer's instance id and stays a moment: the writer's consumer is fenced.
    let impostor: rdkafka::consumer::StreamConsumer = config
        .client_config()
        .set("group.id", config.store_writer_group())
        .set("group.instance.id", config.store_writer_instance.as_deref().unwrap_or_default())
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("impostor");
    impostor.subscribe(&[&config.messages_topic()]).expect("subscribe");
    let _ = tokio::time::timeout(Duration::from_secs(5), impostor.recv()).await;
    tokio::task::spawn_blocking(move || drop(impostor)).await.expect("impostor leaves");
    for n in 11..=20u64 {
        router.send(&alice, "g:room", &format!("a{n}"), "after").await.expect("send");
    }
    // The writer notices, replaces its consumer, and stores what came after (and nothing twice).
    wait_stored(&store, "g:room", 20, Duration::from_secs(60)).await;
    assert_exactly_once_in_order("g:room", &history(&store, "g:room").await, 20);
    caught_up(&writer).await;
    assert!(
        writer.stats().consumer_restarts.load(Ordering::Relaxed) >= 1,
        "the fenced consumer was replaced (consume failures: {})",
        writer.stats().consume_failures.load(Ordering::Relaxed)
    );
    writer.stop().await.expect("clean stop");
}
