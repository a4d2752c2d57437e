//! The FCM and APNs clients and the notifier against local HTTP servers on 127.0.0.1 (HTTP/2 only for APNs,
//! HTTP/1.1 or HTTP/2 for FCM and OAuth2), checking what the providers would see: method, path, headers, signed
//! JWTs (verified with the fixtures' public keys) and bodies.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parley_push::{
    ApnsClient, ApnsConfig, Device, DeviceRegistry, Error, FcmClient, FcmConfig, MemoryRegistry, Notification,
    Notifier, NotifierConfig, Platform, PushMessage, PushProvider, PushStats, RetryPolicy, ServiceAccount,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const RSA_PRIVATE: &str = include_str!("fixtures/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/rsa-public.pem");
const EC_PRIVATE: &str = include_str!("fixtures/ec-private.pem");
const EC_PUBLIC: &str = include_str!("fixtures/ec-public.pem");

const CLIENT_EMAIL: &str = "push@demo.iam.gserviceaccount.com";
const TEAM_ID: &str = "TEAM123456";
const KEY_ID: &str = "KEY7654321";
const TOPIC: &str = "chat.parley.app";
const SEND_PATH: &str = "/v1/projects/demo/messages:send";
const ACCESS_TOKEN: &str = "ya29.test-access-token";
const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|value| value.to_str().unwrap()).unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// The answer to a request: `None` never answers.
type Reply = Option<Response<Full<Bytes>>>;

struct MockServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockServer {
    /// Serves on 127.0.0.1:0; `respond` gets each request and how many came before it on the same path.
    async fn start(http2_only: bool, respond: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let respond = Arc::new(respond);
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let respond = Arc::clone(&respond);
                let service = service_fn(move |request: Request<Incoming>| {
                    let log = Arc::clone(&log);
                    let respond = Arc::clone(&respond);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let request = Seen {
                            method: parts.method,
                            path: parts.uri.path().to_owned(),
                            version: parts.version,
                            headers: parts.headers,
                            body,
                        };
                        let reply = {
                            let mut log = log.lock().unwrap();
                            let before = log.iter().filter(|s| s.path == request.path).count();
                            let reply = respond(&request, before);
                            log.push(request);
                            reply
                        };
                        match reply {
                            Some(response) => Ok::<_, hyper::Error>(response),
                            None => std::future::pending().await,
                        }
                    }
                });
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let _ = if http2_only {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                            .map_err(|error| error.to_string())
                    } else {
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                            .map_err(|error| error.to_string())
                    };
                });
            }
        });
        MockServer { url, seen }
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Some(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
}

fn reply_with(status: StatusCode, header: (&str, &str)) -> Reply {
    Some(Response::builder().status(status).header(header.0, header.1).body(Full::new(Bytes::new())).unwrap())
}

fn token_reply(expires_in: u64) -> Reply {
    reply(StatusCode::OK, json!({"access_token": ACCESS_TOKEN, "expires_in": expires_in, "token_type": "Bearer"}))
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        max_retry_after: Duration::from_secs(30),
    }
}

fn fcm_client(server: &MockServer) -> FcmClient {
    let account = ServiceAccount {
        client_email: CLIENT_EMAIL.into(),
        private_key: RSA_PRIVATE.into(),
        token_uri: Some(format!("{}/token", server.url)),
        project_id: Some("demo".into()),
    };
    let mut config = FcmConfig::new("demo");
    config.endpoint = server.url.clone();
    config.retry = fast_retry();
    FcmClient::new(&account, config).unwrap()
}

fn apns_client(server: &MockServer) -> ApnsClient {
    let mut config = ApnsConfig::new(TEAM_ID, KEY_ID, TOPIC);
    config.endpoint = server.url.clone();
    config.retry = fast_retry();
    ApnsClient::new(EC_PRIVATE.as_bytes(), config).unwrap()
}

fn message(text: &str) -> PushMessage {
    PushMessage {
        conversation_id: "g:general".into(),
        conversation_name: Some("general".into()),
        sender: "alice".into(),
        message_id: 7_000_000_001,
        seq: 42,
        text: text.into(),
    }
}

