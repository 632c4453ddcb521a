//! The Llama decoder family: text generation from a Hugging Face Llama checkpoint (or a
//! GGUF file turned into one at import, `kiln_core::gguf`). RMSNorm, rotate-half rotary
//! embeddings with the config's θ, grouped-query attention, SwiGLU, a tied or separate
//! output head — written with Burn's tensor ops, on the CPU backend and on wgpu.
//!
//! The model keeps a key/value cache with a slot per running sequence ([`KvCache`]): a
//! prompt's prefill fills its slot, and each decode step runs one token of every running
//! sequence as one batch, each row attending to its own slot up to its own length. The
//! generation engine (`crate::generation`) decides which sequences run.
//!
//! Grouped-query attention never copies keys per query head: the query heads that share a
//! key/value head are laid out along the query axis of one matrix product.

use std::collections::HashMap;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor as BurnTensor, TensorData};
use kiln_core::hf::{TOKENIZER, WEIGHTS};
use kiln_core::llama::{CHAT_TEMPLATE, llama_tensors};
use kiln_core::spec::{LlamaSpec, ModelSpec};
use kiln_core::tensor::{Interface, Tensor};
use safetensors::SafeTensors;
use tokenizers::Tokenizer;

use super::{Artifacts, Family, HostTensor, Loaded, Prepared, Ran, f32_tensor};
use crate::generation::{DecodeRow, Decoder, TextCodec};
use crate::{Error, Result};

/// The decoder family's device code.
pub struct LlamaFamily;

impl Family for LlamaFamily {
    fn prepare(
        &self,
        spec: &ModelSpec,
        interface: Interface,
        artifacts: Artifacts,
    ) -> Result<Box<dyn Prepared>> {
        let ModelSpec::Llama(spec) = spec else {
            return Err(Error::Invalid("not a Llama spec".into()));
        };
        let bytes = artifacts
            .files
            .get(TOKENIZER)
            .ok_or_else(|| Error::Invalid(format!("the version has no {TOKENIZER}")))?;
        let mut tokenizer = Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Invalid(format!("{TOKENIZER} cannot be read: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Invalid(format!("{TOKENIZER}: {e}")))?;
        let template = artifacts
            .files
            .get(CHAT_TEMPLATE)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let codec = TextCodec::new(tokenizer, template, spec)?;
        let weights = read_weights(spec, &artifacts.weights)?;
        Ok(Box::new(PreparedLlama {
            spec: spec.clone(),
            interface,
            codec,
            weights,
        }))
    }
}

fn read_weights(spec: &LlamaSpec, bytes: &[u8]) -> Result<HashMap<String, HostTensor>> {
    let file =
        SafeTensors::deserialize(bytes).map_err(|e| Error::Invalid(format!("{WEIGHTS}: {e}")))?;
    let mut out = HashMap::new();
    for (name, shape) in llama_tensors(spec) {
        // Linear weights stay `[out, in]`, as the checkpoint has them (see [`linear`]).
        let tensor = f32_tensor(&file, &name, &shape)?;
        out.insert(name, tensor);
    }
    Ok(out)
}

struct PreparedLlama {
    spec: LlamaSpec,
    interface: Interface,
    codec: TextCodec,
    weights: HashMap<String, HostTensor>,
}

impl PreparedLlama {
    fn tensor<const D: usize>(&mut self, name: &str, device: &Device) -> Result<BurnTensor<D>> {
        let t = self
            .weights
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("{WEIGHTS}: tensor {name} is missing")))?;
        Ok(BurnTensor::from_data(
            TensorData::new(t.values, t.shape),
            device,
        ))
    }
}

/// The rotary tables: `cos` and `sin` of position × frequency, `[positions, head_dim]`,
/// each frequency twice (first half and second half of the head, as rotate-half pairs
/// element `i` with element `i + head_dim/2`).
fn rotary_tables(spec: &LlamaSpec, positions: usize, device: &Device) -> [BurnTensor<2>; 2] {
    let hd = spec.head_dim() as usize;
    let half = hd / 2;
    let mut cos = vec![0f32; positions * hd];
    let mut sin = vec![0f32; positions * hd];
    for p in 0..positions {
        for i in 0..half {
            let freq = 1.0 / spec.rope_theta.powf((2 * i) as f64 / hd as f64);
            let angle = p as f64 * freq;
            for at in [p * hd + i, p * hd + half + i] {
                cos[at] = angle.cos() as f32;
                sin[at] = angle.sin() as f32;
            }
        }
    }
    [cos, sin].map(|t| BurnTensor::from_data(TensorData::new(t, [positions, hd]), device))
}

