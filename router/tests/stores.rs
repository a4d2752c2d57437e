//! One behaviour suite for the message and membership stores, run against the embedded driver and against
//! Cassandra.
//!
//! Every test body takes an [`Engine`] and runs once per driver (`<test>::embedded`, `<test>::cassandra`). The
//! Cassandra runs need `PARLEY_CASSANDRA_CONTACT` (start one with `e2e/stack/up.sh --only cassandra <state dir>`
//! and source `<state dir>/stack.env`); each test creates its own keyspace `parley_test_<pid>_<n>` and drops it
//! at the end. Without the variable a plain `cargo test` skips them and the full test command fails them
//! (`parley_test_support::engines`).

use parley_api::BackendError;
use parley_bus::pubsub::LocalPubSub;
use parley_core::machine_lease::{choose, Choice, LeaseTimings};
use parley_core::protocol::MessageView;
use parley_core::{ChannelKind, UserId};
use parley_router::backend::{
    ChannelRecord, HistoryQuery, Home, LeaseRow, MembershipChange, MembershipStore, MessageStore,
};
use parley_router::cassandra::{CassandraConfig, CassandraStore};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::machine_lease::{LeaseSettings, MachineLeaser};
use parley_router::RouterConfig;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const START_CASSANDRA: &str = "start Cassandra with `e2e/stack/up.sh --only cassandra /tmp/parley-stack` and \
     `set -a; . /tmp/parley-stack/stack.env; set +a` (stop it with `e2e/stack/down.sh /tmp/parley-stack`)";

/// Width of a time bucket in these tests: short, so that a few seconds of timestamps cross many buckets.
const BUCKET: Duration = Duration::from_secs(1);

/// Retention of the retention test: short, so that Cassandra's TTL expires within the test.
const SHORT_RETENTION: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Embedded,
    Cassandra,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

fn unique_keyspace() -> String {
    parley_test_support::unique("parley_test_").replace('-', "_")
}

/// A Cassandra configuration with its own keyspace, or `None` when engine tests are skipped.
fn cassandra_config(retention: Option<Duration>) -> Option<CassandraConfig> {
    let contact = parley_test_support::engine(parley_test_support::Engine::Cassandra)?;
    // With the TLS and credentials of the environment (stack.env), as a router started with it connects.
    let mut config = parley_test_support::cassandra_config(&contact, unique_keyspace());
    config.local_datacenter = std::env::var("PARLEY_CASSANDRA_DC").ok().filter(|dc| !dc.is_empty());
    config.retention = retention;
    config.bucket = BUCKET;
    config.page_size = 500;
    config.request_timeout = Duration::from_secs(10);
    Some(config)
}

async fn connect(config: CassandraConfig) -> CassandraStore {
    let contact = config.contact_points.join(",");
    CassandraStore::connect(config).await.unwrap_or_else(|error| {
        panic!("cannot reach Cassandra at PARLEY_CASSANDRA_CONTACT={contact}: {error}; {START_CASSANDRA}")
    })
}

/// The stores of one test, and what must be cleaned up after it.
struct Stores {
    messages: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    embedded: Option<(EmbeddedStore, tempfile::TempDir)>,
    cassandra: Option<CassandraStore>,
}

impl Stores {
    async fn open(engine: Engine, retention: Option<Duration>) -> Option<Stores> {
        match engine {
            Engine::Embedded => {
                let dir = tempfile::tempdir().expect("tempdir");
                let retention = Retention {
                    messages: retention,
                    bucket: BUCKET,
                    idempotency: retention.unwrap_or(Duration::from_secs(10 * 365 * 24 * 3600)),
                };
                let store = EmbeddedStore::open(dir.path(), retention).expect("open embedded store");
                Some(Stores {
                    messages: Arc::new(store.clone()),
                    membership: Arc::new(store.clone()),
                    embedded: Some((store, dir)),
                    cassandra: None,
                })
            }
            Engine::Cassandra => {
                let store = connect(cassandra_config(retention)?).await;
                Some(Stores {
                    messages: Arc::new(store.clone()),
                    membership: Arc::new(store.clone()),
                    embedded: None,
                    cassandra: Some(store),
                })
            }
        }
    }

    /// Lets the messages written so far with old timestamps expire: a retention sweep for the embedded store; for
    /// Cassandra, waits until their TTL has run out (Cassandra's own clock: polled, up to 60 s) and `channels` show
    /// none of them.
    async fn expire(&self, channels: &[&str]) {
        if let Some((store, _)) = &self.embedded {
            store.sweep(now_ms()).await.expect("sweep");
        }
        if self.cassandra.is_some() {
            parley_test_support::eventually(
                "Cassandra's TTL to drop the old messages",
                Duration::from_secs(60),
                || async {
                    for channel in channels {
                        let page =
                            self.messages.history(channel, HistoryQuery { limit: 10, ..Default::default() }).await;
                        if !page.expect("history").messages.is_empty() {
                            return None;
                        }
                    }
                    Some(())
                },
            )
            .await;
        }
    }

    async fn finish(self) {
        if let Some(store) = self.cassandra {
            store.drop_keyspace().await.expect("drop keyspace");
        }
    }
}

fn message(channel: &str, seq: u64, ts: u64) -> MessageView {
    MessageView {
        channel: channel.into(),
        seq,
        id: (ts << 22) | seq,
        sender: "alice".into(),
        text: format!("message {seq}"),
        ts,
        client_msg_id: format!("{channel}-c{seq}"),
    }
}

fn seqs(messages: &[MessageView]) -> Vec<u64> {
    messages.iter().map(|message| message.seq).collect()
}

fn record(channel: &str, creator: &str) -> ChannelRecord {
    ChannelRecord {
        id: channel.into(),
        kind: ChannelKind::Group,
        created_by: creator.into(),
        created_at: 7,
        member_count: 0,
        visibility: Default::default(),
        posting: Default::default(),
        history_from: 0,
        home: Some(Home { region: "eu-west".into(), epoch: 1, base_seq: 0 }),
    }
}

fn add(channel: &str, user: &str) -> MembershipChange {
    MembershipChange::Add { channel: channel.into(), user: user.into() }
}

fn remove(channel: &str, user: &str) -> MembershipChange {
    MembershipChange::Remove { channel: channel.into(), user: user.into() }
}

