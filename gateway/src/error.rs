//! Errors of the gateway crate.

use thiserror::Error;

/// Gateway errors.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// A token was missing, malformed, badly signed or expired.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A key could not be loaded.
    #[error("failed to load key {path}: {reason}")]
    Key {
        /// Where the key was read from.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound or served.
    #[error("failed to serve on {address}: {source}")]
    Serve {
        /// Address.
        address: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Storage could not be opened.
    #[error("failed to open storage: {0}")]
    Storage(#[source] parley_api::BackendError),
    /// The router could not start.
    #[error("failed to start router: {0}")]
    Router(#[source] parley_api::RouterError),
}

impl From<GatewayError> for parley_api::HttpError {
    /// A refused token is `401 unauthorized`; anything else reaching an HTTP client is a bug (`500 internal`).
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::Unauthorized(_) => parley_api::HttpError::unauthorized(error.to_string()),
            _ => parley_api::HttpError::internal(error.to_string()),
        }
    }
}
