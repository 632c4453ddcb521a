//! The BERT encoder family: sentence embeddings from a Hugging Face `BertModel` checkpoint,
//! or logits and labels from a `BertForSequenceClassification` one (`kiln_core::hf`).
//! Texts arrive as BYTES rows, which the worker tokenises with the model's own
//! `tokenizer.json` (the `tokenizers` crate: truncation at `max_seq_length`, no fixed
//! padding), or as token ids the client made. A batch runs in passes of rows of similar
//! length (see [`passes`]), each padded to its longest row; the encoder's states are pooled
//! (mean over real tokens, or `[CLS]`) and scaled to unit length when the model says so,
//! or go through the classifier's pooler and head.
//!
//! The encoder is written with Burn's tensor ops rather than `burn::nn`'s
//! `TransformerEncoder`: Hugging Face's BERT is post-norm with biases everywhere and its
//! own weight names, and attention here goes through Burn's fused attention op with a
//! padding mask.

use std::collections::HashMap;

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::module::{attention, embedding};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor as BurnTensor, TensorData};
use kiln_core::family::{IDS_INPUT, MASK_INPUT, TEXT_INPUT, TYPES_INPUT, token_rows};
use kiln_core::hf::{TOKENIZER, bert_tensors, checkpoint_name, tensor_prefix};
use kiln_core::spec::{BertSpec, ModelSpec, Pooling};
use kiln_core::tensor::{Interface, Tensor};
use safetensors::SafeTensors;
use tokenizers::{Tokenizer, TruncationParams};

use super::{Artifacts, Family, HostTensor, Loaded, Prepared, Ran, f32_tensor};
use crate::{Error, Result};

/// The encoder family's device code.
pub struct BertFamily;

impl Family for BertFamily {
    fn prepare(
        &self,
        spec: &ModelSpec,
        interface: Interface,
        artifacts: Artifacts,
    ) -> Result<Box<dyn Prepared>> {
        let ModelSpec::Bert(spec) = spec else {
            return Err(Error::Invalid("not a BERT spec".into()));
        };
        let tokenizer = tokenizer(spec, &artifacts)?;
        let weights = read_weights(spec, &artifacts.weights)?;
        Ok(Box::new(PreparedBert {
            spec: spec.clone(),
            interface,
            tokenizer,
            weights,
        }))
    }
}

/// The model's tokenizer, truncating at `max_seq_length` and padding nothing.
fn tokenizer(spec: &BertSpec, artifacts: &Artifacts) -> Result<Tokenizer> {
    let bytes = artifacts
        .files
        .get(TOKENIZER)
        .ok_or_else(|| Error::Invalid(format!("the version has no {TOKENIZER}")))?;
    let mut tokenizer = Tokenizer::from_bytes(bytes)
        .map_err(|e| Error::Invalid(format!("{TOKENIZER} cannot be read: {e}")))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: spec.max_seq_length as usize,
            ..Default::default()
        }))
        .map_err(|e| Error::Invalid(format!("{TOKENIZER}: truncation: {e}")))?;
    Ok(tokenizer)
}

/// Every tensor of the encoder, read off the safetensors file, by its Hugging Face name
/// (without the `bert.` prefix of task checkpoints).
fn read_weights(spec: &BertSpec, bytes: &[u8]) -> Result<HashMap<String, HostTensor>> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Invalid(format!("model.safetensors: {e}")))?;
    let names = file.names();
    let names: Vec<&str> = names.iter().map(|s| &s[..]).collect();
    let prefix = tensor_prefix(&names);
    let mut out = HashMap::new();
    for (name, shape) in bert_tensors(spec) {
        let full = checkpoint_name(prefix, &name);
        let HostTensor { values, .. } = f32_tensor(&file, &full, &shape)?;
        // Linear weights are [out, in] in the checkpoint; Burn's Linear takes [in, out].
        let tensor = if name.ends_with("dense.weight")
            || name == "classifier.weight"
            || name.ends_with("query.weight")
            || name.ends_with("key.weight")
            || name.ends_with("value.weight")
        {
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0.0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = values[r * cols + c];
                }
            }
            HostTensor {
                values: t,
                shape: vec![cols, rows],
            }
        } else {
            HostTensor { values, shape }
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

struct PreparedBert {
    spec: BertSpec,
    interface: Interface,
    tokenizer: Tokenizer,
    weights: HashMap<String, HostTensor>,
}

impl PreparedBert {
    fn take(&mut self, name: &str) -> Result<HostTensor> {
        self.weights
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("model.safetensors: tensor {name} is missing")))
    }

    fn tensor<const D: usize>(&mut self, name: &str, device: &Device) -> Result<BurnTensor<D>> {
        let t = self.take(name)?;
        Ok(BurnTensor::from_data(
            TensorData::new(t.values, t.shape),
            device,
        ))
    }

    fn linear(&mut self, prefix: &str, device: &Device) -> Result<Linear> {
        Ok(Linear {
            weight: Param::from_tensor(self.tensor::<2>(&format!("{prefix}.weight"), device)?),
            bias: Some(Param::from_tensor(
                self.tensor::<1>(&format!("{prefix}.bias"), device)?,
            )),
        })
    }

    fn layer_norm(&mut self, prefix: &str, device: &Device) -> Result<LayerNorm> {
        let mut norm = LayerNormConfig::new(self.spec.hidden_size as usize)
            .with_epsilon(self.spec.layer_norm_eps)
            .init(device);
        norm.gamma = Param::from_tensor(self.tensor::<1>(&format!("{prefix}.weight"), device)?);
        norm.beta = Some(Param::from_tensor(
            self.tensor::<1>(&format!("{prefix}.bias"), device)?,
        ));
        Ok(norm)
    }
}

