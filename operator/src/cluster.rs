//! The ChatCluster side of the controller.
//!
//! - **Ownership.** Every Region gets an ownerReference to its ChatCluster ([`ensure_owner`]; `controller: false`,
//!   `blockOwnerDeletion: true`), set by the operator with server-side apply under its own field manager
//!   ([`OWNER_FIELD_MANAGER`]), so deleting a ChatCluster lets Kubernetes' garbage collector delete its Regions;
//!   their finalizers then run, and their objects go by their own ownerReferences. A GitOps tool that applies the
//!   Region keeps the reference: it is a field of another manager, and not in the tool's manifest.
//! - **Summary without Regions.** The Region reconciles write the ChatCluster's summary (`regionsReady`, the
//!   per-Region summaries and the rolled-up conditions). A ChatCluster that no Region names has no such reconcile,
//!   so this controller writes its status: `observedGeneration`, `Ready` False with reason `NoRegions`,
//!   `Progressing` and `Degraded` False, `regionsReady` `0/0`. It watches ChatClusters and Regions (each mapped to
//!   its ChatCluster), so the summary follows the last Region's deletion and every spec change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use parley_crds::{ChatCluster, ChatClusterStatus, Region};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use crate::controller::{Context, Scope};
use crate::error::Error;
use crate::status;

/// The field manager of the ownerReference the operator adds to each Region: distinct from the one it applies the
/// Regions' objects with, so that the reference is the only field of the Region it owns.
pub const OWNER_FIELD_MANAGER: &str = "parley-operator-owner";

/// How soon a ChatCluster whose reconcile failed is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The ownerReference of a Region to its ChatCluster: not the controller (the ChatCluster does not reconcile the
/// Region), but it blocks the ChatCluster's foreground deletion until the Region is gone. `None` when the
/// ChatCluster has no uid (it was not read from the API server).
pub fn owner_reference(cluster: &ChatCluster) -> Option<OwnerReference> {
    let uid = cluster.metadata.uid.clone().filter(|uid| !uid.is_empty())?;
    Some(OwnerReference {
        api_version: ChatCluster::api_version(&()).into_owned(),
        kind: ChatCluster::kind(&()).into_owned(),
        name: cluster.name_any(),
        uid,
        controller: Some(false),
        block_owner_deletion: Some(true),
    })
}

/// Adds the ownerReference to its ChatCluster ([`owner_reference`]) to the Region unless it has it. Server-side
/// apply of that one list entry (ownerReferences merge by uid): other owners and every other field stay as they
/// are.
pub async fn ensure_owner(region: &Region, cluster: &ChatCluster, context: &Context) -> Result<(), Error> {
    let Some(owner) = owner_reference(cluster) else {
        return Ok(());
    };
    if region.owner_references().iter().any(|existing| existing.uid == owner.uid) {
        return Ok(());
    }
    let name = region.name_any();
    let namespace = region.namespace().unwrap_or_default();
    let patch = json!({
        "apiVersion": Region::api_version(&()),
        "kind": Region::kind(&()),
        "metadata": { "name": name, "namespace": namespace, "ownerReferences": [owner] },
    });
    let regions: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    regions.patch(&name, &PatchParams::apply(OWNER_FIELD_MANAGER).force(), &Patch::Apply(&patch)).await.map_err(
        |source| {
            Error::kube(
                format!("add the ownerReference to ChatCluster {} to Region {namespace}/{name}", owner.name),
                source,
            )
        },
    )?;
    context.metrics.wrote("apply");
    info!(cluster = %owner.name, "owner reference to the chat cluster added");
    Ok(())
}

/// Runs the ChatCluster controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    scope: Scope,
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (clusters, regions): (Api<ChatCluster>, Api<Region>) = match &scope {
        Scope::All => (Api::all(client.clone()), Api::all(client.clone())),
        Scope::Namespace(namespace) => {
            (Api::namespaced(client.clone(), namespace), Api::namespaced(client.clone(), namespace))
        }
    };
    Controller::new(clusters, watcher::Config::default())
        .watches(regions, watcher::Config::default(), |region| {
            let namespace = region.namespace().unwrap_or_default();
            Some(ObjectRef::<ChatCluster>::new(&region.spec.cluster_ref).within(&namespace))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "chat cluster reconcile failed");
            }
        })
        .await;
}