parley_test_support::engine_suite!(
    [embedded => Embedded, cassandra => Cassandra];
    history_pages_both_ways_across_buckets,
    rewriting_changes_nothing,
    last_stored_seq_is_the_highest_written,
    stored_sends_are_found_by_key,
    retention_expires_old_messages_and_raises_the_floor,
    membership_counts_follow_adds_and_removes,
    user_channels_lists_every_channel_of_a_user,
    read_cursor_never_moves_back,
    large_channel_members_are_listed_in_full,
    router_writer_runs_on_the_store,
    access_settings_and_blocks_are_stored,
    a_key_names_its_first_message_whatever_the_write_order,
    a_deleted_channel_leaves_no_member_list_or_access_behind,
    a_home_moves_only_from_the_home_the_store_names,
    a_home_is_claimed_once,
    machine_ids_are_leased,
    push_devices_and_mutes_are_stored,
);

async fn push_devices_and_mutes_are_stored(engine: Engine) {
    use parley_router::backend::{Device, Platform};
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let device = |n: u32| Device::new(Platform::Apns, format!("{n:064x}"));
    let phone = Device::new(Platform::Fcm, "fcm-token-1");
    assert!(!membership.register_device("bob", &phone, 3).await.expect("register"));
    assert!(membership.register_device("bob", &phone, 3).await.expect("again"), "known already");
    for n in 1..=3 {
        assert!(!membership.register_device("bob", &device(n), 3).await.expect("register"));
    }
    assert_eq!(
        membership.devices("bob").await.expect("devices"),
        vec![device(1), device(2), device(3)],
        "past three devices the oldest (the phone) is forgotten"
    );
    // A device registered by another user moves to them.
    assert!(!membership.register_device("carol", &device(2), 3).await.expect("move"));
    assert_eq!(membership.devices("bob").await.expect("devices"), vec![device(1), device(3)]);
    assert_eq!(membership.devices("carol").await.expect("devices"), vec![device(2)]);
    // Only its owner unregisters a device through the API; the notifier forgets an invalid token whoever has it.
    assert!(!membership.unregister_device(&device(1), Some("carol")).await.expect("not carol's"));
    assert!(membership.unregister_device(&device(1), Some("bob")).await.expect("bob's"));
    assert!(membership.unregister_device(&device(2), None).await.expect("invalid token"));
    assert!(!membership.unregister_device(&device(2), None).await.expect("gone"));
    assert_eq!(membership.devices("bob").await.expect("devices"), vec![device(3)]);
    assert!(membership.devices("carol").await.expect("devices").is_empty());

    membership
        .apply(vec![MembershipChange::Create(record("g:quiet", "bob")), add("g:quiet", "bob")])
        .await
        .expect("create");
    membership.set_mute("bob", "g:quiet", Some(u64::MAX)).await.expect("mute");
    membership.set_mute("carol", "g:quiet", Some(1_000)).await.expect("mute");
    let mut mutes = membership.mutes("g:quiet").await.expect("mutes");
    mutes.sort();
    assert_eq!(mutes, vec![("bob".to_owned(), u64::MAX), ("carol".to_owned(), 1_000)]);
    membership.set_mute("carol", "g:quiet", None).await.expect("unmute");
    assert_eq!(membership.mutes("g:quiet").await.expect("mutes"), vec![("bob".to_owned(), u64::MAX)]);
    // A deleted channel's mutes go with it.
    membership.apply(vec![MembershipChange::Delete { channel: "g:quiet".into() }]).await.expect("delete");
    assert!(membership.mutes("g:quiet").await.expect("mutes").is_empty());
    stores.finish().await;
}

/// Lease timings of the machine-id tests: short, so the real-time ones wait little.
fn lease_timings() -> LeaseTimings {
    LeaseTimings::new(600, 1_500).expect("timings")
}

fn lease_settings(pod: &str, base: u16, count: u16) -> LeaseSettings {
    LeaseSettings { scope: "eu-west".into(), base, count, pod: pod.into(), timings: lease_timings() }
}

/// The lease row the store holds for `id`.
async fn lease_row(membership: &Arc<dyn MembershipStore>, id: u16) -> Option<LeaseRow> {
    membership.machine_leases("eu-west", id, 1).await.expect("read leases").into_iter().next()
}

/// The machine-id lease behaviours, on one store (one keyspace on Cassandra): each uses IDs of its own.
async fn machine_ids_are_leased(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    racing_claims_lease_different_machine_ids(&stores).await;
    a_released_machine_id_waits_out_the_quarantine(&stores).await;
    a_dead_holders_machine_id_is_reclaimed_after_ttl_and_quarantine(&stores).await;
    a_router_refuses_sends_while_its_machine_id_lease_is_not_valid(&stores).await;
    stores.finish().await;
}

