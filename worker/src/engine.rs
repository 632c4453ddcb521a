//! The engine: the one thread per device that owns every loaded model and runs every Burn
//! computation, so that blocking compute never lands on tokio's threads. [`Engine`] is the
//! state (testable directly, no channels); [`EngineHandle`] is how async code talks to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use kiln_core::records::VersionKey;
use kiln_core::tensor::Tensor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::family::{Loaded, Prepared};
use crate::generation::scheduler::GenerationRequest;
use crate::generation::{GenEvent, Generator, GeneratorStats, Prompt};
use crate::training::{EpochReport, Step, TrainingOutcome, TrainingRun};
use crate::training_share::{TrainingClock, TrainingShare};
use crate::{Error, Result};
use kiln_core::MlpWeights;
use kiln_core::generation::Sampling;

/// Commands waiting for the engine beyond this make senders wait (backpressure): while the
/// engine is busy, the batchers keep filling their next batch instead.
const ENGINE_QUEUE: usize = 8;

/// What the engine holds and computes: the models loaded on one device, of any family.
pub struct Engine {
    device: Device,
    models: HashMap<VersionKey, Box<dyn Loaded>>,
    /// The generation state of each loaded decoder with work.
    generators: HashMap<VersionKey, Generator>,
    /// Running and waiting counts per decoder, for metrics and replica choice.
    gauges: Arc<std::sync::Mutex<HashMap<VersionKey, GeneratorStats>>>,
}

/// A finished forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// The outputs, in the model's interface order, one row per input row.
    pub outputs: Vec<Tensor>,
    /// The batch's rows whose input the model cut to fit, ascending.
    pub truncated: Vec<usize>,
    /// Time the pass took on the device, readback included.
    pub compute: Duration,
}

impl Engine {
    /// An engine with nothing loaded.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            models: HashMap::new(),
            generators: HashMap::new(),
            gauges: Arc::default(),
        }
    }

    /// Queue a generation on a loaded decoder; refused at once if it can never run.
    pub fn generate(&mut self, key: &VersionKey, request: GenerationRequest) -> Result<()> {
        let model = self
            .models
            .get_mut(key)
            .ok_or_else(|| Error::NotLoaded(key.clone()))?;
        let decoder = model.decoder().ok_or_else(|| {
            Error::Invalid(format!(
                "model {} does not generate text; use ModelInfer",
                key.model
            ))
        })?;
        let generator = self.generators.entry(key.clone()).or_default();
        guarded(|| generator.submit(decoder, request))??;
        self.publish(key);
        Ok(())
    }

    /// Whether any decoder has sequences running or waiting.
    pub fn generating(&self) -> bool {
        self.generators.values().any(Generator::busy)
    }

    /// One generation step of every decoder with work.
    pub fn generate_step(&mut self) {
        let keys: Vec<VersionKey> = self
            .generators
            .iter()
            .filter(|(_, g)| g.busy())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let (Some(model), Some(generator)) =
                (self.models.get_mut(&key), self.generators.get_mut(&key))
            else {
                continue;
            };
            let Some(decoder) = model.decoder() else {
                continue;
            };
            if let Err(e) = guarded(|| generator.step(decoder)) {
                generator.abort(&e);
            }
            self.publish(&key);
        }
    }

    /// Update the shared counts of `key`'s generator.
    fn publish(&mut self, key: &VersionKey) {
        let slots = self
            .models
            .get_mut(key)
            .and_then(|m| m.decoder().map(|d| d.slots()))
            .unwrap_or(0);
        let stats = self
            .generators
            .get(key)
            .map(|g| g.stats(slots))
            .unwrap_or_default();
        let mut gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        gauges.insert(key.clone(), stats);
    }

    /// Build a prepared version on the device; replaces any earlier copy of `key`.
    pub fn load(&mut self, key: VersionKey, prepared: Box<dyn Prepared>) -> Result<()> {
        let loaded = guarded(|| prepared.build(&self.device))??;
        self.models.insert(key, loaded);
        Ok(())
    }

    /// Drop a model; returns whether it was loaded.
    pub fn unload(&mut self, key: &VersionKey) -> bool {
        if let Some(mut generator) = self.generators.remove(key) {
            generator.abort(&Error::NotLoaded(key.clone()));
        }
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.models.remove(key).is_some()
    }

    /// Run a batch of `rows` rows through a loaded model. The inputs are checked against
    /// its interface first: nothing malformed reaches the device.
    pub fn forward(
        &self,
        key: &VersionKey,
        inputs: Vec<Tensor>,
        rows: usize,
    ) -> Result<ForwardOutput> {
        let model = self
            .models
            .get(key)
            .ok_or_else(|| Error::NotLoaded(key.clone()))?;
        let found = model.interface().check_inputs(&inputs)?;
        if found != rows {
            return Err(Error::Invalid(format!(
                "the batch holds {found} rows, not {rows}"
            )));
        }
        let start = Instant::now();
        let ran = guarded(|| model.run(inputs, rows))??;
        Ok(ForwardOutput {
            outputs: ran.outputs,
            truncated: ran.truncated,
            compute: start.elapsed(),
        })
    }
}

