//! A stand-in APNs endpoint: HTTP/2 with prior knowledge on 127.0.0.1, answering 200 to every request and
//! recording each one (path, HTTP version, JSON body), for the tests of push notifications.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::sync::{Arc, Mutex};

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Push {
    /// `/3/device/<token>`.
    pub path: String,
    /// The HTTP version (APNs speaks HTTP/2 only).
    pub version: hyper::Version,
    /// The JSON payload (`Null` when it is not JSON).
    pub body: Value,
}

/// The endpoint: its URL and what it received so far.
#[derive(Debug, Clone)]
pub struct ApnsStub {
    /// `http://127.0.0.1:<port>`, for `--apns-endpoint`.
    pub url: String,
    seen: Arc<Mutex<Vec<Push>>>,
}

impl ApnsStub {
    /// Binds a port and serves until the test's runtime ends.
    pub async fn start() -> ApnsStub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the APNs stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let path = request.uri().path().to_owned();
                            let version = request.version();
                            let body = request.into_body().collect().await?.to_bytes();
                            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            log.lock().unwrap_or_else(|poison| poison.into_inner()).push(Push { path, version, body });
                            Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApnsStub { url, seen }
    }

    /// The flags that send pushes to this endpoint (`--apns-key` and the rest), with the signing key written to
    /// `dir/apns.p8`.
    pub fn flags(&self, dir: &std::path::Path) -> Vec<String> {
        let key = dir.join("apns.p8");
        std::fs::write(&key, SIGNING_KEY).expect("write the APNs key");
        [
            "--apns-key",
            &key.display().to_string(),
            "--apns-key-id",
            "KEY123",
            "--apns-team-id",
            "TEAM123",
            "--apns-topic",
            "dev.parley.app",
            "--apns-endpoint",
            &self.url,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The pushes received so far, in order.
    pub fn pushes(&self) -> Vec<Push> {
        self.seen.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }
}

/// The APNs signing key of the push tests (an EC P-256 key in PEM).
const SIGNING_KEY: &str = include_str!("../../push/tests/fixtures/ec-private.pem");
