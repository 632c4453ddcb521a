//! Text generation, device-free: the sampling parameters a request carries (as Triton's
//! vLLM backend takes them, a JSON object in `sampling_parameters`), their limits, why a
//! generation ended, and the tensor names of the OIP decoupled interface
//! (`docs/models.md`, "Generation").

use serde_json::Value;

use crate::{Error, Result};

/// The prompt, one UTF-8 string.
pub const TEXT_INPUT: &str = "text_input";
/// Whether to answer token by token (ModelStreamInfer) or once at the end.
pub const STREAM_INPUT: &str = "stream";
/// The sampling parameters, a JSON object in one BYTES element.
pub const SAMPLING_INPUT: &str = "sampling_parameters";
/// Whether the answer leaves out the prompt (when not streaming; streams never repeat it).
pub const EXCLUDE_INPUT: &str = "exclude_input_in_output";
/// The generated text.
pub const TEXT_OUTPUT: &str = "text_output";
/// Why the generation ended (`stop`, `length`), on the last response.
pub const FINISH_OUTPUT: &str = "finish_reason";
/// The ids of the tokens a response carries (Kiln's addition to the vLLM backend's
/// outputs).
pub const TOKEN_IDS_OUTPUT: &str = "token_ids";
/// Tokens in the prompt.
pub const INPUT_TOKENS_OUTPUT: &str = "num_input_tokens";
/// Tokens generated so far.
pub const OUTPUT_TOKENS_OUTPUT: &str = "num_output_tokens";

/// Most stop strings in one request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Largest `top_k`.
pub const MAX_TOP_K: u32 = 1 << 20;
/// Largest temperature.
pub const MAX_TEMPERATURE: f64 = 100.0;
/// Most alternatives `logprobs` may ask for per token.
pub const MAX_LOGPROBS: u32 = 1_024;
/// Tokens generated when a request does not say (and the context leaves room).
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// How the next token is chosen, and when generation stops.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before sampling.
    pub temperature: f64,
    /// Sample only among the most likely tokens whose probabilities sum to this (1: all).
    pub top_p: f64,
    /// Sample only among this many most likely tokens (0: all).
    pub top_k: u32,
    /// Most tokens to generate; `None` leaves it to the server's default.
    pub max_tokens: Option<u32>,
    /// Texts that end the generation; the text up to the stop is answered, the stop not.
    pub stop: Vec<String>,
    /// Seed of the sampler; the same seed gives the same tokens. `None`: a random seed.
    pub seed: Option<u64>,
    /// Go on past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report the log-probabilities of this many most likely tokens at each step (and of
    /// the token taken), from the model's logits before temperature. 0: none.
    pub logprobs: u32,
}

impl Default for Sampling {
    /// The defaults of vLLM's sampling parameters: temperature 1, no top-p or top-k cut.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: None,
            stop: Vec::new(),
            seed: None,
            ignore_eos: false,
            logprobs: 0,
        }
    }
}

