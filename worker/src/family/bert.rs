//! The BERT encoder family: sentence embeddings from a Hugging Face `BertModel` checkpoint
//! (`kiln_core::hf`). Texts arrive as BYTES rows; the worker tokenises them with the
//! model's own `tokenizer.json` (the `tokenizers` crate: truncation at `max_seq_length`, no
//! fixed padding), pads the batch to its longest text, runs the encoder and pools (mean
//! over real tokens, or `[CLS]`), then scales to unit length when the model says so.
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
use kiln_core::hf::{TOKENIZER, bert_tensors, tensor_prefix};
use kiln_core::spec::{BertSpec, ModelSpec, Pooling};
use kiln_core::tensor::{Interface, Tensor};
use safetensors::{Dtype, SafeTensors};
use tokenizers::{Tokenizer, TruncationParams};

use super::{Artifacts, Family, Loaded, Prepared};
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

/// One weight on the host: its values and shape, linear weights already as `[in, out]`.
struct HostTensor {
    values: Vec<f32>,
    shape: Vec<usize>,
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
        let full = format!("{prefix}{name}");
        let view = file
            .tensor(&full)
            .map_err(|_| Error::Invalid(format!("model.safetensors: tensor {full} is missing")))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
            return Err(Error::Invalid(format!(
                "model.safetensors: tensor {full} is {:?} {:?}; expected F32 {shape:?}",
                view.dtype(),
                view.shape()
            )));
        }
        let values: Vec<f32> = kiln_core::weights::f32_from_le(view.data()).collect();
        // Linear weights are [out, in] in the checkpoint; Burn's Linear takes [in, out].
        let tensor = if name.ends_with("dense.weight")
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
        let this = *self;
        Ok(Box::new(LoadedBert {
            spec: this.spec,
            interface: this.interface,
            tokenizer: this.tokenizer,
            device: device.clone(),
            word,
            position,
            // Single-text inputs: every token has type 0.
            token_type: token_type.narrow(0, 0, 1),
            embedding_norm,
            layers,
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

struct LoadedBert {
    spec: BertSpec,
    interface: Interface,
    tokenizer: Tokenizer,
    device: Device,
    word: BurnTensor<2>,
    position: BurnTensor<2>,
    /// The type-0 row, `[1, hidden]`.
    token_type: BurnTensor<2>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// A batch tokenised: ids and the real-token mask, `rows × longest`, padded with 0.
struct Tokens {
    ids: Vec<i64>,
    mask: Vec<f32>,
    longest: usize,
}

impl LoadedBert {
    fn tokenise(&self, texts: &[&str]) -> Result<Tokens> {
        let mut encoded = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let e = self
                .tokenizer
                .encode(*text, true)
                .map_err(|e| Error::Invalid(format!("input \"text\": element {i}: {e}")))?;
            encoded.push(e.get_ids().to_vec());
        }
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; texts.len() * longest];
        let mut mask = vec![0f32; texts.len() * longest];
        for (row, e) in encoded.iter().enumerate() {
            for (col, id) in e.iter().enumerate() {
                ids[row * longest + col] = i64::from(*id);
                mask[row * longest + col] = 1.0;
            }
        }
        Ok(Tokens { ids, mask, longest })
    }

    fn encode(&self, tokens: Tokens, rows: usize) -> Result<Vec<f32>> {
        let device = &self.device;
        let (s, h) = (tokens.longest, self.spec.hidden_size as usize);
        let heads = self.spec.num_attention_heads as usize;
        let vocab = i64::from(self.spec.vocab_size);
        if let Some(bad) = tokens.ids.iter().find(|id| **id >= vocab) {
            return Err(Error::Invalid(format!(
                "the tokenizer made id {bad}, outside the vocabulary of {vocab}"
            )));
        }
        let ids = BurnTensor::<2, Int>::from_data(TensorData::new(tokens.ids, [rows, s]), device);
        let mask = BurnTensor::<2>::from_data(TensorData::new(tokens.mask, [rows, s]), device);
        let positions = self.position.clone().narrow(0, 0, s).unsqueeze_dim::<3>(0);
        let mut x = embedding(self.word.clone(), ids)
            + positions
            + self.token_type.clone().unsqueeze_dim::<3>(0);
        x = self.embedding_norm.forward(x);
        // Keys that are padding take no attention: `true` masks.
        let padding: BurnTensor<4, Bool> = mask
            .clone()
            .equal_elem(0.0)
            .reshape([rows, 1, 1, s])
            .expand([rows, heads, s, s]);
        let split = |t: BurnTensor<3>| t.reshape([rows, s, heads, h / heads]).swap_dims(1, 2);
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
            .reshape([rows, s, h]);
            x = layer
                .attention_norm
                .forward(layer.attention_out.forward(context) + x);
            let inner = gelu(layer.intermediate.forward(x.clone()));
            x = layer.output_norm.forward(layer.output.forward(inner) + x);
        }
        let mut pooled: BurnTensor<2> = match self.spec.pooling {
            Pooling::Mean => {
                let weights = mask.clone().unsqueeze_dim::<3>(2);
                let summed = (x * weights).sum_dim(1).reshape([rows, h]);
                let counts = mask.sum_dim(1).clamp_min(1.0);
                summed / counts
            }
            Pooling::Cls => x.slice([0..rows, 0..1]).reshape([rows, h]),
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
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Device(format!("{e:?}")))
    }
}

impl Loaded for LoadedBert {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&self, inputs: Vec<Tensor>, rows: usize) -> Result<Vec<Tensor>> {
        let [text] = <[Tensor; 1]>::try_from(inputs).map_err(|inputs| {
            Error::Invalid(format!("the encoder takes 1 input, got {}", inputs.len()))
        })?;
        let items = text.byte_strings()?;
        if items.len() != rows || rows == 0 {
            return Err(Error::Invalid(format!(
                "input \"text\": {} texts for {rows} rows",
                items.len()
            )));
        }
        let texts = items
            .iter()
            .enumerate()
            .map(|(i, b)| {
                std::str::from_utf8(b).map_err(|_| {
                    Error::Invalid(format!("input \"text\": element {i} is not valid UTF-8"))
                })
            })
            .collect::<Result<Vec<&str>>>()?;
        let tokens = self.tokenise(&texts)?;
        let values = self.encode(tokens, rows)?;
        let name = self
            .interface
            .outputs
            .first()
            .map_or("embedding", |o| o.name.as_str());
        Ok(vec![Tensor::from_f32(
            name,
            vec![rows, self.spec.hidden_size as usize],
            &values,
        )?])
    }
}
