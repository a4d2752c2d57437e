//! The gateways' rollout and scaling, as the operator drives them. Pure: the controller reads the gateway
//! StatefulSet and its pods, calls [`decide`] and [`scale`], and carries out what they return.
//!
//! The gateway StatefulSet uses `OrderedReady` pod management and the `OnDelete` update strategy, so the
//! StatefulSet controller never replaces or removes a gateway on its own initiative: a new template only changes
//! the StatefulSet's update revision. The operator then, one pod at a time (`rollout.maxInFlight`), highest
//! ordinal first:
//!
//! 1. checks that the other ready gateways have room (each below `rollout.roomPercent` of its `maxConnections`);
//! 2. asks the pod to drain through the Kubernetes API: the pod annotation `parley.dev/drain`, which the gateway's
//!    pod agent watches on its own pod. The gateway spreads its clients' reconnects over the drain window and then
//!    stays up, not ready, with no connections;
//! 3. waits until the pod reports (its `parley.dev/gateway-status` annotation) at most `rollout.drainedConnections`
//!    connections, or until the drain deadline has passed since the request;
//! 4. deletes the pod; the StatefulSet controller recreates it on the update revision;
//! 5. waits until the new pod is ready and reports that it takes connections, then measures the share of resume
//!    requests that succeeded on the gateways during the step (their resume counters). Below
//!    `rollout.minResumePercent` it pauses the rollout.
//!
//! Scale-down drains the highest ordinal the same way and then lowers `spec.replicas` by one; scale-up raises it at
//! once. The Region annotation `parley.dev/rollout-paused` holds every new step.
//!
//! [`scale`] computes the gateway count from the connections the pods report, against the ChatCluster's
//! `gateway.connectionsPerPodTarget`, with a tolerance band and separate cool-downs for adding and removing pods.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use parley_crds::common::{DRAIN_ANNOTATION, GATEWAY_STATUS_ANNOTATION};
use parley_crds::region::{DrainingPod, ResumeCounts, RolloutStatus, ScalingStatus};
use serde::Deserialize;

/// Time added to the drain deadline before the operator stops waiting for a pod's connections to leave (the
/// gateway closes what is left at its deadline, and reports it within its status interval).
pub const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// What a gateway reports on its own pod (`parley.dev/gateway-status`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    /// Connections it holds.
    pub connections: i64,
    /// Its connection limit.
    pub max_connections: i64,
    /// Whether it drains.
    pub draining: bool,
    /// Resume requests it served that replayed.
    pub resumed: i64,
    /// Resume requests that failed.
    pub resume_failed: i64,
    /// When it wrote the report.
    pub at: Timestamp,
}

impl GatewayReport {
    /// Parses the annotation's value; `None` when it is not a report.
    pub fn parse(value: &str) -> Option<GatewayReport> {
        serde_json::from_str(value).ok()
    }
}

/// A gateway pod as the rollout sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPod {
    /// The pod's name.
    pub name: String,
    /// Its StatefulSet ordinal.
    pub ordinal: i32,
    /// Its `controller-revision-hash` label.
    pub revision: Option<String>,
    /// Whether its Ready condition holds.
    pub ready: bool,
    /// Whether it is being deleted.
    pub terminating: bool,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// When it was asked to drain (`parley.dev/drain`).
    pub drain_requested: Option<Timestamp>,
    /// Its last report.
    pub report: Option<GatewayReport>,
}

