//! Shared HTTP plumbing for the provider clients: the hyper client (rustls with the `ring` provider and Mozilla's
//! roots; ALPN h2 over TLS, prior-knowledge HTTP/2 over `http://` when asked), one request with a timeout, and the
//! retry loop with exponential backoff, jitter and `Retry-After`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;

use crate::error::Error;

/// Request body type used by the clients.
pub(crate) type Body = Full<Bytes>;

/// How failed requests are retried: 5xx and 429 answers, connection failures, and expired credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles for each further retry.
    pub initial_backoff: Duration,
    /// Upper bound of the exponential backoff.
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured; a provider asking for a longer pause fails the send instead.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1 for the first retry): exponential, capped, with "equal jitter"
    /// (a random point in the upper half), and never shorter than the provider's `Retry-After`.
    pub(crate) fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        let capped = self.initial_backoff.saturating_mul(factor).min(self.max_backoff);
        let half = capped / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let backoff = half + Duration::from_nanos(rand::rng().random_range(0..=spread));
        retry_after.map_or(backoff, |after| after.max(backoff))
    }
}

/// Timeouts for the HTTP client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Whole-request timeout, from sending the request to reading the last byte of the answer.
    pub request: Duration,
    /// TCP connect timeout.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { request: Duration::from_secs(10), connect: Duration::from_secs(5) }
    }
}

/// A fully read response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// A pooled HTTP client with a per-request timeout.
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    timeout: Duration,
}

impl HttpClient {
    /// A client for `https://` (TLS 1.2/1.3, ALPN) and `http://` URLs. With `http2_only`, every connection speaks
    /// HTTP/2: negotiated by ALPN over TLS, by prior knowledge over plain text.
    pub(crate) fn new(http2_only: bool, timeouts: Timeouts) -> Result<Self, Error> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(Error::Tls)?
            .with_webpki_roots()
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeouts.connect));
        let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        let connector = if http2_only {
            builder.enable_http2().wrap_connector(tcp)
        } else {
            builder.enable_all_versions().wrap_connector(tcp)
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(http2_only)
            .build(connector);
        Ok(HttpClient { client, timeout: timeouts.request })
    }

    /// Sends `request` and reads the whole answer, all within the request timeout.
    pub(crate) async fn execute(&self, request: Request<Body>) -> Result<Response, Error> {
        let host = request.uri().authority().map_or_else(String::new, ToString::to_string);
        let exchange = async {
            let response =
                self.client.request(request).await.map_err(|source| Error::Transport { host: host.clone(), source })?;
            let (parts, body) = response.into_parts();
            let body =
                body.collect().await.map_err(|source| Error::ReadBody { host: host.clone(), source })?.to_bytes();
            Ok(Response { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(Error::Timeout { host, timeout: self.timeout }),
        }
    }
}

/// What one attempt came to.
pub(crate) enum Attempt<T> {
    /// Finished: no further attempt.
    Done(T),
    /// Failed in a way another attempt may fix, after at least `retry_after` if given.
    Retry { error: Error, retry_after: Option<Duration> },
}

impl<T> Attempt<T> {
    /// Turns a transport error that happened before the request was sent (a refused or timed-out connect) into a
    /// retry; every other error ends the call. A request that may have reached the provider is not sent again,
    /// so a push is never shown twice.
    pub(crate) fn from_transport_error(error: Error) -> Result<Self, Error> {
        match &error {
            Error::Transport { source, .. } if source.is_connect() => Ok(Attempt::Retry { error, retry_after: None }),
            _ => Err(error),
        }
    }
}

/// Runs `attempt` (given the attempt number, from 1) until it is done, fails for good, or the policy's attempts
/// run out; then the last attempt's error is returned.
pub(crate) async fn with_retry<T, F, Fut>(policy: &RetryPolicy, mut attempt: F) -> Result<T, Error>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<Attempt<T>, Error>>,
{
    let mut number = 1;
    loop {
        match attempt(number).await? {
            Attempt::Done(value) => return Ok(value),
            Attempt::Retry { error, retry_after } => {
                if number >= policy.max_attempts.max(1) {
                    return Err(error);
                }
                if retry_after.is_some_and(|after| after > policy.max_retry_after) {
                    return Err(error);
                }
                let delay = policy.delay(number, retry_after);
                tracing::debug!(attempt = number, ?delay, %error, "retrying push request");
                tokio::time::sleep(delay).await;
                number += 1;
            }
        }
    }
}

/// The pause a `Retry-After` header asks for (delta-seconds or an HTTP date), if any.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether a status is worth retrying: 429 and every 5xx.
pub(crate) fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Checks that `url` is an absolute `http://` or `https://` URL and returns it without a trailing slash.
pub(crate) fn parse_endpoint(url: &str) -> Result<String, Error> {
    let trimmed = url.trim().trim_end_matches('/');
    let uri: Uri = trimmed.parse().map_err(|source| Error::InvalidEndpoint { url: url.to_owned(), source })?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() {
        return Err(Error::UnsupportedEndpoint { url: url.to_owned() });
    }
    Ok(trimmed.to_owned())
}

/// Parses a URL built from a checked endpoint.
pub(crate) fn parse_uri(url: String) -> Result<Uri, Error> {
    Uri::try_from(url.as_str()).map_err(|source| Error::InvalidEndpoint { url, source })
}

/// At most the first 512 bytes of a response body, as text, for error messages.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    crate::payload::truncate(text.trim(), 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let first = policy.delay(1, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(3, None);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.delay(30, None);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
        assert!(policy.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
    }

    #[test]
    fn endpoints_must_be_absolute_http_urls() {
        assert_eq!(parse_endpoint("https://api.push.apple.com/").unwrap(), "https://api.push.apple.com");
        assert_eq!(parse_endpoint("http://127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080");
        assert!(parse_endpoint("api.push.apple.com").is_err());
        assert!(parse_endpoint("ftp://example.invalid").is_err());
        assert!(parse_endpoint("https://exa mple").is_err());
    }

    #[test]
    fn transient_statuses() {
        assert!(is_transient(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_transient(StatusCode::SERVICE_UNAVAILABLE));
        assert!(is_transient(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!is_transient(StatusCode::BAD_REQUEST));
        assert!(!is_transient(StatusCode::NOT_FOUND));
    }

    #[tokio::test]
    async fn clients_build_for_both_protocol_choices() {
        HttpClient::new(true, Timeouts::default()).unwrap();
        HttpClient::new(false, Timeouts::default()).unwrap();
    }
}
