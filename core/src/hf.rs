//! Hugging Face model directories: which files Kiln reads, and the check that turns them
//! into a spec before anything is registered. Everything is refused with a message naming
//! the file and the field or tensor: an unknown `model_type`, an activation Kiln does not
//! compute, a missing or misshapen tensor, a pooling mode it does not serve.
//!
//! A plain `BertModel` directory has `config.json`, `model.safetensors` and
//! `tokenizer.json`. A sentence-transformers directory adds `modules.json` (which lists
//! the pooling module's directory and whether a `Normalize` module follows),
//! `<pooling dir>/config.json` and `sentence_bert_config.json` (`max_seq_length`).

use std::collections::BTreeMap;

use bytes::Bytes;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::spec::{BertSpec, ModelSpec, Pooling};
use crate::{Error, Result};

/// The weights file.
pub const WEIGHTS: &str = "model.safetensors";
/// The architecture.
pub const CONFIG: &str = "config.json";
/// The tokenizer, as the `tokenizers` library writes it.
pub const TOKENIZER: &str = "tokenizer.json";
/// sentence-transformers: the module pipeline.
pub const MODULES: &str = "modules.json";
/// sentence-transformers: the encoder's settings (`max_seq_length`).
pub const SENTENCE_CONFIG: &str = "sentence_bert_config.json";
/// The pooling config when `modules.json` does not name another directory.
pub const DEFAULT_POOLING: &str = "1_Pooling/config.json";

/// The model types Kiln serves, for messages.
pub const SERVED_TYPES: &str = "bert, llama";

/// A GGUF file, as `kiln models import FILE.gguf` sends it (see [`crate::gguf`]).
pub const GGUF: &str = "model.gguf";

/// Most files one import may carry.
pub const MAX_FILES: usize = 16;

/// The files of a directory Kiln reads, by relative path: `config.json` and `modules.json`
/// first, then the pooling config `modules.json` names.
pub fn wanted_files(modules_json: Option<&[u8]>) -> Vec<String> {
    use crate::llama::{CHAT_TEMPLATE, GENERATION_CONFIG, TOKENIZER_CONFIG};
    let mut files: Vec<String> = [
        CONFIG,
        WEIGHTS,
        TOKENIZER,
        MODULES,
        SENTENCE_CONFIG,
        TOKENIZER_CONFIG,
        GENERATION_CONFIG,
        CHAT_TEMPLATE,
        GGUF,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    files.push(pooling_path(modules_json).unwrap_or_else(|| DEFAULT_POOLING.to_owned()));
    files
}

/// The pooling module's config path as `modules.json` gives it.
fn pooling_path(modules_json: Option<&[u8]>) -> Option<String> {
    let modules: Value = serde_json::from_slice(modules_json?).ok()?;
    modules.as_array()?.iter().find_map(|m| {
        let kind = m.get("type")?.as_str()?;
        let path = m.get("path")?.as_str()?;
        (kind.ends_with(".Pooling") && !path.is_empty()).then(|| format!("{path}/config.json"))
    })
}

/// A checked import: the spec, the weights file and the other files a version keeps.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The architecture, from the configs.
    pub spec: ModelSpec,
    /// `model.safetensors` as uploaded.
    pub weights: Bytes,
    /// The other files the worker needs (the tokenizer), by name.
    pub files: BTreeMap<String, Bytes>,
}

