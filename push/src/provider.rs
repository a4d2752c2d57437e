//! The [`PushProvider`] trait the [`Notifier`](crate::Notifier) sends through, and how a provider's answer is
//! judged.

use async_trait::async_trait;

use crate::error::Error;
use crate::payload::Notification;
use crate::registry::Platform;

/// A push service client: FCM ([`FcmClient`](crate::FcmClient)) or APNs ([`ApnsClient`](crate::ApnsClient)).
#[async_trait]
pub trait PushProvider: Send + Sync {
    /// The platform whose device tokens this provider serves.
    fn platform(&self) -> Platform;

    /// Sends `notification` to one device. Retries transient failures itself; returns
    /// [`Error::InvalidToken`] when the provider says the token should be forgotten.
    async fn send(&self, token: &str, notification: &Notification) -> Result<(), Error>;
}

/// What a provider's answer to one send means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Accepted.
    Delivered,
    /// The device token is invalid or unregistered: forget it.
    InvalidToken(String),
    /// Overloaded or failing: retry later.
    Retry(String),
    /// The credentials (access token, provider JWT) expired: renew them and retry.
    RenewCredentials(String),
    /// Refused; retrying will not help.
    Rejected(String),
}