impl Prepared for PreparedBert {
    fn build(mut self: Box<Self>, device: &Device) -> Result<Box<dyn Loaded>> {
        let word = self.tensor::<2>("embeddings.word_embeddings.weight", device)?;
        let position = self.tensor::<2>("embeddings.position_embeddings.weight", device)?;
        let token_type = self.tensor::<2>("embeddings.token_type_embeddings.weight", device)?;
        let embedding_norm = self.layer_norm("embeddings.LayerNorm", device)?;
        let mut layers = Vec::new();
        for l in 0..self.spec.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                query: self.linear(&format!("{p}.attention.self.query"), device)?,
                key: self.linear(&format!("{p}.attention.self.key"), device)?,
                value: self.linear(&format!("{p}.attention.self.value"), device)?,
                attention_out: self.linear(&format!("{p}.attention.output.dense"), device)?,
                attention_norm: self
                    .layer_norm(&format!("{p}.attention.output.LayerNorm"), device)?,
                intermediate: self.linear(&format!("{p}.intermediate.dense"), device)?,
                output: self.linear(&format!("{p}.output.dense"), device)?,
                output_norm: self.layer_norm(&format!("{p}.output.LayerNorm"), device)?,
            });
        }
        let head = if self.spec.is_classifier() {
            Some(Head {
                pooler: self.linear("pooler.dense", device)?,
                classifier: self.linear("classifier", device)?,
            })
        } else {
            None
        };
        let this = *self;
        Ok(Box::new(LoadedBert {
            spec: this.spec,
            interface: this.interface,
            tokenizer: this.tokenizer,
            device: device.clone(),
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            head,
        }))
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A sequence classifier's head: `tanh(pooler([CLS]))`, then the class scores.
struct Head {
    pooler: Linear,
    classifier: Linear,
}

struct LoadedBert {
    spec: BertSpec,
    interface: Interface,
    tokenizer: Tokenizer,
    device: Device,
    word: BurnTensor<2>,
    position: BurnTensor<2>,
    token_type: BurnTensor<2>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    head: Option<Head>,
}

/// Most padded tokens (rows × longest row) in one forward pass: the attention scores of a
/// pass hold `heads × tokens × longest` values, so this bounds its memory as well.
const TOKEN_BUDGET: usize = 8_192;

