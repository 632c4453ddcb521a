//! `kiln train FILE`: job files (JSON or YAML) read into a job, submitted, and followed
//! with a live progress bar per epoch. `kiln jobs …` is in [`crate::jobs`], `kiln datasets
//! …` in [`crate::datasets`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::spec::{ModelSpec, Signature};
use kiln_gateway::convert::{signature_to_proto, spec_to_proto};
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_client::TrainingClient;
use kiln_proto::kiln::v1::training_event::Event;
use serde::Deserialize;

/// Where a job's rows come from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum DataSource {
    /// A CSV file with a header row; `label` names the label column, every other column
    /// is a feature (paths are relative to the job file).
    Csv {
        /// The file.
        path: PathBuf,
        /// The label column's name.
        label: String,
    },
    /// Two NumPy `.npy` files: features (rows × columns) and labels (paths are relative to
    /// the job file).
    Npy {
        /// The features file.
        features: PathBuf,
        /// The labels file.
        labels: PathBuf,
    },
    /// A dataset uploaded with `kiln datasets upload`.
    Dataset {
        /// Its id.
        id: String,
    },
    /// Rows given in the job file.
    Inline {
        /// Feature rows.
        features: Vec<Vec<f32>>,
        /// One label per row (or a row of labels for several outputs).
        labels: Vec<serde_json::Value>,
    },
}

/// Optimizer settings in a job file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum OptimizerFile {
    /// SGD.
    Sgd {
        /// Learning rate.
        learning_rate: f64,
        /// Momentum.
        #[serde(default)]
        momentum: f64,
        /// L2 penalty.
        #[serde(default)]
        weight_decay: f64,
    },
    /// Adam.
    Adam {
        /// Learning rate.
        learning_rate: f64,
        /// β1 (default 0.9).
        #[serde(default)]
        beta1: f64,
        /// β2 (default 0.999).
        #[serde(default)]
        beta2: f64,
        /// ε (default 1e-7).
        #[serde(default)]
        epsilon: f64,
        /// L2 penalty.
        #[serde(default)]
        weight_decay: f64,
    },
}

/// Early stopping in a job file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingFile {
    /// `val_loss` or `val_accuracy`.
    #[serde(default)]
    pub metric: String,
    /// Epochs without improvement.
    pub patience: u32,
}

/// A job file for `kiln train` (YAML or JSON). Every field is documented in docs/training.md.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// Model the result is registered under.
    pub model_name: String,
    /// Architecture of a new model.
    #[serde(default)]
    pub spec: Option<ModelSpec>,
    /// Tensor names of a new model.
    #[serde(default)]
    pub signature: Option<Signature>,
    /// Start from `name:version` instead.
    #[serde(default)]
    pub continue_from: Option<String>,
    /// The rows.
    pub data: DataSource,
    /// Standardise features.
    #[serde(default)]
    pub standardize: bool,
    /// `binary_cross_entropy`, `cross_entropy` or `mean_squared_error` (default: fits the task).
    #[serde(default)]
    pub loss: Option<String>,
    /// The optimizer (default Adam, learning rate 0.001).
    #[serde(default)]
    pub optimizer: Option<OptimizerFile>,
    /// Epochs.
    pub epochs: u32,
    /// Rows per step.
    pub batch_size: u32,
    /// Keep the row order.
    #[serde(default)]
    pub no_shuffle: bool,
    /// Seed of the initial weights, the split and the shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Fraction held out for validation.
    #[serde(default)]
    pub validation_fraction: f64,
    /// Early stopping.
    #[serde(default)]
    pub early_stopping: Option<EarlyStoppingFile>,
    /// Alias to set on success.
    #[serde(default)]
    pub alias: Option<String>,
    /// Store a checkpoint every this many epochs (0: none).
    #[serde(default)]
    pub checkpoint_every: u32,
    /// Rows to validate on instead of a split.
    #[serde(default)]
    pub validation_data: Option<DataSource>,
    /// Rows the result is measured on once, at the end.
    #[serde(default)]
    pub test_data: Option<DataSource>,
    /// Workers that train together (data parallelism); default 1.
    #[serde(default)]
    pub workers: u32,
}

/// Flags that override the job file.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--epochs`.
    pub epochs: Option<u32>,
    /// `--batch-size`.
    pub batch_size: Option<u32>,
    /// `--learning-rate`.
    pub learning_rate: Option<f64>,
    /// `--workers`.
    pub workers: Option<u32>,
    /// `--model`.
    pub model_name: Option<String>,
    /// `--seed`.
    pub seed: Option<u64>,
}