impl Prepared for PreparedLlama {
    fn build(mut self: Box<Self>, device: &Device) -> Result<Box<dyn Loaded>> {
        let embed = self.tensor::<2>("model.embed_tokens.weight", device)?;
        let mut layers = Vec::new();
        for l in 0..self.spec.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                attn_norm: self.tensor(&format!("{p}.input_layernorm.weight"), device)?,
                q: self.tensor(&format!("{p}.self_attn.q_proj.weight"), device)?,
                k: self.tensor(&format!("{p}.self_attn.k_proj.weight"), device)?,
                v: self.tensor(&format!("{p}.self_attn.v_proj.weight"), device)?,
                o: self.tensor(&format!("{p}.self_attn.o_proj.weight"), device)?,
                mlp_norm: self.tensor(&format!("{p}.post_attention_layernorm.weight"), device)?,
                gate: self.tensor(&format!("{p}.mlp.gate_proj.weight"), device)?,
                up: self.tensor(&format!("{p}.mlp.up_proj.weight"), device)?,
                down: self.tensor(&format!("{p}.mlp.down_proj.weight"), device)?,
            });
        }
        let norm = self.tensor::<1>("model.norm.weight", device)?;
        // A tied head is the embedding itself (`[vocab, hidden]`, the layout of every
        // linear weight here).
        let head = if self.spec.tie_word_embeddings {
            embed.clone()
        } else {
            self.tensor::<2>("lm_head.weight", device)?
        };
        let [cos, sin] = rotary_tables(
            &self.spec,
            self.spec.max_position_embeddings as usize,
            device,
        );
        let this = *self;
        let cache = KvCache::new(&this.spec, kiln_core::spec::GENERATION_SLOTS);
        Ok(Box::new(LoadedLlama {
            spec: this.spec,
            interface: this.interface,
            codec: this.codec,
            device: device.clone(),
            embed,
            layers,
            norm,
            head,
            cos,
            sin,
            cache,
        }))
    }
}

struct Layer {
    attn_norm: BurnTensor<1>,
    q: BurnTensor<2>,
    k: BurnTensor<2>,
    v: BurnTensor<2>,
    o: BurnTensor<2>,
    mlp_norm: BurnTensor<1>,
    gate: BurnTensor<2>,
    up: BurnTensor<2>,
    down: BurnTensor<2>,
}

/// The key/value cache: per layer, keys and values of every slot,
/// `[slots, kv_heads, capacity, head_dim]`. The capacity (positions) grows by doubling as
/// sequences grow, up to the context; a slot is reused by the next sequence, whose
/// prefill and steps write every position it reads.
pub struct KvCache {
    slots: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
    keys: Vec<Option<BurnTensor<4>>>,
    values: Vec<Option<BurnTensor<4>>>,
}

impl KvCache {
    fn new(spec: &LlamaSpec, slots: usize) -> Self {
        let layers = spec.num_hidden_layers as usize;
        KvCache {
            slots,
            capacity: 0,
            kv_heads: spec.num_key_value_heads as usize,
            head_dim: spec.head_dim() as usize,
            context: spec.max_position_embeddings as usize,
            keys: (0..layers).map(|_| None).collect(),
            values: (0..layers).map(|_| None).collect(),
        }
    }

