//! The single writer against the embedded driver: durable-before-confirm, no gap after a failed write,
//! idempotency, membership rules, and publication order.

use async_trait::async_trait;
use parley_api::{BackendError, RouterError};
use parley_bus::pubsub::{channel_topic, Event, LocalPubSub, PubSub};
use parley_core::protocol::MessageView;
use parley_core::UserId;
use parley_router::backend::{HistoryQuery, MessageLog, PriorSend};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::RouterConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A log that fails on demand, standing for a disk or broker outage.
struct FlakyLog {
    inner: EmbeddedStore,
    failing: AtomicBool,
}

#[async_trait]
impl MessageLog for FlakyLog {
    async fn append(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable("disk unplugged".into()));
        }
        self.inner.append(batch).await
    }
    async fn last_seq(&self, channel: &str) -> Result<u64, BackendError> {
        self.inner.last_seq(channel).await
    }
    async fn find_sends(&self, keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        self.inner.find_sends(keys).await
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user")
}

#[tokio::test]
async fn a_failed_write_confirms_nothing_and_leaves_no_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("store");
    let log = Arc::new(FlakyLog { inner: store.clone(), failing: AtomicBool::new(false) });
    let shared = Arc::new(store);
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(64);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![channel_topic("g:room")]).await.expect("subscribe");
    let (router, _writer) =
        parley_router::start(RouterConfig::default(), log.clone(), shared.clone(), shared, bus).expect("router");
    let alice = user("alice");
    router.create_channel(&alice, "room", &[]).await.expect("create");

    let first = router.send(&alice, "g:room", "a", "one").await.expect("durable");
    assert_eq!(first.placement.seq, 1);
    log.failing.store(true, Ordering::SeqCst);
    let failed = router.send(&alice, "g:room", "b", "two").await;
    assert!(matches!(failed, Err(RouterError::Unavailable(_))), "{failed:?}");
    log.failing.store(false, Ordering::SeqCst);
    let retried = router.send(&alice, "g:room", "b", "two").await.expect("durable after recovery");
    assert_eq!(retried.placement.seq, 2, "the failed attempt left no gap");
    assert!(!retried.duplicate, "the failed attempt was never written");

    // Only durable messages were published, in order.
    let mut seqs = Vec::new();
    while let Ok((_, payload)) = published.try_recv() {
        if let Some(Event::Message { frame, .. }) = Event::decode(&payload) {
            let message: serde_json::Value = serde_json::from_slice(&frame).expect("json");
            seqs.push(message["seq"].as_u64().unwrap_or(0));
        }
    }
    assert_eq!(seqs, vec![1, 2]);
    let page =
        router.history(&alice, "g:room", HistoryQuery { limit: 10, ..Default::default() }).await.expect("history");
    assert_eq!(page.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["one", "two"]);
}

#[tokio::test]
async fn membership_limits_and_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let config = RouterConfig { max_channel_members: 3, ..RouterConfig::default() };
    let (router, _writer) =
        parley_router::start(config, store.clone(), store.clone(), store.clone(), Arc::new(LocalPubSub::new()))
            .expect("router");
    let owner = user("owner");
    let created =
        router.create_channel(&owner, "small", &["a".into(), "a".into(), "owner".into()]).await.expect("create");
    assert_eq!(created.members, 2, "duplicates collapse");
    router.join(&user("b"), "g:small").await.expect("third member");
    let full = router.join(&user("c"), "g:small").await;
    assert!(matches!(full, Err(RouterError::TooManyMembers { limit: 3, .. })), "{full:?}");
    let again = router.join(&user("b"), "g:small").await.expect("joining twice is a no-op");
    assert_eq!(again.members, 3);
    let too_many = router.create_channel(&owner, "big", &["a".into(), "b".into(), "c".into()]).await;
    assert!(matches!(too_many, Err(RouterError::TooManyMembers { .. })), "{too_many:?}");
    assert!(matches!(router.join(&owner, "dm:a:b").await, Err(RouterError::InvalidArgument(_))));
    let dm = router.open_dm(&owner, "zed").await.expect("dm");
    assert_eq!((dm.id.as_str(), dm.name.as_str(), dm.members), ("dm:owner:zed", "zed", 2));
    // A send to a DM nobody opened creates it.
    let sent = router.send(&user("p"), "dm:p:q", "1", "hi").await.expect("send to a fresh DM");
    assert_eq!(sent.placement.seq, 1);
    let listed = router.list_channels(&user("q")).await.expect("list");
    assert_eq!(listed.iter().map(|view| view.id.as_str()).collect::<Vec<_>>(), vec!["dm:p:q"]);
    assert_eq!(listed[0].last_seq, 1);
}

