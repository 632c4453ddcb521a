//! What a training job is, as data: the loss, the optimizer, the schedule, and what each
//! epoch measured. Workers run it; the scheduler records it; the API carries it.
//!
//! Over 700 lines because job types, their validation and the dataset formats are read
//! together by every side; a sixth of the file is tests.

use serde::{Deserialize, Serialize};

use crate::spec::{ModelSpec, Task};
use crate::{Error, Result};

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
    /// Take a checkpoint every this many epochs (0: never).
    #[serde(default)]
    pub checkpoint_every: u32,
}

/// Limits on what one job may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingLimits {
    /// Most epochs.
    pub max_epochs: u32,
    /// Most rows (training, validation and test data each).
    pub max_rows: usize,
    /// Largest dataset upload, in bytes.
    pub max_upload_bytes: u64,
}

impl Default for TrainingLimits {
    fn default() -> Self {
        Self {
            // Every epoch's report is kept in the job's record, which stays under 256 KiB.
            max_epochs: 1_000,
            max_rows: 10_000_000,
            max_upload_bytes: 512 * 1024 * 1024,
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

/// Rows of features and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features, `rows × input_width`.
    pub features: Vec<f32>,
    /// Row-major labels: `rows × output_width` for binary classification and regression,
    /// `rows × 1` class indices for multiclass classification.
    pub labels: Vec<f32>,
    /// Number of rows.
    pub rows: usize,
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::Invalid(message))
}

/// The rows of a job: what it trains on, and optionally separate validation and test rows.
#[derive(Debug, Clone, Copy)]
pub struct JobData<'a> {
    /// Training rows (a validation split may be taken from them).
    pub train: &'a Dataset,
    /// Rows validated on after every epoch instead of a split.
    pub validation: Option<&'a Dataset>,
    /// Rows the result is measured on once, at the end.
    pub test: Option<&'a Dataset>,
}

impl<'a> JobData<'a> {
    /// Training rows only.
    pub fn train_only(train: &'a Dataset) -> Self {
        Self {
            train,
            validation: None,
            test: None,
        }
    }
}

/// Check a job against the spec, the data and the limits; the error names the field.
pub fn validate(
    spec: &ModelSpec,
    data: &JobData<'_>,
    config: &TrainingConfig,
    limits: &TrainingLimits,
) -> Result<()> {
    let mlp = spec.mlp()?;
    if config.epochs == 0 || config.epochs > limits.max_epochs {
        return invalid(format!(
            "epochs must be between 1 and {}, got {}",
            limits.max_epochs, config.epochs
        ));
    }
    if config.batch_size == 0 {
        return invalid("batch_size must be at least 1".into());
    }
    let lr = config.optimizer.learning_rate();
    if !(lr.is_finite() && lr > 0.0) {
        return invalid(format!(
            "optimizer.learning_rate must be finite and above 0, got {lr}"
        ));
    }
    if let Optimizer::Adam {
        beta1,
        beta2,
        epsilon,
        weight_decay,
        ..
    } = config.optimizer
    {
        for (field, v) in [("optimizer.beta1", beta1), ("optimizer.beta2", beta2)] {
            if !(0.0..1.0).contains(&v) {
                return invalid(format!("{field} must be in [0, 1), got {v}"));
            }
        }
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return invalid(format!(
                "optimizer.epsilon must be finite and above 0, got {epsilon}"
            ));
        }
        check_weight_decay(weight_decay)?;
    }
    if let Optimizer::Sgd {
        momentum,
        weight_decay,
        ..
    } = config.optimizer
    {
        if !(0.0..1.0).contains(&momentum) {
            return invalid(format!(
                "optimizer.momentum must be in [0, 1), got {momentum}"
            ));
        }
        check_weight_decay(weight_decay)?;
    }
    if !(0.0..=0.9).contains(&config.validation_fraction) {
        return invalid(format!(
            "validation_fraction must be between 0 and 0.9, got {}",
            config.validation_fraction
        ));
    }
    if data.validation.is_some() && config.validation_fraction > 0.0 {
        return invalid(
            "validation_fraction and validation_data are both set; give one way to validate".into(),
        );
    }
    if let Some(stop) = config.early_stopping {
        if stop.patience == 0 {
            return invalid("early_stopping.patience must be at least 1".into());
        }
        if config.validation_fraction == 0.0 && data.validation.is_none() {
            return invalid(
                "early_stopping needs validation rows (validation_fraction > 0 or validation_data)"
                    .into(),
            );
        }
    }
    let expected_loss_task = match config.loss {
        Loss::BinaryCrossEntropy => Some(Task::BinaryClassification),
        Loss::CrossEntropy => Some(Task::MulticlassClassification),
        Loss::MeanSquaredError => None,
    };
    if let Some(task) = expected_loss_task
        && task != mlp.task
    {
        return invalid(format!(
            "loss {:?} does not fit the model's task {:?}",
            config.loss, mlp.task
        ));
    }
    check_rows(spec, "data", data.train, limits)?;
    if let Some(v) = data.validation {
        check_rows(spec, "validation_data", v, limits)?;
    }
    if let Some(t) = data.test {
        check_rows(spec, "test_data", t, limits)?;
    }
    let validation_rows = (data.train.rows as f64 * config.validation_fraction).round() as usize;
    if data.train.rows - validation_rows == 0 {
        return invalid("the validation split leaves no training rows".into());
    }
    Ok(())
}

