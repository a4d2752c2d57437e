//! One pod of the runner, from its first status to the deletion of its object.
//!
//! A pod worker writes the pod's volumes, starts one supervisor per container, and patches the pod's status whenever
//! a container changes (phase, `podIP`/`hostIP`, `containerStatuses` with `restartCount`, `ready`, `started`,
//! `state` and `lastState`, and the conditions `PodReadyToStartContainers`, `Initialized`, `ContainersReady`, `Ready`
//! and `PodScheduled`). A supervisor resolves the container's environment, starts its process, runs its probes
//! (startup first; then readiness, which sets `ready`, and liveness, which restarts the process), and restarts it
//! per `restartPolicy` with the kubelet's exponential back-off (shown as `CrashLoopBackOff`).
//!
//! When the pod is deleted (`deletionTimestamp` set), each container's `preStop` handler runs (`sleep`, or `httpGet`),
//! then SIGTERM, then SIGKILL to its process group when `deletionGracePeriodSeconds` (from the deletion) has run
//! out; once every process is gone the worker deletes the Pod object with grace 0 (preconditioned on its UID), as a
//! kubelet finalizes a pod. A pod whose object disappears (a forced delete) is stopped the same way.

use super::env::{self, Addresses, Sources};
use super::images::{self, ImageMap};
use super::probe::{self, Timing, Verdicts};
use super::process::{self, ExecSpec};
use super::volumes::{self, Mount};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, LifecycleHandler, Pod, PodCondition, PodIP, PodStatus, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

/// What every pod worker shares.
#[derive(Clone)]
pub(crate) struct Context {
    /// The API client.
    pub client: Client,
    /// Where the binaries are.
    pub binaries: PathBuf,
    /// Image → binary.
    pub images: ImageMap,
    /// The node's address.
    pub host_address: Ipv4Addr,
    /// The `kubernetes` Service's variables every container gets (see [`env::kubernetes_service_env`]).
    pub service_env: BTreeMap<String, String>,
    /// This executable (for `pod-exec`).
    pub runner: PathBuf,
    /// `unshare`.
    pub unshare: PathBuf,
    /// `mount`.
    pub mount: PathBuf,
    /// First restart delay.
    pub backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// Publishes Events on pods.
    pub recorder: Recorder,
    /// Tells the runner about readiness and the end of pods.
    pub reports: mpsc::UnboundedSender<Report>,
    /// Set when the runner shuts down: every process stops, no Pod object is deleted.
    pub shutdown: watch::Receiver<bool>,
}

/// What a worker tells the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Report {
    /// Readiness or termination changed.
    State {
        /// Pod UID.
        uid: String,
        /// Every container ready.
        ready: bool,
        /// Being deleted.
        terminating: bool,
    },
    /// Every process of the pod is gone (its object is deleted next, unless the runner is shutting down).
    Gone {
        /// Pod UID.
        uid: String,
    },
}

/// Where a pod's files are.
#[derive(Debug, Clone)]
pub(crate) struct PodDir {
    /// `<state>/pods/<uid>`: volumes, exec specs, hosts file.
    pub root: PathBuf,
    /// The hosts file bind-mounted over `/etc/hosts`.
    pub hosts: PathBuf,
    /// `<state>/logs/<namespace>/<pod>`: one log per container, kept after the pod.
    pub logs: PathBuf,
}

impl PodDir {
    /// The directories of a pod (created).
    pub fn create(state: &Path, pod: &Pod) -> std::io::Result<PodDir> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let root = state.join("pods").join(&uid);
        let logs = state.join("logs").join(pod.namespace().unwrap_or_default()).join(pod.name_any());
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&logs)?;
        Ok(PodDir { hosts: root.join("hosts"), root, logs })
    }

    fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }
}

/// The hostname of a pod (`spec.hostname`, else its name, at most 63 characters).
pub fn hostname(pod: &Pod) -> String {
    let name = pod.spec.as_ref().and_then(|spec| spec.hostname.clone()).unwrap_or_else(|| pod.name_any());
    name.chars().take(63).collect()
}

/// A container of the pod, as the status shows it.
#[derive(Debug, Clone)]
struct ContainerRuntime {
    name: String,
    image: String,
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    started: bool,
    ever_started: bool,
    restart_count: i32,
    container_id: Option<String>,
    /// No more restarts.
    finished: bool,
    exit_code: i32,
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.to_owned()), message }),
        ..ContainerState::default()
    }
}

