//! Hybrid fan-out over a real WebSocket: small channels are pushed, large ones are read from the router's feed
//! once per instance, and a channel that crosses the threshold while messages flow keeps one order for everyone.

mod common;

use common::{server, stop, Client};
use serde_json::{json, Value};

/// A counter from the admin port's `/metrics`.
async fn metric(address: std::net::SocketAddr, name: &str) -> u64 {
    parley_test_support::metric(address, name).await as u64
}

/// Sends `count` messages without waiting for each confirmation (so joins and leaves land between them).
async fn burst(sender: &mut Client, channel: &str, prefix: &str, count: usize) {
    for n in 0..count {
        let frame = json!({"type":"send","channel":channel,"client_msg_id":format!("{prefix}{n}"),"text":format!("{prefix} {n}"),"first_attempt":true});
        sender.send_json(frame).await;
    }
}

/// Waits for the confirmations of a burst; returns their sequences.
async fn confirm(sender: &mut Client, prefix: &str, count: usize) -> Vec<u64> {
    let mut confirmed = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{prefix}{n}");
        let reply = sender
            .expect(move |frame| {
                (frame["type"] == "send_result" || frame["type"] == "error") && frame["client_msg_id"] == id.as_str()
            })
            .await;
        assert_eq!(reply["type"], "send_result", "{reply}");
        confirmed.push(reply["seq"].as_u64().expect("seq"));
    }
    confirmed
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|message| message["seq"].as_u64().expect("seq")).collect()
}