async fn racing_claims_lease_different_machine_ids(stores: &Stores) {
    let membership = &stores.membership;
    // Two claims of the same never-held ID: one wins.
    let now = now_ms();
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let racers: Vec<_> = ["router-0#a", "router-1#b"]
        .into_iter()
        .map(|holder| {
            let (membership, start) = (membership.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                membership.claim_machine_id("eu-west", 7, None, holder, now).await.expect("claim")
            })
        })
        .collect();
    let mut won = Vec::new();
    for racer in racers {
        won.push(racer.await.expect("claim task"));
    }
    assert_eq!(won.iter().filter(|won| **won).count(), 1, "exactly one claim wins: {won:?}");
    let winner = if won[0] { "router-0#a" } else { "router-1#b" };
    assert_eq!(lease_row(membership, 7).await.map(|row| row.holder), Some(winner.to_owned()));

    // Routers starting at once, each through the whole choose-and-claim loop: all different IDs, inside the block.
    let routers = 4;
    let start = Arc::new(tokio::sync::Barrier::new(routers));
    let tasks: Vec<_> = (0..routers)
        .map(|index| {
            let (membership, start) = (membership.clone(), start.clone());
            tokio::spawn(async move {
                let leaser = MachineLeaser::new(membership, lease_settings(&format!("router-{index}"), 20, 6));
                start.wait().await;
                let id = leaser.acquire().await;
                (id, leaser)
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in tasks {
        held.push(task.await.expect("acquire task"));
    }
    let mut ids: Vec<u16> = held.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), routers, "every router leased its own id: {ids:?}");
    assert!(ids.iter().all(|id| (20..26).contains(id)), "{ids:?}");
    let rows = membership.machine_leases("eu-west", 20, 6).await.expect("read leases");
    for (id, leaser) in &held {
        assert_eq!(leaser.lease().id(), Some(*id));
        let row = rows.iter().find(|row| row.id == *id).expect("a row per leased id");
        assert_eq!(row.holder, leaser.holder());
        assert_eq!(row.released_at_ms, None);
    }
    // Another scope's block is another set of leases.
    assert!(membership.machine_leases("us-east", 20, 6).await.expect("read leases").is_empty());
}

async fn a_released_machine_id_waits_out_the_quarantine(stores: &Stores) {
    let membership = &stores.membership;
    let timings = lease_timings();
    let claimed_at = now_ms();
    assert!(membership.claim_machine_id("eu-west", 3, None, "router-0#old", claimed_at).await.expect("claim"));
    assert!(
        !membership.release_machine_id("eu-west", 3, "router-1#other", claimed_at + 5).await.expect("release"),
        "only the holder releases"
    );
    let released_at = claimed_at + 10;
    assert!(membership.release_machine_id("eu-west", 3, "router-0#old", released_at).await.expect("release"));
    let row = lease_row(membership, 3).await.expect("the released row stays");
    assert_eq!(
        row,
        LeaseRow { id: 3, holder: "router-0#old".into(), renewed_at_ms: claimed_at, released_at_ms: Some(released_at) }
    );
    // The pod replaced at the same ordinal: not before the quarantine, even for the same pod.
    let rows = vec![row.clone()];
    let free_at_ms = released_at + timings.quarantine_ms;
    assert_eq!(choose(3, 1, &rows, "router-0#new", free_at_ms - 1, timings), Ok(Choice::Wait { id: 3, free_at_ms }));
    assert_eq!(
        choose(3, 1, &rows, "router-0#new", free_at_ms, timings),
        Ok(Choice::Claim { id: 3, expected: Some(row.clone()) })
    );
    assert!(membership.claim_machine_id("eu-west", 3, Some(&row), "router-0#new", free_at_ms).await.expect("claim"));
    let taken = lease_row(membership, 3).await.expect("row");
    assert_eq!((taken.holder.as_str(), taken.renewed_at_ms, taken.released_at_ms), ("router-0#new", free_at_ms, None));
    assert!(
        !membership.claim_machine_id("eu-west", 3, Some(&row), "router-2#late", free_at_ms).await.expect("claim"),
        "a claim from the row as it was before is refused"
    );

    // The same through the leaser on the real clock: a successor of the only ID waits out the quarantine.
    let first = MachineLeaser::new(membership.clone(), lease_settings("router-5", 30, 1));
    assert_eq!(first.acquire().await, 30);
    let released = std::time::Instant::now();
    assert!(first.release().await.expect("release"));
    let second = MachineLeaser::new(membership.clone(), lease_settings("router-5", 30, 1));
    assert_eq!(second.acquire().await, 30);
    let waited = released.elapsed();
    assert!(waited >= Duration::from_millis(timings.quarantine_ms), "leased again after {waited:?}");
    // With a spare ID, a replacement takes the spare at once.
    assert!(second.release().await.expect("release"));
    let third = MachineLeaser::new(membership.clone(), lease_settings("router-5", 30, 2));
    let started = std::time::Instant::now();
    assert_eq!(third.acquire().await, 31);
    assert!(started.elapsed() < Duration::from_millis(timings.quarantine_ms), "{:?}", started.elapsed());
}

async fn a_dead_holders_machine_id_is_reclaimed_after_ttl_and_quarantine(stores: &Stores) {
    let membership = &stores.membership;
    let timings = lease_timings();
    let claimed_at = now_ms();
    assert!(membership.claim_machine_id("eu-west", 9, None, "router-0#a", claimed_at).await.expect("claim"));
    assert!(membership.renew_machine_id("eu-west", 9, "router-0#a", claimed_at + 200).await.expect("renew"));
    assert!(
        !membership.renew_machine_id("eu-west", 9, "router-1#b", claimed_at + 200).await.expect("renew"),
        "only the holder renews"
    );
    // The holder stops renewing (a crash): its ID is free ttl + quarantine after its last renewal, not before.
    let row = lease_row(membership, 9).await.expect("row");
    assert_eq!(row.renewed_at_ms, claimed_at + 200);
    let rows = vec![row.clone()];
    let free_at_ms = claimed_at + 200 + timings.ttl_ms + timings.quarantine_ms;
    assert_eq!(choose(9, 1, &rows, "router-1#b", free_at_ms - 1, timings), Ok(Choice::Wait { id: 9, free_at_ms }));
    assert_eq!(
        choose(9, 1, &rows, "router-1#b", free_at_ms, timings),
        Ok(Choice::Claim { id: 9, expected: Some(row.clone()) })
    );
    // A holder that renewed after the row was read keeps its ID: the claim compares the last renewal too.
    assert!(membership.renew_machine_id("eu-west", 9, "router-0#a", claimed_at + 300).await.expect("renew"));
    assert!(!membership.claim_machine_id("eu-west", 9, Some(&row), "router-1#b", free_at_ms).await.expect("claim"));
    let row = lease_row(membership, 9).await.expect("row");
    assert_eq!(row.holder, "router-0#a");
    assert!(membership
        .claim_machine_id("eu-west", 9, Some(&row), "router-1#b", free_at_ms + 100)
        .await
        .expect("claim"));
    // The old holder learns it lost the ID at its next renewal, and cannot release it either.
    assert!(!membership.renew_machine_id("eu-west", 9, "router-0#a", free_at_ms + 200).await.expect("renew"));
    assert!(!membership.release_machine_id("eu-west", 9, "router-0#a", free_at_ms + 200).await.expect("release"));
    assert_eq!(lease_row(membership, 9).await.map(|row| row.holder), Some("router-1#b".to_owned()));
}

/// A writer whose machine-id lease is not valid issues no id: its sends are refused as `unavailable` with
/// `machine_id_lost`, and served again once the lease is renewed.
async fn a_router_refuses_sends_while_its_machine_id_lease_is_not_valid(stores: &Stores) {
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = match &stores.embedded {
        Some((store, _)) => store.clone(),
        None => EmbeddedStore::open(log_dir.path(), Retention::default()).expect("log"),
    };
    let leaser = Arc::new(MachineLeaser::new(stores.membership.clone(), lease_settings("router-0", 50, 2)));
    let id = leaser.acquire().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(leaser.clone().keep(stopped));
    let config = RouterConfig { machine_id: id, machine_lease: Some(leaser.lease()), ..RouterConfig::default() };
    let (router, _writer) = parley_router::start(
        config,
        Arc::new(log),
        stores.messages.clone(),
        stores.membership.clone(),
        Arc::new(LocalPubSub::new()),
    )
    .expect("router");
    let alice = UserId::new("alice").expect("user");
    router.create_channel(&alice, "fenced", &[]).await.expect("create");
    let sent = router.send(&alice, "g:fenced", "m1", "with a valid lease").await.expect("send");
    assert_eq!(parley_core::snowflake::decompose(sent.placement.id, RouterConfig::default().epoch_ms).machine_id, id);

    // Not renewed for a whole time to live (as when the store is out of reach): refused, nothing written.
    let _ = stop.send(true);
    keeper.await.expect("keeper");
    tokio::time::sleep(Duration::from_millis(lease_timings().ttl_ms + 50)).await;
    let refused = router.send(&alice, "g:fenced", "m2", "without a lease").await.expect_err("refused");
    assert_eq!(refused.code(), parley_core::protocol::ErrorCode::Unavailable, "{refused}");
    assert!(refused.to_string().contains("machine_id_lost"), "{refused}");
    assert!(!leaser.lease().is_valid());

    // Renewed (nobody took the id meanwhile): the same id, sends served again, the loss counted once.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(leaser.clone().keep(stopped));
    let lease = leaser.lease();
    parley_test_support::eventually("the lease renewed", Duration::from_secs(10), || async {
        lease.is_valid().then_some(())
    })
    .await;
    assert_eq!(lease.current(), Ok(id));
    assert_eq!(lease.lost_total(), 1);
    let sent = router.send(&alice, "g:fenced", "m2", "with the lease again").await.expect("send");
    assert_eq!(sent.placement.seq, 2, "the refused send took no sequence");
    let _ = stop.send(true);
    keeper.await.expect("keeper");
    assert!(leaser.release().await.expect("release"));
    drop(router);
}

async fn a_home_moves_only_from_the_home_the_store_names(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    membership.apply(vec![MembershipChange::Create(record("g:moving", "alice"))]).await.expect("create");
    let first = Home { region: "eu-west".into(), epoch: 1, base_seq: 0 };
    assert_eq!(membership.channel("g:moving").await.expect("read").and_then(|record| record.home), Some(first.clone()));
    let second = Home { region: "us-east".into(), epoch: 2, base_seq: 41 };
    assert!(membership.move_home("g:moving", &first, &second, false).await.expect("move"), "the first move wins");
    let third = Home { region: "ap-south".into(), epoch: 2, base_seq: 41 };
    assert!(
        !membership.move_home("g:moving", &first, &third, true).await.expect("move"),
        "a move from a stale home loses"
    );
    assert_eq!(membership.channel("g:moving").await.expect("read").and_then(|record| record.home), Some(second));
    assert!(!membership.move_home("g:none", &first, &third, false).await.expect("move"), "no such channel");
}

/// A DM (created on first use, with the same id in every region) as a writer of `home` creates it.
fn dm(channel: &str, home: &Home) -> Vec<MembershipChange> {
    let (first, second) = channel.trim_start_matches("dm:").split_once(':').expect("a DM id");
    vec![
        MembershipChange::Create(ChannelRecord {
            kind: ChannelKind::Dm,
            home: Some(home.clone()),
            ..record(channel, first)
        }),
        add(channel, first),
        add(channel, second),
    ]
}

async fn a_home_is_claimed_once(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let home = |region: &str| Home { region: region.into(), epoch: 1, base_seq: 0 };
    let (eu, us) = (home("eu-west"), home("us-east"));
    let claim = |channel: &'static str, home: Home| async move {
        membership.claim_home(channel, &home).await.expect("claim a home")
    };
    let stored_home = |channel: &'static str| async move {
        membership.channel(channel).await.expect("read").and_then(|record| record.home)
    };

    assert_eq!(claim("dm:alice:bob", eu.clone()).await, eu, "the first claim wins");
    assert_eq!(claim("dm:alice:bob", us.clone()).await, eu, "a later claim for another region gets the first");
    assert_eq!(membership.channel("dm:alice:bob").await.expect("read"), None, "a claim creates no channel");
    assert_eq!(membership.home_now("dm:alice:bob").await.expect("read"), Some(eu.clone()));

    // The winner's writer creates the DM with the same home (on Cassandra a plain write over the claimed row).
    membership.apply(dm("dm:alice:bob", &eu)).await.expect("create the DM");
    let created = membership.channel("dm:alice:bob").await.expect("read").expect("created");
    assert_eq!((created.kind, created.member_count, created.home.clone()), (ChannelKind::Dm, 2, Some(eu.clone())));
    assert_eq!(claim("dm:alice:bob", us.clone()).await, eu, "a created DM keeps its home");

    // After a move, a claim answers the home the move left.
    let moved = Home { region: "us-east".into(), epoch: 2, base_seq: 17 };
    assert!(membership.move_home("dm:alice:bob", &eu, &moved, false).await.expect("move"), "the move wins");
    assert_eq!(claim("dm:alice:bob", eu.clone()).await, moved, "a claim after a move gets the moved home");
    assert_eq!(stored_home("dm:alice:bob").await, Some(moved.clone()));
    assert_eq!(membership.home_now("dm:alice:bob").await.expect("read"), Some(moved));

    // A channel created with a home answers that home; one created without (before regions) takes the claim.
    membership.apply(vec![MembershipChange::Create(record("g:homed", "alice"))]).await.expect("create");
    assert_eq!(claim("g:homed", us.clone()).await, eu);
    assert_eq!(stored_home("g:homed").await, Some(eu.clone()));
    // A deleted group's home goes with it: created again under its name, it claims a home afresh.
    membership.apply(vec![MembershipChange::Delete { channel: "g:homed".into() }]).await.expect("delete");
    assert_eq!(membership.home_now("g:homed").await.expect("read"), None, "no home left behind");
    assert_eq!(claim("g:homed", us.clone()).await, us, "claimed afresh");
    assert_eq!(claim("g:homed", eu.clone()).await, us);
    let homeless = ChannelRecord { home: None, ..record("g:homeless", "alice") };
    membership.apply(vec![MembershipChange::Create(homeless)]).await.expect("create");
    assert_eq!(claim("g:homeless", us.clone()).await, us);
    assert_eq!(claim("g:homeless", eu.clone()).await, us);
    assert_eq!(stored_home("g:homeless").await, Some(us));

    // Two regions claiming the same new DM at once are told the same home (on one keyspace, so the suite creates
    // no second one).
    for round in 0..3 {
        let channel = format!("dm:user{round}a:user{round}b");
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let racers: Vec<_> = ["eu-west", "us-east"]
            .into_iter()
            .map(|region| {
                let (membership, channel, start) = (stores.membership.clone(), channel.clone(), start.clone());
                let home = Home { region: region.into(), epoch: 1, base_seq: 0 };
                tokio::spawn(async move {
                    start.wait().await;
                    membership.claim_home(&channel, &home).await.expect("claim a home")
                })
            })
            .collect();
        let mut answers = Vec::new();
        for racer in racers {
            answers.push(racer.await.expect("claim task"));
        }
        assert_eq!(answers[0], answers[1], "round {round}: both regions are told the same home");
        assert!(["eu-west", "us-east"].contains(&answers[0].region.as_str()), "round {round}: {answers:?}");
        assert_eq!(
            stores.membership.home_now(&channel).await.expect("read"),
            Some(answers[0].clone()),
            "round {round}: the store holds the home both were told"
        );
    }
    stores.finish().await;
}

