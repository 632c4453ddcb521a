//! prost types stop at the service edges: conversions between the wire messages of
//! `kiln.v1` and the registry's domain types, shared by the gateway and the scheduler.

use crate::records::VersionRecord;
use crate::spec::{Activation, MlpSpec, ModelSpec, Pooling, Signature, Task};
use kiln_proto::kiln::v1 as pb;

use crate::{Error, Result};

/// A wire spec to a domain spec; the error names the field.
pub fn spec_from_proto(spec: Option<&pb::ArchitectureSpec>) -> Result<ModelSpec> {
    let mlp = match spec.and_then(|s| s.family.as_ref()) {
        Some(pb::architecture_spec::Family::Mlp(mlp)) => mlp,
        Some(pb::architecture_spec::Family::Bert(_)) => {
            return Err(Error::Invalid(
                "spec.bert: encoders are imported from a Hugging Face directory (ImportModel, `kiln models import`), not created".into(),
            ));
        }
        Some(pb::architecture_spec::Family::Llama(_)) => {
            return Err(Error::Invalid(
                "spec.llama: decoders are imported from a Hugging Face directory or a GGUF file (ImportModel, `kiln models import`), not created".into(),
            ));
        }
        None => return Err(Error::Invalid("spec is missing: set spec.mlp".into())),
    };
    let task = match pb::Task::try_from(mlp.task) {
        Ok(pb::Task::BinaryClassification) => Task::BinaryClassification,
        Ok(pb::Task::MulticlassClassification) => Task::MulticlassClassification,
        Ok(pb::Task::Regression) => Task::Regression,
        _ => {
            return Err(Error::Invalid(format!(
                "spec.mlp.task must be binary_classification, multiclass_classification or regression (got {})",
                mlp.task
            )));
        }
    };
    let activation = match pb::Activation::try_from(mlp.activation) {
        Ok(pb::Activation::Unspecified | pb::Activation::Relu) => Activation::Relu,
        Ok(pb::Activation::Tanh) => Activation::Tanh,
        Ok(pb::Activation::Sigmoid) => Activation::Sigmoid,
        Ok(pb::Activation::Gelu) => Activation::Gelu,
        Err(_) => {
            return Err(Error::Invalid(format!(
                "spec.mlp.activation {} is not a known activation",
                mlp.activation
            )));
        }
    };
    let spec = ModelSpec::Mlp(MlpSpec {
        input_width: mlp.input_width,
        hidden: mlp.hidden.clone(),
        activation,
        output_width: mlp.output_width,
        task,
    });
    spec.validate()?;
    Ok(spec)
}

/// A domain spec on the wire.
pub fn spec_to_proto(spec: &ModelSpec) -> pb::ArchitectureSpec {
    let mlp = match spec {
        ModelSpec::Mlp(mlp) => mlp,
        ModelSpec::Llama(l) => {
            return pb::ArchitectureSpec {
                family: Some(pb::architecture_spec::Family::Llama(pb::LlamaSpec {
                    vocab_size: l.vocab_size,
                    hidden_size: l.hidden_size,
                    intermediate_size: l.intermediate_size,
                    num_hidden_layers: l.num_hidden_layers,
                    num_attention_heads: l.num_attention_heads,
                    num_key_value_heads: l.num_key_value_heads,
                    rms_norm_eps: l.rms_norm_eps,
                    rope_theta: l.rope_theta,
                    max_position_embeddings: l.max_position_embeddings,
                    tie_word_embeddings: l.tie_word_embeddings,
                    bos_token_id: l.bos_token_id,
                    add_bos_token: l.add_bos_token,
                    eos_token_ids: l.eos_token_ids.clone(),
                })),
            };
        }
        ModelSpec::Bert(b) => {
            return pb::ArchitectureSpec {
                family: Some(pb::architecture_spec::Family::Bert(pb::BertSpec {
                    vocab_size: b.vocab_size,
                    hidden_size: b.hidden_size,
                    num_hidden_layers: b.num_hidden_layers,
                    num_attention_heads: b.num_attention_heads,
                    intermediate_size: b.intermediate_size,
                    max_position_embeddings: b.max_position_embeddings,
                    type_vocab_size: b.type_vocab_size,
                    layer_norm_eps: b.layer_norm_eps,
                    max_seq_length: b.max_seq_length,
                    pooling: match b.pooling {
                        Pooling::Mean => "mean".into(),
                        Pooling::Cls => "cls".into(),
                    },
                    normalize: b.normalize,
                    labels: b.labels.clone(),
                })),
            };
        }
    };
    pb::ArchitectureSpec {
        family: Some(pb::architecture_spec::Family::Mlp(pb::MlpSpec {
            input_width: mlp.input_width,
            hidden: mlp.hidden.clone(),
            activation: match mlp.activation {
                Activation::Relu => pb::Activation::Relu,
                Activation::Tanh => pb::Activation::Tanh,
                Activation::Sigmoid => pb::Activation::Sigmoid,
                Activation::Gelu => pb::Activation::Gelu,
            } as i32,
            output_width: mlp.output_width,
            task: match mlp.task {
                Task::BinaryClassification => pb::Task::BinaryClassification,
                Task::MulticlassClassification => pb::Task::MulticlassClassification,
                Task::Regression => pb::Task::Regression,
            } as i32,
        })),
    }
}