/// Run device work, turning a panic inside Burn or the driver into an error so that one
/// bad call cannot take the engine thread down.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic_message(panic.as_ref());
        tracing::error!(%message, "device computation failed");
        Error::Device("the device failed to run the computation".into())
    })
}

/// The text a panic carried, if it carried text.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into())
}

pub(crate) enum Command {
    Load {
        key: VersionKey,
        prepared: Box<dyn Prepared>,
        reply: oneshot::Sender<Result<()>>,
    },
    Unload {
        key: VersionKey,
        reply: oneshot::Sender<bool>,
    },
    Forward {
        key: VersionKey,
        inputs: Vec<Tensor>,
        rows: usize,
        /// When the batch was handed to the engine (its wait behind training is measured).
        sent: Instant,
        reply: oneshot::Sender<Result<ForwardOutput>>,
    },
    Train {
        run: Box<TrainingRun>,
        cancel: Arc<AtomicBool>,
        events: mpsc::UnboundedSender<TrainingEvent>,
    },
    /// Work that must run on the device's thread (a data-parallel replica's step).
    Exec(Box<dyn FnOnce() + Send>),
    /// Queue a generation.
    Generate {
        key: VersionKey,
        request: GenerationRequest,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// What a training run on the engine reports.
#[derive(Debug)]
pub enum TrainingEvent {
    /// An epoch ended.
    Epoch(EpochReport),
    /// A checkpoint: the epoch, the weights and Burn's optimizer record.
    Checkpoint(u32, MlpWeights, Vec<u8>),
    /// The run finished.
    Finished(Box<TrainingOutcome>),
    /// The run stopped: failed, or cancelled ([`Error::Cancelled`]).
    Stopped(Error),
}

/// A training run in progress on the engine thread.
struct ActiveRun {
    run: Box<TrainingRun>,
    cancel: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<TrainingEvent>,
    /// The last epoch ran: the outcome is due.
    done: bool,
}

impl ActiveRun {
    /// Hand over the outcome of a run that reached its end.
    fn finish(self) {
        if self.done {
            let run = self.run;
            let event = match guarded(move || run.finish()).and_then(|r| r) {
                Ok(outcome) => TrainingEvent::Finished(Box::new(outcome)),
                Err(e) => TrainingEvent::Stopped(e),
            };
            let _ = self.events.send(event);
        }
    }

    /// Train one batch and report; returns false when the run is over.
    fn advance(&mut self) -> bool {
        if self.cancel.load(Ordering::Relaxed) || self.events.is_closed() {
            let _ = self.events.send(TrainingEvent::Stopped(Error::Cancelled));
            return false;
        }
        match guarded(|| self.run.step()).and_then(|r| r) {
            Ok(Step::Batch | Step::Slice) => true,
            Ok(Step::Epoch(report)) => {
                let _ = self.events.send(TrainingEvent::Epoch(report));
                if self.run.checkpoint_due() {
                    match guarded(|| self.run.checkpoint()).and_then(|r| r) {
                        Ok((epoch, weights, state)) => {
                            let _ = self
                                .events
                                .send(TrainingEvent::Checkpoint(epoch, weights, state));
                        }
                        Err(e) => {
                            let _ = self.events.send(TrainingEvent::Stopped(e));
                            return false;
                        }
                    }
                }
                true
            }
            Ok(Step::Done(report)) => {
                let _ = self.events.send(TrainingEvent::Epoch(report));
                self.done = true;
                false
            }
            Err(e) => {
                let _ = self.events.send(TrainingEvent::Stopped(e));
                false
            }
        }
    }
}

/// A cheap, cloneable handle to an engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    gauges: Arc<std::sync::Mutex<HashMap<VersionKey, GeneratorStats>>>,
    training: Arc<TrainingShare>,
}

impl EngineHandle {
    /// Start the engine thread for `device`; it ends when every handle is dropped.
    pub fn spawn(device: Device, name: &str, training_share: f64) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Command>(ENGINE_QUEUE);
        let engine = Engine::new(device);
        let gauges = engine.gauges.clone();
        let training = Arc::new(TrainingShare::default());
        let share = training.clone();
        std::thread::Builder::new()
            .name(format!("kiln-engine-{name}"))
            .spawn(move || {
                let mut engine = engine;
                let mut runs: Vec<ActiveRun> = Vec::new();
                let mut clock = TrainingClock::with_share(training_share);
                // For waiting on commands with a timeout while training yields.
                let timer = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .ok();
                let mut next_run = 0usize;
                // Generation steps and training batches take turns when both have work.
                let mut generation_turn = true;
                loop {
                    // Commands (inference, loads) go first; generation steps and training
                    // batches run in between, one at a time, so that neither a long job
                    // nor a long generation keeps other models from answering.
                    let generating = engine.generating();
                    let command = if runs.is_empty() && !generating {
                        match rx.blocking_recv() {
                            Some(c) => c,
                            None => return,
                        }
                    } else {
                        match rx.try_recv() {
                            Ok(c) => c,
                            Err(mpsc::error::TryRecvError::Disconnected) => return,
                            Err(mpsc::error::TryRecvError::Empty) => {
                                if generating && (generation_turn || runs.is_empty()) {
                                    generation_turn = false;
                                    engine.generate_step();
                                    clock.served(Instant::now());
                                    continue;
                                }
                                generation_turn = true;
                                // While inference is being served, training keeps to its
                                // share: the device waits for inference a while first
                                // (generations already take turns with it).
                                let yielding = if generating {
                                    None
                                } else {
                                    clock.yield_until(Instant::now())
                                };
                                if let (Some(until), Some(timer)) = (yielding, &timer) {
                                    let until = tokio::time::Instant::from_std(until);
                                    // The timer is made inside the runtime (it needs one).
                                    let waited = timer.block_on(async {
                                        tokio::time::timeout_at(until, rx.recv()).await
                                    });
                                    match waited {
                                        Ok(Some(c)) => c,
                                        Ok(None) => return,
                                        Err(_) => continue,
                                    }
                                } else {
                                    next_run %= runs.len();
                                    let started = Instant::now();
                                    let going = runs[next_run].advance();
                                    clock.ran(&share, started, Instant::now());
                                    if going {
                                        next_run += 1;
                                    } else {
                                        let finished = runs.swap_remove(next_run);
                                        finished.finish();
                                    }
                                    continue;
                                }
                            }
                        }
                    };
                    // A caller that went away no longer wants the answer: ignore send errors.
                    match command {
                        Command::Load {
                            key,
                            prepared,
                            reply,
                        } => {
                            let _ = reply.send(engine.load(key, prepared));
                        }
                        Command::Unload { key, reply } => {
                            let _ = reply.send(engine.unload(&key));
                        }
                        Command::Forward {
                            key,
                            inputs,
                            rows,
                            sent,
                            reply,
                        } => {
                            if reply.is_closed() {
                                continue;
                            }
                            clock.waited(&share, sent);
                            let _ = reply.send(engine.forward(&key, inputs, rows));
                            clock.served(Instant::now());
                        }
                        Command::Train {
                            run,
                            cancel,
                            events,
                        } => runs.push(ActiveRun {
                            run,
                            cancel,
                            events,
                            done: false,
                        }),
                        // Exec carries data-parallel training steps.
                        Command::Exec(work) => {
                            let started = Instant::now();
                            work();
                            clock.ran(&share, started, Instant::now());
                        }
                        Command::Generate {
                            key,
                            request,
                            reply,
                        } => {
                            let _ = reply.send(engine.generate(&key, request));
                        }
                    }
                }
            })?;
        Ok(Self {
            tx,
            gauges,
            training,
        })
    }

