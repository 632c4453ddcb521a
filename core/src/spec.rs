//! Model architecture specs and signatures: the data that says what a model is. Workers
//! build Burn modules from them; the gateway derives tensor metadata from them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest width of any layer.
pub const MAX_WIDTH: u32 = 65_536;
/// Most hidden layers in one MLP.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Most parameters in one model: 16 Mi FP32 values, 64 MiB of weights (the default
/// message limit), so a spec cannot make a gateway or worker allocate without bound.
pub const MAX_PARAMETERS: u64 = 16 * 1024 * 1024;

/// What a model's outputs mean; it fixes the last layer's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Independent sigmoid outputs.
    BinaryClassification,
    /// Softmax over the outputs.
    MulticlassClassification,
    /// Raw linear outputs.
    Regression,
}

/// Activation after each hidden layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x).
    #[default]
    Relu,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
    /// Exact GELU.
    Gelu,
}

/// A multilayer perceptron.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpSpec {
    /// Input features.
    pub input_width: u32,
    /// Hidden layer widths, input side first.
    #[serde(default)]
    pub hidden: Vec<u32>,
    /// Activation between layers.
    #[serde(default)]
    pub activation: Activation,
    /// Outputs.
    pub output_width: u32,
    /// What the outputs mean.
    pub task: Task,
}

/// A model architecture; new families go beside `Mlp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    /// A multilayer perceptron.
    Mlp(MlpSpec),
}

impl ModelSpec {
    /// Check every limit; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let ModelSpec::Mlp(mlp) = self;
        let width = |field: &str, w: u32| {
            if w == 0 || w > MAX_WIDTH {
                Err(Error::Invalid(format!(
                    "spec.mlp.{field} must be between 1 and {MAX_WIDTH}, got {w}"
                )))
            } else {
                Ok(())
            }
        };
        width("input_width", mlp.input_width)?;
        width("output_width", mlp.output_width)?;
        if mlp.hidden.len() > MAX_HIDDEN_LAYERS {
            return Err(Error::Invalid(format!(
                "spec.mlp.hidden has {} layers; at most {MAX_HIDDEN_LAYERS} are allowed",
                mlp.hidden.len()
            )));
        }
        for (i, w) in mlp.hidden.iter().enumerate() {
            width(&format!("hidden[{i}]"), *w)?;
        }
        let params = self.parameter_count();
        if params > MAX_PARAMETERS {
            return Err(Error::Invalid(format!(
                "spec has {params} parameters; at most {MAX_PARAMETERS} are allowed"
            )));
        }
        Ok(())
    }

    /// Input features per row.
    pub fn input_width(&self) -> usize {
        let ModelSpec::Mlp(mlp) = self;
        mlp.input_width as usize
    }

    /// Outputs per row.
    pub fn output_width(&self) -> usize {
        let ModelSpec::Mlp(mlp) = self;
        mlp.output_width as usize
    }

    /// `(in, out)` of every dense layer, input side first.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        let ModelSpec::Mlp(mlp) = self;
        let mut widths = vec![mlp.input_width as usize];
        widths.extend(mlp.hidden.iter().map(|w| *w as usize));
        widths.push(mlp.output_width as usize);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Number of weights and biases.
    pub fn parameter_count(&self) -> u64 {
        self.layer_shapes()
            .iter()
            .map(|(i, o)| (*i as u64) * (*o as u64) + *o as u64)
            .sum()
    }
}

/// Mean and standard deviation per feature, computed on the training split; inference
/// applies `(x - mean) / std` before the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    /// Mean of each feature.
    pub mean: Vec<f32>,
    /// Standard deviation of each feature (1 where it was 0).
    pub std: Vec<f32>,
}

impl Standardization {
    /// Check it fits `width` features: one finite mean and one finite, positive standard
    /// deviation per feature.
    pub fn validate(&self, width: usize) -> Result<()> {
        if self.mean.len() != width || self.std.len() != width {
            return Err(Error::Invalid(format!(
                "preprocessing has {} means and {} standard deviations for {width} features",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(Error::Invalid(
                "preprocessing: means must be finite and standard deviations finite and above 0"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Apply to row-major features in place.
    pub fn apply(&self, features: &mut [f32]) {
        let width = self.mean.len();
        for row in features.chunks_mut(width) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *x = (*x - m) / s;
            }
        }
    }
}

/// The tensor names a model is served under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The FP32 input, `[batch, input_width]`.
    pub input_name: String,
    /// The FP32 output, `[batch, output_width]`.
    pub output_name: String,
}

impl Default for Signature {
    fn default() -> Self {
        Self {
            input_name: "input".into(),
            output_name: "output".into(),
        }
    }
}

impl Signature {
    /// Check the names (1 to 64 printable characters, distinct).
    pub fn validate(&self) -> Result<()> {
        for (field, name) in [
            ("signature.input_name", &self.input_name),
            ("signature.output_name", &self.output_name),
        ] {
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                return Err(Error::Invalid(format!(
                    "{field} must be 1 to 64 printable characters"
                )));
            }
        }
        if self.input_name == self.output_name {
            return Err(Error::Invalid(
                "signature.input_name and signature.output_name must differ".into(),
            ));
        }
        Ok(())
    }
}

/// Check a model or alias name: 1 to 64 characters of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit. `field` names the request field in the error.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{field} must be 1 to 64 characters of [A-Za-z0-9_.-] starting with a letter or digit, got {name:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp(hidden: Vec<u32>) -> ModelSpec {
        ModelSpec::Mlp(MlpSpec {
            input_width: 10,
            hidden,
            activation: Activation::Relu,
            output_width: 1,
            task: Task::BinaryClassification,
        })
    }

    #[test]
    fn layer_shapes_chain_the_widths() {
        assert_eq!(mlp(vec![]).layer_shapes(), vec![(10, 1)]);
        assert_eq!(
            mlp(vec![8, 4]).layer_shapes(),
            vec![(10, 8), (8, 4), (4, 1)]
        );
        assert_eq!(mlp(vec![8]).parameter_count(), 10 * 8 + 8 + 8 + 1);
    }

    #[test]
    fn limits_name_the_field() {
        let err = mlp(vec![0]).validate().unwrap_err().to_string();
        assert!(err.contains("hidden[0]"), "{err}");
        let err = mlp(vec![65_536, 65_536])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("parameters"), "{err}");
        assert!(validate_name("name", "iris-v1.2_x").is_ok());
        assert!(validate_name("name", "-x").is_err());
        assert!(validate_name("name", "a/b").is_err());
    }
}