impl Sampling {
    /// Whether the most likely token is always taken.
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Read the JSON object of `sampling_parameters`. Numbers may come as JSON numbers or
    /// as strings of them (Triton's vLLM clients send both); `stop` is a string or a list
    /// of strings. Unknown keys are refused, naming them.
    pub fn from_json(text: &[u8]) -> Result<Self> {
        let field = |name: &str| format!("{SAMPLING_INPUT}.{name}");
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| Error::Invalid(format!("input {SAMPLING_INPUT:?} is not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::Invalid(format!(
                "input {SAMPLING_INPUT:?} must be a JSON object"
            )));
        };
        let mut s = Sampling::default();
        for (key, v) in &map {
            match key.as_str() {
                "temperature" => s.temperature = number(&field(key), v)?,
                "top_p" => s.top_p = number(&field(key), v)?,
                "top_k" => {
                    let k = number(&field(key), v)?;
                    // vLLM spells "no cut" as -1.
                    s.top_k = if k == -1.0 || k == 0.0 {
                        0
                    } else {
                        whole(&field(key), k, u64::from(MAX_TOP_K))? as u32
                    };
                }
                "max_tokens" => {
                    s.max_tokens = Some(whole(
                        &field(key),
                        number(&field(key), v)?,
                        u64::from(u32::MAX),
                    )? as u32)
                }
                "seed" => s.seed = Some(whole(&field(key), number(&field(key), v)?, u64::MAX)?),
                "ignore_eos" => s.ignore_eos = boolean(&field(key), v)?,
                "logprobs" => {
                    s.logprobs = whole(
                        &field(key),
                        number(&field(key), v)?,
                        u64::from(MAX_LOGPROBS),
                    )? as u32
                }
                "stop" => {
                    s.stop = match v {
                        Value::String(one) => vec![one.clone()],
                        Value::Array(all) => all
                            .iter()
                            .map(|x| {
                                x.as_str().map(str::to_owned).ok_or_else(|| {
                                    Error::Invalid(format!(
                                        "{} must be a string or a list of strings",
                                        field(key)
                                    ))
                                })
                            })
                            .collect::<Result<_>>()?,
                        Value::Null => Vec::new(),
                        _ => {
                            return Err(Error::Invalid(format!(
                                "{} must be a string or a list of strings",
                                field(key)
                            )));
                        }
                    }
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "{SAMPLING_INPUT}: unknown parameter {other:?}; known: temperature, top_p, top_k, max_tokens, stop, seed, ignore_eos, logprobs"
                    )));
                }
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Check every limit that does not depend on the model; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let field = |name: &str| format!("{SAMPLING_INPUT}.{name}");
        if !(self.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&self.temperature)) {
            return Err(Error::Invalid(format!(
                "{} must be between 0 and {MAX_TEMPERATURE}, got {}",
                field("temperature"),
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "{} must be above 0 and at most 1, got {}",
                field("top_p"),
                self.top_p
            )));
        }
        if self.top_k > MAX_TOP_K {
            return Err(Error::Invalid(format!(
                "{} must be at most {MAX_TOP_K}, got {}",
                field("top_k"),
                self.top_k
            )));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::Invalid(format!(
                "{} must be at least 1",
                field("max_tokens")
            )));
        }
        if self.logprobs > MAX_LOGPROBS {
            return Err(Error::Invalid(format!(
                "{} must be at most {MAX_LOGPROBS}, got {}",
                field("logprobs"),
                self.logprobs
            )));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::Invalid(format!(
                "{} holds {} strings; at most {MAX_STOP_STRINGS} are allowed",
                field("stop"),
                self.stop.len()
            )));
        }
        for s in &self.stop {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(Error::Invalid(format!(
                    "{}: every stop string must be 1 to {MAX_STOP_BYTES} bytes",
                    field("stop")
                )));
            }
        }
        Ok(())
    }

    /// Check the request against a model of `context` positions for a prompt of
    /// `prompt_tokens` tokens, and return how many tokens it may generate: its
    /// `max_tokens` (or the default), cut to what the context leaves.
    pub fn budget(&self, prompt_tokens: usize, context: u32) -> Result<u32> {
        if prompt_tokens == 0 {
            return Err(Error::Invalid(format!(
                "input {TEXT_INPUT:?}: the prompt makes no tokens"
            )));
        }
        if prompt_tokens >= context as usize {
            return Err(Error::Invalid(format!(
                "input {TEXT_INPUT:?}: the prompt is {prompt_tokens} tokens; the model's context is {context}, and at least one must be left to generate"
            )));
        }
        if let Some(max) = self.max_tokens
            && max > context
        {
            return Err(Error::Invalid(format!(
                "{SAMPLING_INPUT}.max_tokens {max} is above the model's context of {context} tokens"
            )));
        }
        let room = context - prompt_tokens as u32;
        Ok(self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(room))
    }
}

fn number(field: &str, v: &Value) -> Result<f64> {
    let parsed = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| Error::Invalid(format!("{field} must be a number")))
}

fn whole(field: &str, v: f64, max: u64) -> Result<u64> {
    if v.fract() != 0.0 || v < 0.0 || v > max as f64 {
        return Err(Error::Invalid(format!(
            "{field} must be a whole number between 0 and {max}, got {v}"
        )));
    }
    Ok(v as u64)
}

fn boolean(field: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(Error::Invalid(format!("{field} must be true or false"))),
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl FinishReason {
    /// As vLLM names it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" => Some(FinishReason::Stop),
            "length" => Some(FinishReason::Length),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_come_as_numbers_or_strings_and_unknown_ones_are_named() {
        let s = Sampling::from_json(
            br#"{"temperature": "0.5", "top_p": 0.9, "top_k": -1, "max_tokens": "12",
                 "stop": "\n", "seed": 7, "ignore_eos": "true"}"#,
        )
        .unwrap();
        assert_eq!(s.temperature, 0.5);
        assert_eq!(s.top_p, 0.9);
        assert_eq!(s.top_k, 0);
        assert_eq!(s.max_tokens, Some(12));
        assert_eq!(s.stop, vec!["\n".to_owned()]);
        assert_eq!(s.seed, Some(7));
        assert!(s.ignore_eos);
        let err = Sampling::from_json(br#"{"temprature": 0}"#).unwrap_err();
        assert!(err.to_string().contains("\"temprature\""), "{err}");
        for (bad, named) in [
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"seed": "x"}"#, "seed"),
            (r#"[1]"#, "JSON object"),
        ] {
            let err = Sampling::from_json(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn the_budget_is_cut_to_the_context_and_overlong_requests_are_refused() {
        let s = Sampling::default();
        assert_eq!(s.budget(10, 1000).unwrap(), DEFAULT_MAX_TOKENS);
        assert_eq!(s.budget(990, 1000).unwrap(), 10);
        assert!(s.budget(1000, 1000).is_err());
        assert!(s.budget(0, 1000).is_err());
        let long = Sampling {
            max_tokens: Some(2000),
            ..Sampling::default()
        };
        assert!(
            long.budget(1, 1000)
                .unwrap_err()
                .to_string()
                .contains("max_tokens")
        );
    }
}