async fn a_deleted_channel_leaves_no_member_list_or_access_behind(engine: Engine) {
    use parley_core::access::Access;
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let mut changes = vec![MembershipChange::Create(record("g:gone", "alice"))];
    // More members than one Cassandra batch holds.
    let users: Vec<String> = (0..250).map(|n| format!("user{n:03}")).collect();
    changes.extend(users.iter().map(|user| add("g:gone", user)));
    changes.push(MembershipChange::SetAccess {
        channel: "g:gone".into(),
        user: "user000".into(),
        access: Some(Access::Owner),
    });
    changes.push(MembershipChange::Create(record("g:kept", "alice")));
    changes.push(add("g:kept", "user001"));
    membership.apply(changes).await.expect("create");
    membership
        .apply(vec![MembershipChange::Delete { channel: "g:gone".into() }, add("g:kept", "user002")])
        .await
        .expect("delete");
    assert_eq!(membership.channel("g:gone").await.expect("read"), None);
    assert!(membership.members("g:gone").await.expect("members").is_empty());
    assert!(membership.access("g:gone").await.expect("access").is_empty());
    assert_eq!(membership.user_channels("user001").await.expect("channels"), vec!["g:kept"]);
    assert!(membership.user_channels("user100").await.expect("channels").is_empty());
    assert_eq!(membership.members("g:kept").await.expect("kept"), vec!["user001", "user002"], "after it, in order");
    // Created again: a fresh record, counted from zero.
    let again = ChannelRecord { history_from: 7, ..record("g:gone", "bob") };
    membership.apply(vec![MembershipChange::Create(again.clone()), add("g:gone", "bob")]).await.expect("again");
    assert_eq!(membership.channel("g:gone").await.expect("read"), Some(ChannelRecord { member_count: 1, ..again }));
}