/// The rows of a batch in forward passes: sorted by length, a pass closes before a row
/// that would take it past [`TOKEN_BUDGET`] padded tokens or make more than a third of
/// its tokens padding. So one long text does not make every short one in its batch pay
/// for its length. Each pass lists row indices, shortest first. A row of no tokens (a
/// tokenizer that adds no special tokens, given an empty text) gets no pass: attention
/// over no keys is undefined, and its answer stays zeros.
pub(crate) fn passes(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|r| lengths[*r] > 0).collect();
    order.sort_by_key(|r| lengths[*r]);
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut real = 0;
    for r in order {
        let len = lengths[r];
        let padded = (current.len() + 1) * len;
        if !current.is_empty() && (padded > TOKEN_BUDGET || 2 * padded > 3 * (real + len)) {
            out.push(std::mem::take(&mut current));
            real = 0;
        }
        current.push(r);
        real += len;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One row ready for the encoder: its token ids and their segments.
struct Row {
    ids: Vec<u32>,
    types: Vec<u32>,
    /// Whether the text was cut at `max_seq_length`.
    truncated: bool,
}

impl LoadedBert {
    /// The batch's rows: texts through the tokenizer, or the client's token ids.
    fn rows(&self, inputs: &[Tensor], rows: usize) -> Result<Vec<Row>> {
        let find = |name: &str| inputs.iter().find(|t| t.name == name);
        let out = if let Some(text) = find(TEXT_INPUT) {
            let items = text.byte_strings()?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let text = std::str::from_utf8(item).map_err(|_| {
                    Error::Invalid(format!(
                        "input {TEXT_INPUT:?}: element {i} is not valid UTF-8"
                    ))
                })?;
                let e = self.tokenizer.encode(text, true).map_err(|e| {
                    Error::Invalid(format!("input {TEXT_INPUT:?}: element {i}: {e}"))
                })?;
                out.push(Row {
                    ids: e.get_ids().to_vec(),
                    types: e.get_type_ids().to_vec(),
                    truncated: !e.get_overflowing().is_empty(),
                });
            }
            out
        } else {
            let ids = find(IDS_INPUT).ok_or_else(|| {
                Error::Invalid(format!("input {TEXT_INPUT:?} or {IDS_INPUT:?} is needed"))
            })?;
            token_rows(&self.spec, ids, find(MASK_INPUT), find(TYPES_INPUT))?
                .into_iter()
                .map(|r| Row {
                    ids: r.ids,
                    types: r.types,
                    truncated: false,
                })
                .collect()
        };
        if out.len() != rows {
            return Err(Error::Invalid(format!(
                "the batch holds {} rows, not {rows}",
                out.len()
            )));
        }
        let (vocab, types) = (self.spec.vocab_size, self.spec.type_vocab_size);
        for row in &out {
            if let Some(bad) = row.ids.iter().find(|id| **id >= vocab) {
                return Err(Error::Invalid(format!(
                    "the tokenizer made id {bad}, outside the vocabulary of {vocab}"
                )));
            }
            if let Some(bad) = row.types.iter().find(|t| **t >= types) {
                return Err(Error::Invalid(format!(
                    "the tokenizer made token type {bad}; the model has {types}"
                )));
            }
        }
        Ok(out)
    }

    /// One forward pass over `rows` (one of [`passes`]): the pooled vector of each row,
    /// `[rows, hidden]`, or a classifier's logits, `[rows, classes]`.
    fn encode(&self, rows: &[&Row]) -> BurnTensor<2> {
        let device = &self.device;
        let n = rows.len();
        let s = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(1);
        let h = self.spec.hidden_size as usize;
        let heads = self.spec.num_attention_heads as usize;
        let mut ids = vec![0i64; n * s];
        let mut types = vec![0i64; n * s];
        let mut mask = vec![0f32; n * s];
        for (r, row) in rows.iter().enumerate() {
            for (c, (id, t)) in row.ids.iter().zip(&row.types).enumerate() {
                ids[r * s + c] = i64::from(*id);
                types[r * s + c] = i64::from(*t);
                mask[r * s + c] = 1.0;
            }
        }
        let ids = BurnTensor::<2, Int>::from_data(TensorData::new(ids, [n, s]), device);
        let types = BurnTensor::<2, Int>::from_data(TensorData::new(types, [n, s]), device);
        let mask = BurnTensor::<2>::from_data(TensorData::new(mask, [n, s]), device);
        let positions = self.position.clone().narrow(0, 0, s).unsqueeze_dim::<3>(0);
        let x = embedding(self.word.clone(), ids)
            + positions
            + embedding(self.token_type.clone(), types);
        // Token states as [rows · s, h]: every dense layer is one 2-D matrix product; only
        // attention sees the [rows, heads, s, d] view.
        let mut x: BurnTensor<2> = self.embedding_norm.forward(x).reshape([n * s, h]);
        // Keys that are padding take no attention: `true` masks.
        let padding: BurnTensor<4, Bool> = mask
            .clone()
            .equal_elem(0.0)
            .reshape([n, 1, 1, s])
            .expand([n, heads, s, s]);
        let split = |t: BurnTensor<2>| t.reshape([n, s, heads, h / heads]).swap_dims(1, 2);
        for layer in &self.layers {
            let q = split(layer.query.forward(x.clone()));
            let k = split(layer.key.forward(x.clone()));
            let v = split(layer.value.forward(x.clone()));
            let context = attention(
                q,
                k,
                v,
                Some(padding.clone()),
                None,
                AttentionModuleOptions::default(),
            )
            .swap_dims(1, 2)
            .reshape([n * s, h]);
            x = layer
                .attention_norm
                .forward(layer.attention_out.forward(context) + x);
            let inner = gelu(layer.intermediate.forward(x.clone()));
            x = layer.output_norm.forward(layer.output.forward(inner) + x);
        }
        let states = x.reshape([n, s, h]);
        if let Some(head) = &self.head {
            let cls = states.slice([0..n, 0..1]).reshape([n, h]);
            let pooled = head.pooler.forward(cls).tanh();
            return head.classifier.forward(pooled);
        }
        let mut pooled: BurnTensor<2> = match self.spec.pooling {
            Pooling::Mean => {
                let weights = mask.clone().unsqueeze_dim::<3>(2);
                let summed = (states * weights).sum_dim(1).reshape([n, h]);
                let counts = mask.sum_dim(1).clamp_min(1.0);
                summed / counts
            }
            Pooling::Cls => states.slice([0..n, 0..1]).reshape([n, h]),
        };
        if self.spec.normalize {
            let norm = pooled
                .clone()
                .powi_scalar(2)
                .sum_dim(1)
                .sqrt()
                .clamp_min(1e-12);
            pooled = pooled / norm;
        }
        pooled
    }

    /// The answer's tensors from each row's vector (`width` values per row).
    fn outputs(&self, values: &[f32], rows: usize, width: usize) -> Result<Vec<Tensor>> {
        let name = |i: usize, default: &'static str| {
            self.interface
                .outputs
                .get(i)
                .map_or(default, |o| o.name.as_str())
        };
        if !self.spec.is_classifier() {
            return Ok(vec![Tensor::from_f32(
                name(0, "embedding"),
                vec![rows, width],
                values,
            )?]);
        }
        let labels: Vec<&str> = values
            .chunks(width)
            .map(|scores| {
                let best = scores
                    .iter()
                    .enumerate()
                    .fold(0, |best, (i, v)| if *v > scores[best] { i } else { best });
                self.spec.labels[best].as_str()
            })
            .collect();
        Ok(vec![
            Tensor::from_f32(name(0, "logits"), vec![rows, width], values)?,
            Tensor::from_byte_strings(name(1, "label"), vec![rows], &labels)?,
        ])
    }
}