#[tokio::test]
async fn a_channel_crossing_the_threshold_live_keeps_one_order_for_every_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running =
        server(dir.path(), &["--fanout-threshold", "3", "--send-rate-per-sec", "1000", "--send-burst", "1000"]).await;
    let admin = running.admin_address;
    let mut owner = Client::connect(&running, "owner").await;
    let created = owner.request(json!({"type":"create_channel","name":"town","members":["steady"]}), "c").await;
    let channel = created["channel"]["id"].as_str().expect("channel id").to_owned();
    let mut steady = Client::connect(&running, "steady").await;
    let mut joiner = Client::connect(&running, "joiner").await;
    let mut visitor = Client::connect(&running, "visitor").await;

    // 2 members: pushed (1..=30, confirmed before anything else happens). Two joins make it 4 (> 3: fanned out on
    // read); a leave, sent while the next burst is in flight, brings it back to 3 (pushed) somewhere in 31..=90;
    // a join makes it 4 again before the last burst (91..=120, read from the feed).
    burst(&mut owner, &channel, "a", 30).await;
    let mut confirmed = confirm(&mut owner, "a", 30).await;
    let joined = joiner.request(json!({"type":"join","channel":channel}), "j1").await;
    assert_eq!(joined["type"], "channel", "{joined}");
    let joined = visitor.request(json!({"type":"join","channel":channel}), "j2").await;
    assert_eq!(joined["type"], "channel", "{joined}");
    burst(&mut owner, &channel, "b", 30).await;
    let left = visitor.request(json!({"type":"leave","channel":channel}), "l1").await;
    assert_eq!(left["type"], "channel", "{left}");
    burst(&mut owner, &channel, "c", 30).await;
    confirmed.extend(confirm(&mut owner, "b", 30).await);
    confirmed.extend(confirm(&mut owner, "c", 30).await);
    let joined = visitor.request(json!({"type":"join","channel":channel}), "j3").await;
    assert_eq!(joined["type"], "channel", "{joined}");
    burst(&mut owner, &channel, "d", 30).await;
    confirmed.extend(confirm(&mut owner, "d", 30).await);
    // Every send is confirmed, with one gap-free sequence.
    confirmed.sort_unstable();
    assert_eq!(confirmed, (1..=120).collect::<Vec<_>>());

    // A member from the start gets all 120, once each, in order, across every crossing.
    let received = steady.messages(&channel, 120).await;
    assert_eq!(seqs(&received), (1..=120).collect::<Vec<_>>(), "one order for a member all along");
    // So does the sender's own connection.
    let echoed = owner.messages(&channel, 120).await;
    assert_eq!(seqs(&echoed), (1..=120).collect::<Vec<_>>());
    // A member who joined mid-stream gets a gap-free run from where it joined to the end.
    let first = joiner.expect(|frame| frame["type"] == "message").await;
    let start = first["seq"].as_u64().expect("seq");
    let mut later = vec![first];
    later.extend(joiner.messages(&channel, (120 - start) as usize).await);
    assert_eq!(seqs(&later), (start..=120).collect::<Vec<_>>(), "gap-free after the join");
    assert!(later.iter().all(|message| message["channel"] == channel.as_str()));

    // The large phases went through the feed: read by this instance, not pushed per message.
    let reads = metric(admin, "parley_gateway_feed_reads_total").await;
    let read_messages = metric(admin, "parley_gateway_feed_messages_total").await;
    let gaps = metric(admin, "parley_gateway_gaps_filled_total").await;
    eprintln!("feed reads {reads}, messages read {read_messages}, gaps filled from history {gaps}");
    assert!(reads >= 1, "the large phases were read from the feed");
    assert!(
        (30..=90).contains(&read_messages),
        "the last burst and part of the middle were read, the first burst was pushed: {read_messages}"
    );

    // A member's history read forward from inside the large phase is served by this instance's cache.
    let hits_before = metric(admin, "parley_gateway_feed_cache_hits_total").await;
    let page = steady.request(json!({"type":"history","channel":channel,"after":112,"limit":5}), "h").await;
    assert_eq!(page["type"], "history", "{page}");
    assert_eq!(seqs(page["messages"].as_array().expect("messages")), (113..=117).collect::<Vec<_>>());
    assert_eq!(page["has_more"], true);
    let texts: Vec<&str> =
        page["messages"].as_array().expect("messages").iter().map(|m| m["text"].as_str().expect("text")).collect();
    assert_eq!(texts[0], received[112]["text"].as_str().expect("text"), "the cache holds the same messages");
    let hits_after = metric(admin, "parley_gateway_feed_cache_hits_total").await;
    assert_eq!(hits_after, hits_before + 1, "served from the feed cache");
    // A history read of the small phase goes to the router (the cache holds only the large phase).
    let page = steady.request(json!({"type":"history","channel":channel,"after":0,"limit":5}), "h0").await;
    assert_eq!(seqs(page["messages"].as_array().expect("messages")), vec![1, 2, 3, 4, 5]);
    assert_eq!(metric(admin, "parley_gateway_feed_cache_hits_total").await, hits_after);
    stop(running).await;
}

#[tokio::test]
async fn a_large_channel_costs_one_feed_read_per_batch_not_one_per_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running =
        server(dir.path(), &["--fanout-threshold", "5", "--send-rate-per-sec", "1000", "--send-burst", "1000"]).await;
    let admin = running.admin_address;
    let mut owner = Client::connect(&running, "owner").await;
    let members: Vec<String> = (0..19).map(|n| format!("m{n}")).collect();
    let created = owner.request(json!({"type":"create_channel","name":"hall","members":members}), "c").await;
    assert_eq!(created["channel"]["members"], 20, "{created}");
    let channel = created["channel"]["id"].as_str().expect("channel id").to_owned();
    let mut clients = Vec::new();
    for member in &members {
        clients.push(Client::connect(&running, member).await);
    }
    burst(&mut owner, &channel, "x", 50).await;
    for client in &mut clients {
        let received = client.messages(&channel, 50).await;
        assert_eq!(seqs(&received), (1..=50).collect::<Vec<_>>(), "{}", client.user);
    }
    let reads = metric(admin, "parley_gateway_feed_reads_total").await;
    let read_messages = metric(admin, "parley_gateway_feed_messages_total").await;
    assert_eq!(read_messages, 50, "each message read once for 20 members");
    assert!((1..=50).contains(&reads), "one read per notice at most: {reads}");
    stop(running).await;
}