    /// Make room for `positions` positions in every slot.
    fn reserve(&mut self, positions: usize, device: &Device) {
        if positions <= self.capacity {
            return;
        }
        let capacity = positions.next_power_of_two().clamp(64, self.context.max(1));
        let capacity = capacity.max(positions);
        let shape = [self.slots, self.kv_heads, capacity, self.head_dim];
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let grown = BurnTensor::<4>::zeros(shape, device);
            *t = Some(match t.take() {
                Some(old) if self.capacity > 0 => grown.slice_assign(
                    [
                        0..self.slots,
                        0..self.kv_heads,
                        0..self.capacity,
                        0..self.head_dim,
                    ],
                    old,
                ),
                _ => grown,
            });
        }
        self.capacity = capacity;
    }

    /// Write `[kv_heads, n, head_dim]` keys and values at positions `start..start + n` of
    /// `slot` in `layer`.
    fn write(
        &mut self,
        layer: usize,
        slot: usize,
        start: usize,
        k: BurnTensor<3>,
        v: BurnTensor<3>,
    ) {
        let n = k.dims()[1];
        let range = [
            slot..slot + 1,
            0..self.kv_heads,
            start..start + n,
            0..self.head_dim,
        ];
        for (store, value) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            if let Some(t) = store.take() {
                *store = Some(t.slice_assign(range.clone(), value.unsqueeze_dim(0)));
            }
        }
    }

    /// Keys and values of `slots` up to `length` positions: `[rows, kv_heads, length,
    /// head_dim]` each. Consecutive slots from 0 are a view; others are gathered.
    fn read(
        &self,
        layer: usize,
        slots: &[usize],
        length: usize,
        device: &Device,
    ) -> Option<[BurnTensor<4>; 2]> {
        let contiguous = slots.iter().enumerate().all(|(i, s)| i == *s);
        let pick = |t: &Option<BurnTensor<4>>| -> Option<BurnTensor<4>> {
            let t = t.as_ref()?.clone().narrow(2, 0, length);
            Some(if contiguous {
                t.narrow(0, 0, slots.len())
            } else {
                let idx: Vec<i64> = slots.iter().map(|s| *s as i64).collect();
                let idx =
                    BurnTensor::<1, Int>::from_data(TensorData::new(idx, [slots.len()]), device);
                t.select(0, idx)
            })
        };
        Some([pick(&self.keys[layer])?, pick(&self.values[layer])?])
    }
}

struct LoadedLlama {
    spec: LlamaSpec,
    interface: Interface,
    codec: TextCodec,
    device: Device,
    embed: BurnTensor<2>,
    layers: Vec<Layer>,
    norm: BurnTensor<1>,
    head: BurnTensor<2>,
    cos: BurnTensor<2>,
    sin: BurnTensor<2>,
    cache: KvCache,
}

/// Rows a linear layer computes one at a time below this many (see [`linear`]).
const ROW_BY_ROW: usize = 4;
/// Above that, rows are padded to a multiple of this (see [`linear`]).
const ROW_BLOCK: usize = 8;
/// From this many rows (a prompt's prefill) the product runs as `x · Wᵀ` (see [`linear`]).
const MANY_ROWS: usize = 24;

/// `x · Wᵀ` for token states `x` `[n, in]` and a weight `w` `[out, in]` (the checkpoint's
/// layout), computed as `(W · xᵀ)ᵀ`. Why this shape, measured on this project's 2-core
/// machine (Burn's CPU backend, the `gemm` crate; a 576 × 1536 weight): one row takes a
/// matrix-vector path, 77 µs (104 µs as `x · W` with `W` stored `[in, out]`); several rows
/// take the blocked kernel, whose cost hardly depends on the rows up to 8 (225 µs for 8,
/// 277 for 4, 320 for 2) — so 2 and 3 rows go one at a time, and 4 or more are padded to
/// a multiple of 8 (451 µs for 16, against 660 as `x · W`). A decode step of SmolLM2 at 2
/// rows went from 77 to ~50 ms this way. From 24 rows (prefills) `x · Wᵀ` over the
/// transposed view is as fast or faster (740 against 1,065 µs at 32 rows).
fn linear(x: BurnTensor<2>, w: &BurnTensor<2>) -> BurnTensor<2> {
    let [n, width] = x.dims();
    if n >= MANY_ROWS {
        return x.matmul(w.clone().transpose());
    }
    if n == 1 {
        return w.clone().matmul(x.transpose()).transpose();
    }
    if n < ROW_BY_ROW {
        let rows = (0..n)
            .map(|r| linear(x.clone().narrow(0, r, 1), w))
            .collect();
        return BurnTensor::cat(rows, 0);
    }
    let padded_rows = n.div_ceil(ROW_BLOCK) * ROW_BLOCK;
    let x = if padded_rows == n {
        x
    } else {
        let padding = BurnTensor::<2>::zeros([padded_rows - n, width], &x.device());
        BurnTensor::cat(vec![x, padding], 0)
    };
    let out = w.clone().matmul(x.transpose()).transpose();
    if padded_rows == n {
        out
    } else {
        out.narrow(0, 0, n)
    }
}

