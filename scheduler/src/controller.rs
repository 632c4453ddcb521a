//! The placement controller: whenever workers, models or deployments change, recompute
//! the plan and write `placements/<worker>` records (only those that differ).

use std::collections::{BTreeMap, BTreeSet};

use kiln_registry::records::{DeviceClass, PlacementRecord, SCHEMA, VersionKey};
use kiln_registry::{ClusterView, Registry, WatchedView};

use crate::plan::{Want, plan_placements};

/// What the controller would write for this view.
pub fn desired_placements(view: &ClusterView) -> BTreeMap<String, BTreeSet<VersionKey>> {
    let workers: Vec<String> = view.workers.keys().cloned().collect();
    let mut wants = Vec::new();
    for (name, entry) in &view.models {
        let deployment = view.deployment(name);
        if !deployment.loaded {
            continue;
        }
        let eligible = (deployment.device != DeviceClass::Any).then(|| {
            view.workers
                .values()
                .filter(|w| deployment.device.admits(&w.backend))
                .map(|w| w.id.clone())
                .collect()
        });
        for version in entry.versions.values() {
            wants.push(Want {
                key: version.key(),
                replicas: deployment.replicas,
                eligible: eligible.clone(),
            });
        }
    }
    let current: BTreeMap<String, BTreeSet<VersionKey>> = view
        .placements
        .iter()
        .map(|(w, p)| (w.clone(), p.versions.iter().cloned().collect()))
        .collect();
    plan_placements(&workers, &wants, &current)
}

/// Run the controller until `shutdown` resolves.
pub async fn run_placement_controller(
    registry: Registry,
    view: WatchedView,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut changes = view.subscribe();
    tokio::pin!(shutdown);
    loop {
        let current = view.current();
        let plan = desired_placements(&current);
        for (worker, versions) in &plan {
            let record = PlacementRecord {
                schema: SCHEMA,
                worker: worker.clone(),
                versions: versions.iter().cloned().collect(),
            };
            if let Err(e) = registry.put_placement(&record).await {
                tracing::warn!(%worker, error = %e, "cannot write placement");
            }
        }
        for worker in current.placements.keys().filter(|w| !plan.contains_key(*w)) {
            if let Err(e) = registry.delete_placement(worker).await {
                tracing::warn!(%worker, error = %e, "cannot delete placement of a gone worker");
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