    /// Queue a generation on a loaded decoder. Its events arrive on the returned
    /// receiver; dropping it cancels the generation at the next step. A request that can
    /// never run is refused here.
    pub async fn generate(
        &self,
        key: VersionKey,
        prompt: Prompt,
        sampling: Sampling,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        // The generation's span: its prefill and decode steps are recorded under it on the
        // engine thread, and it ends when the generation does.
        let trace = kiln_telemetry::trace::start(
            "generation",
            kiln_telemetry::trace::SpanKind::Internal,
            &kiln_telemetry::trace::current(),
            || {
                vec![
                    kiln_telemetry::trace::KeyValue::new(
                        "kiln.model.name",
                        kiln_telemetry::trace::name_value(&key.model),
                    ),
                    kiln_telemetry::trace::KeyValue::new("kiln.model.version", key.version as i64),
                ]
            },
        );
        let request = GenerationRequest {
            prompt,
            sampling,
            events,
            trace,
        };
        self.call(|reply| Command::Generate {
            key,
            request,
            reply,
        })
        .await??;
        Ok(rx)
    }

    /// Running and waiting sequences of a loaded decoder (zeros for other models).
    pub fn generation_stats(&self, key: &VersionKey) -> GeneratorStats {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    /// How training shares this engine's device.
    pub fn training_share(&self) -> &TrainingShare {
        &self.training
    }

    /// A handle whose commands go to the returned receiver instead of a device thread, so
    /// batcher tests can hold and answer forward passes themselves.
    #[cfg(test)]
    pub(crate) fn detached() -> (Self, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
        (
            Self {
                tx,
                gauges: Arc::default(),
                training: Arc::default(),
            },
            rx,
        )
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::EngineStopped)?;
        rx.await.map_err(|_| Error::EngineStopped)
    }