impl GatewayPod {
    /// Reads a pod of the StatefulSet `stateful_set`; `None` when its name carries no ordinal of it.
    pub fn of(pod: &Pod, stateful_set: &str) -> Option<GatewayPod> {
        let name = pod.metadata.name.clone()?;
        let ordinal = name.strip_prefix(stateful_set)?.strip_prefix('-')?.parse::<i32>().ok()?;
        let annotations = pod.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|annotations| annotations.get(key));
        let ready = pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(GatewayPod {
            name,
            ordinal,
            revision: pod.metadata.labels.as_ref().and_then(|labels| labels.get("controller-revision-hash")).cloned(),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            created: pod.metadata.creation_timestamp.as_ref().map(|time| time.0),
            drain_requested: annotation(DRAIN_ANNOTATION).map(|value| value.parse().unwrap_or(Timestamp::UNIX_EPOCH)),
            report: annotation(GATEWAY_STATUS_ANNOTATION).and_then(|value| GatewayReport::parse(value)),
        })
    }

    /// Whether it takes connections: ready, and its last report, written since it started, says it is not
    /// draining.
    fn accepting(&self) -> bool {
        let reported_since_start = match (&self.report, self.created) {
            (Some(report), Some(created)) => report.at.as_second() >= created.as_second(),
            (Some(_), None) => true,
            (None, _) => false,
        };
        self.ready && reported_since_start && self.report.as_ref().is_some_and(|report| !report.draining)
    }
}

/// The gateway StatefulSet as the API server last reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// `spec.replicas`.
    pub replicas: i32,
    /// `status.updateRevision`.
    pub update_revision: Option<String>,
    /// `status.currentRevision`.
    pub current_revision: Option<String>,
}

impl Live {
    /// Reads a StatefulSet.
    pub fn of(stateful_set: &StatefulSet) -> Live {
        let status = stateful_set.status.as_ref();
        Live {
            replicas: stateful_set.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1),
            update_revision: status.and_then(|status| status.update_revision.clone()),
            current_revision: status.and_then(|status| status.current_revision.clone()),
        }
    }
}

/// The Region's rollout settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Pods drained or replaced at once.
    pub max_in_flight: usize,
    /// A draining pod is done at this many connections or fewer.
    pub drained_connections: i64,
    /// The other pods must be below this share of their limit, in percent.
    pub room_percent: i64,
    /// The least share of resumes that must succeed in a step, in percent.
    pub min_resume_percent: i64,
    /// The gateways' drain deadline.
    pub drain_deadline: Duration,
    /// Whether the Region's `parley.dev/rollout-paused` annotation holds new steps.
    pub paused: bool,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The StatefulSet, when it exists.
    pub live: Option<Live>,
    /// Its pods.
    pub pods: &'a [GatewayPod],
    /// The gateway count wanted (the spec's, or the scaling's).
    pub desired: i32,
    /// The settings.
    pub settings: Settings,
    /// The rollout status stored last time.
    pub previous: Option<&'a RolloutStatus>,
    /// Now.
    pub now: Timestamp,
}

/// A change to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Set `parley.dev/drain` on it.
    Drain(String),
    /// Delete it: the StatefulSet controller recreates it on the update revision.
    Delete(String),
}

/// An Event for the Region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning rather than Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

/// What the operator does next.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The StatefulSet's `spec.replicas`.
    pub replicas: i32,
    /// Changes to pods.
    pub actions: Vec<PodAction>,
    /// The new rollout status.
    pub status: RolloutStatus,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// The resumes of the step just finished failed too often: pause the rollout.
    pub pause: bool,
    /// A step is under way or waiting: look again soon.
    pub busy: bool,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn since(then: Timestamp, now: Timestamp) -> i64 {
    now.as_millisecond().saturating_sub(then.as_millisecond())
}

fn drain_done(pod: &GatewayPod, settings: &Settings, now: Timestamp) -> bool {
    let Some(requested) = pod.drain_requested else { return false };
    let emptied = pod.report.as_ref().is_some_and(|report| {
        report.draining
            && report.at.as_second() >= requested.as_second()
            && report.connections <= settings.drained_connections
    });
    emptied || since(requested, now) >= millis(settings.drain_deadline) + millis(DRAIN_MARGIN)
}

/// The resume totals of `pods` (absent reports count nothing).
pub fn resume_totals<'a>(pods: impl Iterator<Item = &'a GatewayPod>) -> ResumeCounts {
    pods.filter_map(|pod| pod.report.as_ref()).fold(ResumeCounts::default(), |total, report| ResumeCounts {
        resumed: total.resumed + report.resumed,
        failed: total.failed + report.resume_failed,
    })
}

