//! The Region controller: the I/O around the pure stages. For each Region it runs
//!
//! 1. **dereference**: the Region, its ChatCluster and every Region of the namespace;
//! 2. **validate** and **build** ([`crate::plan`]);
//! 3. **persist** the machine-ID allocation in the ChatCluster's status with a resourceVersion precondition
//!    (a conflict requeues), *before* anything is applied, so that two reconciles never hand out the same IDs;
//! 4. **create the internal token Secret** ([`crate::internal_token`]) unless it exists: a plain create, whose
//!    409 means it exists and is kept (the operator may create Secrets but never read them). When it cannot be
//!    created the Region is `Degraded` with reason `InternalTokenSecretFailed`, nothing is applied (no pod could
//!    start without it), and the reconcile is retried with backoff. A Secret known to exist is not asked for again
//!    for [`TOKEN_RECHECK`], so a deleted one is re-created within it;
//! 5. **apply** every object by server-side apply under [`FIELD_MANAGER`] (forced), skipping objects whose live
//!    state already holds every field the operator sets, then delete **orphans** (objects labelled with the
//!    Region and controlled by it that are no longer built). An orphan ConfigMap is deleted only once both
//!    StatefulSets have rolled out, since pods of the previous revision may still read it through `envFrom` (the
//!    single `<region>-config` of operator versions before the per-component ConfigMaps goes this way on upgrade);
//! 6. **keyspace**: add the Region's datacenter to the Cassandra keyspace's replication ([`crate::keyspace`]), one
//!    Region at a time; the outcome is the Region's `CassandraReplication` (and `CassandraRebuildRequired`)
//!    condition, never a failed reconcile;
//! 7. **update_status** of the Region and then of the ChatCluster, each only when it changed.
//!
//! A Region that fails validation or gets no machine IDs is marked `Degraded` with the error's reason, gets a
//! Warning Event, and nothing is applied. Its finalizer [`FINALIZER`] first waits while the keyspace replicates to
//! the Region's datacenter (until the user releases it with [`crate::keyspace::RELEASE_ANNOTATION`]), then
//! releases its machine-ID block (the block is quarantined for the ChatCluster's `machineIdQuarantineSeconds`).
//!
//! The ChatCluster's peer token Secret is created like the internal token (owned by the ChatCluster). The
//! Cassandra CA and credentials Secrets are the only Secrets the operator reads (`get`, when the chart's
//! `rbac.readableSecrets` names them).
//!
//! The controller watches Regions (each also mapped to the other Regions of its ChatCluster, whose MirrorMaker 2 and
//! router peers it shapes), ChatClusters (mapped to their Regions) and the owned StatefulSets, Deployments,
//! Services, ConfigMaps, PodDisruptionBudgets and NetworkPolicies, so a Region's status follows its pods'
//! readiness. The
//! internal token Secret is owned by the Region too (garbage-collected with it) but not watched.
//!
//! Beside it runs the ChatCluster controller ([`crate::cluster`]): each Region gets an ownerReference to its
//! ChatCluster (added in `apply`, before validation), and a ChatCluster that no Region names still gets its status.
//! A replication target that no Region has yet leaves the Region `Progressing` (`WaitingForReplicationTarget`),
//! not `Degraded`: it runs without the flows to that target until a Region of that name appears.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Error as FinalizerError, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use parley_crds::{ChatCluster, ChatClusterStatus, Region, RegionStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tracing::{debug, info, instrument, warn};

use crate::build::{RegionResources, COMPONENT_LABEL, FIELD_MANAGER, REGION_LABEL};
use crate::error::Error;
use crate::keyspace::{self, CassandraAccess, CassandraAdmin, Decision, Release};
use crate::metrics::Metrics;
use crate::status::Rollout;
use crate::validate::{Dereferenced, ValidatedRegion};
use crate::{internal_token, machine_ids, mm2, status};

/// The finalizer that releases a Region's machine-ID block.
pub const FINALIZER: &str = "parley.dev/machine-ids";
/// How often a reconciled Region is checked again even when nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a transient error; it doubles per consecutive failure.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest retry delay after transient errors.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Retry step after a lost optimistic-concurrency race.
const CONFLICT_RETRY: Duration = Duration::from_millis(100);
/// Longest retry delay after lost races.
const CONFLICT_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a Region's internal token Secret, once created or found to exist, is not asked for again.
pub const TOKEN_RECHECK: Duration = RESYNC;
/// How soon a Region whose datacenter is not (yet) in the keyspace's replication is checked again.
const KEYSPACE_RECHECK: Duration = Duration::from_secs(60);
/// How often a Region that receives other Regions' topics refreshes its incoming flows (delivery latency, MirrorMaker
/// 2's lag) in its status: the routers report every 10 s.
const FLOWS_REFRESH: Duration = Duration::from_secs(30);
/// How often it reads them while a mirrored region has no measured flow yet.
const FLOWS_FIRST_REFRESH: Duration = Duration::from_secs(10);
/// Timeout of the operator's Cassandra connection and of each of its requests.
const CASSANDRA_TIMEOUT: Duration = Duration::from_secs(5);

/// Which namespaces the controller watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace.
    All,
    /// One namespace.
    Namespace(String),
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Scope::All => Api::all(client.clone()),
            Scope::Namespace(namespace) => Api::namespaced(client.clone(), namespace),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive transient failures per Region (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each internal token Secret (`namespace/name/region uid`) was last created or found to exist.
    tokens: Mutex<HashMap<String, Instant>>,
    /// One lock per ChatCluster (`namespace/name`), held across each read-modify-write of its keyspace's
    /// replication, so that two Regions' reconciles never overwrite each other's datacenter.
    keyspaces: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Context {
    /// A context whose Events name `instance` as the reporting instance.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Arc<Context> {
        let reporter = Reporter { controller: FIELD_MANAGER.to_owned(), instance };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            keyspaces: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keyspace lock of a ChatCluster.
    fn keyspace_lock(&self, namespace: &str, cluster: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.keyspaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(format!("{namespace}/{cluster}")).or_default().clone()
    }
}

/// Runs the controller until the stream ends (it ends when `shutdown` resolves): the Region controller and, beside
/// it, the ChatCluster controller ([`crate::cluster::run`]).
pub async fn run(
    client: Client,
    scope: Scope,
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    futures::join!(
        run_regions(client.clone(), scope.clone(), context.clone(), shutdown.clone()),
        crate::cluster::run(client, scope, context, shutdown),
    );
}

/// Runs the Region controller until `shutdown` resolves.
async fn run_regions(
    client: Client,
    scope: Scope,
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let regions: Api<Region> = scope.api(&client);
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let controller = Controller::new(regions, watcher::Config::default());
    let store = controller.store();
    let siblings = controller.store();
    controller
        .watches(scope.api::<ChatCluster>(&client), watcher::Config::default(), move |cluster| {
            let name = cluster.name_any();
            let namespace = cluster.namespace();
            store
                .state()
                .into_iter()
                .filter(|region| region.spec.cluster_ref == name && region.namespace() == namespace)
                .map(|region| ObjectRef::from_obj(&*region))
                .collect::<Vec<_>>()
        })
        // A Region's replication rules, peer URL and Kafka shape the other Regions' MirrorMaker 2 and routers.
        .watches(scope.api::<Region>(&client), watcher::Config::default(), move |changed| {
            let name = changed.name_any();
            let namespace = changed.namespace();
            siblings
                .state()
                .into_iter()
                .filter(|region| {
                    region.spec.cluster_ref == changed.spec.cluster_ref
                        && region.namespace() == namespace
                        && region.name_any() != name
                })
                .map(|region| ObjectRef::from_obj(&*region))
                .collect::<Vec<_>>()
        })
        .owns(scope.api::<StatefulSet>(&client), owned.clone())
        .owns(scope.api::<Deployment>(&client), owned.clone())
        .owns(scope.api::<Service>(&client), owned.clone())
        .owns(scope.api::<ConfigMap>(&client), owned.clone())
        .owns(scope.api::<PodDisruptionBudget>(&client), owned.clone())
        .owns(scope.api::<NetworkPolicy>(&client), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // An owned object of a Region that is already gone (its objects are being garbage-collected).
                Err(error @ kube::runtime::controller::Error::ObjectNotFound(_)) => debug!(%error, "skipped"),
                // error_policy has logged it.
                Err(error @ kube::runtime::controller::Error::ReconcilerFailed(..)) => {
                    debug!(%error, "reconcile failed")
                }
                Err(error) => warn!(%error, "reconcile failed"),
            }
        })
        .await;
}

