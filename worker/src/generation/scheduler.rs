//! Continuous batching for one loaded decoder: requests wait in a queue; each step admits
//! what fits (a free slot each, and at most [`PREFILL_BUDGET`] prompt tokens a step — at
//! least one prompt), runs their prefills, then one decode step for every sequence that was
//! already running. A sequence leaves the moment it finishes, or its caller goes away
//! (checked at every step), and its slot is free for the next one.

use std::collections::VecDeque;
use std::time::Instant;

use kiln_core::generation::{FinishReason, Sampling};
use tokio::sync::mpsc;

use super::sampler::Sampler;
use super::text::{Piece, TextStream};
use super::{DecodeRow, Decoder, GenEvent, Logprobs, Prompt, admit};
use crate::{Error, Result};

/// Most prompt tokens prefilled in one step (beyond the first prompt), so that a burst of
/// long prompts does not stall the running sequences for long.
pub const PREFILL_BUDGET: usize = 2_048;

/// A request for a generation.
pub struct GenerationRequest {
    /// What to generate from.
    pub prompt: Prompt,
    /// How.
    pub sampling: Sampling,
    /// Where its events go; dropping the receiver cancels it.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

struct Waiting {
    ids: Vec<u32>,
    budget: u32,
    sampling: Sampling,
    events: mpsc::UnboundedSender<GenEvent>,
    since: Instant,
}

struct Running {
    slot: usize,
    /// Tokens in the slot's cache, plus the newest token (not yet run).
    length: usize,
    last: u32,
    generated: u32,
    budget: u32,
    ignore_eos: bool,
    /// Alternatives to report per step (0: no log-probabilities).
    logprobs: u32,
    sampler: Sampler,
    text: TextStream,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// Counts for metrics and replica choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeneratorStats {
    /// Sequences running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// Slots free.
    pub free_slots: usize,
}

/// The generation state of one loaded decoder.
#[derive(Default)]
pub struct Generator {
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
}

impl Generator {
    /// Check a request and queue it; a request that can never run (a prompt past the
    /// context, bad parameters) is refused here, before it waits.
    pub fn submit(&mut self, decoder: &dyn Decoder, request: GenerationRequest) -> Result<()> {
        let (ids, budget) = admit(decoder, &request.prompt, &request.sampling)?;
        self.waiting.push_back(Waiting {
            ids,
            budget,
            sampling: request.sampling,
            events: request.events,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Whether there is anything to do.
    pub fn busy(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Running and waiting counts against `slots`.
    pub fn stats(&self, slots: usize) -> GeneratorStats {
        GeneratorStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            free_slots: slots.saturating_sub(self.running.len()),
        }
    }

    /// Fail every request (the model is going away).
    pub fn abort(&mut self, error: &Error) {
        for w in self.waiting.drain(..) {
            let _ = w.events.send(GenEvent::Failed(error.duplicate()));
        }
        for r in self.running.drain(..) {
            let _ = r.events.send(GenEvent::Failed(error.duplicate()));
        }
    }

    /// One step: drop what was cancelled, admit and prefill, decode every sequence that
    /// was running. A device failure fails the sequences of the step that failed.
    pub fn step(&mut self, decoder: &mut dyn Decoder) {
        self.running.retain(|r| !r.events.is_closed());
        self.waiting.retain(|w| !w.events.is_closed());
        let decoding: Vec<usize> = (0..self.running.len()).collect();
        self.admit(decoder);
        if decoding.is_empty() {
            return;
        }
        let rows: Vec<DecodeRow> = decoding
            .iter()
            .map(|i| {
                let r = &self.running[*i];
                DecodeRow {
                    slot: r.slot,
                    token: r.last,
                    position: r.length - 1,
                }
            })
            .collect();
        match decoder.decode(&rows) {
            Ok(logits) => {
                let mut done = Vec::new();
                for (i, row) in decoding.iter().zip(logits) {
                    let r = &mut self.running[*i];
                    r.length += 1;
                    let token = r.sampler.pick(&row);
                    if !accept(decoder, r, token, &row) {
                        done.push(*i);
                    }
                }
                remove(&mut self.running, done);
            }
            Err(e) => {
                for i in decoding.iter().rev() {
                    let r = self.running.remove(*i);
                    let _ = r.events.send(GenEvent::Failed(e.duplicate()));
                }
            }
        }
    }

    /// Admit waiting requests into free slots and run their prefills.
    fn admit(&mut self, decoder: &mut dyn Decoder) {
        let mut prefilled = 0;
        while let Some(next) = self.waiting.front() {
            let used: Vec<usize> = self.running.iter().map(|r| r.slot).collect();
            let Some(slot) = (0..decoder.slots()).find(|s| !used.contains(s)) else {
                return;
            };
            if prefilled > 0 && prefilled + next.ids.len() > PREFILL_BUDGET {
                return;
            }
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            prefilled += w.ids.len();
            let logits = match decoder.prefill(slot, &w.ids) {
                Ok(l) => l,
                Err(e) => {
                    let _ = w.events.send(GenEvent::Failed(e));
                    continue;
                }
            };
            let _ = w.events.send(GenEvent::Started {
                prompt_tokens: w.ids.len() as u32,
                queue: w.since.elapsed(),
            });
            let mut r = Running {
                slot,
                length: w.ids.len() + 1,
                last: 0,
                generated: 0,
                budget: w.budget,
                ignore_eos: w.sampling.ignore_eos,
                logprobs: w.sampling.logprobs,
                text: TextStream::new(w.sampling.stop.clone()),
                sampler: Sampler::new(w.sampling),
                events: w.events,
            };
            let token = r.sampler.pick(&logits);
            if accept(decoder, &mut r, token, &logits) {
                self.running.push(r);
            }
        }
    }
}

/// Take a sampled token into a sequence and tell its caller; false when the sequence is
/// over (finished, or its caller gone).
fn accept(decoder: &dyn Decoder, r: &mut Running, token: u32, logits: &[f32]) -> bool {
    r.generated += 1;
    r.last = token;
    let codec = decoder.codec();
    let eos = !r.ignore_eos && codec.eos.contains(&token);
    let (text, stopped) = if eos {
        (String::new(), true)
    } else {
        match r.text.push(codec, token) {
            Piece::Text(t) => (t, false),
            Piece::Stopped(t) => (t, true),
        }
    };
    let logprobs = (r.logprobs > 0).then(|| Logprobs::of(logits, token, r.logprobs as usize));
    if r.events
        .send(GenEvent::Token {
            id: token,
            text,
            logprobs,
        })
        .is_err()
    {
        return false;
    }
    let finish = if stopped {
        Some(FinishReason::Stop)
    } else if r.generated >= r.budget || r.length >= decoder.context() as usize {
        Some(FinishReason::Length)
    } else {
        None
    };
    if let Some(reason) = finish {
        let _ = r.events.send(GenEvent::Finished {
            reason,
            text: r.text.finish(),
            completion_tokens: r.generated,
        });
        return false;
    }
    true
}

/// Remove the sequences at `indices` (ascending).
fn remove(running: &mut Vec<Running>, indices: Vec<usize>) {
    for i in indices.into_iter().rev() {
        running.remove(i);
    }
}
