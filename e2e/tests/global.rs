//! Two regions on loopback, each with its own Kafka, Redis, router and gateway, one Cassandra cluster with a
//! datacenter per region, and MirrorMaker 2 carrying each region's topics to the other (the real engines of
//! `e2e/stack/up.sh --region2`).
//!
//! - `users_of_two_regions_share_channels_and_dms`: a watcher in one region hears a user of the other go online,
//!   away and offline; users homed in each region chat in a group channel homed in one region and in a DM homed
//!   in the other; every client sees one identical, gap-free order, equal to the stored history, and the history
//!   read through either region is the same.
//! - `clients_of_a_region_whose_gateways_die_resume_in_the_other`: every gateway of a region dies; its clients
//!   reconnect to the other region's gateway, resume gap-free and keep chatting.
//!
//! Needs the first region's engines (`PARLEY_REDIS_URL`, `PARLEY_KAFKA_BOOTSTRAP`, `PARLEY_CASSANDRA_CONTACT`)
//! and the second's (`PARLEY_KAFKA_B_BOOTSTRAP`, `PARLEY_REDIS_B_URL`, `PARLEY_CASSANDRA_CONTACT_DC2`,
//! `PARLEY_MM2_RUN`, `PARLEY_KAFKA_CLIENT_PROPERTIES`, `PARLEY_CQL`).

use parley_client::{Client, Status};
use parley_e2e::observe::{
    check_one_order, received, record, stored_at_least, stored_messages, wait_presence, wait_received, Seen,
};
use parley_e2e::regions::{engines, World, WorldOptions, ADMIN_TOKEN};
use parley_test_support::report;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One test of this file at a time: each starts two regions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until `seen` was told it is a member of `channel` (a membership change that crossed the regions).
async fn wait_member(seen: &Arc<Mutex<Seen>>, channel: &str, world: &World) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if seen.lock().expect("seen").channels.iter().any(|known| known == channel) {
            return;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "a client of the other region never learned it is a member of {channel}; MirrorMaker 2:\n{}",
        world.mm2_log()
    );
}

