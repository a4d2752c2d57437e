//! Channel authorization at the writer, on the embedded driver: private channels, roles, invitations, bans,
//! announcement channels and DM blocks; what a removal publishes; and that all of it survives a restart.

use parley_api::{ChannelAction, ChannelSettings, Router, RouterError, ServerOp};
use parley_bus::pubsub::{ControlEvent, Event, LocalPubSub, PubSub, ALL_GATEWAYS_TOPIC};
use parley_core::access::{MembershipPolicy, Posting, Role, Visibility};
use parley_core::UserId;
use parley_router::backend::HistoryQuery;
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::RouterConfig;
use std::sync::Arc;
use tokio::sync::mpsc;

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user")
}

/// A writer on the embedded store in `dir`, with this membership policy.
fn router(dir: &std::path::Path, policy: MembershipPolicy, bus: Arc<LocalPubSub>) -> Router {
    writer(dir, policy, bus).0
}

/// Like [`router`], with the writer's task (it ends, closing the store, once every handle is dropped).
fn writer(
    dir: &std::path::Path,
    policy: MembershipPolicy,
    bus: Arc<LocalPubSub>,
) -> (Router, tokio::task::JoinHandle<()>) {
    let store = Arc::new(EmbeddedStore::open(dir, Retention::default()).expect("store"));
    let config = RouterConfig { membership_policy: policy, ..RouterConfig::default() };
    parley_router::start(config, store.clone(), store.clone(), store, bus).expect("router")
}

const PRIVATE: ChannelSettings = ChannelSettings { visibility: Visibility::Private, posting: Posting::Everyone };

fn invite(name: &str) -> ChannelAction {
    ChannelAction::Invite { user: name.into() }
}

#[tokio::test]
async fn a_private_channel_is_closed_to_non_members_until_they_are_invited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Invite, Arc::new(LocalPubSub::new()));
    let (owner, eve) = (user("owner"), user("eve"));
    let created = router.create_channel_with(&owner, "secret", &["bob".into()], PRIVATE).await.expect("create");
    assert_eq!((created.visibility, created.role, created.members), (Visibility::Private, Some(Role::Owner), 1));
    router.send(&owner, "g:secret", "m1", "for members only").await.expect("owner posts");

    // A stranger can neither join, read, list nor write it.
    let refused = router.join(&eve, "g:secret").await;
    assert!(matches!(refused, Err(RouterError::Forbidden(_))), "{refused:?}");
    let history = router.history(&eve, "g:secret", HistoryQuery { limit: 10, ..Default::default() }).await;
    assert!(matches!(history, Err(RouterError::NotAMember(_))), "{history:?}");
    assert!(router.list_channels(&eve).await.expect("list").is_empty());
    let members = router.members(&eve, "g:secret").await;
    assert!(matches!(members, Err(RouterError::NotAMember(_))), "{members:?}");
    let sent = router.send(&eve, "g:secret", "e1", "let me in").await;
    assert!(matches!(sent, Err(RouterError::NotAMember(_))), "{sent:?}");

    // bob, named at creation, was invited (policy `invite`): he joins and reads.
    let bob = user("bob");
    let joined = router.join(&bob, "g:secret").await.expect("an invitation lets bob join");
    assert_eq!((joined.joined, joined.role, joined.members), (true, Some(Role::Member), 2));
    let page = router.history(&bob, "g:secret", HistoryQuery { limit: 10, ..Default::default() }).await;
    assert_eq!(page.expect("history").messages.len(), 1);

    // A plain member cannot invite; the owner can, and then eve may join.
    let by_member = router.manage_channel(&bob, "g:secret", invite("eve")).await;
    assert!(matches!(by_member, Err(RouterError::Forbidden(_))), "{by_member:?}");
    router.manage_channel(&owner, "g:secret", invite("eve")).await.expect("the owner invites");
    assert!(router.join(&eve, "g:secret").await.expect("invited").joined);
}

