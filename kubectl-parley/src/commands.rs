//! The commands that talk to the API server: [`connect`] loads the kubeconfig, [`status`] reads a ChatCluster, its
//! Regions and the namespace's Warning Events and renders them through [`crate::report`], [`drain`] and
//! [`rollout`] set the operator's annotations with merge patches. Each returns the text to print.

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use parley_crds::common::{
    DRAIN_ANNOTATION, GATEWAY_STATUS_ANNOTATION, RESTART_AT_ANNOTATION, ROLLOUT_PAUSED_ANNOTATION,
};
use parley_crds::{ChatCluster, Region};
use serde_json::json;
use tracing::instrument;

use crate::cli::{ConnectionArgs, OutputFormat, RolloutCommand, StatusArgs};
use crate::error::Error;
use crate::report::{self, StatusInput, StatusReport};

/// The label every Parley pod carries with its ChatCluster's name (`operator/src/build.rs`, `CLUSTER_LABEL`).
pub const CLUSTER_LABEL: &str = "parley.dev/cluster";
/// The label with the Region object's name (`operator/src/build.rs`, `REGION_LABEL`).
pub const REGION_LABEL: &str = "parley.dev/region";
/// The standard component label: `gateway` on gateway pods (`operator/src/build.rs`, `COMPONENT_LABEL`).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The value of [`COMPONENT_LABEL`] on gateway pods.
pub const GATEWAY_COMPONENT: &str = "gateway";

/// A client and the namespace the commands work in.
#[derive(Clone)]
pub struct Connection {
    /// The client.
    pub client: Client,
    /// `-n/--namespace`, else the kubeconfig context's namespace, else `default`.
    pub namespace: String,
}

/// Loads the configuration the way kubectl does: `--kubeconfig` (with `--context`), else `KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster configuration.
#[instrument(skip_all)]
pub async fn connect(args: &ConnectionArgs) -> Result<Connection, Error> {
    let options = KubeConfigOptions { context: args.context.clone(), ..KubeConfigOptions::default() };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig { path: path.clone(), source })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| Error::LoadKubeconfig { context: args.context.clone(), source })?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options)
            .await
            .map_err(|source| Error::LoadKubeconfig { context: args.context.clone(), source })?,
        (None, None) => Config::infer().await.map_err(Error::InferConfig)?,
    };
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(Error::Client)?;
    Ok(Connection { client, namespace })
}

/// What `status` prints: the rendered report, and notes for stderr (what could not be read).
#[derive(Debug)]
pub struct StatusOutput {
    /// Text or JSON, ending with a newline.
    pub stdout: String,
    /// Facts left out, one line each.
    pub notes: Vec<String>,
}

/// Reads the ChatCluster (the only one of the namespace when `args.cluster` is not set), its Regions and the
/// namespace's Warning Events, and renders them.
#[instrument(skip(connection), fields(namespace = %connection.namespace))]
pub async fn status(connection: &Connection, args: &StatusArgs) -> Result<StatusOutput, Error> {
    let (report, notes) = fetch_report(connection, args.cluster.as_deref()).await?;
    let stdout = match args.output {
        OutputFormat::Text => report::render_text(&report),
        OutputFormat::Json => report::render_json(&report)? + "\n",
    };
    Ok(StatusOutput { stdout, notes })
}

/// Reads the objects `status` shows and builds the report.
pub async fn fetch_report(
    connection: &Connection,
    cluster: Option<&str>,
) -> Result<(StatusReport, Vec<String>), Error> {
    let namespace = connection.namespace.as_str();
    let clusters: Api<ChatCluster> = Api::namespaced(connection.client.clone(), namespace);
    let cluster = match cluster {
        Some(name) => {
            clusters.get(name).await.map_err(|e| Error::from_api(e, "get", "ChatCluster", Some(name), namespace))?
        }
        None => {
            let mut list = clusters
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::from_api(e, "list", "ChatCluster", None, namespace))?
                .items;
            match list.len() {
                0 => return Err(Error::NoChatCluster { namespace: namespace.to_owned() }),
                1 => list.remove(0),
                _ => {
                    let mut names: Vec<String> = list.iter().map(|c| c.name_any()).collect();
                    names.sort();
                    return Err(Error::SeveralChatClusters { namespace: namespace.to_owned(), names });
                }
            }
        }
    };
    let regions: Api<Region> = Api::namespaced(connection.client.clone(), namespace);
    let regions = regions
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::from_api(e, "list", "Region", None, namespace))?
        .items;
    let mut notes = Vec::new();
    let events: Api<Event> = Api::namespaced(connection.client.clone(), namespace);
    let events = match events.list(&ListParams::default().fields("type=Warning")).await {
        Ok(list) => list.items,
        // Events are a nicety: without the right to list them, show the rest.
        Err(error) => match Error::from_api(error, "list", "Event", None, namespace) {
            forbidden @ Error::Forbidden { .. } => {
                notes.push(format!("warning events left out: {forbidden}"));
                Vec::new()
            }
            other => return Err(other),
        },
    };
    let now = Timestamp::now();
    let report = report::build(&StatusInput { cluster: &cluster, regions: &regions, events: &events, now });
    Ok((report, notes))
}

/// Now, to the second, as RFC 3339 (`2025-01-01T12:00:00Z`).
fn now_rfc3339() -> String {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now).to_string()
}

