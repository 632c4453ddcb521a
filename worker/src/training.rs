//! Training an MLP on one device: mini-batch gradient descent with Burn's autodiff and
//! optimizers, a validation split, optional feature standardisation, early stopping,
//! cancellation between batches, and a report per epoch. A batch can be trained in slices
//! (micro-batches whose gradients, each weighted by its share of the batch's rows, add up
//! to the batch's; the optimizer steps once per batch), so that inference on the same
//! device waits at most a slice ([`TrainingRun::set_slice_budget`]). Deterministic for a seed on the
//! CPU backend: initial weights, the split and every shuffle come from Kiln's SplitMix64.
//!
//! This is the engine-side core that the training service drives; it runs wherever it is
//! called (the engine thread, in the worker).
//!
//! Over 700 lines because the run's state machine (epochs, batches, validation, early
//! stopping, checkpoints, data-parallel steps) shares one struct; it is the place the
//! model-family seam will divide by family.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData, activation};
use kiln_core::MlpWeights;
pub use kiln_core::parallel::{ShardGradients, ShardRole, shard_range};
use kiln_core::spec::{ModelSpec, Standardization, Task};
pub use kiln_core::training::{
    Dataset, EarlyStopping, EpochReport, EvaluationReport, JobData, Loss, Optimizer, StopMetric,
    TrainingConfig, TrainingLimits, validate,
};
use kiln_core::weights::SplitMix64;

use crate::model::Mlp;
use crate::{Error, Result};

