//! The device-free half of the model-family seam (`docs/architecture.md`, "Model
//! families"): what the gateway, the registry and the worker's batcher need to know of a
//! family without compiling Burn — its interface (named, typed inputs and outputs, which
//! `ModelMetadata` and `ModelConfig` report and the codec checks requests against) and how
//! its requests share a forward pass. The device half (loading weights, running a batch) is
//! `kiln_worker::family`.

use crate::generation::{
    EXCLUDE_INPUT, FINISH_OUTPUT, INPUT_TOKENS_OUTPUT, OUTPUT_TOKENS_OUTPUT, SAMPLING_INPUT,
    STREAM_INPUT, Sampling, TEXT_INPUT as PROMPT_INPUT, TEXT_OUTPUT, TOKEN_IDS_OUTPUT,
};
use crate::spec::{BertSpec, LlamaSpec, MlpSpec, ModelSpec, Signature};
use crate::tensor::{DataType, Interface, Tensor, TensorSpec};
use crate::{Error, Result};

/// How the requests of one family share a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Requests' rows are joined along the batch dimension, run as one pass and split back
    /// (the MLP). The batcher counts rows against `max_batch_size`.
    Rows,
    /// Each request is one generation: it joins the worker's running sequences at the next
    /// step and leaves when it finishes (continuous batching); its answer may be a stream
    /// (a decoupled model).
    Generate,
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

    /// Whether the model cuts inputs longer than it takes (an encoder's texts past its
    /// longest sequence); its answers then say how many rows were cut.
    fn truncates(&self) -> bool {
        false
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
            optional: false,
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
/// Pre-tokenised input of an encoder: token ids, `[batch, tokens]`.
pub const IDS_INPUT: &str = "input_ids";
/// With `input_ids`: 1 for a token, 0 for padding after the row's tokens.
pub const MASK_INPUT: &str = "attention_mask";
/// With `input_ids`: each token's segment (all 0 for single texts).
pub const TYPES_INPUT: &str = "token_type_ids";
/// Output of an embedding model: one embedding per row.
pub const EMBEDDING_OUTPUT: &str = "embedding";
/// Output of a sequence classifier: one score per class per row.
pub const LOGITS_OUTPUT: &str = "logits";
/// Output of a sequence classifier: the label of the highest score per row.
pub const LABEL_OUTPUT: &str = "label";

impl FamilySpec for BertSpec {
    fn family(&self) -> &'static str {
        "bert"
    }

    /// Either `text` BYTES `[batch]` (a UTF-8 string per row, tokenised by the worker) or
    /// `input_ids` INT64 `[batch, tokens]` with optional `attention_mask` and
    /// `token_type_ids` of the same shape (tokenised by the client). Out: `embedding` FP32
    /// `[batch, hidden_size]`, or for a classifier `logits` FP32 `[batch, classes]` and
    /// `label` BYTES `[batch]`. The tensor names are fixed: the signature's names are the
    /// MLP's.
    fn interface(&self, _: &Signature) -> Interface {
        let tensor = |name: &str, datatype: DataType, shape: Vec<i64>, optional: bool| TensorSpec {
            name: name.into(),
            datatype,
            shape,
            optional,
        };
        let outputs = if self.is_classifier() {
            vec![
                tensor(
                    LOGITS_OUTPUT,
                    DataType::F32,
                    vec![-1, self.labels.len() as i64],
                    false,
                ),
                tensor(LABEL_OUTPUT, DataType::Bytes, vec![-1], false),
            ]
        } else {
            vec![tensor(
                EMBEDDING_OUTPUT,
                DataType::F32,
                vec![-1, i64::from(self.hidden_size)],
                false,
            )]
        };
        Interface {
            inputs: vec![
                tensor(TEXT_INPUT, DataType::Bytes, vec![-1], true),
                tensor(IDS_INPUT, DataType::I64, vec![-1, -1], true),
                tensor(MASK_INPUT, DataType::I64, vec![-1, -1], true),
                tensor(TYPES_INPUT, DataType::I64, vec![-1, -1], true),
            ],
            outputs,
        }
    }

    /// Texts are rows; the worker pads each batch to its longest text.
    fn batching(&self) -> Batching {
        Batching::Rows
    }

    /// Texts past `max_seq_length` tokens are cut there.
    fn truncates(&self) -> bool {
        true
    }

    /// `text` alone, every element UTF-8; or `input_ids` (with `attention_mask` and
    /// `token_type_ids` of its shape, if given), every id in the vocabulary, every mask
    /// 1s then 0s with at least one token, every type within `type_vocab_size`, and no
    /// row longer than `max_position_embeddings`.
    fn check_request(&self, inputs: &[Tensor]) -> Result<()> {
        let find = |name: &str| inputs.iter().find(|t| t.name == name);
        match (find(TEXT_INPUT), find(IDS_INPUT)) {
            (Some(text), None) => {
                if inputs.len() > 1 {
                    return Err(Error::Invalid(format!(
                        "input {TEXT_INPUT:?} goes alone: {MASK_INPUT:?} and {TYPES_INPUT:?} go with {IDS_INPUT:?}"
                    )));
                }
                for (i, item) in text.byte_strings()?.iter().enumerate() {
                    if std::str::from_utf8(item).is_err() {
                        return Err(Error::Invalid(format!(
                            "input {TEXT_INPUT:?}: element {i} is not valid UTF-8"
                        )));
                    }
                }
                Ok(())
            }
            (None, Some(ids)) => {
                token_rows(self, ids, find(MASK_INPUT), find(TYPES_INPUT)).map(|_| ())
            }
            (Some(_), Some(_)) => Err(Error::Invalid(format!(
                "give either {TEXT_INPUT:?} or {IDS_INPUT:?}, not both"
            ))),
            (None, None) => Err(Error::Invalid(format!(
                "input {TEXT_INPUT:?} or {IDS_INPUT:?} is needed"
            ))),
        }
    }
}