#[tokio::test]
async fn with_the_direct_policy_named_users_are_members_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let owner = user("owner");
    let created = router.create_channel_with(&owner, "team", &["bob".into()], PRIVATE).await.expect("create");
    assert_eq!(created.members, 2);
    router.manage_channel(&owner, "g:team", invite("carol")).await.expect("added");
    let carol = router.list_channels(&user("carol")).await.expect("list");
    assert_eq!(carol.iter().map(|view| view.id.as_str()).collect::<Vec<_>>(), vec!["g:team"]);
    assert_eq!(carol[0].role, Some(Role::Member));
    assert!(matches!(router.join(&user("dave"), "g:team").await, Err(RouterError::Forbidden(_))));
}

#[tokio::test]
async fn roles_go_down_the_ranks_and_the_last_owner_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let (owner, admin, member, other) = (user("owner"), user("admin"), user("member"), user("other"));
    let names: Vec<String> = ["admin", "member", "other"].iter().map(|name| name.to_string()).collect();
    router.create_channel(&owner, "club", &names).await.expect("create");
    let set_role = |name: &str, role: Role| ChannelAction::SetRole { user: name.into(), role };

    let by_admin = router.manage_channel(&admin, "g:club", set_role("member", Role::Admin)).await;
    assert!(matches!(by_admin, Err(RouterError::Forbidden(_))), "only owners set roles: {by_admin:?}");
    router.manage_channel(&owner, "g:club", set_role("admin", Role::Admin)).await.expect("owner sets a role");
    let remove = |name: &str| ChannelAction::Remove { user: name.into() };
    let by_member = router.manage_channel(&member, "g:club", remove("other")).await;
    assert!(matches!(by_member, Err(RouterError::Forbidden(_))), "{by_member:?}");
    let view = router.manage_channel(&admin, "g:club", remove("other")).await.expect("admins remove members");
    assert_eq!(view.members, 3);
    assert!(router.list_channels(&other).await.expect("list").is_empty(), "the channel left other's list");
    let up = router.manage_channel(&admin, "g:club", remove("owner")).await;
    assert!(matches!(up, Err(RouterError::Forbidden(_))), "an admin cannot remove the owner: {up:?}");

    let leaving = router.leave(&owner, "g:club").await;
    assert!(matches!(leaving, Err(RouterError::Forbidden(_))), "the last owner stays: {leaving:?}");
    router.manage_channel(&owner, "g:club", set_role("admin", Role::Owner)).await.expect("a second owner");
    router.leave(&owner, "g:club").await.expect("now the first owner may leave");
    let view = router.channel_view(&admin, &parley_core::ChannelId::parse("g:club").expect("id")).await.expect("view");
    assert_eq!((view.role, view.members), (Some(Role::Owner), 2));
}

#[tokio::test]
async fn a_ban_removes_at_once_and_holds_until_lifted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(64);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![ALL_GATEWAYS_TOPIC.to_owned()]).await.expect("subscribe");
    let router = router(dir.path(), MembershipPolicy::Direct, bus.clone());
    let (owner, troll) = (user("owner"), user("troll"));
    router.create_channel(&owner, "town", &["troll".into()]).await.expect("create");
    while published.try_recv().is_ok() {}

    router.manage_channel(&owner, "g:town", ChannelAction::Ban { user: "troll".into() }).await.expect("ban");
    // The gateways holding troll hear of the removal at once (they drop the channel from troll's connections).
    let (_, payload) = tokio::time::timeout(std::time::Duration::from_secs(10), published.recv())
        .await
        .expect("published")
        .expect("event");
    let removed = ControlEvent::Membership { user: "troll".into(), channel: "g:town".into(), joined: false };
    assert_eq!(Event::decode(&payload), Some(Event::Control(removed)));
    let sent = router.send(&troll, "g:town", "t1", "still here?").await;
    assert!(matches!(sent, Err(RouterError::NotAMember(_))), "{sent:?}");
    let rejoin = router.join(&troll, "g:town").await;
    assert!(matches!(rejoin, Err(RouterError::Banned(_))), "{rejoin:?}");
    let invited = router.manage_channel(&owner, "g:town", invite("troll")).await;
    assert!(matches!(invited, Err(RouterError::Banned(_))), "a banned user cannot be invited: {invited:?}");

    router.manage_channel(&owner, "g:town", ChannelAction::Unban { user: "troll".into() }).await.expect("unban");
    assert!(router.join(&troll, "g:town").await.expect("public again").joined);
}