impl Loaded for LoadedBert {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&self, inputs: Vec<Tensor>, rows: usize) -> Result<Ran> {
        if rows == 0 {
            return Err(Error::Invalid("a batch needs at least 1 row".into()));
        }
        let batch = self.rows(&inputs, rows)?;
        let width = if self.spec.is_classifier() {
            self.spec.labels.len()
        } else {
            self.spec.hidden_size as usize
        };
        let lengths: Vec<usize> = batch.iter().map(|r| r.ids.len()).collect();
        // Rows that get no pass (no tokens) answer zeros.
        let mut values = vec![0f32; rows * width];
        for pass in passes(&lengths) {
            let members: Vec<&Row> = pass.iter().map(|r| &batch[*r]).collect();
            let out = self
                .encode(&members)
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| Error::Device(format!("{e:?}")))?;
            for (vector, r) in out.chunks(width).zip(&pass) {
                values[r * width..(r + 1) * width].copy_from_slice(vector);
            }
        }
        let truncated = (0..rows).filter(|r| batch[*r].truncated).collect();
        Ok(Ran {
            outputs: self.outputs(&values, rows, width)?,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(passes: &[Vec<usize>]) -> Vec<usize> {
        let mut all: Vec<usize> = passes.concat();
        all.sort_unstable();
        all
    }

    #[test]
    fn one_long_text_rides_alone_and_short_ones_share_a_pass() {
        let mut lengths = vec![12; 31];
        lengths.insert(5, 256);
        let p = passes(&lengths);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].len(), 31);
        assert_eq!(p[1], vec![5]);
        assert_eq!(flat(&p), (0..32).collect::<Vec<_>>());
    }

    #[test]
    fn similar_lengths_share_a_pass_within_the_token_budget() {
        let similar = vec![10, 11, 12, 10, 12, 11];
        assert_eq!(passes(&similar).len(), 1);
        // 64 rows of 256 tokens pad to 16,384: two passes of 32.
        let long = vec![256; 64];
        let p = passes(&long);
        assert!(p.iter().all(|p| p.len() * 256 <= TOKEN_BUDGET), "{p:?}");
        assert_eq!(flat(&p), (0..64).collect::<Vec<_>>());
        // A row longer than the budget still gets a pass of its own.
        assert_eq!(passes(&[10_000, 3]), vec![vec![1], vec![0]]);
        assert!(passes(&[]).is_empty());
        assert_eq!(passes(&[0, 3, 0]), vec![vec![1]]);
    }
}
