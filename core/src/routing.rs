//! The gateway's routing decisions, pure and deterministic: which replica takes a request
//! (power of two choices on outstanding work) and how a large request is split into shards
//! across replicas in proportion to their free capacity.

/// The load of one replica as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaLoad {
    /// Requests this router has in flight to the replica.
    pub in_flight: u64,
    /// Requests waiting in the replica's batcher, as it last reported (every answer says).
    pub queue_depth: u64,
    /// Whether the replica's worker is running training (its device is shared: requests
    /// may wait behind a training slice).
    pub training: bool,
}

impl ReplicaLoad {
    /// What the choice compares: work this router sent and has not seen back, plus work
    /// the replica said was waiting (other gateways' requests among it).
    pub fn outstanding(&self) -> u64 {
        self.in_flight.saturating_add(self.queue_depth)
    }
}

/// SplitMix64's finaliser: a counter in, well-spread bits out (the draws of [`choose_replica`]).
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Power of two choices: draw two different replicas from `draw` (random bits, e.g.
/// [`mix64`] of a counter) and take the one with less outstanding work, the first drawn on
/// a tie. Near the best choice's balance without every router herding onto the one
/// replica that looks idlest. Only replicas on workers that are not training are drawn,
/// when there are any.
pub fn choose_replica(loads: &[ReplicaLoad], draw: u64) -> Option<usize> {
    // Replicas on workers that are not training, when there are any: a request there
    // never waits behind a training slice.
    let serving: Vec<usize> = (0..loads.len()).filter(|&i| !loads[i].training).collect();
    let pool: Vec<usize> = if serving.is_empty() {
        (0..loads.len()).collect()
    } else {
        serving
    };
    let n = pool.len() as u64;
    match n {
        0 => None,
        1 => Some(pool[0]),
        _ => {
            let first = draw % n;
            let second = (first + 1 + (draw >> 32) % (n - 1)) % n;
            let (a, b) = (pool[first as usize], pool[second as usize]);
            Some(if loads[b].outstanding() < loads[a].outstanding() {
                b
            } else {
                a
            })
        }
    }
}

/// One piece of a request split across replicas: rows `start..start + rows` go to
/// replica `replica`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Index of the replica in the caller's list.
    pub replica: usize,
    /// First row.
    pub start: usize,
    /// Rows.
    pub rows: usize,
}

/// How a request's rows are split: contiguous shards in row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// The shards, first rows first; gathering their answers in this order gives the
    /// request's rows in order.
    pub shards: Vec<Shard>,
}