async fn a_key_names_its_first_message_whatever_the_write_order(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let store = &stores.messages;
    let base = now_ms();
    let mut first = message("g:keys", 1, base);
    let mut second = message("g:keys", 2, base + 1);
    let mut third = message("g:keys", 3, base + 2);
    for message in [&mut first, &mut second, &mut third] {
        message.client_msg_id = "reused".into();
    }
    // The later message is written before the earlier one (a replay after a crash can do that).
    store.write(vec![second.clone()]).await.expect("write second");
    store.write(vec![first.clone()]).await.expect("write first");
    store.write(vec![third]).await.expect("write third");
    let found = store.find_stored_sends(vec![(first.sender.clone(), "reused".into())]).await.expect("find");
    let found = found.into_iter().next().flatten().expect("the key is stored");
    assert_eq!((found.placement.seq, found.placement.id), (1, first.id), "the key names its first message");
}

async fn access_settings_and_blocks_are_stored(engine: Engine) {
    use parley_core::access::{Access, Posting, Visibility};
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let private = ChannelRecord { visibility: Visibility::Private, ..record("g:vault", "alice") };
    let access = |user: &str, access: Option<Access>| MembershipChange::SetAccess {
        channel: "g:vault".into(),
        user: user.into(),
        access,
    };
    membership
        .apply(vec![
            MembershipChange::Create(private.clone()),
            add("g:vault", "alice"),
            add("g:vault", "bob"),
            access("alice", Some(Access::Owner)),
            access("carol", Some(Access::Invited)),
            access("mallory", Some(Access::Banned)),
            // Set and cleared in one change set: nothing stays.
            access("dave", Some(Access::Admin)),
            access("dave", None),
        ])
        .await
        .expect("create");
    let stored = membership.channel("g:vault").await.expect("channel").expect("exists");
    assert_eq!((stored.visibility, stored.posting, stored.member_count), (Visibility::Private, Posting::Everyone, 2));
    let mut listed = membership.access("g:vault").await.expect("access");
    listed.sort_by(|left, right| left.0.cmp(&right.0));
    assert_eq!(
        listed,
        vec![
            ("alice".to_owned(), Access::Owner),
            ("carol".to_owned(), Access::Invited),
            ("mallory".to_owned(), Access::Banned)
        ]
    );
    assert_eq!(membership.access_of("g:vault", "bob").await.expect("bob"), None, "a plain member");
    assert_eq!(membership.access_of("g:vault", "dave").await.expect("dave"), None);
    membership
        .apply(vec![
            access("bob", Some(Access::Admin)),
            access("carol", None),
            MembershipChange::Configure {
                channel: "g:vault".into(),
                visibility: Visibility::Public,
                posting: Posting::Admins,
            },
            MembershipChange::SetBlock { user: "alice".into(), other: "eve".into(), blocked: true },
            MembershipChange::SetBlock { user: "alice".into(), other: "mallory".into(), blocked: true },
        ])
        .await
        .expect("update");
    assert_eq!(membership.access_of("g:vault", "bob").await.expect("bob"), Some(Access::Admin));
    assert_eq!(membership.access_of("g:vault", "carol").await.expect("carol"), None);
    let stored = membership.channel("g:vault").await.expect("channel").expect("exists");
    assert_eq!((stored.visibility, stored.posting, stored.member_count), (Visibility::Public, Posting::Admins, 2));
    let mut blocked = membership.blocked("alice").await.expect("blocked");
    blocked.sort();
    assert_eq!(blocked, vec!["eve", "mallory"]);
    membership
        .apply(vec![MembershipChange::SetBlock { user: "alice".into(), other: "eve".into(), blocked: false }])
        .await
        .expect("unblock");
    assert_eq!(membership.blocked("alice").await.expect("blocked"), vec!["mallory"]);
    assert!(membership.blocked("eve").await.expect("none").is_empty());
}