fn check_weight_decay(weight_decay: f64) -> Result<()> {
    if weight_decay.is_finite() && weight_decay >= 0.0 {
        Ok(())
    } else {
        invalid(format!(
            "optimizer.weight_decay must be finite and at least 0, got {weight_decay}"
        ))
    }
}

/// The label columns a task's rows carry: one class index for multiclass, else one per output.
pub fn label_width(spec: &ModelSpec) -> usize {
    if spec
        .mlp()
        .is_ok_and(|mlp| mlp.task == Task::MulticlassClassification)
    {
        1
    } else {
        spec.output_width()
    }
}

/// Check one set of rows against the model: shape, finite features, labels that fit the
/// task, the row limit. Errors start with `field` (`data`, `validation_data`, `test_data`).
fn check_rows(
    spec: &ModelSpec,
    field: &str,
    data: &Dataset,
    limits: &TrainingLimits,
) -> Result<()> {
    let mlp = spec.mlp()?;
    let (width, outputs) = (spec.input_width(), spec.output_width());
    if data.rows == 0 {
        return invalid(format!("{field}: the dataset is empty"));
    }
    if data.rows > limits.max_rows {
        return invalid(format!(
            "{field}: the dataset has {} rows; at most {} are allowed",
            data.rows, limits.max_rows
        ));
    }
    if data.features.len() != data.rows * width {
        return invalid(format!(
            "{field}.features: {} values do not make {} rows of the model's input width {width}",
            data.features.len(),
            data.rows
        ));
    }
    if let Some(i) = data.features.iter().position(|v| !v.is_finite()) {
        return invalid(format!(
            "{field}.features: row {} column {} is not a finite number",
            i / width,
            i % width
        ));
    }
    let label_width = label_width(spec);
    if data.labels.len() != data.rows * label_width {
        return invalid(format!(
            "{field}.labels: {} values do not make {} rows of {label_width}",
            data.labels.len(),
            data.rows
        ));
    }
    for (i, y) in data.labels.iter().enumerate() {
        let row = i / label_width;
        let ok = match mlp.task {
            Task::BinaryClassification => *y == 0.0 || *y == 1.0,
            Task::MulticlassClassification => {
                y.fract() == 0.0 && *y >= 0.0 && (*y as usize) < outputs
            }
            Task::Regression => y.is_finite(),
        };
        if !ok {
            let rule = match mlp.task {
                Task::BinaryClassification => "0 or 1".to_owned(),
                Task::MulticlassClassification => {
                    format!("a class index from 0 to {}", outputs - 1)
                }
                Task::Regression => "a finite number".to_owned(),
            };
            return invalid(format!(
                "{field}.labels: row {row} holds {y}; labels must be {rule}"
            ));
        }
    }
    Ok(())
}