#[derive(Debug)]
struct PodRuntime {
    containers: Vec<ContainerRuntime>,
    terminating: bool,
    start_time: Time,
}

#[derive(Debug, Clone, Copy)]
struct StopOrder {
    deadline: Instant,
    pre_stop: bool,
}

/// Shared state of one pod's tasks.
struct Shared {
    context: Context,
    pod: Pod,
    uid: String,
    address: Ipv4Addr,
    dir: PodDir,
    runtime: Mutex<PodRuntime>,
    changed: Notify,
}

impl Shared {
    fn update(&self, index: usize, change: impl FnOnce(&mut ContainerRuntime)) {
        if let Ok(mut runtime) = self.runtime.lock() {
            if let Some(container) = runtime.containers.get_mut(index) {
                change(container);
            }
        }
        self.changed.notify_one();
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.to_owned(), note: Some(note), action: reason.to_owned(), secondary: None };
        if let Err(error) = self.context.recorder.publish(&event, &self.pod.object_ref(&())).await {
            warn!(pod = %self.pod.name_any(), %error, "cannot publish an event");
        }
    }

    fn name(&self) -> String {
        format!("{}/{}", self.pod.namespace().unwrap_or_default(), self.pod.name_any())
    }
}

/// Runs a pod until its processes are gone (and its object deleted, unless the runner shuts down).
pub(crate) async fn run(context: Context, mut updates: watch::Receiver<Option<Pod>>, address: Ipv4Addr, dir: PodDir) {
    let Some(pod) = updates.borrow().clone() else { return };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let containers = pod.spec.as_ref().map(|spec| spec.containers.clone()).unwrap_or_default();
    let runtime = PodRuntime {
        containers: containers
            .iter()
            .map(|container| ContainerRuntime {
                name: container.name.clone(),
                image: container.image.clone().unwrap_or_default(),
                state: waiting("ContainerCreating", None),
                last_state: None,
                ready: false,
                started: false,
                ever_started: false,
                restart_count: 0,
                container_id: None,
                finished: false,
                exit_code: 0,
            })
            .collect(),
        terminating: false,
        start_time: Time(Timestamp::now()),
    };
    let shared = Arc::new(Shared {
        context: context.clone(),
        pod: pod.clone(),
        uid: uid.clone(),
        address,
        dir,
        runtime: Mutex::new(runtime),
        changed: Notify::new(),
    });
    info!(pod = %shared.name(), %address, "starting pod");
    let (stop_tx, stop_rx) = watch::channel::<Option<StopOrder>>(None);
    let mut status = StatusWriter::default();
    status.write(&shared).await;

    // Volumes first (a failure keeps every container waiting, and is tried again).
    let mut vanished = false;
    let mut shutdown = context.shutdown.clone();
    let mut volumes_ready = false;
    let mut last_error = String::new();
    while !volumes_ready {
        match prepare_volumes(&shared).await {
            Ok(()) => volumes_ready = true,
            Err(error) => {
                for index in 0..containers.len() {
                    shared.update(index, |c| c.state = waiting("CreateContainerConfigError", Some(error.clone())));
                }
                status.write(&shared).await;
                if error != last_error {
                    warn!(pod = %shared.name(), %error, "cannot write the pod's volumes");
                    shared.event(EventType::Warning, "FailedMount", error.clone()).await;
                    last_error = error;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    changed = updates.changed() => {
                        let gone = changed.is_err() || updates.borrow().as_ref().is_none_or(|pod| pod.metadata.deletion_timestamp.is_some());
                        if gone { vanished = updates.borrow().is_none(); break; }
                    }
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let mut remaining = 0;
    if volumes_ready {
        for index in 0..containers.len() {
            let (shared, stop, done) = (shared.clone(), stop_rx.clone(), done_tx.clone());
            remaining += 1;
            tokio::spawn(async move {
                supervise(shared, index, stop).await;
                let _ = done.send(());
            });
        }
    }

    // Status and deletion, until every supervisor is done after a stop.
    let mut stopping = !volumes_ready;
    let mut reported = (false, false);
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        if stopping && remaining == 0 {
            break;
        }
        let order = tokio::select! {
            _ = shared.changed.notified() => None,
            _ = retry.tick() => None,
            Some(()) = done_rx.recv() => {
                remaining -= 1;
                None
            }
            changed = updates.changed(), if !stopping => {
                let current = if changed.is_ok() { updates.borrow().clone() } else { None };
                match current {
                    None => {
                        vanished = true;
                        Some(StopOrder { deadline: Instant::now() + grace_of(&pod, None), pre_stop: true })
                    }
                    Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                        let grace = grace_of(&pod, pod.metadata.deletion_grace_period_seconds);
                        Some(StopOrder { deadline: Instant::now() + grace, pre_stop: true })
                    }
                    Some(_) => None,
                }
            }
            _ = shutdown.changed(), if !stopping => {
                Some(StopOrder { deadline: Instant::now() + Duration::from_secs(5), pre_stop: false })
            }
        };
        if let Some(order) = order {
            stopping = true;
            if let Ok(mut runtime) = shared.runtime.lock() {
                runtime.terminating = true;
            }
            let _ = stop_tx.send(Some(order));
        }
        status.write(&shared).await;
        let terminating = shared.runtime.lock().map(|runtime| runtime.terminating).unwrap_or(true);
        let now = (status.ready, terminating);
        if now != reported {
            reported = now;
            let _ = context.reports.send(Report::State { uid: uid.clone(), ready: now.0, terminating: now.1 });
        }
    }
    status.write(&shared).await;
    // The processes are gone: the address is free again before the object goes (a StatefulSet creates the pod of
    // the same name as soon as it is deleted, and gets the same address back).
    let _ = context.reports.send(Report::Gone { uid: uid.clone() });
    let shutting_down = *context.shutdown.borrow();
    if !vanished && !shutting_down {
        let pods: Api<Pod> = Api::namespaced(context.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }),
            ..DeleteParams::default()
        };
        match pods.delete(&pod.name_any(), &params).await {
            Ok(_) => info!(pod = %shared.name(), "pod finished and deleted"),
            Err(kube::Error::Api(response)) if response.code == 404 || response.code == 409 => {}
            Err(error) => warn!(pod = %shared.name(), %error, "cannot delete the finished pod"),
        }
    }
    let _ = std::fs::remove_dir_all(&shared.dir.root);
}