/// `values` as `u32`, each below `limit`; `refuse` words the error for one that is not.
fn bounded(values: &[i64], limit: u32, refuse: impl Fn(i64) -> String) -> Result<Vec<u32>> {
    values
        .iter()
        .map(|v| {
            u32::try_from(*v)
                .ok()
                .filter(|v| *v < limit)
                .ok_or_else(|| Error::Invalid(refuse(*v)))
        })
        .collect()
}

/// One pre-tokenised row: its real tokens (the mask's 1s) and their types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment of each token.
    pub types: Vec<u32>,
}

/// The rows of a pre-tokenised request, checked against `spec` (see
/// [`BertSpec::check_request`](FamilySpec::check_request)); padding is dropped.
pub fn token_rows(
    spec: &BertSpec,
    ids: &Tensor,
    mask: Option<&Tensor>,
    types: Option<&Tensor>,
) -> Result<Vec<TokenRow>> {
    let shape = ids.shape.clone();
    for t in [mask, types].into_iter().flatten() {
        if t.shape != shape {
            return Err(Error::Invalid(format!(
                "input {:?} has shape {:?}; {IDS_INPUT:?} has {shape:?}",
                t.name, t.shape
            )));
        }
    }
    let (rows, width) = (shape[0], shape.get(1).copied().unwrap_or(0));
    let ids = ids.i64_values()?;
    let mask = mask.map(Tensor::i64_values).transpose()?;
    let types = types.map(Tensor::i64_values).transpose()?;
    let mut out = Vec::with_capacity(rows);
    for r in 0..rows {
        let at = r * width..(r + 1) * width;
        let len = match &mask {
            None => width,
            Some(mask) => {
                let row = &mask[at.clone()];
                if let Some(bad) = row.iter().find(|v| **v != 0 && **v != 1) {
                    return Err(Error::Invalid(format!(
                        "input {MASK_INPUT:?}: row {r} holds {bad}; a mask holds 0 and 1"
                    )));
                }
                let len = row.iter().take_while(|v| **v == 1).count();
                if row[len..].contains(&1) {
                    return Err(Error::Invalid(format!(
                        "input {MASK_INPUT:?}: row {r} has padding before a token; pad after the tokens"
                    )));
                }
                len
            }
        };
        if len == 0 {
            return Err(Error::Invalid(format!(
                "input {IDS_INPUT:?}: row {r} has no tokens"
            )));
        }
        if len > spec.max_position_embeddings as usize {
            return Err(Error::Invalid(format!(
                "input {IDS_INPUT:?}: row {r} has {len} tokens; the model takes at most {}",
                spec.max_position_embeddings
            )));
        }
        let tokens = at.start..at.start + len;
        let row_ids = bounded(&ids[tokens.clone()], spec.vocab_size, |id| {
            format!(
                "input {IDS_INPUT:?}: row {r} holds id {id}, outside the vocabulary of {}",
                spec.vocab_size
            )
        })?;
        let row_types = match &types {
            None => vec![0; len],
            Some(types) => bounded(&types[tokens], spec.type_vocab_size, |t| {
                format!(
                    "input {TYPES_INPUT:?}: row {r} holds type {t}; the model has {} types",
                    spec.type_vocab_size
                )
            })?,
        };
        out.push(TokenRow {
            ids: row_ids,
            types: row_types,
        });
    }
    Ok(out)
}

