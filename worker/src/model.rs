//! The MLP family as a Burn module, built from a spec and a set of weights.

use burn::module::{Module, Param, ParamId};

/// Base of the parameter ids ("KILN" in the high bytes); see [`Mlp::from_weights`].
const PARAM_ID_BASE: u64 = 0x4b49_4c4e_0000_0000;
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::activation;
use burn::tensor::{Device, Tensor, TensorData};
use kiln_core::MlpWeights;
use kiln_core::spec::{Activation, MlpSpec, Task};
use kiln_core::weights::LayerWeights;

/// A multilayer perceptron: dense layers with an activation between them and a head that
/// fits the task (sigmoid, softmax or identity).
#[derive(Module, Debug)]
pub struct Mlp {
    /// Dense layers, input side first.
    layers: Vec<Linear>,
    /// Activation between hidden layers.
    #[module(skip)]
    activation: Activation,
    /// What the outputs mean; picks the head.
    #[module(skip)]
    task: Task,
}

impl Mlp {
    /// Build the module on `device` from checked weights (see [`MlpWeights::from_safetensors`]).
    ///
    /// Parameter ids are fixed by position (layer `i`: weight `2i`, bias `2i + 1`, above a
    /// constant base), so an optimizer state recorded for one build of a model applies to
    /// another — what resuming a training run from its checkpoint on another worker needs.
    pub fn from_weights(mlp: &MlpSpec, weights: &MlpWeights, device: &Device) -> Self {
        let layers = weights
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let mut weight = Param::from_tensor(Tensor::<2>::from_data(
                    TensorData::new(layer.weight.clone(), [layer.inputs, layer.outputs]),
                    device,
                ));
                weight.id = ParamId::from(PARAM_ID_BASE + 2 * i as u64);
                let mut bias = Param::from_tensor(Tensor::<1>::from_data(
                    TensorData::new(layer.bias.clone(), [layer.outputs]),
                    device,
                ));
                bias.id = ParamId::from(PARAM_ID_BASE + 2 * i as u64 + 1);
                Linear {
                    weight,
                    bias: Some(bias),
                }
            })
            .collect();
        Self {
            layers,
            activation: mlp.activation,
            task: mlp.task,
        }
    }

    /// Run the network on `[batch, input_width]` features.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head(self.logits(x))
    }

    /// The last layer's output before the head: what the losses take, for numerical
    /// stability (log-sum-exp forms instead of the log of a sigmoid or softmax).
    pub fn logits(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = match self.activation {
                    Activation::Relu => activation::relu(x),
                    Activation::Tanh => activation::tanh(x),
                    Activation::Sigmoid => activation::sigmoid(x),
                    Activation::Gelu => activation::gelu(x),
                };
            }
        }
        x
    }

    /// The head that fits the task: sigmoid, softmax over each row, or identity.
    pub fn head(&self, logits: Tensor<2>) -> Tensor<2> {
        match self.task {
            Task::BinaryClassification => activation::sigmoid(logits),
            Task::MulticlassClassification => activation::softmax(logits, 1),
            Task::Regression => logits,
        }
    }

    /// Parameters in their wire order (layer by layer, weight then bias), with their
    /// element counts: the order of a flat gradient vector.
    fn params(&self) -> impl Iterator<Item = (ParamId, ParamId, usize, usize)> + '_ {
        self.layers.iter().map(|layer| {
            let [inputs, outputs] = layer.weight.dims();
            let bias = layer.bias.as_ref().map_or(layer.weight.id, |b| b.id);
            (layer.weight.id, bias, inputs, outputs)
        })
    }

    /// Elements in a flat gradient vector of this network.
    pub fn parameter_count(&self) -> usize {
        self.params().map(|(_, _, i, o)| i * o + o).sum()
    }

    /// The gradients of every parameter as one flat vector in wire order (what replicas of
    /// a data-parallel run exchange); a parameter without a gradient counts as zeros.
    pub fn flatten_gradients(&self, grads: &GradientsParams) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.parameter_count());
        for (weight, bias, inputs, outputs) in self.params() {
            let mut put = |values: Option<Vec<f32>>, n: usize| match values {
                Some(v) if v.len() == n => flat.extend_from_slice(&v),
                _ => flat.extend(std::iter::repeat_n(0.0, n)),
            };
            put(
                grads
                    .get::<2>(weight)
                    .and_then(|t| t.into_data().try_into_vec::<f32>().ok()),
                inputs * outputs,
            );
            put(
                grads
                    .get::<1>(bias)
                    .and_then(|t| t.into_data().try_into_vec::<f32>().ok()),
                outputs,
            );
        }
        flat
    }

    /// Gradients from a flat vector in wire order, on `device` (the plain device the
    /// training device differentiates). None when the length does not fit this network.
    pub fn gradients_from_flat(&self, flat: &[f32], device: &Device) -> Option<GradientsParams> {
        if flat.len() != self.parameter_count() {
            return None;
        }
        let mut grads = GradientsParams::new();
        let mut at = 0;
        for (weight, bias, inputs, outputs) in self.params() {
            let w = &flat[at..at + inputs * outputs];
            at += inputs * outputs;
            grads.register(
                weight,
                Tensor::<2>::from_data(TensorData::new(w.to_vec(), [inputs, outputs]), device),
            );
            let b = &flat[at..at + outputs];
            at += outputs;
            grads.register(
                bias,
                Tensor::<1>::from_data(TensorData::new(b.to_vec(), [outputs]), device),
            );
        }
        Some(grads)
    }

    /// Read the weights back from the device.
    pub fn to_weights(&self) -> MlpWeights {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let weight = layer.weight.val();
                let [inputs, outputs] = weight.dims();
                LayerWeights {
                    inputs,
                    outputs,
                    weight: weight.into_data().try_into_vec::<f32>().unwrap_or_default(),
                    bias: layer
                        .bias
                        .as_ref()
                        .map(|b| {
                            b.val()
                                .into_data()
                                .try_into_vec::<f32>()
                                .unwrap_or_default()
                        })
                        .unwrap_or_else(|| vec![0.0; outputs]),
                }
            })
            .collect();
        MlpWeights { layers }
    }
}
