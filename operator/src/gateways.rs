//! The effects of the gateways' rollout and scaling ([`crate::rollout`] decides): reading the gateway StatefulSet
//! and its pods before the Region's objects are applied, and afterwards asking pods to drain (the pod annotation
//! `parley.dev/drain`), deleting drained pods, pausing a rollout whose resumes fail, and the Events and metrics of
//! each step. The operator never calls a pod: the drain request and the connection counts travel through the
//! Kubernetes API (see the gateway's pod agent).

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use parley_crds::common::{DRAIN_ANNOTATION, ROLLOUT_PAUSED_ANNOTATION};
use parley_crds::region::ScalingStatus;
use parley_crds::Region;
use tracing::{info, info_span, Instrument};

use crate::build::{object_name, selector_labels, Component, RegionResources, POD_MANAGEMENT_POLICY};
use crate::controller::Context;
use crate::error::Error;
use crate::rollout::{self, Decision, GatewayPod, Input, Live, PodAction, ScaleInput, Settings};
use crate::validate::ValidatedRegion;

/// How soon a Region is looked at again while a rollout or scale step is under way.
pub const STEP_REQUEUE: Duration = Duration::from_secs(2);
/// How often a Region with connection-based scaling reads its gateways' connections.
pub const SCALING_REQUEUE: Duration = Duration::from_secs(10);

/// What [`prepare`] decided, for [`carry_out`] and the status.
#[derive(Debug)]
pub struct Step {
    /// The rollout's decision.
    pub decision: Decision,
    /// The scaling's status, when the Region scales by connections.
    pub scaling: Option<ScalingStatus>,
    /// The connections the gateways reported, summed.
    pub connections: Option<i64>,
}

impl Step {
    /// When to look at the Region again, if sooner than the resync.
    pub fn requeue(&self) -> Option<Duration> {
        if self.decision.busy {
            Some(STEP_REQUEUE)
        } else if self.scaling.is_some() {
            Some(SCALING_REQUEUE)
        } else {
            None
        }
    }
}

/// Whether the Region's rollout is paused by its annotation.
pub fn paused(region: &Region) -> bool {
    region.annotations().get(ROLLOUT_PAUSED_ANNOTATION).is_some_and(|value| value == "true")
}

/// Reads the gateway StatefulSet and its pods, decides the gateway count and the next rollout step, and sets the
/// count in `resources` (the only part of the built objects that depends on what runs). A StatefulSet whose
/// immutable `podManagementPolicy` differs from [`POD_MANAGEMENT_POLICY`] is deleted with its pods orphaned, so
/// the apply recreates it and it adopts them.
pub async fn prepare(
    validated: &ValidatedRegion,
    region: &Region,
    resources: &mut RegionResources,
    context: &Context,
) -> Result<Step, Error> {
    let namespace = &validated.namespace;
    let stateful_sets: Api<StatefulSet> = Api::namespaced(context.client.clone(), namespace);
    for component in [Component::Gateway, Component::Router] {
        let name = object_name(&validated.name, component);
        let live = stateful_sets
            .get_opt(&name)
            .await
            .map_err(|source| Error::kube(format!("get StatefulSet {namespace}/{name}"), source))?;
        let policy =
            live.as_ref().and_then(|set| set.spec.as_ref()).and_then(|spec| spec.pod_management_policy.clone());
        if live.is_some() && policy.as_deref() != Some(POD_MANAGEMENT_POLICY) {
            info!(stateful_set = %name, ?policy, "recreating the StatefulSet for its pod management policy, pods kept");
            let params =
                DeleteParams { propagation_policy: Some(PropagationPolicy::Orphan), ..DeleteParams::default() };
            stateful_sets
                .delete(&name, &params)
                .await
                .map_err(|source| Error::kube(format!("delete StatefulSet {namespace}/{name} (orphaning)"), source))?;
            context.metrics.wrote("delete");
        }
    }
    let gateway_set = object_name(&validated.name, Component::Gateway);
    let live = stateful_sets
        .get_opt(&gateway_set)
        .await
        .map_err(|source| Error::kube(format!("get StatefulSet {namespace}/{gateway_set}"), source))?
        .filter(|set| set.metadata.deletion_timestamp.is_none());
    let selector = selector_labels(validated, Component::Gateway)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), namespace);
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::kube(format!("list the gateway pods of {namespace}/{}", validated.name), source))?;
    let pods: Vec<GatewayPod> = pods.items.iter().filter_map(|pod| GatewayPod::of(pod, &gateway_set)).collect();
    let connections = rollout::connections(&pods);
    let now = Timestamp::now();
    let live = live.as_ref().map(Live::of);
    let gateway = &validated.region.spec.gateway;
    let previous = region.status.as_ref();
    let scaling = gateway.autoscaled_range().map(|(min, max)| {
        let previous = previous.and_then(|status| status.scaling.as_ref());
        let current =
            previous.map(|scaling| scaling.desired).or(live.as_ref().map(|live| live.replicas)).unwrap_or(min);
        let mut status = rollout::scale(&ScaleInput {
            current,
            min,
            max,
            connections,
            target: i64::from(validated.cluster.spec.gateway.connections_per_pod_target),
            tolerance_percent: i64::from(gateway.scale_tolerance_percent),
            up_cooldown: seconds(gateway.scale_up_cooldown_seconds),
            down_cooldown: seconds(gateway.scale_down_cooldown_seconds),
            last_scale: previous.and_then(|scaling| scaling.last_scale_time.as_deref()).and_then(|at| at.parse().ok()),
            now,
        });
        status.current = live.as_ref().map_or(0, |live| live.replicas);
        status
    });
    let desired = scaling.as_ref().map_or_else(|| gateway.desired_replicas(), |scaling| scaling.desired);
    let rollout_spec = &validated.region.spec.rollout;
    let settings = Settings {
        max_in_flight: usize::try_from(rollout_spec.max_in_flight).unwrap_or(1).max(1),
        drained_connections: i64::from(rollout_spec.drained_connections),
        room_percent: i64::from(rollout_spec.room_percent),
        min_resume_percent: i64::from(rollout_spec.min_resume_percent),
        drain_deadline: Duration::from_millis(
            u64::try_from(validated.cluster.spec.gateway.drain_deadline_ms).unwrap_or_default(),
        ),
        paused: paused(region),
    };
    let decision = rollout::decide(&Input {
        live,
        pods: &pods,
        desired,
        settings,
        previous: previous.and_then(|status| status.rollout.as_ref()),
        now,
    });
    if let Some(spec) = resources.gateway_stateful_set.spec.as_mut() {
        spec.replicas = Some(decision.replicas);
    }
    let labels = vec![("region", validated.name.clone())];
    context.metrics.gateways_desired.get_or_create(&labels).set(i64::from(desired));
    context.metrics.gateway_connections.get_or_create(&labels).set(connections.unwrap_or(0));
    Ok(Step { decision, scaling, connections })
}

