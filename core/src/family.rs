//! The device-free half of the model-family seam (`docs/architecture.md`, "Model
//! families"): what the gateway, the registry and the worker's batcher need to know of a
//! family without compiling Burn — its interface (named, typed inputs and outputs, which
//! `ModelMetadata` and `ModelConfig` report and the codec checks requests against) and how
//! its requests share a forward pass. The device half (loading weights, running a batch) is
//! `kiln_worker::family`.

use crate::spec::{BertSpec, MlpSpec, ModelSpec, Signature};
use crate::tensor::{DataType, Interface, Tensor, TensorSpec};
use crate::{Error, Result};

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

    /// Check what the interface cannot say of a request's inputs (already checked against
    /// it), so that a request that would fail its batch is refused alone, before it joins
    /// one. The error names the input and the element.
    fn check_request(&self, _inputs: &[Tensor]) -> Result<()> {
        Ok(())
    }
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

/// Input text of an encoder: one UTF-8 string per row.
pub const TEXT_INPUT: &str = "text";
/// Output of an encoder: one embedding per row.
pub const EMBEDDING_OUTPUT: &str = "embedding";

impl FamilySpec for BertSpec {
    fn family(&self) -> &'static str {
        "bert"
    }

    /// One BYTES input `text` `[batch]` (a UTF-8 string per row), one FP32 output
    /// `embedding` `[batch, hidden_size]`. The tensor names are fixed: the signature's names
    /// are the MLP's.
    fn interface(&self, _: &Signature) -> Interface {
        Interface {
            inputs: vec![TensorSpec {
                name: TEXT_INPUT.into(),
                datatype: DataType::Bytes,
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: EMBEDDING_OUTPUT.into(),
                datatype: DataType::F32,
                shape: vec![-1, i64::from(self.hidden_size)],
            }],
        }
    }

    /// Texts are rows; the worker pads each batch to its longest text.
    fn batching(&self) -> Batching {
        Batching::Rows
    }

    /// Every text is UTF-8.
    fn check_request(&self, inputs: &[Tensor]) -> Result<()> {
        for t in inputs {
            for (i, item) in t.byte_strings()?.iter().enumerate() {
                if std::str::from_utf8(item).is_err() {
                    return Err(Error::Invalid(format!(
                        "input {:?}: element {i} is not valid UTF-8",
                        t.name
                    )));
                }
            }
        }
        Ok(())
    }
}

impl ModelSpec {
    /// The family this spec belongs to.
    pub fn family(&self) -> &dyn FamilySpec {
        match self {
            ModelSpec::Mlp(mlp) => mlp,
            ModelSpec::Bert(bert) => bert,
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
