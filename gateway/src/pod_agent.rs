//! The pod agent: a gateway running in a Kubernetes pod talks to the operator through its own Pod object, never
//! through its ports (`--pod-agent`, with `--pod-name` and `--pod-namespace` from the downward API).
//!
//! - **Drain requests.** It watches only its own pod (`fieldSelector metadata.name=<pod>`; the RBAC grants get,
//!   list, watch and patch on that pod name alone). When the `parley.dev/drain` annotation is non-empty it starts
//!   the drain of `--drain-window-ms`/`--drain-deadline-ms` in hold mode ([`DrainEnd::Hold`]): the drain runs as a
//!   SIGTERM drain does, but the process then stays up, not ready and not accepting, until its pod is deleted
//!   (SIGTERM then stops it at once). Removing the annotation undoes nothing.
//! - **Status.** It writes `parley.dev/gateway-status` on its own pod by JSON merge patch: a compact JSON object
//!   ([`Figures::annotation`]) with the connections, the connection limit, whether it drains, and the process's
//!   totals of resume requests by outcome. It writes at start, then whenever a figure changed, at most once per
//!   `--pod-status-interval-ms`, and at least every [`HEARTBEAT`] ([`Schedule`]).
//!
//! The Kubernetes client comes from `kube::Config::infer()`: `KUBECONFIG` when set, else the in-cluster config
//! (`KUBERNETES_SERVICE_HOST`/`PORT` and the ServiceAccount token volume). Failures (no config, API server
//! unreachable, forbidden) are logged with their reason, counted in `parley_gateway_pod_agent_errors` (by
//! `operation`), and retried with a backoff; they never stop the gateway or its clients.

use crate::config::PodRef;
use crate::drain::{DrainEnd, DrainPlan, Drainer};
use crate::hub::Hub;
use crate::metrics::Metrics;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

pub use parley_crds::common::{DRAIN_ANNOTATION, GATEWAY_STATUS_ANNOTATION};

/// The status annotation is written at least this often, changed or not.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// The first retry delay after a failed API call; it doubles with each failure in a row, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Upper bound of one API call (a status patch, building the client).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the figures are read to notice a change.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What the gateway publishes about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    /// Open client connections.
    pub connections: u64,
    /// The connection limit (`--max-connections`).
    pub max_connections: u64,
    /// Whether the instance drains.
    pub draining: bool,
    /// Resume requests replayed since the process started (`parley_gateway_resumes{outcome="replayed"}`).
    pub resumed: u64,
    /// Resume requests that failed since the process started (`parley_gateway_resumes{outcome="failed"}`).
    pub resume_failed: u64,
}

/// The annotation's JSON (the contract's field names).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusAnnotation<'a> {
    connections: u64,
    max_connections: u64,
    draining: bool,
    resumed: u64,
    resume_failed: u64,
    at: &'a str,
}

impl Figures {
    /// The value of `parley.dev/gateway-status`: compact JSON, with `at` (RFC 3339, whole seconds, UTC).
    pub fn annotation(&self, at: Timestamp) -> String {
        let at = format!("{at:.0}");
        let status = StatusAnnotation {
            connections: self.connections,
            max_connections: self.max_connections,
            draining: self.draining,
            resumed: self.resumed,
            resume_failed: self.resume_failed,
            at: &at,
        };
        serde_json::to_string(&status).unwrap_or_default()
    }

    /// The JSON merge patch that writes the annotation on the pod.
    pub fn merge_patch(&self, at: Timestamp) -> serde_json::Value {
        serde_json::json!({ "metadata": { "annotations": { GATEWAY_STATUS_ANNOTATION: self.annotation(at) } } })
    }
}

/// When to write the status annotation: at start, on a change once `interval` passed since the last write, at
/// least every [`HEARTBEAT`]; after a failed write, not before its backoff ran out.
#[derive(Debug, Clone)]
pub struct Schedule {
    interval: Duration,
    last: Option<(Figures, Instant)>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Schedule {
    /// A schedule that writes at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None, failures: 0, retry_at: None }
    }

    /// Whether `figures` are to be written at `now`.
    pub fn due(&self, figures: &Figures, now: Instant) -> bool {
        if self.retry_at.is_some_and(|retry_at| now < retry_at) {
            return false;
        }
        match &self.last {
            None => true,
            Some((written, at)) => {
                let since = now.saturating_duration_since(*at);
                since >= HEARTBEAT || (written != figures && since >= self.interval)
            }
        }
    }

    /// `figures` were written at `now`.
    pub fn written(&mut self, figures: Figures, now: Instant) {
        self.last = Some((figures, now));
        self.failures = 0;
        self.retry_at = None;
    }

