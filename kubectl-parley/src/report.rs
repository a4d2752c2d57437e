//! What `kubectl parley status` shows, as pure functions: [`build`] turns the fetched objects (one ChatCluster,
//! the namespace's Regions and Events) into a [`StatusReport`], [`render_text`] and [`render_json`] print it. The
//! text and the JSON carry the same facts; the JSON keys (camelCase) are those of [`StatusReport`] and the types it
//! holds, and stay stable: a key is always present, `null` when the fact is unknown.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use parley_crds::common::{CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY};
use parley_crds::{ChatCluster, MachineIdBlock, Region, MACHINE_ID_SPACE};
use serde::Serialize;

use crate::error::Error;

/// The most Warning Events the report lists.
pub const MAX_WARNINGS: usize = 10;

/// The API group of the kinds whose Events the report lists.
const GROUP_PREFIX: &str = "parley.dev/";

/// The objects the report is built from.
#[derive(Clone, Copy, Debug)]
pub struct StatusInput<'a> {
    /// The ChatCluster.
    pub cluster: &'a ChatCluster,
    /// Regions of the namespace; those whose `spec.clusterRef` names another ChatCluster are left out.
    pub regions: &'a [Region],
    /// Events of the namespace; only the Warnings about the ChatCluster and its Regions are kept.
    pub events: &'a [Event],
    /// The time the objects were read, for the ages in the text.
    pub now: Timestamp,
}

/// Everything `status` shows (JSON: one object with these keys).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// When the objects were read (RFC 3339).
    pub generated_at: String,
    /// The ChatCluster.
    pub cluster: ClusterReport,
    /// The Snowflake machine-ID allocation.
    pub machine_ids: MachineIdReport,
    /// One entry per Region of the ChatCluster, by object name.
    pub regions: Vec<RegionReport>,
    /// The last [`MAX_WARNINGS`] Warning Events of the ChatCluster and its Regions, newest first.
    pub warnings: Vec<WarningReport>,
    #[serde(skip)]
    now: Timestamp,
}