fn key(region: &Region) -> String {
    format!("{}/{}", region.namespace().unwrap_or_default(), region.name_any())
}

/// Reconciles one Region (with its finalizer).
#[instrument(skip(region, context), fields(namespace = region.namespace().unwrap_or_default(), region = region.name_any()))]
pub async fn reconcile(region: Arc<Region>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = region.namespace().ok_or_else(|| Error::MissingMetadata {
        kind: "Region",
        name: region.name_any(),
        field: "namespace",
    })?;
    let api: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    let region_key = key(&region);
    let result = finalizer(&api, FINALIZER, region, |event| async {
        match event {
            FinalizerEvent::Apply(region) => apply(region, &context).await,
            FinalizerEvent::Cleanup(region) => cleanup(region, &context).await,
        }
    })
    .await
    .or_else(from_finalizer);
    context.metrics.reconciled(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        context.failures().remove(&region_key);
    }
    result
}

/// The finalizer helper's errors. Its patches carry a JSON-patch `test` of the finalizer list as it was read, so a
/// reconcile that started from a cached Region older than the last finalizer change fails the test (HTTP 422): a
/// lost race like a 409, retried at once. A Region already gone when its finalizer is removed needs nothing more.
fn from_finalizer(error: FinalizerError<Error>) -> Result<Action, Error> {
    Err(match error {
        FinalizerError::ApplyFailed(error) | FinalizerError::CleanupFailed(error) => error,
        FinalizerError::AddFinalizer(kube::Error::Api(status)) if status.code == 422 => {
            Error::Conflict { object: "the Region's finalizer list".to_owned() }
        }
        FinalizerError::RemoveFinalizer(kube::Error::Api(status)) if status.code == 404 => {
            return Ok(Action::await_change())
        }
        FinalizerError::AddFinalizer(source) => Error::kube("add the finalizer", source),
        FinalizerError::RemoveFinalizer(source) => Error::kube("remove the finalizer", source),
        other => Error::Finalizer { message: other.to_string() },
    })
}

/// Transient errors requeue with exponential backoff per Region (a lost optimistic-concurrency race retries
/// almost at once).
pub fn error_policy(region: Arc<Region>, error: &Error, context: Arc<Context>) -> Action {
    let mut failures = context.failures();
    let attempts = failures.entry(key(&region)).or_insert(0);
    *attempts = attempts.saturating_add(1);
    let delay = backoff(*attempts, error);
    if matches!(error, Error::Conflict { .. }) {
        debug!(region = %key(&region), %error, attempts = *attempts, ?delay, "lost a write race, retrying");
    } else {
        let cause = std::error::Error::source(error).map(ToString::to_string).unwrap_or_default();
        warn!(region = %key(&region), %error, %cause, attempts = *attempts, ?delay, "reconcile failed, retrying");
    }
    Action::requeue(delay)
}

/// The retry delay after `attempts` consecutive failures: exponential from 0.5 s to 60 s, except for a lost
/// optimistic-concurrency race (another Region's reconcile wrote the ChatCluster first), which is normal and
/// retried after 100 ms more per attempt, at most 2 s.
pub fn backoff(attempts: u32, error: &Error) -> Duration {
    if matches!(error, Error::Conflict { .. }) {
        return CONFLICT_RETRY.saturating_mul(attempts.max(1)).min(CONFLICT_RETRY_MAX);
    }
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_MAX)
}

async fn apply(region: Arc<Region>, context: &Context) -> Result<Action, Error> {
    let client = &context.client;
    let name = region.name_any();
    let namespace = region.namespace().unwrap_or_default();
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let regions: Api<Region> = Api::namespaced(client.clone(), &namespace);

    // dereference
    let cluster = clusters
        .get_opt(&region.spec.cluster_ref)
        .await
        .map_err(|source| Error::kube(format!("get ChatCluster {namespace}/{}", region.spec.cluster_ref), source))?;
    let siblings =
        regions.list(&ListParams::default()).await.map_err(|source| Error::kube("list Regions", source))?.items;
    let allocation = cluster
        .as_ref()
        .and_then(|cluster| cluster.status.as_ref())
        .and_then(|status| status.machine_id_allocation.clone())
        .unwrap_or_default();
    if let Some(cluster) = &cluster {
        // Deleting the ChatCluster then garbage-collects the Region; a failure here holds nothing up.
        if let Err(error) = crate::cluster::ensure_owner(&region, cluster, context).await {
            warn!(%error, "cannot add the owner reference to the chat cluster");
        }
    }
    let input = Dereferenced { region: (*region).clone(), cluster: cluster.clone(), regions: siblings.clone() };

    // validate + build
    let mut plan = match crate::plan(input, &allocation, Timestamp::now()) {
        Ok(plan) => plan,
        Err(error) if error.is_invalid_spec() => {
            return degrade(&region, cluster.as_ref(), &siblings, error, context).await
        }
        Err(error) => return Err(error),
    };

    // persist the allocation before applying anything
    let mut cluster = plan.validated.cluster.clone();
    let stored = cluster.status.as_ref().and_then(|status| status.machine_id_allocation.as_ref());
    if stored != Some(&plan.allocation) {
        let new_status = status::cluster(&cluster, &siblings, Some(plan.allocation.clone()), Timestamp::now());
        cluster = write_cluster_status(&clusters, &cluster, &new_status, context).await?;
        info!(block = %plan.block.display_range(), "machine ids allocated");
        publish(
            context,
            &region,
            EventType::Normal,
            "MachineIdsAllocated",
            format!("machine ids {} of chat cluster {}", plan.block.display_range(), plan.validated.cluster_name),
        )
        .await;
    }

    // the internal and peer tokens, which the pods read: nothing is applied without them
    let tokens = match ensure_internal_token(&plan.validated, context).await {
        Ok(()) => ensure_peer_token(&plan.validated, context).await,
        Err(error) => Err(error),
    };
    if let Err(error) = tokens {
        record_degraded(&region, Some(&cluster), &siblings, &error, context).await?;
        return Err(error);
    }

    // the gateway count and the rollout's next step, from the gateways as they run
    let step = crate::gateways::prepare(&plan.validated, &region, &mut plan.resources, context).await?;

    // apply + orphans
    let applied = apply_resources(client, &name, &namespace, &region, &plan.resources, context).await?;
    if !applied.changed.is_empty() {
        publish(context, &region, EventType::Normal, "Applied", format!("applied {}", applied.changed.join(", ")))
            .await;
    }
    crate::gateways::carry_out(&plan.validated, &region, &step, context).await?;

    // the keyspace's replication to the Region's datacenter
    let outcome = reconcile_keyspace(&plan.validated, context).await;
    match &outcome {
        Ok(Decision::Create { statement } | Decision::Alter { statement, .. }) => {
            info!(%statement, "keyspace replication changed");
            publish(context, &region, EventType::Normal, "KeyspaceReplicationChanged", format!("ran {statement}"))
                .await;
        }
        Ok(_) => {}
        Err(error) => debug!(%error, "keyspace replication not checked"),
    }
    let outcome = outcome.map_err(|error| describe(&error));
    let spec = &region.spec;
    // The conditions carried over (a rebuild still to be done) come from the Regions just listed: the reflector's
    // cache may not hold the status the previous reconcile wrote yet.
    let listed = siblings.iter().find(|sibling| sibling.name_any() == name).unwrap_or(&region);
    let previous = listed.status.as_ref().map(|status| status.conditions.as_slice()).unwrap_or_default();
    let keyspace_conditions = keyspace::conditions(
        previous,
        &plan.validated.cluster.spec.cassandra.keyspace,
        &spec.cassandra.datacenter,
        spec.cassandra.replication_factor,
        &outcome,
        region.annotations().get(keyspace::REBUILT_ANNOTATION).map(String::as_str),
    );
    let recheck = keyspace_conditions.first().is_some_and(|condition| !condition.status);
    // What the routers observe of the flows into this Region, against the ChatCluster's budget.
    let (incoming_flows, over_budget) = if mm2::mirrored_regions(&plan.validated).is_empty() {
        (Vec::new(), None)
    } else {
        match read_incoming_flows(&plan.validated, context).await {
            Ok(rows) => keyspace::incoming_flows(
                &rows,
                Timestamp::now().as_millisecond(),
                i64::from(plan.validated.cluster.spec.mirror_maker.latency_budget_ms),
            ),
            Err(error) => {
                debug!(%error, "incoming flows not read");
                (region.status.as_ref().map(|status| status.incoming_flows.clone()).unwrap_or_default(), None)
            }
        }
    };

    // status
    let mut new_status = status::region_ready(
        &region,
        plan.block,
        status::Rollout::of(&applied.gateway_stateful_set),
        status::Rollout::of(&applied.router_stateful_set),
        status::AppliedObjects {
            internal_token_secret: internal_token::secret_name(&name),
            network_policies: plan.resources.network_policies.iter().map(ResourceExt::name_any).collect(),
            mirrored_regions: mm2::mirrored_regions(&plan.validated),
            mirror_maker: applied.mirror_maker.as_ref().map(|deployment| {
                let wanted = deployment.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1);
                let ready = deployment.status.as_ref().and_then(|status| status.ready_replicas).unwrap_or(0);
                (ready, wanted)
            }),
            incoming_flows,
            over_budget,
            rollout: Some(step.decision.status.clone()),
            scaling: step.scaling.clone(),
            gateway_connections: step.connections,
        },
        keyspace_conditions,
        Timestamp::now(),
    );
    new_status.version = status::running_version(
        &region,
        plan.validated.version(),
        status::Rollout::of(&applied.gateway_stateful_set),
        status::Rollout::of(&applied.router_stateful_set),
    );
    wait_for_replication_targets(&mut new_status, &region, &plan.validated, context).await;
    let mirrored = mm2::mirrored_regions(&plan.validated);
    let flows_next = (!mirrored.is_empty()).then(|| flows_refresh(&mirrored, &new_status.incoming_flows));
    write_region_status(&regions, &region, new_status.clone(), context).await?;
    let mut current = (*region).clone();
    current.status = Some(new_status);
    update_cluster_summary(&clusters, &cluster, &siblings, current, context).await?;
    let mut next = if recheck { KEYSPACE_RECHECK } else { RESYNC };
    if let Some(flows_next) = flows_next {
        next = next.min(flows_next);
    }
    if let Some(step_next) = step.requeue() {
        next = next.min(step_next);
    }
    Ok(Action::requeue(next))
}

