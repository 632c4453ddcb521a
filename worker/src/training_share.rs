//! How training shares a worker's device with inference: the device time training took,
//! how long each inference batch waited behind it, and the rule that keeps training to
//! half the device while inference is being served. The engine thread records and asks;
//! the worker's metrics read.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_telemetry::metrics::{Histogram, SECONDS_BOUNDS};

/// Training intervals remembered: more than could pass while one batch waits (the engine
/// runs every queued command before the next training slice).
const REMEMBERED: usize = 64;

/// Inference counts as being served for this long after its last batch.
const SERVING: Duration = Duration::from_millis(100);

/// The default of the device share training may take while inference is being served
/// (`--training-share`): after a slice of `d`, the device waits up to
/// `d · (1 − share) / share` for inference before the next.
pub const DEFAULT_TRAINING_SHARE: f64 = 0.5;

/// The figures, shared between the engine thread and the metrics.
#[derive(Debug)]
pub struct TrainingShare {
    busy_ns: AtomicU64,
    waits: Mutex<Histogram>,
}

impl Default for TrainingShare {
    fn default() -> Self {
        Self {
            busy_ns: AtomicU64::new(0),
            waits: Mutex::new(Histogram::new(SECONDS_BOUNDS)),
        }
    }
}

impl TrainingShare {
    /// Seconds of device time training has taken.
    pub fn busy_seconds(&self) -> f64 {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)).as_secs_f64()
    }

    /// The waits of inference batches behind training (batches that did not wait are not
    /// counted).
    pub fn waits(&self) -> Histogram {
        self.waits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The engine thread's side: the recent training intervals.
#[derive(Debug)]
pub(crate) struct TrainingClock {
    recent: VecDeque<(Instant, Instant)>,
    /// When the device last ran an inference batch or a generation step.
    last_served: Option<Instant>,
    /// The share of the device training may take while inference is served (0 to 1].
    share: f64,
}

impl Default for TrainingClock {
    fn default() -> Self {
        Self::with_share(DEFAULT_TRAINING_SHARE)
    }
}

impl TrainingClock {
    /// A clock that keeps training to `share` of the device while inference is served
    /// (clamped to 1%..100%; 1: no waiting for inference).
    pub(crate) fn with_share(share: f64) -> Self {
        Self {
            recent: VecDeque::new(),
            last_served: None,
            share: share.clamp(0.01, 1.0),
        }
    }

    /// Training ran on the device from `start` to `end`.
    pub(crate) fn ran(&mut self, share: &TrainingShare, start: Instant, end: Instant) {
        share
            .busy_ns
            .fetch_add((end - start).as_nanos() as u64, Ordering::Relaxed);
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back((start, end));
    }

    /// The device served inference at `at`.
    pub(crate) fn served(&mut self, at: Instant) {
        self.last_served = Some(at);
    }

    /// Until when the next training slice should wait for inference (None: run it now):
    /// while inference is being served, training keeps to its share of the device.
    pub(crate) fn yield_until(&self, now: Instant) -> Option<Instant> {
        let served = self.last_served?;
        if now.saturating_duration_since(served) > SERVING {
            return None;
        }
        let &(start, end) = self.recent.back()?;
        let until = end + (end - start).mul_f64((1.0 - self.share) / self.share);
        (now < until).then_some(until)
    }

    /// How long a batch sent to the engine at `sent` waited behind training: the parts of
    /// the training intervals since then. Recorded when it is more than nothing.
    pub(crate) fn waited(&self, share: &TrainingShare, sent: Instant) -> Duration {
        let behind: Duration = self
            .recent
            .iter()
            .rev()
            .take_while(|(_, end)| *end > sent)
            .map(|(start, end)| *end - (*start).max(sent))
            .sum();
        if !behind.is_zero() {
            share
                .waits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(behind.as_secs_f64());
        }
        behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waits_for_the_training_after_it_arrived_only() {
        let share = TrainingShare::default();
        let mut clock = TrainingClock::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Training 0–10 ms and 12–20 ms; a batch sent at 5 ms waited 5 + 8 ms behind it.
        clock.ran(&share, t0, t0 + ms(10));
        clock.ran(&share, t0 + ms(12), t0 + ms(20));
        assert_eq!(clock.waited(&share, t0 + ms(5)), ms(13));
        // One sent after the last interval did not wait; it is not counted.
        assert_eq!(clock.waited(&share, t0 + ms(25)), Duration::ZERO);
        assert_eq!(share.waits().count(), 1);
        assert!((share.waits().sum() - 0.013).abs() < 1e-9);
        assert!((share.busy_seconds() - 0.018).abs() < 1e-9);
    }

    #[test]
    fn while_serving_training_waits_as_long_as_its_last_slice_took() {
        let share = TrainingShare::default();
        let mut clock = TrainingClock::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        clock.ran(&share, t0, t0 + ms(6));
        // Nothing served yet: train on.
        assert_eq!(clock.yield_until(t0 + ms(7)), None);
        clock.served(t0 + ms(7));
        // Half the device: the 6 ms slice is followed by up to 6 ms for inference.
        assert_eq!(clock.yield_until(t0 + ms(8)), Some(t0 + ms(12)));
        assert_eq!(clock.yield_until(t0 + ms(12)), None);
        // Inference gone quiet for longer than SERVING: training takes the whole device.
        clock.ran(&share, t0 + ms(300), t0 + ms(306));
        assert_eq!(clock.yield_until(t0 + ms(307)), None);
        // A quarter of the device: three times the slice for inference; all of it: none.
        let mut quarter = TrainingClock::with_share(0.25);
        quarter.ran(&share, t0, t0 + ms(4));
        quarter.served(t0 + ms(5));
        assert_eq!(quarter.yield_until(t0 + ms(5)), Some(t0 + ms(16)));
        let mut all = TrainingClock::with_share(1.0);
        all.ran(&share, t0, t0 + ms(4));
        all.served(t0 + ms(5));
        assert_eq!(all.yield_until(t0 + ms(5)), None);
    }
}
