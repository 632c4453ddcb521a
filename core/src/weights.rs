//! The weight format of an MLP version: a safetensors file with `layers.<i>.weight`
//! (`[in, out]`, FP32) and `layers.<i>.bias` (`[out]`, FP32) for every dense layer, and
//! the spec as JSON in the metadata under `kiln.spec`. Pure Rust, so the gateway can
//! validate imports and the worker can load them without sharing a device.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::spec::ModelSpec;
use crate::{Error, Result};

/// One dense layer: `y = x · weight + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Inputs.
    pub inputs: usize,
    /// Outputs.
    pub outputs: usize,
    /// Row-major `[inputs, outputs]`.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
}

/// Every layer's weights, input side first.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpWeights {
    /// The layers.
    pub layers: Vec<LayerWeights>,
}

/// A small, fast, seedable generator (SplitMix64); the same seed gives the same weights
/// (and the same shuffles) on every machine and device, which Burn's device-side RNG does
/// not promise.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Shuffle a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // Multiply-shift keeps this unbiased enough for shuffling and free of division.
            let j = (((self.next_u64() >> 32) * (i as u64 + 1)) >> 32) as usize;
            items.swap(i, j);
        }
    }

    /// Uniform in [-1, 1).
    fn next_signed_unit(&mut self) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }
}

impl MlpWeights {
    /// Glorot-uniform weights and zero biases, from a seed.
    pub fn seeded(spec: &ModelSpec, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let layers = spec
            .layer_shapes()
            .into_iter()
            .map(|(inputs, outputs)| {
                let limit = (6.0 / (inputs + outputs) as f32).sqrt();
                LayerWeights {
                    inputs,
                    outputs,
                    weight: (0..inputs * outputs)
                        .map(|_| rng.next_signed_unit() * limit)
                        .collect(),
                    bias: vec![0.0; outputs],
                }
            })
            .collect();
        Self { layers }
    }

    /// Encode as safetensors, with the spec in the metadata.
    pub fn to_safetensors(&self, spec: &ModelSpec) -> Result<Vec<u8>> {
        let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            raw.push((
                format!("layers.{i}.weight"),
                vec![layer.inputs, layer.outputs],
                f32_bytes(&layer.weight),
            ));
            raw.push((
                format!("layers.{i}.bias"),
                vec![layer.outputs],
                f32_bytes(&layer.bias),
            ));
        }
        let views = raw
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let spec_json =
            serde_json::to_string(spec).map_err(|e| Error::Invalid(format!("spec: {e}")))?;
        let metadata = HashMap::from([("kiln.spec".to_owned(), spec_json)]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::Invalid(format!("safetensors: {e}")))
    }

    /// Decode and check a safetensors file against `spec`: every tensor present with the
    /// right shape and dtype, nothing extra, every value finite.
    pub fn from_safetensors(spec: &ModelSpec, bytes: &[u8]) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Invalid(format!("weights: not a valid safetensors file: {e}")))?;
        let shapes = spec.layer_shapes();
        if file.len() != shapes.len() * 2 {
            return Err(Error::Invalid(format!(
                "weights: expected {} tensors (layers.<i>.weight and layers.<i>.bias for {} layers), found {}: {:?}",
                shapes.len() * 2,
                shapes.len(),
                file.len(),
                file.names()
            )));
        }
        let mut layers = Vec::with_capacity(shapes.len());
        for (i, (inputs, outputs)) in shapes.into_iter().enumerate() {
            let weight = read_f32(&file, &format!("layers.{i}.weight"), &[inputs, outputs])?;
            let bias = read_f32(&file, &format!("layers.{i}.bias"), &[outputs])?;
            layers.push(LayerWeights {
                inputs,
                outputs,
                weight,
                bias,
            });
        }
        Ok(Self { layers })
    }
}

fn read_f32(file: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let view = file
        .tensor(name)
        .map_err(|_| Error::Invalid(format!("weights: tensor {name} is missing")))?;
    if view.dtype() != Dtype::F32 {
        return Err(Error::Invalid(format!(
            "weights: tensor {name} is {:?}; F32 is required",
            view.dtype()
        )));
    }
    if view.shape() != shape {
        return Err(Error::Invalid(format!(
            "weights: tensor {name} has shape {:?}; the spec needs {shape:?}",
            view.shape()
        )));
    }
    let values: Vec<f32> = f32_from_le(view.data()).collect();
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "weights: tensor {name} holds a non-finite value at element {pos}"
        )));
    }
    Ok(values)
}

/// FP32 values from little-endian bytes (a trailing partial value is ignored).
pub fn f32_from_le(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Little-endian bytes of FP32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Activation, MlpSpec, Task};

    fn spec() -> ModelSpec {
        ModelSpec::Mlp(MlpSpec {
            input_width: 3,
            hidden: vec![5],
            activation: Activation::Relu,
            output_width: 2,
            task: Task::Regression,
        })
    }

    #[test]
    fn safetensors_round_trip_is_bit_exact() {
        let mut weights = MlpWeights::seeded(&spec(), 7);
        // Values whose bits a lossy path would change.
        weights.layers[0].weight[0] = f32::MIN_POSITIVE;
        weights.layers[0].weight[1] = -0.0;
        weights.layers[1].bias[1] = 1.0e-38 * 3.0;
        let bytes = weights.to_safetensors(&spec()).unwrap();
        let back = MlpWeights::from_safetensors(&spec(), &bytes).unwrap();
        for (a, b) in weights.layers.iter().zip(&back.layers) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.weight), bits(&b.weight));
            assert_eq!(bits(&a.bias), bits(&b.bias));
        }
    }

    #[test]
    fn seeded_weights_are_reproducible_and_bounded() {
        let a = MlpWeights::seeded(&spec(), 42);
        assert_eq!(a, MlpWeights::seeded(&spec(), 42));
        assert_ne!(a, MlpWeights::seeded(&spec(), 43));
        let limit = (6.0f32 / 8.0).sqrt();
        assert!(a.layers[0].weight.iter().all(|w| w.abs() <= limit));
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let shuffled = |seed| {
            let mut v: Vec<u32> = (0..100).collect();
            SplitMix64::new(seed).shuffle(&mut v);
            v
        };
        let a = shuffled(9);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..100).collect::<Vec<_>>(),
            "nothing lost or repeated"
        );
        assert_ne!(a, sorted, "the order changed");
        assert_eq!(a, shuffled(9));
        assert_ne!(a, shuffled(10));
    }

    #[test]
    fn mismatched_files_are_refused_with_the_tensor_named() {
        let other = ModelSpec::Mlp(MlpSpec {
            input_width: 4,
            hidden: vec![5],
            activation: Activation::Relu,
            output_width: 2,
            task: Task::Regression,
        });
        let bytes = MlpWeights::seeded(&other, 1)
            .to_safetensors(&other)
            .unwrap();
        let err = MlpWeights::from_safetensors(&spec(), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers.0.weight"), "{err}");
        let err = MlpWeights::from_safetensors(&spec(), b"garbage")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
    }
}
