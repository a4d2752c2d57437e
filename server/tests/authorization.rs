//! Channel authorization end to end, over real WebSockets: a removed member's live connection stops receiving at
//! once; a private channel is closed to non-members (join, history, presence, listing, sending); a banned user
//! cannot rejoin until unbanned.

mod common;

use common::{http, server, stop, token, Client};
use serde_json::json;

/// Whether the client holds (in its backlog) a message of `channel` with this sequence.
fn holds(client: &Client, channel: &str, seq: u64) -> bool {
    client.backlog.iter().any(|frame| frame["type"] == "message" && frame["channel"] == channel && frame["seq"] == seq)
}

#[tokio::test]
async fn a_removed_member_stops_receiving_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut owner = Client::connect(&running, "owner").await;
    let mut bob = Client::connect(&running, "bob").await;
    let mut carol = Client::connect(&running, "carol").await;
    let created = owner.request(json!({"type":"create_channel","name":"club","members":["bob","carol"]}), "c").await;
    assert_eq!(created["channel"]["members"], 3, "{created}");
    for client in [&mut bob, &mut carol] {
        client.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:club").await;
    }
    owner.send_message("g:club", "m1", "for all three").await;
    assert_eq!(bob.messages("g:club", 1).await[0]["seq"], 1);
    carol.messages("g:club", 1).await;

    // The owner removes bob through the client protocol: bob's connection is told at once.
    let removed = owner.request(json!({"type":"remove_member","channel":"g:club","user":"bob"}), "r").await;
    assert_eq!((&removed["type"], &removed["channel"]["members"]), (&json!("channel"), &json!(2)), "{removed}");
    let left = bob.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:club").await;
    assert_eq!(left["channel"]["joined"], false, "{left}");

    // The next message reaches carol but not bob: once carol has it, bob's queue would have held it too (the hub
    // queues to every local member at once), and bob's pong comes after anything queued before it.
    owner.send_message("g:club", "m2", "without bob").await;
    assert_eq!(carol.messages("g:club", 1).await[0]["seq"], 2);
    assert_eq!(bob.request(json!({"type":"ping"}), "p").await["type"], "pong");
    assert!(!holds(&bob, "g:club", 2), "bob received a message after his removal: {:?}", bob.backlog);

    // Nor can bob read it, write, or resume the channel.
    let history = bob.request(json!({"type":"history","channel":"g:club","after":1}), "h").await;
    assert_eq!(history["code"], "not_a_member", "{history}");
    let page = http(&running, "GET", "/v1/channels/g:club/messages", Some(&token("bob")), "").await;
    assert_eq!((page.status, &page.json()["code"]), (403, &json!("not_a_member")), "{page:?}");
    let sent = bob.send_message("g:club", "b1", "still here?").await;
    assert_eq!(sent["code"], "not_a_member", "{sent}");
    let synced = bob.request(json!({"type":"sync","channels":{"g:club":1}}), "s").await;
    assert!(!holds(&bob, "g:club", 2), "a resume replayed the channel to a removed member: {synced}");
    stop(running).await;
}

#[tokio::test]
async fn a_private_channel_is_closed_to_non_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut owner = Client::connect(&running, "owner").await;
    let created = owner
        .request(json!({"type":"create_channel","name":"secret","members":["bob"],"visibility":"private"}), "c")
        .await;
    assert_eq!(created["channel"]["visibility"], "private", "{created}");
    owner.send_message("g:secret", "m1", "members only").await;

    let mut eve = Client::connect(&running, "eve").await;
    let listed_at_connect = eve.ready["channels"].as_array().map(Vec::len);
    assert_eq!(listed_at_connect, Some(0), "not in eve's ready: {}", eve.ready);
    let joined = eve.request(json!({"type":"join","channel":"g:secret"}), "j").await;
    assert_eq!(joined["code"], "forbidden", "{joined}");
    let history = eve.request(json!({"type":"history","channel":"g:secret"}), "h").await;
    assert_eq!(history["code"], "not_a_member", "{history}");
    let presence = eve.request(json!({"type":"channel_presence","channel":"g:secret"}), "p").await;
    assert_eq!(presence["code"], "not_a_member", "{presence}");
    let listed = eve.request(json!({"type":"list_channels"}), "l").await;
    assert_eq!(listed["channels"], json!([]), "{listed}");
    let sent = eve.send_message("g:secret", "e1", "let me in").await;
    assert_eq!(sent["code"], "not_a_member", "{sent}");
    let page = http(&running, "GET", "/v1/channels/g:secret/messages", Some(&token("eve")), "").await;
    assert_eq!((page.status, &page.json()["code"]), (403, &json!("not_a_member")), "{page:?}");
    let channels = http(&running, "GET", "/v1/channels", Some(&token("eve")), "").await;
    assert_eq!(channels.json()["channels"], json!([]), "{channels:?}");
    assert!(!eve.backlog.iter().any(|frame| frame["type"] == "message"), "eve saw a message: {:?}", eve.backlog);

    // A member sees what eve cannot.
    let mut bob = Client::connect(&running, "bob").await;
    let presence = bob.request(json!({"type":"channel_presence","channel":"g:secret"}), "p").await;
    assert_eq!(presence["members"], 2, "{presence}");
    let history = bob.request(json!({"type":"history","channel":"g:secret"}), "h").await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
    stop(running).await;
}

#[tokio::test]
async fn a_banned_user_cannot_rejoin_until_unbanned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = server(dir.path(), &[]).await;
    let mut owner = Client::connect(&running, "owner").await;
    let mut troll = Client::connect(&running, "troll").await;
    owner.request(json!({"type":"create_channel","name":"town","members":["troll"]}), "c").await;
    troll.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:town").await;

    let banned = owner.request(json!({"type":"ban","channel":"g:town","user":"troll"}), "b").await;
    assert_eq!(banned["channel"]["members"], 1, "banned and removed: {banned}");
    let left = troll.expect(|frame| frame["type"] == "channel" && frame["channel"]["joined"] == false).await;
    assert_eq!(left["channel"]["id"], "g:town");
    let rejoin = troll.request(json!({"type":"join","channel":"g:town"}), "j1").await;
    assert_eq!(rejoin["code"], "banned", "{rejoin}");
    let invited = owner.request(json!({"type":"invite","channel":"g:town","user":"troll"}), "i").await;
    assert_eq!(invited["code"], "banned", "a banned user cannot be invited either: {invited}");
    // The ban outlives the connection.
    drop(troll);
    let mut troll = Client::connect(&running, "troll").await;
    let rejoin = troll.request(json!({"type":"join","channel":"g:town"}), "j2").await;
    assert_eq!(rejoin["code"], "banned", "{rejoin}");

    owner.request(json!({"type":"unban","channel":"g:town","user":"troll"}), "u").await;
    let rejoin = troll.request(json!({"type":"join","channel":"g:town"}), "j3").await;
    assert_eq!(rejoin["channel"]["joined"], true, "{rejoin}");
    stop(running).await;
}
