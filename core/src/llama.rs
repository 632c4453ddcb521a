//! Llama-family decoders from Hugging Face directories: `config.json` (`model_type`
//! "llama", or any of the same architecture), `model.safetensors` (F32, F16 or BF16; kept
//! as F32), `tokenizer.json`, and the chat template and special tokens from
//! `tokenizer_config.json` and `generation_config.json`. A GGUF file is turned into these
//! same files first ([`crate::gguf`]), so both paths meet the same checks.

use std::collections::BTreeMap;

use bytes::Bytes;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::hf::{CONFIG, Imported, TOKENIZER, WEIGHTS, config_u32, json};
use crate::spec::{LlamaSpec, ModelSpec};
use crate::{Error, Result};

/// Tokenizer settings: the chat template, `add_bos_token`, the special tokens.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// Generation defaults: the end-of-sequence ids.
pub const GENERATION_CONFIG: &str = "generation_config.json";
/// The chat template as a file of its own (newer Hugging Face directories, and what Kiln
/// stores with a version).
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";

/// The model types of the Llama architecture Kiln serves, for messages.
pub const SERVED_TYPES: &str = "llama";

/// Whether `config.json`'s `model_type` is a decoder Kiln serves.
pub fn is_decoder(model_type: &str) -> bool {
    model_type == "llama"
}

/// Every tensor a decoder of `spec` needs, with its shape (Hugging Face's layout: linear
/// weights are `[out, in]`).
pub fn llama_tensors(spec: &LlamaSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size as usize;
    let i = spec.intermediate_size as usize;
    let kv = spec.kv_width() as usize;
    let v = spec.vocab_size as usize;
    let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
    for l in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    out.push(("model.norm.weight".to_owned(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![v, h]));
    }
    out
}

/// Check a Hugging Face Llama directory (its `config.json` already read) and read its spec.
pub fn import(config: &Value, files: &BTreeMap<String, Bytes>) -> Result<Imported> {
    let number = |field: &str| config_u32(config, field);
    let act = config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        return Err(Error::Invalid(format!(
            "{CONFIG}: hidden_act {act:?} is not served; Kiln computes \"silu\""
        )));
    }
    if let Some(scaling) = config.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(Error::Invalid(format!(
            "{CONFIG}: rope_scaling {scaling} is not served; Kiln computes plain rotary embeddings"
        )));
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if config.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(Error::Invalid(format!(
                "{CONFIG}: {flag} is not served; Kiln computes Llama without biases"
            )));
        }
    }
    let heads = number("num_attention_heads")?;
    let hidden = number("hidden_size")?;
    if let Some(head_dim) = config.get("head_dim").and_then(Value::as_u64)
        && heads > 0
        && head_dim != u64::from(hidden / heads)
    {
        return Err(Error::Invalid(format!(
            "{CONFIG}: head_dim {head_dim} is not hidden_size / num_attention_heads; not served"
        )));
    }
    let tokenizer_config = json(files, TOKENIZER_CONFIG)?;
    let generation_config = json(files, GENERATION_CONFIG)?;
    let vocab_size = number("vocab_size")?;
    let tokenizer = files.get(TOKENIZER).ok_or_else(|| {
        Error::Invalid(format!("{TOKENIZER} is missing from the model directory"))
    })?;
    let tokenizer_json: Value = serde_json::from_slice(tokenizer)
        .ok()
        .filter(|v: &Value| v.get("model").is_some())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{TOKENIZER} is not a tokenizers file (JSON with a \"model\")"
            ))
        })?;
    // The special tokens: ids from the configs, or tokens named in tokenizer_config.json
    // and looked up among the tokenizer's added tokens.
    let token_id = |v: &Value| -> Option<u32> {
        match v {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => added_token_id(&tokenizer_json, s),
            Value::Object(o) => o
                .get("content")
                .and_then(Value::as_str)
                .and_then(|s| added_token_id(&tokenizer_json, s)),
            _ => None,
        }
    };
    let ids = |v: Option<&Value>| -> Vec<u32> {
        match v {
            Some(Value::Array(a)) => a.iter().filter_map(token_id).collect(),
            Some(v) => token_id(v).into_iter().collect(),
            None => Vec::new(),
        }
    };
    let mut eos = ids(generation_config
        .as_ref()
        .and_then(|c| c.get("eos_token_id")));
    if eos.is_empty() {
        eos = ids(config.get("eos_token_id"));
    }
    if eos.is_empty() {
        eos = ids(tokenizer_config.as_ref().and_then(|c| c.get("eos_token")));
    }
    let bos = ids(config.get("bos_token_id"))
        .into_iter()
        .next()
        .or_else(|| ids(tokenizer_config.as_ref().and_then(|c| c.get("bos_token"))).pop());
    let add_bos_token = tokenizer_config
        .as_ref()
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let spec = LlamaSpec {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: number("intermediate_size")?,
        num_hidden_layers: number("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: number("num_key_value_heads").unwrap_or(heads),
        rms_norm_eps: config
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6),
        rope_theta: config
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0),
        max_position_embeddings: number("max_position_embeddings")?,
        tie_word_embeddings: config
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        bos_token_id: bos,
        add_bos_token: add_bos_token && bos.is_some(),
        eos_token_ids: eos,
    };
    spec.validate()?;
    let weights = files
        .get(WEIGHTS)
        .ok_or_else(|| Error::Invalid(format!("{WEIGHTS} is missing from the model directory")))?;
    let weights = checked_weights(&spec, weights)?;
    let mut kept = BTreeMap::new();
    kept.insert(TOKENIZER.to_owned(), tokenizer.clone());
    if let Some(template) = chat_template(files, tokenizer_config.as_ref())? {
        kept.insert(CHAT_TEMPLATE.to_owned(), Bytes::from(template));
    }
    Ok(Imported {
        spec: ModelSpec::Llama(spec),
        weights,
        files: kept,
    })
}

