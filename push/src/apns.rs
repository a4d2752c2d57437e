//! Apple Push Notification service over HTTP/2, with token-based (`.p8` key) authentication.
//!
//! The provider token is an ES256 JWT (header `kid` = key id, claims `iss` = team id and `iat`). Apple rejects
//! tokens older than an hour and throttles providers that renew them more than once every 20 minutes, so one token
//! is reused for [`ApnsConfig::token_lifetime`] (50 minutes by default). Sends go to
//! `{endpoint}/3/device/{device token}` over HTTP/2 only.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, Method, Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::Error;
use crate::payload::Notification;
use crate::provider::{PushProvider, Verdict};
use crate::registry::Platform;
use crate::transport::{
    excerpt, is_transient, parse_endpoint, parse_uri, retry_after, with_retry, Attempt, HttpClient, RetryPolicy,
    Timeouts,
};

/// The production APNs endpoint.
pub const DEFAULT_APNS_ENDPOINT: &str = "https://api.push.apple.com";
/// The development (sandbox) APNs endpoint.
pub const SANDBOX_APNS_ENDPOINT: &str = "https://api.sandbox.push.apple.com";
/// Longest device token accepted, in hexadecimal digits.
const MAX_DEVICE_TOKEN_LEN: usize = 200;

const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
const APNS_ID: HeaderName = HeaderName::from_static("apns-id");

/// APNs client settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApnsConfig {
    /// The Apple developer team id: the provider token's issuer.
    pub team_id: String,
    /// The id of the `.p8` signing key.
    pub key_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// The APNs base URL ([`DEFAULT_APNS_ENDPOINT`]). An `http://` URL speaks HTTP/2 with prior knowledge.
    pub endpoint: String,
    /// How long APNs keeps trying to deliver to an offline device (`apns-expiration` = now + this).
    pub expiration: Duration,
    /// How long one provider token is reused (Apple: renew after 20 minutes at the earliest, 60 at the latest).
    pub token_lifetime: Duration,
    /// Request and connect timeouts.
    pub timeouts: Timeouts,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

