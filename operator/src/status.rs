//! The `update_status` stage's pure half: it computes the Region's and the ChatCluster's status from what was
//! applied and observed, so the controller only writes when the result differs from what is stored.
//!
//! Conditions keep their `lastTransitionTime` while their status stays the same, so recomputing an unchanged
//! status gives an equal value and a no-op reconcile writes nothing.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use parley_crds::chat_cluster::RegionSummary;
use parley_crds::common::{CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY};
use parley_crds::{ChatCluster, ChatClusterStatus, MachineIdAllocation, MachineIdBlock, Region, RegionStatus};

use crate::error::Error;
use crate::machine_ids;

/// Ready and wanted pods of one StatefulSet, and whether its controller has caught up with its spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Pods wanted (`spec.replicas`).
    pub desired: i32,
    /// Pods ready (`status.readyReplicas`).
    pub ready: i32,
    /// Pods on the current revision (`status.updatedReplicas`).
    pub updated: i32,
    /// Whether the StatefulSet controller has observed the latest spec.
    pub observed: bool,
}

impl Rollout {
    /// Reads a StatefulSet as the API server returned it.
    pub fn of(stateful_set: &StatefulSet) -> Rollout {
        let desired = stateful_set.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1);
        let status = stateful_set.status.as_ref();
        let observed = match (stateful_set.metadata.generation, status.and_then(|s| s.observed_generation)) {
            (Some(generation), Some(observed)) => observed >= generation,
            _ => false,
        };
        Rollout {
            desired,
            ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            observed,
        }
    }

    /// Every wanted pod is ready and on the current revision.
    pub fn done(&self) -> bool {
        self.observed && self.ready == self.desired && self.updated == self.desired
    }
}

/// A condition to set: type, status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate<'a> {
    /// `Ready`, `Progressing` or `Degraded`.
    pub type_: &'a str,
    /// Whether it holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Human-readable message.
    pub message: String,
}