/// Burn's optimizer for the settings.
fn build_optimizer(optimizer: &Optimizer) -> ModuleOptimizer {
    let decay = |w: f64| (w > 0.0).then(|| WeightDecayConfig::new(w as f32));
    match *optimizer {
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
    /// The epoch the weights come from.
    pub best_epoch: u32,
    /// The weights measured on the test rows, when the job had some.
    pub test: Option<EvaluationReport>,
}

/// What one forward and backward pass on some rows gave.
struct BatchGradients {
    /// The mean loss times the rows.
    loss_sum: f64,
    correct: usize,
    grads: GradientsParams,
}

/// A batch being trained in slices: its rows, how far it got, the gradients so far.
struct Partial {
    /// The batch's rows: `train_rows[start..end]` (a replica: its shard of them).
    start: usize,
    end: usize,
    /// The first row of the next slice.
    next: usize,
    batch_number: usize,
    grads: GradientsAccumulator<Mlp>,
    loss_sum: f64,
    correct: usize,
}

impl Partial {
    fn new(start: usize, end: usize, batch_number: usize) -> Self {
        Self {
            start,
            end,
            next: start,
            batch_number,
            grads: GradientsAccumulator::new(),
            loss_sum: 0.0,
            correct: 0,
        }
    }
}

/// An epoch's end in progress: the validation rows measured so far (in slices, like
/// batches, when the run has a slice budget).
struct Validating {
    /// The epoch's weights (kept as the best epoch's, with early stopping).
    weights: MlpWeights,
    /// Them on the plain device, without autodiff.
    model: Mlp,
    /// The next validation row.
    next: usize,
    loss_sum: f64,
    correct: usize,
}

/// Rows of a run's first slice, before it has timed one.
const FIRST_SLICE_ROWS: usize = 16;

/// How much of the slowest recent pace a faster slice keeps (see [`Pace::record`]).
const PACE_DECAY: f64 = 0.9;

/// Seconds per row of recent slices of one kind of work, fixed costs included: sizes the
/// next slice so that slices converge on the budget.
#[derive(Debug, Default, Clone, Copy)]
struct Pace(Option<f64>);

impl Pace {
    /// Rows of the next slice, of `remaining`: as many as fit `budget` at this pace (`first`
    /// before any slice was timed; `unbudgeted` without a budget), at least one.
    fn rows(
        self,
        budget: Option<Duration>,
        first: usize,
        unbudgeted: usize,
        remaining: usize,
    ) -> usize {
        let rows = match (budget, self.0) {
            (None, _) => unbudgeted,
            (Some(_), None) => first,
            (Some(budget), Some(pace)) => (budget.as_secs_f64() / pace.max(1e-12)) as usize,
        };
        rows.clamp(1, remaining.max(1))
    }

    /// A slice of `rows` rows took `took`. Quick to slow down, slow to speed up: a slice
    /// timed on a quiet moment does not size the next one for a busy one.
    fn record(&mut self, took: Duration, rows: usize) {
        let pace = took.as_secs_f64() / rows.max(1) as f64;
        self.0 = Some(match self.0 {
            Some(before) => pace.max(before * PACE_DECAY),
            None => pace,
        });
    }
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
    let mlp = spec.mlp()?;
    let model = Mlp::from_weights(mlp, weights, device);
    let (mut total, mut right) = (0.0f64, 0usize);
    for chunk in rows.chunks(EVALUATION_CHUNK) {
        let (l, r) = evaluate_rows(&model, spec, data, chunk, loss, device)?;
        total += l;
        right += r;
    }
    let n = rows.len().max(1) as f64;
    let accuracy = (mlp.task != Task::Regression).then(|| right as f64 / n);
    Ok((total / n, accuracy))
}

/// Rows evaluated in one pass, when nothing asks for less.
const EVALUATION_CHUNK: usize = 4096;

/// The loss summed over `rows` (mean times rows) and the correct predictions, by `model`.
fn evaluate_rows(
    model: &Mlp,
    spec: &ModelSpec,
    data: &Dataset,
    rows: &[usize],
    loss: Loss,
    device: &Device,
) -> Result<(f64, usize)> {
    let mlp = spec.mlp()?;
    let (width, outputs) = (spec.input_width(), spec.output_width());
    let label_width = if mlp.task == Task::MulticlassClassification {
        1
    } else {
        outputs
    };
    let b = gather(data, rows, width, label_width);
    let x = Tensor::<2>::from_data(TensorData::new(b.x, [b.rows, width]), device);
    let logits = model.logits(x);
    let l = batch_loss(model, loss, logits.clone(), &b.y, b.rows, device).into_scalar::<f32>();
    let right = correct(mlp.task, &read(logits)?, &b.y, outputs).unwrap_or(0);
    Ok((f64::from(l) * b.rows as f64, right))
}

/// What one call of [`TrainingRun::step`] did.
#[derive(Debug)]
pub enum Step {
    /// One batch was trained; the epoch goes on.
    Batch,
    /// A slice of a batch was trained: its gradients are kept; the weights change when the
    /// batch's last slice is done.
    Slice,
    /// An epoch ended; more follow.
    Epoch(EpochReport),
    /// The last epoch ended (all epochs run, or early stopping).
    Done(EpochReport),
}

impl Step {
    /// The epoch that ended, if this step ended one.
    pub fn report(&self) -> Option<&EpochReport> {
        match self {
            Step::Batch | Step::Slice => None,
            Step::Epoch(r) | Step::Done(r) => Some(r),
        }
    }
}

/// Where a resumed run starts: after `epoch`, with Burn's optimizer record of that moment.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The last epoch the checkpoint covers.
    pub epoch: u32,
    /// The optimizer record ([`TrainingRun::checkpoint`]'s bytes).
    pub optimizer_state: Vec<u8>,
}

