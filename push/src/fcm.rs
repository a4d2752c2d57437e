//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Authentication is OAuth2 with a service account: the client signs an RS256 JWT assertion with the account's
//! private key, trades it at the account's `token_uri` for an access token, and keeps that token until shortly
//! before it expires (one exchange at a time; concurrent sends wait for it). Sends go to
//! `{endpoint}/v1/projects/{project_id}/messages:send`.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::Error;
use crate::payload::Notification;
use crate::provider::{PushProvider, Verdict};
use crate::registry::Platform;
use crate::transport::{
    excerpt, is_transient, parse_endpoint, parse_uri, retry_after, with_retry, Attempt, HttpClient, RetryPolicy,
    Timeouts,
};

/// The production FCM endpoint.
pub const DEFAULT_FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
/// Google's OAuth2 token endpoint, used when neither the configuration nor the service account names one.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth2 scope that allows sending with FCM.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The OAuth2 grant type for a signed JWT assertion.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of the signed assertion (Google accepts at most one hour).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// The fields of a Google service-account JSON key that FCM needs; the others are ignored.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    /// The account's e-mail address: the assertion's issuer.
    pub client_email: String,
    /// The account's RSA private key, PEM.
    pub private_key: String,
    /// Where to trade the assertion for an access token.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// The Firebase project, when the key file names it.
    #[serde(default)]
    pub project_id: Option<String>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish()
    }
}

impl ServiceAccount {
    /// Parses a service-account JSON key.
    pub fn from_json(json: &str) -> Result<Self, Error> {
        serde_json::from_str(json).map_err(Error::ParseServiceAccount)
    }

    /// Reads and parses a service-account JSON key file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let json = std::fs::read_to_string(path)
            .map_err(|source| Error::ReadServiceAccount { path: path.to_owned(), source })?;
        Self::from_json(&json)
    }
}

/// FCM client settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FcmConfig {
    /// The Firebase project id.
    pub project_id: String,
    /// The FCM API base URL ([`DEFAULT_FCM_ENDPOINT`]).
    pub endpoint: String,
    /// The OAuth2 token endpoint; `None` uses the service account's `token_uri`, else [`DEFAULT_TOKEN_URI`].
    pub token_uri: Option<String>,
    /// An access token is renewed this long before it expires.
    pub token_refresh_margin: Duration,
    /// Request and connect timeouts.
    pub timeouts: Timeouts,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