/// The connections the gateways reported, summed; `None` when none reported.
pub fn connections(pods: &[GatewayPod]) -> Option<i64> {
    let reports: Vec<&GatewayReport> = pods.iter().filter_map(|pod| pod.report.as_ref()).collect();
    (!reports.is_empty()).then(|| reports.iter().map(|report| report.connections).sum())
}

/// Decides the next step of the gateways' rollout or scale change.
pub fn decide(input: &Input<'_>) -> Decision {
    let settings = &input.settings;
    let now = input.now;
    let desired = input.desired.max(0);
    let Some(live) = &input.live else {
        let status = RolloutStatus {
            total: desired,
            phase: "Idle".to_owned(),
            paused: settings.paused,
            message: "creating the gateways".to_owned(),
            ..RolloutStatus::default()
        };
        return Decision {
            replicas: desired,
            actions: Vec::new(),
            status,
            notes: Vec::new(),
            pause: false,
            busy: false,
        };
    };
    let current = live.replicas;
    let update = live.update_revision.as_deref();
    let by_ordinal: BTreeMap<i32, &GatewayPod> = input.pods.iter().map(|pod| (pod.ordinal, pod)).collect();
    let outdated =
        |pod: &GatewayPod| update.is_some_and(|update| pod.revision.as_deref() != Some(update)) && !pod.terminating;

    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let mut replicas = current;

    // Pods whose drain is over: the top one of a scale-down goes with the replica count, the others are replaced.
    let mut finished = Vec::new();
    for pod in input.pods.iter().filter(|pod| pod.drain_requested.is_some() && !pod.terminating) {
        if !drain_done(pod, settings, now) {
            continue;
        }
        let left = pod.report.as_ref().map_or(0, |report| report.connections);
        if desired < current && pod.ordinal == current - 1 && replicas == current {
            replicas = current - 1;
            notes.push(Note {
                warning: false,
                reason: "GatewayRemoved",
                message: format!(
                    "{} drained ({left} connections left), removing it: {current} → {replicas} gateways",
                    pod.name
                ),
            });
        } else if pod.ordinal < current {
            actions.push(PodAction::Delete(pod.name.clone()));
            let why = if outdated(pod) { "to roll it to the new revision" } else { "to restart it" };
            notes.push(Note {
                warning: false,
                reason: "GatewayReplaced",
                message: format!("{} drained ({left} connections left), deleting it {why}", pod.name),
            });
        }
        finished.push(pod.name.clone());
    }

    // Scale-up is immediate: the new pods start on the update revision.
    if desired > current {
        replicas = desired;
        notes.push(Note {
            warning: false,
            reason: "GatewaysAdded",
            message: format!("{current} → {desired} gateways"),
        });
    }

    // Pods in flight: draining, going, missing, starting, or not yet taking connections.
    let draining: Vec<&GatewayPod> = input
        .pods
        .iter()
        .filter(|pod| pod.drain_requested.is_some() && !pod.terminating && !finished.contains(&pod.name))
        .collect();
    let mut in_flight = draining.len() + finished.len();
    // Ready pods that have not reported since they started hold the next step, but alone they are no motion.
    let mut unreported = 0;
    let mut waiting_on = None;
    for ordinal in 0..current.min(replicas) {
        let why = match by_ordinal.get(&ordinal) {
            None => Some(format!("pod {ordinal} to be created")),
            Some(pod) if pod.terminating => Some(format!("{} to go", pod.name)),
            Some(pod) if pod.drain_requested.is_some() => None,
            Some(pod) if !pod.ready => Some(format!("{} to be ready", pod.name)),
            Some(pod) if !pod.accepting() => {
                unreported += 1;
                Some(format!("{} to report that it takes connections", pod.name))
            }
            Some(_) => None,
        };
        if let Some(why) = why {
            in_flight += 1;
            waiting_on.get_or_insert(why);
        }
    }
    in_flight += input.pods.iter().filter(|pod| pod.ordinal >= current && pod.terminating).count();

    // What is left to do.
    let pending_outdated: Vec<&GatewayPod> = {
        let mut pods: Vec<&GatewayPod> = input
            .pods
            .iter()
            .filter(|pod| pod.ordinal < replicas && outdated(pod) && pod.drain_requested.is_none())
            .collect();
        pods.sort_by_key(|pod| std::cmp::Reverse(pod.ordinal));
        pods
    };
    let scale_down = desired < replicas;
    let pending = scale_down || !pending_outdated.is_empty();

    let mut baseline = input.previous.and_then(|previous| previous.resume_baseline);
    let mut last_resume_rate = input.previous.and_then(|previous| previous.last_resume_rate);
    let mut pause = false;
    // A step is over when nothing is in flight any more: measure its resumes.
    if in_flight == 0 && actions.is_empty() && replicas == current {
        if let Some(start) = baseline.take() {
            let now_totals = resume_totals(input.pods.iter());
            let resumed = (now_totals.resumed - start.resumed).max(0);
            let failed = (now_totals.failed - start.failed).max(0);
            if resumed + failed > 0 {
                let rate = resumed as f64 / (resumed + failed) as f64;
                last_resume_rate = Some(rate);
                if rate * 100.0 < settings.min_resume_percent as f64 {
                    pause = true;
                    notes.push(Note {
                        warning: true,
                        reason: "ResumesFailing",
                        message: format!(
                            "only {:.1} % of the {} resumes of the last step succeeded (at least {} % wanted): rollout \
                             paused; resume it with `kubectl parley rollout resume` once the cause is fixed",
                            rate * 100.0,
                            resumed + failed,
                            settings.min_resume_percent
                        ),
                    });
                }
            }
        }
    }

    // New drains, while there is room for them.
    let mut waiting_for = None;
    let mut drains = Vec::new();
    if pending && !settings.paused && !pause {
        let candidates: Vec<&GatewayPod> = if scale_down {
            // One removal at a time, the highest ordinal, once nothing else moves.
            match by_ordinal.get(&(replicas - 1)) {
                Some(pod) if in_flight == 0 && pod.drain_requested.is_none() && !pod.terminating => vec![*pod],
                _ => Vec::new(),
            }
        } else {
            pending_outdated.clone()
        };
        for pod in candidates {
            if in_flight >= settings.max_in_flight {
                break;
            }
            let crowded = input.pods.iter().find(|other| {
                other.name != pod.name
                    && other.drain_requested.is_none()
                    && other.accepting()
                    && other.report.as_ref().is_some_and(|report| {
                        report.max_connections > 0
                            && report.connections * 100 >= settings.room_percent * report.max_connections
                    })
            });
            if let Some(crowded) = crowded {
                let report = crowded.report.as_ref().map(|report| (report.connections, report.max_connections));
                let (held, max) = report.unwrap_or_default();
                waiting_for = Some(format!(
                    "{} waits: {} holds {held} of {max} connections (at least {} %), no room for {}'s clients",
                    pod.name, crowded.name, settings.room_percent, pod.name
                ));
                break;
            }
            if baseline.is_none() {
                baseline = Some(resume_totals(
                    input.pods.iter().filter(|other| other.drain_requested.is_none() && other.name != pod.name),
                ));
            }
            actions.push(PodAction::Drain(pod.name.clone()));
            drains.push(pod);
            in_flight += 1;
            let why = if scale_down {
                format!("to remove it ({replicas} → {} gateways)", replicas - 1)
            } else {
                "to roll it to the new revision".to_owned()
            };
            notes.push(Note {
                warning: false,
                reason: "GatewayDraining",
                message: format!(
                    "draining {} ({} connections) {why}",
                    pod.name,
                    pod.report.as_ref().map_or(0, |report| report.connections)
                ),
            });
        }
    }

    // Status.
    let updated = input
        .pods
        .iter()
        .filter(|pod| pod.ordinal < replicas.min(desired) && !pod.terminating && !outdated(pod) && update.is_some())
        .count();
    let updated = i32::try_from(updated).unwrap_or(i32::MAX);
    let draining_now = draining
        .first()
        .map(|pod| DrainingPod {
            pod: pod.name.clone(),
            connections: pod.report.as_ref().map_or(0, |report| report.connections),
            since: pod.drain_requested.unwrap_or(now).to_string(),
        })
        .or_else(|| {
            drains.first().map(|pod| DrainingPod {
                pod: pod.name.clone(),
                connections: pod.report.as_ref().map_or(0, |report| report.connections),
                since: now.to_string(),
            })
        });
    let moving = in_flight - unreported > 0 || !actions.is_empty() || replicas != current;
    let (phase, message) = if let Some(pod) = &draining_now {
        ("Draining", format!("draining {}: {} connections left", pod.pod, pod.connections))
    } else if moving || (pending && in_flight > 0) {
        let what = waiting_on.unwrap_or_else(|| "the gateways to be ready and take connections".to_owned());
        ("Replacing", format!("waiting for {what}"))
    } else if pending && (settings.paused || pause) {
        ("Paused", format!("paused with {} of {desired} gateways updated", updated.min(desired)))
    } else if let Some(waiting) = waiting_for {
        ("Waiting", waiting)
    } else if pending {
        ("Waiting", "waiting for the next step".to_owned())
    } else {
        ("Idle", format!("{updated} of {desired} gateways on the current revision"))
    };
    let status = RolloutStatus {
        update_revision: live.update_revision.clone().unwrap_or_default(),
        current_revision: live.current_revision.clone().unwrap_or_default(),
        updated,
        total: desired,
        phase: phase.to_owned(),
        draining: draining_now,
        last_resume_rate,
        paused: settings.paused || pause,
        resume_baseline: baseline,
        message,
    };
    let held = settings.paused || pause;
    Decision { replicas, actions, status, notes, pause, busy: moving || (pending && !held) }
}