/// A model measured on a set of rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// Mean loss.
    pub loss: f64,
    /// Accuracy (classification only).
    pub accuracy: Option<f64>,
    /// Rows measured.
    pub rows: u64,
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
    /// The last checkpoint stored, if any.
    #[serde(default)]
    pub checkpoint: Option<CheckpointRecord>,
    /// Validation rows given apart from `data` ([`encode_dataset`]'s format).
    #[serde(default)]
    pub validation_data: Option<crate::records::ArtifactRef>,
    /// Test rows, measured once at the end.
    #[serde(default)]
    pub test_data: Option<crate::records::ArtifactRef>,
    /// The result measured on the test rows.
    #[serde(default)]
    pub test: Option<EvaluationReport>,
    /// The epoch whose weights were registered (0: not finished).
    #[serde(default)]
    pub best_epoch: u32,
    /// Workers that train it together (0 in older records: one).
    #[serde(default)]
    pub workers: u32,
    /// What the data-parallel steps of its last run cost.
    #[serde(default)]
    pub data_parallel: Option<DataParallelStats>,
}

/// What the steps of a data-parallel run cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DataParallelStats {
    /// Workers the run used.
    pub workers: u32,
    /// Steps taken.
    pub steps: u64,
    /// Mean wall time of a step, milliseconds.
    pub mean_step_ms: f64,
    /// Mean time of a step beyond the slowest shard's compute, milliseconds.
    pub mean_communication_ms: f64,
}

/// A checkpoint of a job in the artifact store: where a resumed run starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The epoch it was taken after.
    pub epoch: u32,
    /// Weights (safetensors).
    pub weights: crate::records::ArtifactRef,
    /// Burn's optimizer record.
    pub optimizer_state: crate::records::ArtifactRef,
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

/// A file of rows (CSV, or a pair of `.npy` files) parsed for training.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRows {
    /// Row-major features (every column but the label).
    pub features: Vec<f32>,
    /// Row-major labels (one column from CSV; one or more from NPY).
    pub labels: Vec<f32>,
    /// Rows.
    pub rows: usize,
    /// Feature column names, in order.
    pub feature_columns: Vec<String>,
}

/// Parse a CSV file with a header row: `label` names the label column, every other column
/// is a feature. Quoting, a UTF-8 byte-order mark, CRLF line ends and blank lines are read
/// as spreadsheets write them (the `csv` crate); cells are trimmed. Errors name the row
/// (1 = the first data row) and the column.
pub fn parse_csv(text: &str, label: &str) -> Result<ParsedRows> {
    // Excel and Windows tools start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let malformed = |e: csv::Error| Error::Invalid(format!("the CSV file cannot be read: {e}"));
    let header: Vec<String> = reader
        .headers()
        .map_err(malformed)?
        .iter()
        .map(str::to_owned)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(Error::Invalid("the CSV file is empty".into()));
    }
    let label_at = header.iter().position(|h| h == label).ok_or_else(|| {
        Error::Invalid(format!(
            "the CSV file has no column named {label:?} (columns: {})",
            header.join(", ")
        ))
    })?;
    let (mut features, mut labels, mut rows) = (Vec::new(), Vec::new(), 0usize);
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(malformed)? {
        let row = rows + 1;
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != header.len() {
            return Err(Error::Invalid(format!(
                "CSV row {row} has {} cells; the header has {}",
                record.len(),
                header.len()
            )));
        }
        for (c, cell) in record.iter().enumerate() {
            let value = cell
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "CSV row {row}, column {:?}: {cell:?} is not a number",
                        header[c]
                    ))
                })?;
            if c == label_at {
                labels.push(value);
            } else {
                features.push(value);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(Error::Invalid(
            "the CSV file has a header but no rows".into(),
        ));
    }
    Ok(ParsedRows {
        features,
        labels,
        rows,
        feature_columns: header
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != label_at)
            .map(|(_, h)| h)
            .collect(),
    })
}