    /// A write failed at `now`: returns the delay before the next try.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let delay = backoff(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + delay);
        delay
    }
}

/// The retry delay after `failures` failures in a row: [`FIRST_BACKOFF`] doubling up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1u32 << failures.min(16)).min(MAX_BACKOFF)
}

/// The drain a pod's annotations ask for: the `parley.dev/drain` value when it is non-empty.
pub fn drain_request(pod: &Pod) -> Option<&str> {
    let value = pod.metadata.annotations.as_ref()?.get(DRAIN_ANNOTATION)?;
    Some(value.as_str()).filter(|value| !value.trim().is_empty())
}

/// What the agent decides on seeing its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a held drain.
    Drain,
    /// Nothing to do: no request, or the instance drains already (a drain is never undone).
    Nothing,
}

/// Whether seeing `pod` starts a drain, given whether the instance drains already.
pub fn decide(pod: &Pod, draining: bool) -> Decision {
    if draining || drain_request(pod).is_none() {
        Decision::Nothing
    } else {
        Decision::Drain
    }
}

/// The agent's counters (`parley_gateway_pod_agent_errors{operation}`).
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    errors: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl AgentMetrics {
    /// Registers the counters (in the gateway's sub-registry: `parley_gateway_pod_agent_errors`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pod_agent_errors",
            "Pod agent failures (Kubernetes client, pod watch, status patch), by operation",
            self.errors.clone(),
        );
    }

    fn error(&self, operation: &'static str) {
        self.errors.get_or_create(&vec![("operation", operation)]).inc();
    }

    /// Failures counted for `operation` (`client`, `watch`, `patch`).
    pub fn errors(&self, operation: &'static str) -> u64 {
        self.errors.get(&vec![("operation", operation)]).map_or(0, |counter| counter.get())
    }
}

/// Where the figures come from: what the gateway tracks already.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The connections' index.
    pub hub: Arc<Hub>,
    /// The resume counters.
    pub metrics: Arc<Metrics>,
    /// The drain state.
    pub drainer: Arc<Drainer>,
    /// `--max-connections`.
    pub max_connections: u64,
}

impl Sources {
    /// The figures now.
    pub fn read(&self) -> Figures {
        let resumes = |outcome: &'static str| {
            self.metrics.resumes.get(&vec![("outcome", outcome)]).map_or(0, |counter| counter.get())
        };
        Figures {
            connections: self.hub.connection_count() as u64,
            max_connections: self.max_connections,
            draining: self.drainer.draining(),
            resumed: resumes("replayed"),
            resume_failed: resumes("failed"),
        }
    }
}

/// Why an agent call failed (logged and counted, then retried).
#[derive(Debug, thiserror::Error)]
enum AgentError {
    /// No Kubernetes configuration could be found.
    #[error("no Kubernetes configuration (neither KUBECONFIG nor the in-cluster one): {0}")]
    Config(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The API server refused or failed the call.
    #[error("{}", describe(.0))]
    Api(#[source] kube::Error),
    /// The call did not complete in time.
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

impl AgentError {
    /// A short reason for the logs: `forbidden`, `not_found`, `unreachable`, ...
    fn reason(&self) -> String {
        match self {
            AgentError::Config(_) => "no_config".into(),
            AgentError::Client(_) => "client".into(),
            AgentError::Timeout(_) => "timeout".into(),
            AgentError::Api(error) => reason_of(error),
        }
    }
}

/// A failed API call in one line: the API server's answer (code, reason, message), else the client's error.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("the API server answered {} {}: {}", status.code, status.reason, status.message)
        }
        other => format!("cannot reach the API server: {other}"),
    }
}

/// The reason of a failed API call: from the status code the API server answered, else `unreachable`.
fn reason_of(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status_reason(status.code),
        _ => "unreachable".into(),
    }
}

