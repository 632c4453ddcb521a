//! Choosing the next token from a row of logits: greedy, or sampled after temperature,
//! top-k and top-p, from a generator seeded per request — so a request's tokens depend
//! on its seed and its logits alone, never on what else shares the batch.

use kiln_core::generation::Sampling;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One request's sampler.
pub struct Sampler {
    settings: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `settings`, seeded with its seed (a random one when it has none).
    pub fn new(settings: Sampling) -> Self {
        let seed = settings.seed.unwrap_or_else(rand::random);
        Sampler {
            settings,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next token.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.settings.greedy() {
            return argmax(logits);
        }
        let temperature = self.settings.temperature as f32;
        // Candidates by falling logit; top-k cuts the list.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = match self.settings.top_k {
            0 => logits.len(),
            k => (k as usize).min(logits.len()),
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_by(by_logit);
        let top = logits[order[0] as usize];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|t| f64::from((logits[*t as usize] - top) / temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Top-p keeps the smallest head of the list whose probability reaches top_p.
        let mut kept = probs.len();
        if self.settings.top_p < 1.0 {
            let mut sum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                sum += p;
                if sum >= self.settings.top_p {
                    kept = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..kept].iter().sum();
        let mut draw = self.rng.random::<f64>() * mass;
        for (i, p) in probs[..kept].iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return order[i];
            }
        }
        order[kept - 1]
    }
}

/// The index of the largest logit (the first of equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: u32, top_p: f64, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Sampling::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_seeds_repeat() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(sampling(0.0, 0, 1.0, 1)).pick(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(sampling(1.0, 0, 1.0, seed));
            (0..32).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8), "different seeds draw differently");
    }

    #[test]
    fn top_k_and_top_p_cut_the_candidates() {
        let logits = [3.0, 2.9, 0.0, -5.0, 2.8];
        let mut k2 = Sampler::new(sampling(5.0, 2, 1.0, 3));
        for _ in 0..200 {
            assert!([0, 1].contains(&k2.pick(&logits)));
        }
        // Token 0 holds ~99.99% of the mass at a low temperature: top_p 0.5 keeps it alone.
        let mut p = Sampler::new(sampling(0.05, 0, 0.5, 3));
        for _ in 0..200 {
            assert_eq!(p.pick(&logits), 0);
        }
        // At a high temperature every token is drawn sometimes.
        let mut hot = Sampler::new(sampling(50.0, 0, 1.0, 3));
        let mut seen = [false; 5];
        for _ in 0..2000 {
            seen[hot.pick(&logits) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }
}