/// A training run that advances one batch at a time, so that the engine thread can serve
/// inference between batches.
pub struct TrainingRun {
    spec: ModelSpec,
    task: Task,
    width: usize,
    outputs: usize,
    label_width: usize,
    config: TrainingConfig,
    /// Features already standardised, when asked for.
    data: Dataset,
    standardization: Option<Standardization>,
    /// The plain device (validation runs without autodiff).
    device: Device,
    train_device: Device,
    /// Taken out during a step (the optimizer consumes and returns it).
    model: Option<Mlp>,
    optimizer: ModuleOptimizer,
    /// The training rows in their base order; each epoch's order derives from it and the
    /// epoch number alone, so a resumed run sees the same orders.
    base_rows: Vec<usize>,
    train_rows: Vec<usize>,
    validation: Vec<usize>,
    epoch: u32,
    /// Next batch of the current epoch.
    cursor: usize,
    loss_sum: f64,
    right: usize,
    started: Instant,
    epoch_started: Instant,
    history: Vec<EpochReport>,
    /// Score, weights and epoch of the best epoch so far (early stopping).
    best: Option<(f64, MlpWeights, u32)>,
    since_best: u32,
    stopped_early: bool,
    /// Test rows, standardised like the training rows.
    test: Option<Dataset>,
    /// This run's place in a data-parallel run, when it is one replica of several.
    shard: Option<ShardRole>,
    /// The end of the batch whose shard gradients were computed and not yet applied.
    pending_end: Option<usize>,
    /// The batch (or this replica's shard of it) being trained in slices.
    partial: Option<Partial>,
    /// The epoch's end, while its validation runs in slices.
    validating: Option<Validating>,
    /// The pace of validation slices.
    validation_pace: Pace,
    /// The longest one slice should hold the device (None: whole batches).
    slice_budget: Option<Duration>,
    /// The pace of training slices.
    pace: Pace,
}

impl TrainingRun {
    /// Prepare a run: validate, split, standardise, build the model on the device.
    pub fn new(
        spec: &ModelSpec,
        init: &MlpWeights,
        data: &JobData<'_>,
        config: &TrainingConfig,
        device: &Device,
    ) -> Result<Self> {
        Self::resume(spec, init, data, config, device, None)
    }

    /// Prepare a run that goes on from a checkpoint: `init` holds the checkpoint's weights,
    /// `resume` its epoch and optimizer state. The split, the standardisation and every
    /// later epoch's row order are those the first run had.
    pub fn resume(
        spec: &ModelSpec,
        init: &MlpWeights,
        data: &JobData<'_>,
        config: &TrainingConfig,
        device: &Device,
        resume: Option<Resume>,
    ) -> Result<Self> {
        if let Some(r) = &resume
            && r.epoch >= config.epochs
        {
            return Err(Error::TrainingFailed(format!(
                "the checkpoint is of epoch {}; the job has only {} epochs",
                r.epoch, config.epochs
            )));
        }
        validate(
            spec,
            data,
            config,
            &TrainingLimits {
                max_epochs: u32::MAX,
                max_rows: usize::MAX,
                max_upload_bytes: u64::MAX,
            },
        )?;
        let mlp = spec.mlp()?;
        let (width, outputs) = (spec.input_width(), spec.output_width());
        let label_width = kiln_core::training::label_width(spec);
        let train = data.train;

        // The split: a seeded permutation, the last rows of which are held out.
        let mut rng = SplitMix64::new(config.seed);
        let mut order: Vec<usize> = (0..train.rows).collect();
        rng.shuffle(&mut order);
        let validation_rows = (train.rows as f64 * config.validation_fraction).round() as usize;
        let mut validation: Vec<usize> = order.split_off(train.rows - validation_rows);
        let mut train_rows = order;
        train_rows.sort_unstable();

        // Separate validation rows go after the training rows, in one copy of the features.
        let mut rows = train.clone();
        if let Some(v) = data.validation {
            validation = (rows.rows..rows.rows + v.rows).collect();
            rows.features.extend_from_slice(&v.features);
            rows.labels.extend_from_slice(&v.labels);
            rows.rows += v.rows;
        }
        let mut test = data.test.cloned();
        // Standardisation from the training rows only, applied to every copy.
        let standardization = config.standardize.then(|| {
            let stats = standardization_of(&rows, &train_rows, width);
            stats.apply(&mut rows.features);
            if let Some(t) = &mut test {
                stats.apply(&mut t.features);
            }
            stats
        });
        let train_device = device.clone().autodiff();
        let model = Mlp::from_weights(mlp, init, &train_device);
        let mut optimizer = build_optimizer(&config.optimizer);
        let mut epoch = 0;
        if let Some(r) = resume {
            optimizer = optimizer
                .from_bytes(burn::tensor::Bytes::from_bytes_vec(r.optimizer_state))
                .map_err(|e| {
                    Error::TrainingFailed(format!(
                        "the checkpoint's optimizer state does not load: {e:?}"
                    ))
                })?;
            epoch = r.epoch;
        }
        let now = Instant::now();
        Ok(Self {
            spec: spec.clone(),
            task: mlp.task,
            width,
            outputs,
            label_width,
            config: config.clone(),
            data: rows,
            standardization,
            device: device.clone(),
            train_device,
            model: Some(model),
            optimizer,
            base_rows: train_rows.clone(),
            train_rows,
            validation,
            epoch,
            cursor: 0,
            loss_sum: 0.0,
            right: 0,
            started: now,
            epoch_started: now,
            history: Vec::new(),
            best: None,
            since_best: 0,
            stopped_early: false,
            test,
            shard: None,
            pending_end: None,
            partial: None,
            validating: None,
            validation_pace: Pace::default(),
            slice_budget: None,
            pace: Pace::default(),
        })
    }

