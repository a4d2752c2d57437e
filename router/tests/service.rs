//! The router's internal API over a real socket: a `RemoteRouter` gets the same answers and the same error codes
//! as the in-process writer, and a wrong token or a dead router is `unavailable`, never a false confirmation.

use parley_api::MAX_PRESENCE_BATCH;
use parley_api::{RemoteRouter, Router, RouterError};
use parley_bus::pubsub::LocalPubSub;
use parley_core::presence::Status;
use parley_core::protocol::ErrorCode;
use parley_core::UserId;
use parley_router::backend::{HistoryQuery, PresenceUpdate};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::RouterConfig;
use std::sync::Arc;
use std::time::Duration;

fn user(name: &str) -> UserId {
    UserId::new(name.to_owned()).expect("user id")
}

async fn serve(token: Option<&str>) -> (std::net::SocketAddr, tempfile::TempDir, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), Retention::default()).expect("store"));
    let config = RouterConfig { max_text_bytes: 64, ..RouterConfig::default() };
    let (router, _writer) =
        parley_router::start(config, store.clone(), store.clone(), store, Arc::new(LocalPubSub::new()))
            .expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let app = parley_router::service::app(router, token.map(str::to_owned));
    // TCP_NODELAY, as `parley-router` sets it: besides the latency, a Nagle delay is invisible to tokio's paused
    // clock, which would jump to the next timer (the call timeout) meanwhile.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        let _ = stream.set_nodelay(true);
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, dir, server)
}

#[tokio::test]
async fn a_remote_router_answers_like_the_local_one() {
    let (address, _dir, _server) = serve(Some("secret")).await;
    let base = format!("http://{address}");
    let remote: Router =
        RemoteRouter::connect(&base, Some("secret".into()), Duration::from_secs(5)).await.expect("connects").into();
    assert!(remote.is_remote());
    assert_eq!(remote.limits().max_text_bytes, 64, "the router's limits travel to the gateway");

    let alice = user("alice");
    let bob = user("bob");
    let created = remote.create_channel(&alice, "room", &["bob".into()]).await.expect("create");
    assert_eq!((created.id.as_str(), created.members), ("g:room", 2));
    let first = remote.send(&alice, "g:room", "m1", "hello").await.expect("send");
    let again = remote.send(&alice, "g:room", "m1", "hello").await.expect("retry");
    assert_eq!(first.placement, again.placement, "idempotent across the wire");
    assert!(again.duplicate);
    let second = remote.send(&bob, "g:room", "m2", "hi").await.expect("send");
    assert_eq!(second.placement.seq, 2);

    let page = remote.history(&bob, "g:room", HistoryQuery { limit: 10, ..Default::default() }).await.expect("page");
    assert_eq!(page.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["hello", "hi"]);
    assert_eq!(remote.mark_read(&bob, "g:room", 99).await.expect("read"), 2, "clamped to the last sequence");
    let views = remote.list_channels(&bob).await.expect("list");
    assert_eq!((views.len(), views[0].read_seq, views[0].unread), (1, 2, 0));
    assert_eq!(remote.members(&alice, "g:room").await.expect("members").len(), 2);
    assert_eq!(remote.first_retained_seq("g:room").await.expect("floor"), 1);
    let dm = remote.open_dm(&alice, "carol").await.expect("dm");
    assert_eq!(dm.id, "dm:alice:carol");

    // Refusals keep their stable codes.
    let outsider = remote.send(&user("mallory"), "g:room", "x", "hi").await.expect_err("not a member");
    assert_eq!(outsider.code(), ErrorCode::NotAMember, "{outsider}");
    let too_long = remote.send(&alice, "g:room", "y", &"x".repeat(65)).await.expect_err("too long");
    assert_eq!(too_long.code(), ErrorCode::TextTooLong, "{too_long}");
    let exists = remote.create_channel(&bob, "room", &[]).await.expect_err("exists");
    assert_eq!(exists.code(), ErrorCode::ChannelExists, "{exists}");
    let bad = remote.join(&alice, "nonsense").await.expect_err("bad id");
    assert_eq!(bad.code(), ErrorCode::InvalidArgument, "{bad}");

    // A gateway's presence changes: taken in one call (the embedded log has nothing to add to them); a batch
    // with a bad user, no instance, or too many changes is refused whole.
    let change = |user: &str, instance: &str| PresenceUpdate {
        user: user.to_owned(),
        status: Status::Online,
        last_seen: 1,
        instance: instance.to_owned(),
        at: 2,
    };
    remote.record_presence(vec![change("alice", "gw-1"), change("bob", "gw-1")]).await.expect("presence");
    remote.record_presence(Vec::new()).await.expect("an empty batch");
    for refused in [
        vec![change("alice", "gw-1"), change("no such user!", "gw-1")],
        vec![change("alice", "")],
        vec![change("alice", "gw-1"); MAX_PRESENCE_BATCH + 1],
    ] {
        let error = remote.record_presence(refused).await.expect_err("refused");
        assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    }
}

// On tokio's paused clock: "fails fast" is measured in tokio time, so it holds however loaded the machine is, and
// a call that waited for its 5 s timeout would still fail the bound.
#[tokio::test(start_paused = true)]
async fn a_wrong_token_or_a_dead_router_is_unavailable() {
    let (address, _dir, server) = serve(Some("secret")).await;
    let base = format!("http://{address}");
    let refused = RemoteRouter::connect(&base, Some("wrong".into()), Duration::from_secs(5)).await;
    assert!(matches!(refused, Err(RouterError::Unavailable(_))), "{refused:?}");

    let remote: Router =
        RemoteRouter::connect(&base, Some("secret".into()), Duration::from_secs(5)).await.expect("connects").into();
    let alice = user("alice");
    remote.create_channel(&alice, "room", &[]).await.expect("create");
    server.abort();
    let _ = server.await;
    // The listener is gone: a send fails fast and says so; nothing was confirmed.
    let started = tokio::time::Instant::now();
    let failed = remote.send(&alice, "g:room", "m1", "hello").await.expect_err("router down");
    assert_eq!(failed.code(), ErrorCode::Unavailable, "{failed}");
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast, not at the call timeout: {:?}", started.elapsed());
    assert!(remote.stats().write_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}
