//! GGUF files (llama.cpp's and Ollama's format) turned into a Hugging Face Llama import:
//! the metadata becomes `config.json`, the vocabulary and merges a byte-level BPE
//! `tokenizer.json`, the chat template and special tokens `tokenizer_config.json` and
//! `generation_config.json`, and every tensor — F32, F16, BF16, Q8_0, Q4_0 or Q4_1 — FP32
//! under its Hugging Face name, the query and key rows put back in Hugging Face's order
//! (llama.cpp interleaves each head's rotary pairs). The result then goes through the same
//! checks as a directory ([`crate::llama::import`]). The layout is in `docs/models.md`,
//! "GGUF".
//!
//! Why Kiln reads the container itself rather than through the `ggus` crate: an upload is
//! untrusted input, and `ggus` 0.5 takes a tensor's type by reinterpreting the file's `u32`
//! as its Rust enum (undefined behaviour for a value outside it) and sizes tensors with
//! unchecked arithmetic. The reader here is bounds-checked everywhere, and the three block
//! formats Kiln dequantises are a few lines each.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::hf::{CONFIG, GGUF, Imported, TOKENIZER, WEIGHTS};
use crate::llama::{GENERATION_CONFIG, TOKENIZER_CONFIG, f32_safetensors};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// Most metadata entries and tensors a file may declare (a 405B Llama has ~1,100 tensors).
const MAX_ENTRIES: u64 = 1 << 16;
/// Most dimensions of one tensor.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone)]
enum Meta<'a> {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'a str),
    Array(Vec<Meta<'a>>),
}

impl<'a> Meta<'a> {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Meta::Uint(v) => Some(*v),
            Meta::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Meta::Float(v) => Some(*v),
            Meta::Uint(v) => Some(*v as f64),
            Meta::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&'a str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A tensor's entry: name, dimensions (fastest first, as GGUF lists them), type, offset.
#[derive(Debug)]
struct TensorInfo<'a> {
    name: &'a str,
    dims: Vec<u64>,
    kind: u32,
    offset: u64,
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

fn truncated() -> Error {
    Error::Invalid(format!("{GGUF} is cut short or malformed"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let bytes = self.data.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn str(&mut self) -> Result<&'a str> {
        let len = usize::try_from(self.u64()?).map_err(|_| truncated())?;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| Error::Invalid(format!("{GGUF} holds a string that is not UTF-8")))
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Meta<'a>> {
        Ok(match kind {
            0 => Meta::Uint(u64::from(self.array::<1>()?[0])),
            1 => Meta::Int(i64::from(self.array::<1>()?[0] as i8)),
            2 => Meta::Uint(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Meta::Int(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Meta::Uint(u64::from(self.u32()?)),
            5 => Meta::Int(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Meta::Float(f64::from(f32::from_le_bytes(self.array()?))),
            7 => Meta::Bool(self.array::<1>()?[0] != 0),
            8 => Meta::Str(self.str()?),
            9 if depth == 0 => {
                let inner = self.u32()?;
                let len = self.u64()?;
                // Every element takes at least one byte: a length past the file is forged.
                if len > (self.data.len() - self.pos) as u64 {
                    return Err(truncated());
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(inner, depth + 1)?);
                }
                Meta::Array(items)
            }
            10 => Meta::Uint(self.u64()?),
            11 => Meta::Int(i64::from_le_bytes(self.array()?)),
            12 => Meta::Float(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(Error::Invalid(format!(
                    "{GGUF} holds a metadata value of unknown type {other}"
                )));
            }
        })
    }
}

/// A parsed GGUF file: metadata, tensor entries, and the tensor data region.
struct File<'a> {
    meta: HashMap<&'a str, Meta<'a>>,
    tensors: Vec<TensorInfo<'a>>,
    data: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<File<'_>> {
    let mut r = Reader {
        data: bytes,
        pos: 0,
    };
    if r.take(4).ok() != Some(&MAGIC[..]) {
        return Err(Error::Invalid(format!(
            "{GGUF} is not a GGUF file (no GGUF magic)"
        )));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::Invalid(format!(
            "{GGUF}: GGUF version {version} is not read; Kiln reads versions 2 and 3"
        )));
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    if tensor_count > MAX_ENTRIES || kv_count > MAX_ENTRIES {
        return Err(Error::Invalid(format!(
            "{GGUF} declares {tensor_count} tensors and {kv_count} metadata entries; at most {MAX_ENTRIES} of each are read"
        )));
    }
    let mut meta = HashMap::new();
    for _ in 0..kv_count {
        let key = r.str()?;
        let kind = r.u32()?;
        let value = r.value(kind, 0)?;
        meta.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let name = r.str()?;
        let ndim = r.u32()?;
        if ndim == 0 || ndim > MAX_DIMS {
            return Err(Error::Invalid(format!(
                "{GGUF}: tensor {name} has {ndim} dimensions; 1 to {MAX_DIMS} are read"
            )));
        }
        let dims = (0..ndim).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let kind = r.u32()?;
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            kind,
            offset,
        });
    }
    let alignment = meta
        .get("general.alignment")
        .and_then(Meta::as_u64)
        .unwrap_or(32);
    if alignment == 0 || alignment > 1 << 16 {
        return Err(Error::Invalid(format!(
            "{GGUF}: general.alignment {alignment} is not a usable alignment"
        )));
    }
    let start = (r.pos as u64).div_ceil(alignment) * alignment;
    let data = bytes.get(start as usize..).unwrap_or(&[]);
    Ok(File {
        meta,
        tensors,
        data,
    })
}

