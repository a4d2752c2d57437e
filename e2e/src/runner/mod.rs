//! `parley-pod-runner`: a kubelet stand-in for the test stack. It plays kubelet for its own Node objects on a real API
//! server and runs the pods bound to them as local processes: the workspace binary each container's image names,
//! with the environment, volumes, probes, restarts and status a kubelet would give it, each pod on its own loopback
//! address. `e2e/runner/README.md` says what it does and does not do.
//!
//! - [`images`]: the image → binary map (with each image's `ENTRYPOINT`/`CMD`/`ENV`);
//! - [`env`]: environment resolution (`env`, `envFrom`, `$(VAR)`, `valueFrom`, the `kubernetes` Service's
//!   variables naming the runner's own API server) and the one generic rewrite (`0.0.0.0:PORT` →
//!   `<pod address>:PORT`);
//! - [`volumes`]: Secret, ConfigMap and emptyDir volumes, and their bind mounts;
//! - [`dns`]: pod addresses, and each pod's hosts file built from Services and pods;
//! - [`probe`]: httpGet and tcpSocket probes;
//! - [`process`]: starting a container's process in its own mount and UTS namespaces (`pod-exec`), signals;
//! - [`node`]: the Node objects and their Leases;
//! - `pod`: one pod's lifecycle and status.
//!
//! [`run`] registers the nodes, watches Pods and Services, starts a worker per pod bound to one of its nodes, keeps
//! every pod's hosts file current, and on shutdown stops every process and deletes its nodes.

pub mod dns;
pub mod env;
pub mod images;
pub mod node;
mod pod;
pub mod probe;
pub mod process;
pub mod volumes;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use process::pod_exec;

/// Why the runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool it runs is missing.
    #[error("{tool} is not on PATH: the pod runner needs it to start containers in their own namespaces")]
    MissingTool {
        /// The tool.
        tool: &'static str,
    },
    /// The binaries directory is missing.
    #[error("the binaries directory {path} does not exist (build the workspace, or pass --binaries)")]
    Binaries {
        /// The directory.
        path: PathBuf,
    },
    /// The state directory cannot be made.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its own executable is not found (for `pod-exec`).
    #[error("cannot find the runner's own executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// A node could not be registered.
    #[error("cannot register node {name}: {source}")]
    Register {
        /// The node.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// No node name.
    #[error("the runner needs at least one node name")]
    NoNodes,
}

/// Everything a runner needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the binaries the images map to (`target/debug`).
    pub binaries: PathBuf,
    /// Pod directories (`pods/<uid>`: volumes, hosts file, exec specs) and logs
    /// (`logs/<namespace>/<pod>/<container>.log`, kept after the pod).
    pub state_dir: PathBuf,
    /// The nodes it serves.
    pub nodes: node::NodeSettings,
    /// Image → binary.
    pub images: images::ImageMap,
    /// First two octets of the pod addresses (`127.1`).
    pub address_prefix: [u8; 2],
    /// The cluster domain of the names (`cluster.local`).
    pub cluster_domain: String,
    /// First restart delay of a crashed container (a kubelet's is 10 s).
    pub backoff: Duration,
    /// Longest restart delay (a kubelet's is 300 s).
    pub max_backoff: Duration,
    /// Delete the Node objects when stopping (their Leases go with them).
    pub delete_nodes_on_exit: bool,
    /// The API server the runner uses (its kubeconfig's server): every container gets it as the `kubernetes`
    /// Service (`KUBERNETES_SERVICE_HOST`/`PORT`, see [`env::kubernetes_service_env`]); `None` sets no such variable.
    pub api_server: Option<env::ApiServer>,
}

/// What the runner knows of one of its pods.
struct Worker {
    updates: watch::Sender<Option<Pod>>,
    address: Ipv4Addr,
    hosts: PathBuf,
}

/// The runner's loop state.
struct Runner {
    config: Config,
    context: pod::Context,
    workers: HashMap<String, Worker>,
    /// Pods whose processes ended after a deletion: never started again, whatever event comes late.
    finished: BTreeSet<String>,
    model: dns::Model,
    addresses: dns::Addresses,
    host_lines: String,
    /// UIDs seen since a pod watch restart (`None`: not re-listing).
    listing_pods: Option<BTreeSet<String>>,
    /// Keys seen since a Service watch restart.
    listing_services: Option<BTreeSet<String>>,
    dirty: bool,
}

fn service_entry(service: &Service) -> dns::ServiceEntry {
    let spec = service.spec.clone().unwrap_or_default();
    dns::ServiceEntry {
        namespace: service.namespace().unwrap_or_default(),
        name: service.name_any(),
        headless: spec.cluster_ip.as_deref() == Some("None"),
        selector: spec.selector.filter(|selector| !selector.is_empty()),
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
    }
}

