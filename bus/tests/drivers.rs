//! One behaviour suite for the pub/sub, presence and token-revocation drivers, run against the embedded drivers,
//! against Redis and against a Redis Cluster of three masters.
//!
//! Every test body takes an [`Engine`] and runs once per driver (`<test>::embedded`, `<test>::redis`,
//! `<test>::redis_cluster`). The Redis runs need `PARLEY_REDIS_URL`, the cluster runs `PARLEY_REDIS_CLUSTER_URLS`
//! (start them with `e2e/stack/up.sh --only redis,redis-cluster <state dir>` and source `<state dir>/stack.env`);
//! each test uses its own key prefix. Without the variable a plain `cargo test` skips them (one line each on stderr)
//! and the full test command fails them (`parley_test_support::engines`). The drivers connect as the binaries do
//! with that environment (`parley_test_support::redis_config`): over TLS (`rediss://`, trusting
//! `PARLEY_REDIS_TLS_CA_FILE`) as the ACL user `PARLEY_REDIS_USERNAME` with `PARLEY_REDIS_PASSWORD`.
//!
//! The restart tests start their own `redis-server` (TLS with a CA of their own, made with the `openssl` command, and
//! an ACL user) on a loopback port, kill it and start it again on the same port. The set-up tests (`redis_setup`)
//! check that a wrong password, a certificate from another CA and `rediss://` without a CA file (the system's roots,
//! which do not hold the test CA) each end `connect` at once with an error naming Redis, the node and the cause.

use bytes::Bytes;
use parley_bus::presence::{EmbeddedPresenceStore, PresenceError, PresenceStore, Registration};
use parley_bus::pubsub::{Delivery, Event, LocalPubSub, PubSub, Subscription};
use parley_bus::redis::{RedisConfig, RedisPresenceStore, RedisPubSub, RedisRevocationStore};
use parley_bus::revocation::{unix_secs, EmbeddedRevocationStore, RevocationStore};
use parley_core::presence::{Fenced, PresenceView, RemoteState, Status};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const START_REDIS: &str = "start Redis with `e2e/stack/up.sh --only redis,redis-cluster /tmp/parley-stack` and \
     `set -a; . /tmp/parley-stack/stack.env; set +a`";

/// A lease that does not lapse during a test.
const LONG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Engine {
    Embedded,
    Redis,
    RedisCluster,
}

/// The Redis configuration for one test (its own prefix), or `None` when engine tests are skipped.
fn redis_config(engine: Engine) -> Option<RedisConfig> {
    let needed = match engine {
        Engine::RedisCluster => parley_test_support::Engine::RedisCluster,
        _ => parley_test_support::Engine::Redis,
    };
    let config = parley_test_support::redis_config(needed)?.with_prefix(unique_prefix());
    assert_eq!(config.is_cluster(), matches!(engine, Engine::RedisCluster), "{}: {}", needed.variable(), config.url);
    Some(config)
}

fn unique_prefix() -> String {
    parley_test_support::unique("parley-test:") + ":"
}

async fn bus(engine: Engine) -> Option<Arc<dyn PubSub>> {
    match engine {
        Engine::Embedded => Some(Arc::new(LocalPubSub::new())),
        Engine::Redis | Engine::RedisCluster => {
            let config = redis_config(engine)?;
            let url = config.url.clone();
            Some(Arc::new(
                RedisPubSub::connect(config)
                    .await
                    .unwrap_or_else(|error| panic!("cannot reach Redis at {url}: {error}; {START_REDIS}")),
            ))
        }
    }
}

async fn presence(engine: Engine) -> Option<Arc<dyn PresenceStore>> {
    match engine {
        Engine::Embedded => Some(Arc::new(EmbeddedPresenceStore::new())),
        Engine::Redis | Engine::RedisCluster => {
            let config = redis_config(engine)?;
            let url = config.url.clone();
            Some(Arc::new(
                RedisPresenceStore::connect(config)
                    .await
                    .unwrap_or_else(|error| panic!("cannot reach Redis at {url}: {error}; {START_REDIS}")),
            ))
        }
    }
}

parley_test_support::engine_suite!(
    [embedded => Embedded, redis => Redis, redis_cluster => RedisCluster];
    pubsub_order_and_isolation,
    pubsub_batches_keep_order,
    pubsub_unsubscribe,
    pubsub_binary_payloads,
    pubsub_dropped_subscription_ends,
    presence_online_away_offline,
    presence_lapsed_lease_goes_offline,
    presence_reregistration_fences_old_epoch,
    presence_locate_and_online_count,
    presence_of_other_regions_merges_into_views_only,
    revocation_keeps_the_latest_time_per_user,
    revocation_entries_expire_after_the_ttl,
    revocation_survives_a_restart,
);

// ---------------------------------------------------------------------------------------------------------------
// Pub/sub

async fn next(deliveries: &mut mpsc::Receiver<Delivery>) -> (String, Bytes) {
    match tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await {
        Ok(Some((topic, payload))) => (topic.to_string(), payload),
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no publication within 10 s"),
    }
}

async fn subscriber(bus: &Arc<dyn PubSub>, topics: &[&str]) -> (Arc<dyn Subscription>, mpsc::Receiver<Delivery>) {
    let (sink, deliveries) = mpsc::channel(4_096);
    let subscription = bus.open(sink);
    subscription.subscribe(topics.iter().map(|topic| topic.to_string()).collect()).await.expect("subscribe");
    (subscription, deliveries)
}