impl FamilySpec for LlamaSpec {
    fn family(&self) -> &'static str {
        "llama"
    }

    /// The tensors of Triton's vLLM backend, without a batch dimension: `text_input` BYTES
    /// `[1]`, optional `stream` BOOL `[1]`, `sampling_parameters` BYTES `[1]` (JSON) and
    /// `exclude_input_in_output` BOOL `[1]`. Out: `text_output` BYTES `[1]`,
    /// `finish_reason` BYTES `[1]` (empty until the last response), `num_input_tokens` and
    /// `num_output_tokens` UINT32 `[1]`, and `token_ids` UINT32 `[-1]` (the ids of the
    /// tokens the response carries).
    fn interface(&self, _: &Signature) -> Interface {
        let tensor = |name: &str, datatype: DataType, optional: bool| TensorSpec {
            name: name.into(),
            datatype,
            shape: vec![1],
            optional,
        };
        Interface {
            inputs: vec![
                tensor(PROMPT_INPUT, DataType::Bytes, false),
                tensor(STREAM_INPUT, DataType::Bool, true),
                tensor(SAMPLING_INPUT, DataType::Bytes, true),
                tensor(EXCLUDE_INPUT, DataType::Bool, true),
            ],
            outputs: vec![
                tensor(TEXT_OUTPUT, DataType::Bytes, false),
                tensor(FINISH_OUTPUT, DataType::Bytes, false),
                tensor(INPUT_TOKENS_OUTPUT, DataType::U32, false),
                tensor(OUTPUT_TOKENS_OUTPUT, DataType::U32, false),
                TensorSpec {
                    name: TOKEN_IDS_OUTPUT.into(),
                    datatype: DataType::U32,
                    shape: vec![-1],
                    optional: false,
                },
            ],
        }
    }

    fn batching(&self) -> Batching {
        Batching::Generate
    }

    /// The prompt is UTF-8 and the sampling parameters are a valid JSON object.
    fn check_request(&self, inputs: &[Tensor]) -> Result<()> {
        GenerateInputs::read(inputs).map(|_| ())
    }
}

/// The inputs of one generation request on the OIP interface, read and checked.
#[derive(Debug, Clone)]
pub struct GenerateInputs {
    /// The prompt.
    pub prompt: String,
    /// Answer token by token.
    pub stream: bool,
    /// How to sample.
    pub sampling: Sampling,
    /// Leave the prompt out of a whole (not streamed) answer.
    pub exclude_input: bool,
}