#[tokio::test]
async fn announcement_channels_take_posts_from_owners_and_admins_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let (owner, reader) = (user("owner"), user("reader"));
    router.create_channel(&owner, "news", &["reader".into()]).await.expect("create");
    router.send(&reader, "g:news", "r1", "open for all").await.expect("everyone posts by default");
    let update = ChannelAction::Update { visibility: None, posting: Some(Posting::Admins) };
    let by_reader = router.manage_channel(&reader, "g:news", update.clone()).await;
    assert!(matches!(by_reader, Err(RouterError::Forbidden(_))), "{by_reader:?}");
    let view = router.manage_channel(&owner, "g:news", update).await.expect("owner restricts posting");
    assert_eq!(view.posting, Posting::Admins);
    let refused = router.send(&reader, "g:news", "r2", "may I?").await;
    assert!(matches!(refused, Err(RouterError::Forbidden(_))), "{refused:?}");
    router.send(&owner, "g:news", "o1", "announcement").await.expect("the owner posts");
}

#[tokio::test]
async fn a_blocked_dm_refuses_sends_both_ways_until_unblocked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let (alice, bob) = (user("alice"), user("bob"));
    router.send(&alice, "dm:alice:bob", "a1", "hi").await.expect("before the block");
    router.block(&bob, "alice", true).await.expect("bob blocks alice");
    let from_alice = router.send(&alice, "dm:alice:bob", "a2", "hello?").await;
    assert!(matches!(from_alice, Err(RouterError::Blocked(_))), "{from_alice:?}");
    let from_bob = router.send(&bob, "dm:alice:bob", "b1", "oops").await;
    assert!(matches!(from_bob, Err(RouterError::Blocked(_))), "the blocker cannot write either: {from_bob:?}");
    assert!(matches!(router.block(&bob, "bob", true).await, Err(RouterError::InvalidArgument(_))));
    router.block(&bob, "alice", false).await.expect("unblock");
    router.send(&alice, "dm:alice:bob", "a2", "hello?").await.expect("after the unblock");
}

#[tokio::test]
async fn roles_bans_privacy_and_blocks_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (router, task) = writer(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
        let owner = user("owner");
        let settings = ChannelSettings { visibility: Visibility::Private, posting: Posting::Admins };
        router.create_channel_with(&owner, "vault", &["admin".into()], settings).await.expect("create");
        let role = ChannelAction::SetRole { user: "admin".into(), role: Role::Admin };
        router.manage_channel(&owner, "g:vault", role).await.expect("role");
        router.manage_channel(&owner, "g:vault", ChannelAction::Ban { user: "mallory".into() }).await.expect("ban");
        router.block(&user("alice"), "bob", true).await.expect("block");
        drop(router);
        task.await.expect("the writer stops and closes the store");
    }
    // A new writer on the same data.
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let view = router.channel_view(&user("admin"), &parley_core::ChannelId::parse("g:vault").expect("id")).await;
    let view = view.expect("view");
    assert_eq!((view.visibility, view.posting, view.role), (Visibility::Private, Posting::Admins, Some(Role::Admin)));
    assert!(matches!(router.join(&user("stranger"), "g:vault").await, Err(RouterError::Forbidden(_))));
    let update = ChannelAction::Update { visibility: Some(Visibility::Public), posting: None };
    router.manage_channel(&user("admin"), "g:vault", update).await.expect("admins change settings");
    assert!(matches!(router.join(&user("mallory"), "g:vault").await, Err(RouterError::Banned(_))));
    assert!(router.join(&user("stranger"), "g:vault").await.expect("public now").joined);
    let refused = router.send(&user("stranger"), "g:vault", "s1", "hi").await;
    assert!(matches!(refused, Err(RouterError::Forbidden(_))), "posting stays admins-only: {refused:?}");
    let blocked = router.send(&user("bob"), "dm:alice:bob", "b1", "hi").await;
    assert!(matches!(blocked, Err(RouterError::Blocked(_))), "{blocked:?}");
}