async fn publish(bus: &Arc<dyn PubSub>, topic: &str, payload: impl Into<Bytes>) {
    bus.publish(topic, payload.into()).await.expect("publish");
}

/// Every subscriber gets exactly its topics' publications, each topic in publish order.
async fn pubsub_order_and_isolation(engine: Engine) {
    let Some(bus) = bus(engine).await else { return };
    let (_a, mut to_a) = subscriber(&bus, &["ch:a"]).await;
    let (_b, mut to_b) = subscriber(&bus, &["ch:b"]).await;
    let (_both, mut to_both) = subscriber(&bus, &["ch:a", "ch:b"]).await;
    for index in 0..300 {
        for topic in ["ch:a", "ch:b", "ch:nobody"] {
            publish(&bus, topic, format!("{index}")).await;
        }
    }
    publish(&bus, "ch:a", "end").await;
    publish(&bus, "ch:b", "end").await;

    for (topic, deliveries) in [("ch:a", &mut to_a), ("ch:b", &mut to_b)] {
        for index in 0..300 {
            assert_eq!(next(deliveries).await, (topic.to_owned(), Bytes::from(format!("{index}"))));
        }
        assert_eq!(next(deliveries).await, (topic.to_owned(), Bytes::from("end")));
    }
    let mut seen = std::collections::HashMap::<String, Vec<Bytes>>::new();
    while seen.values().map(Vec::len).sum::<usize>() < 602 {
        let (topic, payload) = next(&mut to_both).await;
        seen.entry(topic).or_default().push(payload);
    }
    let expected: Vec<Bytes> =
        (0..300).map(|index| Bytes::from(format!("{index}"))).chain([Bytes::from("end")]).collect();
    assert_eq!(seen.keys().count(), 2, "{:?}", seen.keys());
    assert_eq!(seen["ch:a"], expected);
    assert_eq!(seen["ch:b"], expected);
}

/// A batch publish (one pipeline on Redis) delivers every item, each topic in order, and interleaves with single
/// publishes in call order.
async fn pubsub_batches_keep_order(engine: Engine) {
    let Some(bus) = bus(engine).await else { return };
    let (_sub, mut deliveries) = subscriber(&bus, &["ch:p", "ch:q"]).await;
    publish(&bus, "ch:p", "first").await;
    let batch: Vec<(String, Bytes)> = (0..500)
        .map(|index| (if index % 3 == 0 { "ch:q" } else { "ch:p" }.to_owned(), Bytes::from(format!("{index}"))))
        .collect();
    bus.publish_batch(batch.clone()).await.expect("batch");
    bus.publish_batch(Vec::new()).await.expect("an empty batch is nothing");
    publish(&bus, "ch:p", "last").await;
    let mut seen = std::collections::HashMap::<String, Vec<Bytes>>::new();
    while seen.values().map(Vec::len).sum::<usize>() < 502 {
        let (topic, payload) = next(&mut deliveries).await;
        seen.entry(topic).or_default().push(payload);
    }
    let expected = |topic: &str| -> Vec<Bytes> {
        batch.iter().filter(|(to, _)| to == topic).map(|(_, payload)| payload.clone()).collect()
    };
    let mut p = vec![Bytes::from("first")];
    p.extend(expected("ch:p"));
    p.push(Bytes::from("last"));
    assert_eq!(seen["ch:p"], p);
    assert_eq!(seen["ch:q"], expected("ch:q"));
}

/// Subscribing twice delivers once; after unsubscribe nothing more arrives from that topic; empty changes are
/// no-ops.
async fn pubsub_unsubscribe(engine: Engine) {
    let Some(bus) = bus(engine).await else { return };
    let (subscription, mut deliveries) = subscriber(&bus, &["ch:x", "ch:mark"]).await;
    subscription.subscribe(vec!["ch:x".into()]).await.expect("idempotent subscribe");
    publish(&bus, "ch:x", "one").await;
    publish(&bus, "ch:mark", "m1").await;
    assert_eq!(next(&mut deliveries).await, ("ch:x".to_owned(), Bytes::from("one")));
    assert_eq!(next(&mut deliveries).await, ("ch:mark".to_owned(), Bytes::from("m1")), "delivered once");

    subscription.unsubscribe(vec!["ch:x".into()]).await.expect("unsubscribe");
    subscription.unsubscribe(vec!["ch:x".into(), "ch:never".into()]).await.expect("idempotent unsubscribe");
    subscription.unsubscribe(Vec::new()).await.expect("empty unsubscribe");
    subscription.subscribe(Vec::new()).await.expect("empty subscribe");
    publish(&bus, "ch:x", "two").await;
    publish(&bus, "ch:mark", "m2").await;
    assert_eq!(next(&mut deliveries).await, ("ch:mark".to_owned(), Bytes::from("m2")), "ch:x is unsubscribed");

    subscription.subscribe(vec!["ch:x".into()]).await.expect("subscribe again");
    publish(&bus, "ch:x", "three").await;
    assert_eq!(next(&mut deliveries).await, ("ch:x".to_owned(), Bytes::from("three")));
}

