//! Several routers sharing the partitions of one Kafka log: a deposed router never confirms a send, routers split
//! the partitions through their group and take over from one that stops, and a gateway's pool sends each call to
//! the owner, with no message lost, duplicated or reordered across a handover.
//!
//! The tests need `PARLEY_KAFKA_BOOTSTRAP` (see `router/tests/kafka.rs`); each uses its own topic prefix.

use parley_api::routing::{MemoryRouterDirectory, RouterDirectory};
use parley_api::{PoolConfig, RemoteRouter, Router, RouterError, RouterPool};
use parley_bus::pubsub::LocalPubSub;
use parley_core::protocol::{ErrorCode, MessageView};
use parley_core::UserId;
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::partition::partition_for;
use parley_router::kafka::{ownership, KafkaConfig, KafkaLog, OwnershipGroup};
use parley_router::RouterConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const PARTITIONS: i32 = 4;

fn kafka_config() -> Option<KafkaConfig> {
    parley_test_support::engine(parley_test_support::Engine::Kafka).map(|bootstrap| {
        let mut config = parley_test_support::kafka_config(&bootstrap)
            .with_prefix(parley_test_support::unique("parley-test-") + "-")
            .with_partitions(PARTITIONS);
        config.store_batch_wait = Duration::from_millis(2);
        config
    })
}

fn store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("store");
    (dir, Arc::new(store))
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user")
}

/// A router on `log` (machine id `machine`), with `store` as its store and membership.
fn router_on(log: Arc<KafkaLog>, store: &Arc<EmbeddedStore>, machine: u16) -> Router {
    let config = RouterConfig { machine_id: machine, ..RouterConfig::default() };
    let (router, _task) =
        parley_router::start(config, log, store.clone(), store.clone(), Arc::new(LocalPubSub::new())).expect("router");
    router
}

/// A channel name per partition, `g:<stem>-<n>`.
fn channel_in(partition: i32, stem: &str) -> String {
    (0..10_000)
        .map(|n| format!("g:{stem}-{n}"))
        .find(|channel| partition_for(channel, PARTITIONS) == partition)
        .expect("a channel in every partition")
}

async fn history(store: &EmbeddedStore, channel: &str) -> Vec<MessageView> {
    parley_test_support::router::stored_history(store, channel).await
}