/// Split `rows` across replicas in proportion to their free capacity
/// (`capacities[i]`, e.g. queue slots left), by largest remainders so the shares are
/// exact to a row. Replicas with no capacity get nothing, unless none has any: then the
/// rows are split evenly. No shard is empty.
pub fn plan_shards(rows: usize, capacities: &[u64]) -> ShardPlan {
    if rows == 0 || capacities.is_empty() {
        return ShardPlan { shards: Vec::new() };
    }
    let total: u128 = capacities.iter().map(|c| u128::from(*c)).sum();
    let weights: Vec<u128> = if total == 0 {
        vec![1; capacities.len()]
    } else {
        capacities.iter().map(|c| u128::from(*c)).collect()
    };
    let total: u128 = weights.iter().sum();
    // Whole shares first, then one more row each for the largest remainders (lowest
    // index first among equals), so the split is deterministic.
    let mut shares: Vec<usize> = weights
        .iter()
        .map(|w| (rows as u128 * w / total) as usize)
        .collect();
    let mut left = rows - shares.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(rows as u128 * weights[i] % total));
    for &i in by_remainder.iter().filter(|&&i| weights[i] > 0) {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    let mut start = 0;
    let shards = shares
        .into_iter()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .map(|(replica, n)| {
            let shard = Shard {
                replica,
                start,
                rows: n,
            };
            start += n;
            shard
        })
        .collect();
    ShardPlan { shards }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: u64, queue_depth: u64) -> ReplicaLoad {
        ReplicaLoad {
            in_flight,
            queue_depth,
            training: false,
        }
    }

    #[test]
    fn replicas_on_training_workers_are_chosen_only_when_every_replica_is_on_one() {
        let training = ReplicaLoad {
            training: true,
            ..load(0, 0)
        };
        // However busy the others are, an idle replica on a training worker is passed over.
        let loads = [training, load(5, 5), training, load(9, 0)];
        for draw in 0..200 {
            let chosen = choose_replica(&loads, mix64(draw)).unwrap();
            assert!(chosen == 1 || chosen == 3, "draw {draw} chose {chosen}");
        }
        // Both non-training replicas are drawn over many requests.
        let picks: std::collections::BTreeSet<usize> = (0..200)
            .filter_map(|d| choose_replica(&[load(1, 0), training, load(1, 0)], mix64(d)))
            .collect();
        assert_eq!(picks, [0, 2].into());
        // All on training workers: the ordinary choice among them.
        assert_eq!(
            choose_replica(
                &[
                    training,
                    ReplicaLoad {
                        queue_depth: 4,
                        ..training
                    }
                ],
                3
            ),
            Some(0)
        );
    }

    #[test]
    fn two_choices_take_the_less_loaded_and_spread_equal_ones() {
        assert_eq!(choose_replica(&[], 7), None);
        assert_eq!(choose_replica(&[load(9, 9)], 7), Some(0));
        // With two replicas both are always drawn: the idle one always wins, whether the
        // other's work is this router's requests or its reported queue.
        for draw in 0..100 {
            assert_eq!(
                choose_replica(&[load(3, 0), load(0, 1)], mix64(draw)),
                Some(1)
            );
            assert_eq!(
                choose_replica(&[load(0, 0), load(0, 4)], mix64(draw)),
                Some(0)
            );
        }
        // Four equal replicas share 4,000 draws about evenly; a replica loaded more
        // than all others is never chosen (it loses every pair it is drawn in).
        let mut counts = [0usize; 4];
        for draw in 0..4_000 {
            counts[choose_replica(&[load(1, 1); 4], mix64(draw)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|c| (850..1150).contains(c)), "{counts:?}");
        let skewed = [load(0, 0), load(0, 0), load(5, 20), load(0, 0)];
        for draw in 0..1_000 {
            assert_ne!(choose_replica(&skewed, mix64(draw)), Some(2));
        }
    }

    #[test]
    fn shards_follow_free_capacity_exactly_and_keep_row_order() {
        let plan = plan_shards(8192, &[3, 1]);
        assert_eq!(
            plan.shards,
            vec![
                Shard {
                    replica: 0,
                    start: 0,
                    rows: 6144
                },
                Shard {
                    replica: 1,
                    start: 6144,
                    rows: 2048
                },
            ]
        );
        // Uneven: 10 rows over 3 equal replicas is 4/3/3, contiguous.
        let plan = plan_shards(10, &[5, 5, 5]);
        let rows: Vec<_> = plan.shards.iter().map(|s| (s.start, s.rows)).collect();
        assert_eq!(rows, vec![(0, 4), (4, 3), (7, 3)]);
        // A full replica gets nothing; all full: split evenly anyway.
        let plan = plan_shards(7, &[0, 4]);
        assert_eq!(
            plan.shards,
            vec![Shard {
                replica: 1,
                start: 0,
                rows: 7
            }]
        );
        assert_eq!(plan_shards(6, &[0, 0]).shards.len(), 2);
        // Fewer rows than replicas: no empty shard.
        let plan = plan_shards(2, &[1, 1, 1]);
        assert_eq!(plan.shards.len(), 2);
        assert!(plan_shards(0, &[1]).shards.is_empty());
    }

    #[test]
    fn shard_plans_always_cover_every_row_once() {
        let mut rng = crate::weights::SplitMix64::new(11);
        for _ in 0..500 {
            let n = 1 + (rng.next_u64() % 6) as usize;
            let caps: Vec<u64> = (0..n).map(|_| rng.next_u64() % 50).collect();
            let rows = (rng.next_u64() % 5000) as usize + 1;
            let plan = plan_shards(rows, &caps);
            let mut next = 0;
            for s in &plan.shards {
                assert_eq!(s.start, next);
                assert!(s.rows > 0);
                next += s.rows;
            }
            assert_eq!(next, rows, "{caps:?}");
            let total: u64 = caps.iter().sum();
            if total > 0 {
                for s in &plan.shards {
                    let exact = rows as f64 * caps[s.replica] as f64 / total as f64;
                    assert!((s.rows as f64 - exact).abs() < 1.0 + 1e-9, "{caps:?} {s:?}");
                }
            }
        }
    }
}