/// Drains what a subscriber received so far, as (topic, event).
async fn received(published: &mut mpsc::Receiver<parley_bus::pubsub::Delivery>) -> Vec<(String, Event)> {
    // Publications of the in-process bus are queued before `publish` returns.
    tokio::task::yield_now().await;
    let mut out = Vec::new();
    while let Ok((topic, payload)) = published.try_recv() {
        out.push((topic.to_string(), Event::decode(&payload).expect("decodable")));
    }
    out
}

#[tokio::test]
async fn membership_changes_go_straight_to_the_gateways_holding_the_user() {
    use parley_bus::presence::{EmbeddedPresenceStore, PresenceStore};
    use parley_bus::pubsub::{gateway_topic, ControlEvent, ALL_GATEWAYS_TOPIC};
    use parley_router::LocalRouter;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let shared = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(64);
    let subscription = bus.open(sink);
    let direct = vec![gateway_topic("gw-a"), gateway_topic("gw-b"), ALL_GATEWAYS_TOPIC.to_owned()];
    subscription.subscribe(direct).await.expect("subscribe");
    // The registry: alice is connected on gw-a and gw-b, bob on gw-b, carol nowhere.
    let registry = Arc::new(EmbeddedPresenceStore::new());
    let lease = Duration::from_secs(60);
    let a = registry.register_instance("gw-a", lease).await.expect("register").epoch;
    let b = registry.register_instance("gw-b", lease).await.expect("register").epoch;
    registry.connect("alice", "gw-a", a).await.expect("connect");
    registry.connect("alice", "gw-b", b).await.expect("connect");
    registry.connect("bob", "gw-b", b).await.expect("connect");
    let (router, _writer) = LocalRouter::start_full(
        RouterConfig::default(),
        shared.clone(),
        shared.clone(),
        shared,
        bus,
        None,
        Some(registry as Arc<dyn PresenceStore>),
    )
    .expect("router");

    router.create_channel(&user("alice"), "room", &["bob".into(), "carol".into()]).await.expect("create");
    let mut direct: Vec<(String, String)> = received(&mut published)
        .await
        .into_iter()
        .filter_map(|(topic, event)| match event {
            Event::Control(ControlEvent::Membership { user, channel, joined: true }) if channel == "g:room" => {
                Some((topic, user))
            }
            _ => None,
        })
        .collect();
    direct.sort();
    let expected: Vec<(String, String)> = [("gw:gw-a", "alice"), ("gw:gw-b", "alice"), ("gw:gw-b", "bob")]
        .into_iter()
        .map(|(topic, user)| (topic.to_owned(), user.to_owned()))
        .collect();
    // Carol has no connection: there is no gateway to tell, and nothing goes to every gateway.
    assert_eq!(direct, expected);
}

#[tokio::test]
async fn without_a_registry_membership_changes_reach_every_gateway() {
    use parley_bus::pubsub::{ControlEvent, ALL_GATEWAYS_TOPIC};

    let dir = tempfile::tempdir().expect("tempdir");
    let shared = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(64);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![ALL_GATEWAYS_TOPIC.to_owned()]).await.expect("subscribe");
    let (router, _writer) =
        parley_router::start(RouterConfig::default(), shared.clone(), shared.clone(), shared, bus).expect("router");
    router.create_channel(&user("alice"), "room", &["bob".into()]).await.expect("create");
    let mut users: Vec<String> = received(&mut published)
        .await
        .into_iter()
        .filter_map(|(topic, event)| match event {
            Event::Control(ControlEvent::Membership { user, .. }) if topic == ALL_GATEWAYS_TOPIC => Some(user),
            _ => None,
        })
        .collect();
    users.sort();
    assert_eq!(users, vec!["alice".to_owned(), "bob".to_owned()]);
}