/// Marks the Region as waiting for its missing replication targets ([`crate::validate::missing_replication_targets`])
/// in `new_status`, with a Normal Event when it starts waiting for them. The other Regions' changes wake it when one
/// appears (see [`run`]).
async fn wait_for_replication_targets(
    new_status: &mut RegionStatus,
    region: &Region,
    validated: &ValidatedRegion,
    context: &Context,
) {
    let missing = crate::validate::missing_replication_targets(validated);
    if status::wait_for_replication_targets(new_status, region, &missing, Timestamp::now()) {
        let targets = missing.join(", ");
        info!(%targets, "waiting for replication targets");
        let note = format!("replicates to {targets}, which no Region of the chat cluster is yet: waiting for it");
        publish(context, region, EventType::Normal, status::WAITING_FOR_REPLICATION_TARGET, note).await;
    }
}

/// When a Region that mirrors `mirrored` reads its incoming flows again: soon ([`FLOWS_FIRST_REFRESH`]) while a
/// mirrored region has no flow with MirrorMaker 2's lag yet (a new Region shows its flows as soon as the routers
/// measured them), else every [`FLOWS_REFRESH`].
fn flows_refresh(mirrored: &[String], flows: &[parley_crds::region::IncomingFlow]) -> Duration {
    let measured = |region: &String| flows.iter().any(|flow| &flow.region == region && flow.mirror_lag_ms.is_some());
    if mirrored.iter().all(measured) {
        FLOWS_REFRESH
    } else {
        FLOWS_FIRST_REFRESH
    }
}

/// An error with its causes, for a condition's message.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads one key of a Secret of the namespace.
async fn secret_value(client: &Client, namespace: &str, name: &str, key: &str) -> Result<Vec<u8>, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret =
        secrets.get(name).await.map_err(|source| Error::kube(format!("get Secret {namespace}/{name}"), source))?;
    secret.data.and_then(|mut data| data.remove(key)).map(|value| value.0).ok_or_else(|| Error::Cassandra {
        action: format!("read key {key} of Secret {namespace}/{name}"),
        message: "the Secret has no such key".to_owned(),
    })
}

/// How the operator reaches the ChatCluster's Cassandra: its contact points, TLS CA and credentials, the Secrets
/// read through the API server.
async fn cassandra_access(cluster: &ChatCluster, namespace: &str, client: &Client) -> Result<CassandraAccess, Error> {
    let spec = &cluster.spec.cassandra;
    let ca_pem = match spec.tls_ca_secret.as_ref().filter(|_| spec.tls) {
        Some(ca) => Some(secret_value(client, namespace, &ca.name, &ca.key).await?),
        None => None,
    };
    let credentials = match &spec.credentials {
        Some(credentials) => {
            let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
            let username =
                text(secret_value(client, namespace, &credentials.secret_name, &credentials.username_key).await?);
            let password =
                text(secret_value(client, namespace, &credentials.secret_name, &credentials.password_key).await?);
            Some((username, password))
        }
        None => None,
    };
    Ok(CassandraAccess {
        contact_points: spec.contact_points.clone(),
        tls: spec.tls,
        ca_pem,
        credentials,
        timeout: CASSANDRA_TIMEOUT,
    })
}

/// What the Region's routers reported of its incoming flows (see [`keyspace::incoming_flows`]).
async fn read_incoming_flows(validated: &ValidatedRegion, context: &Context) -> Result<Vec<keyspace::FlowRow>, Error> {
    let access = cassandra_access(&validated.cluster, &validated.namespace, &context.client).await?;
    let admin = CassandraAdmin::connect(&access).await?;
    admin.incoming_flows(&validated.cluster.spec.cassandra.keyspace, &validated.region.spec.region_name).await
}

/// Adds the Region's datacenter to the keyspace's replication (or creates the keyspace), one Region at a time.
async fn reconcile_keyspace(validated: &ValidatedRegion, context: &Context) -> Result<Decision, Error> {
    let spec = &validated.region.spec.cassandra;
    let keyspace_name = &validated.cluster.spec.cassandra.keyspace;
    let lock = context.keyspace_lock(&validated.namespace, &validated.cluster_name);
    let _one_at_a_time = lock.lock().await;
    let access = cassandra_access(&validated.cluster, &validated.namespace, &context.client).await?;
    let admin = CassandraAdmin::connect(&access).await?;
    let present = admin.datacenters().await?;
    let current = admin.replication(keyspace_name).await?;
    let decision =
        keyspace::decide(keyspace_name, current.as_ref(), &spec.datacenter, spec.replication_factor, &present);
    if let Decision::Create { statement } | Decision::Alter { statement, .. } = &decision {
        admin.execute(statement).await?;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0);
    let annotation = validated.region.annotations().get(keyspace::FAILED_ANNOTATION).map(String::as_str);
    if let Some(mark) = keyspace::failed_mark(keyspace_name, &validated.region.spec.region_name, annotation, now_ms) {
        // The routers create `failed_regions` with their schema; before any router ran there is nothing to mark.
        match admin.execute(&mark).await {
            Ok(()) => info!(%mark, "region failed mark written"),
            Err(error) => warn!(%error, %mark, "cannot write the region's failed mark (have the routers run yet?)"),
        }
    }
    Ok(decision)
}

/// A Region whose spec cannot be reconciled: Degraded status, a Warning Event when the condition changes, and
/// nothing applied.
async fn degrade(
    region: &Region,
    cluster: Option<&ChatCluster>,
    siblings: &[Region],
    error: Error,
    context: &Context,
) -> Result<Action, Error> {
    record_degraded(region, cluster, siblings, &error, context).await?;
    Ok(match &error {
        // Quarantined blocks expire with time alone: look again once the quarantine has passed.
        Error::MachineIdsExhausted { .. } => Action::requeue(Duration::from_secs(
            cluster
                .map(|cluster| u64::try_from(cluster.spec.snowflake.machine_id_quarantine_seconds).unwrap_or(60))
                .unwrap_or(60)
                .max(5),
        )),
        _ => Action::await_change(),
    })
}