fn seconds(value: i32) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or_default())
}

/// Carries out the step's pod actions, the pause and the Events, after the Region's objects were applied.
pub async fn carry_out(
    validated: &ValidatedRegion,
    region: &Region,
    step: &Step,
    context: &Context,
) -> Result<(), Error> {
    let namespace = &validated.namespace;
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), namespace);
    let labels = |outcome: &str| vec![("region", validated.name.clone()), ("outcome", outcome.to_owned())];
    for action in &step.decision.actions {
        match action {
            PodAction::Drain(pod) => {
                let patch =
                    serde_json::json!({"metadata": {"annotations": {DRAIN_ANNOTATION: Timestamp::now().to_string()}}});
                pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                    .instrument(info_span!("drain", %pod))
                    .await
                    .map_err(|source| Error::kube(format!("annotate pod {namespace}/{pod} to drain"), source))?;
                context.metrics.wrote("patch");
                context.metrics.rollout_steps.get_or_create(&labels("drain")).inc();
            }
            PodAction::Delete(pod) => {
                match pods.delete(pod, &DeleteParams::default()).instrument(info_span!("replace", %pod)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(response)) if response.code == 404 => {}
                    Err(source) => return Err(Error::kube(format!("delete drained pod {namespace}/{pod}"), source)),
                }
                context.metrics.wrote("delete");
                context.metrics.rollout_steps.get_or_create(&labels("replace")).inc();
            }
        }
    }
    let current = step.decision.replicas;
    for note in &step.decision.notes {
        match note.reason {
            "GatewayRemoved" => context.metrics.rollout_steps.get_or_create(&labels("remove")).inc(),
            "GatewaysAdded" => context.metrics.rollout_steps.get_or_create(&labels("add")).inc(),
            _ => 0,
        };
        let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
        crate::controller::publish(context, region, type_, note.reason, note.message.clone()).await;
    }
    if step.decision.pause {
        let regions: Api<Region> = Api::namespaced(context.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {ROLLOUT_PAUSED_ANNOTATION: "true"}}});
        regions.patch(&validated.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|source| {
            Error::kube(format!("pause the rollout of Region {namespace}/{}", validated.name), source)
        })?;
        context.metrics.wrote("patch");
        context.metrics.rollout_steps.get_or_create(&labels("paused")).inc();
    }
    if !step.decision.actions.is_empty() {
        info!(replicas = current, actions = ?step.decision.actions, phase = %step.decision.status.phase, "gateway rollout step");
    }
    Ok(())
}