/// The grace period of a stop: the deletion's, else `terminationGracePeriodSeconds`, else 30 s.
fn grace_of(pod: &Pod, deletion: Option<i64>) -> Duration {
    let seconds =
        deletion.or_else(|| pod.spec.as_ref().and_then(|spec| spec.termination_grace_period_seconds)).unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

async fn fetch<K>(client: &Client, namespace: &str, names: &[String]) -> Result<BTreeMap<String, Option<K>>, String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let mut out = BTreeMap::new();
    for name in names {
        let object =
            api.get_opt(name).await.map_err(|error| format!("cannot read {} {name}: {error}", K::kind(&())))?;
        out.insert(name.clone(), object);
    }
    Ok(out)
}

async fn sources(
    client: &Client,
    namespace: &str,
    config_maps: &[String],
    secrets: &[String],
) -> Result<Sources, String> {
    Ok(Sources {
        config_maps: fetch::<ConfigMap>(client, namespace, config_maps).await?,
        secrets: fetch::<Secret>(client, namespace, secrets).await?,
        tokens: BTreeMap::new(),
    })
}

/// A token of the pod's ServiceAccount, bound to the pod (as a kubelet asks for it).
async fn token(client: &Client, pod: &Pod, wanted: &volumes::TokenWanted) -> Result<String, String> {
    let account =
        pod.spec.as_ref().and_then(|spec| spec.service_account_name.clone()).unwrap_or_else(|| "default".to_owned());
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: wanted.audience.iter().cloned().collect(),
            expiration_seconds: wanted.expiration_seconds,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let answer = accounts
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|error| format!("cannot get a token of ServiceAccount {account}: {error}"))?;
    Ok(answer.status.map(|status| status.token).unwrap_or_default())
}

async fn prepare_volumes(shared: &Shared) -> Result<(), String> {
    let pod = &shared.pod;
    let client = &shared.context.client;
    let (config_maps, secrets) = volumes::references(pod);
    let mut sources = sources(client, &pod.namespace().unwrap_or_default(), &config_maps, &secrets).await?;
    for wanted in volumes::token_requests(pod) {
        sources.tokens.insert(wanted.key.clone(), token(client, pod, &wanted).await?);
    }
    let addresses = Addresses { pod: shared.address, host: shared.context.host_address };
    volumes::materialize_all(pod, &shared.dir.volumes(), &sources, addresses)
}

