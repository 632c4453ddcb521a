//! What a training job is, as data: the loss, the optimizer, the schedule, and what each
//! epoch measured. Workers run it; the scheduler records it; the API carries it.

use serde::{Deserialize, Serialize};

use crate::spec::Task;

/// The loss minimised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Binary cross-entropy on sigmoid outputs (labels 0 or 1 per output).
    BinaryCrossEntropy,
    /// Cross-entropy on softmax outputs (one label column: the class index).
    CrossEntropy,
    /// Mean squared error of the outputs.
    MeanSquaredError,
}

impl Loss {
    /// The loss that fits a task.
    pub fn for_task(task: Task) -> Self {
        match task {
            Task::BinaryClassification => Loss::BinaryCrossEntropy,
            Task::MulticlassClassification => Loss::CrossEntropy,
            Task::Regression => Loss::MeanSquaredError,
        }
    }
}

/// The optimizer and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Stochastic gradient descent: `v = momentum·v + g + weight_decay·w; w -= lr·v`.
    Sgd {
        /// Learning rate.
        learning_rate: f64,
        /// Momentum (0: plain SGD).
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// Adam, with bias correction; weight decay is an L2 penalty added to the gradient.
    Adam {
        /// Learning rate.
        learning_rate: f64,
        /// Decay of the first moment.
        beta1: f64,
        /// Decay of the second moment.
        beta2: f64,
        /// Added to the denominator.
        epsilon: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
}

impl Optimizer {
    /// The learning rate.
    pub fn learning_rate(&self) -> f64 {
        match self {
            Optimizer::Sgd { learning_rate, .. } | Optimizer::Adam { learning_rate, .. } => {
                *learning_rate
            }
        }
    }
}

/// What early stopping watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Validation loss (lower is better).
    ValidationLoss,
    /// Validation accuracy (higher is better).
    ValidationAccuracy,
}

/// Stop when the metric has not improved for `patience` epochs; the best weights are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// The metric.
    pub metric: StopMetric,
    /// Epochs without improvement before stopping (at least 1).
    pub patience: u32,
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Passes over the training split.
    pub epochs: u32,
    /// Rows per gradient step.
    pub batch_size: u32,
    /// Seed of the split and of the shuffles.
    pub seed: u64,
    /// Shuffle the training rows every epoch.
    pub shuffle: bool,
    /// The loss.
    pub loss: Loss,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Fraction of rows held out for validation, in [0, 0.9].
    pub validation_fraction: f64,
    /// Standardise features with the training split's mean and standard deviation.
    pub standardize: bool,
    /// Early stopping, if any (needs a validation split).
    pub early_stopping: Option<EarlyStopping>,
}

/// Limits on what one job may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingLimits {
    /// Most epochs.
    pub max_epochs: u32,
    /// Most rows.
    pub max_rows: usize,
}

impl Default for TrainingLimits {
    fn default() -> Self {
        Self {
            // Every epoch's report is kept in the job's record, which stays under 256 KiB.
            max_epochs: 1_000,
            max_rows: 10_000_000,
        }
    }
}

/// What one epoch measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// Epoch number, from 1.
    pub epoch: u32,
    /// Mean loss over the epoch's batches (weighted by rows).
    pub train_loss: f64,
    /// Accuracy over the epoch's batches (classification only).
    pub train_accuracy: Option<f64>,
    /// Loss on the validation split after the epoch.
    pub validation_loss: Option<f64>,
    /// Accuracy on the validation split after the epoch (classification only).
    pub validation_accuracy: Option<f64>,
    /// Training rows per second during the epoch.
    pub samples_per_second: f64,
    /// Time since training began.
    pub elapsed_ms: u64,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Training.
    Running,
    /// Finished; a version was registered.
    Succeeded,
    /// Stopped by an error; nothing was registered.
    Failed,
    /// Cancelled; nothing was registered.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A new model a job creates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewModelSpec {
    /// Architecture.
    pub spec: crate::spec::ModelSpec,
    /// Tensor names.
    pub signature: crate::spec::Signature,
}

/// `jobs/<id>`: a training job, its progress and its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Record schema.
    pub schema: u32,
    /// Job id.
    pub id: String,
    /// State.
    pub state: JobState,
    /// Model the result is registered under.
    pub model_name: String,
    /// Architecture of a new model (None: continue from `continue_from`).
    pub new_model: Option<NewModelSpec>,
    /// The version to start from, `name:version` or `name:alias`.
    pub continue_from: Option<String>,
    /// How to train.
    pub config: TrainingConfig,
    /// The data, as a safetensors file with `features` and `labels` (see [`encode_dataset`]).
    pub data: crate::records::ArtifactRef,
    /// Rows in the data.
    pub rows: u64,
    /// Alias to set on success.
    pub alias: Option<String>,
    /// The submitter's idempotency key.
    pub idempotency_key: Option<String>,
    /// One report per finished epoch.
    pub history: Vec<EpochReport>,
    /// The version registered on success.
    pub result_version: Option<u64>,
    /// Why it failed or was cancelled.
    pub reason: String,
    /// Worker that ran it.
    pub worker: String,
    /// Submission time.
    pub created_unix_ms: u64,
    /// End time (0 while not ended).
    pub finished_unix_ms: u64,
    /// Whether early stopping ended it early.
    pub stopped_early: bool,
}

/// Encode training rows as a safetensors file: `features` `[rows, width]` and `labels`
/// `[rows, label_width]`, FP32.
pub fn encode_dataset(features: &[f32], labels: &[f32], rows: usize) -> crate::Result<Vec<u8>> {
    use safetensors::{Dtype, tensor::TensorView};
    let (fw, lw) = (features.len() / rows.max(1), labels.len() / rows.max(1));
    let fb = crate::weights::f32_bytes(features);
    let lb = crate::weights::f32_bytes(labels);
    let views = vec![
        (
            "features".to_owned(),
            TensorView::new(Dtype::F32, vec![rows, fw], &fb)
                .map_err(|e| crate::Error::Invalid(format!("features: {e}")))?,
        ),
        (
            "labels".to_owned(),
            TensorView::new(Dtype::F32, vec![rows, lw], &lb)
                .map_err(|e| crate::Error::Invalid(format!("labels: {e}")))?,
        ),
    ];
    safetensors::serialize(views, None).map_err(|e| crate::Error::Invalid(format!("dataset: {e}")))
}

/// Decode [`encode_dataset`]'s file: (features, labels, rows).
pub fn decode_dataset(bytes: &[u8]) -> crate::Result<(Vec<f32>, Vec<f32>, usize)> {
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| crate::Error::Invalid(format!("dataset: {e}")))?;
    let read = |name: &str| {
        file.tensor(name)
            .map(|t| {
                (
                    crate::weights::f32_from_le(t.data()).collect::<Vec<f32>>(),
                    t.shape()[0],
                )
            })
            .map_err(|e| crate::Error::Invalid(format!("dataset {name}: {e}")))
    };
    let (features, rows) = read("features")?;
    let (labels, _) = read("labels")?;
    Ok((features, labels, rows))
}