/// A log whose idempotency lookups fail (its store is down), counting them.
struct NoLookups {
    inner: EmbeddedStore,
    lookups: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl MessageLog for NoLookups {
    async fn append(&self, batch: Vec<MessageView>) -> Result<(), BackendError> {
        self.inner.append(batch).await
    }
    async fn last_seq(&self, channel: &str) -> Result<u64, BackendError> {
        self.inner.last_seq(channel).await
    }
    async fn find_sends(&self, _keys: Vec<(String, String)>) -> Result<Vec<Option<PriorSend>>, BackendError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        Err(BackendError::Unavailable("message store down".into()))
    }
}

#[tokio::test]
async fn a_first_attempt_never_looks_for_an_earlier_send_and_a_possible_retry_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("store");
    let log = Arc::new(NoLookups { inner: store.clone(), lookups: Default::default() });
    let shared = Arc::new(store);
    let (router, _writer) = parley_router::start(
        RouterConfig::default(),
        log.clone(),
        shared.clone(),
        shared,
        Arc::new(LocalPubSub::new()),
    )
    .expect("router");
    let alice = user("alice");
    router.create_channel(&alice, "room", &[]).await.expect("create");

    let first = router.send_attempt(&alice, "g:room", "a", "one", true).await.expect("no lookup needed");
    assert_eq!(first.placement.seq, 1);
    assert_eq!(log.lookups.load(Ordering::SeqCst), 0);
    // A send that may be a retry needs the lookup; with the store down it is refused, and confirms nothing.
    let retry = router.send(&alice, "g:room", "b", "two").await;
    assert!(matches!(retry, Err(RouterError::Unavailable(_))), "{retry:?}");
    assert_eq!(log.lookups.load(Ordering::SeqCst), 1);
    // Nothing was skipped: the next first attempt takes the next sequence.
    let next = router.send_attempt(&alice, "g:room", "c", "three", true).await.expect("confirmed");
    assert_eq!(next.placement.seq, 2);
}

#[tokio::test]
async fn large_channels_are_fanned_out_on_read_with_one_notice_per_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(1024);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![channel_topic("g:hall")]).await.expect("subscribe");
    let config = RouterConfig { fanout_threshold: 3, ..RouterConfig::default() };
    let (router, _writer) = parley_router::start(config, store.clone(), store.clone(), store, bus).expect("router");
    let alice = user("alice");
    router.create_channel(&alice, "hall", &["bob".to_owned()]).await.expect("create");
    let _ = received(&mut published).await;

    // Small (2 members): every message is published.
    router.send(&alice, "g:hall", "s1", "small").await.expect("durable");
    let events = received(&mut published).await;
    assert!(matches!(events.as_slice(), [(_, Event::Message { seq: 1, .. })]), "{events:?}");

    // Large (4 members): a burst of concurrent sends is announced with one notice per batch, never pushed.
    router.join(&user("carol"), "g:hall").await.expect("join");
    router.join(&user("dave"), "g:hall").await.expect("join");
    let _ = received(&mut published).await;
    let sends = (0..40).map(|n| {
        let router = router.clone();
        let alice = alice.clone();
        async move { router.send(&alice, "g:hall", &format!("l{n}"), "large").await.expect("durable") }
    });
    futures_util::future::join_all(sends).await;
    let events = received(&mut published).await;
    let mut announced = Vec::new();
    for (_, event) in &events {
        match event {
            Event::Feed { first, last } => announced.extend(*first..=*last),
            other => panic!("a large channel's message was pushed: {other:?}"),
        }
    }
    assert_eq!(announced, (2..=41).collect::<Vec<_>>(), "each sequence announced once, in order");
    assert!(events.len() < 40, "notices cover batches ({} for 40 sends)", events.len());
    let stats = router.stats();
    assert_eq!(stats.feed_messages.load(Ordering::Relaxed), 40);

    // The feed answers from memory, in pages.
    let page = router.feed("g:hall", 1, 30).await.expect("feed");
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (2..=31).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = router.feed("g:hall", 31, 200).await.expect("feed");
    assert_eq!(page.messages.len(), 10);
    assert!(!page.has_more);
    assert_eq!(stats.feed_reads.load(Ordering::Relaxed), 2);
    // What the feed does not hold (1 was pushed) comes from the store.
    let page = router.feed("g:hall", 0, 5).await.expect("feed");
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(stats.feed_store_reads.load(Ordering::Relaxed), 1);
    assert!(matches!(router.feed("g:hall", 0, 0).await, Err(RouterError::InvalidArgument(_))));

    // Back to 3 members: pushed again, and the feed is dropped.
    router.leave(&user("dave"), "g:hall").await.expect("leave");
    let _ = received(&mut published).await;
    router.send(&alice, "g:hall", "s2", "small again").await.expect("durable");
    let events = received(&mut published).await;
    assert!(matches!(events.as_slice(), [(_, Event::Message { seq: 42, .. })]), "{events:?}");
    router.feed("g:hall", 41, 10).await.expect("feed");
    assert_eq!(stats.feed_store_reads.load(Ordering::Relaxed), 2, "no feed kept for a small channel");
}

