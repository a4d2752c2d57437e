//! The Parley gateway: the edge that clients connect to.
//!
//! - [`config`]: command-line and environment settings, including every limit.
//! - [`auth`]: JWT verification (HS256, RS256, several keys told apart by `kid`) and the insecure dev login.
//! - [`hub`]: this instance's index of local connections per channel and user, fed by one pub/sub
//!   subscription for the whole instance; it forwards each published frame to the local members' queues.
//! - [`connection`]: the per-connection loop, generic over any `Sink`/`Stream` of WebSocket messages: the handshake,
//!   then one handler per event (queued frames, client frames, deadlines), then the close.
//! - [`admission`]: the application's shared state ([`AppState`]) and what a client must pass to connect (version,
//!   token, draining, connection limit), shared by WebSocket and the fallback transports.
//! - [`fallback`]: SSE and long-poll transports, which run the same connection loop over a virtual socket.
//! - [`server_api`]: the server API for the application's backend (`/server/v1/...`, API keys): channels with full
//!   authority, system messages, disconnects, token revocations, presence.
//! - [`http`]: the axum applications (`app(state)`, `admin_app(state)`): WebSocket upgrade, HTTP API, the demo
//!   page, health, drain; it merges the fallback transports' routes. Every HTTP refusal is a
//!   [`parley_api::HttpError`].
//! - [`metrics`]: Prometheus metrics served on the admin port.
//! - [`presence`]: this instance's presence service over the fenced presence book.
//! - [`journal`]: the presence journal, which hands presence changes to the router for the log (distributed).
//! - [`drain`]: draining an instance: reconnect requests spread over a window, then stop (or, for a drain its pod
//!   asked for, stay up not ready until SIGTERM).
//! - [`pod_agent`]: in a Kubernetes pod, watches its own Pod for a drain request and writes its figures on it.

pub mod admission;
pub mod auth;
pub mod config;
pub mod connection;
pub mod drain;
pub mod error;
pub mod fallback;
pub mod http;
pub mod hub;
pub mod journal;
pub mod metrics;
pub mod pod_agent;
pub mod presence;
pub mod server_api;

pub use error::GatewayError;
pub use http::{admin_app, app, AppState};