/// Sets `parley.dev/drain` on a Parley gateway pod (refusing any other pod) and says what happens next. A pod that
/// is already draining is left as it is.
#[instrument(skip(connection), fields(namespace = %connection.namespace))]
pub async fn drain(connection: &Connection, pod_name: &str) -> Result<String, Error> {
    let namespace = connection.namespace.as_str();
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), namespace);
    let pod = pods.get(pod_name).await.map_err(|e| Error::from_api(e, "get", "Pod", Some(pod_name), namespace))?;
    let labels = pod.labels();
    let not_a_gateway =
        |why: String| Error::NotAGateway { pod: pod_name.to_owned(), namespace: namespace.to_owned(), why };
    match labels.get(COMPONENT_LABEL) {
        Some(component) if component == GATEWAY_COMPONENT => {}
        Some(component) => return Err(not_a_gateway(format!("its {COMPONENT_LABEL} label is {component}"))),
        None => return Err(not_a_gateway(format!("it has no {COMPONENT_LABEL} label"))),
    }
    let Some(cluster) = labels.get(CLUSTER_LABEL).cloned() else {
        return Err(not_a_gateway(format!("it has no {CLUSTER_LABEL} label")));
    };
    let region = labels.get(REGION_LABEL).cloned().unwrap_or_else(|| "?".to_owned());
    let owner = format!("pod {pod_name} (Region {region}, ChatCluster {cluster}, namespace {namespace})");

    if let Some(since) = pod.annotations().get(DRAIN_ANNOTATION).filter(|value| !value.is_empty()) {
        return Ok(format!(
            "{owner} is already draining: {DRAIN_ANNOTATION} was set at {since}; nothing changed.\n\
             Once its connections are gone (or its drain deadline has passed) the operator deletes it and its \
             StatefulSet starts a fresh one.\n"
        ));
    }
    let connections = pod
        .annotations()
        .get(GATEWAY_STATUS_ANNOTATION)
        .and_then(|value| serde_json::from_str::<serde_json::Value>(value).ok())
        .and_then(|value| value.get("connections").and_then(serde_json::Value::as_u64));
    let now = now_rfc3339();
    let patch = json!({"metadata": {"annotations": {DRAIN_ANNOTATION: now}}});
    pods.patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| Error::from_api(e, "patch", "Pod", Some(pod_name), namespace))?;
    let clients = match connections {
        Some(n) => format!("its {n} clients (as it last reported)"),
        None => "its clients".to_owned(),
    };
    Ok(format!(
        "{owner}: drain requested at {now} ({DRAIN_ANNOTATION}).\n\
         Next: the gateway stops accepting connections and asks {clients} to reconnect to the other gateways, \
         spread over its drain window. It then stays up, not ready and not accepting, until the pod is deleted; \
         removing the annotation does not undo the drain.\n\
         Follow its connections in its {GATEWAY_STATUS_ANNOTATION} annotation (or `kubectl parley status`); once \
         they are gone, or its drain deadline has passed, the operator deletes the pod and its StatefulSet starts a \
         fresh one.\n"
    ))
}

/// `rollout restart|pause|resume`: one merge patch of the Region's annotations, and what happens next.
#[instrument(skip(connection), fields(namespace = %connection.namespace))]
pub async fn rollout(connection: &Connection, command: &RolloutCommand) -> Result<String, Error> {
    let namespace = connection.namespace.as_str();
    let regions: Api<Region> = Api::namespaced(connection.client.clone(), namespace);
    let (name, annotations) = match command {
        RolloutCommand::Restart(arg) => (&arg.region, json!({RESTART_AT_ANNOTATION: now_rfc3339()})),
        RolloutCommand::Pause(arg) => (&arg.region, json!({ROLLOUT_PAUSED_ANNOTATION: "true"})),
        RolloutCommand::Resume(arg) => (&arg.region, json!({ROLLOUT_PAUSED_ANNOTATION: null})),
    };
    let patch = json!({"metadata": {"annotations": annotations}});
    let region = regions
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| Error::from_api(e, "patch", "Region", Some(name), namespace))?;
    let paused = region.annotations().get(ROLLOUT_PAUSED_ANNOTATION).is_some_and(|value| value == "true");
    let subject = format!("Region {name} (region {}, namespace {namespace})", region.spec.region_name);
    let follow = format!("Follow it with `kubectl parley status -n {namespace}`.");
    Ok(match command {
        RolloutCommand::Restart(_) => {
            let at = region.annotations().get(RESTART_AT_ANNOTATION).cloned().unwrap_or_default();
            let held = if paused {
                format!(
                    "\nThe rollout is paused ({ROLLOUT_PAUSED_ANNOTATION}): it starts once resumed \
                     (`kubectl parley rollout resume {name} -n {namespace}`)."
                )
            } else {
                String::new()
            };
            format!(
                "{subject}: restart requested at {at} ({RESTART_AT_ANNOTATION}).\n\
                 Next: the operator rolls every gateway pod, one at a time, each drained before it is replaced, and \
                 the router pods. {follow}{held}\n"
            )
        }
        RolloutCommand::Pause(_) => format!(
            "{subject}: rollout paused ({ROLLOUT_PAUSED_ANNOTATION}: \"true\").\n\
             Next: the step in flight finishes; the operator starts no new drain, replacement or scale-down until \
             `kubectl parley rollout resume {name} -n {namespace}`. {follow}\n"
        ),
        RolloutCommand::Resume(_) => format!(
            "{subject}: rollout resumed ({ROLLOUT_PAUSED_ANNOTATION} removed).\n\
             Next: the operator goes on with the next drain, replacement or scale step. {follow}\n"
        ),
    })
}