/// The connection-based scaling's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleInput {
    /// The gateway count wanted so far (the last decision, or the StatefulSet's replicas).
    pub current: i32,
    /// `gateway.minReplicas`.
    pub min: i32,
    /// `gateway.maxReplicas`.
    pub max: i32,
    /// The connections the gateways reported, summed; `None` when none reported.
    pub connections: Option<i64>,
    /// Connections per pod aimed at.
    pub target: i64,
    /// The tolerance band, in percent.
    pub tolerance_percent: i64,
    /// Wait after a change before adding pods.
    pub up_cooldown: Duration,
    /// Wait after a change before removing pods.
    pub down_cooldown: Duration,
    /// When the count last changed.
    pub last_scale: Option<Timestamp>,
    /// Now.
    pub now: Timestamp,
}

/// Decides the gateway count from the connections: `ceil(connections / target)` within `[min, max]`, changed only
/// outside the tolerance band and after the cool-down. Returns the status to store (its `desired` is the count).
pub fn scale(input: &ScaleInput) -> ScalingStatus {
    let min = input.min.max(1);
    let max = input.max.max(min);
    let base = input.current.clamp(min, max);
    let target = input.target.max(1);
    let status = |desired: i32, reason: String, changed: bool| ScalingStatus {
        current: input.current,
        desired,
        min,
        max,
        target_connections_per_pod: target,
        connections: input.connections.unwrap_or(0),
        reason,
        last_scale_time: if changed { Some(input.now.to_string()) } else { input.last_scale.map(|at| at.to_string()) },
    };
    if base != input.current {
        return status(base, format!("{} gateways is outside {min}-{max}", input.current), true);
    }
    let Some(connections) = input.connections else {
        return status(base, "no gateway has reported its connections yet".to_owned(), false);
    };
    let wanted = i32::try_from((connections + target - 1) / target).unwrap_or(i32::MAX).clamp(min, max);
    let capacity = i64::from(base) * target;
    let cooled = |cooldown: Duration| match input.last_scale {
        Some(at) => since(at, input.now) >= millis(cooldown),
        None => true,
    };
    let per_pod = connections / i64::from(base.max(1));
    if wanted > base && connections * 100 > capacity * (100 + input.tolerance_percent) {
        if cooled(input.up_cooldown) {
            return status(
                wanted,
                format!("{connections} connections, {per_pod} per pod over the target {target}: {base} → {wanted}"),
                true,
            );
        }
        return status(
            base,
            format!("{connections} connections call for {wanted} gateways; cooling down after the last change"),
            false,
        );
    }
    if wanted < base && connections * 100 < capacity * (100 - input.tolerance_percent) {
        if cooled(input.down_cooldown) {
            return status(
                wanted,
                format!("{connections} connections, {per_pod} per pod under the target {target}: {base} → {wanted}"),
                true,
            );
        }
        return status(
            base,
            format!("{connections} connections call for {wanted} gateways; cooling down after the last change"),
            false,
        );
    }
    status(
        base,
        format!(
            "{connections} connections, {per_pod} per pod, within {}% of the target {target}",
            input.tolerance_percent
        ),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("test value")
    }

    fn report(connections: i64, draining: bool, time: i64) -> GatewayReport {
        GatewayReport { connections, max_connections: 1000, draining, resumed: 0, resume_failed: 0, at: at(time) }
    }

    fn pod(ordinal: i32, revision: &str) -> GatewayPod {
        GatewayPod {
            name: format!("eu-gateway-{ordinal}"),
            ordinal,
            revision: Some(revision.to_owned()),
            ready: true,
            terminating: false,
            created: Some(at(0)),
            drain_requested: None,
            report: Some(report(100, false, 10)),
        }
    }

    fn settings() -> Settings {
        Settings {
            max_in_flight: 1,
            drained_connections: 0,
            room_percent: 90,
            min_resume_percent: 95,
            drain_deadline: Duration::from_secs(60),
            paused: false,
        }
    }

    fn live(replicas: i32, update: &str) -> Live {
        Live { replicas, update_revision: Some(update.to_owned()), current_revision: Some("old".to_owned()) }
    }

    fn input<'a>(pods: &'a [GatewayPod], replicas: i32, desired: i32, now: i64) -> Input<'a> {
        Input { live: Some(live(replicas, "new")), pods, desired, settings: settings(), previous: None, now: at(now) }
    }

    #[test]
    fn a_new_revision_drains_the_highest_pod_first_and_one_at_a_time() {
        let pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "old")];
        let decision = decide(&input(&pods, 3, 3, 20));
        assert_eq!(decision.actions, vec![PodAction::Drain("eu-gateway-2".to_owned())]);
        assert_eq!(decision.replicas, 3);
        assert_eq!(decision.status.phase, "Draining");
        assert_eq!(decision.status.updated, 0);
        assert!(decision.busy);
        assert!(decision.status.resume_baseline.is_some());
    }

    #[test]
    fn a_draining_pod_is_deleted_once_empty_or_past_the_deadline() {
        let mut pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "old")];
        pods[2].drain_requested = Some(at(20));
        pods[2].report = Some(report(40, true, 25));
        let decision = decide(&input(&pods, 3, 3, 26));
        assert!(decision.actions.is_empty(), "{:?}", decision.actions);
        assert_eq!(decision.status.phase, "Draining");
        assert_eq!(decision.status.draining.as_ref().map(|d| d.connections), Some(40));

        pods[2].report = Some(report(0, true, 30));
        let decision = decide(&input(&pods, 3, 3, 31));
        assert_eq!(decision.actions, vec![PodAction::Delete("eu-gateway-2".to_owned())]);

        pods[2].report = Some(report(3, true, 30));
        let decision = decide(&input(&pods, 3, 3, 20 + 65));
        assert_eq!(decision.actions, vec![PodAction::Delete("eu-gateway-2".to_owned())], "deadline + margin passed");
    }

    #[test]
    fn a_deleted_drained_pod_holds_the_next_step_until_its_successor_is_back() {
        let mut pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "old")];
        pods[2].drain_requested = Some(at(20));
        pods[2].report = Some(report(0, true, 30));
        pods[2].terminating = true;
        let decision = decide(&input(&pods, 3, 3, 31));
        assert!(decision.actions.is_empty(), "{:?}", decision.actions);
        assert_eq!(decision.status.phase, "Replacing");
        pods.pop();
        let decision = decide(&input(&pods, 3, 3, 32));
        assert!(decision.actions.is_empty(), "the successor is not there yet: {:?}", decision.actions);
    }

    #[test]
    fn the_next_pod_waits_until_the_replacement_takes_connections() {
        let mut pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "new")];
        pods[2].created = Some(at(40));
        pods[2].report = Some(report(0, false, 30));
        let decision = decide(&input(&pods, 3, 3, 41));
        assert!(decision.actions.is_empty(), "no report since it started");
        assert_eq!(decision.status.phase, "Replacing");
        pods[2].report = Some(report(0, false, 42));
        let decision = decide(&input(&pods, 3, 3, 43));
        assert_eq!(decision.actions, vec![PodAction::Drain("eu-gateway-1".to_owned())]);
        assert_eq!(decision.status.updated, 1);
    }

    #[test]
    fn no_drain_without_room_on_the_other_pods() {
        let mut pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "old")];
        pods[0].report = Some(report(950, false, 10));
        let decision = decide(&input(&pods, 3, 3, 20));
        assert!(decision.actions.is_empty());
        assert_eq!(decision.status.phase, "Waiting");
        assert!(decision.status.message.contains("eu-gateway-0 holds 950 of 1000"), "{}", decision.status.message);
    }

    #[test]
    fn a_pause_holds_new_steps_but_not_the_one_in_flight() {
        let mut pods = vec![pod(0, "old"), pod(1, "old"), pod(2, "old")];
        let mut paused = input(&pods, 3, 3, 20);
        paused.settings.paused = true;
        let decision = decide(&paused);
        assert!(decision.actions.is_empty());
        assert_eq!(decision.status.phase, "Paused");
        assert!(decision.status.paused);

        pods[2].drain_requested = Some(at(20));
        pods[2].report = Some(report(0, true, 30));
        let mut paused = input(&pods, 3, 3, 31);
        paused.settings.paused = true;
        assert_eq!(decide(&paused).actions, vec![PodAction::Delete("eu-gateway-2".to_owned())]);
    }

    #[test]
    fn scale_down_drains_the_highest_ordinal_then_lowers_the_count_one_at_a_time() {
        let mut pods = vec![pod(0, "new"), pod(1, "new"), pod(2, "new"), pod(3, "new"), pod(4, "new")];
        let decision = decide(&input(&pods, 5, 2, 20));
        assert_eq!(decision.actions, vec![PodAction::Drain("eu-gateway-4".to_owned())]);
        assert_eq!(decision.replicas, 5);

        pods[4].drain_requested = Some(at(20));
        pods[4].report = Some(report(0, true, 30));
        let decision = decide(&input(&pods, 5, 2, 31));
        assert!(decision.actions.is_empty(), "{:?}", decision.actions);
        assert_eq!(decision.replicas, 4);

        pods[4].terminating = true;
        let decision = decide(&input(&pods, 4, 2, 32));
        assert!(decision.actions.is_empty(), "the removed pod is still going");
        pods.pop();
        let decision = decide(&input(&pods, 4, 2, 33));
        assert_eq!(decision.actions, vec![PodAction::Drain("eu-gateway-3".to_owned())]);
    }

    #[test]
    fn scale_up_is_immediate() {
        let pods = vec![pod(0, "new"), pod(1, "new"), pod(2, "new")];
        let decision = decide(&input(&pods, 3, 5, 20));
        assert_eq!(decision.replicas, 5);
        assert!(decision.actions.is_empty());
        assert!(decision.busy);
    }

    #[test]
    fn a_drained_pod_not_going_away_is_restarted() {
        let mut pods = vec![pod(0, "new"), pod(1, "new")];
        pods[0].drain_requested = Some(at(20));
        pods[0].report = Some(report(0, true, 30));
        let decision = decide(&input(&pods, 2, 2, 31));
        assert_eq!(decision.actions, vec![PodAction::Delete("eu-gateway-0".to_owned())]);
        assert_eq!(decision.replicas, 2);
    }

    #[test]
    fn failing_resumes_pause_the_rollout() {
        let mut pods = vec![pod(0, "new"), pod(1, "new")];
        pods[0].report = Some(GatewayReport { resumed: 10, resume_failed: 90, ..report(50, false, 30) });
        let previous =
            RolloutStatus { resume_baseline: Some(ResumeCounts { resumed: 0, failed: 0 }), ..RolloutStatus::default() };
        pods[1].created = Some(at(0));
        let mut input = input(&pods, 2, 2, 31);
        input.previous = Some(&previous);
        let decision = decide(&input);
        assert!(decision.pause);
        assert_eq!(decision.status.last_resume_rate, Some(0.1));
        assert!(decision.notes.iter().any(|note| note.warning && note.reason == "ResumesFailing"));
        assert!(decision.status.resume_baseline.is_none());
    }

    #[test]
    fn pods_that_never_report_hold_steps_but_not_an_idle_region() {
        let mut pods = vec![pod(0, "new"), pod(1, "new")];
        pods[0].report = None;
        let decision = decide(&input(&pods, 2, 2, 31));
        assert_eq!(decision.status.phase, "Idle");
        assert!(!decision.busy, "nothing to do: no quick requeue");
        pods[1].revision = Some("old".to_owned());
        let decision = decide(&input(&pods, 2, 2, 31));
        assert!(decision.actions.is_empty(), "no drain while a pod has not reported: {:?}", decision.actions);
        assert_eq!(decision.status.phase, "Replacing");
        assert!(decision.status.message.contains("eu-gateway-0 to report"), "{}", decision.status.message);
    }

    #[test]
    fn an_idle_rollout_says_so() {
        let pods = vec![pod(0, "new"), pod(1, "new")];
        let decision = decide(&input(&pods, 2, 2, 31));
        assert_eq!(decision.status.phase, "Idle");
        assert!(!decision.busy);
        assert_eq!(decision.status.updated, 2);
    }

    fn scaling(current: i32, connections: Option<i64>, last: Option<i64>, now: i64) -> ScalingStatus {
        scale(&ScaleInput {
            current,
            min: 2,
            max: 6,
            connections,
            target: 100,
            tolerance_percent: 10,
            up_cooldown: Duration::from_secs(30),
            down_cooldown: Duration::from_secs(300),
            last_scale: last.map(at),
            now: at(now),
        })
    }

    #[test]
    fn scaling_follows_connections_with_hysteresis_and_cooldowns() {
        assert_eq!(scaling(3, Some(305), None, 0).desired, 3, "within the band");
        let up = scaling(3, Some(450), None, 0);
        assert_eq!(up.desired, 5);
        assert_eq!(up.last_scale_time, Some(at(0).to_string()));
        assert_eq!(scaling(3, Some(450), Some(0), 10).desired, 3, "cooling down");
        assert_eq!(scaling(3, Some(450), Some(0), 31).desired, 5);
        assert_eq!(scaling(5, Some(150), Some(0), 100).desired, 5, "scale-down cool-down is longer");
        assert_eq!(scaling(5, Some(150), Some(0), 301).desired, 2);
        assert_eq!(scaling(5, Some(10_000), None, 0).desired, 6, "max");
        assert_eq!(scaling(3, Some(0), None, 0).desired, 2, "min");
        assert_eq!(scaling(3, None, None, 0).desired, 3, "no reports");
        assert_eq!(scaling(9, Some(0), Some(0), 1).desired, 6, "outside the range is clamped at once");
    }

    #[test]
    fn a_report_parses_from_the_annotation() {
        let parsed = GatewayReport::parse(
            r#"{"connections":3,"maxConnections":100,"draining":false,"resumed":2,"resumeFailed":1,"at":"2026-12-07T10:00:00Z"}"#,
        )
        .expect("test value");
        assert_eq!((parsed.connections, parsed.max_connections, parsed.resumed, parsed.resume_failed), (3, 100, 2, 1));
        assert!(GatewayReport::parse("nope").is_none());
    }
}
