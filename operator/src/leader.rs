//! Leader election on a `coordination.k8s.io/v1` Lease (crate `kube-lease-manager`), so that of several operator
//! replicas only the holder of the Lease runs the controller and writes.
//!
//! The replica waits until it holds the Lease, then runs the controller. When it loses the Lease it drops the
//! controller at once (every in-flight reconcile is cancelled at its next await) and waits to be elected again.
//! On shutdown the controller finishes its in-flight reconciles, and the Lease is released so that another
//! replica takes over without waiting for it to expire.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::{self, Context, Scope};
use crate::error::Error;

/// How the Lease is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity in `spec.holderIdentity`; unique per replica.
    pub identity: String,
    /// Seconds a Lease stays valid after its last renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews (also the clock skew tolerated between replicas).
    pub grace_seconds: u64,
}

/// How long a shutting-down leader waits for in-flight reconciles.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the controller whenever this replica holds the Lease, until `shutdown` resolves.
pub async fn run(
    client: Client,
    scope: Scope,
    settings: LeaseSettings,
    context: Arc<Context>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace(settings.grace_seconds)
        .build()
        .await
        .map_err(|source| Error::LeaderElection { lease: settings.name.clone(), source })?;
    let (mut leader, lease_task) = manager.watch().await;
    tokio::pin!(shutdown);
    info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "waiting for the lease");
    loop {
        // Wait until this replica holds the Lease.
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() {
                        return Err(Error::LeaseWatchEnded { lease: settings.name.clone() });
                    }
                }
                () = &mut shutdown => {
                    drop(leader);
                    let _ = lease_task.await;
                    return Ok(());
                }
            }
        }
        info!(lease = %settings.name, identity = %settings.identity, "holding the lease: starting the controller");
        context.metrics.leader.set(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let controller = controller::run(client.clone(), scope.clone(), context.clone(), async move {
            let _ = stopped.await;
        });
        tokio::pin!(controller);
        tokio::select! {
            () = &mut controller => {
                context.metrics.leader.set(0);
                return Err(Error::ControllerEnded);
            }
            lost = lost(&mut leader) => {
                // Dropping the controller cancels every reconcile at once: nothing more is written.
                context.metrics.leader.set(0);
                if lost.is_err() {
                    return Err(Error::LeaseWatchEnded { lease: settings.name.clone() });
                }
                warn!(lease = %settings.name, "lost the lease: controller stopped");
            }
            () = &mut shutdown => {
                let _ = stop.send(());
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut controller).await.is_err() {
                    warn!("in-flight reconciles did not finish in time");
                }
                context.metrics.leader.set(0);
                drop(leader);
                // The lease task sees the closed channel and releases the Lease.
                let _ = lease_task.await;
                info!(lease = %settings.name, "lease released");
                return Ok(());
            }
        }
    }
}

/// Resolves when the Lease is lost, or with an error when the lease task ended.
async fn lost(leader: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    loop {
        leader.changed().await?;
        if !*leader.borrow_and_update() {
            return Ok(());
        }
    }
}