/// Read a CSV file of numbers with a header row into (features, labels, rows); errors name
/// the row (1 = the first data row) and the column.
pub fn read_csv(path: &Path, label: &str) -> anyhow::Result<(Vec<f32>, Vec<f32>, u32)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let parsed = kiln_core::training::parse_csv(&text, label)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((parsed.features, parsed.labels, parsed.rows as u32))
}

/// Read a pair of `.npy` files into (features, labels, rows).
pub fn read_npy(features: &Path, labels: &Path) -> anyhow::Result<(Vec<f32>, Vec<f32>, u32)> {
    let x =
        std::fs::read(features).with_context(|| format!("cannot read {}", features.display()))?;
    let y = std::fs::read(labels).with_context(|| format!("cannot read {}", labels.display()))?;
    let parsed = kiln_core::training::parse_npy(&x, &y)
        .map_err(|e| anyhow::anyhow!("{} / {}: {e}", features.display(), labels.display()))?;
    Ok((parsed.features, parsed.labels, parsed.rows as u32))
}

/// Rows from a job file's data source: inline rows for the request, or a dataset id.
fn rows_of(
    source: DataSource,
    base: &Path,
    field: &str,
) -> anyhow::Result<(Option<pb::InlineData>, String)> {
    let inline = |(features, labels, rows)| {
        Ok((
            Some(pb::InlineData {
                features,
                labels,
                rows,
            }),
            String::new(),
        ))
    };
    match source {
        DataSource::Csv { path, label } => inline(read_csv(&base.join(path), &label)?),
        DataSource::Npy { features, labels } => {
            inline(read_npy(&base.join(features), &base.join(labels))?)
        }
        DataSource::Dataset { id } => Ok((None, id)),
        DataSource::Inline { features, labels } => {
            let rows = features.len() as u32;
            let mut flat_labels = Vec::new();
            for (i, l) in labels.iter().enumerate() {
                match l {
                    serde_json::Value::Array(values) => {
                        for v in values {
                            flat_labels.push(v.as_f64().with_context(|| {
                                format!("{field}.labels[{i}] holds a non-number")
                            })? as f32);
                        }
                    }
                    v => flat_labels.push(
                        v.as_f64()
                            .with_context(|| format!("{field}.labels[{i}] is not a number"))?
                            as f32,
                    ),
                }
            }
            inline((features.into_iter().flatten().collect(), flat_labels, rows))
        }
    }
}

/// Build the wire spec of a job file.
pub fn job_spec(file: JobFile, base: &Path, o: &Overrides) -> anyhow::Result<pb::TrainingJobSpec> {
    let (data, dataset_id) = rows_of(file.data, base, "data")?;
    let (validation_data, validation_dataset_id) = match file.validation_data {
        Some(source) => rows_of(source, base, "validation_data")?,
        None => (None, String::new()),
    };
    let (test_data, test_dataset_id) = match file.test_data {
        Some(source) => rows_of(source, base, "test_data")?,
        None => (None, String::new()),
    };
    let loss = match file.loss.as_deref() {
        None | Some("") => pb::LossKind::Unspecified,
        Some("binary_cross_entropy") => pb::LossKind::BinaryCrossEntropy,
        Some("cross_entropy") => pb::LossKind::CrossEntropy,
        Some("mean_squared_error") => pb::LossKind::MeanSquaredError,
        Some(other) => {
            bail!("loss {other:?} is not binary_cross_entropy, cross_entropy or mean_squared_error")
        }
    };
    let mut optimizer = file.optimizer.map(|o| match o {
        OptimizerFile::Sgd {
            learning_rate,
            momentum,
            weight_decay,
        } => pb::training_job_spec::Optimizer::Sgd(pb::Sgd {
            learning_rate,
            momentum,
            weight_decay,
        }),
        OptimizerFile::Adam {
            learning_rate,
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => pb::training_job_spec::Optimizer::Adam(pb::Adam {
            learning_rate,
            beta1,
            beta2,
            epsilon,
            weight_decay,
        }),
    });
    if let Some(lr) = o.learning_rate {
        optimizer = Some(match optimizer {
            Some(pb::training_job_spec::Optimizer::Sgd(s)) => {
                pb::training_job_spec::Optimizer::Sgd(pb::Sgd {
                    learning_rate: lr,
                    ..s
                })
            }
            Some(pb::training_job_spec::Optimizer::Adam(a)) => {
                pb::training_job_spec::Optimizer::Adam(pb::Adam {
                    learning_rate: lr,
                    ..a
                })
            }
            None => pb::training_job_spec::Optimizer::Adam(pb::Adam {
                learning_rate: lr,
                ..Default::default()
            }),
        });
    }
    Ok(pb::TrainingJobSpec {
        model_name: o.model_name.clone().unwrap_or(file.model_name),
        spec: file.spec.as_ref().map(spec_to_proto),
        signature: file.signature.as_ref().map(signature_to_proto),
        continue_from: file.continue_from.unwrap_or_default(),
        seed: o.seed.unwrap_or(file.seed),
        data,
        dataset_id,
        checkpoint_every: file.checkpoint_every,
        standardize: file.standardize,
        loss: loss as i32,
        optimizer,
        epochs: o.epochs.unwrap_or(file.epochs),
        batch_size: o.batch_size.unwrap_or(file.batch_size),
        no_shuffle: file.no_shuffle,
        validation_fraction: file.validation_fraction,
        early_stopping: file.early_stopping.map(|e| pb::EarlyStopping {
            metric: e.metric,
            patience: e.patience,
        }),
        alias: file.alias.unwrap_or_default(),
        validation_data,
        validation_dataset_id,
        test_data,
        test_dataset_id,
        workers: o.workers.unwrap_or(file.workers),
    })
}

/// Read a job file: YAML when its name ends in `.yaml` or `.yml`, JSON otherwise.
pub fn read_job_file(path: &Path) -> anyhow::Result<JobFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let yaml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if yaml {
        // YAML is another spelling of the same document: read it as a tree, then as a job
        // (so `spec: {mlp: …}` maps work as in JSON, without YAML's `!tags`).
        let tree: serde_json::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        serde_json::from_value(tree)
            .with_context(|| format!("{} is not a valid job file", path.display()))
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid job file", path.display()))
    }
}

