//! The device half of the model-family seam (`docs/architecture.md`, "Model families"):
//! how a family's weights become a module on the device and how a batch runs through it.
//! The device-free half — interface, batching — is `kiln_core::family`.
//!
//! A version loads in two steps: [`Family::prepare`] decodes and checks its artifacts on
//! a blocking thread (no device), then [`Prepared::build`] puts them on the device on the
//! engine thread. The engine holds the result as a [`Loaded`] and runs batches through it;
//! the batcher joins requests along the batch dimension before and splits answers after,
//! so neither knows which family a version is.

pub mod bert;
pub mod llama;
pub mod mlp;

use std::collections::BTreeMap;

use burn::tensor::Device;
use bytes::Bytes;
use kiln_core::spec::{ModelSpec, Standardization};
use kiln_core::tensor::{Interface, Tensor};

use crate::Result;

/// What a version stores, fetched from the artifact store and checked against its sha256.
#[derive(Debug, Clone, Default)]
pub struct Artifacts {
    /// The weights file.
    pub weights: Bytes,
    /// The version's other files by name (an encoder's `tokenizer.json`).
    pub files: BTreeMap<String, Bytes>,
    /// A trained MLP version's standardisation.
    pub preprocessing: Option<Standardization>,
}

/// One weight on the host: its values and shape.
pub(crate) struct HostTensor {
    pub(crate) values: Vec<f32>,
    pub(crate) shape: Vec<usize>,
}

/// The FP32 tensor `name` of a checkpoint, which must have `shape`; the error names the
/// weights file and the tensor.
pub(crate) fn f32_tensor(
    file: &safetensors::SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<HostTensor> {
    let view = file.tensor(name).map_err(|_| {
        crate::Error::Invalid(format!("model.safetensors: tensor {name} is missing"))
    })?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
        return Err(crate::Error::Invalid(format!(
            "model.safetensors: tensor {name} is {:?} {:?}; expected F32 {shape:?}",
            view.dtype(),
            view.shape()
        )));
    }
    Ok(HostTensor {
        values: kiln_core::weights::f32_from_le(view.data()).collect(),
        shape: shape.to_vec(),
    })
}

/// A family's device code.
pub trait Family: Send + Sync {
    /// Decode and check a version's artifacts for `spec`, served under `interface`. Runs
    /// off the device thread; nothing touches the device yet.
    fn prepare(
        &self,
        spec: &ModelSpec,
        interface: Interface,
        artifacts: Artifacts,
    ) -> Result<Box<dyn Prepared>>;
}

/// A version's artifacts, decoded and checked, ready to go on a device.
pub trait Prepared: Send {
    /// Build the module on `device` (on the engine thread).
    fn build(self: Box<Self>, device: &Device) -> Result<Box<dyn Loaded>>;
}

/// A version on a device.
pub trait Loaded: Send {
    /// The inputs its batches hold and the outputs its answers hold.
    fn interface(&self) -> &Interface;

    /// Run one batch: `inputs` in the interface's order, each of `rows` rows (already
    /// checked against the interface). Returns the outputs in the interface's order, each
    /// of `rows` rows, row `i` answering input row `i`.
    fn run(&self, inputs: Vec<Tensor>, rows: usize) -> Result<Ran>;

    /// A generative family's decoder, which the generation engine drives instead of
    /// [`run`](Self::run); `None` for families that answer batches.
    fn decoder(&mut self) -> Option<&mut dyn crate::generation::Decoder> {
        None
    }
}

/// A batch's answer.
#[derive(Debug, Default)]
pub struct Ran {
    /// The outputs, in the interface's order, one row per input row.
    pub outputs: Vec<Tensor>,
    /// The rows whose input the model cut to fit (an encoder's texts past its longest
    /// sequence), ascending; the response tells each caller how many of its rows were.
    pub truncated: Vec<usize>,
}

impl Ran {
    /// Outputs with nothing cut.
    pub fn outputs(outputs: Vec<Tensor>) -> Self {
        Ran {
            outputs,
            truncated: Vec::new(),
        }
    }
}

/// The family that serves `spec`.
pub fn family(spec: &ModelSpec) -> &'static dyn Family {
    match spec {
        ModelSpec::Mlp(_) => &mlp::MlpFamily,
        ModelSpec::Bert(_) => &bert::BertFamily,
        ModelSpec::Llama(_) => &llama::LlamaFamily,
    }
}