/// Sends `count` messages from `client` to `channel`, paced, and returns their sequences.
fn stream(client: Client, name: String, channel: String, count: usize) -> tokio::task::JoinHandle<(Client, Vec<u64>)> {
    tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(count);
        for n in 0..count {
            let receipt = client
                .send_with_id(channel.clone(), format!("{name}-{n}"), format!("{name} says {n}"))
                .await
                .unwrap_or_else(|error| panic!("{name} send {n} to {channel} failed: {error}"));
            seqs.push(receipt.seq);
            // Pacing: the regions' senders interleave.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (client, seqs)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_two_regions_share_channels_and_dms() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    let world = World::start(&engines).await;
    const PER_SENDER: usize = 40;
    // alice and carol are homed in eu (region 0), bob and dave in us (region 1).
    let users = [("alice", 0), ("carol", 0), ("bob", 1), ("dave", 1)];
    let mut clients = HashMap::new();
    for (user, region) in users {
        let (client, events) = Client::connect(world.config(region, user)).await.expect("connect");
        clients.insert(user, (client, record(events)));
    }
    // Presence crosses the regions: dave (us) watches zoe, who connects to eu.
    let dave_now = clients["dave"].0.watch_presence(["zoe"]).await.expect("dave watches zoe");
    assert_eq!(dave_now[0].status, Status::Offline);
    let presence_started = Instant::now();
    let (zoe, _zoe_events) = Client::connect(world.config(0, "zoe")).await.expect("zoe connects to eu");
    let within = Duration::from_secs(60);
    let heard = wait_presence(&clients["dave"].1, "zoe", Status::Online, 0, within).await;
    let online_after = presence_started.elapsed();
    zoe.set_away(true).await.expect("zoe is away");
    let heard = wait_presence(&clients["dave"].1, "zoe", Status::Away, heard, within).await;
    zoe.close().await;
    wait_presence(&clients["dave"].1, "zoe", Status::Offline, heard, within).await;
    report(&format!(
        "presence across regions: a watcher in us heard a user of eu online {online_after:?} after she connected, \
         then away, then offline"
    ));

    let group = "g:world".to_owned();
    // A group homed in eu, with members of both regions.
    clients["alice"].0.create_channel("world", ["carol", "bob", "dave"]).await.expect("create the group in eu");
    for user in ["bob", "dave"] {
        wait_member(&clients[user].1, &group, &world).await;
    }
    // A DM homed in us, opened by bob with carol of eu.
    let dm = clients["bob"].0.open_dm("carol").await.expect("bob opens a DM in us").id;
    wait_member(&clients["carol"].1, &dm, &world).await;

    let started = Instant::now();
    let mut streams = Vec::new();
    for (user, _) in users {
        streams.push(stream(clients[user].0.clone(), user.to_owned(), group.clone(), PER_SENDER));
    }
    streams.push(stream(clients["bob"].0.clone(), "bob-dm".into(), dm.clone(), PER_SENDER));
    streams.push(stream(clients["carol"].0.clone(), "carol-dm".into(), dm.clone(), PER_SENDER));
    let mut confirmed = 0;
    for handle in streams {
        let (_, seqs) =
            tokio::time::timeout(Duration::from_secs(120), handle).await.expect("senders done").expect("sender");
        confirmed += seqs.len();
    }
    let sending = started.elapsed();

    let group_seen: Vec<(&str, &Arc<Mutex<Seen>>)> = users.iter().map(|(user, _)| (*user, &clients[user].1)).collect();
    let dm_seen = [("bob", &clients["bob"].1), ("carol", &clients["carol"].1)];
    let all: Vec<&Arc<Mutex<Seen>>> = group_seen.iter().map(|(_, seen)| *seen).collect();
    wait_received(&all, &group, 4 * PER_SENDER, Duration::from_secs(60)).await;
    wait_received(&[&clients["bob"].1, &clients["carol"].1], &dm, 2 * PER_SENDER, Duration::from_secs(60)).await;

    // The history read through each region (carried to the channel's home) is the same.
    let group_history = stored_at_least(&clients["alice"].0, &group, 4 * PER_SENDER).await;
    assert_eq!(stored_at_least(&clients["dave"].0, &group, 4 * PER_SENDER).await, group_history);
    let dm_history = stored_at_least(&clients["carol"].0, &dm, 2 * PER_SENDER).await;
    assert_eq!(stored_at_least(&clients["bob"].0, &dm, 2 * PER_SENDER).await, dm_history);
    assert_eq!(group_history.len(), 4 * PER_SENDER, "every confirmed group message is stored once");
    assert_eq!(dm_history.len(), 2 * PER_SENDER, "every confirmed DM message is stored once");
    check_one_order(&group, &group_seen, &group_history);
    check_one_order(&dm, &dm_seen, &dm_history);
    report(&format!(
        "two regions: {confirmed} sends confirmed in {sending:?} (half of them carried to the other region); \
         {} messages shown, each client in one identical order; 0 lost, 0 duplicated",
        4 * 4 * PER_SENDER + 2 * 2 * PER_SENDER
    ));
    for (client, _) in clients.values() {
        client.close().await;
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_region_whose_gateways_die_resume_in_the_other() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    let mut world = World::start(&engines).await;
    const BEFORE: usize = 30;
    const AFTER: usize = 30;
    let (erin, erin_events) = Client::connect(world.config(0, "erin")).await.expect("erin connects to eu");
    let (fred, fred_events) = Client::connect(world.config(1, "fred")).await.expect("fred connects to us");
    let (erin_seen, fred_seen) = (record(erin_events), record(fred_events));
    let channel = "g:resume".to_owned();
    erin.create_channel("resume", ["fred"]).await.expect("erin creates a channel in eu");
    wait_member(&fred_seen, &channel, &world).await;
    let (fred, _) = stream(fred.clone(), "fred".into(), channel.clone(), BEFORE).await.expect("fred streams");
    wait_received(&[&erin_seen], &channel, BEFORE, Duration::from_secs(30)).await;

    // Every gateway of eu dies (kill -9). fred (us) keeps sending meanwhile; erin reconnects to us.
    let killed_at = Instant::now();
    world.gateways[0].child.start_kill().expect("kill -9 the eu gateway");
    let _ = world.gateways[0].child.wait().await;
    let during = stream(fred.clone(), "fred-during".into(), channel.clone(), AFTER);
    let (_, _) = tokio::time::timeout(Duration::from_secs(120), during).await.expect("fred done").expect("fred");
    // erin, now on the us gateway, keeps chatting in the channel homed in eu.
    let (erin, _) = stream(erin.clone(), "erin-after".into(), channel.clone(), AFTER).await.expect("erin streams");
    let total = BEFORE + 2 * AFTER;
    wait_received(&[&erin_seen, &fred_seen], &channel, total, Duration::from_secs(60)).await;
    let history = stored_at_least(&fred, &channel, total).await;
    assert_eq!(history.len(), total, "every confirmed message is stored once");
    check_one_order(&channel, &[("erin", &erin_seen), ("fred", &fred_seen)], &history);
    let resumed = erin_seen
        .lock()
        .expect("seen")
        .connected
        .iter()
        .find(|at| **at > killed_at)
        .map(|at| at.duration_since(killed_at));
    let resumed = resumed.expect("erin reconnected to the other region's gateway");
    report(&format!(
        "cross-region resume: the eu gateway was killed; its client resumed on the us gateway after {resumed:?}, \
         gap-free ({total} messages, one order on both clients)"
    ));
    erin.close().await;
    fred.close().await;
    world.stop().await;
}

/// Moves `channel`'s home to `region` through the server API of `gateway`'s region; the old home's last sequence.
async fn move_home(world: &World, gateway: usize, channel: &str, region: &str) -> (u64, Duration) {
    let started = Instant::now();
    let response = parley_test_support::http::request(
        world.gateways[gateway].address,
        "PUT",
        &format!("/server/v1/channels/{channel}/home"),
        Some(ADMIN_TOKEN),
        &format!(r#"{{"region":"{region}"}}"#),
    )
    .await;
    assert_eq!(response.status, 200, "moving {channel} to {region}: {}", response.body);
    let last = response.json()["last_seq"].as_u64().expect("last_seq");
    (last, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_home_moves_between_regions_under_load_without_loss() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    let world = World::start(&engines).await;
    const PER_SENDER: usize = 80;
    let (gina, gina_events) = Client::connect(world.config(0, "gina")).await.expect("gina connects to eu");
    let (hugo, hugo_events) = Client::connect(world.config(1, "hugo")).await.expect("hugo connects to us");
    let (gina_seen, hugo_seen) = (record(gina_events), record(hugo_events));
    let channel = "g:mover".to_owned();
    gina.create_channel("mover", ["hugo"]).await.expect("gina creates a channel in eu");
    wait_member(&hugo_seen, &channel, &world).await;
    let first = stream(gina.clone(), "gina".into(), channel.clone(), PER_SENDER);
    let second = stream(hugo.clone(), "hugo".into(), channel.clone(), PER_SENDER);
    // Mid-stream: the home moves to us, then back to eu, while both keep sending.
    wait_received(&[&hugo_seen], &channel, PER_SENDER / 2, Duration::from_secs(60)).await;
    let (to_us, to_us_took) = move_home(&world, 1, &channel, "us").await;
    wait_received(&[&hugo_seen], &channel, PER_SENDER, Duration::from_secs(60)).await;
    let (to_eu, to_eu_took) = move_home(&world, 0, &channel, "eu").await;
    let (_, gina_seqs) = tokio::time::timeout(Duration::from_secs(120), first).await.expect("gina done").expect("gina");
    let (_, hugo_seqs) =
        tokio::time::timeout(Duration::from_secs(120), second).await.expect("hugo done").expect("hugo");
    let total = 2 * PER_SENDER;
    let mut confirmed: Vec<u64> = gina_seqs.iter().chain(&hugo_seqs).copied().collect();
    confirmed.sort_unstable();
    assert_eq!(confirmed, (1..=total as u64).collect::<Vec<_>>(), "every send confirmed once, gap-free");
    assert!(to_us < to_eu, "the second move continued after the first ({to_us} then {to_eu})");
    wait_received(&[&gina_seen, &hugo_seen], &channel, total, Duration::from_secs(60)).await;
    let history = stored_at_least(&gina, &channel, total).await;
    assert_eq!(stored_at_least(&hugo, &channel, total).await, history, "both regions read one history");
    check_one_order(&channel, &[("gina", &gina_seen), ("hugo", &hugo_seen)], &history);
    report(&format!(
        "planned home moves under load: eu -> us after seq {to_us} took {to_us_took:?}, us -> eu after seq {to_eu} \
         took {to_eu_took:?}; {total} messages confirmed, stored and shown once each, in one order"
    ));
    gina.close().await;
    hugo.close().await;
    world.stop().await;
}

/// Marks `region` failed (or back) through the server API of `gateway`'s region.
async fn set_region_failed(world: &World, gateway: usize, region: &str, failed: bool) {
    let response = parley_test_support::http::request(
        world.gateways[gateway].address,
        "PUT",
        &format!("/server/v1/regions/{region}"),
        Some(ADMIN_TOKEN),
        &format!(r#"{{"failed":{failed}}}"#),
    )
    .await;
    assert_eq!(response.status, 200, "marking {region} failed={failed}: {}", response.body);
}

/// The stored history of `channel` as (seq, client message id), read through `client`'s region.
async fn stored_keys(client: &Client, channel: &str) -> Vec<(u64, String)> {
    stored_messages(client, channel).await.into_iter().map(|message| (message.seq, message.client_msg_id)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_region_is_taken_over_and_what_only_it_confirmed_is_sent_again_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let Some(engines) = engines() else { return };
    // eu's store writer writes a batch 3 s after its first message: the messages eu confirms just before it dies are
    // in its Kafka only (neither stored nor, with MirrorMaker 2 down, mirrored): the failover's loss window.
    let options = WorldOptions {
        router_args: [vec!["--kafka-store-batch-wait-ms".into(), "3000".into()], Vec::new()],
        ..WorldOptions::default()
    };
    let mut world = World::start_with(&engines, options).await;
    const BEFORE: usize = 10;
    const ALONE: usize = 6;
    const AFTER: usize = 10;
    let (ivan, ivan_events) = Client::connect(world.config(0, "ivan")).await.expect("ivan connects to eu");
    let (judy, judy_events) = Client::connect(world.config(1, "judy")).await.expect("judy connects to us");
    let (_ivan_seen, judy_seen) = (record(ivan_events), record(judy_events));
    let channel = "g:failover".to_owned();
    ivan.create_channel("failover", ["judy"]).await.expect("ivan creates a channel in eu");
    wait_member(&judy_seen, &channel, &world).await;
    // ivan's presence crossed too (he connected before the channel's membership reached us).
    let now = judy.watch_presence(["ivan"]).await.expect("judy watches ivan");
    let heard = match now[0].status {
        Status::Online => 0,
        _ => wait_presence(&judy_seen, "ivan", Status::Online, 0, Duration::from_secs(60)).await,
    };
    let (ivan, _) = stream(ivan, "ivan".into(), channel.clone(), BEFORE).await.expect("ivan streams");
    let (judy, _) = stream(judy, "judy".into(), channel.clone(), BEFORE).await.expect("judy streams");
    wait_received(&[&judy_seen], &channel, 2 * BEFORE, Duration::from_secs(60)).await;
    // eu's store writer has written everything (its batches are 3 s long).
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // The link between the regions breaks, eu confirms ALONE more sends of ivan, then eu dies.
    world.kill_mm2().await;
    let (ivan, alone) = stream(ivan, "ivan-alone".into(), channel.clone(), ALONE).await.expect("ivan alone");
    // ivan leaves (his client would otherwise reconnect to us, and be online there).
    ivan.close().await;
    world.kill_router(0).await;
    let _ = world.gateways[0].child.start_kill();
    let _ = world.gateways[0].child.wait().await;
    assert_eq!(alone, ((2 * BEFORE + 1) as u64..=(2 * BEFORE + ALONE) as u64).collect::<Vec<_>>());

    // With MirrorMaker 2 gone, eu's beacons stop reaching us: the lag us measures grows past a few seconds.
    let us_admin = world.routers[1].admin;
    let lag =
        parley_test_support::eventually("us to see MirrorMaker 2 fall behind", Duration::from_secs(30), || async {
            let lag = metric(us_admin, "parley_router_mirror_lag_ms").await;
            (lag >= 3_000).then_some(lag)
        })
        .await;

    // us marks eu failed; judy's next send takes the channel over after the last message us holds of it.
    set_region_failed(&world, 1, "eu", true).await;
    // us forgets what eu said of presence: ivan is no longer shown online on the word of a failed region.
    wait_presence(&judy_seen, "ivan", Status::Offline, heard, Duration::from_secs(30)).await;
    let (judy, after) = stream(judy, "judy-after".into(), channel.clone(), AFTER).await.expect("judy after");
    assert_eq!(after.first().copied(), Some(2 * BEFORE as u64 + 1), "us continued after the last message it held");
    let history = stored_keys(&judy, &channel).await;
    let lost: Vec<String> = (0..ALONE)
        .map(|n| format!("ivan-alone-{n}"))
        .filter(|key| !history.iter().any(|(_, stored)| stored == key))
        .collect();
    let rpo = lost.len();

    // eu comes back: its store writer finds what it confirmed after the takeover and sends it again to us.
    world.restart_router(0).await;
    world.restart_mm2().await;
    let total = 2 * BEFORE + ALONE + AFTER;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut history = stored_keys(&judy, &channel).await;
    while history.len() < total && Instant::now() < deadline {
        // The poll interval of a bounded wait for the re-sent messages.
        tokio::time::sleep(Duration::from_millis(250)).await;
        history = stored_keys(&judy, &channel).await;
    }
    set_region_failed(&world, 1, "eu", false).await;
    let resent = metric(world.routers[0].admin, "parley_router_resent_messages").await;
    assert_eq!(history.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (1..=total as u64).collect::<Vec<_>>());
    let mut keys: Vec<&String> = history.iter().map(|(_, key)| key).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), total, "every confirmed message is stored exactly once (by its client message id)");
    for key in &lost {
        assert!(history.iter().any(|(_, stored)| stored == key), "{key} was sent again when eu returned");
    }
    wait_received(&[&judy_seen], &channel, total, Duration::from_secs(60)).await;
    let shown: Vec<u64> = received(&judy_seen, &channel).iter().map(|(seq, _)| *seq).collect();
    assert_eq!(shown, (1..=total as u64).collect::<Vec<_>>(), "judy (us) was shown the one history");
    report(&format!(
        "unplanned failover: MirrorMaker 2 killed, the lag us measured by eu's beacons grew to {lag} ms; eu \
         confirmed {ALONE} messages that neither reached us nor its store before it died; \
         RPO of this run: {rpo} messages; us took the channel over at seq {}; when eu returned it sent {resent} \
         message(s) again, now at the end of the one history ({total} messages, each once)",
        2 * BEFORE
    ));
    assert_eq!(rpo, ALONE, "nothing of what eu confirmed alone reached us before it returned");
    judy.close().await;
    world.stop().await;
}

/// A counter or gauge of a process's `/metrics`.
async fn metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    let response = parley_test_support::http::request(admin, "GET", "/metrics", None, "").await;
    response
        .body
        .lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}