    /// Load a prepared model version (see [`crate::family`]).
    pub async fn load(&self, key: VersionKey, prepared: Box<dyn Prepared>) -> Result<()> {
        self.call(|reply| Command::Load {
            key,
            prepared,
            reply,
        })
        .await?
    }

    /// Unload a model version.
    pub async fn unload(&self, key: VersionKey) -> Result<bool> {
        self.call(|reply| Command::Unload { key, reply }).await
    }

    /// Start a training run on the engine; its events arrive on the returned receiver.
    /// Setting `cancel`, or dropping the receiver, stops it before its next batch.
    pub async fn train(
        &self,
        run: TrainingRun,
        cancel: Arc<AtomicBool>,
    ) -> Result<mpsc::UnboundedReceiver<TrainingEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Train {
                run: Box::new(run),
                cancel,
                events,
            })
            .await
            .map_err(|_| Error::EngineStopped)?;
        Ok(rx)
    }

    /// Run `work` on the engine thread, between other commands, and return its result. A
    /// panic inside it becomes an error; the engine goes on.
    pub async fn exec<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.call(|reply| {
            Command::Exec(Box::new(move || {
                let _ = reply.send(guarded(work).and_then(|r| r));
            }))
        })
        .await?
    }

    /// Run a forward pass over a batch of `rows` rows.
    pub async fn forward(
        &self,
        key: VersionKey,
        inputs: Vec<Tensor>,
        rows: usize,
    ) -> Result<ForwardOutput> {
        self.call(|reply| Command::Forward {
            key,
            inputs,
            rows,
            sent: Instant::now(),
            reply,
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::mlp;
    use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Standardization, Task};
    use kiln_core::weights::LayerWeights;

    /// The MLP family's prepared form of `weights`, under the default tensor names.
    fn prepared(
        spec: &ModelSpec,
        weights: MlpWeights,
        preprocessing: Option<Standardization>,
    ) -> Result<Box<dyn Prepared>> {
        mlp::prepare(
            spec,
            spec.interface(&Signature::default()),
            weights,
            preprocessing,
        )
    }

    /// `rows` rows of FP32 features as the model's input tensor.
    fn input(rows: usize, values: &[f32]) -> Vec<Tensor> {
        let width = values.len() / rows.max(1);
        vec![Tensor::from_f32("input", vec![rows, width], values).unwrap()]
    }

    fn values(out: &ForwardOutput) -> Vec<f32> {
        out.outputs[0].f32_values().unwrap()
    }

    fn key() -> VersionKey {
        VersionKey {
            model: "m".into(),
            version: 1,
        }
    }

    /// 2 inputs → 2 hidden (ReLU) → 1 output (sigmoid), with weights chosen so the hand
    /// computation is easy to follow.
    fn hand_model() -> (ModelSpec, MlpWeights) {
        let spec = ModelSpec::Mlp(MlpSpec {
            input_width: 2,
            hidden: vec![2],
            activation: Activation::Relu,
            output_width: 1,
            task: Task::BinaryClassification,
        });
        let weights = MlpWeights {
            layers: vec![
                LayerWeights {
                    inputs: 2,
                    outputs: 2,
                    // [in, out]: h0 = x0 - x1 + 0.5, h1 = 2 x0 + 3 x1 - 1
                    weight: vec![1.0, 2.0, -1.0, 3.0],
                    bias: vec![0.5, -1.0],
                },
                LayerWeights {
                    inputs: 2,
                    outputs: 1,
                    // y = sigmoid(0.25 h0 - 0.5 h1 + 0.1)
                    weight: vec![0.25, -0.5],
                    bias: vec![0.1],
                },
            ],
        };
        (spec, weights)
    }

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn forward_matches_a_hand_computation() {
        let (spec, weights) = hand_model();
        let mut engine = Engine::new(Device::flex());
        engine
            .load(key(), prepared(&spec, weights.clone(), None).unwrap())
            .unwrap();
        // Row 1: x = (1, 2): h = (relu(-0.5), relu(7)) = (0, 7); y = sigmoid(-3.4).
        // Row 2: x = (3, -1): h = (relu(4.5), relu(2)) = (4.5, 2); y = sigmoid(1.125 - 1 + 0.1).
        let out = engine
            .forward(&key(), input(2, &[1.0, 2.0, 3.0, -1.0]), 2)
            .unwrap();
        assert_eq!(out.outputs[0].shape, vec![2, 1]);
        let expected = [sigmoid(-3.4), sigmoid(0.225)];
        for (got, want) in values(&out).iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_bad_shapes_are_refused() {
        let spec = ModelSpec::Mlp(MlpSpec {
            input_width: 3,
            hidden: vec![4],
            activation: Activation::Tanh,
            output_width: 5,
            task: Task::MulticlassClassification,
        });
        let weights = MlpWeights::seeded(&spec, 3);
        let mut engine = Engine::new(Device::flex());
        engine
            .load(key(), prepared(&spec, weights.clone(), None).unwrap())
            .unwrap();
        let out = engine.forward(&key(), input(2, &[0.1; 6]), 2).unwrap();
        for row in values(&out).chunks(5) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!(matches!(
            engine.forward(&key(), input(2, &[0.1; 4]), 2),
            Err(Error::Invalid(_))
        ));
        let other = VersionKey {
            model: "m".into(),
            version: 2,
        };
        assert!(matches!(
            engine.forward(&other, input(1, &[0.1; 3]), 1),
            Err(Error::NotLoaded(_))
        ));
    }

    #[test]
    fn a_versions_standardisation_is_applied_before_the_network() {
        let (spec, weights) = hand_model();
        let mut engine = Engine::new(Device::flex());
        let scale = Standardization {
            mean: vec![1.0, -1.0],
            std: vec![2.0, 0.5],
        };
        engine
            .load(
                key(),
                prepared(&spec, weights.clone(), Some(scale)).unwrap(),
            )
            .unwrap();
        // Raw (3, 0) becomes ((3 - 1) / 2, (0 + 1) / 0.5) = (1, 2): row 1 of the hand case.
        let out = engine.forward(&key(), input(1, &[3.0, 0.0]), 1).unwrap();
        assert!(
            (values(&out)[0] - sigmoid(-3.4)).abs() < 1e-6,
            "{:?}",
            values(&out)
        );
        let bad = Standardization {
            mean: vec![0.0],
            std: vec![1.0],
        };
        let (spec, weights) = hand_model();
        assert!(prepared(&spec, weights, Some(bad)).is_err());
    }

    #[tokio::test]
    async fn inference_answers_while_a_training_run_is_on_the_engine() {
        use crate::training::{Dataset, JobData, Loss, Optimizer, TrainingConfig};
        let engine = EngineHandle::spawn(Device::flex(), "test", 0.5).unwrap();
        let (spec, weights) = hand_model();
        engine
            .load(key(), prepared(&spec, weights, None).unwrap())
            .await
            .unwrap();

        let train_spec = ModelSpec::Mlp(MlpSpec {
            input_width: 2,
            hidden: vec![8],
            activation: Activation::Relu,
            output_width: 1,
            task: Task::BinaryClassification,
        });
        let rows = 2000;
        let features: Vec<f32> = (0..rows * 2).map(|i| (i % 17) as f32 / 17.0).collect();
        let labels = features.chunks(2).map(|r| f32::from(r[0] > r[1])).collect();
        let config = TrainingConfig {
            epochs: 10_000,
            batch_size: 10,
            seed: 1,
            shuffle: true,
            loss: Loss::BinaryCrossEntropy,
            optimizer: Optimizer::Sgd {
                learning_rate: 0.01,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            validation_fraction: 0.0,
            standardize: false,
            early_stopping: None,
            checkpoint_every: 0,
        };
        let run = TrainingRun::new(
            &train_spec,
            &MlpWeights::seeded(&train_spec, 1),
            &JobData::train_only(&Dataset {
                features,
                labels,
                rows,
            }),
            &config,
            &Device::flex(),
        )
        .unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut events = engine.train(run, cancel.clone()).await.unwrap();
        // The run has 10,000 epochs of 200 batches ahead of it; inference still answers.
        for _ in 0..20 {
            let out = engine
                .forward(key(), input(1, &[1.0, 2.0]), 1)
                .await
                .unwrap();
            assert!((values(&out)[0] - sigmoid(-3.4)).abs() < 1e-6);
        }
        let first = events.recv().await.unwrap();
        assert!(
            matches!(first, TrainingEvent::Epoch(ref r) if r.epoch == 1),
            "{first:?}"
        );
        cancel.store(true, Ordering::Relaxed);
        loop {
            match events.recv().await.unwrap() {
                TrainingEvent::Epoch(_) => continue,
                TrainingEvent::Stopped(Error::Cancelled) => break,
                other => panic!("expected the run to stop cancelled, got {other:?}"),
            }
        }

        // A short run reports every epoch, then its outcome.
        let rows = 40;
        let features: Vec<f32> = (0..rows * 2).map(|i| (i % 7) as f32).collect();
        let labels = features.chunks(2).map(|r| f32::from(r[0] > r[1])).collect();
        let short = TrainingConfig {
            epochs: 2,
            checkpoint_every: 1,
            ..config
        };
        let run = TrainingRun::new(
            &train_spec,
            &MlpWeights::seeded(&train_spec, 1),
            &JobData::train_only(&Dataset {
                features,
                labels,
                rows,
            }),
            &short,
            &Device::flex(),
        )
        .unwrap();
        let mut events = engine
            .train(run, Arc::new(AtomicBool::new(false)))
            .await
            .unwrap();
        let mut epochs = Vec::new();
        let mut checkpoints = Vec::new();
        let outcome = loop {
            match events.recv().await.unwrap() {
                TrainingEvent::Epoch(r) => epochs.push(r.epoch),
                TrainingEvent::Checkpoint(epoch, weights, state) => {
                    assert!(!state.is_empty(), "the optimizer state is recorded");
                    assert_eq!(weights.layers.len(), 2);
                    checkpoints.push(epoch);
                }
                TrainingEvent::Finished(outcome) => break outcome,
                TrainingEvent::Stopped(e) => panic!("stopped: {e}"),
            }
        };
        assert_eq!(epochs, vec![1, 2]);
        // Every epoch but the last, whose weights are the result itself.
        assert_eq!(checkpoints, vec![1]);
        assert_eq!(outcome.history.len(), 2);
        assert_ne!(
            outcome.weights,
            MlpWeights::seeded(&train_spec, 1),
            "the weights moved"
        );
    }
}
