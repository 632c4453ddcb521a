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
    /// The generation's span, when traced: its prefill and the decode steps it takes
    /// part in are recorded under it (the steps linked to every generation in them).
    pub trace: Option<kiln_telemetry::trace::Context>,
}

struct Waiting {
    trace: Option<kiln_telemetry::trace::Context>,
    ids: Vec<u32>,
    budget: u32,
    sampling: Sampling,
    events: mpsc::UnboundedSender<GenEvent>,
    since: Instant,
}

struct Running {
    trace: Option<kiln_telemetry::trace::Context>,
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
            trace: request.trace,
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
        let span = step_span(&self.running, &decoding);
        let result = decoder.decode(&rows);
        drop(span);
        match result {
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
            let span = w.trace.as_ref().and_then(|cx| {
                use kiln_telemetry::trace::KeyValue;
                kiln_telemetry::trace::Detached::start("prefill", cx, || {
                    vec![
                        KeyValue::new("kiln.generation.prompt_tokens", w.ids.len() as i64),
                        KeyValue::new("kiln.generation.slot", slot as i64),
                    ]
                })
            });
            let result = decoder.prefill(slot, &w.ids);
            drop(span);
            let logits = match result {
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
                trace: w.trace,
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

/// The span of a decode step over `running[decoding]`, linked to each traced generation
/// in it.
fn step_span(running: &[Running], decoding: &[usize]) -> Option<kiln_telemetry::trace::Detached> {
    if !kiln_telemetry::trace::enabled() {
        return None;
    }
    let traced: Vec<&kiln_telemetry::trace::Context> = decoding
        .iter()
        .filter_map(|i| running[*i].trace.as_ref())
        .collect();
    let rows = decoding.len();
    kiln_telemetry::trace::shared_step("decode step", &traced, || {
        vec![kiln_telemetry::trace::KeyValue::new(
            "kiln.generation.rows",
            rows as i64,
        )]
    })
}

/// Remove the sequences at `indices` (ascending).
fn remove(running: &mut Vec<Running>, indices: Vec<usize>) {
    for i in indices.into_iter().rev() {
        running.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::TextCodec;
    use kiln_core::spec::LlamaSpec;
    use tokenizers::Tokenizer;

    /// Characters as tokens: `<eos>` is 0, then `a`, `b`, `c`, `d`; decoding concatenates.
    fn codec() -> TextCodec {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."},
                              "behavior": "Isolated", "invert": false},
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "unk_token": "<eos>",
                      "vocab": {"<eos>": 0, "a": 1, "b": 2, "c": 3, "d": 4}},
        });
        let tokenizer = Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        let spec = LlamaSpec {
            vocab_size: 5,
            hidden_size: 4,
            intermediate_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            add_bos_token: false,
            eos_token_ids: vec![0],
        };
        TextCodec::new(tokenizer, None, &spec).unwrap()
    }

    /// A decoder whose next token after position p is `a`, `b`, `c` in turn (1 + p mod 3),
    /// or `<eos>` at `eos_at`; it records the rows of every decode step.
    struct Fake {
        codec: TextCodec,
        slots: usize,
        eos_at: Option<usize>,
        steps: Vec<Vec<DecodeRow>>,
        prefills: Vec<usize>,
    }

    impl Fake {
        fn new(slots: usize) -> Self {
            Fake {
                codec: codec(),
                slots,
                eos_at: None,
                steps: Vec::new(),
                prefills: Vec::new(),
            }
        }

        fn logits(&self, next_position: usize) -> Vec<f32> {
            let mut l = vec![0.0; 5];
            let token = if self.eos_at == Some(next_position) {
                0
            } else {
                1 + next_position % 3
            };
            l[token] = 10.0;
            l
        }
    }

