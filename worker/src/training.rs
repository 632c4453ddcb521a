//! Training an MLP on one device: mini-batch gradient descent with Burn's autodiff and
//! optimizers, a validation split, optional feature standardisation, early stopping,
//! cancellation between batches, and a report per epoch. Deterministic for a seed on the
//! CPU backend: initial weights, the split and every shuffle come from Kiln's SplitMix64.
//!
//! This is the engine-side core that the training service drives; it runs wherever it is
//! called (the engine thread, in the worker).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData, activation};
use kiln_registry::MlpWeights;
use kiln_registry::spec::{ModelSpec, Standardization, Task};
use kiln_registry::weights::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::model::Mlp;
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
    fn learning_rate(&self) -> f64 {
        match self {
            Optimizer::Sgd { learning_rate, .. } | Optimizer::Adam { learning_rate, .. } => {
                *learning_rate
            }
        }
    }

    fn build(&self) -> ModuleOptimizer {
        let decay = |w: f64| (w > 0.0).then(|| WeightDecayConfig::new(w as f32));
        match *self {
            Optimizer::Sgd {
                momentum,
                weight_decay,
                ..
            } => SgdConfig::new()
                .with_momentum((momentum > 0.0).then(|| {
                    MomentumConfig::new()
                        .with_momentum(momentum)
                        .with_dampening(0.0)
                }))
                .with_weight_decay(decay(weight_decay))
                .init(),
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
                weight_decay,
                ..
            } => AdamConfig::new()
                .with_beta_1(beta1 as f32)
                .with_beta_2(beta2 as f32)
                .with_epsilon(epsilon as f32)
                .with_weight_decay(decay(weight_decay))
                .init(),
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
            max_epochs: 10_000,
            max_rows: 10_000_000,
        }
    }
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

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct TrainingOutcome {
    /// The trained weights (the best epoch's, with early stopping).
    pub weights: MlpWeights,
    /// The standardisation to apply at inference, if it was asked for.
    pub standardization: Option<Standardization>,
    /// One report per epoch run.
    pub history: Vec<EpochReport>,
    /// Whether early stopping ended the run before `epochs`.
    pub stopped_early: bool,
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::Invalid(message))
}

