//! The router's API: what a caller of a router needs, and nothing of how a router stores or orders.
//!
//! - [`call`]: every operation as one [`Call`] enum, with the [`Answer`] each gives.
//! - [`handle`]: [`Router`], the handle callers use, over any [`RouterService`] (the in-process writer of
//!   `parley-router`, or [`RemoteRouter`]); one typed method per operation.
//! - [`remote`]: [`RemoteRouter`], the client of a `parley-router` process's internal HTTP API.
//! - [`routing`]: the map of which router owns which partition of the messages topic, as routers publish it and
//!   gateways read it ([`OwnerTable`], pure), and [`pool`]: [`RouterPool`], a gateway's client of all the routers
//!   of a Region, which sends each call to the owner of its channel.
//! - [`http`]: [`HttpError`], the one error of every HTTP endpoint (gateway and router alike):
//!   `{"code": ..., "message": ...}` with a status; and the constant-time bearer-token check.
//! - [`types`]: the values that travel (pages, placements, presence changes, limits, counters).
//! - [`error`]: [`RouterError`] (each maps to a stable protocol error code) and [`BackendError`], the failure of
//!   any engine driver; engine errors are boxed, so this crate links no engine client.

pub mod call;
pub mod error;
pub mod handle;
pub mod http;
pub mod pool;
pub mod remote;
pub mod routing;
pub mod types;

pub use self::http::HttpError;
pub use call::{Answer, AnswerKind, Call, Reply};
pub use error::{BackendError, RouterError};
pub use handle::{Router, RouterService};
pub use pool::{PoolConfig, PoolStats, RouterPool};
pub use remote::RemoteRouter;
pub use routing::{MemoryRouterDirectory, OwnedPartition, OwnerTable, RouterDirectory, RouterEntry};
pub use types::{
    ChannelAction, ChannelSettings, DurableMessage, HistoryPage, HistoryQuery, HomeStep, Limits, PresenceUpdate,
    RouterStats, SendOutcome, ServerOp, DELIVERY_RECEIPT_MEMBERS, MAX_PRESENCE_BATCH, SERVER_SENDER,
};