async fn history_pages_both_ways_across_buckets(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let store = &stores.messages;
    // 50 messages, four per second: 13 one-second buckets. Written out of order, in several batches.
    let base = now_ms() / 1000 * 1000;
    let mut all: Vec<MessageView> = (1..=50).map(|seq| message("g:paging", seq, base + seq * 250)).collect();
    all.reverse();
    for chunk in all.chunks(9) {
        store.write(chunk.to_vec()).await.expect("write");
    }
    store.write(vec![message("g:other", 1, base)]).await.expect("write other");

    // Newest first, page by page, back to the start.
    let mut before = None;
    let mut collected = Vec::new();
    let mut pages = 0;
    loop {
        let page = store.history("g:paging", HistoryQuery { before, after: None, limit: 7 }).await.expect("page");
        pages += 1;
        assert!(page.messages.windows(2).all(|pair| pair[0].seq + 1 == pair[1].seq), "ascending within a page");
        let mut page_seqs = seqs(&page.messages);
        page_seqs.extend(collected);
        collected = page_seqs;
        before = page.messages.first().map(|message| message.seq);
        if !page.has_more {
            break;
        }
        assert_eq!(page.messages.len(), 7);
    }
    assert_eq!(collected, (1..=50).collect::<Vec<_>>());
    assert_eq!(pages, 8);

    // Oldest first with `after`.
    let mut after = 0;
    let mut forward = Vec::new();
    loop {
        let page = store.history("g:paging", HistoryQuery { before: None, after: Some(after), limit: 7 }).await;
        let page = page.expect("page");
        forward.extend(seqs(&page.messages));
        after = page.messages.last().map(|message| message.seq).unwrap_or(after);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(forward, (1..=50).collect::<Vec<_>>());

    // Both bounds, a page that hits the upper bound exactly, an empty range, limit 0 as 1, the full message.
    let window = store.history("g:paging", HistoryQuery { before: Some(20), after: Some(10), limit: 5 }).await;
    let window = window.expect("window");
    assert_eq!(seqs(&window.messages), vec![11, 12, 13, 14, 15]);
    assert!(window.has_more);
    let exact = store.history("g:paging", HistoryQuery { before: Some(20), after: Some(14), limit: 5 }).await;
    let exact = exact.expect("exact");
    assert_eq!(seqs(&exact.messages), vec![15, 16, 17, 18, 19]);
    assert!(!exact.has_more);
    let empty = store.history("g:paging", HistoryQuery { before: Some(5), after: Some(4), limit: 5 }).await;
    assert_eq!(empty.expect("empty").messages, vec![]);
    let one = store.history("g:paging", HistoryQuery { before: None, after: None, limit: 0 }).await.expect("one");
    assert_eq!(one.messages, vec![message("g:paging", 50, base + 50 * 250)]);
    assert!(one.has_more);
    let newest = store.history("g:paging", HistoryQuery { before: Some(51), after: None, limit: 50 }).await;
    let newest = newest.expect("all");
    assert_eq!(newest.messages.len(), 50);
    assert!(!newest.has_more);
    let unknown = store.history("g:nothing", HistoryQuery { limit: 10, ..Default::default() }).await.expect("none");
    assert!(unknown.messages.is_empty() && !unknown.has_more);
    let other = store.history("g:other", HistoryQuery { limit: 10, ..Default::default() }).await.expect("other");
    assert_eq!(seqs(&other.messages), vec![1]);
    stores.finish().await;
}

async fn rewriting_changes_nothing(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let store = &stores.messages;
    let base = now_ms();
    let batch: Vec<MessageView> = (1..=10).map(|seq| message("g:again", seq, base + seq * 300)).collect();
    store.write(batch.clone()).await.expect("write");
    let query = HistoryQuery { limit: 100, ..Default::default() };
    let first = store.history("g:again", query).await.expect("history");
    store.write(batch.clone()).await.expect("rewrite");
    store.write(batch[3..6].to_vec()).await.expect("partial rewrite");
    let second = store.history("g:again", query).await.expect("history");
    assert_eq!(first, second);
    assert_eq!(second.messages, batch);
    assert_eq!(store.last_stored_seq("g:again").await.expect("last"), 10);
    assert_eq!(store.first_retained_seq("g:again").await.expect("first"), 1);
    stores.finish().await;
}

async fn last_stored_seq_is_the_highest_written(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let store = &stores.messages;
    let base = now_ms();
    assert_eq!(store.last_stored_seq("g:last").await.expect("empty"), 0);
    store.write(vec![message("g:last", 5, base + 5)]).await.expect("write 5");
    assert_eq!(store.last_stored_seq("g:last").await.expect("after 5"), 5);
    // An older message arriving late does not lower it.
    store.write(vec![message("g:last", 3, base + 3), message("g:last", 4, base + 4)]).await.expect("write 3-4");
    assert_eq!(store.last_stored_seq("g:last").await.expect("after 3"), 5);
    store.write(vec![message("g:last", 9, base + 1900)]).await.expect("write 9");
    assert_eq!(store.last_stored_seq("g:last").await.expect("after 9"), 9);
    assert_eq!(store.last_stored_seq("g:elsewhere").await.expect("other"), 0);
    stores.finish().await;
}

async fn stored_sends_are_found_by_key(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let store = &stores.messages;
    let base = now_ms();
    let mut bob = message("g:sends", 2, base + 2);
    bob.sender = "bob".into();
    bob.client_msg_id = "same-id".into();
    let mut alice = message("g:sends", 1, base + 1);
    alice.client_msg_id = "same-id".into();
    store.write(vec![alice.clone(), bob.clone(), message("g:sends", 3, base + 3)]).await.expect("write");
    let found = store
        .find_stored_sends(vec![
            ("bob".into(), "same-id".into()),
            ("carol".into(), "same-id".into()),
            ("alice".into(), "same-id".into()),
            ("alice".into(), "g:sends-c3".into()),
        ])
        .await
        .expect("find");
    assert_eq!(found.len(), 4);
    let bob_found = found[0].as_ref().expect("bob's send");
    assert_eq!(bob_found.channel, "g:sends");
    assert_eq!((bob_found.placement.seq, bob_found.placement.id, bob_found.placement.ts), (2, bob.id, bob.ts));
    assert!(found[1].is_none());
    assert_eq!(found[2].as_ref().map(|prior| prior.placement.seq), Some(1));
    assert_eq!(found[3].as_ref().map(|prior| prior.placement.seq), Some(3));
    assert!(store.find_stored_sends(vec![]).await.expect("none").is_empty());
    // A store batch larger than one batch of keys (the Cassandra driver writes them ten at a time): every key.
    let many: Vec<_> = (10..35).map(|seq| message("g:many-sends", seq, base + seq)).collect();
    store.write(many.clone()).await.expect("write many");
    let keys = many.iter().map(|sent| (sent.sender.clone(), sent.client_msg_id.clone())).collect();
    let found = store.find_stored_sends(keys).await.expect("find many");
    let seqs: Vec<Option<u64>> = found.iter().map(|prior| prior.as_ref().map(|prior| prior.placement.seq)).collect();
    assert_eq!(seqs, (10..35).map(Some).collect::<Vec<_>>());
    stores.finish().await;
}

async fn retention_expires_old_messages_and_raises_the_floor(engine: Engine) {
    let Some(stores) = Stores::open(engine, Some(SHORT_RETENTION)).await else { return };
    let store = &stores.messages;
    let old = now_ms() - 60_000;
    store.write(vec![message("g:kept", 1, old), message("g:kept", 2, old + 1)]).await.expect("write old");
    store.write(vec![message("g:gone", 1, old), message("g:gone", 2, old + 1200)]).await.expect("write old");
    assert_eq!(store.first_retained_seq("g:kept").await.expect("floor"), 1);
    assert_eq!(store.first_retained_seq("g:never").await.expect("floor"), 1);
    stores.expire(&["g:kept", "g:gone"]).await;
    store.write(vec![message("g:kept", 3, now_ms())]).await.expect("write new");
    if let Some((embedded, _)) = &stores.embedded {
        // The sweep only drops old buckets: the message just written stays.
        embedded.sweep(now_ms()).await.expect("sweep");
    }
    assert_eq!(store.first_retained_seq("g:kept").await.expect("floor"), 3);
    let page = store.history("g:kept", HistoryQuery { limit: 10, ..Default::default() }).await.expect("page");
    assert_eq!(seqs(&page.messages), vec![3]);
    assert!(!page.has_more);
    // Every message of a channel expired: the floor is one past its last stored sequence.
    assert_eq!(store.first_retained_seq("g:gone").await.expect("floor"), 3);
    assert_eq!(store.last_stored_seq("g:gone").await.expect("last"), 2);
    let empty = store.history("g:gone", HistoryQuery { limit: 10, ..Default::default() }).await.expect("page");
    assert!(empty.messages.is_empty() && !empty.has_more);
    // Idempotency keys expire with their messages.
    let found = store.find_stored_sends(vec![("alice".into(), "g:gone-c1".into())]).await.expect("find");
    assert!(found[0].is_none());
    stores.finish().await;
}

async fn membership_counts_follow_adds_and_removes(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    assert_eq!(membership.channel("g:club").await.expect("missing"), None);
    membership
        .apply(vec![
            MembershipChange::Create(record("g:club", "alice")),
            add("g:club", "alice"),
            add("g:club", "bob"),
            add("g:club", "bob"),
        ])
        .await
        .expect("create");
    let created = membership.channel("g:club").await.expect("channel").expect("exists");
    assert_eq!(created, ChannelRecord { member_count: 2, ..record("g:club", "alice") });
    assert_eq!(membership.members("g:club").await.expect("members"), vec!["alice", "bob"]);
    membership
        .apply(vec![add("g:club", "carol"), remove("g:club", "alice"), remove("g:club", "dave")])
        .await
        .expect("apply");
    assert_eq!(membership.channel("g:club").await.expect("get").map(|record| record.member_count), Some(2));
    assert_eq!(membership.members("g:club").await.expect("members"), vec!["bob", "carol"]);
    assert!(!membership.is_member("g:club", "alice").await.expect("alice"));
    assert!(membership.is_member("g:club", "carol").await.expect("carol"));
    // Removing and adding back in one change set.
    membership.apply(vec![remove("g:club", "bob"), add("g:club", "bob"), add("g:club", "alice")]).await.expect("apply");
    assert_eq!(membership.channel("g:club").await.expect("get").map(|record| record.member_count), Some(3));
    assert_eq!(membership.members("g:club").await.expect("members"), vec!["alice", "bob", "carol"]);
    membership.apply(vec![add("g:club", "dave"), remove("g:club", "dave")]).await.expect("apply");
    assert!(!membership.is_member("g:club", "dave").await.expect("dave"));
    assert!(membership.user_channels("dave").await.expect("dave").is_empty());
    assert_eq!(membership.channel("g:club").await.expect("get").map(|record| record.member_count), Some(3));
    // A DM record keeps its kind.
    let dm = ChannelRecord { kind: ChannelKind::Dm, ..record("dm:alice:bob", "alice") };
    membership
        .apply(vec![MembershipChange::Create(dm.clone()), add("dm:alice:bob", "alice"), add("dm:alice:bob", "bob")])
        .await
        .expect("dm");
    assert_eq!(membership.channel("dm:alice:bob").await.expect("dm"), Some(ChannelRecord { member_count: 2, ..dm }));
    membership.apply(vec![]).await.expect("nothing");
    stores.finish().await;
}

async fn user_channels_lists_every_channel_of_a_user(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let mut changes = Vec::new();
    for channel in ["g:c", "g:a", "g:b"] {
        changes.push(MembershipChange::Create(record(channel, "alice")));
        changes.push(add(channel, "alice"));
    }
    changes.push(add("g:b", "bob"));
    membership.apply(changes).await.expect("apply");
    assert_eq!(membership.user_channels("alice").await.expect("alice"), vec!["g:a", "g:b", "g:c"]);
    assert_eq!(membership.user_channels("bob").await.expect("bob"), vec!["g:b"]);
    membership.apply(vec![remove("g:b", "alice")]).await.expect("leave");
    assert_eq!(membership.user_channels("alice").await.expect("alice"), vec!["g:a", "g:c"]);
    assert!(membership.user_channels("nobody").await.expect("nobody").is_empty());
    stores.finish().await;
}

async fn read_cursor_never_moves_back(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    assert_eq!(membership.read_seq("alice", "g:read").await.expect("none"), 0);
    assert_eq!(membership.set_read("alice", "g:read", 5).await.expect("5"), 5);
    assert_eq!(membership.set_read("alice", "g:read", 3).await.expect("3"), 5);
    assert_eq!(membership.read_seq("alice", "g:read").await.expect("read"), 5);
    // Out-of-order concurrent writes: the highest wins.
    let mut order: Vec<u64> = (1..=60).collect();
    order.reverse();
    order.swap(0, 30);
    let writes = order.into_iter().map(|seq| {
        let membership = membership.clone();
        tokio::spawn(async move { membership.set_read("alice", "g:read", seq).await })
    });
    for write in writes.collect::<Vec<_>>() {
        let cursor = write.await.expect("task").expect("set read");
        assert!(cursor >= 5, "{cursor}");
    }
    assert_eq!(membership.read_seq("alice", "g:read").await.expect("read"), 60);
    assert_eq!(membership.set_read("alice", "g:read", 59).await.expect("59"), 60);
    assert_eq!(membership.read_seq("bob", "g:read").await.expect("other user"), 0);
    assert_eq!(membership.read_seq("alice", "g:other").await.expect("other channel"), 0);
    stores.finish().await;
}

async fn large_channel_members_are_listed_in_full(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let membership = &stores.membership;
    let users: Vec<String> = (0..10_000).map(|index| format!("user{index:05}")).collect();
    let mut changes = vec![MembershipChange::Create(record("g:big", "user00000"))];
    changes.extend(users.iter().map(|user| add("g:big", user)));
    membership.apply(changes).await.expect("create big");
    assert_eq!(membership.channel("g:big").await.expect("get").map(|record| record.member_count), Some(10_000));
    assert_eq!(membership.members("g:big").await.expect("members"), users);
    let leaving: Vec<MembershipChange> = users.iter().step_by(100).map(|user| remove("g:big", user)).collect();
    membership.apply(leaving).await.expect("leave");
    assert_eq!(membership.channel("g:big").await.expect("get").map(|record| record.member_count), Some(9_900));
    let listed = membership.members("g:big").await.expect("members");
    assert_eq!(listed.len(), 9_900);
    assert!(!listed.contains(&"user00100".to_owned()));
    assert_eq!(membership.user_channels("user00101").await.expect("channels"), vec!["g:big"]);
    assert!(membership.user_channels("user00100").await.expect("channels").is_empty());
    stores.finish().await;
}

/// The router's single writer with the engine as its membership and message store. The log stays embedded;
/// with Cassandra, a task writes every durable message to the store, as a log consumer would.
async fn router_writer_runs_on_the_store(engine: Engine) {
    let Some(stores) = Stores::open(engine, None).await else { return };
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = match &stores.embedded {
        Some((store, _)) => store.clone(),
        None => EmbeddedStore::open(log_dir.path(), Retention::default()).expect("log"),
    };
    let (tap, mut durable) = mpsc::channel(1024);
    let (router, _writer) = parley_router::start_with_tap(
        RouterConfig::default(),
        Arc::new(log),
        stores.messages.clone(),
        stores.membership.clone(),
        Arc::new(LocalPubSub::new()),
        Some(tap),
    )
    .expect("router");
    let store = stores.messages.clone();
    let follow_log = engine == Engine::Cassandra;
    let follower = tokio::spawn(async move {
        while let Some(message) = durable.recv().await {
            if follow_log {
                store.write(vec![message.message]).await.expect("store write");
            }
        }
    });
    let alice = UserId::new("alice").expect("user");
    let bob = UserId::new("bob").expect("user");
    router.create_channel(&alice, "team", &["bob".to_owned()]).await.expect("create");
    for index in 1..=20 {
        let outcome = router.send(&alice, "g:team", &format!("m{index}"), &format!("hello {index}")).await;
        assert_eq!(outcome.expect("send").placement.seq, index);
    }
    let retry = router.send(&alice, "g:team", "m3", "hello 3").await.expect("retry");
    assert!(retry.duplicate && retry.placement.seq == 3);
    // The history is read from the store, which the follower (Cassandra) fills from the log.
    let page = parley_test_support::eventually("the 20 messages in the history", Duration::from_secs(30), || async {
        let page = router.history(&bob, "g:team", HistoryQuery { limit: 50, ..Default::default() }).await;
        Some(page.expect("history")).filter(|page| page.messages.len() == 20)
    })
    .await;
    assert_eq!(seqs(&page.messages), (1..=20).collect::<Vec<_>>());
    assert_eq!(page.messages[4].text, "hello 5");
    assert_eq!(router.members(&bob, "g:team").await.expect("members"), vec!["alice", "bob"]);
    router.leave(&bob, "g:team").await.expect("leave");
    assert_eq!(router.members(&alice, "g:team").await.expect("members"), vec!["alice"]);
    assert_eq!(router.mark_read(&alice, "g:team", 12).await.expect("read"), 12);
    assert_eq!(router.mark_read(&alice, "g:team", 4).await.expect("read"), 12);
    let views = router.list_channels(&alice).await.expect("channels");
    assert_eq!(
        views.iter().map(|view| (view.id.as_str(), view.members, view.last_seq)).collect::<Vec<_>>(),
        vec![("g:team", 1, 20)]
    );
    drop(router);
    follower.await.expect("follower");
    stores.finish().await;
}

/// An unreachable cluster is a clear `Unavailable` error, quickly (within the connect timeout, twice the 2 s
/// request timeout), and never a panic. Needs no engine. On tokio's paused clock: the time is measured in tokio
/// time, which the driver's timers follow, so the bound holds however loaded the machine is.
#[tokio::test(start_paused = true)]
async fn unreachable_cassandra_is_unavailable() {
    let mut config = CassandraConfig::new(vec!["127.0.0.1:1".into()], "parley_unreachable");
    config.request_timeout = Duration::from_secs(2);
    let started = tokio::time::Instant::now();
    let error = CassandraStore::connect(config).await.expect_err("nothing listens on port 1");
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
    assert!(error.to_string().contains("cannot connect to cassandra at 127.0.0.1:1"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// Invalid configuration is refused before anything is sent. Needs no engine.
#[tokio::test]
async fn invalid_cassandra_config_is_refused() {
    let config = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "bad-name; DROP");
    let error = CassandraStore::connect(config).await.expect_err("bad keyspace");
    assert!(matches!(error, BackendError::InvalidConfig(_)), "{error:?}");
    let mut config = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "fine");
    config.retention = Some(Duration::ZERO);
    assert!(matches!(CassandraStore::connect(config).await, Err(BackendError::InvalidConfig(_))));
    assert!(CassandraConfig::parse_consistency("local_quorum").is_ok());
    assert!(matches!(CassandraConfig::parse_consistency("most"), Err(BackendError::InvalidConfig(_))));
}

/// Two processes starting at once both run the migrations; the schema ends up applied once, and a third
/// connect applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_harmless() {
    let Some(config) = cassandra_config(None) else { return };
    let (first, second) = tokio::join!(connect(config.clone()), connect(config.clone()));
    let base = now_ms();
    first.write(vec![message("g:both", 1, base)]).await.expect("write through first");
    let page = second.history("g:both", HistoryQuery { limit: 5, ..Default::default() }).await.expect("read");
    assert_eq!(seqs(&page.messages), vec![1]);
    let third = connect(config).await;
    assert_eq!(third.last_stored_seq("g:both").await.expect("last"), 1);
    first.drop_keyspace().await.expect("drop");
}

/// The inbox orders a user's channels by their last stored message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_orders_channels_by_last_activity() {
    let Some(config) = cassandra_config(None) else { return };
    let store = connect(config).await;
    let mut changes = Vec::new();
    for channel in ["g:quiet", "g:busy", "g:new", "g:empty"] {
        changes.push(MembershipChange::Create(record(channel, "alice")));
        changes.push(add(channel, "alice"));
    }
    store.apply(changes).await.expect("apply");
    let base = now_ms();
    store
        .write(vec![message("g:quiet", 1, base), message("g:busy", 1, base + 10), message("g:new", 1, base + 20)])
        .await
        .expect("write");
    store.write(vec![message("g:busy", 2, base + 30)]).await.expect("write");
    let inbox = store.inbox("alice").await.expect("inbox");
    let order: Vec<(&str, u64)> = inbox.iter().map(|entry| (entry.channel.as_str(), entry.last_seq)).collect();
    assert_eq!(order, vec![("g:busy", 2), ("g:new", 1), ("g:quiet", 1), ("g:empty", 0)]);
    store.drop_keyspace().await.expect("drop");
}