/// Writes the status of a ChatCluster that no Region names; one that has Regions is left to their reconciles.
#[instrument(skip(cluster, context), fields(namespace = cluster.namespace().unwrap_or_default(), cluster = cluster.name_any()))]
async fn reconcile(cluster: Arc<ChatCluster>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = summarize(&cluster, &context).await;
    context.metrics.reconciled(started.elapsed(), result.as_ref().err());
    result
}

async fn summarize(cluster: &ChatCluster, context: &Context) -> Result<Action, Error> {
    if cluster.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let regions: Api<Region> = Api::namespaced(context.client.clone(), &namespace);
    let listed = regions
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::kube(format!("list Regions in {namespace}"), source))?
        .items;
    let members: Vec<Region> = listed
        .into_iter()
        .filter(|region| region.spec.cluster_ref == name && region.metadata.deletion_timestamp.is_none())
        .collect();
    if !members.is_empty() {
        return Ok(Action::await_change());
    }
    let new_status = status::cluster(cluster, &members, None, Timestamp::now());
    let old_status = cluster.status.clone().unwrap_or_default();
    if summary(&old_status) == summary(&new_status) {
        return Ok(Action::await_change());
    }
    // Only the summary fields, without a precondition, as the Region reconciles write them: the machine-ID
    // allocation (quarantined blocks of deleted Regions) stays as it is.
    let patch = json!({ "status": {
        "observedGeneration": new_status.observed_generation,
        "conditions": new_status.conditions,
        "regionsReady": new_status.regions_ready,
        "regions": new_status.regions,
    }});
    let clusters: Api<ChatCluster> = Api::namespaced(context.client.clone(), &namespace);
    clusters
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::kube(format!("write ChatCluster {namespace}/{name} status summary"), source))?;
    context.metrics.wrote("status");
    info!("chat cluster has no regions: status written");
    Ok(Action::await_change())
}

/// The fields of a ChatCluster's status that summarize its Regions.
fn summary(status: &ChatClusterStatus) -> impl PartialEq + '_ {
    (&status.observed_generation, &status.conditions, &status.regions_ready, &status.regions)
}

fn error_policy(cluster: Arc<ChatCluster>, error: &Error, _context: Arc<Context>) -> Action {
    warn!(cluster = %cluster.name_any(), %error, "chat cluster reconcile failed, retrying");
    Action::requeue(RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_reference_blocks_deletion_without_controlling() {
        let mut cluster: ChatCluster = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
            "metadata": {"name": "chat", "namespace": "ns"},
            "spec": {"version": "0.1.0", "kafka": {}, "cassandra": {"contactPoints": ["c"], "keyspace": "k"},
                     "auth": {"jwtKeySecret": {"name": "s", "key": "k"}}}
        }))
        .expect("cluster");
        assert_eq!(owner_reference(&cluster), None, "no uid: not read from the API server");
        cluster.metadata.uid = Some("uid-chat".into());
        let owner = owner_reference(&cluster).expect("owner");
        assert_eq!(
            (owner.api_version.as_str(), owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("parley.dev/v1alpha1", "ChatCluster", "chat", "uid-chat")
        );
        assert_eq!((owner.controller, owner.block_owner_deletion), (Some(false), Some(true)));
    }

    #[test]
    fn a_cluster_without_regions_is_not_ready_for_that_reason() {
        let mut cluster: ChatCluster = serde_json::from_value(json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ChatCluster",
            "metadata": {"name": "chat", "namespace": "ns", "generation": 4},
            "spec": {"version": "0.1.0", "kafka": {}, "cassandra": {"contactPoints": ["c"], "keyspace": "k"},
                     "auth": {"jwtKeySecret": {"name": "s", "key": "k"}}}
        }))
        .expect("cluster");
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let written = status::cluster(&cluster, &[], None, now);
        assert_eq!(written.observed_generation, Some(4));
        assert_eq!(written.regions_ready.as_deref(), Some("0/0"));
        let find = |type_: &str| written.conditions.iter().find(|c| c.type_ == type_).expect("condition").clone();
        let ready = find("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str(), ready.message.as_str()),
            ("False", "NoRegions", "no Region names this ChatCluster")
        );
        assert_eq!(find("Progressing").status, "False");
        assert_eq!(find("Degraded").status, "False");
        // Written once: recomputing it later gives an equal summary, so nothing more is written.
        cluster.status = Some(written.clone());
        let again = status::cluster(&cluster, &[], None, now.checked_add(Duration::from_secs(60)).expect("time"));
        assert!(summary(&again) == summary(&written));
    }
}
