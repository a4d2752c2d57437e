//! Against the real server: two clients chatting, and the request helpers.

mod common;

use common::{config, server, stop, until, Seen};
use parley_client::{Client, ClientError, ErrorCode, Event, HistoryQuery};
use std::time::Duration;

#[tokio::test]
async fn two_clients_exchange_messages_in_order_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let (alice, mut alice_events) = Client::connect(config(running.address, "alice")).await.expect("alice connects");
    let room = alice.create_channel("room", ["bob"]).await.expect("create");
    assert_eq!(room.id, "g:room");
    let (bob, mut bob_events) = Client::connect(config(running.address, "bob")).await.expect("bob connects");

    let per_sender = 30;
    let talk = |client: Client, who: &'static str| {
        tokio::spawn(async move {
            let mut receipts = Vec::new();
            for n in 0..per_sender {
                receipts.push(client.send("g:room", format!("{who} {n}")).await.expect("send"));
            }
            receipts
        })
    };
    let (alice_receipts, bob_receipts) = tokio::join!(talk(alice.clone(), "alice"), talk(bob.clone(), "bob"));
    let (alice_receipts, bob_receipts) = (alice_receipts.expect("alice task"), bob_receipts.expect("bob task"));
    assert!(alice_receipts.iter().chain(&bob_receipts).all(|receipt| !receipt.duplicate));

    let total = 2 * per_sender;
    let mut alice_seen = Seen::default();
    let mut bob_seen = Seen::default();
    until(&mut alice_events, &mut alice_seen, Duration::from_secs(20), |seen| seen.count("g:room") >= total).await;
    until(&mut bob_events, &mut bob_seen, Duration::from_secs(20), |seen| seen.count("g:room") >= total).await;
    for seen in [&alice_seen, &bob_seen] {
        let messages = &seen.messages["g:room"];
        assert_eq!(
            messages.iter().map(|message| message.seq).collect::<Vec<_>>(),
            (1..=total as u64).collect::<Vec<_>>()
        );
        for (who, receipts) in [("alice", &alice_receipts), ("bob", &bob_receipts)] {
            let texts: Vec<&str> =
                messages.iter().filter(|message| message.sender == who).map(|message| message.text.as_str()).collect();
            let sent: Vec<String> = (0..per_sender).map(|n| format!("{who} {n}")).collect();
            assert_eq!(texts, sent, "each sender's messages in the order sent");
            for receipt in receipts.iter() {
                let message = &messages[receipt.seq as usize - 1];
                assert_eq!((message.id, &message.client_msg_id), (receipt.id, &receipt.client_msg_id));
            }
        }
    }
    // Nothing more arrives: no duplicate after the last one.
    common::drain_for(&mut bob_events, &mut bob_seen, Duration::from_millis(300)).await;
    assert_eq!(bob_seen.count("g:room"), total);
    assert!(bob_seen.events.iter().all(|event| !matches!(event, Event::Disconnected { .. })));

    alice.close().await;
    bob.close().await;
    stop(running).await;
}

#[tokio::test]
async fn request_helpers_answer_by_req_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let (alice, mut alice_events) = Client::connect(config(running.address, "alice")).await.expect("alice");
    let (carol, _carol_events) = Client::connect(config(running.address, "carol")).await.expect("carol");

    carol.create_channel("open", Vec::<String>::new()).await.expect("create");
    let joined = alice.join("g:open").await.expect("join");
    assert!(joined.joined);
    for n in 1..=5 {
        alice.send("g:open", format!("m{n}")).await.expect("send");
    }
    let page = alice.history("g:open", HistoryQuery { after: Some(2), limit: Some(2), ..Default::default() }).await;
    let page = page.expect("history");
    assert_eq!(page.messages.iter().map(|message| message.seq).collect::<Vec<_>>(), [3, 4]);
    assert!(page.has_more);

    let dm = alice.open_dm("carol").await.expect("dm");
    assert_eq!(dm.id, "dm:alice:carol");
    let listed = alice.list_channels().await.expect("list");
    let mut ids: Vec<&str> = listed.iter().map(|channel| channel.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["dm:alice:carol", "g:open"]);

    let left = alice.leave("g:open").await.expect("leave");
    assert!(!left.joined);
    match alice.send("g:open", "after leaving").await {
        Err(ClientError::Server { code: ErrorCode::NotAMember, .. }) => {}
        other => panic!("expected not_a_member, got {other:?}"),
    }
    match carol.create_channel("open", Vec::<String>::new()).await {
        Err(ClientError::Server { code: ErrorCode::ChannelExists, .. }) => {}
        other => panic!("expected channel_exists, got {other:?}"),
    }

    // The idempotency key: the same id again is the same message.
    let first = carol.send_with_id("dm:alice:carol", "fixed-1", "once").await.expect("send");
    let again = carol.send_with_id("dm:alice:carol", "fixed-1", "once").await.expect("retry");
    assert!(!first.duplicate && again.duplicate);
    assert_eq!((first.seq, first.id), (again.seq, again.id));

    // Membership changes are pushed as events; the DM's message arrives once.
    let mut seen = Seen::default();
    until(&mut alice_events, &mut seen, Duration::from_secs(10), |seen| seen.count("dm:alice:carol") >= 1).await;
    assert!(seen.any(|event| matches!(event, Event::Channel(channel) if channel.id == "dm:alice:carol")));
    common::drain_for(&mut alice_events, &mut seen, Duration::from_millis(200)).await;
    assert_eq!(seen.count("dm:alice:carol"), 1);

    // A refused token surfaces at connect.
    let mut bad = config(running.address, "mallory");
    bad.token = "not-a-jwt".to_owned();
    match Client::connect(bad).await {
        Err(ClientError::Unauthorized { .. }) => {}
        other => panic!("expected unauthorized, got {:?}", other.map(|_| ())),
    }
    alice.close().await;
    carol.close().await;
    stop(running).await;
}