/// Writes the Degraded status of a Region that cannot be reconciled (with a Warning Event when the condition
/// changes) and the ChatCluster's summary of it.
async fn record_degraded(
    region: &Region,
    cluster: Option<&ChatCluster>,
    siblings: &[Region],
    error: &Error,
    context: &Context,
) -> Result<(), Error> {
    let namespace = region.namespace().unwrap_or_default();
    let regions: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    let new_status = status::region_degraded(region, error, Timestamp::now());
    if write_region_status(&regions, region, new_status.clone(), context).await? {
        warn!(%error, reason = error.reason(), "region cannot be reconciled");
        publish(context, region, EventType::Warning, error.reason(), error.to_string()).await;
    } else {
        debug!(%error, reason = error.reason(), "region still cannot be reconciled");
    }
    if let Some(cluster) = cluster {
        let clusters: Api<ChatCluster> = Api::namespaced(context.client.clone(), &namespace);
        let mut current = region.clone();
        current.status = Some(new_status);
        update_cluster_summary(&clusters, cluster, siblings, current, context).await?;
    }
    Ok(())
}

/// Creates the Region's internal token Secret unless it is known to exist. A 409 (it exists, made earlier or by a
/// person) keeps it as it is; the operator never reads, updates or overwrites it.
async fn ensure_internal_token(validated: &ValidatedRegion, context: &Context) -> Result<(), Error> {
    let namespace = &validated.namespace;
    let secret_name = internal_token::secret_name(&validated.name);
    let key = format!("{namespace}/{secret_name}/{}", validated.owner.uid);
    if context.tokens().get(&key).is_some_and(|checked| checked.elapsed() < TOKEN_RECHECK) {
        return Ok(());
    }
    let failed = |message: String, source: Option<Box<kube::Error>>| Error::InternalTokenSecret {
        region: validated.name.clone(),
        namespace: namespace.clone(),
        secret: secret_name.clone(),
        message,
        source,
    };
    let token = internal_token::generate()
        .ok_or_else(|| failed("the operating system gave no random bytes for the token".to_owned(), None))?;
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), namespace);
    let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
    match secrets.create(&params, &internal_token::secret(validated, &token)).await {
        Ok(_) => {
            context.metrics.wrote("create");
            info!(secret = %secret_name, "internal token secret created");
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            debug!(secret = %secret_name, "internal token secret exists: kept");
        }
        Err(source) => {
            let message = match &source {
                kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
                other => other.to_string(),
            };
            return Err(failed(message, Some(Box::new(source))));
        }
    }
    context.tokens().insert(key, Instant::now());
    Ok(())
}

/// Creates the ChatCluster's peer token Secret unless it is known to exist, like [`ensure_internal_token`].
async fn ensure_peer_token(validated: &ValidatedRegion, context: &Context) -> Result<(), Error> {
    let namespace = &validated.namespace;
    let secret_name = internal_token::peer_secret_name(&validated.cluster_name);
    let cluster_uid = validated.cluster.metadata.uid.clone().unwrap_or_default();
    let key = format!("{namespace}/{secret_name}/{cluster_uid}");
    if context.tokens().get(&key).is_some_and(|checked| checked.elapsed() < TOKEN_RECHECK) {
        return Ok(());
    }
    let failed = |message: String, source: Option<Box<kube::Error>>| Error::PeerTokenSecret {
        cluster: validated.cluster_name.clone(),
        namespace: namespace.clone(),
        secret: secret_name.clone(),
        message,
        source,
    };
    let token = internal_token::generate()
        .ok_or_else(|| failed("the operating system gave no random bytes for the token".to_owned(), None))?;
    let secret = internal_token::peer_secret(validated, &token)
        .ok_or_else(|| failed("the chat cluster has no uid to own the Secret".to_owned(), None))?;
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), namespace);
    let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
    match secrets.create(&params, &secret).await {
        Ok(_) => {
            context.metrics.wrote("create");
            info!(secret = %secret_name, "peer token secret created");
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            debug!(secret = %secret_name, "peer token secret exists: kept");
        }
        Err(source) => {
            let message = match &source {
                kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
                other => other.to_string(),
            };
            return Err(failed(message, Some(Box::new(source))));
        }
    }
    context.tokens().insert(key, Instant::now());
    Ok(())
}

/// Whether a Region being deleted may go as far as the keyspace is concerned: yes when the keyspace does not
/// replicate to its datacenter, or once the user released the datacenter with [`keyspace::RELEASE_ANNOTATION`]
/// (then it is dropped from the replication first). Otherwise [`Error::DeletionBlocked`], with the Region's
/// `DeletionBlocked` condition and a Warning Event that say what to do.
async fn release_datacenter(region: &Region, cluster: &ChatCluster, context: &Context) -> Result<(), Error> {
    let namespace = region.namespace().unwrap_or_default();
    let datacenter = &region.spec.cassandra.datacenter;
    let keyspace_name = &cluster.spec.cassandra.keyspace;
    let released = region.annotations().get(keyspace::RELEASE_ANNOTATION).map(String::as_str);
    let lock = context.keyspace_lock(&namespace, &region.spec.cluster_ref);
    let _one_at_a_time = lock.lock().await;
    let checked: Result<(Release, Option<CassandraAdmin>), Error> = async {
        let access = cassandra_access(cluster, &namespace, &context.client).await?;
        let admin = CassandraAdmin::connect(&access).await?;
        let current = admin.replication(keyspace_name).await?;
        Ok((keyspace::release(keyspace_name, current.as_ref(), datacenter, released), Some(admin)))
    }
    .await;
    let (reason, message) = match checked {
        Ok((Release::NotReplicated, _)) => return Ok(()),
        Ok((Release::LastDatacenter, _)) => {
            publish(
                context,
                region,
                EventType::Normal,
                "CassandraDatacenterReleased",
                format!(
                    "datacenter {datacenter} is the only datacenter of keyspace {keyspace_name}: the keyspace is left \
                     as it is"
                ),
            )
            .await;
            return Ok(());
        }
        Ok((Release::Drop { statement }, Some(admin))) => match admin.execute(&statement).await {
            Ok(()) => {
                info!(%statement, "datacenter dropped from the keyspace's replication");
                publish(context, region, EventType::Normal, "CassandraDatacenterReleased", format!("ran {statement}"))
                    .await;
                return Ok(());
            }
            Err(error) => ("CassandraUnavailable", format!("running `{statement}` failed: {}", describe(&error))),
        },
        Ok((Release::Blocked { message }, _)) => ("CassandraDatacenterInUse", message),
        Ok((Release::Drop { .. }, None)) => ("CassandraUnavailable", "no connection".to_owned()),
        Err(error) if released == Some(datacenter.as_str()) => {
            let note = format!(
                "could not check or change keyspace {keyspace_name} ({}); datacenter {datacenter} was released with \
                 {}, so the Region is deleted: drop the datacenter from the keyspace's replication yourself if it is \
                 still there",
                describe(&error),
                keyspace::RELEASE_ANNOTATION
            );
            warn!(%note, "region deleted without checking the keyspace");
            publish(context, region, EventType::Warning, "CassandraUnchecked", note).await;
            return Ok(());
        }
        Err(error) => (
            "CassandraUnavailable",
            format!(
                "cannot check whether keyspace {keyspace_name} still replicates to datacenter {datacenter}: {}. The \
                 operator retries; if this Cassandra is gone for good, set the annotation {}: \"{datacenter}\" on \
                 this Region to delete it anyway",
                describe(&error),
                keyspace::RELEASE_ANNOTATION
            ),
        ),
    };
    let regions: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    let mut new_status = region.status.clone().unwrap_or_default();
    let previous = new_status.conditions.clone();
    let update = status::ConditionUpdate {
        type_: keyspace::CONDITION_DELETION_BLOCKED,
        status: true,
        reason,
        message: message.clone(),
    };
    let blocked = status::conditions(&previous, vec![update], region.metadata.generation, Timestamp::now());
    new_status.conditions.retain(|condition| condition.type_ != keyspace::CONDITION_DELETION_BLOCKED);
    new_status.conditions.extend(blocked);
    if write_region_status(&regions, region, new_status, context).await? {
        publish(context, region, EventType::Warning, reason, message.clone()).await;
    }
    Err(Error::DeletionBlocked { region: region.name_any(), message })
}

