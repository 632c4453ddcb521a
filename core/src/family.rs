//! The device-free half of the model-family seam (`docs/architecture.md`, "Model
//! families"): what the gateway, the registry and the worker's batcher need to know of a
//! family without compiling Burn — its interface (named, typed inputs and outputs, which
//! `ModelMetadata` and `ModelConfig` report and the codec checks requests against) and how
//! its requests share a forward pass. The device half (loading weights, running a batch) is
//! `kiln_worker::family`.

use crate::spec::{MlpSpec, ModelSpec, Signature};
use crate::tensor::{DataType, Interface, TensorSpec};

/// How the requests of one family share a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Requests' rows are joined along the batch dimension, run as one pass and split back
    /// (the MLP). The batcher counts rows against `max_batch_size`.
    Rows,
}

/// What a family says of a model from its spec alone.
pub trait FamilySpec {
    /// The family's name, as specs and logs give it (`"mlp"`).
    fn family(&self) -> &'static str;

    /// The model's inputs and outputs, under the tensor names of its signature.
    fn interface(&self, names: &Signature) -> Interface;

    /// How its requests are batched.
    fn batching(&self) -> Batching;
}

impl FamilySpec for MlpSpec {
    fn family(&self) -> &'static str {
        "mlp"
    }

    /// One FP32 input `[batch, input_width]`, one FP32 output `[batch, output_width]`.
    fn interface(&self, names: &Signature) -> Interface {
        let tensor = |name: &str, width: u32| TensorSpec {
            name: name.to_owned(),
            datatype: DataType::F32,
            shape: vec![-1, i64::from(width)],
        };
        Interface {
            inputs: vec![tensor(&names.input_name, self.input_width)],
            outputs: vec![tensor(&names.output_name, self.output_width)],
        }
    }

    fn batching(&self) -> Batching {
        Batching::Rows
    }
}

impl ModelSpec {
    /// The family this spec belongs to.
    pub fn family(&self) -> &dyn FamilySpec {
        match self {
            ModelSpec::Mlp(mlp) => mlp,
        }
    }

    /// The model's interface under `names` (see [`FamilySpec::interface`]).
    pub fn interface(&self, names: &Signature) -> Interface {
        self.family().interface(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Activation, Task};

    #[test]
    fn the_mlp_interface_is_one_fp32_input_and_output_of_its_widths() {
        let spec = ModelSpec::Mlp(MlpSpec {
            input_width: 3,
            hidden: vec![4],
            activation: Activation::Relu,
            output_width: 2,
            task: Task::Regression,
        });
        let names = Signature {
            input_name: "features".into(),
            output_name: "scores".into(),
        };
        let interface = spec.interface(&names);
        assert_eq!(interface.inputs.len(), 1);
        assert_eq!(interface.inputs[0].name, "features");
        assert_eq!(interface.inputs[0].datatype, DataType::F32);
        assert_eq!(interface.inputs[0].shape, vec![-1, 3]);
        assert_eq!(interface.outputs[0].name, "scores");
        assert_eq!(interface.outputs[0].shape, vec![-1, 2]);
        assert_eq!(spec.family().family(), "mlp");
        assert_eq!(spec.family().batching(), Batching::Rows);
    }
}