impl ApnsConfig {
    /// Defaults: production endpoint, one day of store-and-forward, provider tokens renewed every 50 minutes.
    pub fn new(team_id: impl Into<String>, key_id: impl Into<String>, topic: impl Into<String>) -> Self {
        ApnsConfig {
            team_id: team_id.into(),
            key_id: key_id.into(),
            topic: topic.into(),
            endpoint: DEFAULT_APNS_ENDPOINT.to_owned(),
            expiration: Duration::from_secs(24 * 3600),
            token_lifetime: Duration::from_secs(50 * 60),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// The provider token's claims.
#[derive(Debug, Serialize, Deserialize)]
struct ProviderClaims<'a> {
    iss: &'a str,
    iat: u64,
}

/// The current provider token and when it was made.
#[derive(Debug)]
struct TokenCache {
    lifetime: Duration,
    current: Option<(String, Instant)>,
}

impl TokenCache {
    /// The cached token if it is younger than the lifetime, else a new one from `sign`.
    fn get(&mut self, now: Instant, sign: impl FnOnce() -> Result<String, Error>) -> Result<String, Error> {
        if let Some((token, made)) = &self.current {
            if now.saturating_duration_since(*made) < self.lifetime {
                return Ok(token.clone());
            }
        }
        let token = sign()?;
        self.current = Some((token.clone(), now));
        Ok(token)
    }

    /// Drops `token` (APNs refused it), unless it was already replaced.
    fn forget(&mut self, token: &str) {
        if self.current.as_ref().is_some_and(|(current, _)| current == token) {
            self.current = None;
        }
    }
}

/// Sends notifications through APNs over HTTP/2.
pub struct ApnsClient {
    http: HttpClient,
    key: EncodingKey,
    header: Header,
    team_id: String,
    topic: String,
    endpoint: String,
    expiration: Duration,
    retry: RetryPolicy,
    /// No `.await` happens under this lock: signing is synchronous.
    provider_token: Mutex<TokenCache>,
}

impl fmt::Debug for ApnsClient {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ApnsClient")
            .field("team_id", &self.team_id)
            .field("key_id", &self.header.kid)
            .field("topic", &self.topic)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ApnsClient {
    /// A client signing with `signing_key_pem` (the `.p8` file's contents, PKCS#8 P-256 PEM) and `config`.
    pub fn new(signing_key_pem: &[u8], config: ApnsConfig) -> Result<Self, Error> {
        let key = EncodingKey::from_ec_pem(signing_key_pem)
            .map_err(|source| Error::InvalidSigningKey { purpose: "APNs", source })?;
        let endpoint = parse_endpoint(&config.endpoint)?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(config.key_id.clone());
        Ok(ApnsClient {
            http: HttpClient::new(true, config.timeouts)?,
            key,
            header,
            team_id: config.team_id,
            topic: config.topic,
            endpoint,
            expiration: config.expiration,
            retry: config.retry,
            provider_token: Mutex::new(TokenCache { lifetime: config.token_lifetime, current: None }),
        })
    }

    /// Sends `notification` to the device with (hexadecimal) device token `device_token`.
    pub async fn send(&self, device_token: &str, notification: &Notification) -> Result<(), Error> {
        if device_token.is_empty()
            || device_token.len() > MAX_DEVICE_TOKEN_LEN
            || !device_token.bytes().all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(Error::InvalidToken {
                platform: Platform::Apns,
                reason: "BadDeviceToken: not a hexadecimal device token".to_owned(),
            });
        }
        let url = format!("{}/3/device/{device_token}", self.endpoint);
        let body = Bytes::from(serde_json::to_vec(&payload(notification)).map_err(Error::EncodeBody)?);
        let expiration =
            (SystemTime::now() + self.expiration).duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        with_retry(&self.retry, |_| {
            let body = body.clone();
            let url = url.clone();
            async move {
                let provider_token = self.provider_token()?;
                let mut request = Request::builder()
                    .method(Method::POST)
                    .uri(parse_uri(url)?)
                    .header(AUTHORIZATION, format!("bearer {provider_token}"))
                    .header(APNS_TOPIC, self.topic.as_str())
                    .header(APNS_PUSH_TYPE, "alert")
                    .header(APNS_PRIORITY, "10")
                    .header(APNS_EXPIRATION, expiration.to_string())
                    .header(CONTENT_TYPE, "application/json");
                if let Some(collapse_id) = &notification.collapse_id {
                    request = request.header(APNS_COLLAPSE_ID, collapse_id.as_str());
                }
                let request = request.body(Full::new(body)).map_err(Error::BuildRequest)?;
                let response = match self.http.execute(request).await {
                    Ok(response) => response,
                    Err(error) => return Attempt::from_transport_error(error),
                };
                let status = response.status.as_u16();
                match classify(response.status, &response.body) {
                    Verdict::Delivered => {
                        tracing::debug!(apns_id = ?response.headers.get(APNS_ID), "APNs accepted a push");
                        Ok(Attempt::Done(()))
                    }
                    Verdict::InvalidToken(reason) => Err(Error::InvalidToken { platform: Platform::Apns, reason }),
                    Verdict::RenewCredentials(reason) => {
                        self.forget_provider_token(&provider_token);
                        Ok(Attempt::Retry {
                            error: Error::Rejected { platform: Platform::Apns, status, reason },
                            retry_after: None,
                        })
                    }
                    Verdict::Retry(reason) => Ok(Attempt::Retry {
                        error: Error::Unavailable { service: "APNs", status, reason },
                        retry_after: retry_after(&response.headers, SystemTime::now()),
                    }),
                    Verdict::Rejected(reason) => Err(Error::Rejected { platform: Platform::Apns, status, reason }),
                }
            }
        })
        .await
    }

    /// The current provider token, signed anew when it is older than the configured lifetime.
    fn provider_token(&self) -> Result<String, Error> {
        let mut cache = self.provider_token.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(Instant::now(), || {
            let iat = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
            let claims = ProviderClaims { iss: &self.team_id, iat };
            jsonwebtoken::encode(&self.header, &claims, &self.key)
                .map_err(|source| Error::SignJwt { purpose: "APNs provider token", source })
        })
    }

    fn forget_provider_token(&self, token: &str) {
        self.provider_token.lock().unwrap_or_else(PoisonError::into_inner).forget(token);
    }
}

#[async_trait]
impl PushProvider for ApnsClient {
    fn platform(&self) -> Platform {
        Platform::Apns
    }

    async fn send(&self, token: &str, notification: &Notification) -> Result<(), Error> {
        ApnsClient::send(self, token, notification).await
    }
}

/// The APNs JSON payload: `aps` with the alert and the default sound, and the deep-link data as top-level keys.
fn payload(notification: &Notification) -> serde_json::Value {
    let mut payload = serde_json::Map::new();
    for (key, value) in &notification.data {
        payload.insert(key.clone(), serde_json::Value::String(value.clone()));
    }
    payload.insert(
        "aps".to_owned(),
        serde_json::json!({
            "alert": { "title": notification.title, "body": notification.body },
            "sound": "default",
        }),
    );
    serde_json::Value::Object(payload)
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    reason: String,
}

/// Judges an APNs answer. The token is invalid on 410 (`Unregistered`, `ExpiredToken`) and on 400
/// `BadDeviceToken` or `DeviceTokenNotForTopic`; an expired provider token is renewed and the send retried.
fn classify(status: StatusCode, body: &[u8]) -> Verdict {
    if status.is_success() {
        return Verdict::Delivered;
    }
    let reason = serde_json::from_slice::<ErrorBody>(body).unwrap_or_default().reason;
    let reason = if reason.is_empty() { excerpt(body) } else { reason };
    match (status, reason.as_str()) {
        (StatusCode::GONE, _)
        | (StatusCode::BAD_REQUEST, "BadDeviceToken")
        | (StatusCode::BAD_REQUEST, "DeviceTokenNotForTopic") => Verdict::InvalidToken(reason),
        (StatusCode::FORBIDDEN, "ExpiredProviderToken") => Verdict::RenewCredentials(reason),
        (status, _) if is_transient(status) => Verdict::Retry(reason),
        _ => Verdict::Rejected(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_apns_answers() {
        assert_eq!(classify(StatusCode::OK, b""), Verdict::Delivered);
        assert_eq!(
            classify(StatusCode::GONE, br#"{"reason":"Unregistered","timestamp":1700000000000}"#),
            Verdict::InvalidToken("Unregistered".into())
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, br#"{"reason":"BadDeviceToken"}"#),
            Verdict::InvalidToken("BadDeviceToken".into())
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, br#"{"reason":"PayloadTooLarge"}"#),
            Verdict::Rejected("PayloadTooLarge".into())
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, br#"{"reason":"ExpiredProviderToken"}"#),
            Verdict::RenewCredentials("ExpiredProviderToken".into())
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, br#"{"reason":"InvalidProviderToken"}"#),
            Verdict::Rejected("InvalidProviderToken".into())
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, br#"{"reason":"TooManyRequests"}"#),
            Verdict::Retry("TooManyRequests".into())
        );
        assert_eq!(classify(StatusCode::SERVICE_UNAVAILABLE, b""), Verdict::Retry(String::new()));
    }

    #[test]
    fn provider_token_is_reused_until_its_lifetime_ends() {
        let mut cache = TokenCache { lifetime: Duration::from_secs(50 * 60), current: None };
        let start = Instant::now();
        let mut signed = 0;
        let sign = |n: &mut i32| {
            *n += 1;
            Ok::<_, Error>(format!("jwt-{n}"))
        };
        assert_eq!(cache.get(start, || sign(&mut signed)).unwrap(), "jwt-1");
        let later = start + Duration::from_secs(49 * 60);
        assert_eq!(cache.get(later, || sign(&mut signed)).unwrap(), "jwt-1");
        let expired = start + Duration::from_secs(50 * 60);
        assert_eq!(cache.get(expired, || sign(&mut signed)).unwrap(), "jwt-2");
        cache.forget("jwt-1");
        assert_eq!(cache.get(expired, || sign(&mut signed)).unwrap(), "jwt-2");
        cache.forget("jwt-2");
        assert_eq!(cache.get(expired, || sign(&mut signed)).unwrap(), "jwt-3");
        assert_eq!(signed, 3);
    }

    #[test]
    fn payload_has_aps_and_deep_link() {
        let notification = Notification {
            title: "alice".into(),
            body: "hi".into(),
            data: [("conversation_id".to_owned(), "dm:alice:bob".to_owned())].into(),
            collapse_id: None,
        };
        assert_eq!(
            payload(&notification),
            serde_json::json!({
                "aps": {"alert": {"title": "alice", "body": "hi"}, "sound": "default"},
                "conversation_id": "dm:alice:bob",
            })
        );
    }
}