/// The finalizer: waits until the keyspace no longer replicates to the Region's datacenter (or the user released
/// it, see [`release_datacenter`]), then releases the Region's machine-ID block into quarantine and drops it from the
/// ChatCluster's summary. Owned objects go with the Region through their ownerReferences.
async fn cleanup(region: Arc<Region>, context: &Context) -> Result<Action, Error> {
    let name = region.name_any();
    let namespace = region.namespace().unwrap_or_default();
    let clusters: Api<ChatCluster> = Api::namespaced(context.client.clone(), &namespace);
    let Some(cluster) = clusters
        .get_opt(&region.spec.cluster_ref)
        .await
        .map_err(|source| Error::kube(format!("get ChatCluster {namespace}/{}", region.spec.cluster_ref), source))?
    else {
        return Ok(Action::await_change());
    };
    release_datacenter(&region, &cluster, context).await?;
    let mut allocation =
        cluster.status.as_ref().and_then(|status| status.machine_id_allocation.clone()).unwrap_or_default();
    let released = machine_ids::release(&mut allocation, &name, Timestamp::now());
    let regions: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    let siblings =
        regions.list(&ListParams::default()).await.map_err(|source| Error::kube("list Regions", source))?.items;
    let remaining: Vec<Region> = siblings.into_iter().filter(|other| other.name_any() != name).collect();
    let new_status = status::cluster(&cluster, &remaining, Some(allocation), Timestamp::now());
    if cluster.status.as_ref() != Some(&new_status) {
        write_cluster_status(&clusters, &cluster, &new_status, context).await?;
    }
    if let Some(block) = released {
        info!(block = %block.display_range(), "machine ids released into quarantine");
        publish(
            context,
            &region,
            EventType::Normal,
            "MachineIdsReleased",
            format!(
                "machine ids {} released; quarantined for {}s",
                block.display_range(),
                cluster.spec.snowflake.machine_id_quarantine_seconds
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

async fn update_cluster_summary(
    clusters: &Api<ChatCluster>,
    cluster: &ChatCluster,
    siblings: &[Region],
    current: Region,
    context: &Context,
) -> Result<(), Error> {
    let name = current.name_any();
    let mut regions: Vec<Region> = siblings.iter().filter(|other| other.name_any() != name).cloned().collect();
    regions.push(current);
    let new_status = status::cluster(cluster, &regions, None, Timestamp::now());
    let old_status = cluster.status.clone().unwrap_or_default();
    let summary = |status: &ChatClusterStatus| {
        (status.observed_generation, status.conditions.clone(), status.regions_ready.clone(), status.regions.clone())
    };
    if summary(&old_status) == summary(&new_status) {
        return Ok(());
    }
    // Only the summary fields, without a precondition: the allocation is never written from a possibly stale
    // read here, so concurrent Region reconciles need not retry for each other's summaries.
    let name = cluster.name_any();
    let object = format!("ChatCluster {}/{name} status", cluster.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": {
        "observedGeneration": new_status.observed_generation,
        "conditions": new_status.conditions,
        "regionsReady": new_status.regions_ready,
        "regions": new_status.regions,
    }});
    clusters
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::kube(format!("write {object} summary"), source))?;
    context.metrics.wrote("status");
    Ok(())
}

/// A JSON merge patch that turns `old` into `new`: keys of `old` missing from `new` are set to null, at every level
/// of nested objects (a merge patch merges objects, so a field dropped inside one would otherwise stay).
pub fn replacing_patch(old: &Value, new: &Value) -> Value {
    let mut patch = new.clone();
    if let (Some(old), Some(patch)) = (old.as_object(), patch.as_object_mut()) {
        for (key, old_value) in old {
            match patch.get_mut(key) {
                None => {
                    patch.insert(key.clone(), Value::Null);
                }
                Some(new_value) if new_value.is_object() && old_value.is_object() => {
                    *new_value = replacing_patch(old_value, new_value);
                }
                Some(_) => {}
            }
        }
    }
    patch
}

/// Writes the ChatCluster's status with its resourceVersion as precondition; a conflict becomes
/// [`Error::Conflict`] and the reconcile is retried with fresh data.
async fn write_cluster_status(
    clusters: &Api<ChatCluster>,
    cluster: &ChatCluster,
    new_status: &ChatClusterStatus,
    context: &Context,
) -> Result<ChatCluster, Error> {
    let name = cluster.name_any();
    let object = format!("ChatCluster {}/{name} status", cluster.namespace().unwrap_or_default());
    let old =
        serde_json::to_value(&cluster.status).map_err(|source| Error::Serialize { object: object.clone(), source })?;
    let new = serde_json::to_value(new_status).map_err(|source| Error::Serialize { object: object.clone(), source })?;
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": cluster.resource_version() },
        "status": replacing_patch(&old, &new),
    });
    let written = clusters
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::kube(format!("write {object}"), source))?;
    context.metrics.wrote("status");
    Ok(written)
}

/// Writes the Region's status when it differs from the stored one; returns whether it wrote.
async fn write_region_status(
    regions: &Api<Region>,
    region: &Region,
    new_status: RegionStatus,
    context: &Context,
) -> Result<bool, Error> {
    if region.status.as_ref() == Some(&new_status) {
        return Ok(false);
    }
    let name = region.name_any();
    let object = format!("Region {}/{name} status", region.namespace().unwrap_or_default());
    let old =
        serde_json::to_value(&region.status).map_err(|source| Error::Serialize { object: object.clone(), source })?;
    let new =
        serde_json::to_value(&new_status).map_err(|source| Error::Serialize { object: object.clone(), source })?;
    let patch = serde_json::json!({ "status": replacing_patch(&old, &new) });
    regions
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::kube(format!("write {object}"), source))?;
    context.metrics.wrote("status");
    Ok(true)
}

pub(crate) async fn publish(context: &Context, region: &Region, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    match context.recorder.publish(&event, &region.object_ref(&())).await {
        Ok(()) => context.metrics.wrote("event"),
        Err(error) => warn!(%error, reason, "failed to publish an event"),
    }
}

/// What [`apply_resources`] did.
#[derive(Debug)]
struct Applied {
    /// `Kind name` of every object written or deleted.
    changed: Vec<String>,
    /// The gateway StatefulSet as the API server has it now.
    gateway_stateful_set: StatefulSet,
    /// The router StatefulSet as the API server has it now.
    router_stateful_set: StatefulSet,
    /// The MirrorMaker 2 Deployment as the API server has it now, when the Region has one.
    mirror_maker: Option<Deployment>,
}