/// Parse a pair of `.npy` files: features (rows × columns, or one column) and labels (one
/// per row, or rows × k). Features are named `x0`, `x1`, …; errors name the file, the row
/// and the column.
pub fn parse_npy(features: &[u8], labels: &[u8]) -> Result<ParsedRows> {
    let x = crate::npy::parse("features.npy", features)?;
    let y = crate::npy::parse("labels.npy", labels)?;
    if x.rows() == 0 {
        return Err(Error::Invalid("features.npy has no rows".into()));
    }
    if y.rows() != x.rows() {
        return Err(Error::Invalid(format!(
            "labels.npy has {} rows; features.npy has {}",
            y.rows(),
            x.rows()
        )));
    }
    for (what, a) in [("features.npy", &x), ("labels.npy", &y)] {
        if let Some(i) = a.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "{what}: row {} column {} is not a finite number",
                i / a.columns(),
                i % a.columns()
            )));
        }
    }
    Ok(ParsedRows {
        rows: x.rows(),
        feature_columns: (0..x.columns()).map(|c| format!("x{c}")).collect(),
        features: x.values,
        labels: y.values,
    })
}

/// The file format of an uploaded dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// CSV with a header row.
    #[default]
    Csv,
    /// A features `.npy` file and a labels `.npy` file.
    Npy,
}

/// `datasets/<id>`: an uploaded dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// Record schema.
    pub schema: u32,
    /// Dataset id.
    pub id: String,
    /// Name given at upload.
    pub name: String,
    /// sha256 of the uploaded file.
    pub sha256: String,
    /// Rows.
    pub rows: u64,
    /// Feature columns.
    pub feature_columns: Vec<String>,
    /// Label column.
    pub label_column: String,
    /// The rows, as [`encode_dataset`]'s safetensors file.
    pub artifact: crate::records::ArtifactRef,
    /// Upload time.
    pub created_unix_ms: u64,
    /// The format uploaded.
    #[serde(default)]
    pub format: DatasetFormat,
    /// sha256 of the labels file (NPY uploads).
    #[serde(default)]
    pub labels_sha256: String,
}

#[cfg(test)]
mod csv_tests {
    use super::*;

    #[test]
    fn quoted_fields_bom_and_crlf_read_as_spreadsheets_write_them() {
        // A BOM, CRLF line ends, a quoted header cell with a comma and a quoted number.
        let text = "\u{feff}\"weight, kg\",height,label\r\n70,\"1.8\",1\r\n\r\n55.5,1.6,0\r\n";
        let parsed = parse_csv(text, "label").unwrap();
        assert_eq!(parsed.feature_columns, ["weight, kg", "height"]);
        assert_eq!(parsed.rows, 2);
        assert_eq!(parsed.features, [70.0, 1.8, 55.5, 1.6]);
        assert_eq!(parsed.labels, [1.0, 0.0]);
    }

    #[test]
    fn the_label_column_can_be_quoted_and_named_with_a_comma() {
        let parsed = parse_csv("x,\"y, class\"\n1,2\n", "y, class").unwrap();
        assert_eq!(parsed.labels, [2.0]);
        assert_eq!(parsed.feature_columns, ["x"]);
    }

    #[test]
    fn errors_name_the_row_and_column() {
        let e = parse_csv("a,b\n1,2\n3\n", "b").unwrap_err().to_string();
        assert!(e.contains("CSV row 2 has 1 cells; the header has 2"), "{e}");
        let e = parse_csv("a,b\n1,x\n", "b").unwrap_err().to_string();
        assert!(
            e.contains("CSV row 1, column \"b\": \"x\" is not a number"),
            "{e}"
        );
        let e = parse_csv("a,b\n1,2\n", "c").unwrap_err().to_string();
        assert!(e.contains("no column named \"c\" (columns: a, b)"), "{e}");
        let e = parse_csv("a,b\n", "b").unwrap_err().to_string();
        assert!(e.contains("a header but no rows"), "{e}");
        let e = parse_csv("", "b").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = parse_csv("a,b\n1,inf\n", "b").unwrap_err().to_string();
        assert!(
            e.contains("is not a number"),
            "non-finite values are refused: {e}"
        );
    }
}
