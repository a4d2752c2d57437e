//! Leader election on a `coordination.k8s.io/v1` Lease (crate `kube-lease-manager`), so that of several operator
//! replicas only the holder of the Lease runs the controller and writes.
//!
//! The replica waits until it holds the Lease, then runs the controller. When it loses the Lease it drops the
//! controller at once (every in-flight reconcile is cancelled at its next await) and waits to be elected again.
//! On shutdown the controller finishes its in-flight reconciles, and the Lease is released so that another
//! replica takes over without waiting for it to expire.
//!
//! The lease manager only reports a loss once it can read the Lease again. So that a leader that cannot renew
//! (API server slow or unreachable for it) never writes after another replica may have taken over, a watchdog
//! reads the Lease twice a second while leading and ends the process ([`Error::LeaseExpired`]) shortly before
//! the last renewal it saw runs out, or at once when another replica holds the Lease. The pod is restarted and
//! contends again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
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
            error = watchdog(client.clone(), &settings) => {
                // The controller is dropped with this branch: nothing more is written.
                context.metrics.leader.set(0);
                return Err(error);
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

/// How often the watchdog reads the Lease.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);

/// Resolves with an error when this replica can no longer be sure it holds the Lease: another replica holds it, or
/// the last renewal it saw expires within the safety margin (a quarter of the grace period, 0.1 to 1 s).
async fn watchdog(client: Client, settings: &LeaseSettings) -> Error {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let margin_ms = i64::try_from((settings.grace_seconds * 1000 / 4).clamp(100, 1000)).unwrap_or(1000);
    let duration_ms = i64::try_from(settings.duration_seconds * 1000).unwrap_or(i64::MAX);
    // Just elected: the Lease was renewed a moment ago.
    let mut valid_until_ms = Timestamp::now().as_millisecond().saturating_add(duration_ms - margin_ms);
    loop {
        if let Ok(Ok(lease)) = tokio::time::timeout(WATCHDOG_PERIOD, leases.get(&settings.name)).await {
            let spec = lease.spec.unwrap_or_default();
            match spec.holder_identity {
                Some(holder) if holder == settings.identity => {
                    if let Some(renewed) = spec.renew_time {
                        let seconds = spec.lease_duration_seconds.map(i64::from).unwrap_or(0);
                        valid_until_ms = renewed.0.as_millisecond().saturating_add(seconds * 1000 - margin_ms);
                    }
                }
                holder => return Error::LeaseLost { lease: settings.name.clone(), holder: holder.unwrap_or_default() },
            }
        }
        // A failed read keeps the last renewal seen.
        if Timestamp::now().as_millisecond() >= valid_until_ms {
            return Error::LeaseExpired { lease: settings.name.clone() };
        }
        tokio::time::sleep(WATCHDOG_PERIOD).await;
    }
}
