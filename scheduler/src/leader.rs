//! Scheduler leader election through the cluster state: the leader holds
//! `leader/scheduler`, bound to its lease; the others wait for the key to go and try again.
//! Losing the lease means losing the lead.

use std::time::Duration;

use kiln_core::records::{LeaderRecord, SCHEMA, now_unix_ms};
use kiln_registry::{LeaseId, Registry, WatchedView};
use tokio::sync::watch;

/// This scheduler leads until [`Leadership::lost`] resolves or it resigns.
pub struct Leadership {
    registry: Registry,
    lease: LeaseId,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when the lease could not be renewed: another scheduler may lead now.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Give the lead up now (revoking the lease deletes the key), so a standby takes over
    /// without waiting for the lease to expire.
    pub async fn resign(self) {
        self.keeper.abort();
        if let Err(e) = self.registry.store().revoke_lease(self.lease).await {
            tracing::warn!(error = %e, "could not revoke the leader lease");
        }
    }
}

/// Wait until this scheduler leads (or `shutdown` resolves: None). `ttl` bounds how long a
/// dead leader keeps the lead.
pub async fn campaign(
    registry: &Registry,
    view: &WatchedView,
    id: &str,
    address: &str,
    ttl: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Option<Leadership> {
    tokio::pin!(shutdown);
    let mut announced = None;
    loop {
        let attempt = async {
            let lease = registry.grant_lease(ttl).await?;
            let record = LeaderRecord {
                schema: SCHEMA,
                id: id.to_owned(),
                address: address.to_owned(),
                since_unix_ms: now_unix_ms(),
            };
            match registry.campaign(&record, lease).await {
                Ok(None) => Ok(Ok(lease)),
                Ok(Some(other)) => {
                    let _ = registry.store().revoke_lease(lease).await;
                    Ok(Err(other))
                }
                Err(e) => {
                    let _ = registry.store().revoke_lease(lease).await;
                    Err(e)
                }
            }
        };
        match attempt.await {
            Ok(Ok(lease)) => {
                tracing::info!(scheduler = id, "leading the cluster");
                let (tx, lost) = watch::channel(false);
                let keeper = tokio::spawn(keep(registry.clone(), lease, ttl, tx));
                return Some(Leadership {
                    registry: registry.clone(),
                    lease,
                    lost,
                    keeper,
                });
            }
            Ok(Err(other)) => {
                if announced.as_ref() != Some(&other.id) {
                    tracing::info!(scheduler = id, leader = %other.id, at = %other.address, "standing by");
                    announced = Some(other.id.clone());
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader campaign failed; retrying"),
        }
        // Wait for the key to go (or a while, in case the view missed it), then try again.
        tokio::select! {
            _ = &mut shutdown => return None,
            _ = view.wait_for(ttl, |v| v.leader.is_none()) => {}
        }
    }
}

async fn keep(registry: Registry, lease: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let period = ttl / 3;
    let mut failures = 0;
    loop {
        tokio::time::sleep(period).await;
        match registry.store().keep_alive(lease).await {
            Ok(()) => failures = 0,
            Err(kiln_registry::Error::LeaseExpired(_)) => break,
            // A blip: the lease survives until its TTL; give up once it cannot have.
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "could not renew the leader lease");
                if failures >= 2 {
                    break;
                }
            }
        }
    }
    tracing::error!("the leader lease was lost");
    let _ = lost.send(true);
}