/// Payloads are bytes, not text: every byte value, invalid UTF-8, empty and large payloads arrive unchanged.
async fn pubsub_binary_payloads(engine: Engine) {
    let Some(bus) = bus(engine).await else { return };
    let (_subscription, mut deliveries) = subscriber(&bus, &["ch:bin"]).await;
    let mut large = vec![0u8; 256 * 1024];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for byte in large.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let payloads = vec![
        Bytes::new(),
        Bytes::from((0..=255u8).collect::<Vec<u8>>()),
        Bytes::from_static(&[0xff, 0xfe, 0x00, 0x80, 0xc3]),
        Event::Message { seq: u64::MAX, ts: u64::MAX, frame: Bytes::from_static(b"{\"type\":\"message\"}") }.encode(),
        Bytes::from(large),
    ];
    for payload in &payloads {
        publish(&bus, "ch:bin", payload.clone()).await;
    }
    for payload in payloads {
        assert_eq!(next(&mut deliveries).await, ("ch:bin".to_owned(), payload));
    }
}

/// Dropping a subscription ends its deliveries; the bus keeps working for others.
async fn pubsub_dropped_subscription_ends(engine: Engine) {
    let Some(bus) = bus(engine).await else { return };
    let (subscription, mut gone) = subscriber(&bus, &["ch:d"]).await;
    let (_other, mut other) = subscriber(&bus, &["ch:d"]).await;
    drop(subscription);
    publish(&bus, "ch:d", "after").await;
    assert_eq!(next(&mut other).await, ("ch:d".to_owned(), Bytes::from("after")));
    let ended = tokio::time::timeout(Duration::from_secs(10), gone.recv()).await.expect("ends within 10 s");
    assert!(ended.is_none(), "a dropped subscription delivers nothing: {ended:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Presence

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

async fn register(store: &Arc<dyn PresenceStore>, instance: &str, lease: Duration) -> u64 {
    store.register_instance(instance, lease).await.expect("register").epoch
}

async fn view(store: &Arc<dyn PresenceStore>, user: &str) -> PresenceView {
    store.views(&users(&[user])).await.expect("views").remove(0)
}

fn summary(views: &[PresenceView]) -> Vec<(&str, Status)> {
    views.iter().map(|view| (view.user.as_str(), view.status)).collect()
}

fn assert_fenced<T: std::fmt::Debug>(result: Result<T, PresenceError>, epoch: u64, current: u64) {
    match result {
        Err(PresenceError::Fenced(Fenced::StaleEpoch { epoch: refused, current: actual, .. })) => {
            assert_eq!((refused, actual), (epoch, current), "fenced epochs")
        }
        other => panic!("expected a fenced write (epoch {epoch}, current {current}), got {other:?}"),
    }
}

/// Online, away and offline with last seen, across two devices of one user.
async fn presence_online_away_offline(engine: Engine) {
    let Some(store) = presence(engine).await else { return };
    let epoch = register(&store, "gw-a", LONG).await;
    let online = store.connect("alice", "gw-a", epoch).await.expect("live").expect("changed");
    assert_eq!(online.status, Status::Online);
    assert!(online.last_seen > 0);
    assert_eq!(store.connect("alice", "gw-a", epoch).await.expect("live"), None, "second device: no change");
    let away = store.set_away("alice", true).await.expect("set away").expect("changed");
    assert_eq!((away.user.as_str(), away.status), ("alice", Status::Away));
    assert_eq!(store.set_away("alice", true).await.expect("set away"), None, "already away");
    let both = store.views(&users(&["alice", "nobody"])).await.expect("views");
    assert_eq!(summary(&both), vec![("alice", Status::Away), ("nobody", Status::Offline)]);
    assert_eq!(both[1].last_seen, 0, "never seen");

    assert_eq!(store.disconnect("alice", "gw-a", epoch).await.expect("live"), None, "one device left");
    let offline = store.disconnect("alice", "gw-a", epoch).await.expect("live").expect("changed");
    assert_eq!(offline.status, Status::Offline);
    assert!(offline.last_seen >= online.last_seen, "{offline:?} after {online:?}");
    assert_eq!(view(&store, "alice").await, offline);
    assert_eq!(store.set_away("alice", true).await.expect("set away"), None, "an offline user cannot be away");
    assert_eq!(store.set_away("nobody", true).await.expect("set away"), None);
    assert_eq!(store.disconnect("nobody", "gw-a", epoch).await.expect("live"), None);

    let back = store.connect("alice", "gw-a", epoch).await.expect("live").expect("changed");
    assert_eq!(back.status, Status::Online, "away ended when the last connection closed");
    assert_eq!(store.set_away("alice", false).await.expect("set back"), None, "already online");
}

/// An instance that stops renewing loses its entries at the first expiry after its lease: its users go offline,
/// users also connected elsewhere stay online, and its later writes are refused.
async fn presence_lapsed_lease_goes_offline(engine: Engine) {
    let Some(store) = presence(engine).await else { return };
    let lease = Duration::from_millis(400);
    let a = register(&store, "gw-a", lease).await;
    let b = register(&store, "gw-b", LONG).await;
    store.connect("alice", "gw-a", a).await.expect("live");
    store.connect("bob", "gw-a", a).await.expect("live");
    store.connect("bob", "gw-b", b).await.expect("live");
    store.renew("gw-b", b, LONG).await.expect("renewed");
    assert_eq!(
        store.locate(&users(&["bob", "alice", "carol"])).await.expect("locate"),
        vec![users(&["gw-a", "gw-b"]), users(&["gw-a"]), Vec::new()]
    );

    // The lease runs on the store's clock (wall-clock milliseconds: this process's, or the Redis server's), so wait
    // for it on that clock: expire until the sweep finds the lapsed instance.
    let changes = parley_test_support::eventually("gw-a's lease to lapse", lease + Duration::from_secs(30), || async {
        let changes = store.expire().await.expect("expire");
        (!changes.is_empty()).then_some(changes)
    })
    .await;
    assert_eq!(summary(&changes), vec![("alice", Status::Offline)]);
    assert_eq!(view(&store, "bob").await.status, Status::Online, "still on gw-b");
    assert_eq!(store.locate(&users(&["bob", "alice"])).await.expect("locate"), vec![users(&["gw-b"]), Vec::new()]);
    assert_fenced(store.connect("carol", "gw-a", a).await, a, a);
    assert_fenced(store.renew("gw-a", a, LONG).await, a, a);
    assert_fenced(store.disconnect("bob", "gw-a", a).await, a, a);
    assert_eq!(store.expire().await.expect("expire"), Vec::new(), "nothing left to expire");
    assert_eq!(view(&store, "alice").await.status, Status::Offline);
    assert_eq!(store.online_count(&users(&["alice", "bob", "carol"])).await.expect("count"), 1);

    // The instance comes back with a new epoch and starts from nothing.
    let again = register(&store, "gw-a", LONG).await;
    assert_eq!(again, a + 1);
    assert_eq!(view(&store, "alice").await.status, Status::Offline);
}

/// Re-registering (a restart) drops the old epoch's entries at once, fences the old epoch, and never revives
/// anything of it.
async fn presence_reregistration_fences_old_epoch(engine: Engine) {
    let Some(store) = presence(engine).await else { return };
    let old = register(&store, "gw-a", LONG).await;
    assert_eq!(old, 1, "first epoch of a new instance id");
    let b = register(&store, "gw-b", LONG).await;
    store.connect("alice", "gw-a", old).await.expect("live");
    store.connect("bob", "gw-a", old).await.expect("live");
    store.connect("bob", "gw-b", b).await.expect("live");

    let Registration { epoch: new, changes } = store.register_instance("gw-a", LONG).await.expect("register");
    assert_eq!(new, old + 1);
    assert_eq!(summary(&changes), vec![("alice", Status::Offline)], "bob is still on gw-b");
    assert_eq!(view(&store, "alice").await.status, Status::Offline);
    assert_fenced(store.connect("alice", "gw-a", old).await, old, new);
    assert_fenced(store.disconnect("bob", "gw-a", old).await, old, new);
    assert_fenced(store.renew("gw-a", old, LONG).await, old, new);
    assert_fenced(store.connect("alice", "gw-z", 1).await, 1, 0);
    assert_eq!(store.expire().await.expect("expire"), Vec::new());
    assert_eq!(view(&store, "alice").await.status, Status::Offline, "never revived");
    assert_eq!(store.locate(&users(&["bob"])).await.expect("locate"), vec![users(&["gw-b"])]);

    let online = store.connect("alice", "gw-a", new).await.expect("live").expect("changed");
    assert_eq!(online.status, Status::Online);
    store.renew("gw-a", new, LONG).await.expect("the new epoch renews");
    assert_eq!(store.locate(&users(&["alice"])).await.expect("locate"), vec![users(&["gw-a"])]);
}

/// The registry and the aggregate count, over more users than one read batch.
async fn presence_locate_and_online_count(engine: Engine) {
    let Some(store) = presence(engine).await else { return };
    let a = register(&store, "gw-a", LONG).await;
    let b = register(&store, "gw-b", LONG).await;
    let everyone: Vec<String> = (0..1_200).map(|index| format!("u{index:04}")).collect();
    for (index, user) in everyone.iter().enumerate() {
        if index % 3 == 0 {
            store.connect(user, "gw-a", a).await.expect("live");
        }
        if index % 5 == 0 {
            store.connect(user, "gw-b", b).await.expect("live");
        }
    }
    store.set_away("u0003", true).await.expect("set away");
    let present = (0..1_200).filter(|index| index % 3 == 0 || index % 5 == 0).count();
    assert_eq!(store.online_count(&everyone).await.expect("count"), present);

    let views = store.views(&everyone).await.expect("views");
    assert_eq!(views.len(), everyone.len());
    for (index, (user, view)) in everyone.iter().zip(&views).enumerate() {
        assert_eq!(&view.user, user, "views keep the order of the request");
        let expected = match index {
            3 => Status::Away,
            _ if index % 3 == 0 || index % 5 == 0 => Status::Online,
            _ => Status::Offline,
        };
        assert_eq!(view.status, expected, "{user}");
    }

    let located = store.locate(&users(&["u0000", "u0003", "u0005", "u0001"])).await.expect("locate");
    assert_eq!(located, vec![users(&["gw-a", "gw-b"]), users(&["gw-a"]), users(&["gw-b"]), Vec::new()]);
    let all = store.locate(&everyone).await.expect("locate");
    assert_eq!(all.iter().filter(|instances| !instances.is_empty()).count(), present);

    assert_eq!(store.online_count(&[]).await.expect("count"), 0);
    assert_eq!(store.views(&[]).await.expect("views"), Vec::new());
}

/// What other regions said of users shows in the views (online anywhere is online), never in this region's own
/// changes; a late report does not undo a newer one; a failed region's reports can be forgotten.
async fn presence_of_other_regions_merges_into_views_only(engine: Engine) {
    let Some(store) = presence(engine).await else { return };
    let a = register(&store, "gw-a", LONG).await;
    let report = |user: &str, status, last_seen| (user.to_owned(), RemoteState { status, last_seen });
    let changed = store
        .apply_remote("us", vec![report("alice", Status::Online, 1_000), report("bob", Status::Away, 1_000)])
        .await
        .expect("apply");
    assert_eq!(changed, users(&["alice", "bob"]));
    let again = store.apply_remote("us", vec![report("alice", Status::Online, 1_000)]).await.expect("apply");
    assert!(again.is_empty(), "the same report twice changes nothing: {again:?}");
    assert_eq!(
        view(&store, "alice").await,
        PresenceView { user: "alice".into(), status: Status::Online, last_seen: 1_000 }
    );
    assert_eq!(view(&store, "bob").await.status, Status::Away);
    assert_eq!(store.online_count(&users(&["alice", "bob", "carol"])).await.expect("count"), 2);
    assert!(
        store.locate(&users(&["alice"])).await.expect("locate")[0].is_empty(),
        "no gateway of this region holds her"
    );

    // Her connection here is this region's change (reported as online), and its end is reported as offline
    // although she is still shown online: the other region holds her.
    let here = store.connect("alice", "gw-a", a).await.expect("live").expect("changed here");
    assert_eq!(here.status, Status::Online);
    let gone = store.disconnect("alice", "gw-a", a).await.expect("live").expect("changed here");
    assert_eq!(gone.status, Status::Offline);
    assert_eq!(view(&store, "alice").await.status, Status::Online);

    // Reports are ordered by their region's last-seen time: a late one is ignored, a newer one applies.
    let late = store.apply_remote("us", vec![report("alice", Status::Offline, 900)]).await.expect("apply");
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(view(&store, "alice").await.status, Status::Online);
    let newer = store.apply_remote("us", vec![report("alice", Status::Offline, 5_000)]).await.expect("apply");
    assert_eq!(newer, users(&["alice"]));
    let alice = view(&store, "alice").await;
    assert_eq!(alice.status, Status::Offline);
    assert!(alice.last_seen >= 5_000, "the latest last-seen of all regions: {alice:?}");

    // Two regions: online in either is online; forgetting one leaves the other's.
    store.apply_remote("eu", vec![report("carol", Status::Online, 2_000)]).await.expect("apply");
    store.apply_remote("us", vec![report("carol", Status::Offline, 3_000)]).await.expect("apply");
    assert_eq!(view(&store, "carol").await.status, Status::Online);
    assert_eq!(store.forget_region("eu").await.expect("forget"), users(&["carol"]));
    assert_eq!(
        view(&store, "carol").await,
        PresenceView { user: "carol".into(), status: Status::Offline, last_seen: 3_000 }
    );
    assert_eq!(store.forget_region("us").await.expect("forget"), users(&["alice", "bob", "carol"]));
    assert_eq!(view(&store, "bob").await.status, Status::Offline);
    assert!(store.forget_region("us").await.expect("forget").is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Token revocations

/// The revocations of one test: a store, and another on the same data (the embedded driver's file, or the same
/// Redis prefix), as a restarted gateway opens it.
struct Revocations {
    redis: Option<RedisConfig>,
    /// The embedded driver's directory (its file is `revoked.json` there).
    directory: Option<tempfile::TempDir>,
    ttl: Duration,
}

impl Revocations {
    /// `None` when engine tests are skipped.
    fn new(engine: Engine, ttl: Duration) -> Option<Self> {
        Some(match engine {
            Engine::Embedded => {
                Self { redis: None, directory: Some(tempfile::tempdir().expect("temporary directory")), ttl }
            }
            Engine::Redis | Engine::RedisCluster => Self { redis: Some(redis_config(engine)?), directory: None, ttl },
        })
    }

    async fn open(&self) -> Arc<dyn RevocationStore> {
        match (&self.redis, &self.directory) {
            (Some(config), _) => Arc::new(
                RedisRevocationStore::connect(config.clone(), self.ttl)
                    .await
                    .unwrap_or_else(|error| panic!("cannot reach Redis at {}: {error}; {START_REDIS}", config.url)),
            ),
            (None, Some(directory)) => Arc::new(
                EmbeddedRevocationStore::open(directory.path().join("revoked.json"), self.ttl).expect("open the file"),
            ),
            (None, None) => unreachable!("a store is either embedded or on Redis"),
        }
    }
}

/// One entry per user: the latest time wins, an earlier one changes nothing, other users are untouched.
async fn revocation_keeps_the_latest_time_per_user(engine: Engine) {
    let Some(revocations) = Revocations::new(engine, LONG * 60) else { return };
    let store = revocations.open().await;
    let now = unix_secs();
    assert_eq!(store.revoked_before("alice").await.expect("read"), None, "nothing revoked yet");
    assert_eq!(store.revoke("alice", now - 100).await.expect("revoke"), now - 100);
    assert_eq!(store.revoke("alice", now - 500).await.expect("revoke"), now - 100, "an earlier time changes nothing");
    assert_eq!(store.revoked_before("alice").await.expect("read"), Some(now - 100));
    assert_eq!(store.revoke("alice", now).await.expect("revoke"), now, "a later time moves the entry on");
    assert_eq!(store.revoked_before("alice").await.expect("read"), Some(now));
    assert_eq!(store.revoked_before("bob").await.expect("read"), None, "other users are untouched");
    store.revoke("bob", now - 1).await.expect("revoke");
    assert_eq!(store.revoked_before("bob").await.expect("read"), Some(now - 1));
    assert_eq!(store.revoked_before("alice").await.expect("read"), Some(now));
}

/// An entry is dropped once its time is more than the TTL ago: no token issued before it can still be valid.
async fn revocation_entries_expire_after_the_ttl(engine: Engine) {
    let ttl = Duration::from_secs(3_600);
    let Some(revocations) = Revocations::new(engine, ttl) else { return };
    let store = revocations.open().await;
    let now = unix_secs();
    store.revoke("old", now - 7_200).await.expect("revoke");
    assert_eq!(store.revoked_before("old").await.expect("read"), None, "two hours ago, with a TTL of one hour");
    store.revoke("recent", now - 600).await.expect("revoke");
    assert_eq!(store.revoked_before("recent").await.expect("read"), Some(now - 600));
    // An expired entry does not hold a new revocation back.
    assert_eq!(store.revoke("old", now - 60).await.expect("revoke"), now - 60);
    assert_eq!(store.revoked_before("old").await.expect("read"), Some(now - 60));
}

/// A store opened again on the same data (a restarted gateway, or another gateway) sees every entry.
async fn revocation_survives_a_restart(engine: Engine) {
    let Some(revocations) = Revocations::new(engine, LONG * 60) else { return };
    let now = unix_secs();
    {
        let store = revocations.open().await;
        store.revoke("alice", now - 5).await.expect("revoke");
        store.revoke("bob", now).await.expect("revoke");
    }
    let reopened = revocations.open().await;
    assert_eq!(reopened.revoked_before("alice").await.expect("read"), Some(now - 5));
    assert_eq!(reopened.revoked_before("bob").await.expect("read"), Some(now));
    assert_eq!(reopened.revoked_before("carol").await.expect("read"), None);
    reopened.revoke("carol", now).await.expect("revoke after the restart");
    let again = revocations.open().await;
    assert_eq!(again.revoked_before("carol").await.expect("read"), Some(now));
    assert_eq!(again.revoked_before("alice").await.expect("read"), Some(now - 5), "earlier entries kept");
}

// ---------------------------------------------------------------------------------------------------------------
// Redis restarts (Redis driver only: the embedded drivers live and die with the process)

/// Runs `openssl` with `args` in `directory`; panics with its output when it fails.
fn openssl(directory: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(directory)
        .output()
        .unwrap_or_else(|error| panic!("cannot run openssl ({error}); install it (`apt-get install -y openssl`)"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA of the test's own, and a server certificate it signs for 127.0.0.1 and localhost (P-256 keys, one day), in
/// a temporary directory: `ca.crt`, `server.crt`, `server.key`.
struct OwnCa {
    directory: tempfile::TempDir,
}

impl OwnCa {
    fn new(name: &str) -> Self {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path();
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let subject = format!("/CN={name}");
        let mut ca = vec!["req", "-x509", "-days", "1", "-subj", &subject, "-keyout", "ca.key", "-out", "ca.crt"];
        ca.extend(key);
        openssl(path, &ca);
        let mut request = vec!["req", "-subj", "/CN=redis", "-keyout", "server.key", "-out", "server.csr"];
        request.extend(key);
        openssl(path, &request);
        std::fs::write(
            path.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions");
        openssl(
            path,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                "server.crt",
                "-extfile",
                "server.ext",
            ],
        );
        Self { directory }
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.directory.path().join(name)
    }
}

/// The ACL user and password of [`OwnRedis`].
const OWN_USER: (&str, &str) = ("parley-test", "own-redis-secret");

/// A `redis-server` of this test's own, on a fixed loopback port, that can be killed and started again: TLS only
/// (its own CA), the `default` user off and one ACL user ([`OWN_USER`]).
struct OwnRedis {
    port: u16,
    ca: OwnCa,
    directory: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// `None` when engine tests are skipped.
    async fn start() -> Option<Self> {
        // The full test command installs redis-server with the other engines.
        parley_test_support::engine(parley_test_support::Engine::Redis)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let mut redis = Self {
            port,
            ca: OwnCa::new("parley test own-redis CA"),
            directory: tempfile::tempdir().expect("temporary directory"),
            child: None,
        };
        redis.launch().await;
        Some(redis)
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A configuration that reaches it (its CA, its user), with its own prefix.
    fn config(&self) -> RedisConfig {
        RedisConfig::new(self.url())
            .with_prefix(unique_prefix())
            .with_credentials(Some(OWN_USER.0.to_owned()), Some(OWN_USER.1.to_owned()))
            .with_tls_ca_file(self.ca.file("ca.crt"))
    }

    async fn launch(&mut self) {
        let password = format!(">{}", OWN_USER.1);
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(self.ca.file("server.crt"))
            .arg("--tls-key-file")
            .arg(self.ca.file("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(self.ca.file("ca.crt"))
            .args(["--user", "default", "off", "--user", OWN_USER.0, "on", &password, "~*", "&*", "+@all"])
            .arg("--dir")
            .arg(self.directory.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run redis-server ({error}); install it with `STACK_ONLY=redis bash e2e/stack/install.sh` \
                     (or `apt-get install -y redis-server`)"
                )
            });
        self.child = Some(child);
        let config = self.config();
        let what = format!("redis-server on port {} to answer PING over TLS as {}", self.port, OWN_USER.0);
        parley_test_support::eventually(&what, Duration::from_secs(30), || async { config.check().await.ok() }).await;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }
}

fn restart_config(redis: &OwnRedis) -> RedisConfig {
    let mut config = redis.config();
    config.timeout = Duration::from_millis(500);
    config.reconnect_max = Duration::from_millis(300);
    config.health_check = Duration::from_millis(500);
    config
}

/// Publishes `payload` on `topic` until the subscriber gets it (publications during a re-connection are lost),
/// within 20 s.
async fn publish_until_received(bus: &RedisPubSub, deliveries: &mut mpsc::Receiver<Delivery>, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut attempt = 0u32;
    while tokio::time::Instant::now() < deadline {
        attempt += 1;
        let payload = Bytes::from(format!("{topic}-{attempt}"));
        if bus.publish(topic, payload.clone()).await.is_ok() {
            if let Ok(Some((got, body))) = tokio::time::timeout(Duration::from_millis(300), deliveries.recv()).await {
                if &*got == topic && body.starts_with(topic.as_bytes()) {
                    return;
                }
            }
        } else {
            // The retry interval while Redis is still down (the loop ends at the first delivery or the deadline).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("the subscriber did not receive {topic} within 20 s after Redis restarted");
}

mod redis_restart {
    use super::*;

    /// After Redis restarts, the subscriber re-connects and re-subscribes every topic it holds, including one
    /// added while Redis was down, and publishing works again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pubsub_resubscribes() {
        let Some(mut redis) = OwnRedis::start().await else { return };
        let bus = RedisPubSub::connect(restart_config(&redis)).await.expect("connect");
        let (sink, mut deliveries) = mpsc::channel(1_024);
        let subscription = bus.open(sink);
        subscription.subscribe(vec!["ch:one".into(), "ch:two".into()]).await.expect("subscribe");
        bus.publish("ch:one", Bytes::from("before")).await.expect("publish");
        assert_eq!(next(&mut deliveries).await, ("ch:one".to_owned(), Bytes::from("before")));

        redis.kill().await;
        assert!(bus.publish("ch:one", Bytes::from("lost")).await.is_err(), "no false success while Redis is down");
        // Held even though Redis is down: it is subscribed once the connection is back.
        let _ = subscription.subscribe(vec!["ch:three".into()]).await;
        redis.launch().await;

        publish_until_received(&bus, &mut deliveries, "ch:one").await;
        for topic in ["ch:two", "ch:three"] {
            bus.publish(topic, Bytes::from(topic)).await.expect("publish after restart");
            assert_eq!(next(&mut deliveries).await, (topic.to_owned(), Bytes::from(topic)));
        }
        assert!(bus.reconnects() >= 1, "the subscriber re-connected");

        // A second restart, with no traffic meanwhile: the health check notices.
        redis.restart().await;
        publish_until_received(&bus, &mut deliveries, "ch:two").await;
        subscription.unsubscribe(vec!["ch:one".into()]).await.expect("unsubscribe");
        bus.publish("ch:one", Bytes::from("x")).await.expect("publish");
        bus.publish("ch:three", Bytes::from("y")).await.expect("publish");
        assert_eq!(next(&mut deliveries).await, ("ch:three".to_owned(), Bytes::from("y")));
    }

    /// After Redis restarts empty, the instance's renewal is refused (its lease is gone), it registers again and
    /// records its connections again; nothing of before the restart comes back by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn presence_recovers() {
        let Some(mut redis) = OwnRedis::start().await else { return };
        let store = RedisPresenceStore::connect(restart_config(&redis)).await.expect("connect");
        let epoch = store.register_instance("gw-a", LONG).await.expect("register").epoch;
        store.connect("alice", "gw-a", epoch).await.expect("live");

        redis.restart().await;
        // Until Redis answers again, a renewal fails as a backend error; then it is answered (refused).
        let refused =
            parley_test_support::eventually("Redis to answer the renewal", Duration::from_secs(30), || async {
                match store.renew("gw-a", epoch, LONG).await {
                    Err(PresenceError::Backend(_)) => None,
                    other => Some(other),
                }
            })
            .await;
        assert!(matches!(refused, Err(PresenceError::Fenced(_))), "{refused:?}");
        let users = users(&["alice"]);
        assert_eq!(summary(&store.views(&users).await.expect("views")), vec![("alice", Status::Offline)]);
        let again = store.register_instance("gw-a", LONG).await.expect("register").epoch;
        store.connect("alice", "gw-a", again).await.expect("live");
        assert_eq!(summary(&store.views(&users).await.expect("views")), vec![("alice", Status::Online)]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Set-up failures (Redis driver only): each ends `connect` at once with an error naming Redis, the node and the cause

mod redis_setup {
    use super::*;
    use parley_bus::redis::RedisSetupError;
    use std::time::Instant;

    /// The environment's Redis (standalone or cluster), which the test stack runs with TLS and an ACL user.
    fn stack_config(engine: Engine) -> Option<RedisConfig> {
        let mut config = redis_config(engine)?;
        assert!(
            config.is_tls() && config.password.is_some() && config.tls_ca_file.is_some(),
            "the test stack's Redis speaks TLS and wants a password (e2e/stack/up.sh writes PARLEY_REDIS_URL=rediss://..., \
             PARLEY_REDIS_PASSWORD and PARLEY_REDIS_TLS_CA_FILE); got {config:?}"
        );
        config.timeout = Duration::from_secs(5);
        Some(config)
    }

    /// Checks and connects every driver with `config`: each must fail before the timeout with a message holding
    /// every one of `expected`. Returns the check's error.
    async fn refused(config: RedisConfig, expected: &[&str]) -> RedisSetupError {
        let timeout = config.timeout;
        let assert_message = |message: String, took: Duration, what: &str| {
            for wanted in expected {
                assert!(message.contains(wanted), "{what}: {message:?} does not say {wanted:?}");
            }
            assert!(took < timeout, "{what} took {took:?}, not less than the timeout {timeout:?}: {message}");
        };
        let started = Instant::now();
        let error = config.check().await.expect_err("the check refuses the settings");
        assert_message(error.to_string(), started.elapsed(), "the check");

        let started = Instant::now();
        let result = RedisPubSub::connect(config.clone()).await.map(drop);
        assert_message(result.expect_err("refused").to_string(), started.elapsed(), "pub/sub connect");
        let started = Instant::now();
        let result = RedisPresenceStore::connect(config.clone()).await.map(drop);
        assert_message(result.expect_err("refused").to_string(), started.elapsed(), "presence connect");
        let started = Instant::now();
        let result = RedisRevocationStore::connect(config, LONG).await.map(drop);
        assert_message(result.expect_err("refused").to_string(), started.elapsed(), "revocations connect");
        error
    }

    async fn a_wrong_password_fails_fast_with_a_clear_error(engine: Engine) {
        let Some(config) = stack_config(engine) else { return };
        let node = config.nodes()[0].to_owned();
        let wrong = config.clone().with_credentials(config.username.clone(), Some("not-the-password".into()));
        let error = refused(wrong, &[&format!("Redis at {node}: authentication failed (WRONGPASS")]).await;
        assert!(matches!(error, RedisSetupError::Authentication { .. }), "{error:?}");

        // No credentials at all, with the `default` user off: the server asks for them, and the message says how.
        let none = config.clone().with_credentials(None, None);
        let error =
            refused(none, &[&format!("Redis at {node}: authentication failed (NOAUTH"), "--redis-password"]).await;
        assert!(matches!(error, RedisSetupError::Authentication { .. }), "{error:?}");

        // The right ones pass.
        config.check().await.expect("the environment's settings pass the check");
    }

    async fn a_certificate_from_another_ca_fails_fast_with_a_clear_error(engine: Engine) {
        let Some(config) = stack_config(engine) else { return };
        let node = config.nodes()[0].to_owned();
        let other = OwnCa::new("parley test other CA");
        let error = refused(
            config.clone().with_tls_ca_file(other.file("ca.crt")),
            &[&format!("Redis at {node}: TLS handshake failed: "), "certificate", "UnknownIssuer"],
        )
        .await;
        assert!(matches!(error, RedisSetupError::Tls { .. }), "{error:?}");
        assert!(error.to_string().contains(&other.file("ca.crt").display().to_string()), "names the CA file: {error}");
    }

    async fn rediss_without_a_ca_file_trusts_the_system_roots_only(engine: Engine) {
        let Some(mut config) = stack_config(engine) else { return };
        let node = config.nodes()[0].to_owned();
        config.tls_ca_file = None;
        let error = refused(
            config,
            &[&format!("Redis at {node}: TLS handshake failed: "), "certificate", "system's root certificates"],
        )
        .await;
        assert!(matches!(error, RedisSetupError::Tls { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_wrong_password_fails_fast_with_a_clear_error_standalone() {
        a_wrong_password_fails_fast_with_a_clear_error(Engine::Redis).await;
    }

    #[tokio::test]
    async fn a_wrong_password_fails_fast_with_a_clear_error_cluster() {
        a_wrong_password_fails_fast_with_a_clear_error(Engine::RedisCluster).await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_fast_with_a_clear_error_standalone() {
        a_certificate_from_another_ca_fails_fast_with_a_clear_error(Engine::Redis).await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_fast_with_a_clear_error_cluster() {
        a_certificate_from_another_ca_fails_fast_with_a_clear_error(Engine::RedisCluster).await;
    }

    #[tokio::test]
    async fn rediss_without_a_ca_file_trusts_the_system_roots_only_standalone() {
        rediss_without_a_ca_file_trusts_the_system_roots_only(Engine::Redis).await;
    }

    #[tokio::test]
    async fn rediss_without_a_ca_file_trusts_the_system_roots_only_cluster() {
        rediss_without_a_ca_file_trusts_the_system_roots_only(Engine::RedisCluster).await;
    }
}
