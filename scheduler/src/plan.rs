//! Pure placement planning: which workers hold which versions. Deterministic, so it is
//! tested directly. (Replica choice and shard plans, the gateway's, are in `kiln_core::routing`.)

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
    /// Bytes it takes on a worker (its weights), counted against worker capacities.
    pub bytes: u64,
}

/// Decide which workers hold which versions.
///
/// Rules: a version gets `min(replicas, eligible workers)` holders; workers that already
/// hold it keep it (no needless reloads); new holders are the eligible workers holding the
/// fewest versions, ties broken by worker id, so the plan is stable and spreads load.
///
/// Cost: one pass over `current`, then per version O(replicas · log workers) plus the
/// workers skipped as ineligible — not a scan of every worker per version.
pub fn plan_placements<K: Ord + Clone>(
    workers: &[String],
    wants: &[Want<K>],
    current: &BTreeMap<String, BTreeSet<K>>,
) -> BTreeMap<String, BTreeSet<K>> {
    plan_placements_within(workers, &BTreeMap::new(), wants, current)
}

/// [`plan_placements`] on workers with a capacity in bytes (absent or 0: no limit). A
/// version goes only where it fits, so when memory runs short the versions planned last
/// lose their replicas: give `wants` most recently used first, and the least recently used
/// are the ones evicted.
pub fn plan_placements_within<K: Ord + Clone>(
    workers: &[String],
    capacity: &BTreeMap<String, u64>,
    wants: &[Want<K>],
    current: &BTreeMap<String, BTreeSet<K>>,
) -> BTreeMap<String, BTreeSet<K>> {
    let limit: Vec<u64> = workers
        .iter()
        .map(|w| {
            capacity
                .get(w)
                .copied()
                .filter(|c| *c > 0)
                .unwrap_or(u64::MAX)
        })
        .collect();
    let mut used = vec![0u64; workers.len()];
    // Who holds what now, by worker index in `workers` order.
    let mut held_by: BTreeMap<&K, Vec<usize>> = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        for key in current.get(w).into_iter().flatten() {
            held_by.entry(key).or_default().push(i);
        }
    }
    let mut plan: Vec<BTreeSet<K>> = vec![BTreeSet::new(); workers.len()];
    // Workers by (versions planned so far, id): the least loaded first.
    let mut by_load: BTreeSet<(usize, &str, usize)> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| (0, w.as_str(), i))
        .collect();
    for want in wants {
        let allowed = |i: usize| {
            want.eligible
                .as_ref()
                .is_none_or(|e| e.contains(&workers[i]))
        };
        let fits = |i: usize, used: &[u64]| used[i].saturating_add(want.bytes) <= limit[i];
        let count = match &want.eligible {
            None => workers.len(),
            Some(e) => workers.iter().filter(|w| e.contains(*w)).count(),
        };
        let n = want.replicas.map_or(count, |r| (r as usize).min(count));
        let mut chosen: Vec<usize> = held_by
            .get(&want.key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|i| allowed(*i) && fits(*i, &used))
            .take(n)
            .collect();
        if chosen.len() < n {
            let more: Vec<usize> = by_load
                .iter()
                .map(|(_, _, i)| *i)
                .filter(|i| allowed(*i) && fits(*i, &used) && !chosen.contains(i))
                .take(n - chosen.len())
                .collect();
            chosen.extend(more);
        }
        for i in chosen {
            used[i] = used[i].saturating_add(want.bytes);
            let load = plan[i].len();
            by_load.remove(&(load, workers[i].as_str(), i));
            plan[i].insert(want.key.clone());
            by_load.insert((load + 1, workers[i].as_str(), i));
        }
    }
    workers.iter().cloned().zip(plan).collect()
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
                    bytes: 0,
                },
                Want {
                    key: "b",
                    replicas: None,
                    eligible: None,
                    bytes: 0,
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
                bytes: 0,
            },
            Want {
                key: "b",
                replicas: Some(2),
                eligible: None,
                bytes: 0,
            },
            Want {
                key: "c",
                replicas: Some(1),
                eligible: None,
                bytes: 0,
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
                bytes: 0,
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
                    bytes: 0,
                },
                Want {
                    key: "one",
                    replicas: Some(1),
                    eligible: Some(gpu),
                    bytes: 0,
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
                bytes: 0,
            }],
            &BTreeMap::new(),
        );
        assert!(none.values().all(BTreeSet::is_empty));
    }

    /// The rules written out the slow way: scan every worker for every version.
    fn plan_by_scanning(
        workers: &[String],
        wants: &[Want<u32>],
        current: &BTreeMap<String, BTreeSet<u32>>,
    ) -> BTreeMap<String, BTreeSet<u32>> {
        let mut plan: BTreeMap<String, BTreeSet<u32>> = workers
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
                .filter(|w| current.get(*w).is_some_and(|h| h.contains(&want.key)))
                .take(n)
                .collect();
            let mut others: Vec<&String> = eligible
                .iter()
                .copied()
                .filter(|w| !holders.contains(w))
                .collect();
            others.sort_by_key(|w| (plan[*w].len(), (*w).clone()));
            let missing = n - holders.len();
            holders.extend(others.into_iter().take(missing));
            for w in holders {
                plan.get_mut(w).unwrap().insert(want.key);
            }
        }
        plan
    }

    #[test]
    fn the_fast_planner_follows_the_rules_on_random_clusters() {
        let mut rng = kiln_core::weights::SplitMix64::new(5);
        for round in 0..200 {
            let n_workers = (rng.next_u64() % 12) as usize;
            let workers: Vec<String> = (0..n_workers).map(|i| format!("w{i:02}")).collect();
            let wants: Vec<Want<u32>> = (0..(rng.next_u64() % 30) as u32)
                .map(|key| Want {
                    key,
                    replicas: match rng.next_u64() % 4 {
                        0 => None,
                        r => Some(r as u32),
                    },
                    eligible: rng.next_u64().is_multiple_of(3).then(|| {
                        workers
                            .iter()
                            .filter(|_| rng.next_u64().is_multiple_of(2))
                            .cloned()
                            .collect()
                    }),
                    bytes: 0,
                })
                .collect();
            let current: BTreeMap<String, BTreeSet<u32>> = workers
                .iter()
                .map(|w| {
                    let held = (0..30)
                        .filter(|_| rng.next_u64().is_multiple_of(5))
                        .collect();
                    (w.clone(), held)
                })
                .collect();
            assert_eq!(
                plan_placements(&workers, &wants, &current),
                plan_by_scanning(&workers, &wants, &current),
                "round {round}"
            );
        }
    }

    #[test]
    fn a_full_worker_keeps_the_recently_used_and_drops_the_rest() {
        // Wants come most recently used first: "hot", then "warm", then "cold".
        let want = |key: &'static str, bytes| Want {
            key,
            replicas: None,
            eligible: None,
            bytes,
        };
        let capacity = BTreeMap::from([("w0".to_owned(), 100), ("w1".to_owned(), 0)]);
        let held = BTreeMap::from([
            ("w0".to_owned(), BTreeSet::from(["cold", "warm"])),
            ("w1".to_owned(), BTreeSet::from(["cold", "warm"])),
        ]);
        let plan = plan_placements_within(
            &workers(2),
            &capacity,
            &[want("hot", 40), want("warm", 40), want("cold", 40)],
            &held,
        );
        // w0 holds 100 bytes: the two most recent fit; the least recent is evicted there.
        assert_eq!(plan["w0"], BTreeSet::from(["hot", "warm"]));
        // w1 has no limit.
        assert_eq!(plan["w1"], BTreeSet::from(["hot", "warm", "cold"]));
        // A version larger than any worker's room is placed nowhere it does not fit.
        let plan = plan_placements_within(&workers(2), &capacity, &[want("huge", 101)], &held);
        assert!(plan["w0"].is_empty() && plan["w1"].contains("huge"));
    }

    #[test]
    fn more_replicas_than_workers_means_all_workers() {
        let plan = plan_placements(
            &workers(2),
            &[Want {
                key: 1,
                replicas: Some(5),
                eligible: None,
                bytes: 0,
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
                    bytes: 0,
                }],
                &BTreeMap::new()
            )
            .is_empty()
        );
    }
}