fn notification() -> Notification {
    Notification::from_message(&message("hello from the test"))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An FCM server: `/token` answers with an access token, the send path with `send(request, index)`.
async fn fcm_server(send: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> MockServer {
    MockServer::start(false, move |request, index| match request.path.as_str() {
        "/token" => token_reply(3600),
        SEND_PATH => send(request, index),
        _ => reply(StatusCode::NOT_FOUND, json!({})),
    })
    .await
}

fn fcm_ok() -> Reply {
    reply(StatusCode::OK, json!({"name": "projects/demo/messages/0:1"}))
}

#[tokio::test]
async fn fcm_exchanges_a_signed_assertion_once_and_sends_twice() {
    let server = fcm_server(|_, _| fcm_ok()).await;
    let client = fcm_client(&server);
    let notification = notification();

    client.send("device-one", &notification).await.unwrap();
    client.send("device-two", &notification).await.unwrap();

    // The access token is cached: one exchange for two sends.
    let exchanges = server.seen("/token");
    assert_eq!(exchanges.len(), 1);
    let exchange = &exchanges[0];
    assert_eq!(exchange.method, Method::POST);
    assert_eq!(exchange.header("content-type"), "application/x-www-form-urlencoded");
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&exchange.body).unwrap();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");
    let token_uri = format!("{}/token", server.url);
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[token_uri.as_str()]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<Value>(
        &form["assertion"],
        &DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/firebase.messaging");
    let iat = claims["iat"].as_u64().unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > iat && exp - iat <= 3600);
    assert!(iat.abs_diff(unix_now()) < 60);

    let sends = server.seen(SEND_PATH);
    assert_eq!(sends.len(), 2);
    for (send, token) in sends.iter().zip(["device-one", "device-two"]) {
        assert_eq!(send.method, Method::POST);
        assert_eq!(send.header("authorization"), format!("Bearer {ACCESS_TOKEN}"));
        assert_eq!(send.header("content-type"), "application/json");
        assert_eq!(
            send.json(),
            json!({"message": {
                "token": token,
                "notification": {"title": "alice in general", "body": "hello from the test"},
                "data": {"conversation_id": "g:general", "message_id": "7000000001", "seq": "42"},
            }})
        );
    }
}

#[tokio::test(start_paused = true)]
async fn fcm_renews_the_access_token_before_it_expires() {
    let server = MockServer::start(false, |request, _| match request.path.as_str() {
        "/token" => token_reply(600),
        _ => fcm_ok(),
    })
    .await;
    let client = fcm_client(&server);
    client.send("device", &notification()).await.unwrap();
    tokio::time::advance(Duration::from_secs(200)).await;
    client.send("device", &notification()).await.unwrap();
    assert_eq!(server.seen("/token").len(), 1);
    // The default margin (5 minutes) is cut to half the lifetime: renewed after 300 s.
    tokio::time::advance(Duration::from_secs(101)).await;
    client.send("device", &notification()).await.unwrap();
    assert_eq!(server.seen("/token").len(), 2);
    assert_eq!(server.seen(SEND_PATH).len(), 3);
}

#[tokio::test]
async fn fcm_renews_a_refused_access_token_and_retries() {
    let server = fcm_server(|_, index| match index {
        0 => reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "expired"}}),
        ),
        _ => fcm_ok(),
    })
    .await;
    let client = fcm_client(&server);
    client.send("device", &notification()).await.unwrap();
    assert_eq!(server.seen("/token").len(), 2);
    assert_eq!(server.seen(SEND_PATH).len(), 2);
}