/// Why a container could not start: a waiting reason and a message.
struct Failure {
    reason: &'static str,
    message: String,
}

/// Everything a start needs.
struct Prepared {
    spec_path: PathBuf,
    env: BTreeMap<String, String>,
    log: PathBuf,
    binary: String,
}

async fn prepare(shared: &Shared, container: &Container) -> Result<Prepared, Failure> {
    let context = &shared.context;
    let pod = &shared.pod;
    let image = container.image.clone().unwrap_or_default();
    let entry = context.images.lookup(&image).ok_or_else(|| Failure {
        reason: "ErrImagePull",
        message: format!(
            "image {image:?} (repository {}) is not in the pod runner's image map: {}",
            images::repository(&image),
            context
                .images
                .entries()
                .iter()
                .map(|e| format!("{} → {}", e.repository, e.binary))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let binary = entry.program(&context.binaries);
    if !binary.is_file() {
        return Err(Failure {
            reason: "ErrImagePull",
            message: format!("image {image:?} maps to {}, which does not exist (build it)", binary.display()),
        });
    }
    let (config_maps, secrets) = env::references(container);
    let sources = sources(&context.client, &pod.namespace().unwrap_or_default(), &config_maps, &secrets)
        .await
        .map_err(|message| Failure { reason: "CreateContainerConfigError", message })?;
    let addresses = Addresses { pod: shared.address, host: context.host_address };
    let kubelet = env::kubelet_env(pod, container, &sources, addresses, &context.service_env)
        .map_err(|message| Failure { reason: "CreateContainerConfigError", message })?;
    let invocation = images::invocation(
        entry,
        &context.binaries,
        container.command.as_deref().unwrap_or_default(),
        container.args.as_deref(),
    )
    .map_err(|message| Failure { reason: "RunContainerError", message })?;
    let hostname = hostname(pod);
    let mut mounts =
        vec![Mount { source: shared.dir.hosts.clone(), target: PathBuf::from("/etc/hosts"), read_only: true }];
    mounts.extend(
        volumes::mounts(container, &shared.dir.volumes())
            .map_err(|message| Failure { reason: "CreateContainerError", message })?,
    );
    mounts.sort_by_key(|mount| mount.target.components().count());
    let read_only_root =
        container.security_context.as_ref().and_then(|context| context.read_only_root_filesystem).unwrap_or(false);
    let spec = ExecSpec {
        hostname: hostname.clone(),
        mounts,
        read_only_root,
        working_dir: PathBuf::from(
            container.working_dir.clone().filter(|dir| !dir.is_empty()).unwrap_or_else(|| "/".to_owned()),
        ),
        mount_program: context.mount.clone(),
        program: invocation.program,
        arg0: invocation.arg0,
        args: env::process_args(&invocation.args, &kubelet, shared.address),
    };
    let spec_path = shared.dir.root.join(format!("{}.exec.json", container.name));
    let text = serde_json::to_string_pretty(&spec).map_err(|error| Failure {
        reason: "CreateContainerError",
        message: format!("cannot encode the exec spec: {error}"),
    })?;
    std::fs::write(&spec_path, text).map_err(|error| Failure {
        reason: "CreateContainerError",
        message: format!("cannot write {}: {error}", spec_path.display()),
    })?;
    Ok(Prepared {
        spec_path,
        env: env::process_env(&entry.env, &kubelet, &hostname, shared.address),
        log: shared.dir.logs.join(format!("{}.log", container.name)),
        binary: entry.binary.clone(),
    })
}

/// Waits `delay`; `true` when a stop came first.
async fn wait_or_stop(stop: &mut watch::Receiver<Option<StopOrder>>, delay: Duration) -> bool {
    if stop.borrow().is_some() {
        return true;
    }
    let stopped = tokio::time::timeout(delay, stop.wait_for(Option::is_some)).await.is_ok();
    stopped || stop.borrow().is_some()
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "[parley-pod-runner {}] {line}", Timestamp::now());
    }
}

/// Runs one container, restarting it per `restartPolicy`, until a stop.
async fn supervise(shared: Arc<Shared>, index: usize, mut stop: watch::Receiver<Option<StopOrder>>) {
    let Some(container) = shared.pod.spec.as_ref().and_then(|spec| spec.containers.get(index)).cloned() else { return };
    let policy =
        shared.pod.spec.as_ref().and_then(|spec| spec.restart_policy.clone()).unwrap_or_else(|| "Always".to_owned());
    let context = shared.context.clone();
    let mut crashes: u32 = 0;
    let mut last_failure = String::new();
    loop {
        if stop.borrow().is_some() {
            break;
        }
        let prepared = match prepare(&shared, &container).await {
            Ok(prepared) => prepared,
            Err(failure) => {
                shared.update(index, |c| c.state = waiting(failure.reason, Some(failure.message.clone())));
                if failure.message != last_failure {
                    warn!(pod = %shared.name(), container = %container.name, reason = failure.reason, message = %failure.message, "cannot start the container");
                    shared
                        .event(EventType::Warning, "Failed", format!("{}: {}", failure.reason, failure.message))
                        .await;
                    last_failure = failure.message;
                }
                if wait_or_stop(&mut stop, Duration::from_secs(5)).await {
                    break;
                }
                continue;
            }
        };
        last_failure.clear();
        append_log(
            &prepared.log,
            &format!("starting {} for pod {} (uid {})", prepared.binary, shared.name(), shared.uid),
        );
        let spawned =
            process::spawn(&context.unshare, &context.runner, &prepared.spec_path, &prepared.env, &prepared.log);
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let message = format!("cannot start {}: {error}", context.unshare.display());
                shared.update(index, |c| c.state = waiting("RunContainerError", Some(message.clone())));
                shared.event(EventType::Warning, "Failed", message).await;
                if wait_or_stop(&mut stop, Duration::from_secs(5)).await {
                    break;
                }
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        let started_at = Time(Timestamp::now());
        let container_id = format!("parley-pod-runner://{pid}");
        let has_readiness = container.readiness_probe.is_some();
        let has_startup = container.startup_probe.is_some();
        shared.update(index, |c| {
            c.state = ContainerState {
                running: Some(ContainerStateRunning { started_at: Some(started_at.clone()) }),
                ..ContainerState::default()
            };
            c.container_id = Some(container_id.clone());
            c.ever_started = true;
            c.started = !has_startup;
            c.ready = !has_readiness && !has_startup;
        });
        info!(pod = %shared.name(), container = %container.name, pid, binary = %prepared.binary, "container started");
        shared.event(EventType::Normal, "Started", format!("Started container {} (pid {pid})", container.name)).await;
        let (liveness_tx, mut liveness_rx) = mpsc::channel::<String>(1);
        let probes = tokio::spawn(probe_loop(shared.clone(), index, container.clone(), liveness_tx));
        let ran_from = Instant::now();
        let outcome = tokio::select! {
            status = child.wait() => status.ok(),
            Some(reason) = liveness_rx.recv() => {
                probes.abort();
                shared.update(index, |c| c.ready = false);
                warn!(pod = %shared.name(), container = %container.name, %reason, "restarting the container");
                shared.event(EventType::Normal, "Killing", format!("Container {} {reason}, will be restarted", container.name)).await;
                let grace = grace_of(&shared.pod, None);
                Some(terminate(&shared, &mut child, pid, &container, Instant::now() + grace, true).await)
            }
            order = async { stop.wait_for(Option::is_some).await.ok().and_then(|order| *order) } => {
                probes.abort();
                shared.update(index, |c| c.ready = false);
                shared.event(EventType::Normal, "Killing", format!("Stopping container {}", container.name)).await;
                let order = order.unwrap_or(StopOrder { deadline: Instant::now(), pre_stop: false });
                Some(terminate(&shared, &mut child, pid, &container, order.deadline, order.pre_stop).await)
            }
        };
        probes.abort();
        // Whatever the process left in its group goes with it.
        process::signal(pid, "KILL", true);
        let exit_code =
            outcome.map_or(137, |status| status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(9)));
        let finished_at = Time(Timestamp::now());
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.to_owned()),
                started_at: Some(started_at),
                finished_at: Some(finished_at),
                container_id: Some(container_id),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        };
        append_log(&prepared.log, &format!("exited with code {exit_code}"));
        let stopping = stop.borrow().is_some();
        let restart = !stopping
            && match policy.as_str() {
                "Never" => false,
                "OnFailure" => exit_code != 0,
                _ => true,
            };
        info!(pod = %shared.name(), container = %container.name, exit_code, restart, "container exited");
        shared.update(index, |c| {
            c.ready = false;
            c.started = false;
            c.exit_code = exit_code;
            if restart {
                c.last_state = Some(terminated.clone());
            }
            c.state = terminated;
            c.finished = !restart;
        });
        if !restart {
            break;
        }
        if ran_from.elapsed() >= 2 * context.max_backoff {
            crashes = 0;
        }
        let delay = context.backoff.saturating_mul(1 << crashes.min(16)).min(context.max_backoff);
        crashes = crashes.saturating_add(1);
        let message =
            format!("back-off {delay:?} restarting failed container={} pod={}", container.name, shared.name());
        shared.update(index, |c| c.state = waiting("CrashLoopBackOff", Some(message.clone())));
        shared.event(EventType::Warning, "BackOff", message).await;
        if wait_or_stop(&mut stop, delay).await {
            break;
        }
        shared.update(index, |c| c.restart_count += 1);
    }
    shared.update(index, |c| c.finished = true);
}