/// A wire signature, with defaults for empty names.
pub fn signature_from_proto(sig: Option<&pb::Signature>) -> Result<Signature> {
    let mut signature = Signature::default();
    if let Some(sig) = sig {
        if !sig.input_name.is_empty() {
            signature.input_name = sig.input_name.clone();
        }
        if !sig.output_name.is_empty() {
            signature.output_name = sig.output_name.clone();
        }
    }
    signature.validate()?;
    Ok(signature)
}

/// A domain signature on the wire.
pub fn signature_to_proto(sig: &Signature) -> pb::Signature {
    pb::Signature {
        input_name: sig.input_name.clone(),
        output_name: sig.output_name.clone(),
    }
}

/// A version record on the wire.
pub fn version_to_proto(
    v: &VersionRecord,
    spec: &ModelSpec,
    signature: &Signature,
    state: &str,
) -> pb::ModelVersion {
    pb::ModelVersion {
        model: v.model.clone(),
        version: v.version,
        sha256: v.artifact.sha256.clone(),
        size_bytes: v.artifact.size,
        artifact_uri: v.artifact.uri.clone(),
        created_unix_ms: v.created_unix_ms,
        spec: Some(spec_to_proto(spec)),
        signature: Some(signature_to_proto(signature)),
        source: v.source.clone(),
        state: state.to_owned(),
        metrics: v.metrics.iter().map(|(k, m)| (k.clone(), *m)).collect(),
    }
}

/// An epoch report from the wire.
pub fn epoch_from_proto(m: &pb::EpochMetrics) -> crate::training::EpochReport {
    crate::training::EpochReport {
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        validation_loss: m.validation_loss,
        validation_accuracy: m.validation_accuracy,
        samples_per_second: m.samples_per_second,
        elapsed_ms: m.elapsed_ms,
    }
}

/// An epoch report on the wire.
pub fn epoch_to_proto(r: &crate::training::EpochReport) -> pb::EpochMetrics {
    pb::EpochMetrics {
        epoch: r.epoch,
        train_loss: r.train_loss,
        train_accuracy: r.train_accuracy,
        validation_loss: r.validation_loss,
        validation_accuracy: r.validation_accuracy,
        samples_per_second: r.samples_per_second,
        elapsed_ms: r.elapsed_ms,
    }
}

/// Wire sampling parameters to the domain's, checked; absent means the defaults.
pub fn sampling_from_proto(
    s: Option<&pb::SamplingParameters>,
) -> Result<crate::generation::Sampling> {
    let defaults = crate::generation::Sampling::default();
    let Some(s) = s else {
        return Ok(defaults);
    };
    let sampling = crate::generation::Sampling {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        top_k: s.top_k,
        max_tokens: s.max_tokens,
        stop: s.stop.clone(),
        seed: s.seed,
        ignore_eos: s.ignore_eos,
        logprobs: s.logprobs,
    };
    sampling.validate()?;
    Ok(sampling)
}

/// Domain sampling parameters on the wire.
pub fn sampling_to_proto(s: &crate::generation::Sampling) -> pb::SamplingParameters {
    pb::SamplingParameters {
        temperature: Some(s.temperature),
        top_p: Some(s.top_p),
        top_k: s.top_k,
        max_tokens: s.max_tokens,
        stop: s.stop.clone(),
        seed: s.seed,
        ignore_eos: s.ignore_eos,
        logprobs: s.logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_missing_fields_are_named() {
        let wire = pb::ArchitectureSpec {
            family: Some(pb::architecture_spec::Family::Mlp(pb::MlpSpec {
                input_width: 10,
                hidden: vec![16, 8],
                activation: pb::Activation::Gelu as i32,
                output_width: 3,
                task: pb::Task::MulticlassClassification as i32,
            })),
        };
        let spec = spec_from_proto(Some(&wire)).unwrap();
        assert_eq!(spec_to_proto(&spec), wire);
        let err = spec_from_proto(None).unwrap_err().to_string();
        assert!(err.contains("spec"), "{err}");
        let mut no_task = wire.clone();
        if let Some(pb::architecture_spec::Family::Mlp(m)) = &mut no_task.family {
            m.task = 0;
        }
        let err = spec_from_proto(Some(&no_task)).unwrap_err().to_string();
        assert!(err.contains("spec.mlp.task"), "{err}");
    }
}
