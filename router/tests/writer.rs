//! The single writer against the embedded driver: durable-before-confirm, no gap after a failed write,
//! idempotency, membership rules, and publication order.

use async_trait::async_trait;
use parley_core::protocol::MessageView;
use parley_core::UserId;
use parley_router::backend::{HistoryQuery, MessageLog, PriorSend};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::pubsub::{channel_topic, Event, LocalPubSub, PubSub};
use parley_router::{BackendError, Router, RouterConfig, RouterError};
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
        Router::start(RouterConfig::default(), log.clone(), shared.clone(), shared, bus).expect("router");
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
        Router::start(config, store.clone(), store.clone(), store.clone(), Arc::new(LocalPubSub::new()))
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
