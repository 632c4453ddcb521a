//! The placement controller: whenever workers, models or deployments change, recompute
//! the plan and write `placements/<worker>` records (only those that differ).

use std::collections::{BTreeMap, BTreeSet};

use kiln_core::records::{
    DeploymentRecord, DeviceClass, PlacementRecord, SCHEMA, VersionKey, WorkerRecord,
};
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
        let eligible = eligible_workers(view, &deployment);
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

/// The workers that may hold a deployment's versions (None: any). Its device class
/// admits them; and when it avoids training ([`DeploymentRecord::avoids_training`]), the
/// workers running training are left out as long as the others can hold every replica it
/// asks for — its replicas move back when the training ends.
fn eligible_workers(view: &ClusterView, deployment: &DeploymentRecord) -> Option<BTreeSet<String>> {
    let admitted: Vec<&WorkerRecord> = view
        .workers
        .values()
        .filter(|w| deployment.device.admits(&w.backend))
        .collect();
    if deployment.avoids_training() {
        let free: BTreeSet<String> = admitted
            .iter()
            .filter(|w| w.training == 0)
            .map(|w| w.id.clone())
            .collect();
        let enough = deployment.replicas.is_none_or(|n| free.len() >= n as usize);
        if !free.is_empty() && free.len() < admitted.len() && enough {
            return Some(free);
        }
    }
    (deployment.device != DeviceClass::Any).then(|| admitted.iter().map(|w| w.id.clone()).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(training: &[(&str, u32)]) -> ClusterView {
        let mut view = ClusterView::default();
        for (id, runs) in training {
            view.workers.insert(
                (*id).to_owned(),
                WorkerRecord {
                    schema: SCHEMA,
                    id: (*id).to_owned(),
                    address: format!("{id}:1"),
                    backend: "cpu".into(),
                    adapter: "test".into(),
                    loaded: Vec::new(),
                    started_unix_ms: 0,
                    memory_bytes: 0,
                    training: *runs,
                },
            );
        }
        view
    }

    fn deployment(replicas: Option<u32>, avoid: Option<bool>) -> DeploymentRecord {
        DeploymentRecord {
            replicas,
            avoid_training: avoid,
            ..DeploymentRecord::default_for("m")
        }
    }

    fn ids(names: &[&str]) -> Option<BTreeSet<String>> {
        Some(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn replicas_stay_off_training_workers_while_the_others_can_hold_them() {
        let v = view(&[("a", 1), ("b", 0), ("c", 0)]);
        // Every worker, or two replicas: b and c can hold them.
        assert_eq!(
            eligible_workers(&v, &deployment(None, None)),
            ids(&["b", "c"])
        );
        assert_eq!(
            eligible_workers(&v, &deployment(Some(2), None)),
            ids(&["b", "c"])
        );
        // Three replicas do not fit on two workers: every worker stays eligible.
        assert_eq!(eligible_workers(&v, &deployment(Some(3), None)), None);
        // One replica: by default it stays where it is (no reload for every job) ...
        assert_eq!(eligible_workers(&v, &deployment(Some(1), None)), None);
        // ... unless the deployment asks; and a deployment can opt out.
        assert_eq!(
            eligible_workers(&v, &deployment(Some(1), Some(true))),
            ids(&["b", "c"])
        );
        assert_eq!(eligible_workers(&v, &deployment(None, Some(false))), None);
        // Every worker training: nowhere else to go.
        let all = view(&[("a", 1), ("b", 2)]);
        assert_eq!(eligible_workers(&all, &deployment(None, None)), None);
        // Nobody training: no restriction.
        let none = view(&[("a", 0), ("b", 0)]);
        assert_eq!(eligible_workers(&none, &deployment(None, None)), None);
    }
}