/// A tensor type's name, for messages.
fn type_name(kind: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    names
        .get(kind as usize)
        .map_or_else(|| format!("type {kind}"), |n| (*n).to_owned())
}

/// `(elements per block, bytes per block)` of the types Kiln dequantises.
fn block(kind: u32) -> Option<(usize, usize)> {
    match kind {
        0 => Some((1, 4)),   // F32
        1 => Some((1, 2)),   // F16
        30 => Some((1, 2)),  // BF16
        8 => Some((32, 34)), // Q8_0: f16 scale, 32 × i8
        2 => Some((32, 18)), // Q4_0: f16 scale, 16 bytes of nibbles
        3 => Some((32, 20)), // Q4_1: f16 scale, f16 minimum, 16 bytes of nibbles
        _ => None,
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A tensor's values as FP32, appended to `out` as little-endian bytes.
fn dequantize(kind: u32, raw: &[u8], out: &mut Vec<u8>) {
    let mut push = |v: f32| out.extend_from_slice(&v.to_le_bytes());
    match kind {
        0 => raw.chunks_exact(4).for_each(|b| {
            push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }),
        1 => raw.chunks_exact(2).for_each(|b| push(f16_at(b, 0))),
        30 => raw
            .chunks_exact(2)
            .for_each(|b| push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        8 => raw.chunks_exact(34).for_each(|b| {
            let d = f16_at(b, 0);
            b[2..].iter().for_each(|q| push(f32::from(*q as i8) * d));
        }),
        // Nibble blocks: the low nibbles are the block's first 16 values, the high ones
        // its last 16.
        2 => raw.chunks_exact(18).for_each(|b| {
            let d = f16_at(b, 0);
            let q = &b[2..];
            q.iter().for_each(|x| push((f32::from(x & 0x0f) - 8.0) * d));
            q.iter().for_each(|x| push((f32::from(x >> 4) - 8.0) * d));
        }),
        3 => raw.chunks_exact(20).for_each(|b| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let q = &b[4..];
            q.iter().for_each(|x| push(f32::from(x & 0x0f) * d + m));
            q.iter().for_each(|x| push(f32::from(x >> 4) * d + m));
        }),
        _ => unreachable!("block() admits only the types above"),
    }
}

impl File<'_> {
    fn text(&self, key: &str) -> Option<&str> {
        self.meta.get(key).and_then(Meta::as_str)
    }

    fn number(&self, key: &str) -> Result<u64> {
        self.meta
            .get(key)
            .and_then(Meta::as_u64)
            .ok_or_else(|| Error::Invalid(format!("{GGUF}: {key} is missing or not a number")))
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta.get(key) {
            Some(Meta::Array(items)) => items
                .iter()
                .map(|m| {
                    m.as_str().ok_or_else(|| {
                        Error::Invalid(format!("{GGUF}: {key} is not a list of strings"))
                    })
                })
                .collect(),
            _ => Err(Error::Invalid(format!(
                "{GGUF}: {key} is missing or not a list"
            ))),
        }
    }

    /// A tensor's values as FP32 bytes, with its Hugging Face shape (`[rows, columns]`:
    /// GGUF lists the fastest dimension first).
    fn tensor(&self, info: &TensorInfo) -> Result<(Vec<usize>, Vec<u8>)> {
        let (per_block, block_bytes) = block(info.kind).ok_or_else(|| {
            Error::Invalid(format!(
                "{GGUF}: tensor {} is {}; Kiln reads F32, F16, BF16, Q8_0, Q4_0 and Q4_1",
                info.name,
                type_name(info.kind)
            ))
        })?;
        let elements = info
            .dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .filter(|n| *n <= 1 << 34)
            .ok_or_else(|| Error::Invalid(format!("{GGUF}: tensor {} is too large", info.name)))?;
        if !info.dims[0].is_multiple_of(per_block as u64) {
            return Err(Error::Invalid(format!(
                "{GGUF}: tensor {} has rows of {} values, not a whole number of {per_block}-value blocks",
                info.name, info.dims[0]
            )));
        }
        let bytes = elements / per_block as u64 * block_bytes as u64;
        let raw = info
            .offset
            .checked_add(bytes)
            .and_then(|end| self.data.get(info.offset as usize..end as usize))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{GGUF}: tensor {}'s data lies past the end of the file",
                    info.name
                ))
            })?;
        let mut out = Vec::with_capacity(elements as usize * 4);
        dequantize(info.kind, raw, &mut out);
        let shape = info.dims.iter().rev().map(|d| *d as usize).collect();
        Ok((shape, out))
    }
}

