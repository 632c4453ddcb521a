//! Pure planning: placements and replica choice. Deterministic, so it is tested directly.

use std::collections::{BTreeMap, BTreeSet};

/// A version that should be served, and on how many workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want<K> {
    /// The version.
    pub key: K,
    /// Replicas wanted; None means every eligible worker.
    pub replicas: Option<u32>,
    /// The workers that may hold it; None: any.
    pub eligible: Option<BTreeSet<String>>,
}

/// Decide which workers hold which versions.
///
/// Rules: a version gets `min(replicas, workers)` holders; workers that already hold it
/// keep it (no needless reloads); new holders are the workers holding the fewest versions,
/// ties broken by worker id, so the plan is stable and spreads load.
pub fn plan_placements<K: Ord + Clone>(
    workers: &[String],
    wants: &[Want<K>],
    current: &BTreeMap<String, BTreeSet<K>>,
) -> BTreeMap<String, BTreeSet<K>> {
    let mut plan: BTreeMap<String, BTreeSet<K>> = workers
        .iter()
        .map(|w| (w.clone(), BTreeSet::new()))
        .collect();
    for want in wants {
        let eligible: Vec<&String> = workers
            .iter()
            .filter(|w| want.eligible.as_ref().is_none_or(|e| e.contains(*w)))
            .collect();
        let n = want
            .replicas
            .map_or(eligible.len(), |r| (r as usize).min(eligible.len()));
        let mut holders: Vec<&String> = eligible
            .iter()
            .copied()
            .filter(|w| current.get(*w).is_some_and(|held| held.contains(&want.key)))
            .take(n)
            .collect();
        if holders.len() < n {
            let mut others: Vec<&String> = eligible
                .iter()
                .copied()
                .filter(|w| !holders.contains(w))
                .collect();
            others.sort_by_key(|w| (plan.get(*w).map_or(0, |s| s.len()), (*w).clone()));
            holders.extend(others.into_iter().take(n - holders.len()));
        }
        for w in holders {
            if let Some(set) = plan.get_mut(w) {
                set.insert(want.key.clone());
            }
        }
    }
    plan
}

/// The load of one replica as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLoad {
    /// Requests this router has in flight to the replica.
    pub in_flight: u64,
}

/// Pick the least busy replica; among equals, the one after `rotation` (a counter the
/// caller increments), so idle replicas share the work instead of the first taking all.
pub fn choose_replica(loads: &[ReplicaLoad], rotation: usize) -> Option<usize> {
    if loads.is_empty() {
        return None;
    }
    let n = loads.len();
    (0..n)
        .map(|i| (i + rotation) % n)
        .min_by_key(|&i| loads[i].in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn every_worker_gets_every_version_by_default() {
        let plan = plan_placements(
            &workers(3),
            &[
                Want {
                    key: "a",
                    replicas: None,
                    eligible: None,
                },
                Want {
                    key: "b",
                    replicas: None,
                    eligible: None,
                },
            ],
            &BTreeMap::new(),
        );
        assert_eq!(plan.len(), 3);
        assert!(plan.values().all(|s| s.len() == 2));
    }

    #[test]
    fn replicas_are_spread_and_existing_holders_kept() {
        let wants = [
            Want {
                key: "a",
                replicas: Some(2),
                eligible: None,
            },
            Want {
                key: "b",
                replicas: Some(2),
                eligible: None,
            },
            Want {
                key: "c",
                replicas: Some(1),
                eligible: None,
            },
        ];
        let plan = plan_placements(&workers(3), &wants, &BTreeMap::new());
        let count = |k| plan.values().filter(|s| s.contains(k)).count();
        assert_eq!((count(&"a"), count(&"b"), count(&"c")), (2, 2, 1));
        // Five placements on three workers: no worker holds more than two.
        assert!(plan.values().all(|s| s.len() <= 2));

        // w2 already holds "a": it keeps it.
        let current = BTreeMap::from([("w2".to_owned(), BTreeSet::from(["a"]))]);
        let plan = plan_placements(
            &workers(3),
            &[Want {
                key: "a",
                replicas: Some(1),
                eligible: None,
            }],
            &current,
        );
        assert!(plan["w2"].contains("a"));
        assert!(plan["w0"].is_empty() && plan["w1"].is_empty());
    }

    #[test]
    fn a_device_class_keeps_versions_on_its_workers() {
        let gpu: BTreeSet<String> = ["w1".to_owned(), "w2".to_owned()].into();
        let plan = plan_placements(
            &workers(4),
            &[
                Want {
                    key: "g",
                    replicas: None,
                    eligible: Some(gpu.clone()),
                },
                Want {
                    key: "one",
                    replicas: Some(1),
                    eligible: Some(gpu),
                },
            ],
            &BTreeMap::new(),
        );
        let holders = |k| {
            plan.iter()
                .filter(|(_, s)| s.contains(k))
                .map(|(w, _)| w.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(holders(&"g"), vec!["w1", "w2"]);
        assert_eq!(holders(&"one").len(), 1);
        assert!(["w1", "w2"].contains(&holders(&"one")[0]));
        // No eligible worker: nobody holds it (rather than the wrong kind of worker).
        let none = plan_placements(
            &workers(2),
            &[Want {
                key: "g",
                replicas: Some(1),
                eligible: Some(BTreeSet::new()),
            }],
            &BTreeMap::new(),
        );
        assert!(none.values().all(BTreeSet::is_empty));
    }

    #[test]
    fn more_replicas_than_workers_means_all_workers() {
        let plan = plan_placements(
            &workers(2),
            &[Want {
                key: 1,
                replicas: Some(5),
                eligible: None,
            }],
            &BTreeMap::new(),
        );
        assert!(plan.values().all(|s| s.contains(&1)));
        assert!(
            plan_placements::<u8>(
                &[],
                &[Want {
                    key: 1,
                    replicas: None,
                    eligible: None,
                }],
                &BTreeMap::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn the_least_busy_replica_is_chosen_and_ties_rotate() {
        let loads = [
            ReplicaLoad { in_flight: 3 },
            ReplicaLoad { in_flight: 1 },
            ReplicaLoad { in_flight: 2 },
        ];
        assert_eq!(choose_replica(&loads, 0), Some(1));
        assert_eq!(choose_replica(&loads, 2), Some(1));
        let idle = [ReplicaLoad { in_flight: 0 }; 3];
        let picks: BTreeSet<_> = (0..3).map(|r| choose_replica(&idle, r).unwrap()).collect();
        assert_eq!(picks.len(), 3);
        assert_eq!(choose_replica(&[], 0), None);
    }
}