fn status_reason(code: u16) -> String {
    match code {
        401 => "unauthorized".into(),
        403 => "forbidden".into(),
        404 => "not_found".into(),
        410 => "expired".into(),
        code => format!("http_{code}"),
    }
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct PodAgent {
    /// Its pod.
    pub pod: PodRef,
    /// The shortest time between two status writes.
    pub interval: Duration,
    /// The drain an annotation starts.
    pub plan: DrainPlan,
    /// Where the figures come from (and the drainer).
    pub sources: Sources,
    /// Its counters.
    pub metrics: AgentMetrics,
}

impl PodAgent {
    /// Runs the agent until `stop` turns `true`: builds the client (retrying), then watches the pod and writes its
    /// status side by side.
    pub fn start(self, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let span = info_span!("pod_agent", namespace = %self.pod.namespace, pod = %self.pod.name);
        tokio::spawn(
            async move {
                let mut until = stop.clone();
                tokio::select! {
                    () = self.run() => {}
                    _ = until.wait_for(|stop| *stop) => {}
                }
            }
            .instrument(span),
        )
    }

    async fn run(self) {
        let client = self.client().await;
        info!(interval_ms = self.interval.as_millis() as u64, "pod agent: watching the pod and writing its status");
        let pods: Api<Pod> = Api::namespaced(client, &self.pod.namespace);
        tokio::join!(self.watch(pods.clone()), self.publish(pods));
    }

    /// The client, once a configuration is found (retried with a backoff until then).
    async fn client(&self) -> Client {
        let mut failures = 0;
        loop {
            let built = async {
                let config = tokio::time::timeout(CALL_TIMEOUT, kube::Config::infer())
                    .await
                    .map_err(|_| AgentError::Timeout(CALL_TIMEOUT))?
                    .map_err(AgentError::Config)?;
                Client::try_from(config).map_err(AgentError::Client)
            };
            match built.await {
                Ok(client) => return client,
                Err(error) => {
                    self.metrics.error("client");
                    let delay = backoff(failures);
                    failures += 1;
                    warn!(%error, reason = %error.reason(), retry_in_ms = delay.as_millis() as u64, "pod agent: no Kubernetes client; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Watches the pod (and nothing else); a drain request starts a held drain.
    async fn watch(&self, pods: Api<Pod>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.pod.name));
        let mut events = watcher(pods, config).default_backoff().boxed();
        let drainer = &self.sources.drainer;
        while let Some(event) = events.next().instrument(info_span!("pod_agent_watch")).await {
            match event {
                Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                    if decide(&pod, drainer.draining()) == Decision::Drain {
                        let requested = drain_request(&pod).unwrap_or_default();
                        info!(%requested, annotation = DRAIN_ANNOTATION, "pod agent: drain requested on the pod; draining, then holding until the pod is deleted");
                        drainer.begin(self.plan, DrainEnd::Hold);
                    }
                }
                Ok(Event::Init | Event::InitDone | Event::Delete(_)) => {}
                Err(error) => {
                    self.metrics.error("watch");
                    let (reason, detail) = match &error {
                        watcher::Error::InitialListFailed(error)
                        | watcher::Error::WatchStartFailed(error)
                        | watcher::Error::WatchFailed(error) => (reason_of(error), describe(error)),
                        watcher::Error::WatchError(status) => (
                            status_reason(status.code),
                            format!("the API server answered {} {}: {}", status.code, status.reason, status.message),
                        ),
                        watcher::Error::NoResourceVersion => ("no_resource_version".into(), error.to_string()),
                    };
                    warn!(error = %detail, %reason, "pod agent: cannot watch the pod; retrying with a backoff");
                }
            }
        }
    }

    /// Writes the status annotation per the [`Schedule`].
    async fn publish(&self, pods: Api<Pod>) {
        let mut schedule = Schedule::new(self.interval);
        let mut every = tokio::time::interval(CHECK_EVERY.min(self.interval));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let figures = self.sources.read();
            let now = Instant::now();
            if !schedule.due(&figures, now) {
                continue;
            }
            match self.patch(&pods, &figures).await {
                Ok(()) => schedule.written(figures, now),
                Err(error) => {
                    self.metrics.error("patch");
                    let delay = schedule.failed(now);
                    warn!(%error, reason = %error.reason(), retry_in_ms = delay.as_millis() as u64, annotation = GATEWAY_STATUS_ANNOTATION, "pod agent: cannot write the status on the pod; retrying");
                }
            }
        }
    }

    async fn patch(&self, pods: &Api<Pod>, figures: &Figures) -> Result<(), AgentError> {
        let patch = figures.merge_patch(Timestamp::now());
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        tokio::time::timeout(CALL_TIMEOUT, pods.patch(&self.pod.name, &params, &patch))
            .instrument(info_span!("pod_agent_patch", connections = figures.connections, draining = figures.draining))
            .await
            .map_err(|_| AgentError::Timeout(CALL_TIMEOUT))?
            .map_err(AgentError::Api)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> Timestamp {
        "2025-03-01T12:30:45.678Z".parse().expect("timestamp")
    }

    #[test]
    fn the_status_is_the_contracts_compact_json() {
        let figures =
            Figures { connections: 120, max_connections: 100_000, draining: true, resumed: 7, resume_failed: 1 };
        let text = figures.annotation(at());
        assert_eq!(
            text,
            r#"{"connections":120,"maxConnections":100000,"draining":true,"resumed":7,"resumeFailed":1,"at":"2025-03-01T12:30:45Z"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("json");
        let rfc3339: Timestamp = parsed["at"].as_str().expect("at").parse().expect("RFC 3339");
        assert_eq!(rfc3339.as_second(), at().as_second());
        assert_eq!(
            figures.merge_patch(at()),
            json!({"metadata": {"annotations": {"parley.dev/gateway-status": text}}})
        );
    }

    #[test]
    fn writes_at_start_on_change_at_most_per_interval_and_at_least_every_30_s() {
        let start = Instant::now();
        let ms = |millis: u64| start + Duration::from_millis(millis);
        let quiet = Figures { max_connections: 10, ..Figures::default() };
        let busy = Figures { connections: 3, ..quiet };
        let mut schedule = Schedule::new(Duration::from_secs(2));
        assert!(schedule.due(&quiet, start), "at start");
        schedule.written(quiet, start);
        assert!(!schedule.due(&quiet, ms(1_000)), "nothing changed");
        assert!(!schedule.due(&busy, ms(1_999)), "changed, but within the interval");
        assert!(schedule.due(&busy, ms(2_000)), "changed, interval over");
        schedule.written(busy, ms(2_000));
        assert!(!schedule.due(&busy, ms(31_999)), "unchanged within 30 s");
        assert!(schedule.due(&busy, ms(32_000)), "at least every 30 s");
    }

    #[test]
    fn a_failed_write_is_retried_after_a_growing_backoff() {
        let start = Instant::now();
        let figures = Figures { connections: 1, ..Figures::default() };
        let mut schedule = Schedule::new(Duration::from_millis(100));
        assert_eq!(schedule.failed(start), FIRST_BACKOFF);
        assert!(!schedule.due(&figures, start + Duration::from_millis(499)));
        assert!(schedule.due(&figures, start + FIRST_BACKOFF));
        assert_eq!(schedule.failed(start), Duration::from_secs(1));
        assert_eq!(schedule.failed(start), Duration::from_secs(2));
        for _ in 0..40 {
            schedule.failed(start);
        }
        assert_eq!(schedule.failed(start), MAX_BACKOFF);
        schedule.written(figures, start + MAX_BACKOFF);
        assert!(!schedule.due(&figures, start + MAX_BACKOFF), "a success clears the backoff and the change");
        assert_eq!(backoff(0), FIRST_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "eu-gateway-0", "annotations": annotations}})).expect("pod")
    }

    #[test]
    fn a_non_empty_drain_annotation_starts_a_drain_once() {
        let requested = pod(json!({"parley.dev/drain": "2025-03-01T12:30:45Z"}));
        assert_eq!(drain_request(&requested), Some("2025-03-01T12:30:45Z"));
        assert_eq!(decide(&requested, false), Decision::Drain);
        assert_eq!(decide(&requested, true), Decision::Nothing, "already draining");
        assert_eq!(decide(&pod(json!({"parley.dev/drain": "yes"})), false), Decision::Drain, "any value");
        for quiet in
            [json!({}), json!({"parley.dev/drain": ""}), json!({"parley.dev/drain": " "}), json!({"other": "x"})]
        {
            assert_eq!(decide(&pod(quiet.clone()), false), Decision::Nothing, "{quiet}");
        }
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}})).expect("pod");
        assert_eq!(decide(&bare, false), Decision::Nothing);
    }

    #[tokio::test]
    async fn the_figures_come_from_the_hub_the_drainer_and_the_resume_counters() {
        let (state, _shutdown) = crate::admission::tests::state(8);
        let sources = Sources {
            hub: state.hub.clone(),
            metrics: state.metrics.clone(),
            drainer: state.drainer.clone(),
            max_connections: 8,
        };
        assert_eq!(sources.read(), Figures { max_connections: 8, ..Figures::default() });
        state.metrics.resumes.get_or_create(&vec![("outcome", "replayed")]).inc_by(3);
        state.metrics.resumes.get_or_create(&vec![("outcome", "failed")]).inc();
        state.drainer.start_and_hold(DrainPlan { window: Duration::ZERO, deadline: Duration::from_secs(1) });
        assert_eq!(
            sources.read(),
            Figures { connections: 0, max_connections: 8, draining: true, resumed: 3, resume_failed: 1 }
        );
        let metrics = AgentMetrics::default();
        metrics.error("patch");
        assert_eq!((metrics.errors("patch"), metrics.errors("watch")), (1, 0));
    }
}