    /// Make this run one replica of a data-parallel run. Replicas other than rank 0 skip
    /// validation and early stopping: rank 0 reports and decides for all of them.
    pub fn into_replica(mut self, role: ShardRole) -> Result<Self> {
        if role.world == 0 || role.rank >= role.world {
            return Err(Error::TrainingFailed(format!(
                "replica rank {} does not fit a run of {} replicas",
                role.rank, role.world
            )));
        }
        self.shard = Some(role);
        Ok(self)
    }

    /// Train each batch in slices of about `budget` of device time (None or zero: whole
    /// batches). The trained weights are those of whole batches, up to float rounding.
    pub fn set_slice_budget(&mut self, budget: Option<Duration>) {
        self.slice_budget = budget.filter(|b| !b.is_zero());
    }

    /// Train the next slice of `partial` on the run's model: its gradients, weighted by its
    /// share of the batch, join the others. Returns the batch's gradients once its last
    /// slice is done; until then they stay in `partial`.
    fn train_slice(&mut self, partial: &mut Partial) -> Result<Option<GradientsParams>> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| Error::TrainingFailed("the run already failed".into()))?;
        let from = partial.next;
        let remaining = partial.end - from;
        let to = from
            + self
                .pace
                .rows(self.slice_budget, FIRST_SLICE_ROWS, remaining, remaining);
        let whole = from == partial.start && to == partial.end;
        let share = (to - from) as f32 / (partial.end - partial.start) as f32;
        let started = Instant::now();
        let g = self.gradients_on(
            model,
            &self.train_rows[from..to],
            partial.batch_number,
            share,
        )?;
        let grads = if whole {
            Some(g.grads)
        } else {
            partial.grads.accumulate(model, g.grads);
            (to == partial.end).then(|| partial.grads.grads())
        };
        if self.slice_budget.is_some() {
            self.pace.record(started.elapsed(), to - from);
        }
        partial.loss_sum += g.loss_sum;
        partial.correct += g.correct;
        partial.next = to;
        Ok(grads)
    }

    /// Start the epoch if the cursor is at its beginning: count it, shuffle its rows.
    fn begin_batch(&mut self) {
        if self.cursor == 0 {
            self.epoch += 1;
            if self.config.shuffle {
                // This epoch's order from the seed and the epoch number alone.
                self.train_rows.copy_from_slice(&self.base_rows);
                let mut rng = SplitMix64::new(
                    self.config.seed ^ u64::from(self.epoch).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                rng.shuffle(&mut self.train_rows);
            }
            self.epoch_started = Instant::now();
            self.loss_sum = 0.0;
            self.right = 0;
        }
    }

    /// Compute this replica's gradients on its shard of the next batch, without changing
    /// the weights: [`apply_gradients`](Self::apply_gradients) does that once the shards
    /// are averaged.
    pub fn compute_shard(&mut self) -> Result<ShardGradients> {
        loop {
            if let Some(g) = self.compute_shard_slice()? {
                return Ok(g);
            }
        }
    }

    /// One slice of [`compute_shard`](Self::compute_shard): the shard's gradients once its
    /// last slice is done, else None (call again; the device is free in between).
    pub fn compute_shard_slice(&mut self) -> Result<Option<ShardGradients>> {
        let role = self.shard.unwrap_or(ShardRole { rank: 0, world: 1 });
        let mut partial = match self.partial.take() {
            Some(p) => p,
            None => {
                if self.pending_end.is_some() {
                    return Err(Error::TrainingFailed(
                        "the last batch's gradients were not applied yet".into(),
                    ));
                }
                self.begin_batch();
                let batch_size = self.config.batch_size as usize;
                let end = (self.cursor + batch_size).min(self.train_rows.len());
                self.pending_end = Some(end);
                let mine = shard_range(end - self.cursor, role);
                let (start, end) = (self.cursor + mine.start, self.cursor + mine.end);
                if start == end {
                    return Ok(Some(ShardGradients {
                        rows: 0,
                        loss_sum: 0.0,
                        correct: 0,
                        gradients: Vec::new(),
                    }));
                }
                Partial::new(start, end, self.cursor / batch_size + 1)
            }
        };
        let Some(grads) = self.train_slice(&mut partial)? else {
            self.partial = Some(partial);
            return Ok(None);
        };
        let gradients = self
            .model
            .as_ref()
            .map(|model| model.flatten_gradients(&grads))
            .unwrap_or_default();
        Ok(Some(ShardGradients {
            rows: partial.end - partial.start,
            loss_sum: partial.loss_sum,
            correct: partial.correct as u64,
            gradients,
        }))
    }

    /// The gradients of `model`'s mean loss on `rows`, times `share` (a slice's part of its
    /// batch; 1 for a whole batch): forward, the loss (which must stay finite;
    /// `batch_number` names the batch when it does not), the correct predictions, backward.
    fn gradients_on(
        &self,
        model: &Mlp,
        rows: &[usize],
        batch_number: usize,
        share: f32,
    ) -> Result<BatchGradients> {
        let b = gather(&self.data, rows, self.width, self.label_width);
        let x = Tensor::<2>::from_data(
            TensorData::new(b.x, [b.rows, self.width]),
            &self.train_device,
        );
        let logits = model.logits(x);
        let loss = batch_loss(
            model,
            self.config.loss,
            logits.clone(),
            &b.y,
            b.rows,
            &self.train_device,
        );
        let value = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            return Err(Error::TrainingFailed(format!(
                "the loss became {value} at epoch {}, batch {batch_number}; try a lower learning rate or standardised features",
                self.epoch
            )));
        }
        let correct = correct(self.task, &read(logits.detach())?, &b.y, self.outputs).unwrap_or(0);
        let loss = if share == 1.0 {
            loss
        } else {
            loss.mul_scalar(share)
        };
        Ok(BatchGradients {
            loss_sum: f64::from(value) * b.rows as f64,
            correct,
            grads: GradientsParams::from_grads(loss.backward(), model),
        })
    }

    /// Apply the averaged gradients of the batch [`compute_shard`](Self::compute_shard)
    /// computed, with the whole batch's loss sum and correct count (every shard's), and
    /// move on; at an epoch's end, validate (rank 0) and report.
    pub fn apply_gradients(
        &mut self,
        gradients: &[f32],
        loss_sum: f64,
        correct: u64,
    ) -> Result<Step> {
        let end = self.pending_end.take().ok_or_else(|| {
            Error::TrainingFailed("gradients arrived before a batch was computed".into())
        })?;
        let model = self
            .model
            .take()
            .ok_or_else(|| Error::TrainingFailed("the run already failed".into()))?;
        let Some(grads) = model.gradients_from_flat(gradients, &self.device) else {
            let expected = model.parameter_count();
            self.model = Some(model);
            return Err(Error::TrainingFailed(format!(
                "the averaged gradients have {} values; the network has {expected} parameters",
                gradients.len()
            )));
        };
        self.model = Some(
            self.optimizer
                .step(self.config.optimizer.learning_rate(), model, grads),
        );
        self.loss_sum += loss_sum;
        self.right += correct as usize;
        self.cursor = end;
        if self.cursor < self.train_rows.len() {
            return Ok(Step::Batch);
        }
        self.cursor = 0;
        self.end_epoch()
    }

    /// Train one batch, or the next slice of one ([`Step::Slice`]); at an epoch's end, also
    /// validate and report.
    pub fn step(&mut self) -> Result<Step> {
        if self.validating.is_some() {
            return self.validate_slice();
        }
        let mut partial = match self.partial.take() {
            Some(p) => p,
            None => {
                self.begin_batch();
                let batch_size = self.config.batch_size as usize;
                let start = self.cursor;
                let end = (start + batch_size).min(self.train_rows.len());
                Partial::new(start, end, start / batch_size + 1)
            }
        };
        let Some(grads) = self.train_slice(&mut partial)? else {
            self.partial = Some(partial);
            return Ok(Step::Slice);
        };
        let model = self
            .model
            .take()
            .ok_or_else(|| Error::TrainingFailed("the run already failed".into()))?;
        self.loss_sum += partial.loss_sum;
        self.right += partial.correct;
        self.cursor = partial.end;
        self.model = Some(
            self.optimizer
                .step(self.config.optimizer.learning_rate(), model, grads),
        );
        if self.cursor < self.train_rows.len() {
            return Ok(Step::Batch);
        }
        self.cursor = 0;
        self.end_epoch()
    }

    /// The epoch's last batch is trained: validate (rank 0), then report. With a slice
    /// budget the validation runs a slice per step ([`Step::Slice`] until the report).
    fn end_epoch(&mut self) -> Result<Step> {
        let reports = self.shard.is_none_or(|r| r.rank == 0);
        if self.validation.is_empty() || !reports {
            let weights = if reports {
                self.weights()
            } else {
                MlpWeights { layers: vec![] }
            };
            return self.report_epoch(weights, None, None);
        }
        let weights = self.weights();
        let model = Mlp::from_weights(self.spec.mlp()?, &weights, &self.device);
        self.validating = Some(Validating {
            weights,
            model,
            next: 0,
            loss_sum: 0.0,
            correct: 0,
        });
        if self.slice_budget.is_some() {
            return Ok(Step::Slice);
        }
        loop {
            match self.validate_slice()? {
                Step::Slice => {}
                step => return Ok(step),
            }
        }
    }

    /// Measure the next validation rows; once all are measured, report the epoch.
    fn validate_slice(&mut self) -> Result<Step> {
        let Some(mut v) = self.validating.take() else {
            return Err(Error::TrainingFailed("no epoch is being validated".into()));
        };
        let remaining = self.validation.len() - v.next;
        let rows = self.validation_pace.rows(
            self.slice_budget,
            FIRST_SLICE_ROWS * 4,
            EVALUATION_CHUNK,
            remaining,
        );
        let started = Instant::now();
        let chunk = &self.validation[v.next..v.next + rows.min(remaining)];
        let (loss, right) = evaluate_rows(
            &v.model,
            &self.spec,
            &self.data,
            chunk,
            self.config.loss,
            &self.device,
        )?;
        if self.slice_budget.is_some() {
            self.validation_pace.record(started.elapsed(), chunk.len());
        }
        v.loss_sum += loss;
        v.correct += right;
        v.next += chunk.len();
        if v.next < self.validation.len() {
            self.validating = Some(v);
            return Ok(Step::Slice);
        }
        let n = self.validation.len() as f64;
        let accuracy = (self.task != Task::Regression).then(|| v.correct as f64 / n);
        self.report_epoch(v.weights, Some(v.loss_sum / n), accuracy)
    }

    /// Report the epoch with its validation figures; decide on early stopping.
    fn report_epoch(
        &mut self,
        weights: MlpWeights,
        validation_loss: Option<f64>,
        validation_accuracy: Option<f64>,
    ) -> Result<Step> {
        let n = self.train_rows.len() as f64;
        let reports = self.shard.is_none_or(|r| r.rank == 0);
        let report = EpochReport {
            epoch: self.epoch,
            train_loss: self.loss_sum / n,
            train_accuracy: (self.task != Task::Regression).then(|| self.right as f64 / n),
            validation_loss,
            validation_accuracy,
            samples_per_second: n / self.epoch_started.elapsed().as_secs_f64().max(1e-9),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        self.history.push(report.clone());
        let mut done = self.epoch >= self.config.epochs;
        if let Some(stop) = self.config.early_stopping.filter(|_| reports) {
            // Lower is better for both once accuracy is negated.
            let score = match stop.metric {
                StopMetric::ValidationLoss => validation_loss.unwrap_or(f64::INFINITY),
                StopMetric::ValidationAccuracy => -validation_accuracy.unwrap_or(0.0),
            };
            if self.best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                self.best = Some((score, weights, self.epoch));
                self.since_best = 0;
            } else {
                self.since_best += 1;
                if self.since_best >= stop.patience && !done {
                    self.stopped_early = true;
                    done = true;
                }
            }
        }
        Ok(if done {
            Step::Done(report)
        } else {
            Step::Epoch(report)
        })
    }

    /// Whether a checkpoint is due after the epoch that just ended.
    pub fn checkpoint_due(&self) -> bool {
        let every = self.config.checkpoint_every;
        every > 0 && self.cursor == 0 && self.epoch > 0 && self.epoch.is_multiple_of(every)
    }

    /// The run's state to resume from: the epoch, the weights and Burn's optimizer record.
    pub fn checkpoint(&self) -> Result<(u32, MlpWeights, Vec<u8>)> {
        let state = self.optimizer.into_bytes().map_err(|e| {
            Error::TrainingFailed(format!("cannot record the optimizer state: {e:?}"))
        })?;
        Ok((self.epoch, self.weights(), state.to_vec()))
    }

    /// The current weights, read back from the device.
    pub fn weights(&self) -> MlpWeights {
        self.model
            .as_ref()
            .map(Mlp::to_weights)
            .unwrap_or(MlpWeights { layers: vec![] })
    }

    /// The result, once [`step`](Self::step) returned [`Step::Done`]: the best weights,
    /// measured on the test rows when there are some.
    pub fn finish(self) -> Result<TrainingOutcome> {
        let (weights, best_epoch) = match self.best {
            Some((_, w, epoch)) => (w, epoch),
            None => (self.weights(), self.epoch),
        };
        let test = match &self.test {
            None => None,
            Some(t) => {
                let all: Vec<usize> = (0..t.rows).collect();
                let (loss, accuracy) = evaluate(
                    &self.spec,
                    &weights,
                    t,
                    &all,
                    self.config.loss,
                    &self.device,
                )?;
                Some(EvaluationReport {
                    loss,
                    accuracy,
                    rows: t.rows as u64,
                })
            }
        };
        Ok(TrainingOutcome {
            weights,
            standardization: self.standardization,
            history: self.history,
            stopped_early: self.stopped_early,
            best_epoch,
            test,
        })
    }
}