/// Check an uploaded directory and read its spec. `files` maps relative paths to contents.
pub fn import(files: &BTreeMap<String, Bytes>) -> Result<Imported> {
    if let Some(gguf) = files.get(GGUF) {
        if files.len() > 1 {
            return Err(Error::Invalid(format!(
                "a GGUF import is the {GGUF} file alone"
            )));
        }
        return crate::gguf::import(gguf);
    }
    let config = json(files, CONFIG)?.ok_or_else(|| missing(CONFIG))?;
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if crate::llama::is_decoder(model_type) {
        return crate::llama::import(&config, files);
    }
    if model_type != "bert" {
        return Err(Error::Invalid(format!(
            "{CONFIG}: model_type {model_type:?} is not served; Kiln serves: {SERVED_TYPES}"
        )));
    }
    let text = |field: &str, default: &str| {
        config
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    let act = text("hidden_act", "gelu");
    if act != "gelu" {
        return Err(Error::Invalid(format!(
            "{CONFIG}: hidden_act {act:?} is not served; Kiln computes \"gelu\""
        )));
    }
    let position = text("position_embedding_type", "absolute");
    if position != "absolute" {
        return Err(Error::Invalid(format!(
            "{CONFIG}: position_embedding_type {position:?} is not served; Kiln computes \"absolute\""
        )));
    }
    let number = |field: &str| config_u32(&config, field);
    let max_position_embeddings = number("max_position_embeddings")?;
    let modules = files.get(MODULES).map(|b| &b[..]);
    let labels = labels(&config)?;
    // A classifier's head reads the `[CLS]` state through its pooler; nothing is scaled.
    let (pooling, normalize) = if labels.is_empty() {
        pooling(files, modules)?
    } else {
        (Pooling::Cls, false)
    };
    let max_seq_length = match json(files, SENTENCE_CONFIG)? {
        Some(st) => st
            .get("max_seq_length")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{SENTENCE_CONFIG}: max_seq_length is missing or not a whole number"
                ))
            })?,
        None => max_position_embeddings.min(512),
    };
    let bert = BertSpec {
        vocab_size: number("vocab_size")?,
        hidden_size: number("hidden_size")?,
        num_hidden_layers: number("num_hidden_layers")?,
        num_attention_heads: number("num_attention_heads")?,
        intermediate_size: number("intermediate_size")?,
        max_position_embeddings,
        type_vocab_size: number("type_vocab_size").unwrap_or(2),
        layer_norm_eps: config
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12),
        max_seq_length,
        pooling,
        normalize,
        labels,
    };
    bert.validate()?;
    let weights = files.get(WEIGHTS).ok_or_else(|| missing(WEIGHTS))?.clone();
    check_tensors(&bert, &weights)?;
    let tokenizer = files.get(TOKENIZER).ok_or_else(|| missing(TOKENIZER))?;
    match serde_json::from_slice::<Value>(tokenizer) {
        Ok(v) if v.get("model").is_some() => {}
        _ => {
            return Err(Error::Invalid(format!(
                "{TOKENIZER} is not a tokenizers file (JSON with a \"model\")"
            )));
        }
    }
    let mut kept = BTreeMap::new();
    kept.insert(TOKENIZER.to_owned(), tokenizer.clone());
    Ok(Imported {
        spec: ModelSpec::Bert(bert),
        weights,
        files: kept,
    })
}

fn missing(file: &str) -> Error {
    Error::Invalid(format!("{file} is missing from the model directory"))
}

/// A whole-number field of `config.json`; the error names it.
pub(crate) fn config_u32(config: &Value, field: &str) -> Result<u32> {
    config
        .get(field)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{CONFIG}: {field} is missing or not a whole number"
            ))
        })
}

/// A JSON file of the directory, if it was sent; the error names the file.
pub(crate) fn json(files: &BTreeMap<String, Bytes>, name: &str) -> Result<Option<Value>> {
    files
        .get(name)
        .map(|b| {
            serde_json::from_slice(b)
                .map_err(|e| Error::Invalid(format!("{name} is not valid JSON: {e}")))
        })
        .transpose()
}

