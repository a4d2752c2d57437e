//! Against the real server: connections that drop (server restart, close 4010) are resumed with `sync`, and
//! unconfirmed sends are retried without duplicates; presence watching and "away" are asked again.

mod common;

use common::{config, server, server_at, stop, until, Seen};
use parley_client::{Client, Event, HistoryQuery, SendReceipt, Status};
use std::collections::BTreeSet;
use std::time::Duration;

/// Every message of the channel, read through history pages.
async fn all_messages(client: &Client, channel: &str) -> Vec<parley_client::MessageView> {
    let mut messages = Vec::new();
    loop {
        let after = messages.last().map(|message: &parley_client::MessageView| message.seq).unwrap_or(0);
        let query = HistoryQuery { after: Some(after), limit: Some(200), ..Default::default() };
        let page = client.history(channel, query).await.expect("history");
        messages.extend(page.messages);
        if !page.has_more {
            return messages;
        }
    }
}

#[tokio::test]
async fn a_restarted_server_is_resumed_with_sync_and_nothing_is_lost_or_repeated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let address = running.address;
    let (alice, mut alice_events) = Client::connect(config(address, "alice")).await.expect("alice");
    alice.create_channel("restart", ["bob"]).await.expect("create");
    let (bob, mut bob_events) = Client::connect(config(address, "bob")).await.expect("bob");

    // Alice keeps sending through the restart; each send resolves once durable, across the reconnect.
    let total = 60u64;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::new();
            for n in 0..total {
                receipts.push(alice.send("g:restart", format!("m{n}")).await.expect("send survives the restart"));
                // Pacing: spreads the sends over the restart.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            receipts
        })
    };
    let mut bob_seen = Seen::default();
    until(&mut bob_events, &mut bob_seen, Duration::from_secs(20), |seen| seen.count("g:restart") >= 10).await;

    stop(running).await;
    // The server stays down until bob's client has seen it go away, then comes back on the same address.
    until(&mut bob_events, &mut bob_seen, Duration::from_secs(20), |seen| {
        seen.any(|event| matches!(event, Event::Disconnected { code: Some(1001), .. }))
    })
    .await;
    let running = server_at(dir.path(), address, &[]).await;

    let receipts: Vec<SendReceipt> = sender.await.expect("sender task");
    until(&mut bob_events, &mut bob_seen, Duration::from_secs(30), |seen| {
        seen.count("g:restart") as u64 >= total && seen.any(|event| matches!(event, Event::Resynced))
    })
    .await;
    common::drain_for(&mut bob_events, &mut bob_seen, Duration::from_millis(300)).await;

    let messages = &bob_seen.messages["g:restart"];
    assert_eq!(messages.iter().map(|message| message.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    let texts: Vec<String> = messages.iter().map(|message| message.text.clone()).collect();
    assert_eq!(texts, (0..total).map(|n| format!("m{n}")).collect::<Vec<_>>(), "sent order, each once");
    assert!(
        bob_seen.any(|event| matches!(event, Event::Disconnected { code: Some(1001), .. })),
        "bob saw the server go away: {:?}",
        bob_seen.events.iter().filter(|event| !matches!(event, Event::Message(_))).collect::<Vec<_>>()
    );
    assert_eq!(receipts.iter().map(|receipt| receipt.seq).collect::<BTreeSet<_>>().len(), total as usize);

    // The server holds each message exactly once too.
    let stored = all_messages(&alice, "g:restart").await;
    assert_eq!(stored.len() as u64, total);
    let mut alice_seen = Seen::default();
    until(&mut alice_events, &mut alice_seen, Duration::from_secs(20), |seen| seen.count("g:restart") as u64 >= total)
        .await;

    alice.close().await;
    bob.close().await;
    stop(running).await;
}

#[tokio::test]
async fn a_client_closed_with_4010_resumes_while_another_keeps_sending() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Unacknowledged messages are retransmitted once after 100 ms, then the connection is closed with 4010.
    let running = server(dir.path(), &["--ack-timeout-ms", "100", "--max-retransmits", "1"]).await;
    let (alice, _alice_events) = Client::connect(config(running.address, "alice")).await.expect("alice");
    alice.create_channel("slow", ["bob"]).await.expect("create");
    // Bob acknowledges far too late, so the server gives up on his connections again and again.
    let mut slow = config(running.address, "bob");
    slow.ack_delay = Duration::from_secs(30);
    let (bob, mut bob_events) = Client::connect(slow).await.expect("bob");

    let total = 50u64;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for n in 0..total {
                alice.send("g:slow", format!("m{n}")).await.expect("send");
                // Pacing: a steady stream while bob's connections are closed and resumed.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut seen = Seen::default();
    until(&mut bob_events, &mut seen, Duration::from_secs(30), |seen| seen.count("g:slow") as u64 >= total).await;
    sender.await.expect("sender task");
    common::drain_for(&mut bob_events, &mut seen, Duration::from_millis(500)).await;

    assert_eq!(seen.count("g:slow") as u64, total, "each message exactly once");
    assert!(
        seen.any(|event| matches!(event, Event::Disconnected { code: Some(4010), .. })),
        "the server closed bob with 4010"
    );
    assert!(seen.any(|event| matches!(event, Event::Resynced)), "bob resumed with sync");
    let texts: Vec<String> = seen.messages["g:slow"].iter().map(|message| message.text.clone()).collect();
    assert_eq!(texts, (0..total).map(|n| format!("m{n}")).collect::<Vec<_>>());

    alice.close().await;
    bob.close().await;
    stop(running).await;
}

#[tokio::test]
async fn unconfirmed_sends_are_retried_after_reconnect_without_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let address = running.address;
    let (alice, mut alice_events) = Client::connect(config(address, "alice")).await.expect("alice");
    alice.create_channel("retry", Vec::<String>::new()).await.expect("create");

    // Fire a burst and pull the server away while the sends are in flight: as soon as the first is confirmed.
    let total = 30usize;
    let (confirmed, mut first_confirmed) = tokio::sync::mpsc::unbounded_channel();
    let sends: Vec<_> = (0..total)
        .map(|n| {
            let alice = alice.clone();
            let confirmed = confirmed.clone();
            tokio::spawn(async move {
                let receipt = alice.send_with_id("g:retry", format!("burst-{n}"), format!("m{n}")).await;
                let _ = confirmed.send(());
                receipt
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(30), first_confirmed.recv()).await.expect("a send is confirmed in time");
    let in_flight = sends.iter().filter(|send| !send.is_finished()).count();
    stop(running).await;
    let running = server_at(dir.path(), address, &[]).await;

    let mut receipts = Vec::new();
    for send in sends {
        receipts.push(send.await.expect("task").expect("every send is confirmed in the end"));
    }
    let seqs: BTreeSet<u64> = receipts.iter().map(|receipt| receipt.seq).collect();
    assert_eq!(seqs.len(), total, "distinct messages: {receipts:?}");
    // The sends may all have been answered before the old server closed the connection; history is read over the
    // new one, so wait until the client is back (a request is not queued while it is offline).
    let mut alice_seen = Seen::default();
    until(&mut alice_events, &mut alice_seen, Duration::from_secs(20), |seen| {
        seen.events.iter().filter(|event| matches!(event, Event::Connected { .. })).count() >= 2
    })
    .await;
    let stored = all_messages(&alice, "g:retry").await;
    assert_eq!(stored.len(), total, "stored exactly once each");
    let ids: BTreeSet<&str> = stored.iter().map(|message| message.client_msg_id.as_str()).collect();
    assert_eq!(ids.len(), total);
    for receipt in &receipts {
        let message = &stored[receipt.seq as usize - 1];
        assert_eq!((message.id, &message.client_msg_id), (receipt.id, &receipt.client_msg_id));
    }
    eprintln!(
        "{in_flight} of {total} sends were in flight when the server stopped; {} were answered as duplicates after \
         the reconnect",
        receipts.iter().filter(|receipt| receipt.duplicate).count()
    );

    alice.close().await;
    stop(running).await;
}

/// Whether `seen` holds, after its first `from` events, a presence event saying `user` is `status`.
fn told(seen: &Seen, from: usize, user: &str, status: Status) -> bool {
    seen.events[from.min(seen.events.len())..]
        .iter()
        .any(|event| matches!(event, Event::Presence(view) if view.user == user && view.status == status))
}

#[tokio::test]
async fn presence_watching_and_away_hold_across_a_server_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let address = running.address;
    let (carol, mut carol_events) = Client::connect(config(address, "carol")).await.expect("carol");
    let now = carol.watch_presence(["dave"]).await.expect("carol watches dave");
    assert_eq!((now.len(), now[0].status), (1, Status::Offline));
    let mut seen = Seen::default();
    let (dave, _dave_events) = Client::connect(config(address, "dave")).await.expect("dave");
    until(&mut carol_events, &mut seen, Duration::from_secs(10), |seen| told(seen, 0, "dave", Status::Online)).await;
    assert_eq!(dave.set_away(true).await.expect("dave is away").status, Status::Away);
    until(&mut carol_events, &mut seen, Duration::from_secs(10), |seen| told(seen, 0, "dave", Status::Away)).await;

    // The server restarts with an empty presence book: both clients connect again, dave says again that he is
    // away, carol watches again, and hears it without asking.
    stop(running).await;
    until(&mut carol_events, &mut seen, Duration::from_secs(20), |seen| {
        seen.any(|event| matches!(event, Event::Disconnected { .. }))
    })
    .await;
    let restarted_at = seen.events.len();
    let running = server_at(dir.path(), address, &[]).await;
    until(&mut carol_events, &mut seen, Duration::from_secs(30), |seen| told(seen, restarted_at, "dave", Status::Away))
        .await;
    assert!(told(&seen, restarted_at, "dave", Status::Away), "carol heard dave away after the restart");

    // Unwatched: no more of dave.
    carol.unwatch_presence(["dave"]).await.expect("unwatch");
    let unwatched_at = seen.events.len();
    dave.close().await;
    common::drain_for(&mut carol_events, &mut seen, Duration::from_millis(500)).await;
    assert!(!told(&seen, unwatched_at, "dave", Status::Offline), "nothing of an unwatched user");
    carol.close().await;
    stop(running).await;
}