#[tokio::test]
async fn fcm_reports_unregistered_and_malformed_tokens_as_invalid() {
    let server = fcm_server(|request, _| match request.json()["message"]["token"].as_str() {
        Some("stale") => reply(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}),
        ),
        Some("malformed") => reply(
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                "message": "The registration token is not a valid FCM registration token"}}),
        ),
        _ => fcm_ok(),
    })
    .await;
    let client = fcm_client(&server);
    for token in ["stale", "malformed"] {
        let error = client.send(token, &notification()).await.unwrap_err();
        assert!(matches!(error, Error::InvalidToken { platform: Platform::Fcm, .. }), "{error:?}");
    }
    // Invalid tokens are not retried.
    assert_eq!(server.seen(SEND_PATH).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn fcm_honours_retry_after_on_429() {
    let server = fcm_server(|_, index| match index {
        0 => reply_with(StatusCode::TOO_MANY_REQUESTS, ("retry-after", "7")),
        _ => fcm_ok(),
    })
    .await;
    let client = fcm_client(&server);
    let start = tokio::time::Instant::now();
    client.send("device", &notification()).await.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(7), "{:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(9), "{:?}", start.elapsed());
    assert_eq!(server.seen(SEND_PATH).len(), 2);
    assert_eq!(server.seen("/token").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_policy_fails_at_once() {
    let server = fcm_server(|_, _| reply_with(StatusCode::TOO_MANY_REQUESTS, ("retry-after", "3600"))).await;
    let client = fcm_client(&server);
    let error = client.send("device", &notification()).await.unwrap_err();
    assert!(matches!(error, Error::Unavailable { status: 429, .. }), "{error:?}");
    assert_eq!(server.seen(SEND_PATH).len(), 1);
}

#[tokio::test]
async fn apns_sends_over_http2_with_the_right_headers_and_a_reused_jwt() {
    let server = MockServer::start(true, |_, _| reply_with(StatusCode::OK, ("apns-id", "0001"))).await;
    let client = apns_client(&server);
    let mut notification = notification();
    client.send(APNS_TOKEN, &notification).await.unwrap();
    notification.collapse_id = Some("g:general".into());
    client.send(APNS_TOKEN, &notification).await.unwrap();

    let path = format!("/3/device/{APNS_TOKEN}");
    let sends = server.seen(&path);
    assert_eq!(sends.len(), 2);
    let first = &sends[0];
    assert_eq!(first.version, Version::HTTP_2);
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.header("apns-topic"), TOPIC);
    assert_eq!(first.header("apns-push-type"), "alert");
    assert_eq!(first.header("apns-priority"), "10");
    let expiration: u64 = first.header("apns-expiration").parse().unwrap();
    assert!(expiration > unix_now() + 3600, "{expiration}");
    assert!(!first.headers.contains_key("apns-collapse-id"));
    assert_eq!(sends[1].header("apns-collapse-id"), "g:general");
    assert_eq!(
        first.json(),
        json!({
            "aps": {"alert": {"title": "alice in general", "body": "hello from the test"}, "sound": "default"},
            "conversation_id": "g:general", "message_id": "7000000001", "seq": "42",
        })
    );

    let authorization = first.header("authorization");
    let jwt = authorization.strip_prefix("bearer ").unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(KEY_ID));
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[TEAM_ID]);
    let claims =
        jsonwebtoken::decode::<Value>(jwt, &DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(), &validation)
            .unwrap()
            .claims;
    assert!(claims["iat"].as_u64().unwrap().abs_diff(unix_now()) < 60);
    // The provider token is reused, not signed per request.
    assert_eq!(sends[1].header("authorization"), authorization);
}

