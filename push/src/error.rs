//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

use crate::registry::Platform;

/// Everything that can go wrong while registering devices or sending a push.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service-account file could not be read.
    #[error("unable to read the service account file {path}")]
    ReadServiceAccount {
        /// The file that was read.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// The service-account JSON is malformed or lacks a required field.
    #[error("unable to parse the service account JSON")]
    ParseServiceAccount(#[source] serde_json::Error),

    /// A private key (service-account RSA key or APNs `.p8` key) is not a valid PEM key.
    #[error("invalid {purpose} signing key")]
    InvalidSigningKey {
        /// Which key: "FCM service account" or "APNs".
        purpose: &'static str,
        /// What the JWT library reported.
        #[source]
        source: jsonwebtoken::errors::Error,
    },

    /// Signing a JWT failed.
    #[error("failed to sign the {purpose} JWT")]
    SignJwt {
        /// Which JWT: "FCM OAuth2 assertion" or "APNs provider token".
        purpose: &'static str,
        /// What the JWT library reported.
        #[source]
        source: jsonwebtoken::errors::Error,
    },

    /// An endpoint could not be parsed as a URI.
    #[error("invalid endpoint URL {url}")]
    InvalidEndpoint {
        /// The configured URL.
        url: String,
        /// Why it does not parse.
        #[source]
        source: http::uri::InvalidUri,
    },

    /// An endpoint is not an absolute `http://` or `https://` URL.
    #[error("endpoint {url} must be an absolute http:// or https:// URL")]
    UnsupportedEndpoint {
        /// The configured URL.
        url: String,
    },

    /// The TLS client configuration could not be built.
    #[error("failed to build the TLS client configuration")]
    Tls(#[source] rustls::Error),

    /// An HTTP request could not be built (for example a header value with invalid characters).
    #[error("failed to build an HTTP request")]
    BuildRequest(#[source] http::Error),

    /// A JSON request body could not be encoded.
    #[error("failed to encode a JSON request body")]
    EncodeBody(#[source] serde_json::Error),

    /// The OAuth2 token request form could not be encoded.
    #[error("failed to encode the OAuth2 token request")]
    EncodeForm(#[source] serde_urlencoded::ser::Error),

    /// The request did not reach the provider or the connection failed mid-way.
    #[error("request to {host} failed")]
    Transport {
        /// The provider's host.
        host: String,
        /// What the HTTP client reported.
        #[source]
        source: hyper_util::client::legacy::Error,
    },

    /// The response body could not be read.
    #[error("failed to read the response body from {host}")]
    ReadBody {
        /// The provider's host.
        host: String,
        /// What hyper reported.
        #[source]
        source: hyper::Error,
    },

    /// The provider did not answer within the configured timeout.
    #[error("request to {host} timed out after {timeout:?}")]
    Timeout {
        /// The provider's host.
        host: String,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// The OAuth2 server refused to issue an access token.
    #[error("OAuth2 token exchange failed with HTTP {status}: {detail}")]
    TokenExchange {
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        detail: String,
    },

    /// The OAuth2 server's answer is not a valid token response.
    #[error("unable to decode the OAuth2 token response")]
    DecodeTokenResponse(#[source] serde_json::Error),

    /// The device registry file could not be read or written.
    #[error("device registry {path}: {reason}")]
    Registry {
        /// The registry file.
        path: String,
        /// What went wrong.
        reason: String,
    },

    /// The provider says the device token is invalid or no longer registered; it should be forgotten.
    #[error("{platform} reports the device token as invalid: {reason}")]
    InvalidToken {
        /// The provider.
        platform: Platform,
        /// The provider's reason (`UNREGISTERED`, `BadDeviceToken`, ...).
        reason: String,
    },

    /// The provider refused the notification for a reason that retrying will not fix.
    #[error("{platform} rejected the notification with HTTP {status}: {reason}")]
    Rejected {
        /// The provider.
        platform: Platform,
        /// The HTTP status.
        status: u16,
        /// The provider's reason.
        reason: String,
    },

    /// The provider kept answering with a transient error (5xx, 429) until the attempts ran out, or asked
    /// to be retried later than the policy allows.
    #[error("{service} unavailable: HTTP {status}: {reason}")]
    Unavailable {
        /// The service ("FCM", "APNs", "OAuth2").
        service: &'static str,
        /// The last HTTP status.
        status: u16,
        /// The provider's reason.
        reason: String,
    },
}

impl Error {
    /// True when the provider reported the device token as invalid, so it should be unregistered.
    pub fn is_invalid_token(&self) -> bool {
        matches!(self, Error::InvalidToken { .. })
    }
}