pub(crate) async fn client(addr: &str) -> anyhow::Result<TrainingClient<crate::client::Conn>> {
    let channel = crate::client::channel(addr).await?;
    Ok(TrainingClient::new(channel).max_encoding_message_size(256 * 1024 * 1024))
}

pub(crate) fn metrics_line(m: &pb::EpochMetrics) -> String {
    let mut s = format!("loss {:.4}", m.train_loss);
    if let Some(a) = m.train_accuracy {
        s.push_str(&format!(" acc {a:.4}"));
    }
    if let Some(l) = m.validation_loss {
        s.push_str(&format!(" val_loss {l:.4}"));
    }
    if let Some(a) = m.validation_accuracy {
        s.push_str(&format!(" val_acc {a:.4}"));
    }
    s.push_str(&format!(" {:.0} samples/s", m.samples_per_second));
    s
}

/// Follow a job with a progress bar until it ends; returns its final event.
pub async fn watch(addr: &str, id: &str, epochs: u32) -> anyhow::Result<pb::TrainingEvent> {
    let mut client = client(addr).await?;
    let mut events = client
        .watch_training_job(pb::WatchTrainingJobRequest { id: id.into() })
        .await
        .map_err(crate::client::status)?
        .into_inner();
    let bar = ProgressBar::new(u64::from(epochs));
    bar.set_style(
        ProgressStyle::with_template("epoch {pos:>4}/{len} [{bar:30}] {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    while let Some(e) = events.message().await.map_err(crate::client::status)? {
        match &e.event {
            Some(Event::Queued(_)) => bar.set_message("queued"),
            Some(Event::Started(worker)) => bar.set_message(format!("started on {worker}")),
            Some(Event::Resumed(r)) => {
                bar.set_position(u64::from(r.from_epoch));
                let line = format!(
                    "{}; going on after epoch {} (its checkpoint)",
                    r.reason, r.from_epoch
                );
                if bar.is_hidden() {
                    crate::say!("{line}");
                } else {
                    bar.println(line);
                }
            }
            Some(Event::Epoch(m)) => {
                bar.set_position(u64::from(m.epoch));
                bar.set_message(metrics_line(m));
                if !bar.is_hidden() {
                    continue;
                }
                // Not a terminal: one line per epoch instead of a bar.
                crate::say!("epoch {:>4}/{epochs} {}", m.epoch, metrics_line(m));
            }
            Some(Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_)) => {
                bar.finish();
                return Ok(e);
            }
            None => {}
        }
    }
    bar.abandon();
    bail!("the job's event stream ended before the job did")
}