/// The id of an added (special) token of a `tokenizer.json`, by its text.
fn added_token_id(tokenizer: &Value, text: &str) -> Option<u32> {
    tokenizer
        .get("added_tokens")?
        .as_array()?
        .iter()
        .find(|t| t.get("content").and_then(Value::as_str) == Some(text))?
        .get("id")?
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
}

/// The chat template: `chat_template.jinja`, or `tokenizer_config.json`'s
/// `chat_template` (a string, or a list of named templates of which "default" is used).
fn chat_template(
    files: &BTreeMap<String, Bytes>,
    tokenizer_config: Option<&Value>,
) -> Result<Option<String>> {
    if let Some(bytes) = files.get(CHAT_TEMPLATE) {
        return String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Error::Invalid(format!("{CHAT_TEMPLATE} is not UTF-8")));
    }
    let template = match tokenizer_config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    };
    if let Some(t) = &template {
        minijinja::Environment::new()
            .template_from_str(t)
            .map_err(|e| {
                Error::Invalid(format!(
                    "{TOKENIZER_CONFIG}: the chat template does not parse: {e}"
                ))
            })?;
    }
    Ok(template)
}

/// Check that the weights hold every tensor of `spec` in its shape, and return them as an
/// F32 safetensors file (F16 and BF16 checkpoints are widened; an F32 one is kept as is).
fn checked_weights(spec: &LlamaSpec, weights: &Bytes) -> Result<Bytes> {
    let file = SafeTensors::deserialize(weights)
        .map_err(|e| Error::Invalid(format!("{WEIGHTS} is not a safetensors file: {e}")))?;
    let wanted = llama_tensors(spec);
    let mut all_f32 = true;
    for (name, shape) in &wanted {
        let view = file
            .tensor(name)
            .map_err(|_| Error::Invalid(format!("{WEIGHTS}: tensor {name} is missing")))?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::Invalid(format!(
                "{WEIGHTS}: tensor {name} is {:?}; Kiln reads F32, F16 and BF16",
                view.dtype()
            )));
        }
        all_f32 &= view.dtype() == Dtype::F32;
        if view.shape() != shape.as_slice() {
            return Err(Error::Invalid(format!(
                "{WEIGHTS}: tensor {name} has shape {:?}; {CONFIG} makes it {shape:?}",
                view.shape()
            )));
        }
    }
    if all_f32 {
        return Ok(weights.clone());
    }
    let mut tensors = Vec::with_capacity(wanted.len());
    for (name, shape) in wanted {
        let view = file
            .tensor(&name)
            .map_err(|_| Error::Invalid(format!("{WEIGHTS}: tensor {name} is missing")))?;
        let values: Vec<f32> = match view.dtype() {
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => crate::weights::f32_from_le(view.data()).collect(),
        };
        tensors.push((name, shape, f32_bytes(&values)));
    }
    Ok(Bytes::from(f32_safetensors(&tensors)?))
}

/// FP32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An F32 safetensors file of `(name, shape, little-endian FP32 bytes)`.
pub fn f32_safetensors(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|view| (n.clone(), view))
                .map_err(|e| Error::Invalid(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None)
        .map_err(|e| Error::Invalid(format!("cannot write the weights: {e}")))
}