/// Pooling and normalisation: from the sentence-transformers modules when there are any,
/// else the mean over tokens, not normalised.
fn pooling(files: &BTreeMap<String, Bytes>, modules: Option<&[u8]>) -> Result<(Pooling, bool)> {
    let Some(modules_bytes) = modules else {
        return Ok((Pooling::Mean, false));
    };
    let list: Value = serde_json::from_slice(modules_bytes)
        .map_err(|e| Error::Invalid(format!("{MODULES} is not valid JSON: {e}")))?;
    let types: Vec<&str> = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("type").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    for t in &types {
        let known = [".Transformer", ".Pooling", ".Normalize"];
        if !known.iter().any(|k| t.ends_with(k)) {
            return Err(Error::Invalid(format!(
                "{MODULES}: module {t:?} is not served; Kiln runs Transformer, Pooling and Normalize"
            )));
        }
    }
    let normalize = types.iter().any(|t| t.ends_with(".Normalize"));
    let path = pooling_path(Some(modules_bytes)).unwrap_or_else(|| DEFAULT_POOLING.to_owned());
    let Some(config) = json(files, &path)? else {
        return Ok((Pooling::Mean, normalize));
    };
    let on = |field: &str| config.get(field).and_then(Value::as_bool).unwrap_or(false);
    for unsupported in [
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ] {
        if on(unsupported) {
            return Err(Error::Invalid(format!(
                "{path}: {unsupported} is not served; Kiln pools by mean or [CLS]"
            )));
        }
    }
    let pooling = match (on("pooling_mode_mean_tokens"), on("pooling_mode_cls_token")) {
        (true, false) => Pooling::Mean,
        (false, true) => Pooling::Cls,
        (true, true) => {
            return Err(Error::Invalid(format!(
                "{path}: mean and [CLS] pooling together are not served; choose one"
            )));
        }
        (false, false) => {
            return Err(Error::Invalid(format!("{path}: no pooling mode is set")));
        }
    };
    Ok((pooling, normalize))
}

/// The architectures Kiln serves, for messages.
pub const SERVED_ARCHITECTURES: &str = "BertModel, BertForSequenceClassification";

/// A sequence classifier's labels from `config.json`: none for `BertModel`; for
/// `BertForSequenceClassification`, `id2label` in class order (`LABEL_i` where it is
/// absent, sized by `num_labels`).
fn labels(config: &Value) -> Result<Vec<String>> {
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let classifier = match architectures.as_slice() {
        [] | ["BertModel"] => false,
        ["BertForSequenceClassification"] => true,
        other => {
            return Err(Error::Invalid(format!(
                "{CONFIG}: architectures {other:?} is not served; Kiln serves {SERVED_ARCHITECTURES}"
            )));
        }
    };
    if !classifier {
        return Ok(Vec::new());
    }
    let by_id = config.get("id2label").and_then(Value::as_object);
    let count = match (by_id, config.get("num_labels").and_then(Value::as_u64)) {
        (Some(map), _) => map.len(),
        (None, Some(n)) => usize::try_from(n).unwrap_or(usize::MAX),
        (None, None) => 2,
    };
    if count == 0 || count > crate::spec::MAX_LABELS {
        return Err(Error::Invalid(format!(
            "{CONFIG}: a classifier needs 1 to {} labels, got {count}",
            crate::spec::MAX_LABELS
        )));
    }
    let mut labels = Vec::with_capacity(count);
    for i in 0..count {
        let label = match by_id {
            None => format!("LABEL_{i}"),
            Some(map) => map
                .get(&i.to_string())
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{CONFIG}: id2label has no string for class {i} (classes are numbered 0 to {})",
                        count - 1
                    ))
                })?
                .to_owned(),
        };
        labels.push(label);
    }
    Ok(labels)
}

/// A tensor's name in the checkpoint: the encoder's under `prefix`, the classifier head's
/// (`classifier.*`) at the top level.
pub fn checkpoint_name(prefix: &str, name: &str) -> String {
    if name.starts_with("classifier.") {
        name.to_owned()
    } else {
        format!("{prefix}{name}")
    }
}