/// A membership store whose large writes (more than 100 changes) wait until released, and then succeed or fail:
/// it stands for a slow store (10,000 rows to Cassandra) under a large channel's creation.
struct GatedMembership {
    inner: EmbeddedStore,
    release: tokio::sync::Semaphore,
    fail: AtomicBool,
    started: tokio::sync::Notify,
}

#[async_trait]
impl parley_router::backend::MembershipStore for GatedMembership {
    async fn channel(&self, channel: &str) -> Result<Option<parley_router::backend::ChannelRecord>, BackendError> {
        self.inner.channel(channel).await
    }
    async fn members(&self, channel: &str) -> Result<Vec<String>, BackendError> {
        self.inner.members(channel).await
    }
    async fn is_member(&self, channel: &str, user: &str) -> Result<bool, BackendError> {
        self.inner.is_member(channel, user).await
    }
    async fn user_channels(&self, user: &str) -> Result<Vec<String>, BackendError> {
        self.inner.user_channels(user).await
    }
    async fn set_read(&self, user: &str, channel: &str, seq: u64) -> Result<u64, BackendError> {
        self.inner.set_read(user, channel, seq).await
    }
    async fn read_seq(&self, user: &str, channel: &str) -> Result<u64, BackendError> {
        self.inner.read_seq(user, channel).await
    }
    async fn access(&self, channel: &str) -> Result<Vec<(String, parley_core::access::Access)>, BackendError> {
        self.inner.access(channel).await
    }
    async fn access_of(&self, channel: &str, user: &str) -> Result<Option<parley_core::access::Access>, BackendError> {
        self.inner.access_of(channel, user).await
    }
    async fn blocked(&self, user: &str) -> Result<Vec<String>, BackendError> {
        self.inner.blocked(user).await
    }
    async fn apply(&self, changes: Vec<parley_router::backend::MembershipChange>) -> Result<(), BackendError> {
        if changes.len() > 100 {
            self.started.notify_one();
            let _permit = self.release.acquire().await.map_err(|_| BackendError::Unavailable("closed".into()))?;
            if self.fail.load(Ordering::SeqCst) {
                return Err(BackendError::Unavailable("store unplugged".into()));
            }
        }
        self.inner.apply(changes).await
    }
    async fn move_home(
        &self,
        channel: &str,
        from: &parley_router::backend::Home,
        to: &parley_router::backend::Home,
        failover: bool,
    ) -> Result<bool, BackendError> {
        self.inner.move_home(channel, from, to, failover).await
    }
}

/// The writer on a gated membership store, with one small channel `g:small` of `alice` ready.
async fn gated_writer(fail: bool) -> (tempfile::TempDir, Arc<GatedMembership>, parley_api::Router) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), Retention::default()).expect("store");
    let membership = Arc::new(GatedMembership {
        inner: store.clone(),
        release: tokio::sync::Semaphore::new(0),
        fail: AtomicBool::new(fail),
        started: tokio::sync::Notify::new(),
    });
    let shared = Arc::new(store);
    let (router, _writer) = parley_router::start(
        RouterConfig::default(),
        shared.clone(),
        shared,
        membership.clone(),
        Arc::new(LocalPubSub::new()),
    )
    .expect("router");
    router.create_channel(&user("alice"), "small", &["bob".into()]).await.expect("small channel");
    (dir, membership, router)
}

