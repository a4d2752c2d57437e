//! The pure status report on realistic objects: a ChatCluster with three Regions (one rolling out with a pod
//! draining, one receiving MirrorMaker flows, one paused and not ready), a Region of another ChatCluster, and a
//! namespace's Events.

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kubectl_parley::report::{self, StatusInput, StatusReport, MAX_WARNINGS};
use parley_crds::{ChatCluster, Region};
use serde_json::{json, Value};

const NOW: &str = "2026-03-01T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().expect("time")
}

/// `seconds` before [`NOW`], as RFC 3339.
fn ago(seconds: i64) -> String {
    (now() - SignedDuration::from_secs(seconds)).to_string()
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": ago(600), "observedGeneration": 5})
}

fn cluster() -> ChatCluster {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
        "metadata": {"name": "chat", "namespace": "parley", "generation": 5, "uid": "c-1"},
        "spec": {
            "version": "0.4.2",
            "kafka": {"bootstrapServers": "kafka:9092"},
            "cassandra": {"contactPoints": ["cassandra"], "keyspace": "parley"},
            "redis": {"url": "redis://redis:6379"},
            "auth": {"jwtKeySecret": {"name": "jwt", "key": "secret"}},
            "snowflake": {"machineIdQuarantineSeconds": 60},
            "mirrorMaker": {"latencyBudgetMs": 1000}
        },
        "status": {
            "observedGeneration": 5,
            "conditions": [
                condition("Degraded", "True", "RegionDegraded", "degraded: us"),
                condition("Ready", "False", "RegionsNotReady", "2 of 3 regions ready"),
                condition("Progressing", "True", "RegionsProgressing", "rolling out: ap, eu"),
            ],
            "regionsReady": "2/3",
            "machineIdsAllocated": 48,
            "machineIdAllocation": {
                "blocks": [
                    {"region": "us", "block": {"start": 16, "size": 16}},
                    {"region": "eu", "block": {"start": 0, "size": 16}},
                    {"region": "ap", "block": {"start": 32, "size": 16}}
                ],
                "quarantined": [{"region": "old", "block": {"start": 48, "size": 16}, "releasedAt": ago(30)}]
            }
        }
    }))
    .expect("ChatCluster")
}

fn region(name: &str, region_name: &str, cluster: &str, status: Value) -> Region {
    serde_json::from_value(json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "Region",
        "metadata": {"name": name, "namespace": "parley", "generation": 3},
        "spec": {"clusterRef": cluster, "regionName": region_name, "cassandra": {"datacenter": region_name},
                 "gateway": {"minReplicas": 2, "maxReplicas": 6}},
        "status": status
    }))
    .expect("Region")
}

fn ready_conditions() -> Vec<Value> {
    vec![
        condition("Ready", "True", "AllPodsReady", "all pods ready"),
        condition("Progressing", "False", "RolloutComplete", "rollout complete"),
        condition("Degraded", "False", "Reconciled", "the spec is valid and applied"),
    ]
}