/// A very negative score: masked keys get no attention (a finite number, so a row's
/// softmax never sees only infinities).
const MASKED: f32 = -1e30;

impl LoadedLlama {
    fn rms_norm(&self, x: BurnTensor<2>, weight: &BurnTensor<1>) -> BurnTensor<2> {
        let mean_square = x.clone().powi_scalar(2).mean_dim(1);
        let scale = (mean_square + self.spec.rms_norm_eps).sqrt().recip();
        x * scale * weight.clone().unsqueeze_dim::<2>(0)
    }

    /// Rotate `[tokens, heads, head_dim]` by each token's position (`cos`/`sin`:
    /// `[tokens, head_dim]`).
    fn rotate(x: BurnTensor<3>, cos: &BurnTensor<3>, sin: &BurnTensor<3>) -> BurnTensor<3> {
        let hd = x.dims()[2];
        let half = hd / 2;
        let first = x.clone().narrow(2, 0, half);
        let second = x.clone().narrow(2, half, half);
        let rotated = BurnTensor::cat(vec![second.neg(), first], 2);
        x * cos.clone() + rotated * sin.clone()
    }

    /// `cos` and `sin` rows of `positions`, `[tokens, 1, head_dim]`.
    fn tables(&self, positions: &[usize]) -> [BurnTensor<3>; 2] {
        let n = positions.len();
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        [&self.cos, &self.sin].map(|t| {
            let rows = if contiguous && n > 0 {
                t.clone().narrow(0, positions[0], n)
            } else {
                let idx: Vec<i64> = positions.iter().map(|p| *p as i64).collect();
                let idx = BurnTensor::<1, Int>::from_data(TensorData::new(idx, [n]), &self.device);
                t.clone().select(0, idx)
            };
            rows.unsqueeze_dim::<3>(1)
        })
    }

    fn ids(&self, tokens: &[u32]) -> BurnTensor<2, Int> {
        let ids: Vec<i64> = tokens.iter().map(|t| i64::from(*t)).collect();
        BurnTensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &self.device)
    }

    /// The feed-forward half of a layer, residual included.
    fn mlp(&self, layer: &Layer, x: BurnTensor<2>) -> BurnTensor<2> {
        let h = self.rms_norm(x.clone(), &layer.mlp_norm);
        let inner = silu(linear(h.clone(), &layer.gate)) * linear(h, &layer.up);
        x + linear(inner, &layer.down)
    }

    /// The logits of the last row of `x`, `[rows, vocab]` read back as one row each.
    fn logits(&self, x: BurnTensor<2>) -> Result<Vec<Vec<f32>>> {
        let rows = x.dims()[0];
        let x = self.rms_norm(x, &self.norm);
        let logits = linear(x, &self.head);
        let vocab = self.spec.vocab_size as usize;
        let values = logits
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Device(format!("reading logits: {e:?}")))?;
        Ok((0..rows)
            .map(|r| values[r * vocab..(r + 1) * vocab].to_vec())
            .collect())
    }
}

impl Decoder for LoadedLlama {
    fn codec(&self) -> &TextCodec {
        &self.codec
    }

    fn context(&self) -> u32 {
        self.spec.max_position_embeddings
    }

    fn slots(&self) -> usize {
        self.cache.slots
    }

    fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        let p = tokens.len();
        if p == 0 || p > self.cache.context || slot >= self.cache.slots {
            return Err(Error::Invalid(format!(
                "a prefill of {p} tokens into slot {slot} does not fit"
            )));
        }
        let device = self.device.clone();
        self.cache.reserve(p, &device);
        let h = self.spec.hidden_size as usize;
        let heads = self.spec.num_attention_heads as usize;
        let kvh = self.spec.num_key_value_heads as usize;
        let hd = self.spec.head_dim() as usize;
        let group = heads / kvh;
        let positions: Vec<usize> = (0..p).collect();
        let [cos, sin] = self.tables(&positions);
        // Query row `g · p + i` is head group member g at position i: it sees keys 0..=i.
        let mut mask = vec![0f32; group * p * p];
        for g in 0..group {
            for i in 0..p {
                for j in i + 1..p {
                    mask[(g * p + i) * p + j] = MASKED;
                }
            }
        }
        let mask = BurnTensor::<3>::from_data(TensorData::new(mask, [1, group * p, p]), &device);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x: BurnTensor<2> = embedding(self.embed.clone(), self.ids(tokens)).reshape([p, h]);
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            let a = self.rms_norm(x.clone(), &layer.attn_norm);
            let q = Self::rotate(
                linear(a.clone(), &layer.q).reshape([p, heads, hd]),
                &cos,
                &sin,
            );
            let k = Self::rotate(
                linear(a.clone(), &layer.k).reshape([p, kvh, hd]),
                &cos,
                &sin,
            );
            let v = linear(a, &layer.v).reshape([p, kvh, hd]);
            // [heads, p, hd] → [kv_heads, group · p, hd]: a head group shares its keys.
            let q = q.swap_dims(0, 1).reshape([kvh, group * p, hd]);
            let k = k.swap_dims(0, 1);
            let v = v.swap_dims(0, 1);
            let scores = q.matmul(k.clone().swap_dims(1, 2)) * scale + mask.clone();
            let context = softmax(scores, 2)
                .matmul(v.clone())
                .reshape([heads, p, hd])
                .swap_dims(0, 1)
                .reshape([p, h]);
            x = x + linear(context, &layer.o);
            x = self.mlp(layer, x);
            self.cache.write(l, slot, 0, k, v);
        }
        let last = x.narrow(0, p - 1, 1);
        Ok(self.logits(last)?.remove(0))
    }

    fn decode(&mut self, rows: &[DecodeRow]) -> Result<Vec<Vec<f32>>> {
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let length = rows.iter().map(|r| r.position + 1).max().unwrap_or(1);
        if length > self.cache.context || rows.iter().any(|r| r.slot >= self.cache.slots) {
            return Err(Error::Invalid(
                "a decode step past the context or the slots".into(),
            ));
        }
        let device = self.device.clone();
        self.cache.reserve(length, &device);
        let h = self.spec.hidden_size as usize;
        let heads = self.spec.num_attention_heads as usize;
        let kvh = self.spec.num_key_value_heads as usize;
        let hd = self.spec.head_dim() as usize;
        let group = heads / kvh;
        let positions: Vec<usize> = rows.iter().map(|r| r.position).collect();
        let slots: Vec<usize> = rows.iter().map(|r| r.slot).collect();
        let [cos, sin] = self.tables(&positions);
        // Row r sees keys 0..=position_r of its own slot.
        let mut mask = vec![0f32; n * length];
        for (r, row) in rows.iter().enumerate() {
            mask[r * length + row.position + 1..(r + 1) * length].fill(MASKED);
        }
        let mask = BurnTensor::<4>::from_data(TensorData::new(mask, [n, 1, 1, length]), &device);
        let scale = 1.0 / (hd as f64).sqrt();
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let mut x: BurnTensor<2> = embedding(self.embed.clone(), self.ids(&tokens)).reshape([n, h]);
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            let a = self.rms_norm(x.clone(), &layer.attn_norm);
            let q = Self::rotate(
                linear(a.clone(), &layer.q).reshape([n, heads, hd]),
                &cos,
                &sin,
            );
            let k = Self::rotate(
                linear(a.clone(), &layer.k).reshape([n, kvh, hd]),
                &cos,
                &sin,
            );
            let v = linear(a, &layer.v).reshape([n, kvh, hd]);
            for (r, row) in rows.iter().enumerate() {
                let kr = k.clone().narrow(0, r, 1).swap_dims(0, 1);
                let vr = v.clone().narrow(0, r, 1).swap_dims(0, 1);
                self.cache.write(l, row.slot, row.position, kr, vr);
            }
            drop((k, v));
            let [keys, values] = self
                .cache
                .read(l, &slots, length, &device)
                .ok_or_else(|| Error::Device("the key/value cache is not allocated".into()))?;
            let layer = &self.layers[l];
            let q = q.reshape([n, kvh, group, hd]);
            let scores = q.matmul(keys.swap_dims(2, 3)) * scale + mask.clone();
            let context = softmax(scores, 3).matmul(values).reshape([n, h]);
            x = x + linear(context, &layer.o);
            x = self.mlp(layer, x);
        }
        self.logits(x)
    }
}

impl Loaded for LoadedLlama {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&self, _: Vec<Tensor>, _: usize) -> Result<Ran> {
        Err(Error::Invalid(
            "a decoder answers through the generation engine, not batches".into(),
        ))
    }

    fn decoder(&mut self) -> Option<&mut dyn Decoder> {
        Some(self)
    }
}