async fn apply_resources(
    client: &Client,
    region_name: &str,
    namespace: &str,
    region: &Region,
    resources: &RegionResources,
    context: &Context,
) -> Result<Applied, Error> {
    let uid = region.uid().unwrap_or_default();
    let mut changed = Vec::new();
    let selector = format!("{REGION_LABEL}={region_name}");
    let mut config_maps = vec![resources.gateway_config_map.clone(), resources.router_config_map.clone()];
    config_maps.extend(resources.mirror_maker.as_ref().map(|mirror_maker| mirror_maker.config_map.clone()));
    let config_maps = apply_kind(client, namespace, &selector, &uid, config_maps, &mut changed, context).await?;
    let services = apply_kind(
        client,
        namespace,
        &selector,
        &uid,
        vec![
            resources.gateway_headless_service.clone(),
            resources.gateway_service.clone(),
            resources.router_headless_service.clone(),
        ],
        &mut changed,
        context,
    )
    .await?;
    delete_orphans::<Service>(client, namespace, &services.orphans, &mut changed, context).await?;
    // The gateways' pod agent identity, before the pods that run as it.
    let accounts = vec![resources.gateway_service_account.clone()];
    apply_kind(client, namespace, &selector, &uid, accounts, &mut changed, context).await?;
    apply_kind(client, namespace, &selector, &uid, vec![resources.gateway_role.clone()], &mut changed, context).await?;
    let bindings = vec![resources.gateway_role_binding.clone()];
    apply_kind(client, namespace, &selector, &uid, bindings, &mut changed, context).await?;
    let stateful_sets = apply_kind(
        client,
        namespace,
        &selector,
        &uid,
        vec![resources.gateway_stateful_set.clone(), resources.router_stateful_set.clone()],
        &mut changed,
        context,
    )
    .await?;
    delete_orphans::<StatefulSet>(client, namespace, &stateful_sets.orphans, &mut changed, context).await?;
    let budgets = apply_kind(
        client,
        namespace,
        &selector,
        &uid,
        vec![resources.gateway_disruption_budget.clone(), resources.router_disruption_budget.clone()],
        &mut changed,
        context,
    )
    .await?;
    delete_orphans::<PodDisruptionBudget>(client, namespace, &budgets.orphans, &mut changed, context).await?;
    let policies =
        apply_kind(client, namespace, &selector, &uid, resources.network_policies.clone(), &mut changed, context)
            .await?;
    delete_orphans::<NetworkPolicy>(client, namespace, &policies.orphans, &mut changed, context).await?;
    let mirror_makers = resources.mirror_maker.iter().map(|mirror_maker| mirror_maker.deployment.clone()).collect();
    let deployments = apply_kind(client, namespace, &selector, &uid, mirror_makers, &mut changed, context).await?;
    delete_orphans::<Deployment>(client, namespace, &deployments.orphans, &mut changed, context).await?;
    // A MirrorMaker 2 ConfigMap is read by its Deployment only, which is gone now.
    let (mirror_maker_config_maps, config_map_orphans): (Vec<String>, Vec<String>) =
        config_maps.orphans.iter().cloned().partition(|orphan| orphan == &mm2::config_map_name(region_name));
    delete_orphans::<ConfigMap>(client, namespace, &mirror_maker_config_maps, &mut changed, context).await?;
    let config_maps = Synced { live: config_maps.live, orphans: config_map_orphans };
    let find = |component: &str| {
        stateful_sets
            .live
            .iter()
            .find(|set| set.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(component))
            .cloned()
            .unwrap_or_default()
    };
    let (gateway_stateful_set, router_stateful_set) = (find("gateway"), find("router"));
    // Pods read their ConfigMap through envFrom whenever a container starts: a ConfigMap that is no longer built
    // (such as the single `<region>-config` of earlier operator versions) may still be needed by a pod of the
    // previous revision. Delete it once both StatefulSets have rolled out; their status changes, which the
    // controller watches, bring the reconcile that does.
    if !config_maps.orphans.is_empty() {
        if config_map_orphans_deletable(&gateway_stateful_set, &router_stateful_set) {
            delete_orphans::<ConfigMap>(client, namespace, &config_maps.orphans, &mut changed, context).await?;
        } else {
            debug!(orphans = ?config_maps.orphans, "orphan ConfigMaps kept until both StatefulSets have rolled out");
        }
    }
    Ok(Applied {
        gateway_stateful_set,
        router_stateful_set,
        mirror_maker: deployments.live.into_iter().next(),
        changed,
    })
}

/// Whether orphan ConfigMaps may be deleted: both StatefulSets (as the API server has them after this reconcile's
/// writes) have every wanted pod ready on their latest template, so no pod still reads a ConfigMap that is no
/// longer built.
pub fn config_map_orphans_deletable(gateway: &StatefulSet, router: &StatefulSet) -> bool {
    Rollout::of(gateway).done() && Rollout::of(router).done()
}

/// What [`apply_kind`] found and did for one kind.
struct Synced<K> {
    /// The desired objects as the API server has them after the writes.
    live: Vec<K>,
    /// The kind's orphans (see [`orphans`]), not deleted yet.
    orphans: Vec<String>,
}

/// Server-side applies the desired objects of one kind that are not already in place, and returns the live objects
/// after the writes with the names of the kind's orphans, which it leaves to [`delete_orphans`].
async fn apply_kind<K>(
    client: &Client,
    namespace: &str,
    selector: &str,
    owner_uid: &str,
    desired: Vec<K>,
    changed: &mut Vec<String>,
    context: &Context,
) -> Result<Synced<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let live = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::kube(format!("list {kind} in {namespace}"), source))?
        .items;
    let orphans = orphans(&live, &desired, owner_uid);
    let live_by_name: BTreeMap<String, K> = live.into_iter().map(|object| (object.name_any(), object)).collect();
    let mut result = Vec::new();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in &desired {
        let name = object.name_any();
        let wanted = serde_json::to_value(object)
            .map_err(|source| Error::Serialize { object: format!("{kind} {name}"), source })?;
        if let Some(current) = live_by_name.get(&name) {
            let current_json = serde_json::to_value(current)
                .map_err(|source| Error::Serialize { object: format!("{kind} {name}"), source })?;
            if is_subset(&wanted, &current_json) {
                result.push(current.clone());
                continue;
            }
        }
        let applied = api
            .patch(&name, &params, &Patch::Apply(&wanted))
            .await
            .map_err(|source| Error::kube(format!("apply {kind} {namespace}/{name}"), source))?;
        context.metrics.wrote("apply");
        info!(kind, name, "applied");
        changed.push(format!("{kind} {name}"));
        result.push(applied);
    }
    Ok(Synced { live: result, orphans })
}

/// The names of the `live` objects (listed by the Region's label) that the Region controls (a controller
/// ownerReference with its uid) and that are not `desired`. An object the Region does not control is never an
/// orphan, whatever its labels.
pub fn orphans<K: Resource>(live: &[K], desired: &[K], owner_uid: &str) -> Vec<String> {
    let desired_names: Vec<String> = desired.iter().map(|object| object.name_any()).collect();
    live.iter()
        .filter(|object| {
            object.owner_references().iter().any(|owner| owner.controller == Some(true) && owner.uid == owner_uid)
        })
        .map(|object| object.name_any())
        .filter(|name| !desired_names.contains(name))
        .collect()
}

/// Deletes the named orphans of one kind.
async fn delete_orphans<K>(
    client: &Client,
    namespace: &str,
    names: &[String],
    changed: &mut Vec<String>,
    context: &Context,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + Debug + DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    for name in names {
        api.delete(name, &DeleteParams::background())
            .await
            .map_err(|source| Error::kube(format!("delete orphan {kind} {namespace}/{name}"), source))?;
        context.metrics.wrote("delete");
        info!(kind, name, "deleted orphan");
        changed.push(format!("deleted {kind} {name}"));
    }
    Ok(())
}

/// Whether every field of `wanted` is present in `live` with the same value. Objects may have more fields in
/// `live` (defaults, status, metadata the server adds); lists must have the same length, element by element. A
/// ConfigMap's `data` must have exactly the wanted keys: a setting the operator no longer sets (such as
/// `PARLEY_MIRRORED_REGIONS` once nothing is mirrored) must go. When this holds, a server-side apply of `wanted`
/// would change nothing, so it is skipped.
pub fn is_subset(wanted: &Value, live: &Value) -> bool {
    match (wanted, live) {
        (Value::Object(wanted), Value::Object(live)) => wanted.iter().all(|(key, value)| match live.get(key) {
            Some(Value::Object(live_data)) if key == "data" && value.is_object() => {
                value.as_object().is_some_and(|wanted_data| wanted_data.len() == live_data.len())
                    && is_subset(value, &Value::Object(live_data.clone()))
            }
            Some(live_value) => is_subset(value, live_value),
            None => value.is_null() || is_empty(value),
        }),
        (Value::Array(wanted), Value::Array(live)) => {
            wanted.len() == live.len() && wanted.iter().zip(live).all(|(wanted, live)| is_subset(wanted, live))
        }
        (wanted, live) => wanted == live,
    }
}