/// preStop, SIGTERM, then SIGKILL to the group at `deadline` (at least 2 s after SIGTERM, as a kubelet grants).
async fn terminate(
    shared: &Shared,
    child: &mut tokio::process::Child,
    pid: u32,
    container: &Container,
    deadline: Instant,
    pre_stop: bool,
) -> std::process::ExitStatus {
    if pre_stop {
        if let Some(handler) = container.lifecycle.as_ref().and_then(|lifecycle| lifecycle.pre_stop.as_ref()) {
            let hook = run_pre_stop(handler, container, shared.address);
            tokio::select! {
                status = child.wait() => if let Ok(status) = status { return status },
                _ = tokio::time::timeout_at(deadline, hook) => {}
            }
        }
    }
    process::signal(pid, "TERM", false);
    let until = deadline.max(Instant::now() + Duration::from_secs(2));
    match tokio::time::timeout_at(until, child.wait()).await {
        Ok(Ok(status)) => status,
        _ => {
            warn!(pod = %shared.name(), container = %container.name, pid, "grace period over: SIGKILL");
            process::signal(pid, "KILL", true);
            child.wait().await.unwrap_or_else(|_| std::process::ExitStatus::from_raw(9))
        }
    }
}

async fn run_pre_stop(handler: &LifecycleHandler, container: &Container, address: Ipv4Addr) {
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(u64::try_from(sleep.seconds).unwrap_or(0))).await;
    } else if let Some(http) = &handler.http_get {
        let probe = Probe { http_get: Some(http.clone()), timeout_seconds: Some(30), ..Probe::default() };
        if let Err(error) = probe::check(&probe, container, address).await {
            warn!(container = %container.name, %error, "preStop httpGet failed");
        }
    } else {
        warn!(container = %container.name, "preStop handler not supported by the pod runner (only sleep and httpGet)");
    }
}