/// Check a job against the spec, the data and the limits; the error names the field.
pub fn validate(
    spec: &ModelSpec,
    data: &Dataset,
    config: &TrainingConfig,
    limits: &TrainingLimits,
) -> Result<()> {
    let ModelSpec::Mlp(mlp) = spec;
    let (width, outputs) = (spec.input_width(), spec.output_width());
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
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return invalid(format!(
                "optimizer.weight_decay must be finite and at least 0, got {weight_decay}"
            ));
        }
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
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return invalid(format!(
                "optimizer.weight_decay must be finite and at least 0, got {weight_decay}"
            ));
        }
    }
    if !(0.0..=0.9).contains(&config.validation_fraction) {
        return invalid(format!(
            "validation_fraction must be between 0 and 0.9, got {}",
            config.validation_fraction
        ));
    }
    if let Some(stop) = config.early_stopping {
        if stop.patience == 0 {
            return invalid("early_stopping.patience must be at least 1".into());
        }
        if config.validation_fraction == 0.0 {
            return invalid(
                "early_stopping needs a validation split (validation_fraction > 0)".into(),
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
    if data.rows == 0 {
        return invalid("the dataset is empty".into());
    }
    if data.rows > limits.max_rows {
        return invalid(format!(
            "the dataset has {} rows; at most {} are allowed",
            data.rows, limits.max_rows
        ));
    }
    if data.features.len() != data.rows * width {
        return invalid(format!(
            "features: {} values do not make {} rows of the model's input width {width}",
            data.features.len(),
            data.rows
        ));
    }
    if let Some(i) = data.features.iter().position(|v| !v.is_finite()) {
        return invalid(format!(
            "features: row {} column {} is not a finite number",
            i / width,
            i % width
        ));
    }
    let label_width = if mlp.task == Task::MulticlassClassification {
        1
    } else {
        outputs
    };
    if data.labels.len() != data.rows * label_width {
        return invalid(format!(
            "labels: {} values do not make {} rows of {label_width}",
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
                "labels: row {row} holds {y}; labels must be {rule}"
            ));
        }
    }
    let validation_rows = (data.rows as f64 * config.validation_fraction).round() as usize;
    if data.rows - validation_rows == 0 {
        return invalid("the validation split leaves no training rows".into());
    }
    Ok(())
}

/// Rows gathered into one batch.
struct Batch {
    x: Vec<f32>,
    y: Vec<f32>,
    rows: usize,
}

fn gather(data: &Dataset, rows: &[usize], width: usize, label_width: usize) -> Batch {
    let mut x = Vec::with_capacity(rows.len() * width);
    let mut y = Vec::with_capacity(rows.len() * label_width);
    for &r in rows {
        x.extend_from_slice(&data.features[r * width..(r + 1) * width]);
        y.extend_from_slice(&data.labels[r * label_width..(r + 1) * label_width]);
    }
    Batch {
        x,
        y,
        rows: rows.len(),
    }
}

/// The loss of a batch as a one-element tensor (differentiable when `model` is).
fn batch_loss(
    model: &Mlp,
    loss: Loss,
    logits: Tensor<2>,
    y: &[f32],
    rows: usize,
    device: &Device,
) -> Tensor<1> {
    let outputs = logits.dims()[1];
    match loss {
        Loss::BinaryCrossEntropy => {
            let y = Tensor::<2>::from_data(TensorData::new(y.to_vec(), [rows, outputs]), device);
            // max(z, 0) - z·y + log(1 + exp(-|z|)): the stable form of -y·log σ(z) - (1-y)·log(1-σ(z)).
            let z = logits;
            (z.clone().clamp_min(0.0) - z.clone() * y + z.abs().neg().exp().log1p()).mean()
        }
        Loss::CrossEntropy => {
            let mut one_hot = vec![0.0f32; rows * outputs];
            for (r, class) in y.iter().enumerate() {
                one_hot[r * outputs + *class as usize] = 1.0;
            }
            let t = Tensor::<2>::from_data(TensorData::new(one_hot, [rows, outputs]), device);
            (activation::log_softmax(logits, 1) * t)
                .sum_dim(1)
                .neg()
                .mean()
        }
        Loss::MeanSquaredError => {
            let y = Tensor::<2>::from_data(TensorData::new(y.to_vec(), [rows, outputs]), device);
            (model.head(logits) - y).powi_scalar(2).mean()
        }
    }
}

/// Correct predictions among `rows`, from the logits read back to the host.
fn correct(task: Task, logits: &[f32], y: &[f32], outputs: usize) -> Option<usize> {
    match task {
        Task::BinaryClassification => Some(
            logits
                .iter()
                .zip(y)
                .filter(|(z, y)| (**z > 0.0) == (**y == 1.0))
                .count()
                / outputs.max(1),
        ),
        Task::MulticlassClassification => Some(
            logits
                .chunks(outputs)
                .zip(y)
                .filter(|(row, label)| {
                    let best = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(i, _)| i);
                    best == **label as usize
                })
                .count(),
        ),
        Task::Regression => None,
    }
}

fn read(t: Tensor<2>) -> Result<Vec<f32>> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Device(format!("{e:?}")))
}

/// Loss and accuracy of `weights` on some rows, in chunks, without autodiff.
fn evaluate(
    spec: &ModelSpec,
    weights: &MlpWeights,
    data: &Dataset,
    rows: &[usize],
    loss: Loss,
    device: &Device,
) -> Result<(f64, Option<f64>)> {
    let ModelSpec::Mlp(mlp) = spec;
    let (width, outputs) = (spec.input_width(), spec.output_width());
    let label_width = if mlp.task == Task::MulticlassClassification {
        1
    } else {
        outputs
    };
    let model = Mlp::from_weights(spec, weights, device);
    let (mut total, mut right) = (0.0f64, 0usize);
    for chunk in rows.chunks(4096) {
        let b = gather(data, chunk, width, label_width);
        let x = Tensor::<2>::from_data(TensorData::new(b.x, [b.rows, width]), device);
        let logits = model.logits(x);
        let l = batch_loss(&model, loss, logits.clone(), &b.y, b.rows, device).into_scalar::<f32>();
        total += f64::from(l) * b.rows as f64;
        right += correct(mlp.task, &read(logits)?, &b.y, outputs).unwrap_or(0);
    }
    let n = rows.len().max(1) as f64;
    let accuracy = (mlp.task != Task::Regression).then(|| right as f64 / n);
    Ok((total / n, accuracy))
}