/// An empty object or list, which the API server drops from the stored object.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.values().all(|value| value.is_null() || is_empty(value)),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_read_soon_until_every_mirrored_region_was_measured() {
        let flow = |region: &str, lag: Option<i64>| parley_crds::region::IncomingFlow {
            region: region.into(),
            delivery_latency_ms: 0,
            messages: 0,
            mirror_lag_ms: lag,
            reported_at: String::new(),
        };
        let mirrored = vec!["ap".to_owned(), "eu".to_owned()];
        assert_eq!(flows_refresh(&mirrored, &[]), FLOWS_FIRST_REFRESH);
        assert_eq!(flows_refresh(&mirrored, &[flow("eu", Some(20)), flow("ap", None)]), FLOWS_FIRST_REFRESH);
        assert_eq!(flows_refresh(&mirrored, &[flow("eu", Some(20)), flow("ap", Some(900))]), FLOWS_REFRESH);
    }
    use http::{Method, Request, Response};
    use kube::client::Body;
    use parley_crds::common::AllocatedBlock;
    use parley_crds::{MachineIdAllocation, MachineIdBlock};
    use serde_json::json;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn mock() -> (Arc<Context>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "ns");
        (Context::new(client, Metrics::new(), Some("test".to_owned())), handle)
    }

    fn cluster(allocation: MachineIdAllocation) -> ChatCluster {
        let mut cluster: ChatCluster = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
            "metadata": {"name": "chat", "namespace": "ns", "generation": 1, "resourceVersion": "41"},
            "spec": {"version": "0.1.0", "kafka": {},
                     // Nothing listens there: Cassandra is unreachable.
                     "cassandra": {"contactPoints": ["127.0.0.1:1"], "keyspace": "k"},
                     "snowflake": {"machineIdQuarantineSeconds": 90},
                     "auth": {"jwtKeySecret": {"name": "s", "key": "k"}}}
        }))
        .expect("cluster");
        cluster.status = Some(ChatClusterStatus { machine_id_allocation: Some(allocation), ..Default::default() });
        cluster
    }

    fn region(name: &str) -> Region {
        serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "Region",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "generation": 2,
                         "resourceVersion": "7", "finalizers": [FINALIZER],
                         "deletionTimestamp": "2027-01-01T00:00:00Z"},
            "spec": {"clusterRef": "chat", "regionName": name, "cassandra": {"datacenter": "dc1"},
                     "gateway": {"replicas": 2}, "router": {"replicas": 1}}
        }))
        .expect("region")
    }

    fn respond(send: tower_test::mock::SendResponse<Response<Body>>, value: &Value) {
        send.send_response(
            Response::builder().body(Body::from(serde_json::to_vec(value).expect("json"))).expect("response"),
        );
    }

    async fn body(request: Request<Body>) -> Value {
        let bytes = request.into_body().collect_bytes().await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[tokio::test]
    async fn unchanged_region_status_is_not_written() {
        let (context, _handle) = mock();
        let regions: Api<Region> = Api::namespaced(context.client.clone(), "ns");
        let mut eu = region("eu");
        let status = RegionStatus { gateways_desired: 2, gateways: Some("0/2".into()), ..Default::default() };
        eu.status = Some(status.clone());
        // A request would wait forever for the mock's response: the timeout proves none is made.
        let wrote = tokio::time::timeout(Duration::from_secs(1), write_region_status(&regions, &eu, status, &context))
            .await
            .expect("no request made")
            .expect("ok");
        assert!(!wrote);
        assert!(!context.metrics.encode().contains("parley_operator_writes_total{kind=\"status\"}"));
    }

    #[tokio::test]
    async fn changed_region_status_is_merge_patched_with_removed_fields_nulled() {
        let (context, mut handle) = mock();
        let regions: Api<Region> = Api::namespaced(context.client.clone(), "ns");
        let mut eu = region("eu");
        eu.status = Some(RegionStatus { machine_ids: Some("0-2".into()), ..Default::default() });
        let new_status = RegionStatus { gateways_desired: 2, gateways: Some("0/2".into()), ..Default::default() };
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("request");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(request.uri().path(), "/apis/parley.dev/v1alpha1/namespaces/ns/regions/eu/status");
            let patch = body(request).await;
            assert_eq!(patch["status"]["gateways"], "0/2");
            assert_eq!(patch["status"]["machineIds"], Value::Null, "a dropped field is removed");
            respond(send, &serde_json::to_value(region("eu")).expect("json"));
        });
        assert!(write_region_status(&regions, &eu, new_status, &context).await.expect("write"));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn finalizer_quarantines_the_block_with_a_resource_version_precondition() {
        let (context, mut handle) = mock();
        let allocation = MachineIdAllocation {
            blocks: vec![
                AllocatedBlock { region: "eu".into(), block: MachineIdBlock { start: 0, size: 3 } },
                AllocatedBlock { region: "us".into(), block: MachineIdBlock { start: 3, size: 3 } },
            ],
            quarantined: vec![],
        };
        let stored = cluster(allocation);
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("get cluster");
            assert_eq!(request.method(), Method::GET);
            assert_eq!(request.uri().path(), "/apis/parley.dev/v1alpha1/namespaces/ns/chatclusters/chat");
            respond(send, &serde_json::to_value(&stored).expect("json"));

            // Cassandra cannot be checked, but the datacenter was released: a Warning, and the Region goes.
            let (request, send) = handle.next_request().await.expect("event");
            assert!(request.uri().path().ends_with("/events"), "{}", request.uri());
            let event = body(request).await;
            assert_eq!(event["reason"], "CassandraUnchecked");
            assert_eq!(event["type"], "Warning");
            respond(send, &event);

            let (request, send) = handle.next_request().await.expect("list regions");
            assert_eq!(request.uri().path(), "/apis/parley.dev/v1alpha1/namespaces/ns/regions");
            respond(
                send,
                &json!({"apiVersion": "parley.dev/v1alpha1", "kind": "RegionList", "metadata": {},
                                   "items": [region("eu"), region("us")]}),
            );

            let (request, send) = handle.next_request().await.expect("patch status");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(request.uri().path(), "/apis/parley.dev/v1alpha1/namespaces/ns/chatclusters/chat/status");
            let patch = body(request).await;
            assert_eq!(patch["metadata"]["resourceVersion"], "41", "optimistic concurrency");
            let allocation = &patch["status"]["machineIdAllocation"];
            assert_eq!(allocation["blocks"], json!([{"region": "us", "block": {"start": 3, "size": 3}}]));
            assert_eq!(allocation["quarantined"][0]["region"], "eu");
            assert_eq!(allocation["quarantined"][0]["block"], json!({"start": 0, "size": 3}));
            assert_eq!(patch["status"]["machineIdsAllocated"], 3);
            respond(send, &serde_json::to_value(&stored).expect("json"));

            let (request, send) = handle.next_request().await.expect("event");
            assert_eq!(request.method(), Method::POST);
            assert!(request.uri().path().ends_with("/events"), "{}", request.uri());
            let event = body(request).await;
            assert_eq!(event["reason"], "MachineIdsReleased");
            assert!(event["note"].as_str().unwrap_or_default().contains("quarantined for 90s"), "{event}");
            respond(send, &event);
        });
        let mut eu = region("eu");
        eu.metadata.annotations = Some([(keyspace::RELEASE_ANNOTATION.to_owned(), "dc1".to_owned())].into());
        let action = cleanup(Arc::new(eu), &context).await.expect("cleanup");
        assert_eq!(action, Action::await_change());
        server.await.expect("server");
        assert!(context.metrics.encode().contains("parley_operator_writes_total{kind=\"status\"} 1"));
    }

    #[tokio::test]
    async fn a_region_whose_keyspace_cannot_be_checked_is_kept_with_a_condition_that_says_what_to_do() {
        let (context, mut handle) = mock();
        let stored = cluster(MachineIdAllocation::default());
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("get cluster");
            assert_eq!(request.method(), Method::GET);
            respond(send, &serde_json::to_value(&stored).expect("json"));

            let (request, send) = handle.next_request().await.expect("patch status");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(request.uri().path(), "/apis/parley.dev/v1alpha1/namespaces/ns/regions/eu/status");
            let patch = body(request).await;
            let condition = &patch["status"]["conditions"][0];
            assert_eq!(condition["type"], "DeletionBlocked");
            assert_eq!(condition["status"], "True");
            assert_eq!(condition["reason"], "CassandraUnavailable");
            let message = condition["message"].as_str().unwrap_or_default();
            assert!(message.contains("parley.dev/cassandra-release-datacenter: \"dc1\""), "{message}");
            respond(send, &serde_json::to_value(region("eu")).expect("json"));

            let (request, send) = handle.next_request().await.expect("event");
            let event = body(request).await;
            assert_eq!(
                (event["reason"].as_str(), event["type"].as_str()),
                (Some("CassandraUnavailable"), Some("Warning"))
            );
            respond(send, &event);
        });
        let error = cleanup(Arc::new(region("eu")), &context).await.expect_err("kept");
        server.await.expect("server");
        assert_eq!(error.reason(), "DeletionBlocked");
        assert!(!error.is_invalid_spec(), "retried with backoff");
    }

    #[tokio::test]
    async fn a_conflict_becomes_a_quick_retry() {
        let (context, mut handle) = mock();
        let clusters: Api<ChatCluster> = Api::namespaced(context.client.clone(), "ns");
        let stored = cluster(MachineIdAllocation::default());
        let server = tokio::spawn(async move {
            let (_request, send) = handle.next_request().await.expect("patch");
            send.send_response(
                Response::builder()
                    .status(409)
                    .body(Body::from(
                        serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "the object has been modified", "reason": "Conflict", "code": 409}))
                        .expect("json"),
                    ))
                    .expect("response"),
            );
        });
        let error = write_cluster_status(&clusters, &stored, &ChatClusterStatus::default(), &context)
            .await
            .expect_err("conflict");
        server.await.expect("server");
        assert_eq!(error.reason(), "Conflict");
        assert!(!error.is_invalid_spec());
        assert_eq!(backoff(1, &error), Duration::from_millis(100));
        assert_eq!(backoff(50, &error), Duration::from_secs(2));
        let transient = Error::Finalizer { message: "x".into() };
        assert_eq!(backoff(1, &transient), Duration::from_millis(500));
        assert_eq!(backoff(3, &transient), Duration::from_secs(2));
        assert_eq!(backoff(30, &transient), Duration::from_secs(60));
    }

    #[test]
    fn subset_comparison_ignores_server_defaults() {
        let wanted = json!({"spec": {"replicas": 2, "ports": [{"port": 80}], "empty": {}, "list": []}});
        let live =
            json!({"spec": {"replicas": 2, "ports": [{"port": 80, "protocol": "TCP"}], "extra": 1}, "status": {}});
        assert!(is_subset(&wanted, &live));
        assert!(!is_subset(&json!({"spec": {"replicas": 3}}), &live));
        assert!(!is_subset(&json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}}), &live));
        assert!(!is_subset(&json!({"metadata": {"labels": {"a": "b"}}}), &live));
        // A ConfigMap key the operator no longer sets is a difference.
        let config_map = json!({"metadata": {"name": "c"}, "data": {"A": "1", "B": "2"}});
        assert!(is_subset(&json!({"data": {"A": "1", "B": "2"}}), &config_map));
        assert!(!is_subset(&json!({"data": {"A": "1"}}), &config_map));
    }

    fn config_map(name: &str, controller_uid: Option<&str>) -> ConfigMap {
        let owners = controller_uid.map(|uid| {
            json!([{"apiVersion": "parley.dev/v1alpha1", "kind": "Region", "name": "eu", "uid": uid,
                    "controller": true}])
        });
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {REGION_LABEL: "eu"}, "ownerReferences": owners}
        }))
        .expect("config map")
    }

    #[test]
    fn the_single_config_map_of_earlier_versions_is_an_orphan() {
        let desired =
            vec![config_map("eu-gateway-config", Some("uid-eu")), config_map("eu-router-config", Some("uid-eu"))];
        let live = vec![
            config_map("eu-config", Some("uid-eu")),
            config_map("eu-gateway-config", Some("uid-eu")),
            config_map("eu-router-config", Some("uid-eu")),
            config_map("eu-labelled-by-hand", None),
            config_map("eu-of-another-owner", Some("uid-other")),
        ];
        assert_eq!(orphans(&live, &desired, "uid-eu"), ["eu-config"]);
        assert!(orphans(&desired, &desired, "uid-eu").is_empty());
    }

    #[test]
    fn orphan_config_maps_wait_for_both_rollouts() {
        let set = |generation: i64, observed: i64, ready: i32, updated: i32| -> StatefulSet {
            serde_json::from_value(json!({
                "metadata": {"name": "s", "generation": generation},
                "spec": {"replicas": 2, "serviceName": "s", "selector": {}, "template": {}},
                "status": {"replicas": 2, "observedGeneration": observed, "readyReplicas": ready,
                           "updatedReplicas": updated}
            }))
            .expect("stateful set")
        };
        let done = set(3, 3, 2, 2);
        assert!(config_map_orphans_deletable(&done, &done));
        // Just applied with a new template: the StatefulSet controller has not seen it yet.
        assert!(!config_map_orphans_deletable(&set(4, 3, 2, 2), &done));
        // Rolling: a pod still runs the previous template.
        assert!(!config_map_orphans_deletable(&done, &set(3, 3, 2, 1)));
        // A pod is not ready (it may be restarting).
        assert!(!config_map_orphans_deletable(&done, &set(3, 3, 1, 2)));
    }

    #[test]
    fn replacing_patch_nulls_dropped_keys() {
        let patch = replacing_patch(&json!({"a": 1, "b": 2}), &json!({"a": 3}));
        assert_eq!(patch, json!({"a": 3, "b": null}));
        let nested = replacing_patch(
            &json!({"rollout": {"phase": "Draining", "draining": {"pod": "eu-gateway-2"}}}),
            &json!({"rollout": {"phase": "Idle"}}),
        );
        assert_eq!(nested, json!({"rollout": {"phase": "Idle", "draining": null}}));
    }

    fn validated(name: &str) -> ValidatedRegion {
        let mut cluster = cluster(MachineIdAllocation::default());
        cluster.status = None;
        let region = region(name);
        let owner = region.controller_owner_ref(&()).expect("owner");
        ValidatedRegion {
            region,
            cluster,
            name: name.to_owned(),
            namespace: "ns".to_owned(),
            cluster_name: "chat".to_owned(),
            owner,
            kafka_bootstrap_servers: "kafka:9092".to_owned(),
            redis_url: "redis://redis:6379".to_owned(),
            redis_tls: false,
            peers: Vec::new(),
        }
    }

    fn status_response(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, reason: &str, message: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                            "reason": reason, "code": code});
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&status).expect("json")))
                .expect("response"),
        );
    }

    #[tokio::test]
    async fn the_token_secret_is_created_once_and_then_not_asked_for() {
        let (context, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("create");
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), "/api/v1/namespaces/ns/secrets");
            assert!(request.uri().query().unwrap_or_default().contains("fieldManager=parley-operator"));
            let secret = body(request).await;
            assert_eq!(secret["metadata"]["name"], "eu-internal-token");
            assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-eu");
            assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
            assert_eq!(secret["immutable"], true);
            // 43 characters of base64url, base64-encoded again as Secret data.
            assert_eq!(secret["data"]["token"].as_str().map(str::len), Some(60), "{secret}");
            respond(send, &secret);
        });
        ensure_internal_token(&validated("eu"), &context).await.expect("created");
        server.await.expect("server");
        assert!(context.metrics.encode().contains("parley_operator_writes_total{kind=\"create\"} 1"));
        // Known to exist: no request at all (the mock would wait forever for a response).
        tokio::time::timeout(Duration::from_secs(1), ensure_internal_token(&validated("eu"), &context))
            .await
            .expect("no request made")
            .expect("ok");
    }

    #[tokio::test]
    async fn an_existing_token_secret_is_kept() {
        let (context, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("create");
            assert_eq!(request.method(), Method::POST);
            status_response(send, 409, "AlreadyExists", "secrets \"eu-internal-token\" already exists");
        });
        ensure_internal_token(&validated("eu"), &context).await.expect("an existing Secret is fine");
        server.await.expect("server");
        assert!(!context.metrics.encode().contains("kind=\"create\""), "nothing was written");
    }

    #[tokio::test]
    async fn a_refused_create_is_reported_and_asked_again() {
        let (context, mut handle) = mock();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (request, send) = handle.next_request().await.expect("create");
                assert_eq!(request.method(), Method::POST);
                status_response(send, 403, "Forbidden", "secrets is forbidden: User \"x\" cannot create resource");
            }
        });
        let error = ensure_internal_token(&validated("eu"), &context).await.expect_err("forbidden");
        assert_eq!(error.reason(), "InternalTokenSecretFailed");
        assert!(!error.is_invalid_spec(), "retried with backoff");
        assert_eq!(
            error.to_string(),
            "region eu has no internal token: creating Secret ns/eu-internal-token failed: secrets is forbidden: \
             User \"x\" cannot create resource (HTTP 403)"
        );
        // Not remembered: the next reconcile tries again.
        ensure_internal_token(&validated("eu"), &context).await.expect_err("still forbidden");
        server.await.expect("server");
    }
}