/// The prefix the checkpoint's tensor names carry: none for `BertModel`, `bert.` for the
/// task models (`BertForSequenceClassification`, ...).
pub fn tensor_prefix(names: &[&str]) -> &'static str {
    if names.contains(&"bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

/// Every tensor a BERT encoder of `spec` needs, with its shape (Hugging Face's layout:
/// linear weights are `[out, in]`).
pub fn bert_tensors(spec: &BertSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size as usize;
    let i = spec.intermediate_size as usize;
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".to_owned(),
            vec![spec.vocab_size as usize, h],
        ),
        (
            "embeddings.position_embeddings.weight".to_owned(),
            vec![spec.max_position_embeddings as usize, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".to_owned(),
            vec![spec.type_vocab_size as usize, h],
        ),
        ("embeddings.LayerNorm.weight".to_owned(), vec![h]),
        ("embeddings.LayerNorm.bias".to_owned(), vec![h]),
    ];
    for l in 0..spec.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    let n = spec.labels.len();
    if n > 0 {
        out.push(("pooler.dense.weight".to_owned(), vec![h, h]));
        out.push(("pooler.dense.bias".to_owned(), vec![h]));
        out.push(("classifier.weight".to_owned(), vec![n, h]));
        out.push(("classifier.bias".to_owned(), vec![n]));
    }
    out
}