/// The ChatCluster itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReport {
    /// Object name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.version`, the Parley version (image tag) it runs.
    pub version: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status.observedGeneration`: the generation the operator last reconciled.
    pub observed_generation: Option<i64>,
    /// `status.regionsReady`, for example `2/3`.
    pub regions_ready: Option<String>,
    /// `spec.mirrorMaker.latencyBudgetMs`, against which the incoming flows are judged.
    pub latency_budget_ms: i64,
    /// `Ready`, `Progressing`, `Degraded` (in that order), then any other condition.
    pub conditions: Vec<ConditionReport>,
}

/// One status condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionReport {
    /// `Ready`, `Progressing`, `Degraded`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
}

/// The machine-ID allocation of the ChatCluster (`status.machineIdAllocation`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineIdReport {
    /// IDs held by Regions (quarantined ones excluded).
    pub allocated: u32,
    /// The whole space, 1024.
    pub space: u16,
    /// One block per Region, by first ID.
    pub blocks: Vec<BlockReport>,
    /// Released blocks that may not be handed out yet.
    pub quarantined: Vec<QuarantinedReport>,
}

/// A block held by a Region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockReport {
    /// The Region object.
    pub region: String,
    /// First ID.
    pub start: u16,
    /// Number of IDs.
    pub size: u16,
    /// `start-last`, for example `0-15`.
    pub range: String,
}

/// A quarantined block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedReport {
    /// The Region object that last held it.
    pub region: String,
    /// First ID.
    pub start: u16,
    /// Number of IDs.
    pub size: u16,
    /// `start-last`.
    pub range: String,
    /// When it was released (RFC 3339).
    pub released_at: String,
    /// When it may be handed out again: `releasedAt` plus `spec.snowflake.machineIdQuarantineSeconds` (RFC 3339).
    pub reusable_at: String,
}

/// One Region.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionReport {
    /// Object name.
    pub name: String,
    /// `spec.regionName`.
    pub region_name: String,
    /// Status of its `Ready` condition (`True`, `False`, `Unknown`), `null` before the first reconcile.
    pub ready: Option<String>,
    /// Gateway pods ready and wanted.
    pub gateways: PodCounts,
    /// Router pods ready and wanted.
    pub routers: PodCounts,
    /// `status.gatewayConnections` (else `status.scaling.connections`): the connections its gateways reported.
    pub connections: Option<i64>,
    /// `status.machineIds`, for example `0-15`.
    pub machine_ids: Option<String>,
    /// `status.rollout`.
    pub rollout: Option<RolloutReport>,
    /// `status.scaling`, when the gateways scale on connections.
    pub scaling: Option<ScalingReport>,
    /// `status.mirrorMaker`: ready / wanted MirrorMaker 2 pods, when the Region receives topics.
    pub mirror_maker: Option<String>,
    /// `status.incomingFlows`: the other Regions' topics mirrored into this one.
    pub incoming_flows: Vec<FlowReport>,
    /// Every condition, `Ready`, `Progressing`, `Degraded` first.
    pub conditions: Vec<ConditionReport>,
}

/// Ready and wanted pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCounts {
    /// Ready pods.
    pub ready: i32,
    /// Wanted pods.
    pub desired: i32,
}

/// The gateways' rollout (`status.rollout`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutReport {
    /// Gateway pods on the update revision.
    pub updated: i32,
    /// Gateway pods wanted.
    pub total: i32,
    /// `Idle`, `Draining`, `Replacing`, `Waiting` or `Paused`.
    pub phase: String,
    /// Whether a rollout is under way or held: a phase other than `Idle`, a draining pod, or paused.
    pub in_progress: bool,
    /// Whether `parley.dev/rollout-paused` holds it.
    pub paused: bool,
    /// The pod draining now.
    pub draining: Option<DrainingReport>,
    /// The share (0 to 1) of resumes that succeeded during the last step.
    pub last_resume_rate: Option<f64>,
    /// The StatefulSet's current revision.
    pub current_revision: String,
    /// The StatefulSet's update revision.
    pub update_revision: String,
    /// The operator's message.
    pub message: String,
}

/// A draining gateway pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainingReport {
    /// Pod name.
    pub pod: String,
    /// Connections it still holds.
    pub connections: i64,
    /// When it was asked to drain (RFC 3339).
    pub since: String,
}

/// Connection-based scaling (`status.scaling`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingReport {
    /// Gateway pods running.
    pub current: i32,
    /// Gateway pods the connections call for.
    pub desired: i32,
    /// `gateway.minReplicas`.
    pub min: i32,
    /// `gateway.maxReplicas`.
    pub max: i32,
    /// Connections the gateways reported.
    pub connections: i64,
    /// Connections per pod aimed at.
    pub target_connections_per_pod: i64,
    /// Why `desired` is what it is.
    pub reason: String,
    /// When the gateway count last changed (RFC 3339).
    pub last_scale_time: Option<String>,
}

/// An incoming MirrorMaker flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowReport {
    /// The source Region's `regionName`.
    pub from_region: String,
    /// Largest delivery latency (home append → delivered here) over the last report window, in ms.
    pub delivery_latency_ms: i64,
    /// MirrorMaker 2's lag in ms; `null` before the first beacon.
    pub mirror_lag_ms: Option<i64>,
    /// Messages delivered in the window.
    pub messages: i64,
    /// Whether the delivery latency is over the ChatCluster's `mirrorMaker.latencyBudgetMs`.
    pub over_budget: bool,
    /// When the routers reported it (RFC 3339).
    pub reported_at: String,
}

/// A Warning Event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WarningReport {
    /// `ChatCluster` or `Region`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// CamelCase reason.
    pub reason: String,
    /// The note.
    pub message: String,
    /// How many times it occurred.
    pub count: i32,
    /// When it last occurred (RFC 3339).
    pub last_seen: Option<String>,
}

/// Builds the report (pure).
pub fn build(input: &StatusInput<'_>) -> StatusReport {
    let cluster = input.cluster;
    let cluster_name = cluster.metadata.name.clone().unwrap_or_default();
    let status = cluster.status.clone().unwrap_or_default();
    let latency_budget_ms = i64::from(cluster.spec.mirror_maker.latency_budget_ms);

    let mut regions: Vec<&Region> =
        input.regions.iter().filter(|region| region.spec.cluster_ref == cluster_name).collect();
    regions.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let allocation = status.machine_id_allocation.clone().unwrap_or_default();
    let mut blocks: Vec<BlockReport> = allocation
        .blocks
        .iter()
        .map(|held| BlockReport {
            region: held.region.clone(),
            start: held.block.start,
            size: held.block.size,
            range: held.block.display_range(),
        })
        .collect();
    blocks.sort_by_key(|block| block.start);
    let quarantine = SignedDuration::from_secs(i64::from(cluster.spec.snowflake.machine_id_quarantine_seconds));
    let quarantined = allocation
        .quarantined
        .iter()
        .map(|held| QuarantinedReport {
            region: held.region.clone(),
            start: held.block.start,
            size: held.block.size,
            range: held.block.display_range(),
            released_at: held.released_at.0.to_string(),
            reusable_at: held.released_at.0.checked_add(quarantine).map(|t| t.to_string()).unwrap_or_default(),
        })
        .collect();
    let allocated = status
        .machine_ids_allocated
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or_else(|| allocation.blocks.iter().map(|held| u32::from(held.block.size)).sum());

    let names: BTreeSet<&str> = regions.iter().filter_map(|region| region.metadata.name.as_deref()).collect();
    let mut events: Vec<(Option<Timestamp>, WarningReport)> = input
        .events
        .iter()
        .filter(|event| event.type_.as_deref() == Some("Warning"))
        .filter(|event| {
            let object = &event.involved_object;
            let parley = object.api_version.as_deref().is_none_or(|v| v.starts_with(GROUP_PREFIX));
            let name = object.name.as_deref().unwrap_or_default();
            parley
                && match object.kind.as_deref() {
                    Some("ChatCluster") => name == cluster_name,
                    Some("Region") => names.contains(name),
                    _ => false,
                }
        })
        .map(|event| {
            let seen = last_seen(event);
            let warning = WarningReport {
                kind: event.involved_object.kind.clone().unwrap_or_default(),
                name: event.involved_object.name.clone().unwrap_or_default(),
                reason: event.reason.clone().unwrap_or_default(),
                message: event.message.clone().unwrap_or_default(),
                count: event.series.as_ref().and_then(|s| s.count).or(event.count).unwrap_or(1).max(1),
                last_seen: seen.map(|t| t.to_string()),
            };
            (seen, warning)
        })
        .collect();
    // Newest first; Events without any time last.
    events.sort_by_key(|(seen, _)| std::cmp::Reverse(*seen));

    StatusReport {
        generated_at: input.now.to_string(),
        cluster: ClusterReport {
            name: cluster_name.clone(),
            namespace: cluster.metadata.namespace.clone().unwrap_or_default(),
            version: cluster.spec.version.clone(),
            generation: cluster.metadata.generation,
            observed_generation: status.observed_generation,
            regions_ready: status.regions_ready.clone(),
            latency_budget_ms,
            conditions: conditions(&status.conditions),
        },
        machine_ids: MachineIdReport { allocated, space: MACHINE_ID_SPACE, blocks, quarantined },
        regions: regions.into_iter().map(|region| region_report(region, latency_budget_ms)).collect(),
        warnings: events.into_iter().take(MAX_WARNINGS).map(|(_, warning)| warning).collect(),
        now: input.now,
    }
}

fn region_report(region: &Region, latency_budget_ms: i64) -> RegionReport {
    let status = region.status.clone().unwrap_or_default();
    let conditions = conditions(&status.conditions);
    let ready = conditions.iter().find(|c| c.type_ == CONDITION_READY).map(|c| c.status.clone());
    let rollout = status.rollout.as_ref().map(|rollout| RolloutReport {
        updated: rollout.updated,
        total: rollout.total,
        phase: rollout.phase.clone(),
        in_progress: !(rollout.phase.is_empty() || rollout.phase == "Idle")
            || rollout.paused
            || rollout.draining.is_some(),
        paused: rollout.paused,
        draining: rollout.draining.as_ref().map(|draining| DrainingReport {
            pod: draining.pod.clone(),
            connections: draining.connections,
            since: draining.since.clone(),
        }),
        last_resume_rate: rollout.last_resume_rate,
        current_revision: rollout.current_revision.clone(),
        update_revision: rollout.update_revision.clone(),
        message: rollout.message.clone(),
    });
    let scaling = status.scaling.as_ref().map(|scaling| ScalingReport {
        current: scaling.current,
        desired: scaling.desired,
        min: scaling.min,
        max: scaling.max,
        connections: scaling.connections,
        target_connections_per_pod: scaling.target_connections_per_pod,
        reason: scaling.reason.clone(),
        last_scale_time: scaling.last_scale_time.clone(),
    });
    let machine_ids = status
        .machine_ids
        .clone()
        .or_else(|| status.machine_id_block.as_ref().map(MachineIdBlock::display_range))
        .filter(|range| !range.is_empty());
    let mut incoming_flows: Vec<FlowReport> = status
        .incoming_flows
        .iter()
        .map(|flow| FlowReport {
            from_region: flow.region.clone(),
            delivery_latency_ms: flow.delivery_latency_ms,
            mirror_lag_ms: flow.mirror_lag_ms,
            messages: flow.messages,
            over_budget: flow.delivery_latency_ms > latency_budget_ms,
            reported_at: flow.reported_at.clone(),
        })
        .collect();
    incoming_flows.sort_by(|a, b| a.from_region.cmp(&b.from_region));
    RegionReport {
        name: region.metadata.name.clone().unwrap_or_default(),
        region_name: region.spec.region_name.clone(),
        ready,
        gateways: PodCounts { ready: status.gateways_ready, desired: status.gateways_desired },
        routers: PodCounts { ready: status.routers_ready, desired: status.routers_desired },
        connections: status.gateway_connections.or(scaling.as_ref().map(|s| s.connections)),
        machine_ids,
        rollout,
        scaling,
        mirror_maker: status.mirror_maker.clone(),
        incoming_flows,
        conditions,
    }
}

/// The conditions, `Ready`, `Progressing`, `Degraded` first, then the others in their order.
fn conditions(conditions: &[Condition]) -> Vec<ConditionReport> {
    let rank = |type_: &str| match type_ {
        CONDITION_READY => 0,
        CONDITION_PROGRESSING => 1,
        CONDITION_DEGRADED => 2,
        _ => 3,
    };
    let mut sorted: Vec<&Condition> = conditions.iter().collect();
    sorted.sort_by_key(|condition| rank(&condition.type_));
    sorted
        .into_iter()
        .map(|condition| ConditionReport {
            type_: condition.type_.clone(),
            status: condition.status.clone(),
            reason: condition.reason.clone(),
            message: condition.message.clone(),
            last_transition_time: condition.last_transition_time.0.to_string(),
        })
        .collect()
}

/// When an Event last occurred: its series' last observation, else its last timestamp, its event time, its first
/// timestamp, or when the object was created.
fn last_seen(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|series| series.last_observed_time.as_ref().map(|t| t.0))
        .or(event.last_timestamp.as_ref().map(|t| t.0))
        .or(event.event_time.as_ref().map(|t| t.0))
        .or(event.first_timestamp.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The report as one pretty-printed JSON document.
pub fn render_json(report: &StatusReport) -> Result<String, Error> {
    serde_json::to_string_pretty(report).map_err(Error::Json)
}

/// The report as text: a header, the conditions, the machine IDs, the Regions' table, the rollouts in progress,
/// the incoming MirrorMaker flows and the Warning Events.
pub fn render_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let cluster = &report.cluster;
    let generation = match (cluster.generation, cluster.observed_generation) {
        (Some(generation), Some(observed)) if generation == observed => format!("{generation} (reconciled)"),
        (Some(generation), Some(observed)) => format!("{generation} (operator has reconciled {observed})"),
        (Some(generation), None) => format!("{generation} (not reconciled yet)"),
        (None, _) => "-".to_owned(),
    };
    let header = [
        ("ChatCluster", cluster.name.clone()),
        ("Namespace", cluster.namespace.clone()),
        ("Version", cluster.version.clone()),
        ("Generation", generation),
        ("Regions ready", cluster.regions_ready.clone().unwrap_or_else(|| "-".to_owned())),
    ];
    for (key, value) in header {
        let _ = writeln!(out, "{key:<15}{value}");
    }

    out.push_str("\nConditions\n");
    if cluster.conditions.is_empty() {
        out.push_str("  none yet (the operator has not reconciled this ChatCluster)\n");
    } else {
        let rows = cluster
            .conditions
            .iter()
            .map(|c| vec![c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone()])
            .collect();
        table(&mut out, &["TYPE", "STATUS", "REASON", "MESSAGE"], rows);
    }

    let ids = &report.machine_ids;
    let _ = writeln!(out, "\nMachine IDs: {}/{} allocated", ids.allocated, ids.space);
    if !ids.blocks.is_empty() || !ids.quarantined.is_empty() {
        let mut rows: Vec<Vec<String>> = ids
            .blocks
            .iter()
            .map(|b| vec![b.range.clone(), b.size.to_string(), b.region.clone(), "held".to_owned()])
            .collect();
        rows.extend(ids.quarantined.iter().map(|q| {
            let until = match parse(&q.reusable_at) {
                Some(at) if at > report.now => {
                    format!("quarantined, reusable in {}", duration(at.duration_since(report.now)))
                }
                _ => "quarantined, reusable now".to_owned(),
            };
            vec![q.range.clone(), q.size.to_string(), q.region.clone(), until]
        }));
        table(&mut out, &["BLOCK", "SIZE", "REGION", "STATE"], rows);
    }

    out.push_str("\nRegions\n");
    if report.regions.is_empty() {
        let _ = writeln!(out, "  none (no Region has spec.clusterRef: {})", cluster.name);
    } else {
        let rows = report
            .regions
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.region_name.clone(),
                    r.ready.clone().unwrap_or_else(|| "-".to_owned()),
                    format!("{}/{}", r.gateways.ready, r.gateways.desired),
                    format!("{}/{}", r.routers.ready, r.routers.desired),
                    r.connections.map(|c| c.to_string()).unwrap_or_else(|| "-".to_owned()),
                    r.machine_ids.clone().unwrap_or_else(|| "-".to_owned()),
                    r.rollout
                        .as_ref()
                        .map(|o| format!("{}/{} {}", o.updated, o.total, o.phase))
                        .unwrap_or_else(|| "-".to_owned()),
                    r.scaling
                        .as_ref()
                        .map(|s| format!("{}/{}/{}", s.desired, s.min, s.max))
                        .unwrap_or_else(|| "-".to_owned()),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "NAME",
                "REGION",
                "READY",
                "GATEWAYS",
                "ROUTERS",
                "CONNECTIONS",
                "MACHINE IDS",
                "ROLLOUT",
                "SCALING (DESIRED/MIN/MAX)",
            ],
            rows,
        );
        for region in &report.regions {
            for condition in &region.conditions {
                let wrong = match condition.type_.as_str() {
                    CONDITION_READY => condition.status != "True",
                    CONDITION_DEGRADED => condition.status == "True",
                    _ => false,
                };
                if wrong {
                    let _ = writeln!(
                        out,
                        "  {}: {} {} ({}): {}",
                        region.name, condition.type_, condition.status, condition.reason, condition.message
                    );
                }
            }
        }
    }

    let rollouts: Vec<(&RegionReport, &RolloutReport)> = report
        .regions
        .iter()
        .filter_map(|region| region.rollout.as_ref().filter(|rollout| rollout.in_progress).map(|r| (region, r)))
        .collect();
    if rollouts.is_empty() {
        out.push_str("\nRollouts: none in progress\n");
    }
    for (region, rollout) in rollouts {
        let _ = writeln!(
            out,
            "\nRollout of Region {} ({}): {}/{} updated, {}",
            region.name, region.region_name, rollout.updated, rollout.total, rollout.phase
        );
        let mut lines: Vec<(&str, String)> = Vec::new();
        if let Some(draining) = &rollout.draining {
            let since = match parse(&draining.since) {
                Some(at) => format!("{} ago", duration(report.now.duration_since(at))),
                None => draining.since.clone(),
            };
            lines.push((
                "Draining",
                format!("{}, {} connections left, since {since}", draining.pod, draining.connections),
            ));
        }
        lines.push((
            "Last resume rate",
            rollout.last_resume_rate.map(|rate| format!("{:.1}%", rate * 100.0)).unwrap_or_else(|| "-".to_owned()),
        ));
        lines.push((
            "Paused",
            if rollout.paused { "yes (kubectl parley rollout resume to go on)".to_owned() } else { "no".to_owned() },
        ));
        if !rollout.update_revision.is_empty() {
            lines.push(("Revisions", format!("{} -> {}", rollout.current_revision, rollout.update_revision)));
        }
        if !rollout.message.is_empty() {
            lines.push(("Message", rollout.message.clone()));
        }
        for (key, value) in lines {
            let _ = writeln!(out, "  {key:<18}{value}");
        }
    }

    let flows: Vec<Vec<String>> = report
        .regions
        .iter()
        .flat_map(|region| {
            region.incoming_flows.iter().map(move |flow| {
                vec![
                    region.region_name.clone(),
                    flow.from_region.clone(),
                    region.mirror_maker.clone().unwrap_or_else(|| "-".to_owned()),
                    format!("{} ms", flow.delivery_latency_ms),
                    flow.mirror_lag_ms.map(|lag| format!("{lag} ms")).unwrap_or_else(|| "no beacon yet".to_owned()),
                    flow.messages.to_string(),
                    parse(&flow.reported_at)
                        .map(|at| format!("{} ago", duration(report.now.duration_since(at))))
                        .unwrap_or_else(|| flow.reported_at.clone()),
                    if flow.over_budget { "over budget" } else { "ok" }.to_owned(),
                ]
            })
        })
        .collect();
    if flows.is_empty() {
        out.push_str("\nIncoming MirrorMaker flows: none\n");
    } else {
        let _ = writeln!(out, "\nIncoming MirrorMaker flows (latency budget {} ms)", cluster.latency_budget_ms);
        table(
            &mut out,
            &["INTO", "FROM", "MIRRORMAKER", "DELIVERY LATENCY", "MIRROR LAG", "MESSAGES", "REPORTED", "STATE"],
            flows,
        );
    }

    if report.warnings.is_empty() {
        out.push_str("\nWarning events: none\n");
    } else {
        let _ = writeln!(out, "\nWarning events (last {MAX_WARNINGS}, newest first)");
        let rows = report
            .warnings
            .iter()
            .map(|w| {
                vec![
                    w.last_seen
                        .as_deref()
                        .and_then(parse)
                        .map(|at| format!("{} ago", duration(report.now.duration_since(at))))
                        .unwrap_or_else(|| "-".to_owned()),
                    format!("{}/{}", w.kind, w.name),
                    w.reason.clone(),
                    w.count.to_string(),
                    w.message.clone(),
                ]
            })
            .collect();
        table(&mut out, &["LAST SEEN", "OBJECT", "REASON", "COUNT", "MESSAGE"], rows);
    }
    out
}

fn parse(time: &str) -> Option<Timestamp> {
    time.parse().ok()
}

/// A duration as kubectl shows ages: `45s`, `12m`, `5h`, `3d` (never negative).
fn duration(span: SignedDuration) -> String {
    match span.as_secs().max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Writes a table indented by two spaces, columns two spaces apart, no trailing spaces.
fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&headers).chain(rows.iter()) {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}