/// Startup, then readiness and liveness probes, until aborted. A liveness (or startup) failure is sent on `liveness`.
async fn probe_loop(shared: Arc<Shared>, index: usize, container: Container, liveness: mpsc::Sender<String>) {
    let address = shared.address;
    if let Some(startup) = &container.startup_probe {
        let timing = Timing::of(startup);
        tokio::time::sleep(timing.initial_delay).await;
        let mut verdicts = Verdicts::default();
        loop {
            let result = probe::check(startup, &container, address).await;
            match verdicts.record(result.is_ok(), &timing) {
                Some(true) => break,
                Some(false) => {
                    let _ = liveness.send(format!("failed startup probe: {}", result.err().unwrap_or_default())).await;
                    return;
                }
                None => {}
            }
            tokio::time::sleep(timing.period).await;
        }
        let has_readiness = container.readiness_probe.is_some();
        shared.update(index, |c| {
            c.started = true;
            c.ready = !has_readiness;
        });
    }
    let readiness = async {
        let Some(readiness) = &container.readiness_probe else { return std::future::pending::<()>().await };
        let timing = Timing::of(readiness);
        tokio::time::sleep(timing.initial_delay).await;
        let mut verdicts = Verdicts::default();
        loop {
            let result = probe::check(readiness, &container, address).await;
            if let Some(ready) = verdicts.record(result.is_ok(), &timing) {
                shared.update(index, |c| c.ready = ready);
                if !ready {
                    let message = format!("Readiness probe failed: {}", result.err().unwrap_or_default());
                    shared.event(EventType::Warning, "Unhealthy", message).await;
                }
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    let liveness_probe = async {
        let Some(probe) = &container.liveness_probe else { return std::future::pending::<()>().await };
        let timing = Timing::of(probe);
        tokio::time::sleep(timing.initial_delay).await;
        let mut verdicts = Verdicts::default();
        loop {
            let result = probe::check(probe, &container, address).await;
            if verdicts.record(result.is_ok(), &timing) == Some(false) {
                let reason = format!("failed liveness probe: {}", result.err().unwrap_or_default());
                shared.event(EventType::Warning, "Unhealthy", format!("Liveness probe {reason}")).await;
                let _ = liveness.send(reason).await;
                return std::future::pending::<()>().await;
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    tokio::join!(readiness, liveness_probe);
}

/// Patches the pod's status when it changed, keeping each condition's transition time.
#[derive(Default)]
struct StatusWriter {
    last: Option<serde_json::Value>,
    transitions: BTreeMap<String, (String, Time)>,
    /// Every container ready, in the last status written.
    ready: bool,
    failed: bool,
}

impl StatusWriter {
    /// Writes the status if it changed (or the last write failed); whether it wrote. `ready` follows the status
    /// built, written or not.
    async fn write(&mut self, shared: &Shared) -> bool {
        let status = {
            let Ok(runtime) = shared.runtime.lock() else { return false };
            self.build(&runtime, shared)
        };
        let value = serde_json::json!({ "status": status });
        if !self.failed && self.last.as_ref() == Some(&value) {
            return false;
        }
        let pods: Api<Pod> =
            Api::namespaced(shared.context.client.clone(), &shared.pod.namespace().unwrap_or_default());
        match pods.patch_status(&shared.pod.name_any(), &PatchParams::default(), &Patch::Merge(&value)).await {
            Ok(_) => {
                self.failed = false;
                self.last = Some(value);
                true
            }
            Err(kube::Error::Api(response)) if response.code == 404 => {
                self.failed = false;
                self.last = Some(value);
                true
            }
            Err(error) => {
                warn!(pod = %shared.name(), %error, "cannot write the pod status");
                self.failed = true;
                false
            }
        }
    }

    fn condition(&mut self, type_: &str, status: bool) -> PodCondition {
        let status = if status { "True" } else { "False" }.to_owned();
        let entry =
            self.transitions.entry(type_.to_owned()).or_insert_with(|| (status.clone(), Time(Timestamp::now())));
        if entry.0 != status {
            *entry = (status.clone(), Time(Timestamp::now()));
        }
        PodCondition {
            type_: type_.to_owned(),
            status,
            last_transition_time: Some(entry.1.clone()),
            ..PodCondition::default()
        }
    }

    fn build(&mut self, runtime: &PodRuntime, shared: &Shared) -> PodStatus {
        let containers = &runtime.containers;
        let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready) && !runtime.terminating;
        self.ready = all_ready;
        let phase = if !containers.is_empty() && containers.iter().all(|c| c.finished && c.ever_started) {
            if containers.iter().all(|c| c.exit_code == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if !containers.is_empty() && containers.iter().all(|c| c.ever_started) {
            "Running"
        } else {
            "Pending"
        };
        let address = shared.address.to_string();
        let host = shared.context.host_address.to_string();
        PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(vec![
                self.condition("PodReadyToStartContainers", true),
                self.condition("Initialized", true),
                self.condition("Ready", all_ready),
                self.condition("ContainersReady", all_ready),
                self.condition("PodScheduled", true),
            ]),
            host_ip: Some(host.clone()),
            host_ips: Some(vec![HostIP { ip: host }]),
            pod_ip: Some(address.clone()),
            pod_ips: Some(vec![PodIP { ip: address }]),
            start_time: Some(runtime.start_time.clone()),
            container_statuses: Some(
                containers
                    .iter()
                    .map(|c| ContainerStatus {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        image_id: format!("parley-pod-runner://{}", images::repository(&c.image)),
                        container_id: c.container_id.clone(),
                        ready: c.ready,
                        started: Some(c.started && c.state.running.is_some()),
                        restart_count: c.restart_count,
                        state: Some(c.state.clone()),
                        last_state: c.last_state.clone(),
                        ..ContainerStatus::default()
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        }
    }
}