fn server_create(name: &str, owner: Option<&str>, members: &[&str], settings: ChannelSettings) -> ServerOp {
    ServerOp::CreateChannel {
        name: name.into(),
        owner: owner.map(str::to_owned),
        members: members.iter().map(|member| member.to_string()).collect(),
        settings,
    }
}

#[tokio::test]
async fn the_backend_creates_idempotently_and_manages_without_a_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Even with the invite policy, the backend adds members directly.
    let router = router(dir.path(), MembershipPolicy::Invite, Arc::new(LocalPubSub::new()));
    let created = router.server(server_create("ops", Some("lead"), &["ann", "bob"], PRIVATE)).await.expect("create");
    let created = created.into_channel("create").expect("a channel");
    assert_eq!((created.members, created.visibility, created.joined), (3, Visibility::Private, false));
    let again = router.server(server_create("ops", Some("lead"), &["ann", "bob"], PRIVATE)).await.expect("again");
    assert_eq!(again.into_channel("create").expect("a channel").members, 3, "the same request answers the channel");
    let other = router.server(server_create("ops", None, &[], ChannelSettings::default())).await;
    assert!(matches!(other, Err(RouterError::ChannelExists(_))), "other settings conflict: {other:?}");
    let lead = router.list_channels(&user("lead")).await.expect("list");
    assert_eq!(lead[0].role, Some(Role::Owner));

    // No role needed: ban the owner's admin-to-be, add someone, make bob admin.
    let manage = |action| ServerOp::Manage { channel: "g:ops".into(), action };
    router.server(manage(ChannelAction::Ban { user: "ann".into() })).await.expect("ban");
    router.server(manage(ChannelAction::Invite { user: "cat".into() })).await.expect("add");
    router.server(manage(ChannelAction::SetRole { user: "bob".into(), role: Role::Admin })).await.expect("role");
    assert!(matches!(router.join(&user("ann"), "g:ops").await, Err(RouterError::Banned(_))));
    assert_eq!(router.list_channels(&user("cat")).await.expect("cat").len(), 1, "added at once");

    // A system message, idempotent on its key, from a sender no user can be.
    let post =
        || ServerOp::Post { channel: "g:ops".into(), client_msg_id: "notice-1".into(), text: "maintenance".into() };
    let posted = router.server(post()).await.expect("post").into_sent("post").expect("sent");
    let again = router.server(post()).await.expect("post again").into_sent("post").expect("sent");
    assert_eq!((posted.placement.seq, again.placement.seq, again.duplicate), (1, 1, true));
    let page = router.history(&user("bob"), "g:ops", HistoryQuery { limit: 10, ..Default::default() }).await;
    let page = page.expect("history");
    assert_eq!(page.messages.iter().map(|m| m.sender.as_str()).collect::<Vec<_>>(), vec![parley_api::SERVER_SENDER]);
    let dm =
        router.server(ServerOp::Post { channel: "dm:ann:bob".into(), client_msg_id: "x".into(), text: "t".into() });
    assert!(matches!(dm.await, Err(RouterError::InvalidArgument(_))), "the backend posts into group channels only");
}

