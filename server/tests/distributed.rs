//! The server API in the distributed layout: a router (in this process, on the embedded log and store, serving its
//! internal API over HTTP) and two gateways sharing Redis. A call on one gateway reaches the users connected to the
//! other: channel changes and system messages through the router, disconnects and revocations through the
//! all-gateways topic, and revoked tokens are refused by every gateway (the revocation lives in Redis).
//!
//! Needs Redis (`PARLEY_REDIS_URL`, with the stack's TLS CA file, ACL user and password; `e2e/stack/up.sh --only
//! redis DIR`, then `set -a; . DIR/stack.env; set +a`); a plain `cargo test` skips it with one line.

mod common;

use common::{http, stop, token, token_issued_at, Client, Running, SECRET};
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::PubSub;
use parley_bus::redis::{RedisConfig, RedisPresenceStore, RedisPubSub};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::RouterConfig;
use parley_test_support::server::ANY_PORT;
use serde_json::json;
use std::sync::Arc;

const KEY: &str = "distributed-server-api-key-0123";

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_secs()).unwrap_or(0)
}

/// Starts a router on the embedded store in `dir`, publishing on Redis (`redis`, with its prefix); returns its
/// internal API's base URL.
async fn router(dir: &std::path::Path, redis: RedisConfig) -> String {
    let pubsub: Arc<dyn PubSub> = Arc::new(RedisPubSub::connect(redis.clone()).await.expect("Redis for pub/sub"));
    let directory: Arc<dyn PresenceStore> =
        Arc::new(RedisPresenceStore::connect(redis).await.expect("Redis for the registry"));
    let store = Arc::new(EmbeddedStore::open(dir, Retention::default()).expect("store"));
    let (router, _writer) = parley_router::start_with_directory(
        RouterConfig::default(),
        store.clone(),
        store.clone(),
        store,
        pubsub,
        directory,
    )
    .expect("router");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, parley_router::service::app(router, None)).await });
    format!("http://{address}")
}

/// A gateway of that router, with the server API on.
async fn gateway(dir: &std::path::Path, router_url: &str, redis_url: &str, prefix: &str) -> Running {
    let args =
        ["--router-url", router_url, "--redis-url", redis_url, "--redis-prefix", prefix, "--server-api-key", KEY];
    parley_test_support::server::start(dir, Some(SECRET), ANY_PORT, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_one_gateway_reaches_the_users_of_another() {
    let Some(redis) = parley_test_support::redis_config(parley_test_support::Engine::Redis) else { return };
    let redis_url = redis.url.clone();
    let prefix = parley_test_support::unique("parley-test:") + ":";
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let router_url = router(dirs[0].path(), redis.with_prefix(prefix.clone())).await;
    let first = gateway(dirs[1].path(), &router_url, &redis_url, &prefix).await;
    let second = gateway(dirs[2].path(), &router_url, &redis_url, &prefix).await;
    let api = |method: &'static str, path: String, body: serde_json::Value| {
        let address = first.address;
        async move {
            let body = if body.is_null() { String::new() } else { body.to_string() };
            parley_test_support::http::request(address, method, &path, Some(KEY), &body).await
        }
    };

    // On the second gateway: alice (a token issued ten seconds ago) and bob.
    let old = token_issued_at("alice", now_secs() - 10);
    let mut alice = Client::connect_with(&second, "alice", &old).await;
    let mut bob = Client::connect(&second, "bob").await;

    // A channel and a system message, from the first gateway.
    let created = api("POST", "/server/v1/channels".into(), json!({"name":"ops","members":["alice","bob"]})).await;
    assert_eq!(created.status, 201, "{created:?}");
    for client in [&mut alice, &mut bob] {
        client.expect(|frame| frame["type"] == "channel" && frame["channel"]["id"] == "g:ops").await;
    }
    let post = json!({"client_msg_id":"n1","text":"from the backend"});
    let posted = api("POST", "/server/v1/channels/g:ops/messages".into(), post).await;
    assert_eq!(posted.status, 200, "{posted:?}");
    for client in [&mut alice, &mut bob] {
        assert_eq!(client.messages("g:ops", 1).await[0]["sender"], "@server");
    }
    let presence = api("GET", "/server/v1/presence?users=alice,carol".into(), serde_json::Value::Null).await;
    assert_eq!(presence.json()["users"][0]["status"], "online", "presence is shared: {presence:?}");

    // A disconnect through the first gateway closes bob on the second.
    let disconnected = api("POST", "/server/v1/users/bob/disconnect".into(), serde_json::Value::Null).await;
    assert_eq!(disconnected.status, 202, "{disconnected:?}");
    assert_eq!(bob.closed().await.0, 4003);

    // A revocation through the first gateway closes alice on the second, and both refuse her old token.
    let revoked = api("POST", "/server/v1/users/alice/revoke".into(), serde_json::Value::Null).await;
    assert_eq!(revoked.status, 202, "{revoked:?}");
    let before = revoked.json()["before"].as_u64().expect("before");
    assert_eq!(alice.closed().await.0, 4004);
    for running in [&first, &second] {
        let refused = Client::try_connect(running, "alice", &old).await.err().expect("the old token is refused");
        assert!(refused.0 == 401 && refused.1.contains("token_revoked"), "{refused:?}");
    }
    Client::connect_with(&second, "alice", &token_issued_at("alice", before)).await;
    let listed = http(&first, "GET", "/v1/channels", Some(&token("bob")), "").await;
    assert_eq!(listed.status, 200, "bob was disconnected, not revoked: {listed:?}");
    stop(first).await;
    stop(second).await;
}

/// A gateway whose Redis password is wrong does not start: in-process, `start` fails at once naming Redis, the node
/// and the server's refusal; the `parley` binary exits non-zero with that message on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_stops_the_gateway_at_start_up() {
    use clap::Parser;
    let Some(redis) = parley_test_support::redis_config(parley_test_support::Engine::Redis) else { return };
    let expected = format!("Redis at {}: authentication failed (WRONGPASS", redis.url);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra =
        ["--router-url", "http://127.0.0.1:1", "--redis-url", &redis.url, "--redis-password", "not-the-password"];
    let args = parley_test_support::server::arguments(dir.path(), Some(SECRET), ANY_PORT, &extra);
    let started = std::time::Instant::now();
    let refused = parley_server::start(parley_gateway::config::StandaloneArgs::parse_from(&args)).await;
    let message = refused.expect_err("a wrong password stops the start").to_string();
    assert!(message.contains(&expected), "{message}");
    assert!(started.elapsed() < redis.timeout, "refused within the Redis timeout, not after retries: {message}");

    let binary =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_parley")).args(&args[1..]).kill_on_drop(true).output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), binary)
        .await
        .expect("parley exits at once")
        .expect("parley runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "parley exits non-zero: {:?}", output.status);
    assert!(stderr.contains(&expected), "parley says why: {stderr}");
}