#[tokio::test]
async fn a_large_membership_write_holds_only_the_sends_of_its_own_channel() {
    let (_dir, membership, router) = gated_writer(false).await;
    let owner = user("owner");
    let members: Vec<String> = (0..5_000).map(|n| format!("member{n}")).collect();
    let creating = tokio::spawn({
        let (router, owner) = (router.clone(), owner.clone());
        async move { router.create_channel(&owner, "large", &members).await }
    });
    membership.started.notified().await;
    // The large write is in flight: a send to the large channel waits for it...
    let held = tokio::spawn({
        let (router, owner) = (router.clone(), owner.clone());
        async move { router.send(&owner, "g:large", "first", "into the large channel").await }
    });
    // ...while sends to other channels go through, one after another, without it.
    // (Bounded only to fail instead of hanging: a writer that waited for the large write would never answer.)
    for n in 0..20 {
        let (alice, key) = (user("alice"), format!("s{n}"));
        let send = router.send(&alice, "g:small", &key, "meanwhile");
        let sent = tokio::time::timeout(std::time::Duration::from_secs(30), send)
            .await
            .expect("a send to another channel is not held behind the large write")
            .expect("durable");
        assert_eq!(sent.placement.seq, n + 1);
    }
    assert!(!creating.is_finished(), "the creation is still being written");
    assert!(!held.is_finished(), "the send to the channel being written waits for it");
    membership.release.add_permits(1);
    let created = creating.await.expect("task").expect("created once written");
    assert_eq!(created.members, 5_001);
    let sent = held.await.expect("task").expect("decided once the channel is written");
    assert_eq!(sent.placement.seq, 1);
}

#[tokio::test]
async fn sends_held_behind_a_failed_membership_write_are_refused_and_nothing_is_applied() {
    let (_dir, membership, router) = gated_writer(true).await;
    let owner = user("owner");
    let members: Vec<String> = (0..500).map(|n| format!("member{n}")).collect();
    let creating = tokio::spawn({
        let (router, owner) = (router.clone(), owner.clone());
        async move { router.create_channel(&owner, "large", &members).await }
    });
    membership.started.notified().await;
    let held = tokio::spawn({
        let (router, owner) = (router.clone(), owner.clone());
        async move { router.send(&owner, "g:large", "first", "into a channel that will not exist").await }
    });
    router.send(&user("alice"), "g:small", "s", "meanwhile").await.expect("not held");
    membership.release.add_permits(1);
    let created = creating.await.expect("task");
    assert!(matches!(created, Err(RouterError::Unavailable(_))), "{created:?}");
    let sent = held.await.expect("task");
    assert!(matches!(sent, Err(RouterError::NoSuchChannel(_))), "{sent:?}");
    // Nothing of the failed run is left: the name is free, and a second try creates it.
    membership.fail.store(false, Ordering::SeqCst);
    membership.release.add_permits(1);
    let members: Vec<String> = (0..500).map(|n| format!("member{n}")).collect();
    let again = router.create_channel(&owner, "large", &members).await.expect("created on the second try");
    assert_eq!(again.members, 501);
}

#[tokio::test]
async fn a_key_reused_as_a_first_attempt_keeps_naming_its_first_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let (router, _writer) = parley_router::start(
        RouterConfig::default(),
        store.clone(),
        store.clone(),
        store,
        Arc::new(LocalPubSub::new()),
    )
    .expect("router");
    let alice = user("alice");
    router.create_channel(&alice, "room", &[]).await.expect("create");
    let first = router.send_attempt(&alice, "g:room", "k", "one", true).await.expect("first");
    // A misbehaving client says "first attempt" again with a used key: it costs itself a second message...
    let again = router.send_attempt(&alice, "g:room", "k", "one again", true).await.expect("second");
    assert_eq!((first.placement.seq, again.placement.seq), (1, 2));
    // ...but the key still names the first message: an honest retry gets it back.
    let retry = router.send_attempt(&alice, "g:room", "k", "one", false).await.expect("retry");
    assert_eq!((retry.placement.seq, retry.duplicate), (1, true), "{retry:?}");
}