fn regions() -> Vec<Region> {
    vec![
        region(
            "us",
            "us-east",
            "chat",
            json!({
                "observedGeneration": 3,
                "conditions": [
                    condition("Ready", "True", "AllPodsReady", "all pods ready"),
                    condition("Progressing", "False", "RolloutComplete", "rollout complete"),
                    condition("Degraded", "True", "MirrorLatencyOverBudget", "ap-south: 1450 ms over the 1000 ms budget"),
                ],
                "gatewaysReady": 2, "gatewaysDesired": 2, "routersReady": 1, "routersDesired": 1,
                "machineIdBlock": {"start": 16, "size": 16}, "machineIds": "16-31",
                "mirroredRegions": ["ap-south", "eu-west"], "mirrorMaker": "1/1",
                "incomingFlows": [
                    {"region": "eu-west", "deliveryLatencyMs": 180, "messages": 42, "mirrorLagMs": 95, "reportedAt": ago(8)},
                    {"region": "ap-south", "deliveryLatencyMs": 1450, "messages": 7, "reportedAt": ago(12)}
                ],
                "rollout": {"updateRevision": "us-gateway-7c9a", "currentRevision": "us-gateway-7c9a", "updated": 2,
                            "total": 2, "phase": "Idle", "paused": false, "message": "all gateway pods updated"},
                "scaling": {"current": 2, "desired": 2, "min": 2, "max": 6, "targetConnectionsPerPod": 5000,
                            "connections": 3100, "reason": "3100 connections fit 2 pods at 5000 per pod"},
                "gatewayConnections": 3100
            }),
        ),
        region(
            "eu",
            "eu-west",
            "chat",
            json!({
                "observedGeneration": 3,
                "conditions": [
                    condition("Ready", "True", "AllPodsReady", "all pods ready"),
                    condition("Progressing", "True", "RollingOut", "rolling eu-gateway-2"),
                    condition("Degraded", "False", "Reconciled", "the spec is valid and applied"),
                ],
                "gatewaysReady": 3, "gatewaysDesired": 3, "routersReady": 2, "routersDesired": 2,
                "machineIdBlock": {"start": 0, "size": 16}, "machineIds": "0-15",
                "rollout": {"updateRevision": "eu-gateway-5d8f", "currentRevision": "eu-gateway-4b1e", "updated": 1,
                            "total": 3, "phase": "Draining",
                            "draining": {"pod": "eu-gateway-2", "connections": 120, "since": ago(40)},
                            "lastResumeRate": 0.985, "paused": false,
                            "message": "rolling eu-gateway-2: draining, 120 connections left"},
                "scaling": {"current": 3, "desired": 4, "min": 2, "max": 6, "targetConnectionsPerPod": 5000,
                            "connections": 17250, "reason": "17250 connections need 4 pods at 5000 per pod",
                            "lastScaleTime": ago(3600)},
                "gatewayConnections": 17250
            }),
        ),
        region(
            "ap",
            "ap-south",
            "chat",
            json!({
                "observedGeneration": 3,
                "conditions": [
                    condition("Ready", "False", "PodsNotReady", "1 of 2 gateway pods ready"),
                    condition("Progressing", "True", "RolloutPaused", "paused by parley.dev/rollout-paused"),
                    condition("Degraded", "False", "Reconciled", "the spec is valid and applied"),
                ],
                "gatewaysReady": 1, "gatewaysDesired": 2, "routersReady": 1, "routersDesired": 1,
                "machineIdBlock": {"start": 32, "size": 16}, "machineIds": "32-47",
                "rollout": {"updateRevision": "ap-gateway-2222", "currentRevision": "ap-gateway-1111", "updated": 0,
                            "total": 2, "phase": "Paused", "paused": true,
                            "message": "paused before ap-gateway-1"}
            }),
        ),
        // Another ChatCluster's Region in the same namespace: never shown.
        region(
            "lab",
            "lab",
            "other",
            json!({"conditions": ready_conditions(), "gatewaysReady": 9,
                                              "gatewaysDesired": 9}),
        ),
    ]
}

fn event(kind: &str, name: &str, type_: &str, reason: &str, seconds_ago: i64) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{name}.{reason}.{seconds_ago}"), "namespace": "parley"},
        "involvedObject": {"apiVersion": if kind == "Pod" { "v1" } else { "parley.dev/v1alpha1" },
                           "kind": kind, "name": name, "namespace": "parley"},
        "type": type_, "reason": reason, "message": format!("{reason} on {name}"),
        "eventTime": ago(seconds_ago) .replace('Z', ".000000Z"),
        "reportingComponent": "parley-operator", "reportingInstance": "parley-operator-0",
        "action": "Reconcile"
    }))
    .expect("Event")
}