pub(crate) fn describe_end(e: &pb::TrainingEvent) -> anyhow::Result<String> {
    match &e.event {
        Some(Event::Completed(v)) => Ok(format!(
            "completed: {} version {} (sha256 {})",
            v.model, v.version, v.sha256
        )),
        Some(Event::Failed(reason)) => bail!("the job failed: {reason}"),
        Some(Event::Cancelled(reason)) => bail!("the job was cancelled: {reason}"),
        _ => bail!("the job ended without a result"),
    }
}

/// `kiln train FILE`: submit, then follow it to the end.
pub async fn train(
    addr: &str,
    path: &Path,
    overrides: &Overrides,
    key: Option<String>,
    detach: bool,
) -> anyhow::Result<String> {
    let file = read_job_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let spec = job_spec(file, base, overrides)?;
    let epochs = spec.epochs;
    let job = client(addr)
        .await?
        .submit_training_job(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: key.unwrap_or_default(),
        })
        .await
        .map_err(crate::client::status)?
        .into_inner();
    crate::say!("submitted job {}", job.id);
    if detach {
        return Ok(job.id);
    }
    let end = watch(addr, &job.id, epochs).await?;
    describe_end(&end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn csv_rows_split_into_features_and_the_named_label() {
        let (_d, path) = csv("a,y,b\n1,0,2\n3,1,4.5\n");
        let (features, labels, rows) = read_csv(&path, "y").unwrap();
        assert_eq!(
            (features, labels, rows),
            (vec![1.0, 2.0, 3.0, 4.5], vec![0.0, 1.0], 2)
        );
    }

    #[test]
    fn bad_csv_cells_name_the_row_and_column() {
        let cases = [
            ("a,y\n1,0\nx,1\n", "y", "row 2, column \"a\""),
            ("a,y\n1,0\n2,nan\n", "y", "row 2, column \"y\""),
            ("a,y\n1,0,3\n", "y", "row 1 has 3 cells"),
            ("a,y\n1,0\n", "label", "no column named \"label\""),
            ("a,y\n", "y", "no rows"),
            ("", "y", "empty"),
        ];
        for (text, label, needle) in cases {
            let (_d, path) = csv(text);
            let err = read_csv(&path, label).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    /// A `.npy` file as NumPy lays it out (version 1, header padded to 64 bytes).
    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn yaml_job_files_name_every_source_of_rows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.csv"), "a,b,y\n1,2,0\n3,4,1\n").unwrap();
        let x: Vec<u8> = [0.5f32, 1.5, 2.5, 3.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(dir.path().join("x.npy"), npy("<f4", "(2, 2)", &x)).unwrap();
        std::fs::write(dir.path().join("y.npy"), npy("|u1", "(2,)", &[1, 0])).unwrap();
        let path = dir.path().join("job.yaml");
        std::fs::write(
            &path,
            "model_name: tiny
spec:
  mlp:
    input_width: 2
    hidden: [4]
    activation: relu
    output_width: 1
    task: binary_classification
data:
  csv: {path: train.csv, label: y}
validation_data:
  npy: {features: x.npy, labels: y.npy}
test_data:
  dataset: {id: ds-0123}
optimizer:
  sgd: {learning_rate: 0.1, momentum: 0.9}
epochs: 5
batch_size: 2
",
        )
        .unwrap();
        let file = read_job_file(&path).unwrap();
        let spec = job_spec(
            file,
            dir.path(),
            &Overrides {
                epochs: Some(7),
                ..Overrides::default()
            },
        )
        .unwrap();
        let data = spec.data.unwrap();
        assert_eq!(
            (data.features, data.labels),
            (vec![1.0, 2.0, 3.0, 4.0], vec![0.0, 1.0])
        );
        let validation = spec.validation_data.unwrap();
        assert_eq!(validation.features, vec![0.5, 1.5, 2.5, 3.5]);
        assert_eq!((validation.labels, validation.rows), (vec![1.0, 0.0], 2));
        assert_eq!(spec.test_dataset_id, "ds-0123");
        assert!(spec.test_data.is_none());
        assert_eq!(spec.epochs, 7, "the flag overrides the file");
        assert!(matches!(
            spec.optimizer,
            Some(pb::training_job_spec::Optimizer::Sgd(pb::Sgd { momentum, .. })) if momentum == 0.9
        ));

        // A field the job file does not know is an error that names it.
        std::fs::write(&path, "model_name: m\nepochs: 1\nbatch_size: 1\nepoch: 3\n").unwrap();
        let err = format!("{:#}", read_job_file(&path).unwrap_err());
        assert!(err.contains("unknown field `epoch`"), "{err}");
    }
}