/// Waits until the store writer stored `count` messages of `channel`.
async fn stored(store: &EmbeddedStore, channel: &str, count: usize) -> Vec<MessageView> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let messages = history(store, channel).await;
        if messages.len() >= count || Instant::now() > deadline {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn code(error: &RouterError) -> ErrorCode {
    error.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_router_never_confirms_a_send() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let alice = user("alice");
    let old_log = Arc::new(KafkaLog::open(config.clone(), store.clone(), None).await.expect("old log"));
    let old = router_on(old_log.clone(), &store, 1);
    let channel = "g:contested";
    old.create_channel(&alice, "contested", &[]).await.expect("create");
    for n in 0..5 {
        old.send(&alice, channel, &format!("old-{n}"), "before").await.expect("the owner confirms");
    }

    // A second router starts against the same partitions while the first keeps sending, until a while after.
    let (stop, stopped) = watch::channel(false);
    let sending = {
        let old = old.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 5..5_000 {
                if *stopped.borrow() {
                    break;
                }
                let started = Instant::now();
                let outcome = old.send(&alice, channel, &format!("old-{n}"), "during").await;
                outcomes.push((started, format!("old-{n}"), outcome));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new_log = Arc::new(KafkaLog::open(config.clone(), store.clone(), None).await.expect("new log"));
    let deposed_at = Instant::now();
    let new = router_on(new_log, &store, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    let outcomes = sending.await.expect("sender");

    let mut confirmed: Vec<String> = (0..5).map(|n| format!("old-{n}")).collect();
    let mut refused_after = 0;
    for (at, key, outcome) in &outcomes {
        match outcome {
            Ok(_) => {
                // A send that started after the takeover finished must never be confirmed by the old router.
                assert!(*at < deposed_at, "{key} was confirmed by the deposed router after the takeover");
                confirmed.push(key.clone());
            }
            Err(error) => {
                assert_eq!(code(error), ErrorCode::NotOwner, "{key}: a deposed router refuses as not_owner: {error}");
                if *at > deposed_at {
                    refused_after += 1;
                }
            }
        }
    }
    assert!(refused_after > 0, "the old router kept trying after the takeover");
    // Fenced for good.
    let late = old.send(&alice, channel, "late", "after").await.expect_err("deposed");
    assert_eq!(code(&late), ErrorCode::NotOwner);

    // The new owner continues the sequence; a key the old one confirmed is answered with its first placement.
    let next = new.send(&alice, channel, "new-0", "after the takeover").await.expect("the new owner confirms");
    assert_eq!(next.placement.seq, confirmed.len() as u64 + 1, "no gap and no reuse");
    let retry = new.send(&alice, channel, "old-0", "before").await.expect("retry");
    assert!(retry.duplicate);
    assert_eq!(retry.placement.seq, 1);

    // The log holds exactly the confirmed sends, once each, in one order.
    let writer = parley_router::kafka::StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    let messages = stored(&store, channel, confirmed.len() + 1).await;
    writer.stop().await.expect("stop");
    let keys: Vec<&str> = messages.iter().map(|message| message.client_msg_id.as_str()).collect();
    let mut expected: Vec<&str> = confirmed.iter().map(String::as_str).collect();
    expected.push("new-0");
    assert_eq!(keys, expected, "exactly the confirmed sends, in order");
    let seqs: Vec<u64> = messages.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, (1..=messages.len() as u64).collect::<Vec<_>>());
}

/// Two routers in one ownership group, each serving its HTTP API and publishing its partitions.
struct Member {
    log: Arc<KafkaLog>,
    group: Option<OwnershipGroup>,
    url: String,
    stop: watch::Sender<bool>,
    _server: tokio::task::JoinHandle<()>,
}

async fn member(
    config: &KafkaConfig,
    store: &Arc<EmbeddedStore>,
    machine: u16,
    directory: &Arc<MemoryRouterDirectory>,
) -> Member {
    let log = Arc::new(KafkaLog::open(config.clone(), store.clone(), Some(Vec::new())).await.expect("log"));
    let router = router_on(log.clone(), store, machine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let app = parley_router::service::app(router, None);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let group = OwnershipGroup::start(config.clone(), log.clone()).expect("group");
    let (stop, stopped) = watch::channel(false);
    let published: Arc<dyn RouterDirectory> = directory.clone();
    tokio::spawn(ownership::publish(log.clone(), published, url.clone(), group.changed(), stopped));
    Member { log, group: Some(group), url, stop, _server: server }
}

/// Waits until the members' logs own every partition between them, each exactly once, spread evenly (the group
/// balances the partitions over its members; a member that joins later gets its share in a second rebalance).
async fn wait_split(members: &[&Member], within: Duration) -> Vec<Vec<i32>> {
    let deadline = Instant::now() + within;
    loop {
        let owned: Vec<Vec<i32>> = members.iter().map(|member| member.log.owned()).collect();
        let all: Vec<i32> = owned.iter().flatten().copied().collect();
        let distinct: BTreeSet<i32> = all.iter().copied().collect();
        let even = owned.iter().all(|partitions| partitions.len() == PARTITIONS as usize / members.len());
        if all.len() == PARTITIONS as usize && distinct.len() == PARTITIONS as usize && even {
            return owned;
        }
        assert!(Instant::now() < deadline, "the partitions were not split within {within:?}: {owned:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_split_the_partitions_and_a_pool_follows_a_handover_without_loss() {
    let Some(config) = kafka_config() else { return };
    let (_dir, store) = store();
    let directory = Arc::new(MemoryRouterDirectory::default());
    let first = member(&config, &store, 1, &directory).await;
    let second = member(&config, &store, 2, &directory).await;
    let owned = wait_split(&[&first, &second], Duration::from_secs(60)).await;
    assert!(owned.iter().all(|partitions| !partitions.is_empty()), "both routers own partitions: {owned:?}");

    // A call that reaches the router that does not own the channel is refused as not_owner.
    let foreign = channel_in(owned[1][0], "foreign");
    let direct = RemoteRouter::connect(&first.url, None, Duration::from_secs(5)).await.expect("connect");
    let refused = Router::new(direct).create_channel(&user("alice"), &foreign[2..], &[]).await.expect_err("not owner");
    assert_eq!(refused.code(), ErrorCode::NotOwner);

    // A gateway's pool sends every call to the owner.
    let bootstrap = RemoteRouter::connect(&first.url, None, Duration::from_secs(5)).await.expect("connect");
    let pool_config = PoolConfig {
        refresh_every: Duration::from_millis(200),
        retry_for: Duration::from_secs(3),
        ..PoolConfig::default()
    };
    let routers: Arc<dyn RouterDirectory> = directory.clone();
    let pool = RouterPool::start(bootstrap, routers, None, Duration::from_secs(5), pool_config).await;
    let pool_stats = pool.pool_stats().clone();
    let gateway = Router::new(pool);
    let alice = user("alice");
    let channels: Vec<String> = (0..PARTITIONS).map(|partition| channel_in(partition, "room")).collect();
    for channel in &channels {
        gateway.create_channel(&alice, &channel[2..], &[]).await.expect("create through the pool");
    }

    // Senders keep going while the first router leaves: its partitions move to the second.
    let sending = {
        let gateway = gateway.clone();
        let alice = alice.clone();
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut confirmed: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
            let mut unavailable = 0;
            for n in 0..150 {
                for channel in &channels {
                    let key = format!("{channel}-{n}");
                    // A client retries a send that was not confirmed, with the same key, until it is.
                    let mut attempts = 0;
                    loop {
                        match gateway.send(&alice, channel, &key, "hello").await {
                            Ok(outcome) => {
                                confirmed
                                    .entry(channel.clone())
                                    .or_default()
                                    .push((outcome.placement.seq, key.clone()));
                                break;
                            }
                            Err(error) => {
                                assert_eq!(
                                    error.code(),
                                    ErrorCode::Unavailable,
                                    "only unavailable while moving: {error}"
                                );
                                unavailable += 1;
                                attempts += 1;
                                assert!(attempts < 100, "{key} never went through");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (confirmed, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut first = first;
    let left = Instant::now();
    first.group.take().expect("group").stop().await;
    let _ = first.stop.send(true);
    let owned = wait_split(&[&second], Duration::from_secs(30)).await;
    let moved_in = left.elapsed();
    assert_eq!(owned[0].len(), PARTITIONS as usize);
    let (confirmed, unavailable) = sending.await.expect("sender");
    println!(
        "handover: partitions moved in {} ms; {unavailable} sends answered unavailable meanwhile; pool retries: \
         {} not_owner, {} unreachable",
        moved_in.as_millis(),
        pool_stats.not_owner_retries.load(std::sync::atomic::Ordering::Relaxed),
        pool_stats.unreachable_retries.load(std::sync::atomic::Ordering::Relaxed),
    );

    // Every confirmed send is stored once, in the order of its sequence, and nothing else is.
    let writer = parley_router::kafka::StoreWriter::start(config.clone(), store.clone()).await.expect("store writer");
    for channel in &channels {
        let mine = &confirmed[channel];
        assert_eq!(mine.len(), 150, "every send of {channel} was confirmed in the end");
        let messages = stored(&store, channel, mine.len()).await;
        let stored: Vec<(u64, String)> =
            messages.iter().map(|message| (message.seq, message.client_msg_id.clone())).collect();
        assert_eq!(&stored, mine, "{channel}: exactly the confirmed sends, once each, in one order");
        let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=150).collect::<Vec<_>>(), "{channel}: no gap, no reuse");
    }
    writer.stop().await.expect("stop");
}