#[tokio::test]
async fn a_deleted_channel_is_gone_and_a_new_one_of_its_name_hides_the_old_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path(), MembershipPolicy::Direct, Arc::new(LocalPubSub::new()));
    let (owner, bob) = (user("owner"), user("bob"));
    router.create_channel(&owner, "temp", &["bob".into()]).await.expect("create");
    for n in 0..3 {
        router.send(&owner, "g:temp", &format!("m{n}"), "before the deletion").await.expect("send");
    }
    router.server(ServerOp::DeleteChannel { channel: "g:temp".into() }).await.expect("delete");
    assert!(router.list_channels(&bob).await.expect("list").is_empty(), "gone from every member's list");
    let history = router.history(&bob, "g:temp", HistoryQuery { limit: 10, ..Default::default() }).await;
    assert!(matches!(history, Err(RouterError::NoSuchChannel(_))), "{history:?}");
    let sent = router.send(&owner, "g:temp", "m9", "after").await;
    assert!(matches!(sent, Err(RouterError::NoSuchChannel(_))), "{sent:?}");
    let again = router.server(ServerOp::DeleteChannel { channel: "g:temp".into() }).await;
    assert!(matches!(again, Err(RouterError::NoSuchChannel(_))), "{again:?}");

    // A new channel of the same name: its sequence goes on, and the old messages stay hidden.
    let view = router.create_channel(&bob, "temp", &[]).await.expect("create again");
    assert_eq!((view.last_seq, view.unread), (3, 0));
    let fresh = router.send(&bob, "g:temp", "n1", "a new start").await.expect("send");
    assert_eq!(fresh.placement.seq, 4);
    for query in [
        HistoryQuery { limit: 10, ..Default::default() },
        HistoryQuery { limit: 10, after: Some(0), ..Default::default() },
        HistoryQuery { limit: 10, before: Some(4), ..Default::default() },
    ] {
        let page = router.history(&bob, "g:temp", query).await.expect("history");
        let seqs: Vec<u64> = page.messages.iter().map(|message| message.seq).collect();
        assert!(seqs.iter().all(|seq| *seq >= 4), "{query:?}: {seqs:?}");
        assert!(!page.has_more, "{query:?}");
    }
    assert_eq!(router.first_retained_seq("g:temp").await.expect("floor"), 4);
}

#[tokio::test]
async fn only_members_publish_delivery_receipts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = Arc::new(LocalPubSub::new());
    let (sink, mut published) = mpsc::channel(64);
    let subscription = bus.open(sink);
    subscription.subscribe(vec![parley_bus::pubsub::channel_topic("g:desk")]).await.expect("subscribe");
    let router = router(dir.path(), MembershipPolicy::Direct, bus.clone());
    let (owner, bob, eve) = (user("owner"), user("bob"), user("eve"));
    router.create_channel(&owner, "desk", &["bob".into()]).await.expect("create");
    router.send(&owner, "g:desk", "m1", "hello").await.expect("send");

    // A member's receipt is published on the channel's topic.
    router.mark_delivered(&bob, "g:desk", 1).await.expect("a member's receipt");
    let receipt = ControlEvent::Delivered { channel: "g:desk".into(), user: "bob".into(), seq: 1 };
    let mut seen = false;
    while let Ok(Some((_, payload))) = tokio::time::timeout(std::time::Duration::from_secs(10), published.recv()).await
    {
        if Event::decode(&payload) == Some(Event::Control(receipt.clone())) {
            seen = true;
            break;
        }
    }
    assert!(seen, "the member's receipt was published");

    // Anyone else is refused, like `mark_read`, and nothing is published in their name.
    let stranger = router.mark_delivered(&eve, "g:desk", 1).await;
    assert!(matches!(stranger, Err(RouterError::NotAMember(_))), "{stranger:?}");
    let missing = router.mark_delivered(&eve, "g:nowhere", 1).await;
    assert!(matches!(missing, Err(RouterError::NoSuchChannel(_))), "{missing:?}");
    router.manage_channel(&owner, "g:desk", ChannelAction::Remove { user: "bob".into() }).await.expect("remove");
    let removed = router.mark_delivered(&bob, "g:desk", 1).await;
    assert!(matches!(removed, Err(RouterError::NotAMember(_))), "a removed member is refused: {removed:?}");
    let dm = router.mark_delivered(&eve, "dm:bob:owner", 1).await;
    assert!(matches!(dm, Err(RouterError::NotAMember(_))), "{dm:?}");
    router.mark_delivered(&bob, "dm:bob:owner", 1).await.expect("a DM's own member, even before its first message");
    while let Ok(Some((_, payload))) =
        tokio::time::timeout(std::time::Duration::from_millis(200), published.recv()).await
    {
        if let Some(Event::Control(ControlEvent::Delivered { user, .. })) = Event::decode(&payload) {
            assert_ne!(user, "eve", "a refused receipt was published");
            assert_ne!(user, "bob", "a removed member's receipt was published");
        }
    }
}
