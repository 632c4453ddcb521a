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

/// How an encoder turns its token states into one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the text's tokens (padding excluded).
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// A BERT-family encoder imported from a Hugging Face directory (`config.json`, and the
/// sentence-transformers module configs when present): what the worker needs to build it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertSpec {
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// Width of every token state.
    pub hidden_size: u32,
    /// Transformer layers.
    pub num_hidden_layers: u32,
    /// Attention heads per layer (they split `hidden_size`).
    pub num_attention_heads: u32,
    /// Width of the feed-forward layer.
    pub intermediate_size: u32,
    /// Positions the position embeddings cover.
    pub max_position_embeddings: u32,
    /// Token types the type embeddings cover.
    pub type_vocab_size: u32,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Longest text in tokens, special tokens included; longer texts are truncated.
    pub max_seq_length: u32,
    /// How token states become the embedding.
    pub pooling: Pooling,
    /// Whether the embedding is scaled to unit length.
    pub normalize: bool,
    /// A sequence classifier's labels, by class index (`id2label` of a
    /// `BertForSequenceClassification` checkpoint): its answers are logits and the label
    /// of the largest. Empty for an embedding model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Most layers of an imported encoder.
pub const MAX_ENCODER_LAYERS: u32 = 64;
/// Largest hidden width of an imported encoder.
pub const MAX_ENCODER_WIDTH: u32 = 8_192;
/// Most classes of an imported sequence classifier.
pub const MAX_LABELS: usize = 4_096;
/// Longest label of a sequence classifier, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

impl BertSpec {
    /// Check every limit; the error names the `config.json` field.
    pub fn validate(&self) -> Result<()> {
        positive("vocab_size", self.vocab_size, 1 << 22)?;
        positive("hidden_size", self.hidden_size, MAX_ENCODER_WIDTH)?;
        positive(
            "num_hidden_layers",
            self.num_hidden_layers,
            MAX_ENCODER_LAYERS,
        )?;
        positive("num_attention_heads", self.num_attention_heads, 1024)?;
        positive(
            "intermediate_size",
            self.intermediate_size,
            8 * MAX_ENCODER_WIDTH,
        )?;
        positive(
            "max_position_embeddings",
            self.max_position_embeddings,
            1 << 16,
        )?;
        positive("type_vocab_size", self.type_vocab_size, 1024)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Invalid(format!(
                "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return Err(Error::Invalid(format!(
                "config.json: layer_norm_eps must be in (0, 1), got {}",
                self.layer_norm_eps
            )));
        }
        if self.max_seq_length < 2 || self.max_seq_length > self.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "max_seq_length {} must be between 2 and max_position_embeddings {}",
                self.max_seq_length, self.max_position_embeddings
            )));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(Error::Invalid(format!(
                "config.json: {} labels; at most {MAX_LABELS} are served",
                self.labels.len()
            )));
        }
        if let Some(long) = self.labels.iter().find(|l| l.len() > MAX_LABEL_BYTES) {
            return Err(Error::Invalid(format!(
                "config.json: label {:?}… is longer than {MAX_LABEL_BYTES} bytes",
                long.chars().take(16).collect::<String>()
            )));
        }
        Ok(())
    }

    /// Whether this is a sequence classifier (logits and labels) rather than an embedding
    /// model.
    pub fn is_classifier(&self) -> bool {
        !self.labels.is_empty()
    }

    /// Number of weights (embeddings, layers, and a classifier's pooler and head).
    pub fn parameter_count(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        let i = u64::from(self.intermediate_size);
        let embeddings = (u64::from(self.vocab_size)
            + u64::from(self.max_position_embeddings)
            + u64::from(self.type_vocab_size))
            * h
            + 2 * h;
        let layer = 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h;
        let n = self.labels.len() as u64;
        let head = if n > 0 { h * h + h + n * h + n } else { 0 };
        embeddings + u64::from(self.num_hidden_layers) * layer + head
    }
}

/// A Llama-architecture decoder (RMSNorm, rotate-half rotary embeddings, grouped-query
/// attention, SwiGLU) imported from a Hugging Face directory or a GGUF file: what the worker
/// needs to build it and to generate with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaSpec {
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// Width of every token state.
    pub hidden_size: u32,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: u32,
    /// Decoder layers.
    pub num_hidden_layers: u32,
    /// Query heads per layer.
    pub num_attention_heads: u32,
    /// Key/value heads per layer (fewer than the query heads under grouped-query
    /// attention; each serves `num_attention_heads / num_key_value_heads` query heads).
    pub num_key_value_heads: u32,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embeddings' frequencies.
    pub rope_theta: f64,
    /// Longest sequence, prompt and completion together.
    pub max_position_embeddings: u32,
    /// Whether the output head is the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// The beginning-of-sequence token, put before every prompt when `add_bos_token`.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Whether prompts start with the beginning-of-sequence token.
    #[serde(default)]
    pub add_bos_token: bool,
    /// Tokens that end a generation.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
}

/// Sequences one loaded decoder runs at once (its key/value cache slots).
pub const GENERATION_SLOTS: usize = 16;
/// Positions per slot that placement reserves cache memory for; longer sequences grow the
/// cache past the reservation (docs/models.md, "Memory").
pub const CACHE_RESERVED_POSITIONS: u64 = 2_048;

/// Most layers of an imported decoder.
pub const MAX_DECODER_LAYERS: u32 = 256;
/// Largest hidden width of an imported decoder.
pub const MAX_DECODER_WIDTH: u32 = 32_768;

