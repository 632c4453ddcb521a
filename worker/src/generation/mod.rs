//! The generation engine (`docs/models.md`, "Generation"): text generation on a worker,
//! family-agnostic. A decoder family ([`Decoder`]) runs prefills and batched decode steps
//! over its key/value cache; this module decides what runs:
//!
//! - [`scheduler`]: the waiting queue, admission (free slots, a prefill token budget per
//!   step), one decode step for every running sequence, slots freed the moment a sequence
//!   finishes or its caller goes away;
//! - [`sampler`]: greedy, temperature, top-k, top-p, seeded per request;
//! - [`text`]: incremental detokenisation that never splits a UTF-8 character, and stop
//!   strings held back while a partial match is pending;
//! - [`TextCodec`]: the model's tokenizer and chat template.
//!
//! It runs on the engine thread, between inference batches and training steps.

pub mod sampler;
pub mod scheduler;
pub mod text;

use std::time::Duration;

use kiln_core::generation::{FinishReason, Sampling};
use kiln_core::spec::LlamaSpec;
use tokenizers::Tokenizer;

use crate::{Error, Result};

pub use scheduler::{Generator, GeneratorStats};

/// One row of a decode step: the sequence's slot, its newest token and that token's
/// position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeRow {
    /// The sequence's cache slot.
    pub slot: usize,
    /// The token to run.
    pub token: u32,
    /// Its position in the sequence (0-based).
    pub position: usize,
}

/// A decoder family on a device, as the generation engine drives it.
pub trait Decoder {
    /// The tokenizer and chat template.
    fn codec(&self) -> &TextCodec;
    /// The context: most positions of one sequence.
    fn context(&self) -> u32;
    /// Cache slots: most sequences running at once.
    fn slots(&self) -> usize;
    /// Run a prompt into `slot` (overwriting what was there) and return the logits of its
    /// last position.
    fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Run one token of each row, each attending to its own slot up to its position, and
    /// return each row's logits.
    fn decode(&mut self, rows: &[DecodeRow]) -> Result<Vec<Vec<f32>>>;
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A prompt as it is.
    Text(String),
    /// A conversation, rendered with the model's chat template (ending in the assistant's
    /// turn).
    Chat(Vec<ChatMessage>),
}

/// What a generation reports to its caller, in order: `Started`, `Token`s, then
/// `Finished` (or `Failed` at any point).
#[derive(Debug)]
pub enum GenEvent {
    /// The prompt was admitted and ran.
    Started {
        /// Tokens in the prompt.
        prompt_tokens: u32,
        /// Time it waited in the queue.
        queue: Duration,
    },
    /// A token was generated.
    Token {
        /// Its id.
        id: u32,
        /// The text it completes (may be empty: part of a character, or held back as the
        /// start of a stop string).
        text: String,
        /// Log-probabilities, when the request asked for them.
        logprobs: Option<Logprobs>,
    },
    /// The generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Text held back that turned out not to be a stop string.
        text: String,
        /// Tokens generated.
        completion_tokens: u32,
    },
    /// The generation failed.
    Failed(Error),
}

/// Log-probabilities at one step, from the model's logits before temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// Of the token taken.
    pub chosen: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl Logprobs {
    /// The log-softmax of `logits` at `chosen` and at the `top` most likely tokens.
    pub fn of(logits: &[f32], chosen: u32, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|v| f64::from(v - max).exp()).sum();
        let norm = f64::from(max) + sum.ln();
        let log = |i: usize| (f64::from(logits[i]) - norm) as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let top = top.min(order.len());
        let by = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if top > 0 && top < order.len() {
            order.select_nth_unstable_by(top - 1, by);
        }
        order.truncate(top);
        order.sort_by(by);
        Logprobs {
            chosen: log(chosen as usize),
            top: order.into_iter().map(|i| (i as u32, log(i))).collect(),
        }
    }
}

/// The model's tokenizer, chat template and special tokens.
pub struct TextCodec {
    tokenizer: Tokenizer,
    template: Option<String>,
    bos: Option<u32>,
    add_bos: bool,
    /// Tokens that end a generation.
    pub eos: Vec<u32>,
}

impl TextCodec {
    /// The codec of a Llama-family model.
    pub fn new(tokenizer: Tokenizer, template: Option<String>, spec: &LlamaSpec) -> Result<Self> {
        if let Some(t) = &template {
            environment()
                .template_from_str(t)
                .map_err(|e| Error::Invalid(format!("the chat template does not parse: {e}")))?;
        }
        Ok(TextCodec {
            tokenizer,
            template,
            bos: spec.bos_token_id,
            add_bos: spec.add_bos_token,
            eos: spec.eos_token_ids.clone(),
        })
    }

    /// A prompt's token ids (the model's beginning-of-sequence token first, when it takes
    /// one). Special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => self.render(messages)?,
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Invalid(format!("the prompt cannot be tokenised: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Render a conversation with the chat template, ending in the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            Error::Invalid("this model has no chat template; send a prompt instead".into())
        })?;
        let env = environment();
        let tmpl = env
            .template_from_str(template)
            .map_err(|e| Error::Invalid(format!("the chat template does not parse: {e}")))?;
        let token = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| {
                let map: std::collections::BTreeMap<&str, minijinja::Value> = [
                    ("role", minijinja::Value::from(m.role.clone())),
                    ("content", minijinja::Value::from(m.content.clone())),
                ]
                .into_iter()
                .collect();
                minijinja::Value::from(map)
            })
            .collect();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => token(self.bos),
            eos_token => token(self.eos.first().copied()),
        })
        .map_err(|e| Error::Invalid(format!("the chat template failed on these messages: {e}")))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Most template instructions one rendering may run (a long conversation takes thousands).
const TEMPLATE_FUEL: u64 = 5_000_000;

/// The template environment: Jinja with Python's string methods, `raise_exception`, and
/// a bound on work so that no template can spin forever.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env
}

/// Validate a request against a decoder and return its prompt ids and token budget.
pub fn admit(
    decoder: &dyn Decoder,
    prompt: &Prompt,
    sampling: &Sampling,
) -> Result<(Vec<u32>, u32)> {
    sampling.validate()?;
    let ids = decoder.codec().encode(prompt)?;
    let budget = sampling.budget(ids.len(), decoder.context())?;
    Ok((ids, budget))
}