fn events() -> Vec<Event> {
    let mut events = vec![
        event("Region", "ap", "Warning", "PodsNotReady", 20),
        event("ChatCluster", "chat", "Warning", "RegionDegraded", 5),
        event("Region", "us", "Warning", "MirrorLatencyOverBudget", 90),
        event("Region", "eu", "Normal", "Applied", 1),
        event("Pod", "ap-gateway-1", "Warning", "BackOff", 2),
        event("Region", "lab", "Warning", "Unrelated", 3),
    ];
    // Older warnings, more than the report keeps.
    for i in 0..10 {
        events.push(event("Region", "eu", "Warning", &format!("Old{i}"), 1000 + i * 60));
    }
    // A recurring Event (events.k8s.io series): its last observation counts, not its first.
    let mut recurring = event("Region", "eu", "Warning", "CassandraUnchecked", 7200);
    recurring.series = Some(
        serde_json::from_value(json!({"count": 4, "lastObservedTime": ago(60).replace('Z', ".000000Z")}))
            .expect("series"),
    );
    events.push(recurring);
    events
}

fn three_regions() -> StatusReport {
    let (cluster, regions, events) = (cluster(), regions(), events());
    report::build(&StatusInput { cluster: &cluster, regions: &regions, events: &events, now: now() })
}

#[test]
fn the_text_shows_every_section_for_three_regions() {
    let text = report::render_text(&three_regions());
    print!("{text}");
    let expected = "\
ChatCluster    chat
Namespace      parley
Version        0.4.2
Generation     5 (reconciled)
Regions ready  2/3

Conditions
  TYPE         STATUS  REASON              MESSAGE
  Ready        False   RegionsNotReady     2 of 3 regions ready
  Progressing  True    RegionsProgressing  rolling out: ap, eu
  Degraded     True    RegionDegraded      degraded: us

Machine IDs: 48/1024 allocated
  BLOCK  SIZE  REGION  STATE
  0-15   16    eu      held
  16-31  16    us      held
  32-47  16    ap      held
  48-63  16    old     quarantined, reusable in 30s

Regions
  NAME  REGION    READY  GATEWAYS  ROUTERS  CONNECTIONS  MACHINE IDS  ROLLOUT       SCALING (DESIRED/MIN/MAX)
  ap    ap-south  False  1/2       1/1      -            32-47        0/2 Paused    -
  eu    eu-west   True   3/3       2/2      17250        0-15         1/3 Draining  4/2/6
  us    us-east   True   2/2       1/1      3100         16-31        2/2 Idle      2/2/6
  ap: Ready False (PodsNotReady): 1 of 2 gateway pods ready
  us: Degraded True (MirrorLatencyOverBudget): ap-south: 1450 ms over the 1000 ms budget

Rollout of Region ap (ap-south): 0/2 updated, Paused
  Last resume rate  -
  Paused            yes (kubectl parley rollout resume to go on)
  Revisions         ap-gateway-1111 -> ap-gateway-2222
  Message           paused before ap-gateway-1

Rollout of Region eu (eu-west): 1/3 updated, Draining
  Draining          eu-gateway-2, 120 connections left, since 40s ago
  Last resume rate  98.5%
  Paused            no
  Revisions         eu-gateway-4b1e -> eu-gateway-5d8f
  Message           rolling eu-gateway-2: draining, 120 connections left

Incoming MirrorMaker flows (latency budget 1000 ms)
  INTO     FROM      MIRRORMAKER  DELIVERY LATENCY  MIRROR LAG     MESSAGES  REPORTED  STATE
  us-east  ap-south  1/1          1450 ms           no beacon yet  7         12s ago   over budget
  us-east  eu-west   1/1          180 ms            95 ms          42        8s ago    ok

Warning events (last 10, newest first)
  LAST SEEN  OBJECT            REASON                   COUNT  MESSAGE
  5s ago     ChatCluster/chat  RegionDegraded           1      RegionDegraded on chat
  20s ago    Region/ap         PodsNotReady             1      PodsNotReady on ap
  60s ago    Region/eu         CassandraUnchecked       4      CassandraUnchecked on eu
  90s ago    Region/us         MirrorLatencyOverBudget  1      MirrorLatencyOverBudget on us
  16m ago    Region/eu         Old0                     1      Old0 on eu
  17m ago    Region/eu         Old1                     1      Old1 on eu
  18m ago    Region/eu         Old2                     1      Old2 on eu
  19m ago    Region/eu         Old3                     1      Old3 on eu
  20m ago    Region/eu         Old4                     1      Old4 on eu
  21m ago    Region/eu         Old5                     1      Old5 on eu
";
    assert_eq!(text, expected);
    let warnings: Vec<&str> = text.lines().skip_while(|line| !line.starts_with("Warning events")).collect();
    assert_eq!(warnings.len(), 2 + MAX_WARNINGS, "{warnings:#?}");
    let reasons: Vec<&str> =
        warnings[2..].iter().map(|line| line.split_whitespace().nth(3).unwrap_or_default()).collect();
    assert_eq!(
        reasons,
        [
            "RegionDegraded",
            "PodsNotReady",
            "CassandraUnchecked",
            "MirrorLatencyOverBudget",
            "Old0",
            "Old1",
            "Old2",
            "Old3",
            "Old4",
            "Old5"
        ]
    );
    assert!(
        warnings[4].contains("60s ago") && warnings[4].contains("Region/eu") && warnings[4].contains(" 4 "),
        "a series shows its last observation and its count: {}",
        warnings[4]
    );
    assert!(!text.contains("lab") && !text.contains("BackOff") && !text.contains("Applied"), "{text}");
}

