//! The runner's Node objects, kept alive like a kubelet keeps its own: registered at start (labels, taints, capacity,
//! address 127.0.0.1), `Ready` with a heartbeat every [`STATUS_EVERY`], and a Lease in `kube-node-lease` renewed every
//! [`LEASE_EVERY`], so the node lifecycle controller never marks them NotReady. They carry no
//! `kwok.x-k8s.io/node` annotation, so kwok leaves them alone.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use std::collections::BTreeMap;
use std::time::Duration;

/// How often the Leases are renewed.
pub const LEASE_EVERY: Duration = Duration::from_secs(10);
/// How often the Ready condition's heartbeat is written.
pub const STATUS_EVERY: Duration = Duration::from_secs(30);
/// The Lease duration (as kwok's nodes have it in `e2e/k8s/up.sh`).
const LEASE_SECONDS: i32 = 40;

/// The nodes one runner serves.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// Node names.
    pub names: Vec<String>,
    /// Labels besides the standard ones.
    pub labels: BTreeMap<String, String>,
    /// Taints, `KEY[=VALUE]:EFFECT`.
    pub taints: Vec<Taint>,
    /// Pods per node.
    pub max_pods: u32,
}

/// Parses `KEY[=VALUE]:EFFECT`.
pub fn parse_taint(text: &str) -> Result<Taint, String> {
    let (pair, effect) = text.rsplit_once(':').ok_or_else(|| format!("a taint is KEY[=VALUE]:EFFECT, not {text:?}"))?;
    if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
        return Err(format!("taint {text:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"));
    }
    let (key, value) = match pair.split_once('=') {
        Some((key, value)) => (key, Some(value.to_owned())),
        None => (pair, None),
    };
    if key.is_empty() {
        return Err(format!("taint {text:?} has no key"));
    }
    Ok(Taint { key: key.to_owned(), value, effect: effect.to_owned(), time_added: None })
}

/// Parses `KEY=VALUE`.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("a label is KEY=VALUE, not {text:?}"))
}

fn quantity(text: &str) -> Quantity {
    Quantity(text.to_owned())
}