#[tokio::test(start_paused = true)]
async fn apns_retries_503_then_succeeds() {
    let server = MockServer::start(true, |_, index| match index {
        0 => reply(StatusCode::SERVICE_UNAVAILABLE, json!({"reason": "ServiceUnavailable"})),
        _ => reply_with(StatusCode::OK, ("apns-id", "0002")),
    })
    .await;
    let client = apns_client(&server);
    let start = tokio::time::Instant::now();
    client.send(APNS_TOKEN, &notification()).await.unwrap();
    // First backoff: 100 ms with equal jitter, so 50..=100 ms.
    assert!(start.elapsed() >= Duration::from_millis(50), "{:?}", start.elapsed());
    assert_eq!(server.seen(&format!("/3/device/{APNS_TOKEN}")).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn apns_gives_up_after_the_last_attempt() {
    let server = MockServer::start(true, |_, _| {
        reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"reason": "InternalServerError"}))
    })
    .await;
    let client = apns_client(&server);
    let error = client.send(APNS_TOKEN, &notification()).await.unwrap_err();
    assert!(
        matches!(&error, Error::Unavailable { status: 500, reason, .. } if reason == "InternalServerError"),
        "{error:?}"
    );
    assert_eq!(server.seen(&format!("/3/device/{APNS_TOKEN}")).len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_silent_provider_times_out_without_a_resend() {
    let server = MockServer::start(true, |_, _| None).await;
    let client = apns_client(&server);
    let start = tokio::time::Instant::now();
    let error = client.send(APNS_TOKEN, &notification()).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(start.elapsed() >= Duration::from_secs(10));
    // The request may have been delivered: it is not sent again.
    assert_eq!(server.seen(&format!("/3/device/{APNS_TOKEN}")).len(), 1);
}

#[tokio::test]
async fn apns_reports_unregistered_and_bad_tokens_as_invalid() {
    let server = MockServer::start(true, |_, _| {
        reply(StatusCode::GONE, json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000u64}))
    })
    .await;
    let client = apns_client(&server);
    let error = client.send(APNS_TOKEN, &notification()).await.unwrap_err();
    assert!(
        matches!(&error, Error::InvalidToken { platform: Platform::Apns, reason } if reason == "Unregistered"),
        "{error:?}"
    );
    // A token that cannot be a device token never reaches APNs.
    let error = client.send("../../x", &notification()).await.unwrap_err();
    assert!(error.is_invalid_token());
    assert_eq!(server.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn notifier_fans_out_and_unregisters_invalid_tokens() {
    let fcm = fcm_server(|request, _| match request.json()["message"]["token"].as_str() {
        Some("fcm-stale") => reply(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found."}}),
        ),
        _ => fcm_ok(),
    })
    .await;
    let apns = MockServer::start(true, |request, _| {
        if request.path.ends_with("dead") {
            reply(StatusCode::GONE, json!({"reason": "Unregistered"}))
        } else if request.path.ends_with("beef") {
            reply(StatusCode::BAD_REQUEST, json!({"reason": "BadDeviceToken"}))
        } else {
            reply_with(StatusCode::OK, ("apns-id", "0003"))
        }
    })
    .await;
    let registry = Arc::new(MemoryRegistry::new());
    let devices = [
        ("alice", Device::new(Platform::Fcm, "fcm-good")),
        ("alice", Device::new(Platform::Fcm, "fcm-stale")),
        ("alice", Device::new(Platform::Apns, "00dead")),
        ("bob", Device::new(Platform::Apns, APNS_TOKEN)),
        ("bob", Device::new(Platform::Apns, "00beef")),
    ];
    for (user, device) in devices {
        registry.register(user, device).await.unwrap();
    }
    let providers: Vec<Arc<dyn PushProvider>> = vec![Arc::new(fcm_client(&fcm)), Arc::new(apns_client(&apns))];
    let notifier =
        Notifier::spawn(Arc::clone(&registry) as Arc<dyn DeviceRegistry>, providers, NotifierConfig::default());

    assert!(notifier.notify(["alice", "bob", "carol"], &message("hi")));
    let stats = notifier.shutdown().await;

    assert_eq!(stats, PushStats { sent: 2, failed: 0, invalid_tokens: 3, dropped: 0 });
    assert_eq!(registry.devices("alice").await.unwrap(), vec![Device::new(Platform::Fcm, "fcm-good")]);
    assert_eq!(registry.devices("bob").await.unwrap(), vec![Device::new(Platform::Apns, APNS_TOKEN)]);
    assert_eq!(fcm.seen(SEND_PATH).len(), 2);
    assert_eq!(apns.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn notifier_drops_and_counts_when_the_queue_is_full() {
    let apns = MockServer::start(true, |_, _| reply_with(StatusCode::OK, ("apns-id", "0004"))).await;
    let registry = Arc::new(MemoryRegistry::new());
    let users: Vec<String> = (0..5).map(|n| format!("user-{n}")).collect();
    for user in &users {
        registry.register(user, Device::new(Platform::Apns, APNS_TOKEN.replace('a', &user[5..]))).await.unwrap();
    }
    let providers: Vec<Arc<dyn PushProvider>> = vec![Arc::new(apns_client(&apns))];
    let notifier = Notifier::spawn(registry, providers, NotifierConfig { queue_capacity: 2, concurrency: 4 });

    // The test runtime has one thread: the worker cannot run until this test awaits, so the queue fills.
    let queued: Vec<bool> = users.iter().map(|user| notifier.notify([user.as_str()], &message("hi"))).collect();
    assert_eq!(queued, [true, true, false, false, false]);
    assert_eq!(notifier.stats().dropped, 3);

    let stats = notifier.shutdown().await;
    assert_eq!(stats, PushStats { sent: 2, failed: 0, invalid_tokens: 0, dropped: 3 });
    assert_eq!(apns.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn devices_without_a_provider_count_as_failed() {
    let registry = Arc::new(MemoryRegistry::new());
    registry.register("alice", Device::new(Platform::Apns, APNS_TOKEN)).await.unwrap();
    let notifier = Notifier::spawn(registry, Vec::new(), NotifierConfig::default());
    assert!(notifier.notify(Vec::<String>::new(), &message("nobody")));
    assert!(notifier.notify(["alice"], &message("hi")));
    let stats = notifier.shutdown().await;
    assert_eq!(stats.failed, 1);
    assert_eq!(stats.sent, 0);
}

#[test]
fn configuration_errors_are_reported() {
    let mut config = ApnsConfig::new(TEAM_ID, KEY_ID, TOPIC);
    assert!(matches!(ApnsClient::new(b"not a key", config.clone()), Err(Error::InvalidSigningKey { .. })));
    config.endpoint = "api.push.apple.com".into();
    assert!(matches!(ApnsClient::new(EC_PRIVATE.as_bytes(), config), Err(Error::UnsupportedEndpoint { .. })));
}