#[test]
fn the_json_has_the_same_facts_under_stable_keys() {
    let report = three_regions();
    let json: Value = serde_json::from_str(&report::render_json(&report).expect("json")).expect("parse");
    assert_eq!(json["generatedAt"], NOW);
    assert_eq!(json["cluster"]["name"], "chat");
    assert_eq!(json["cluster"]["version"], "0.4.2");
    assert_eq!(json["cluster"]["observedGeneration"], 5);
    assert_eq!(json["cluster"]["conditions"][0]["type"], "Ready");
    assert_eq!(json["cluster"]["conditions"][0]["reason"], "RegionsNotReady");
    assert_eq!(json["machineIds"]["allocated"], 48);
    assert_eq!(json["machineIds"]["space"], 1024);
    assert_eq!(json["machineIds"]["blocks"][0], json!({"region": "eu", "start": 0, "size": 16, "range": "0-15"}));
    assert_eq!(json["machineIds"]["quarantined"][0]["reusableAt"], ago(-30));

    let names: Vec<&str> =
        json["regions"].as_array().expect("regions").iter().map(|r| r["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(names, ["ap", "eu", "us"]);
    let eu = &json["regions"][1];
    assert_eq!(eu["regionName"], "eu-west");
    assert_eq!(eu["gateways"], json!({"ready": 3, "desired": 3}));
    assert_eq!(eu["connections"], 17250);
    assert_eq!(eu["rollout"]["phase"], "Draining");
    assert_eq!(eu["rollout"]["inProgress"], true);
    assert_eq!(eu["rollout"]["draining"], json!({"pod": "eu-gateway-2", "connections": 120, "since": ago(40)}));
    assert_eq!(eu["rollout"]["lastResumeRate"], 0.985);
    assert_eq!(eu["scaling"]["desired"], 4);
    assert_eq!(eu["scaling"]["lastScaleTime"], ago(3600));

    // Stable keys: an unknown fact is null, not missing.
    let ap = &json["regions"][0];
    for key in ["connections", "scaling", "mirrorMaker"] {
        assert!(ap.get(key).is_some_and(Value::is_null), "ap.{key} should be null: {ap}");
    }
    assert!(ap["rollout"].get("draining").is_some_and(Value::is_null), "{ap}");
    assert!(ap["rollout"].get("lastResumeRate").is_some_and(Value::is_null), "{ap}");
    assert_eq!(ap["incomingFlows"], json!([]));

    let us = &json["regions"][2];
    assert_eq!(us["rollout"]["inProgress"], false);
    assert_eq!(us["mirrorMaker"], "1/1");
    assert_eq!(us["incomingFlows"][0]["fromRegion"], "ap-south");
    assert_eq!(us["incomingFlows"][0]["overBudget"], true);
    assert!(us["incomingFlows"][0].get("mirrorLagMs").is_some_and(Value::is_null));
    assert_eq!(us["incomingFlows"][1]["mirrorLagMs"], 95);

    let warnings = json["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), MAX_WARNINGS);
    assert_eq!(
        warnings[0],
        json!({"kind": "ChatCluster", "name": "chat", "reason": "RegionDegraded",
                                   "message": "RegionDegraded on chat", "count": 1, "lastSeen": ago(5)})
    );
    assert_eq!(warnings[2]["count"], 4);
    // The report serializes exactly what the text shows.
    assert_eq!(report.regions.len(), 3);
}

#[test]
fn a_cluster_the_operator_has_not_seen_yet_says_so() {
    let mut cluster = cluster();
    cluster.status = None;
    let report = report::build(&StatusInput { cluster: &cluster, regions: &[], events: &[], now: now() });
    let text = report::render_text(&report);
    for line in [
        "Generation     5 (not reconciled yet)",
        "Regions ready  -",
        "  none yet (the operator has not reconciled this ChatCluster)",
        "Machine IDs: 0/1024 allocated",
        "  none (no Region has spec.clusterRef: chat)",
        "Rollouts: none in progress",
        "Incoming MirrorMaker flows: none",
        "Warning events: none",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    let json: Value = serde_json::from_str(&report::render_json(&report).expect("json")).expect("parse");
    assert_eq!(json["regions"], json!([]));
    assert_eq!(json["warnings"], json!([]));
    assert!(json["cluster"].get("observedGeneration").is_some_and(Value::is_null));
}

#[test]
fn a_region_without_the_rollout_fields_shows_dashes() {
    let cluster = cluster();
    let regions = vec![region(
        "eu",
        "eu-west",
        "chat",
        json!({
            "conditions": ready_conditions(), "gatewaysReady": 2, "gatewaysDesired": 2, "routersReady": 1,
            "routersDesired": 1, "machineIds": "0-15"
        }),
    )];
    let report = report::build(&StatusInput { cluster: &cluster, regions: &regions, events: &[], now: now() });
    let text = report::render_text(&report);
    let row = text.lines().find(|l| l.starts_with("  eu ")).expect("eu row");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["eu", "eu-west", "True", "2/2", "1/1", "-", "0-15", "-", "-"]
    );
    assert!(text.contains("Rollouts: none in progress"), "{text}");
    assert!(!text.contains("eu: Ready"), "a ready Region needs no attention line: {text}");
}

#[test]
fn ages_read_like_kubectl() {
    let cluster = cluster();
    let regions: Vec<Region> = [(59, "59s ago"), (119 * 60, "119m ago"), (5 * 3600, "5h ago"), (3 * 86_400, "3d ago")]
        .iter()
        .enumerate()
        .map(|(i, (seconds, _))| {
            region(
                &format!("r{i}"),
                &format!("r{i}"),
                "chat",
                json!({"rollout": {
                "updated": 0, "total": 1, "phase": "Draining", "paused": false,
                "draining": {"pod": format!("r{i}-gateway-0"), "connections": 1, "since": ago(*seconds)}}}),
            )
        })
        .collect();
    let report = report::build(&StatusInput { cluster: &cluster, regions: &regions, events: &[], now: now() });
    let text = report::render_text(&report);
    for expected in ["59s ago", "119m ago", "5h ago", "3d ago"] {
        assert!(text.contains(&format!("since {expected}")), "missing {expected} in\n{text}");
    }
}
