//! The placement controller: whenever workers, models or deployments change, recompute
//! the plan and write `placements/<worker>` records (only those that differ).

use std::collections::{BTreeMap, BTreeSet};

use kiln_core::records::{DeviceClass, PlacementRecord, SCHEMA, VersionKey};
use kiln_registry::{ClusterView, Registry, WatchedView};

use crate::plan::{Want, plan_placements_within};

/// What the controller would write for this view.
///
/// Versions are planned most recently used first — recency is the latest request any
/// worker reports for the version, or its creation if that is later (a new version counts
/// as just used) — so that on workers with a memory limit the least recently used versions
/// are the ones that lose their place.
pub fn desired_placements(view: &ClusterView) -> BTreeMap<String, BTreeSet<VersionKey>> {
    let workers: Vec<String> = view.workers.keys().cloned().collect();
    let mut last_used: BTreeMap<&VersionKey, u64> = BTreeMap::new();
    for w in view.workers.values() {
        for l in &w.loaded {
            let t = last_used.entry(&l.key).or_default();
            *t = (*t).max(l.last_used_unix_ms);
        }
    }
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
            let key = version.key();
            let recency = last_used
                .get(&key)
                .copied()
                .unwrap_or(0)
                .max(version.created_unix_ms);
            wants.push((
                recency,
                Want {
                    key,
                    replicas: deployment.replicas,
                    eligible: eligible.clone(),
                    // A decoder's key/value cache counts as well as its weights.
                    bytes: version
                        .artifact
                        .size
                        .saturating_add(entry.record.spec.cache_reservation_bytes()),
                },
            ));
        }
    }
    // Most recent first; equal times in key order, so the plan is stable.
    wants.sort_by(|(ra, a), (rb, b)| rb.cmp(ra).then_with(|| a.key.cmp(&b.key)));
    let wants: Vec<Want<VersionKey>> = wants.into_iter().map(|(_, w)| w).collect();
    let capacity: BTreeMap<String, u64> = view
        .workers
        .values()
        .map(|w| (w.id.clone(), w.memory_bytes))
        .collect();
    let current: BTreeMap<String, BTreeSet<VersionKey>> = view
        .placements
        .iter()
        .map(|(w, p)| (w.clone(), p.versions.iter().cloned().collect()))
        .collect();
    plan_placements_within(&workers, &capacity, &wants, &current)
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
        reconcile(&registry, &view.current()).await;
        tokio::select! {
            _ = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// What one reconcile pass wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Placements written (new or changed).
    pub written: usize,
    /// Placements deleted (their worker is gone).
    pub deleted: usize,
}

/// One pass: plan from `current` and write the placements that differ from it. Only the
/// placements that differ are written: one worker's loss costs a write per worker that
/// gains a version, not one per worker.
pub async fn reconcile(registry: &Registry, current: &ClusterView) -> Reconciled {
    let plan = desired_placements(current);
    let mut done = Reconciled::default();
    for (worker, versions) in &plan {
        let record = PlacementRecord {
            schema: SCHEMA,
            worker: worker.clone(),
            versions: versions.iter().cloned().collect(),
        };
        if current.placements.get(worker) == Some(&record) {
            continue;
        }
        match registry.put_placement(&record).await {
            Ok(_) => done.written += 1,
            Err(e) => tracing::warn!(%worker, error = %e, "cannot write placement"),
        }
    }
    for worker in current.placements.keys().filter(|w| !plan.contains_key(*w)) {
        match registry.delete_placement(worker).await {
            Ok(_) => done.deleted += 1,
            Err(e) => {
                tracing::warn!(%worker, error = %e, "cannot delete placement of a gone worker");
            }
        }
    }
    done
}