impl LlamaSpec {
    /// Width of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Check every limit; the error names the `config.json` field.
    pub fn validate(&self) -> Result<()> {
        positive("vocab_size", self.vocab_size, 1 << 22)?;
        positive("hidden_size", self.hidden_size, MAX_DECODER_WIDTH)?;
        positive(
            "intermediate_size",
            self.intermediate_size,
            8 * MAX_DECODER_WIDTH,
        )?;
        positive(
            "num_hidden_layers",
            self.num_hidden_layers,
            MAX_DECODER_LAYERS,
        )?;
        positive("num_attention_heads", self.num_attention_heads, 1024)?;
        positive(
            "num_key_value_heads",
            self.num_key_value_heads,
            self.num_attention_heads,
        )?;
        positive(
            "max_position_embeddings",
            self.max_position_embeddings,
            1 << 20,
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Invalid(format!(
                "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::Invalid(format!(
                "config.json: the head width {} is odd; rotary embeddings rotate pairs",
                self.head_dim()
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::Invalid(format!(
                "config.json: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(Error::Invalid(format!(
                "config.json: rms_norm_eps must be in (0, 1), got {}",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::Invalid(format!(
                "config.json: rope_theta must be a finite number above 1, got {}",
                self.rope_theta
            )));
        }
        for id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if *id >= self.vocab_size {
                return Err(Error::Invalid(format!(
                    "config.json: special token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Width of the keys (and of the values) of one layer: key/value heads × head width.
    pub fn kv_width(&self) -> u32 {
        self.num_key_value_heads * self.head_dim()
    }

    /// Number of weights (embedding, layers, final norm, and an untied output head).
    pub fn parameter_count(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        let i = u64::from(self.intermediate_size);
        let kv = u64::from(self.kv_width());
        let v = u64::from(self.vocab_size);
        let layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + u64::from(self.num_hidden_layers) * layer + h + head
    }

    /// Bytes of key/value cache one token takes (FP32 keys and values of every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.num_hidden_layers) * u64::from(self.kv_width()) * 4
    }

    /// Bytes of key/value cache placement counts for one loaded version: every slot
    /// holding [`CACHE_RESERVED_POSITIONS`] positions (or the whole context, if shorter).
    pub fn cache_reservation_bytes(&self) -> u64 {
        let positions = u64::from(self.max_position_embeddings).min(CACHE_RESERVED_POSITIONS);
        GENERATION_SLOTS as u64 * positions * self.kv_bytes_per_token()
    }
}

/// Check that a `config.json` count is between 1 and `max`; the error names the field.
fn positive(field: &str, v: u32, max: u32) -> Result<()> {
    if v == 0 || v > max {
        Err(Error::Invalid(format!(
            "config.json: {field} must be between 1 and {max}, got {v}"
        )))
    } else {
        Ok(())
    }
}

/// A model architecture; new families go beside `Mlp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    /// A multilayer perceptron.
    Mlp(MlpSpec),
    /// A BERT-family encoder serving sentence embeddings.
    Bert(BertSpec),
    /// A Llama-family decoder generating text.
    Llama(LlamaSpec),
}

impl ModelSpec {
    /// The MLP spec, for what only the MLP has (training, Kiln's weight layout); the error
    /// says which family the model is.
    pub fn mlp(&self) -> Result<&MlpSpec> {
        match self {
            ModelSpec::Mlp(mlp) => Ok(mlp),
            other => Err(Error::Invalid(format!(
                "this is a {} model; only MLP models can do that",
                other.family_name()
            ))),
        }
    }

    /// The family's name (`"mlp"`, `"bert"`).
    pub fn family_name(&self) -> &'static str {
        match self {
            ModelSpec::Mlp(_) => "mlp",
            ModelSpec::Bert(_) => "bert",
            ModelSpec::Llama(_) => "llama",
        }
    }

    /// Check every limit; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let mlp = match self {
            ModelSpec::Mlp(mlp) => mlp,
            ModelSpec::Bert(bert) => return bert.validate(),
            ModelSpec::Llama(llama) => return llama.validate(),
        };
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

    /// Input features per row (an MLP's input width; an encoder's hidden width).
    pub fn input_width(&self) -> usize {
        match self {
            ModelSpec::Mlp(mlp) => mlp.input_width as usize,
            ModelSpec::Bert(bert) => bert.hidden_size as usize,
            ModelSpec::Llama(llama) => llama.hidden_size as usize,
        }
    }

    /// Outputs per row (an MLP's output width; an encoder's embedding width).
    pub fn output_width(&self) -> usize {
        match self {
            ModelSpec::Mlp(mlp) => mlp.output_width as usize,
            ModelSpec::Bert(bert) => bert.hidden_size as usize,
            ModelSpec::Llama(llama) => llama.vocab_size as usize,
        }
    }

    /// `(in, out)` of every dense layer of an MLP, input side first (none for other
    /// families).
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        let ModelSpec::Mlp(mlp) = self else {
            return Vec::new();
        };
        let mut widths = vec![mlp.input_width as usize];
        widths.extend(mlp.hidden.iter().map(|w| *w as usize));
        widths.push(mlp.output_width as usize);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Bytes a loaded version takes beside its weights: a decoder's key/value cache.
    pub fn cache_reservation_bytes(&self) -> u64 {
        match self {
            ModelSpec::Llama(llama) => llama.cache_reservation_bytes(),
            _ => 0,
        }
    }

    /// Number of weights and biases.
    pub fn parameter_count(&self) -> u64 {
        match self {
            ModelSpec::Bert(bert) => return bert.parameter_count(),
            ModelSpec::Llama(llama) => return llama.parameter_count(),
            ModelSpec::Mlp(_) => {}
        }
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