/// Check that the weights hold every tensor of `spec`, FP32, in its shape.
fn check_tensors(spec: &BertSpec, weights: &[u8]) -> Result<()> {
    let file = SafeTensors::deserialize(weights)
        .map_err(|e| Error::Invalid(format!("{WEIGHTS} is not a safetensors file: {e}")))?;
    let names = file.names();
    let names: Vec<&str> = names.iter().map(|s| &s[..]).collect();
    let prefix = tensor_prefix(&names);
    for (name, shape) in bert_tensors(spec) {
        let full = checkpoint_name(prefix, &name);
        let view = file
            .tensor(&full)
            .map_err(|_| Error::Invalid(format!("{WEIGHTS}: tensor {full} is missing")))?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::Invalid(format!(
                "{WEIGHTS}: tensor {full} is {:?}; Kiln reads F32",
                view.dtype()
            )));
        }
        if view.shape() != shape.as_slice() {
            return Err(Error::Invalid(format!(
                "{WEIGHTS}: tensor {full} has shape {:?}; {CONFIG} makes it {shape:?}",
                view.shape()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config(model_type: &str) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "model_type": model_type, "vocab_size": 10, "hidden_size": 4,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
                "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                "hidden_act": "gelu"
            })
            .to_string(),
        )
    }

    fn tiny_weights(skip: Option<&str>, reshape: Option<&str>) -> Bytes {
        tiny_checkpoint(&[], "", skip, reshape)
    }

    /// A zero checkpoint of the tiny spec with `labels`, encoder tensors under `prefix`.
    fn tiny_checkpoint(
        labels: &[&str],
        prefix: &str,
        skip: Option<&str>,
        reshape: Option<&str>,
    ) -> Bytes {
        let spec = BertSpec {
            vocab_size: 10,
            hidden_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 8,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            max_seq_length: 16,
            pooling: Pooling::Mean,
            normalize: false,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        };
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = bert_tensors(&spec)
            .into_iter()
            .filter(|(n, _)| Some(n.as_str()) != skip)
            .map(|(n, mut shape)| {
                if Some(n.as_str()) == reshape {
                    shape[0] += 1;
                }
                let bytes = vec![0u8; shape.iter().product::<usize>() * 4];
                (checkpoint_name(prefix, &n), shape, bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        Bytes::from(safetensors::serialize(views, None).unwrap())
    }

    fn directory(config: Bytes, weights: Bytes) -> BTreeMap<String, Bytes> {
        let mut files = BTreeMap::new();
        files.insert(CONFIG.to_owned(), config);
        files.insert(WEIGHTS.to_owned(), weights);
        files.insert(
            TOKENIZER.to_owned(),
            Bytes::from_static(br#"{"model": {"type": "WordPiece"}}"#),
        );
        files
    }

    #[test]
    fn a_bert_directory_imports_with_sentence_transformers_settings() {
        let mut files = directory(tiny_config("bert"), tiny_weights(None, None));
        let plain = import(&files).unwrap();
        let ModelSpec::Bert(b) = &plain.spec else {
            panic!("not bert")
        };
        assert_eq!(
            (b.pooling, b.normalize, b.max_seq_length),
            (Pooling::Mean, false, 16)
        );
        assert!(plain.files.contains_key(TOKENIZER));
        files.insert(
            MODULES.into(),
            Bytes::from_static(
                br#"[{"type": "sentence_transformers.models.Transformer", "path": ""},
                    {"type": "sentence_transformers.models.Pooling", "path": "pool"},
                    {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}]"#,
            ),
        );
        files.insert(
            "pool/config.json".into(),
            Bytes::from_static(br#"{"pooling_mode_cls_token": true}"#),
        );
        files.insert(
            SENTENCE_CONFIG.into(),
            Bytes::from_static(br#"{"max_seq_length": 8}"#),
        );
        assert_eq!(
            wanted_files(files.get(MODULES).map(|b| &b[..]))
                .last()
                .unwrap(),
            "pool/config.json"
        );
        let st = import(&files).unwrap();
        let ModelSpec::Bert(b) = &st.spec else {
            panic!("not bert")
        };
        assert_eq!(
            (b.pooling, b.normalize, b.max_seq_length),
            (Pooling::Cls, true, 8)
        );
    }

    fn classifier_config(extra: serde_json::Value) -> Bytes {
        let mut config: serde_json::Value = serde_json::from_slice(&tiny_config("bert")).unwrap();
        config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        Bytes::from(config.to_string())
    }

    #[test]
    fn a_sequence_classifier_imports_with_its_labels_in_class_order() {
        let files = directory(
            classifier_config(serde_json::json!({"id2label": {"1": "POS", "0": "NEG"}})),
            tiny_checkpoint(&["NEG", "POS"], "bert.", None, None),
        );
        let ModelSpec::Bert(b) = import(&files).unwrap().spec else {
            panic!("not bert")
        };
        assert_eq!(b.labels, vec!["NEG", "POS"]);
        assert!(b.is_classifier());
        assert_eq!((b.pooling, b.normalize), (Pooling::Cls, false));
        // The head must be there, and sized by the labels.
        let headless = directory(
            classifier_config(serde_json::json!({"id2label": {"0": "NEG", "1": "POS"}})),
            tiny_weights(None, None),
        );
        let e = import(&headless).unwrap_err().to_string();
        assert!(
            e.contains("tensor bert.embeddings") || e.contains("pooler"),
            "{e}"
        );
        let three = directory(
            classifier_config(serde_json::json!({"num_labels": 3})),
            tiny_checkpoint(&["a", "b"], "bert.", None, None),
        );
        let e = import(&three).unwrap_err().to_string();
        assert!(e.contains("classifier.weight has shape [2, 4]"), "{e}");
        let gap = directory(
            classifier_config(serde_json::json!({"id2label": {"0": "a", "2": "c"}})),
            tiny_checkpoint(&["a", "b"], "bert.", None, None),
        );
        let e = import(&gap).unwrap_err().to_string();
        assert!(e.contains("id2label has no string for class 1"), "{e}");
        let other = directory(
            classifier_config(serde_json::json!({"architectures": ["BertForMaskedLM"]})),
            tiny_weights(None, None),
        );
        let e = import(&other).unwrap_err().to_string();
        assert!(e.contains("BertForMaskedLM"), "{e}");
    }

    #[test]
    fn what_kiln_cannot_serve_is_refused_naming_it() {
        let refusals = [
            (
                directory(tiny_config("gpt2"), tiny_weights(None, None)),
                "model_type \"gpt2\" is not served",
            ),
            (
                directory(
                    tiny_config("bert"),
                    tiny_weights(Some("encoder.layer.0.output.dense.bias"), None),
                ),
                "tensor encoder.layer.0.output.dense.bias is missing",
            ),
            (
                directory(
                    tiny_config("bert"),
                    tiny_weights(None, Some("embeddings.word_embeddings.weight")),
                ),
                "has shape [11, 4]; config.json makes it [10, 4]",
            ),
            (
                {
                    let mut f = directory(tiny_config("bert"), tiny_weights(None, None));
                    f.remove(TOKENIZER);
                    f
                },
                "tokenizer.json is missing",
            ),
        ];
        for (files, needle) in refusals {
            let e = import(&files).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
