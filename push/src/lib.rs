//! Push notifications for Parley users who are offline when a message arrives.
//!
//! The pieces, from the caller inwards:
//!
//! - [`notifier`]: the [`Notifier`] takes the offline recipients of a message and returns at once. A bounded
//!   queue feeds one worker task; when the queue is full the push is dropped and counted, so push never slows
//!   the delivery path (it is at-most-once). The worker looks up each recipient's devices, sends through the
//!   provider for each device's platform, unregisters tokens the provider reports invalid, and counts sent,
//!   failed, invalid-token and dropped pushes ([`Notifier::stats`]).
//! - [`registry`]: device tokens per user behind the async [`DeviceRegistry`] trait, with the in-memory
//!   [`MemoryRegistry`].
//! - [`payload`]: the provider-neutral [`Notification`] built from a [`PushMessage`]: a preview (title = sender
//!   and conversation, body = text cut to 120 characters) and the deep link (conversation id, message id, seq).
//! - [`provider`]: the [`PushProvider`] trait the notifier sends through, implemented by:
//!   - [`fcm`]: [`FcmClient`], the FCM HTTP v1 API, authenticated with a service account (RS256 JWT assertion
//!     traded for a cached OAuth2 access token);
//!   - [`apns`]: [`ApnsClient`], APNs over HTTP/2 with a reused ES256 provider token.
//! - [`transport`]: the shared hyper client (rustls with `ring`, ALPN h2; prior-knowledge HTTP/2 for `http://`
//!   endpoints when asked), per-request timeouts, and retries of 5xx/429 answers with exponential backoff,
//!   jitter and `Retry-After` ([`RetryPolicy`]).
//! - [`config`]: [`PushConfig`], the provider flags of the processes that send pushes, and the providers built
//!   from them.
//! - [`error`]: the crate's [`Error`].

pub mod apns;
pub mod config;
pub mod error;
pub mod fcm;
pub mod notifier;
pub mod payload;
pub mod provider;
pub mod registry;
pub mod transport;

pub use apns::{ApnsClient, ApnsConfig};
pub use config::{ConfigError, PushConfig};
pub use error::Error;
pub use fcm::{FcmClient, FcmConfig, ServiceAccount};
pub use notifier::{Notifier, NotifierConfig, PushStats};
pub use payload::{Notification, PushMessage};
pub use provider::PushProvider;
pub use registry::{Device, DeviceRegistry, FileRegistry, MemoryRegistry, Platform, DEFAULT_MAX_DEVICES_PER_USER};
pub use transport::{RetryPolicy, Timeouts};