impl FcmConfig {
    /// Defaults for `project_id`: production endpoints, 5-minute refresh margin, default timeouts and retries.
    pub fn new(project_id: impl Into<String>) -> Self {
        FcmConfig {
            project_id: project_id.into(),
            endpoint: DEFAULT_FCM_ENDPOINT.to_owned(),
            token_uri: None,
            token_refresh_margin: Duration::from_secs(300),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A cached OAuth2 access token.
#[derive(Clone, Debug)]
struct AccessToken {
    value: String,
    renew_at: Instant,
}

/// The OAuth2 assertion's claims.
#[derive(Debug, Serialize, Deserialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

/// Longest access-token lifetime believed, whatever the server says.
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

fn default_expires_in() -> u64 {
    3600
}

/// Sends notifications through the FCM HTTP v1 API.
pub struct FcmClient {
    http: HttpClient,
    client_email: String,
    key: EncodingKey,
    token_uri: String,
    send_url: String,
    refresh_margin: Duration,
    retry: RetryPolicy,
    /// The cached access token. A `tokio` mutex on purpose: it is held across the exchange so that concurrent
    /// sends share one exchange instead of stampeding the token endpoint.
    access_token: Mutex<Option<AccessToken>>,
}

impl fmt::Debug for FcmClient {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("FcmClient")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

impl FcmClient {
    /// A client for `account` (its private key is checked here) with `config`.
    pub fn new(account: &ServiceAccount, config: FcmConfig) -> Result<Self, Error> {
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|source| Error::InvalidSigningKey { purpose: "FCM service account", source })?;
        let token_uri = config.token_uri.as_deref().or(account.token_uri.as_deref()).unwrap_or(DEFAULT_TOKEN_URI);
        let token_uri = parse_endpoint(token_uri)?;
        let endpoint = parse_endpoint(&config.endpoint)?;
        let send_url = format!("{endpoint}/v1/projects/{}/messages:send", config.project_id);
        parse_uri(send_url.clone())?;
        Ok(FcmClient {
            http: HttpClient::new(false, config.timeouts)?,
            client_email: account.client_email.clone(),
            key,
            token_uri,
            send_url,
            refresh_margin: config.token_refresh_margin,
            retry: config.retry,
            access_token: Mutex::new(None),
        })
    }

    /// Sends `notification` to the device with registration token `token`.
    pub async fn send(&self, token: &str, notification: &Notification) -> Result<(), Error> {
        let body = Bytes::from(serde_json::to_vec(&send_body(token, notification)).map_err(Error::EncodeBody)?);
        with_retry(&self.retry, |_| {
            let body = body.clone();
            async move {
                let access_token = self.access_token().await?;
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(parse_uri(self.send_url.clone())?)
                    .header(AUTHORIZATION, format!("Bearer {access_token}"))
                    .header(CONTENT_TYPE, "application/json")
                    .header(ACCEPT, "application/json")
                    .body(Full::new(body))
                    .map_err(Error::BuildRequest)?;
                let response = match self.http.execute(request).await {
                    Ok(response) => response,
                    Err(error) => return Attempt::from_transport_error(error),
                };
                let status = response.status.as_u16();
                match classify(response.status, &response.body) {
                    Verdict::Delivered => Ok(Attempt::Done(())),
                    Verdict::InvalidToken(reason) => Err(Error::InvalidToken { platform: Platform::Fcm, reason }),
                    Verdict::RenewCredentials(reason) => {
                        self.forget_access_token(&access_token).await;
                        Ok(Attempt::Retry {
                            error: Error::Rejected { platform: Platform::Fcm, status, reason },
                            retry_after: None,
                        })
                    }
                    Verdict::Retry(reason) => Ok(Attempt::Retry {
                        error: Error::Unavailable { service: "FCM", status, reason },
                        retry_after: retry_after(&response.headers, SystemTime::now()),
                    }),
                    Verdict::Rejected(reason) => Err(Error::Rejected { platform: Platform::Fcm, status, reason }),
                }
            }
        })
        .await
    }

    /// The cached access token, or a new one when it is missing or about to expire.
    async fn access_token(&self) -> Result<String, Error> {
        let mut cached = self.access_token.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.renew_at {
                return Ok(token.value.clone());
            }
        }
        let token = self.exchange().await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Drops `value` from the cache (the API refused it), unless another send already replaced it.
    async fn forget_access_token(&self, value: &str) {
        let mut cached = self.access_token.lock().await;
        if cached.as_ref().is_some_and(|token| token.value == value) {
            *cached = None;
        }
    }

    /// Signs the assertion for the token exchange.
    fn assertion(&self) -> Result<String, Error> {
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        let claims = AssertionClaims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|source| Error::SignJwt { purpose: "FCM OAuth2 assertion", source })
    }

    /// Trades a fresh assertion for an access token.
    async fn exchange(&self) -> Result<AccessToken, Error> {
        let assertion = self.assertion()?;
        let form = serde_urlencoded::to_string([("grant_type", JWT_BEARER_GRANT), ("assertion", assertion.as_str())])
            .map_err(Error::EncodeForm)?;
        let form = Bytes::from(form);
        with_retry(&self.retry, |_| {
            let form = form.clone();
            async move {
                let requested_at = Instant::now();
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(parse_uri(self.token_uri.clone())?)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header(ACCEPT, "application/json")
                    .body(Full::new(form))
                    .map_err(Error::BuildRequest)?;
                let response = match self.http.execute(request).await {
                    Ok(response) => response,
                    Err(error) => return Attempt::from_transport_error(error),
                };
                if response.status.is_success() {
                    let token: TokenResponse =
                        serde_json::from_slice(&response.body).map_err(Error::DecodeTokenResponse)?;
                    let lifetime = Duration::from_secs(token.expires_in.min(MAX_TOKEN_LIFETIME_SECS));
                    let margin = self.refresh_margin.min(lifetime / 2);
                    tracing::debug!(expires_in = token.expires_in, "obtained an FCM access token");
                    return Ok(Attempt::Done(AccessToken {
                        value: token.access_token,
                        renew_at: requested_at + lifetime - margin,
                    }));
                }
                let status = response.status.as_u16();
                let detail = excerpt(&response.body);
                if is_transient(response.status) {
                    Ok(Attempt::Retry {
                        error: Error::Unavailable { service: "OAuth2", status, reason: detail },
                        retry_after: retry_after(&response.headers, SystemTime::now()),
                    })
                } else {
                    Err(Error::TokenExchange { status, detail })
                }
            }
        })
        .await
    }
}

#[async_trait]
impl PushProvider for FcmClient {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }

    async fn send(&self, token: &str, notification: &Notification) -> Result<(), Error> {
        FcmClient::send(self, token, notification).await
    }
}

/// The `messages:send` request body.
fn send_body(token: &str, notification: &Notification) -> serde_json::Value {
    serde_json::json!({
        "message": {
            "token": token,
            "notification": {
                "title": notification.title,
                "body": notification.body,
            },
            "data": notification.data,
        }
    })
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorStatus,
}

#[derive(Deserialize, Default)]
struct ErrorStatus {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode", default)]
    error_code: Option<String>,
}

/// Judges an FCM answer. The token is invalid on 404 (`NOT_FOUND` / `UNREGISTERED`), on an `UNREGISTERED` error
/// code, and on 400 `INVALID_ARGUMENT` when the message is about the registration token (other invalid arguments
/// are our bug, not the device's, and must not unregister it).
fn classify(status: StatusCode, body: &[u8]) -> Verdict {
    if status.is_success() {
        return Verdict::Delivered;
    }
    let error = serde_json::from_slice::<ErrorBody>(body).unwrap_or_default().error;
    let code = error.details.iter().find_map(|detail| detail.error_code.clone());
    let reason = match (&code, error.status.is_empty()) {
        (Some(code), _) => format!("{code}: {}", error.message),
        (None, false) => format!("{}: {}", error.status, error.message),
        (None, true) => excerpt(body),
    };
    let unregistered = code.as_deref() == Some("UNREGISTERED");
    let bad_token = status == StatusCode::BAD_REQUEST
        && (error.status == "INVALID_ARGUMENT" || code.as_deref() == Some("INVALID_ARGUMENT"))
        && error.message.to_ascii_lowercase().contains("token");
    if status == StatusCode::NOT_FOUND || unregistered || bad_token {
        Verdict::InvalidToken(reason)
    } else if status == StatusCode::UNAUTHORIZED {
        Verdict::RenewCredentials(reason)
    } else if is_transient(status) {
        Verdict::Retry(reason)
    } else {
        Verdict::Rejected(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_fcm_answers() {
        assert_eq!(classify(StatusCode::OK, b"{}"), Verdict::Delivered);
        let unregistered = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, unregistered),
            Verdict::InvalidToken(reason) if reason.starts_with("UNREGISTERED")
        ));
        let bad_token = br#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT"}}"#;
        assert!(matches!(classify(StatusCode::BAD_REQUEST, bad_token), Verdict::InvalidToken(_)));
        let bad_payload = br#"{"error":{"code":400,"message":"Invalid value at 'message.data[0].value'","status":"INVALID_ARGUMENT"}}"#;
        assert!(matches!(classify(StatusCode::BAD_REQUEST, bad_payload), Verdict::Rejected(_)));
        assert!(matches!(classify(StatusCode::UNAUTHORIZED, b""), Verdict::RenewCredentials(_)));
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, b"oops"),
            Verdict::Retry(reason) if reason == "oops"
        ));
        assert!(matches!(classify(StatusCode::TOO_MANY_REQUESTS, b""), Verdict::Retry(_)));
        assert!(matches!(classify(StatusCode::FORBIDDEN, b""), Verdict::Rejected(_)));
    }

    #[test]
    fn service_account_parses_and_hides_its_key() {
        let account = ServiceAccount::from_json(
            r#"{"type":"service_account","project_id":"demo","client_email":"push@demo.iam.gserviceaccount.com",
                "private_key":"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n",
                "token_uri":"https://oauth2.googleapis.com/token"}"#,
        )
        .unwrap();
        assert_eq!(account.project_id.as_deref(), Some("demo"));
        assert!(!format!("{account:?}").contains("secret"));
        assert!(ServiceAccount::from_json(r#"{"client_email":"x"}"#).is_err());
    }

    #[test]
    fn rejects_a_bad_private_key() {
        let account = ServiceAccount {
            client_email: "push@demo".into(),
            private_key: "not a key".into(),
            token_uri: None,
            project_id: None,
        };
        assert!(matches!(FcmClient::new(&account, FcmConfig::new("demo")), Err(Error::InvalidSigningKey { .. })));
    }
}
