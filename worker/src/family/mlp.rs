//! The MLP family: safetensors weights in Kiln's layout (`kiln_core::weights`), one FP32
//! input and one FP32 output, rows batched by concatenation.

use burn::tensor::{Device, Tensor as BurnTensor, TensorData};
use kiln_core::MlpWeights;
use kiln_core::spec::{ModelSpec, Standardization};
use kiln_core::tensor::{Interface, Tensor};

use super::{Artifacts, Family, Loaded, Prepared, Ran};
use crate::model::Mlp;
use crate::{Error, Result};

/// The MLP family's device code.
pub struct MlpFamily;

impl Family for MlpFamily {
    fn prepare(
        &self,
        spec: &ModelSpec,
        interface: Interface,
        artifacts: Artifacts,
    ) -> Result<Box<dyn Prepared>> {
        let weights = MlpWeights::from_safetensors(spec, &artifacts.weights)?;
        prepare(spec, interface, weights, artifacts.preprocessing)
    }
}

/// Prepare decoded weights (what [`MlpFamily::prepare`] does after decoding; tests and
/// benchmarks start here).
pub fn prepare(
    spec: &ModelSpec,
    interface: Interface,
    weights: MlpWeights,
    preprocessing: Option<Standardization>,
) -> Result<Box<dyn Prepared>> {
    if let Some(p) = &preprocessing {
        p.validate(spec.input_width())?;
    }
    Ok(Box::new(PreparedMlp {
        spec: spec.clone(),
        interface,
        weights,
        preprocessing,
    }))
}

struct PreparedMlp {
    spec: ModelSpec,
    interface: Interface,
    weights: MlpWeights,
    preprocessing: Option<Standardization>,
}

impl Prepared for PreparedMlp {
    fn build(self: Box<Self>, device: &Device) -> Result<Box<dyn Loaded>> {
        let mlp = Mlp::from_weights(self.spec.mlp()?, &self.weights, device);
        Ok(Box::new(LoadedMlp {
            mlp,
            device: device.clone(),
            input_width: self.spec.input_width(),
            output_width: self.spec.output_width(),
            interface: self.interface,
            preprocessing: self.preprocessing,
        }))
    }
}

struct LoadedMlp {
    mlp: Mlp,
    device: Device,
    input_width: usize,
    output_width: usize,
    interface: Interface,
    /// Applied to the features before the network (a trained version's standardisation).
    preprocessing: Option<Standardization>,
}

impl Loaded for LoadedMlp {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&self, inputs: Vec<Tensor>, rows: usize) -> Result<Ran> {
        let [input] = <[Tensor; 1]>::try_from(inputs).map_err(|inputs| {
            Error::Invalid(format!("the MLP takes 1 input, got {}", inputs.len()))
        })?;
        let mut features = input.f32_values()?;
        let width = self.input_width;
        if rows == 0 || features.len() != rows * width {
            return Err(Error::Invalid(format!(
                "input {:?}: {} values do not make {rows} rows of {width}",
                input.name,
                features.len()
            )));
        }
        if let Some(p) = &self.preprocessing {
            p.apply(&mut features);
        }
        let x = BurnTensor::<2>::from_data(TensorData::new(features, [rows, width]), &self.device);
        let values = self
            .mlp
            .forward(x)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        let name = self
            .interface
            .outputs
            .first()
            .map_or("output", |o| o.name.as_str());
        Ok(Ran::outputs(vec![Tensor::from_f32(
            name,
            vec![rows, self.output_width],
            &values,
        )?]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::spec::{Activation, MlpSpec, Signature, Task};

    fn spec() -> ModelSpec {
        ModelSpec::Mlp(MlpSpec {
            input_width: 3,
            hidden: vec![4],
            activation: Activation::Tanh,
            output_width: 2,
            task: Task::Regression,
        })
    }

    #[test]
    fn weights_read_back_from_the_device_unchanged() {
        let spec = spec();
        let weights = MlpWeights::seeded(&spec, 7);
        let prepared = PreparedMlp {
            interface: spec.interface(&Signature::default()),
            spec,
            weights: weights.clone(),
            preprocessing: None,
        };
        let device = Device::flex();
        let mlp = Mlp::from_weights(prepared.spec.mlp().unwrap(), &prepared.weights, &device);
        assert_eq!(mlp.to_weights(), weights);
    }

    #[test]
    fn answers_carry_the_signatures_output_name_and_one_row_per_input_row() {
        let spec = spec();
        let names = Signature {
            input_name: "x".into(),
            output_name: "y".into(),
        };
        let weights = MlpWeights::seeded(&spec, 7);
        let loaded = prepare(&spec, spec.interface(&names), weights, None)
            .unwrap()
            .build(&Device::flex())
            .unwrap();
        let x = Tensor::from_f32("x", vec![2, 3], &[0.5; 6]).unwrap();
        let out = loaded.run(vec![x], 2).unwrap();
        assert!(out.truncated.is_empty());
        let out = out.outputs;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "y");
        assert_eq!(out[0].shape, vec![2, 2]);
        // Two equal rows in, two equal rows out.
        let v = out[0].f32_values().unwrap();
        assert_eq!(v[..2], v[2..]);
        // Rows that do not match the data are refused, not run.
        let x = Tensor::from_f32("x", vec![2, 3], &[0.5; 6]).unwrap();
        assert!(matches!(loaded.run(vec![x], 3), Err(Error::Invalid(_))));
    }
}
