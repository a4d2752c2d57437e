//! Prometheus metrics of the operator (prefix `parley_operator_`) and the admin HTTP server that serves them
//! (`/metrics`, `/healthz`) on its own port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::Error;

type Labels = Vec<(&'static str, &'static str)>;
type RegionLabels = Vec<(&'static str, String)>;

/// Every metric of the operator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, successful or not.
    pub reconciles: Counter,
    /// Reconciles that failed, by reason (the error's `reason()`).
    pub errors: Family<Labels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// Writes to the API server, by kind (`apply`, `create`, `status`, `delete`, `event`). A no-op reconcile adds
    /// none.
    pub writes: Family<Labels, Counter>,
    /// 1 while this replica holds the leader Lease (and so runs the controller), else 0.
    pub leader: Gauge,
    /// The connections a Region's gateways last reported, summed, by Region.
    pub gateway_connections: Family<RegionLabels, Gauge>,
    /// The gateway pods a Region wants (its spec's, or the connection-based scaling's), by Region.
    pub gateways_desired: Family<RegionLabels, Gauge>,
    /// Rollout and scaling steps, by Region and outcome (`drain`, `replace`, `remove`, `add`, `paused`).
    pub rollout_steps: Family<RegionLabels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("parley_operator");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let writes = Family::<Labels, Counter>::default();
        let leader = Gauge::default();
        let gateway_connections = Family::<RegionLabels, Gauge>::default();
        let gateways_desired = Family::<RegionLabels, Gauge>::default();
        let rollout_steps = Family::<RegionLabels, Counter>::default();
        registry.register(
            "gateway_connections",
            "Connections the Region's gateways last reported, summed",
            gateway_connections.clone(),
        );
        registry.register("gateways_desired", "Gateway pods the Region wants", gateways_desired.clone());
        registry.register("rollout_steps", "Rollout and scaling steps, by outcome", rollout_steps.clone());
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by reason", errors.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        registry.register("writes", "Writes to the API server, by kind", writes.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Arc::new(Metrics {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            gateway_connections,
            gateways_desired,
            rollout_steps,
        })
    }

    /// Counts a finished reconcile.
    pub fn reconciled(&self, elapsed: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.errors.get_or_create(&vec![("reason", error.reason())]).inc();
        }
    }

    /// Counts a write of one kind.
    pub fn wrote(&self, kind: &'static str) {
        self.writes.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The admin routes: `/metrics` (Prometheus text format) and `/healthz`.
pub fn app(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        metrics.encode(),
    )
}

/// Binds the admin address; the returned listener is served with [`serve`].
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

/// Serves the admin routes until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    axum::serve(listener, app(metrics)).await
}
