//! Synchronous data parallelism, the arithmetic both sides share: which rows of a batch
//! each replica trains on, the wire form of gradients, and their weighted average.
//!
//! Each replica computes the gradient of its shard's *mean* loss; weighting each by the
//! shard's rows and summing gives the gradient of the whole batch's mean loss — what one
//! worker computes on the whole batch, up to floating-point summation order.

use crate::{Error, Result};

/// A replica's place in a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRole {
    /// From 0; rank 0 validates, keeps the best epoch for early stopping and checkpoints.
    pub rank: u32,
    /// Replicas in the run.
    pub world: u32,
}

/// Most replicas one run may have.
pub const MAX_REPLICAS: u32 = 64;

/// What a replica computed on its shard of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardGradients {
    /// Rows in the shard (0 when the batch has fewer rows than replicas).
    pub rows: usize,
    /// The loss summed over the shard's rows.
    pub loss_sum: f64,
    /// Correct predictions in the shard.
    pub correct: u64,
    /// Gradient of the shard's mean loss, flat in parameter order; empty when `rows` is 0.
    pub gradients: Vec<f32>,
}

/// The positions in a batch of `len` rows that `role` trains on: contiguous, and as even
/// as the count allows (shard sizes differ by at most one row).
pub fn shard_range(len: usize, role: ShardRole) -> std::ops::Range<usize> {
    let (rank, world) = (role.rank as usize, role.world.max(1) as usize);
    rank * len / world..(rank + 1) * len / world
}

/// FP32 values as little-endian bytes (the wire form of gradients).
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Little-endian bytes as FP32 values; `field` names them in the error.
pub fn f32_from_bytes(field: &str, bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Invalid(format!(
            "{field}: {} bytes are not whole FP32 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Average shards' gradients (`(rows, little-endian FP32 bytes)` each), weighted by their
/// rows, into little-endian FP32 bytes. Sums in f64. Shards without rows carry no
/// gradients and weigh nothing; every other shard must have the same length.
pub fn average_gradients(shards: &[(usize, &[u8])]) -> Result<Vec<u8>> {
    let total: usize = shards.iter().map(|(rows, _)| rows).sum();
    let mut with_rows = shards.iter().filter(|(rows, _)| *rows > 0);
    let Some((_, first)) = with_rows.clone().next() else {
        return Err(Error::Invalid("no shard had rows to average".into()));
    };
    let n = first.len();
    if !n.is_multiple_of(4) || with_rows.clone().any(|(_, g)| g.len() != n) {
        return Err(Error::Invalid(format!(
            "shard gradients differ in length (the first has {n} bytes)"
        )));
    }
    let mut sum = vec![0.0f64; n / 4];
    for (rows, g) in with_rows.by_ref() {
        let w = *rows as f64 / total as f64;
        for (acc, c) in sum.iter_mut().zip(g.chunks_exact(4)) {
            *acc += w * f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
    let mut out = Vec::with_capacity(n);
    for v in sum {
        out.extend_from_slice(&(v as f32).to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_batch_once_and_differ_by_at_most_a_row() {
        for len in [0usize, 1, 2, 5, 7, 64, 1000] {
            for world in 1..=5u32 {
                let ranges: Vec<_> = (0..world)
                    .map(|rank| shard_range(len, ShardRole { rank, world }))
                    .collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().map(|r| r.end), Some(len));
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start, "len {len} world {world}");
                }
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{sizes:?}");
            }
        }
    }

    #[test]
    fn the_weighted_average_is_the_whole_batch_mean() {
        // Rows 1..=5 with per-row gradients [r, -r]; shards of 2 and 3 rows report the
        // mean over their rows. The average must be the mean over all 5 rows: [3, -3].
        let a = f32_to_bytes(&[1.5, -1.5]);
        let b = f32_to_bytes(&[4.0, -4.0]);
        let empty: Vec<u8> = Vec::new();
        let avg = average_gradients(&[(2, &a), (3, &b), (0, &empty)]).expect("averages");
        assert_eq!(
            f32_from_bytes("avg", &avg).expect("decodes"),
            vec![3.0, -3.0]
        );
    }

    #[test]
    fn mismatched_or_empty_shards_are_refused_with_a_reason() {
        let a = f32_to_bytes(&[1.0, 2.0]);
        let b = f32_to_bytes(&[1.0]);
        let e = average_gradients(&[(1, &a), (1, &b)]).expect_err("lengths differ");
        assert!(e.to_string().contains("differ in length"), "{e}");
        assert!(average_gradients(&[(0, &[])]).is_err());
        let e = f32_from_bytes("gradients", &[0, 1, 2]).expect_err("not whole values");
        assert!(e.to_string().contains("gradients: 3 bytes"), "{e}");
    }
}