    impl Decoder for Fake {
        fn codec(&self) -> &TextCodec {
            &self.codec
        }
        fn context(&self) -> u32 {
            64
        }
        fn slots(&self) -> usize {
            self.slots
        }
        fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
            self.prefills.push(slot);
            Ok(self.logits(tokens.len()))
        }
        fn decode(&mut self, rows: &[DecodeRow]) -> Result<Vec<Vec<f32>>> {
            self.steps.push(rows.to_vec());
            Ok(rows.iter().map(|r| self.logits(r.position + 1)).collect())
        }
    }

    fn request(
        prompt: &str,
        max_tokens: u32,
        stop: &[&str],
    ) -> (GenerationRequest, mpsc::UnboundedReceiver<GenEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let sampling = Sampling {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            stop: stop.iter().map(|s| (*s).to_owned()).collect(),
            ..Sampling::default()
        };
        (
            GenerationRequest {
                prompt: Prompt::Text(prompt.into()),
                sampling,
                events,
                trace: None,
            },
            rx,
        )
    }

    /// Every event so far: the text, the token count, and the finish reason if any.
    fn drain(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> (String, usize, Option<FinishReason>) {
        let (mut text, mut tokens, mut finish) = (String::new(), 0, None);
        while let Ok(event) = rx.try_recv() {
            match event {
                GenEvent::Token { text: t, .. } => {
                    text += &t;
                    tokens += 1;
                }
                GenEvent::Finished {
                    reason, text: t, ..
                } => {
                    text += &t;
                    finish = Some(reason);
                }
                GenEvent::Started { .. } => {}
                GenEvent::Failed(e) => panic!("failed: {e}"),
            }
        }
        (text, tokens, finish)
    }

    #[test]
    fn sequences_wait_for_a_slot_and_take_it_when_one_is_freed() {
        let mut fake = Fake::new(2);
        let mut generator = Generator::default();
        let mut receivers = Vec::new();
        for max in [2, 4, 3] {
            let (r, rx) = request("a", max, &[]);
            generator.submit(&fake, r).unwrap();
            receivers.push(rx);
        }
        let mut steps = 0;
        while generator.busy() {
            generator.step(&mut fake);
            steps += 1;
            assert!(steps < 20);
        }
        assert!(fake.steps.iter().all(|rows| rows.len() <= 2));
        // The third waited for the first's slot (slot 0), freed after its two tokens.
        assert_eq!(fake.prefills, vec![0, 1, 0]);
        // Prompt "a" (position 0): the tokens after it are b, c, a, b, ...
        let answers: Vec<_> = receivers.iter_mut().map(drain).collect();
        assert_eq!(answers[0], ("bc".into(), 2, Some(FinishReason::Length)));
        assert_eq!(answers[1], ("bcab".into(), 4, Some(FinishReason::Length)));
        assert_eq!(answers[2], ("bca".into(), 3, Some(FinishReason::Length)));
        assert_eq!(generator.stats(2).running, 0);
    }

    #[test]
    fn a_caller_that_goes_away_frees_its_slot_at_the_next_step() {
        let mut fake = Fake::new(1);
        let mut generator = Generator::default();
        let (r, rx) = request("a", 50, &[]);
        generator.submit(&fake, r).unwrap();
        generator.step(&mut fake);
        generator.step(&mut fake);
        assert_eq!(generator.stats(1).running, 1);
        drop(rx);
        generator.step(&mut fake);
        assert_eq!(generator.stats(1).running, 0);
        assert!(!generator.busy());
        let decoded = fake.steps.len();
        generator.step(&mut fake);
        assert_eq!(
            fake.steps.len(),
            decoded,
            "nothing runs for a cancelled sequence"
        );
    }

    #[test]
    fn stop_strings_and_end_of_sequence_end_a_generation_with_the_text_before_them() {
        let mut fake = Fake::new(4);
        let mut generator = Generator::default();
        // b c a b c ...: "ab" first completes at the 4th token.
        let (r, mut stopped) = request("a", 20, &["ab"]);
        generator.submit(&fake, r).unwrap();
        // A stop string that never completes is given out in the end.
        let (r, mut partial) = request("a", 3, &["ax"]);
        generator.submit(&fake, r).unwrap();
        while generator.busy() {
            generator.step(&mut fake);
        }
        let (text, tokens, finish) = drain(&mut stopped);
        assert_eq!(
            (text.as_str(), tokens, finish),
            ("bc", 4, Some(FinishReason::Stop))
        );
        assert_eq!(
            drain(&mut partial),
            ("bca".into(), 3, Some(FinishReason::Length))
        );

        fake.eos_at = Some(3);
        let (r, mut eos) = request("a", 20, &[]);
        generator.submit(&fake, r).unwrap();
        while generator.busy() {
            generator.step(&mut fake);
        }
        // Tokens at positions 1 and 2, then <eos> (no text).
        assert_eq!(drain(&mut eos), ("bc".into(), 3, Some(FinishReason::Stop)));
    }

    #[test]
    fn requests_that_can_never_run_are_refused_before_they_wait() {
        let fake = Fake::new(1);
        let mut generator = Generator::default();
        let (r, _rx) = request(&"a".repeat(64), 1, &[]);
        let err = generator.submit(&fake, r).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        let (r, _rx) = request("", 1, &[]);
        assert!(generator.submit(&fake, r).is_err());
        assert!(!generator.busy());
    }
}