/// Put a query or key projection's rows back in Hugging Face's order. llama.cpp stores
/// each head's rows as interleaved rotary pairs (row `2i + j` of a head is Hugging Face's
/// row `j · head_dim/2 + i`); Kiln's rotary embedding rotates halves, as Hugging Face does.
fn unpermute(values: &[u8], rows: usize, cols: usize, heads: usize) -> Result<Vec<u8>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "{GGUF}: a projection of {rows} rows does not split into {heads} heads of rotary pairs"
        )));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let row_bytes = cols * 4;
    let mut out = vec![0u8; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * head_dim + 2 * i + j;
                let to = h * head_dim + j * half + i;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&values[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// A GGUF tensor's Hugging Face name, if it is one of a Llama's.
fn hf_name(name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(top.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The pre-tokenizers Kiln rebuilds, by `tokenizer.ggml.pre`: a byte-level split (GPT-2's
/// pattern), after single digits for SmolLM's.
fn pre_tokenizer(pre: &str) -> Result<Value> {
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    match pre {
        "default" | "gpt-2" | "gpt2" => Ok(byte_level),
        "smollm" => Ok(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level,
            ],
        })),
        other => Err(Error::Invalid(format!(
            "{GGUF}: tokenizer.ggml.pre {other:?} is not rebuilt; Kiln rebuilds default, gpt-2 and smollm"
        ))),
    }
}

/// The model's `tokenizer.json`, rebuilt from the vocabulary and merges: byte-level BPE,
/// control tokens as special added tokens.
fn tokenizer_json(file: &File) -> Result<Value> {
    let model = file.text("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(Error::Invalid(format!(
            "{GGUF}: tokenizer.ggml.model {model:?} is not rebuilt; Kiln rebuilds \"gpt2\" (byte-level BPE)"
        )));
    }
    let tokens = file.strings("tokenizer.ggml.tokens")?;
    let merges = file.strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match file.meta.get("tokenizer.ggml.token_type") {
        Some(Meta::Array(items)) => items.iter().map(|m| m.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert((*token).to_owned(), json!(id));
        // 3: control tokens (<|im_start|>, <|endoftext|>), 4: user-defined ones.
        if matches!(types.get(id), Some(3 | 4)) {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(id) == Some(&3),
            }));
        }
    }
    let pre = pre_tokenizer(file.text("tokenizer.ggml.pre").unwrap_or("default"))?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true
        },
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// Turn an uploaded GGUF file into a checked Llama import.
pub fn import(bytes: &Bytes) -> Result<Imported> {
    let file = parse(bytes)?;
    let arch = file.text("general.architecture").unwrap_or("");
    if arch != "llama" {
        return Err(Error::Invalid(format!(
            "{GGUF}: general.architecture {arch:?} is not served; Kiln serves \"llama\""
        )));
    }
    if let Some(kind) = file.text("llama.rope.scaling.type")
        && kind != "none"
    {
        return Err(Error::Invalid(format!(
            "{GGUF}: llama.rope.scaling.type {kind:?} is not served; Kiln computes plain rotary embeddings"
        )));
    }
    let heads = file.number("llama.attention.head_count")?;
    let kv_heads = file
        .number("llama.attention.head_count_kv")
        .unwrap_or(heads);
    let hidden = file.number("llama.embedding_length")?;
    if let Ok(rope_dims) = file.number("llama.rope.dimension_count")
        && heads > 0
        && rope_dims != hidden / heads
    {
        return Err(Error::Invalid(format!(
            "{GGUF}: llama.rope.dimension_count {rope_dims} rotates part of each head; Kiln rotates whole heads ({})",
            hidden / heads
        )));
    }
    let tokenizer = tokenizer_json(&file)?;
    let vocab_size = match file.number("llama.vocab_size") {
        Ok(n) => n,
        Err(_) => file.strings("tokenizer.ggml.tokens")?.len() as u64,
    };
    let has_output = file.tensors.iter().any(|t| t.name == "output.weight");
    let eos = file.number("tokenizer.ggml.eos_token_id").ok();
    let bos = file.number("tokenizer.ggml.bos_token_id").ok();
    let config = json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": file.number("llama.feed_forward_length")?,
        "num_hidden_layers": file.number("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": file
            .meta
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(Meta::as_f64)
            .unwrap_or(1e-5),
        "rope_theta": file
            .meta
            .get("llama.rope.freq_base")
            .and_then(Meta::as_f64)
            .unwrap_or(10_000.0),
        "max_position_embeddings": file.number("llama.context_length")?,
        "tie_word_embeddings": !has_output,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    let add_bos = matches!(
        file.meta.get("tokenizer.ggml.add_bos_token"),
        Some(Meta::Bool(true))
    );
    let mut tokenizer_config = json!({ "add_bos_token": add_bos });
    if let Some(template) = file.text("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = json!(template);
    }

    let mut tensors = Vec::new();
    for info in &file.tensors {
        // Tensors a Llama does not use (rotary frequency tables) are left out.
        let Some(name) = hf_name(info.name) else {
            continue;
        };
        let (shape, mut values) = file.tensor(info)?;
        if shape.len() == 2 {
            if name.ends_with("q_proj.weight") {
                values = unpermute(&values, shape[0], shape[1], heads as usize)?;
            } else if name.ends_with("k_proj.weight") {
                values = unpermute(&values, shape[0], shape[1], kv_heads as usize)?;
            }
        }
        tensors.push((name, shape, values));
    }
    let weights = f32_safetensors(&tensors)?;
    drop(tensors);

    let text = |v: &Value| Bytes::from(v.to_string());
    let mut files = BTreeMap::new();
    files.insert(CONFIG.to_owned(), text(&config));
    files.insert(TOKENIZER.to_owned(), text(&tokenizer));
    files.insert(TOKENIZER_CONFIG.to_owned(), text(&tokenizer_config));
    files.insert(
        GENERATION_CONFIG.to_owned(),
        text(&json!({ "eos_token_id": eos })),
    );
    files.insert(WEIGHTS.to_owned(), Bytes::from(weights));
    crate::llama::import(&config, &files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_dequantise_as_llama_cpp_defines_them() {
        let one = half::f16::from_f32(0.5).to_le_bytes();
        let min = half::f16::from_f32(-1.0).to_le_bytes();
        // Q8_0: scale 0.5, values 0..32 → 0, 0.5, ..., 15.5.
        let mut q8 = one.to_vec();
        q8.extend((0..32).map(|i| i as u8));
        let mut out = Vec::new();
        dequantize(8, &q8, &mut out);
        let got: Vec<f32> = crate::weights::f32_from_le(&out).collect();
        assert_eq!(got[3], 1.5);
        assert_eq!(got[31], 15.5);
        // Q4_1: scale 0.5, minimum -1; byte i holds value i in its low nibble (element i)
        // and 15 - i in its high one (element 16 + i).
        let mut q4 = one.to_vec();
        q4.extend_from_slice(&min);
        q4.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = Vec::new();
        dequantize(3, &q4, &mut out);
        let got: Vec<f32> = crate::weights::f32_from_le(&out).collect();
        assert_eq!(got[2], 0.0);
        assert_eq!(got[16], 6.5);
        // Q4_0: (q - 8) · scale.
        let mut q40 = one.to_vec();
        q40.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = Vec::new();
        dequantize(2, &q40, &mut out);
        let got: Vec<f32> = crate::weights::f32_from_le(&out).collect();
        assert_eq!(got[0], -4.0);
        assert_eq!(got[16], 3.5);
    }

    #[test]
    fn query_rows_return_to_hugging_face_order() {
        // One head of width 4, one column: llama.cpp's rows are (0, 2, 1, 3) of Hugging
        // Face's.
        let gguf: Vec<u8> = [0.0f32, 2.0, 1.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let hf = unpermute(&gguf, 4, 1, 1).unwrap();
        let got: Vec<f32> = crate::weights::f32_from_le(&hf).collect();
        assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn malformed_files_are_refused_without_panicking() {
        for bad in [
            &b"GGU"[..],
            b"GGUF\x03\0\0\0",
            b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff\0\0\0\0\0\0\0\0",
            b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x05\0\0\0\0\0\0\0abc",
        ] {
            assert!(import(&Bytes::copy_from_slice(bad)).is_err());
        }
        // An array claiming more elements than the file has bytes.
        let mut forged = b"GGUF\x03\0\0\0".to_vec();
        forged.extend(0u64.to_le_bytes());
        forged.extend(1u64.to_le_bytes());
        forged.extend(1u64.to_le_bytes());
        forged.push(b'k');
        forged.extend(9u32.to_le_bytes());
        forged.extend(8u32.to_le_bytes());
        forged.extend(u64::MAX.to_le_bytes());
        assert!(import(&Bytes::from(forged)).is_err());
    }
}
