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
    Storage(#[source] parley_router::BackendError),
    /// The router could not start.
    #[error("failed to start router: {0}")]
    Router(#[source] parley_router::RouterError),
}