/// The Node object of `name` (metadata and spec).
pub fn node(settings: &NodeSettings, name: &str) -> Node {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        (
            "kubernetes.io/arch".to_owned(),
            std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        ),
        ("type".to_owned(), "parley-pod-runner".to_owned()),
    ]);
    labels.extend(settings.labels.clone());
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([("node.alpha.kubernetes.io/ttl".to_owned(), "0".to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: (!settings.taints.is_empty()).then(|| settings.taints.clone()),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The Node's status: Ready now, with its capacity.
pub fn status(settings: &NodeSettings, name: &str, ready_since: Timestamp) -> NodeStatus {
    let now = Time(Timestamp::now());
    let resources = BTreeMap::from([
        ("cpu".to_owned(), quantity("32")),
        ("memory".to_owned(), quantity("256Gi")),
        ("pods".to_owned(), quantity(&settings.max_pods.to_string())),
        ("ephemeral-storage".to_owned(), quantity("100Gi")),
    ]);
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(Time(ready_since)),
    };
    NodeStatus {
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".to_owned(), address: "127.0.0.1".to_owned() },
            NodeAddress { type_: "Hostname".to_owned(), address: name.to_owned() },
        ]),
        allocatable: Some(resources.clone()),
        capacity: Some(resources),
        conditions: Some(vec![
            condition("Ready", "True", "KubeletReady", "parley-pod-runner is serving this node"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory accounting"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk accounting"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no pid accounting"),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.to_owned(),
            operating_system: "linux".to_owned(),
            os_image: "parley-pod-runner (processes on the host)".to_owned(),
            kernel_version: String::new(),
            container_runtime_version: "parley-pod-runner://0.1.0".to_owned(),
            kubelet_version: "v1.36.0-parley-pod-runner".to_owned(),
            kube_proxy_version: String::new(),
            machine_id: String::new(),
            system_uuid: String::new(),
            boot_id: String::new(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

/// Creates the Node (or takes over an existing one of that name: labels and taints are set again), then marks it
/// Ready.
pub async fn register(client: &Client, settings: &NodeSettings, name: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let wanted = node(settings, name);
    match nodes.create(&PostParams::default(), &wanted).await {
        Ok(_) => {}
        Err(kube::Error::Api(response)) if response.code == 409 => {
            let patch = serde_json::json!({
                "metadata": {"labels": wanted.metadata.labels},
                "spec": {"taints": wanted.spec.as_ref().and_then(|spec| spec.taints.clone()), "unschedulable": false},
            });
            nodes.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
        }
        Err(error) => return Err(error),
    }
    heartbeat(client, settings, name, Timestamp::now()).await
}

/// Writes the Node's status (its heartbeat).
pub async fn heartbeat(
    client: &Client,
    settings: &NodeSettings,
    name: &str,
    ready_since: Timestamp,
) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({"status": status(settings, name, ready_since)});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ())
}

/// Creates or renews the Node's Lease.
pub async fn renew_lease(client: &Client, name: &str) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let now = MicroTime(Timestamp::now());
    if let Some(mut lease) = leases.get_opt(name).await? {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.renew_time = Some(now);
        spec.holder_identity = Some(name.to_owned());
        spec.lease_duration_seconds = Some(LEASE_SECONDS);
        leases.replace(name, &PostParams::default(), &lease).await?;
        return Ok(());
    }
    let node = nodes.get(name).await?;
    let owner = OwnerReference {
        api_version: Node::api_version(&()).into_owned(),
        kind: Node::kind(&()).into_owned(),
        name: name.to_owned(),
        uid: node.metadata.uid.unwrap_or_default(),
        ..OwnerReference::default()
    };
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("kube-node-lease".to_owned()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_owned()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await.map(|_| ())
}

/// Deletes the Node (its Lease goes with it, by owner reference).
pub async fn delete(client: &Client, name: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(response)) if response.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_and_labels_parse() {
        let taint = parse_taint("parley.dev/pod-runner=x:NoSchedule").expect("taint");
        assert_eq!(
            (taint.key.as_str(), taint.value.as_deref(), taint.effect.as_str()),
            ("parley.dev/pod-runner", Some("x"), "NoSchedule")
        );
        assert_eq!(parse_taint("k:NoExecute").expect("taint").value, None);
        assert!(
            parse_taint("k=v").is_err() && parse_taint("k:Sometimes").is_err() && parse_taint("=v:NoSchedule").is_err()
        );
        assert_eq!(parse_label("a=b"), Ok(("a".to_owned(), "b".to_owned())));
        assert!(parse_label("ab").is_err());
    }

    #[test]
    fn nodes_carry_no_kwok_annotation_and_are_ready() {
        let settings = NodeSettings {
            names: vec!["n-0".into()],
            labels: BTreeMap::from([("parley.dev/pod-runner".to_owned(), "t".to_owned())]),
            taints: vec![parse_taint("parley.dev/pod-runner=t:NoSchedule").expect("taint")],
            max_pods: 110,
        };
        let node = node(&settings, "n-0");
        let annotations = node.metadata.annotations.clone().unwrap_or_default();
        assert!(!annotations.contains_key("kwok.x-k8s.io/node"));
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("kubernetes.io/hostname").map(String::as_str), Some("n-0"));
        assert_eq!(labels.get("parley.dev/pod-runner").map(String::as_str), Some("t"));
        assert_eq!(node.spec.and_then(|spec| spec.taints).map(|taints| taints.len()), Some(1));
        let status = status(&settings, "n-0", Timestamp::now());
        let ready = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Ready").expect("Ready");
        assert_eq!(ready.status, "True");
        assert_eq!(status.allocatable.and_then(|a| a.get("pods").cloned()), Some(Quantity("110".into())));
    }
}