/// Builds the conditions from `updates`, keeping each one's `lastTransitionTime` from `previous` when its status
/// did not change.
pub fn conditions(
    previous: &[Condition],
    updates: Vec<ConditionUpdate<'_>>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    updates
        .into_iter()
        .map(|update| {
            let status = if update.status { "True" } else { "False" }.to_owned();
            let last_transition_time = previous
                .iter()
                .find(|old| old.type_ == update.type_ && old.status == status)
                .map(|old| old.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: update.type_.to_owned(),
                status,
                reason: update.reason.to_owned(),
                message: update.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Whether the condition of `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|condition| condition.type_ == type_ && condition.status == "True")
}

/// What was applied for a Region besides its workloads, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppliedObjects {
    /// Name of the internal token Secret.
    pub internal_token_secret: String,
    /// Names of the NetworkPolicies.
    pub network_policies: Vec<String>,
    /// The regions mirrored into the Region.
    pub mirrored_regions: Vec<String>,
    /// Ready and wanted pods of its MirrorMaker 2, when it has one.
    pub mirror_maker: Option<(i32, i32)>,
    /// The incoming flows as the routers report them.
    pub incoming_flows: Vec<parley_crds::region::IncomingFlow>,
    /// Why the incoming flows make the Region `Degraded` (a latency over the budget), if they do.
    pub over_budget: Option<String>,
    /// The gateways' rollout as the operator drives it ([`crate::rollout::decide`]).
    pub rollout: Option<parley_crds::region::RolloutStatus>,
    /// The connection-based scaling, when the Region has a range ([`crate::rollout::scale`]).
    pub scaling: Option<parley_crds::region::ScalingStatus>,
    /// The connections the gateways reported, summed.
    pub gateway_connections: Option<i64>,
}

/// The status of a Region whose objects were applied: Ready when both StatefulSets are rolled out. `extra` are
/// the conditions beyond `Ready`, `Progressing` and `Degraded` (the keyspace's, see [`crate::keyspace::conditions`]);
/// they do not change `Ready`.
pub fn region_ready(
    region: &Region,
    block: MachineIdBlock,
    gateways: Rollout,
    routers: Rollout,
    objects: AppliedObjects,
    extra: Vec<ConditionUpdate<'_>>,
    now: Timestamp,
) -> RegionStatus {
    let previous = region.status.as_ref().map(|status| status.conditions.as_slice()).unwrap_or_default();
    let stepping = objects.rollout.as_ref().filter(|rollout| rollout.phase != "Idle");
    let ready = gateways.ready >= gateways.desired && routers.done();
    let done = ready && gateways.done() && stepping.is_none();
    let pods = format!(
        "gateways {}/{} ready, routers {}/{} ready",
        gateways.ready, gateways.desired, routers.ready, routers.desired
    );
    let (progress_reason, progress_message) = match stepping {
        Some(rollout) if rollout.paused => ("RolloutPaused", rollout.message.clone()),
        Some(rollout)
            if rollout.total != gateways.desired
                || objects.scaling.as_ref().is_some_and(|scaling| scaling.desired != scaling.current) =>
        {
            ("Scaling", rollout.message.clone())
        }
        Some(rollout) => {
            ("RollingOut", format!("{}/{} gateways updated; {}", rollout.updated, rollout.total, rollout.message))
        }
        None if done => ("RolloutComplete", "every object is applied and every pod is ready".to_owned()),
        None => ("RollingOut", pods.clone()),
    };
    let updates = vec![
        ConditionUpdate {
            type_: CONDITION_READY,
            status: ready,
            reason: if ready { "AllPodsReady" } else { "PodsNotReady" },
            message: pods.clone(),
        },
        ConditionUpdate {
            type_: CONDITION_PROGRESSING,
            status: !done,
            reason: progress_reason,
            message: progress_message,
        },
        match &objects.over_budget {
            Some(message) => ConditionUpdate {
                type_: CONDITION_DEGRADED,
                status: true,
                reason: "MirrorLatencyOverBudget",
                message: message.clone(),
            },
            None => ConditionUpdate {
                type_: CONDITION_DEGRADED,
                status: false,
                reason: "Reconciled",
                message: "the spec is valid and applied".to_owned(),
            },
        },
    ];
    let mut updates = updates;
    updates.extend(extra);
    RegionStatus {
        observed_generation: region.metadata.generation,
        conditions: conditions(previous, updates, region.metadata.generation, now),
        gateways_ready: gateways.ready,
        gateways_desired: gateways.desired,
        routers_ready: routers.ready,
        routers_desired: routers.desired,
        gateways: Some(format!("{}/{}", gateways.ready, gateways.desired)),
        routers: Some(format!("{}/{}", routers.ready, routers.desired)),
        machine_id_block: Some(block),
        machine_ids: Some(block.display_range()),
        internal_token_secret: Some(objects.internal_token_secret),
        network_policies: objects.network_policies,
        mirrored_regions: objects.mirrored_regions,
        mirror_maker: objects.mirror_maker.map(|(ready, wanted)| format!("{ready}/{wanted}")),
        incoming_flows: objects.incoming_flows,
        version: region.status.as_ref().and_then(|status| status.version.clone()),
        rollout: objects.rollout,
        scaling: objects.scaling,
        gateway_connections: objects.gateway_connections,
    }
}

/// The reason of the Region's `Progressing` condition while a replication target is missing.
pub const WAITING_FOR_REPLICATION_TARGET: &str = "WaitingForReplicationTarget";

/// Says in the Region's status that it waits for the replication targets in `missing` (see
/// [`crate::validate::missing_replication_targets`]): `Progressing` becomes True with reason
/// [`WAITING_FOR_REPLICATION_TARGET`] and a message naming them, unless a rollout already makes it True, whose
/// message then names them too. `Ready` (the pods) and `Degraded` stay as they are. Returns whether the Region
/// starts waiting now (it did not wait for the same targets before), for a Normal Event.
pub fn wait_for_replication_targets(
    status: &mut RegionStatus,
    region: &Region,
    missing: &[String],
    now: Timestamp,
) -> bool {
    if missing.is_empty() {
        return false;
    }
    let targets = missing.join(", ");
    let waiting = format!(
        "waiting for replication target {targets}: no Region of the chat cluster has that regionName yet; the \
         Region runs without its flows to it until it appears"
    );
    let previous = region.status.as_ref().map(|status| status.conditions.as_slice()).unwrap_or_default();
    let was_waiting = previous.iter().any(|condition| {
        condition.type_ == CONDITION_PROGRESSING
            && condition.status == "True"
            && condition.message.contains(&format!("waiting for replication target {targets}:"))
    });
    if let Some(progressing) = status.conditions.iter_mut().find(|condition| condition.type_ == CONDITION_PROGRESSING) {
        if progressing.status == "True" {
            progressing.message = format!("{}; {waiting}", progressing.message);
        } else {
            let update = ConditionUpdate {
                type_: CONDITION_PROGRESSING,
                status: true,
                reason: WAITING_FOR_REPLICATION_TARGET,
                message: waiting,
            };
            if let Some(condition) = conditions(previous, vec![update], region.metadata.generation, now).pop() {
                *progressing = condition;
            }
        }
    }
    !was_waiting
}

/// The version the Region's pods run, for its `status.version`: `wanted` once both StatefulSets have every pod
/// ready on their latest template, else what the status showed before.
pub fn running_version(region: &Region, wanted: &str, gateways: Rollout, routers: Rollout) -> Option<String> {
    if gateways.done() && routers.done() {
        Some(wanted.to_owned())
    } else {
        region.status.as_ref().and_then(|status| status.version.clone())
    }
}

/// The status of a Region that cannot be reconciled: Degraded with the error's reason. Pod counts, the
/// machine-ID block and the conditions other than `Ready`, `Progressing` and `Degraded` stay as they were, since
/// nothing was applied. For an invalid spec the Region waits for a change;
/// otherwise (for example, its internal token Secret could not be created) the reconcile is retried.
pub fn region_degraded(region: &Region, error: &Error, now: Timestamp) -> RegionStatus {
    let old = region.status.clone().unwrap_or_default();
    let waiting = if error.is_invalid_spec() {
        "nothing is applied until the spec is fixed"
    } else {
        "nothing is applied until this is resolved; retrying with backoff"
    };
    let updates = vec![
        ConditionUpdate { type_: CONDITION_READY, status: false, reason: error.reason(), message: error.to_string() },
        ConditionUpdate {
            type_: CONDITION_PROGRESSING,
            status: false,
            reason: error.reason(),
            message: waiting.to_owned(),
        },
        ConditionUpdate { type_: CONDITION_DEGRADED, status: true, reason: error.reason(), message: error.to_string() },
    ];
    let mut new_conditions = conditions(&old.conditions, updates, region.metadata.generation, now);
    // The others (the keyspace's, such as a pending `CassandraRebuildRequired`) stay as they were.
    new_conditions.extend(
        old.conditions
            .iter()
            .filter(|condition| {
                ![CONDITION_READY, CONDITION_PROGRESSING, CONDITION_DEGRADED].contains(&condition.type_.as_str())
            })
            .cloned(),
    );
    RegionStatus { observed_generation: region.metadata.generation, conditions: new_conditions, ..old }
}

/// The ChatCluster's status: one summary per Region of it (from `regions`, whose statuses are the latest known),
/// the allocation, and conditions rolled up from the Regions'.
pub fn cluster(
    cluster: &ChatCluster,
    regions: &[Region],
    allocation: Option<MachineIdAllocation>,
    now: Timestamp,
) -> ChatClusterStatus {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let old = cluster.status.clone().unwrap_or_default();
    let mut members: Vec<&Region> = regions
        .iter()
        .filter(|region| region.spec.cluster_ref == name && region.metadata.namespace == cluster.metadata.namespace)
        .filter(|region| region.metadata.deletion_timestamp.is_none())
        .collect();
    members.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let summaries: Vec<RegionSummary> = members
        .iter()
        .map(|region| {
            let status = region.status.clone().unwrap_or_default();
            RegionSummary {
                name: region.metadata.name.clone().unwrap_or_default(),
                region_name: region.spec.region_name.clone(),
                gateways_ready: status.gateways_ready,
                gateways_desired: status.gateways_desired,
                routers_ready: status.routers_ready,
                routers_desired: status.routers_desired,
                machine_id_block: status.machine_id_block,
            }
        })
        .collect();
    let names = |type_: &str| -> Vec<String> {
        members
            .iter()
            .filter(|region| {
                is_true(region.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default(), type_)
            })
            .filter_map(|region| region.metadata.name.clone())
            .collect()
    };
    let ready = names(CONDITION_READY);
    let degraded = names(CONDITION_DEGRADED);
    let progressing = names(CONDITION_PROGRESSING);
    let all_ready = !members.is_empty() && ready.len() == members.len();
    let updates = vec![
        ConditionUpdate {
            type_: CONDITION_READY,
            status: all_ready,
            reason: if members.is_empty() {
                "NoRegions"
            } else if all_ready {
                "AllRegionsReady"
            } else {
                "RegionsNotReady"
            },
            message: if members.is_empty() {
                "no Region names this ChatCluster".to_owned()
            } else {
                format!("{} of {} regions ready", ready.len(), members.len())
            },
        },
        ConditionUpdate {
            type_: CONDITION_PROGRESSING,
            status: !progressing.is_empty(),
            reason: if progressing.is_empty() { "Stable" } else { "RegionsProgressing" },
            message: if progressing.is_empty() {
                "no region is rolling out".to_owned()
            } else {
                format!("rolling out: {}", progressing.join(", "))
            },
        },
        ConditionUpdate {
            type_: CONDITION_DEGRADED,
            status: !degraded.is_empty(),
            reason: if degraded.is_empty() { "Reconciled" } else { "RegionDegraded" },
            message: if degraded.is_empty() {
                "no region is degraded".to_owned()
            } else {
                format!("degraded: {}", degraded.join(", "))
            },
        },
    ];
    let allocation = allocation.or(old.machine_id_allocation);
    ChatClusterStatus {
        observed_generation: cluster.metadata.generation,
        conditions: conditions(&old.conditions, updates, cluster.metadata.generation, now),
        regions_ready: Some(format!("{}/{}", ready.len(), members.len())),
        machine_ids_allocated: allocation
            .as_ref()
            .map(|allocation| i32::try_from(machine_ids::allocated(allocation)).unwrap_or(i32::MAX)),
        regions: summaries,
        machine_id_allocation: allocation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp")
    }

    fn objects() -> AppliedObjects {
        AppliedObjects {
            internal_token_secret: "eu-internal-token".into(),
            network_policies: vec!["eu-gateway".into(), "eu-router".into()],
            mirrored_regions: vec!["us".into()],
            mirror_maker: Some((1, 2)),
            incoming_flows: Vec::new(),
            over_budget: None,
            ..AppliedObjects::default()
        }
    }

    fn region(name: &str) -> Region {
        let mut region = Region::new(
            name,
            serde_json::from_value(serde_json::json!({
                "clusterRef": "chat", "regionName": name, "cassandra": {"datacenter": "dc1"},
                "gateway": {"replicas": 2}, "router": {"replicas": 1}
            }))
            .expect("spec"),
        );
        region.metadata.namespace = Some("ns".into());
        region.metadata.generation = Some(3);
        region
    }

    #[test]
    fn unchanged_status_keeps_transition_times() {
        let mut eu = region("eu");
        let block = MachineIdBlock { start: 0, size: 3 };
        let rolled = Rollout { desired: 2, ready: 2, updated: 2, observed: true };
        let first = region_ready(
            &eu,
            block,
            rolled,
            Rollout { desired: 1, ready: 1, updated: 1, observed: true },
            objects(),
            Vec::new(),
            at(0),
        );
        assert!(is_true(&first.conditions, CONDITION_READY));
        eu.status = Some(first.clone());
        let again = region_ready(
            &eu,
            block,
            rolled,
            Rollout { desired: 1, ready: 1, updated: 1, observed: true },
            objects(),
            Vec::new(),
            at(50),
        );
        assert_eq!(again, first, "recomputing an unchanged status gives the same value");
        let scaling = region_ready(
            &eu,
            block,
            rolled,
            Rollout { desired: 1, ready: 0, updated: 1, observed: true },
            objects(),
            Vec::new(),
            at(60),
        );
        assert!(!is_true(&scaling.conditions, CONDITION_READY));
        assert!(is_true(&scaling.conditions, CONDITION_PROGRESSING));
        let ready = scaling.conditions.iter().find(|c| c.type_ == CONDITION_READY).expect("ready");
        assert_eq!(ready.last_transition_time, Time(at(60)));
        assert_eq!(ready.reason, "PodsNotReady");
        assert_eq!(scaling.routers.as_deref(), Some("0/1"));
        assert_eq!(scaling.internal_token_secret.as_deref(), Some("eu-internal-token"));
        assert_eq!(scaling.network_policies, ["eu-gateway", "eu-router"]);
    }

    #[test]
    fn an_incoming_flow_over_its_budget_degrades_the_region() {
        let eu = region("eu");
        let rolled = Rollout { desired: 1, ready: 1, updated: 1, observed: true };
        let flow = parley_crds::region::IncomingFlow {
            region: "us".into(),
            delivery_latency_ms: 1_500,
            messages: 12,
            mirror_lag_ms: Some(180),
            reported_at: "2027-01-15T08:00:00Z".into(),
        };
        let objects = AppliedObjects {
            incoming_flows: vec![flow.clone()],
            over_budget: Some("cross-region delivery latency over the budget of 1000 ms (from us: 1500 ms)".into()),
            ..objects()
        };
        let status =
            region_ready(&eu, MachineIdBlock { start: 0, size: 3 }, rolled, rolled, objects, Vec::new(), at(0));
        let degraded = status.conditions.iter().find(|c| c.type_ == CONDITION_DEGRADED).expect("degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "MirrorLatencyOverBudget"));
        assert!(degraded.message.contains("from us: 1500 ms"), "{}", degraded.message);
        assert!(is_true(&status.conditions, CONDITION_READY), "the pods are ready all the same");
        assert_eq!(status.incoming_flows, vec![flow]);
    }

    #[test]
    fn degraded_keeps_counts_and_sets_reason() {
        let mut eu = region("eu");
        let block = MachineIdBlock { start: 4, size: 3 };
        let rolled = Rollout { desired: 2, ready: 2, updated: 2, observed: true };
        let rebuild = ConditionUpdate {
            type_: "CassandraRebuildRequired",
            status: true,
            reason: "DatacenterAdded",
            message: "run nodetool rebuild".to_owned(),
        };
        eu.status = Some(region_ready(&eu, block, rolled, rolled, objects(), vec![rebuild], at(0)));
        let error = Error::MachineIdsExhausted { region: "eu".into(), requested: 9, largest_free: 2 };
        let degraded = region_degraded(&eu, &error, at(5));
        let kept = degraded.conditions.iter().find(|c| c.type_ == "CassandraRebuildRequired").expect("kept");
        assert_eq!((kept.status.as_str(), kept.message.as_str()), ("True", "run nodetool rebuild"));
        assert!(is_true(&degraded.conditions, CONDITION_DEGRADED));
        let condition = degraded.conditions.iter().find(|c| c.type_ == CONDITION_DEGRADED).expect("degraded");
        assert_eq!(condition.reason, "MachineIdsExhausted");
        assert!(condition.message.contains("largest free run"), "{}", condition.message);
        assert_eq!(degraded.machine_ids.as_deref(), Some("4-6"));
        assert_eq!(degraded.gateways_ready, 2);
        let progressing = degraded.conditions.iter().find(|c| c.type_ == CONDITION_PROGRESSING).expect("progressing");
        assert_eq!(progressing.message, "nothing is applied until the spec is fixed");
    }

    #[test]
    fn a_missing_internal_token_is_degraded_and_retried() {
        let mut eu = region("eu");
        let block = MachineIdBlock { start: 4, size: 3 };
        let rolled = Rollout { desired: 2, ready: 2, updated: 2, observed: true };
        eu.status = Some(region_ready(&eu, block, rolled, rolled, objects(), Vec::new(), at(0)));
        let forbidden = kube::Error::Api(Box::new(kube::core::Status::failure("secrets is forbidden", "Forbidden")));
        let error = Error::InternalTokenSecret {
            region: "eu".into(),
            namespace: "ns".into(),
            secret: "eu-internal-token".into(),
            message: "secrets is forbidden".into(),
            source: Some(Box::new(forbidden)),
        };
        let degraded = region_degraded(&eu, &error, at(5));
        let condition = degraded.conditions.iter().find(|c| c.type_ == CONDITION_DEGRADED).expect("degraded");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("True", "InternalTokenSecretFailed"));
        assert!(condition.message.contains("creating Secret ns/eu-internal-token failed: secrets is forbidden"));
        let progressing = degraded.conditions.iter().find(|c| c.type_ == CONDITION_PROGRESSING).expect("progressing");
        assert!(progressing.message.contains("retrying"), "{}", progressing.message);
    }

    #[test]
    fn cluster_rolls_up_regions() {
        let chat: ChatCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
            "metadata": {"name": "chat", "namespace": "ns", "generation": 1},
            "spec": {"version": "0.1.0", "kafka": {}, "cassandra": {"contactPoints": ["c"], "keyspace": "k"},
                     "auth": {"jwtKeySecret": {"name": "s", "key": "k"}}}
        }))
        .expect("cluster");
        let rolled = Rollout { desired: 2, ready: 2, updated: 2, observed: true };
        let mut eu = region("eu");
        eu.status =
            Some(region_ready(&eu, MachineIdBlock { start: 0, size: 3 }, rolled, rolled, objects(), Vec::new(), at(0)));
        let mut us = region("us");
        let waiting = Rollout { desired: 2, ready: 0, updated: 0, observed: true };
        us.status = Some(region_ready(
            &us,
            MachineIdBlock { start: 3, size: 3 },
            waiting,
            rolled,
            objects(),
            Vec::new(),
            at(0),
        ));
        let mut other = region("other");
        other.spec.cluster_ref = "another".into();
        let status = cluster(&chat, &[us.clone(), eu.clone(), other], None, at(1));
        assert_eq!(status.regions_ready.as_deref(), Some("1/2"));
        assert_eq!(status.regions.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["eu", "us"]);
        assert!(!is_true(&status.conditions, CONDITION_READY));
        assert!(is_true(&status.conditions, CONDITION_PROGRESSING));
        us.status =
            Some(region_ready(&us, MachineIdBlock { start: 3, size: 3 }, rolled, rolled, objects(), Vec::new(), at(2)));
        let status = cluster(&chat, &[us, eu], None, at(3));
        assert!(is_true(&status.conditions, CONDITION_READY));
        assert_eq!(status.regions[1].machine_id_block, Some(MachineIdBlock { start: 3, size: 3 }));
    }
}