impl GenerateInputs {
    /// Read the inputs of a request already checked against the interface.
    pub fn read(inputs: &[Tensor]) -> Result<Self> {
        let find = |name: &str| inputs.iter().find(|t| t.name == name);
        let one_string = |t: &Tensor| -> Result<Vec<u8>> {
            let strings = t.byte_strings()?;
            match strings.as_slice() {
                [one] => Ok(one.to_vec()),
                _ => Err(Error::Invalid(format!(
                    "input {:?} must hold exactly one element",
                    t.name
                ))),
            }
        };
        let flag = |name: &str| -> Result<bool> {
            match find(name) {
                None => Ok(false),
                Some(t) => match t.data.first() {
                    Some(b) if t.data.len() == 1 => Ok(*b != 0),
                    _ => Err(Error::Invalid(format!(
                        "input {name:?} must hold exactly one element"
                    ))),
                },
            }
        };
        let prompt = find(PROMPT_INPUT)
            .ok_or_else(|| Error::Invalid(format!("input {PROMPT_INPUT:?} is missing")))?;
        let prompt = String::from_utf8(one_string(prompt)?)
            .map_err(|_| Error::Invalid(format!("input {PROMPT_INPUT:?} is not valid UTF-8")))?;
        let sampling = match find(SAMPLING_INPUT) {
            Some(t) => {
                let text = one_string(t)?;
                if text.iter().all(u8::is_ascii_whitespace) {
                    Sampling::default()
                } else {
                    Sampling::from_json(&text)?
                }
            }
            None => Sampling::default(),
        };
        Ok(GenerateInputs {
            prompt,
            stream: flag(STREAM_INPUT)?,
            sampling,
            exclude_input: flag(EXCLUDE_INPUT)?,
        })
    }
}

impl ModelSpec {
    /// The family this spec belongs to.
    pub fn family(&self) -> &dyn FamilySpec {
        match self {
            ModelSpec::Mlp(mlp) => mlp,
            ModelSpec::Bert(bert) => bert,
            ModelSpec::Llama(llama) => llama,
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

    fn bert() -> BertSpec {
        BertSpec {
            vocab_size: 10,
            hidden_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 8,
            max_position_embeddings: 4,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            max_seq_length: 4,
            pooling: crate::spec::Pooling::Mean,
            normalize: true,
            labels: Vec::new(),
        }
    }

    fn ints(name: &str, rows: usize, values: &[i64]) -> Tensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = vec![rows, values.len() / rows];
        Tensor::new(name, DataType::I64, shape, data.into()).unwrap()
    }

    #[test]
    fn token_ids_drop_their_padding_and_what_the_model_cannot_take_is_named() {
        let spec = bert();
        let ids = ints(IDS_INPUT, 2, &[2, 5, 3, 2, 3, 0]);
        let mask = ints(MASK_INPUT, 2, &[1, 1, 1, 1, 1, 0]);
        let rows = token_rows(&spec, &ids, Some(&mask), None).unwrap();
        assert_eq!(rows[0].ids, vec![2, 5, 3]);
        assert_eq!(rows[1].ids, vec![2, 3]);
        assert_eq!(rows[1].types, vec![0, 0]);
        assert!(spec.check_request(&[ids.clone(), mask]).is_ok());
        let refusals = [
            (
                vec![ints(IDS_INPUT, 1, &[2, 10])],
                "id 10, outside the vocabulary of 10",
            ),
            (
                vec![ids.clone(), ints(MASK_INPUT, 2, &[1, 0, 1, 1, 1, 0])],
                "row 0 has padding before a token",
            ),
            (
                vec![ids.clone(), ints(TYPES_INPUT, 2, &[0, 0, 2, 0, 0, 0])],
                "row 0 holds type 2; the model has 2 types",
            ),
            (
                vec![ints(IDS_INPUT, 1, &[1, 1, 1, 1, 1])],
                "row 0 has 5 tokens; the model takes at most 4",
            ),
            (
                vec![ints(MASK_INPUT, 1, &[1])],
                "\"text\" or \"input_ids\" is needed",
            ),
        ];
        for (inputs, needle) in refusals {
            let e = spec.check_request(&inputs).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let text = Tensor::from_byte_strings(TEXT_INPUT, vec![1], &["hi"]).unwrap();
        let e = spec.check_request(&[text, ids]).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
    }

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