/// Train `init` on `data`. `cancel` is checked before every batch; `on_epoch` sees each
/// epoch's report as soon as it is known.
pub fn train(
    spec: &ModelSpec,
    init: &MlpWeights,
    data: &Dataset,
    config: &TrainingConfig,
    device: &Device,
    cancel: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<TrainingOutcome> {
    validate(
        spec,
        data,
        config,
        &TrainingLimits {
            max_epochs: u32::MAX,
            max_rows: usize::MAX,
        },
    )?;
    let ModelSpec::Mlp(mlp) = spec;
    let (width, outputs) = (spec.input_width(), spec.output_width());
    let label_width = if mlp.task == Task::MulticlassClassification {
        1
    } else {
        outputs
    };

    // The split: a seeded permutation, the last rows of which are held out.
    let mut rng = SplitMix64::new(config.seed);
    let mut order: Vec<usize> = (0..data.rows).collect();
    rng.shuffle(&mut order);
    let validation_rows = (data.rows as f64 * config.validation_fraction).round() as usize;
    let validation: Vec<usize> = order.split_off(data.rows - validation_rows);
    let mut train_rows = order;
    train_rows.sort_unstable();

    // Standardisation from the training split only, applied to a copy of the features.
    let mut data = data.clone();
    let standardization = config.standardize.then(|| {
        let n = train_rows.len() as f64;
        let mut mean = vec![0.0f64; width];
        let mut var = vec![0.0f64; width];
        for &r in &train_rows {
            for (c, m) in mean.iter_mut().enumerate() {
                *m += f64::from(data.features[r * width + c]) / n;
            }
        }
        for &r in &train_rows {
            for (c, v) in var.iter_mut().enumerate() {
                let d = f64::from(data.features[r * width + c]) - mean[c];
                *v += d * d / n;
            }
        }
        let stats = Standardization {
            mean: mean.iter().map(|m| *m as f32).collect(),
            std: var
                .iter()
                .map(|v| if *v > 0.0 { v.sqrt() as f32 } else { 1.0 })
                .collect(),
        };
        stats.apply(&mut data.features);
        stats
    });

    let train_device = device.clone().autodiff();
    let mut model = Mlp::from_weights(spec, init, &train_device);
    let mut optimizer = config.optimizer.build();
    let lr = config.optimizer.learning_rate();
    let started = Instant::now();
    let mut history = Vec::new();
    let mut best: Option<(f64, MlpWeights)> = None;
    let mut since_best = 0u32;
    let mut stopped_early = false;

    for epoch in 1..=config.epochs {
        if config.shuffle {
            rng.shuffle(&mut train_rows);
        }
        let epoch_started = Instant::now();
        let (mut loss_sum, mut right) = (0.0f64, 0usize);
        for (step, chunk) in train_rows.chunks(config.batch_size as usize).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let b = gather(&data, chunk, width, label_width);
            let x = Tensor::<2>::from_data(TensorData::new(b.x, [b.rows, width]), &train_device);
            let logits = model.logits(x);
            let loss = batch_loss(
                &model,
                config.loss,
                logits.clone(),
                &b.y,
                b.rows,
                &train_device,
            );
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                return Err(Error::TrainingFailed(format!(
                    "the loss became {value} at epoch {epoch}, batch {}; try a lower learning rate or standardised features",
                    step + 1
                )));
            }
            loss_sum += f64::from(value) * b.rows as f64;
            right += correct(mlp.task, &read(logits.detach())?, &b.y, outputs).unwrap_or(0);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(lr, model, grads);
        }
        let n = train_rows.len() as f64;
        let weights = model.to_weights();
        let (validation_loss, validation_accuracy) = if validation.is_empty() {
            (None, None)
        } else {
            let (l, a) = evaluate(spec, &weights, &data, &validation, config.loss, device)?;
            (Some(l), a)
        };
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / n,
            train_accuracy: (mlp.task != Task::Regression).then(|| right as f64 / n),
            validation_loss,
            validation_accuracy,
            samples_per_second: n / epoch_started.elapsed().as_secs_f64().max(1e-9),
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        on_epoch(&report);
        history.push(report);

        if let Some(stop) = config.early_stopping {
            // Lower is better for both once accuracy is negated.
            let score = match stop.metric {
                StopMetric::ValidationLoss => validation_loss.unwrap_or(f64::INFINITY),
                StopMetric::ValidationAccuracy => -validation_accuracy.unwrap_or(0.0),
            };
            if best.as_ref().is_none_or(|(b, _)| score < *b) {
                best = Some((score, weights));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= stop.patience {
                    stopped_early = epoch < config.epochs;
                    break;
                }
            }
        }
    }
    let weights = match best {
        Some((_, w)) => w,
        None => model.to_weights(),
    };
    Ok(TrainingOutcome {
        weights,
        standardization,
        history,
        stopped_early,
    })
}