fn pod_entry(pod: &Pod, address: Ipv4Addr) -> dns::PodEntry {
    dns::PodEntry {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        labels: pod.labels().clone(),
        hostname: pod::hostname(pod),
        subdomain: pod.spec.as_ref().and_then(|spec| spec.subdomain.clone()).filter(|subdomain| !subdomain.is_empty()),
        address,
        ready: false,
        terminating: false,
    }
}

impl Runner {
    fn ours(&self, pod: &Pod) -> bool {
        pod.spec
            .as_ref()
            .and_then(|spec| spec.node_name.as_ref())
            .is_some_and(|node| self.config.nodes.names.contains(node))
    }

    fn write_hosts(&mut self) {
        for (uid, worker) in &self.workers {
            let text = self.model.hosts_file(uid, &self.host_lines, &self.config.cluster_domain);
            if let Err(error) = dns::write_in_place(&worker.hosts, &text) {
                warn!(path = %worker.hosts.display(), %error, "cannot write a hosts file");
            }
        }
        self.dirty = false;
    }

    fn on_pod(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(seen) = self.listing_pods.as_mut() {
            seen.insert(uid.clone());
        }
        if !self.ours(&pod) || self.finished.contains(&uid) {
            return;
        }
        if let Some(worker) = self.workers.get(&uid) {
            worker.updates.send_replace(Some(pod));
            return;
        }
        let phase = pod.status.as_ref().and_then(|status| status.phase.clone()).unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            // Deleted before (or while no runner) it ran: nothing to stop, finalize it.
            let pods: Api<Pod> = Api::namespaced(self.context.client.clone(), &pod.namespace().unwrap_or_default());
            let name = pod.name_any();
            tokio::spawn(async move {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                    ..DeleteParams::default()
                };
                let _ = pods.delete(&name, &params).await;
            });
            return;
        }
        if phase == "Succeeded" || phase == "Failed" {
            return;
        }
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let Some(address) = self.addresses.allocate(&key) else {
            warn!(pod = %key, "no pod address left");
            return;
        };
        let dir = match pod::PodDir::create(&self.config.state_dir, &pod) {
            Ok(dir) => dir,
            Err(error) => {
                warn!(pod = %key, %error, "cannot create the pod's directories");
                self.addresses.release(address);
                return;
            }
        };
        self.model.pods.insert(uid.clone(), pod_entry(&pod, address));
        let (updates, receiver) = watch::channel(Some(pod));
        self.workers.insert(uid, Worker { updates, address, hosts: dir.hosts.clone() });
        // The new pod's hosts file exists before its first container starts.
        self.write_hosts();
        tokio::spawn(pod::run(self.context.clone(), receiver, address, dir));
    }

    fn on_pod_event(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.listing_pods = Some(BTreeSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => self.on_pod(pod),
            Event::InitDone => {
                if let Some(seen) = self.listing_pods.take() {
                    for (uid, worker) in &self.workers {
                        if !seen.contains(uid) {
                            worker.updates.send_replace(None);
                        }
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some(worker) = pod.metadata.uid.as_ref().and_then(|uid| self.workers.get(uid)) {
                    worker.updates.send_replace(None);
                }
            }
        }
    }

    fn on_service_event(&mut self, event: Event<Service>) {
        let key = |service: &Service| format!("{}/{}", service.namespace().unwrap_or_default(), service.name_any());
        match event {
            Event::Init => self.listing_services = Some(BTreeSet::new()),
            Event::InitApply(service) | Event::Apply(service) => {
                let key = key(&service);
                if let Some(seen) = self.listing_services.as_mut() {
                    seen.insert(key.clone());
                }
                let entry = service_entry(&service);
                if self.model.services.get(&key) != Some(&entry) {
                    self.model.services.insert(key, entry);
                    self.dirty = true;
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.listing_services.take() {
                    let before = self.model.services.len();
                    self.model.services.retain(|key, _| seen.contains(key));
                    self.dirty |= before != self.model.services.len();
                }
            }
            Event::Delete(service) => {
                self.dirty |= self.model.services.remove(&key(&service)).is_some();
            }
        }
    }

    fn on_report(&mut self, report: pod::Report) {
        match report {
            pod::Report::State { uid, ready, terminating } => {
                if let Some(entry) = self.model.pods.get_mut(&uid) {
                    if (entry.ready, entry.terminating) != (ready, terminating) {
                        entry.ready = ready;
                        entry.terminating = terminating;
                        self.dirty = true;
                    }
                }
            }
            pod::Report::Gone { uid } => {
                if let Some(worker) = self.workers.remove(&uid) {
                    self.addresses.release(worker.address);
                }
                self.finished.insert(uid.clone());
                self.model.pods.remove(&uid);
                self.dirty = true;
            }
        }
    }
}

/// Renews the Leases every [`node::LEASE_EVERY`] and writes the nodes' heartbeat every [`node::STATUS_EVERY`]; a
/// node deleted meanwhile is registered again.
async fn keep_nodes_alive(client: Client, settings: node::NodeSettings) {
    let ready_since = Timestamp::now();
    let mut tick = tokio::time::interval(node::LEASE_EVERY);
    let mut last_status = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let status_due = last_status.elapsed() >= node::STATUS_EVERY;
        for name in &settings.names {
            if status_due {
                if let Err(error) = node::heartbeat(&client, &settings, name, ready_since).await {
                    warn!(node = %name, %error, "cannot write the node's heartbeat; registering it again");
                    if let Err(error) = node::register(&client, &settings, name).await {
                        warn!(node = %name, %error, "cannot register the node");
                    }
                }
            }
            if let Err(error) = node::renew_lease(&client, name).await {
                warn!(node = %name, %error, "cannot renew the node's lease");
            }
        }
        if status_due {
            last_status = tokio::time::Instant::now();
        }
    }
}

/// Runs the runner until `shutdown` completes; then stops every process and (with
/// [`Config::delete_nodes_on_exit`]) deletes the nodes.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    if config.nodes.names.is_empty() {
        return Err(Error::NoNodes);
    }
    let unshare = process::which("unshare").ok_or(Error::MissingTool { tool: "unshare" })?;
    let mount = process::which("mount").ok_or(Error::MissingTool { tool: "mount" })?;
    process::which("kill").ok_or(Error::MissingTool { tool: "kill" })?;
    let runner = std::env::current_exe().map_err(Error::CurrentExe)?;
    if !config.binaries.is_dir() {
        return Err(Error::Binaries { path: config.binaries.clone() });
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| Error::StateDir { path: config.state_dir.clone(), source })?;
    let host_lines = std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| "127.0.0.1 localhost\n".to_owned());

    for name in &config.nodes.names {
        node::register(&client, &config.nodes, name)
            .await
            .map_err(|source| Error::Register { name: name.clone(), source })?;
        if let Err(error) = node::renew_lease(&client, name).await {
            warn!(node = %name, %error, "cannot create the node's lease");
        }
    }
    let heartbeat = tokio::spawn(keep_nodes_alive(client.clone(), config.nodes.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (reports, mut reports_rx) = mpsc::unbounded_channel();
    let reporter =
        Reporter { controller: "parley-pod-runner".to_owned(), instance: config.nodes.names.first().cloned() };
    let context = pod::Context {
        client: client.clone(),
        binaries: config.binaries.clone(),
        images: config.images.clone(),
        host_address: Ipv4Addr::LOCALHOST,
        service_env: config.api_server.as_ref().map(env::kubernetes_service_env).unwrap_or_default(),
        runner,
        unshare,
        mount,
        backoff: config.backoff,
        max_backoff: config.max_backoff,
        recorder: Recorder::new(client.clone(), reporter),
        reports,
        shutdown: shutdown_rx,
    };
    let mut state = Runner {
        addresses: dns::Addresses::new(config.address_prefix),
        config: config.clone(),
        context,
        workers: HashMap::new(),
        finished: BTreeSet::new(),
        model: dns::Model::default(),
        host_lines,
        listing_pods: None,
        listing_services: None,
        dirty: false,
    };
    let mut pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let mut services =
        watcher(Api::<Service>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    info!(nodes = ?config.nodes.names, binaries = %config.binaries.display(), state = %config.state_dir.display(), "serving");
    println!(
        "parley-pod-runner serving nodes {} (binaries {}, state {})",
        config.nodes.names.join(","),
        config.binaries.display(),
        config.state_dir.display()
    );
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(event) = pods.next() => match event {
                Ok(event) => state.on_pod_event(event),
                Err(error) => warn!(%error, "pod watch failed; retrying"),
            },
            Some(event) = services.next() => match event {
                Ok(event) => state.on_service_event(event),
                Err(error) => warn!(%error, "service watch failed; retrying"),
            },
            Some(report) = reports_rx.recv() => state.on_report(report),
        }
        if state.dirty {
            state.write_hosts();
        }
    }

    info!(pods = state.workers.len(), "stopping every pod");
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !state.workers.is_empty() {
        match tokio::time::timeout_at(deadline, reports_rx.recv()).await {
            Ok(Some(report)) => state.on_report(report),
            _ => break,
        }
    }
    heartbeat.abort();
    if config.delete_nodes_on_exit {
        for name in &config.nodes.names {
            if let Err(error) = node::delete(&client, name).await {
                warn!(node = %name, %error, "cannot delete the node");
            }
        }
    }
    Ok(())
}