fn standardization_of(data: &Dataset, rows: &[usize], width: usize) -> Standardization {
    let n = rows.len() as f64;
    let mut mean = vec![0.0f64; width];
    let mut var = vec![0.0f64; width];
    for &r in rows {
        for (c, m) in mean.iter_mut().enumerate() {
            *m += f64::from(data.features[r * width + c]) / n;
        }
    }
    for &r in rows {
        for (c, v) in var.iter_mut().enumerate() {
            let d = f64::from(data.features[r * width + c]) - mean[c];
            *v += d * d / n;
        }
    }
    Standardization {
        mean: mean.iter().map(|m| *m as f32).collect(),
        std: var
            .iter()
            .map(|v| if *v > 0.0 { v.sqrt() as f32 } else { 1.0 })
            .collect(),
    }
}

/// Train `init` on `data` to the end, on the calling thread. `cancel` is checked before
/// every batch; `on_epoch` sees each epoch's report as soon as it is known.
pub fn train(
    spec: &ModelSpec,
    init: &MlpWeights,
    data: &JobData<'_>,
    config: &TrainingConfig,
    device: &Device,
    cancel: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<TrainingOutcome> {
    let mut run = TrainingRun::new(spec, init, data, config, device)?;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        match run.step()? {
            Step::Batch | Step::Slice => {}
            Step::Epoch(report) => on_epoch(&report),
            Step::Done(report) => {
                on_epoch(&report);
                return run.finish();
            }
        }
    }
}
