//! A worker in the cluster: it registers itself under a lease, follows the placement the
//! scheduler writes for it (loading and unloading versions), reports what it holds, and
//! serves `kiln.internal.v1.Worker`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::MlpWeights;
use kiln_core::records::{
    BatchingSettings, LoadState, LoadedRecord, SCHEMA, VersionKey, WorkerRecord, keys, now_unix_ms,
};
use kiln_proto::kiln::internal::v1 as pb;
use kiln_proto::kiln::internal::v1::worker_server::{Worker, WorkerServer};
use kiln_registry::{ArtifactStore, LeaseId, Registry};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::batcher::Batcher;
use crate::device::{DeviceChoice, select_device};
use crate::engine::{EngineHandle, TrainingEvent};
use crate::training::{
    Dataset, EpochReport, JobData, Resume, ShardRole, Step, TrainingConfig, TrainingOutcome,
    TrainingRun,
};
use crate::{Error, Result};
use kiln_core::parallel::{MAX_REPLICAS, f32_from_bytes, f32_to_bytes};
use kiln_core::spec::ModelSpec;
use kiln_core::training::decode_dataset;

/// How often a worker retries versions that failed to load (e.g. an artifact store that was
/// briefly unreachable), when nothing else wakes it.
const RETRY_FAILED_LOADS: Duration = Duration::from_secs(10);
/// How long a stopping worker waits for its in-flight calls.
const DRAIN: Duration = Duration::from_secs(30);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique id in the cluster.
    pub id: String,
    /// Device to compute on.
    pub device: DeviceChoice,
    /// Address others reach this worker at; defaults to the listener's address.
    pub advertise: Option<String>,
    /// Lifetime of the worker's registration without keep-alive.
    pub lease_ttl: Duration,
    /// Bytes of model weights this worker may hold (0: no limit).
    pub memory_bytes: u64,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (None: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// What a worker needs from the rest of the cluster.
#[derive(Clone)]
pub struct WorkerDeps {
    /// Cluster state.
    pub registry: Registry,
    /// Where weights are.
    pub artifacts: ArtifactStore,
    /// Where the worker's Prometheus metrics are collected: its own (the default), or one
    /// shared by every worker of a process (`kiln up`), which labels each with its id.
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
}

pub(crate) struct Served {
    pub(crate) batcher: Batcher,
    pub(crate) input_width: usize,
}

pub(crate) struct State {
    pub(crate) id: String,
    pub(crate) address: String,
    pub(crate) backend: &'static str,
    pub(crate) adapter: String,
    pub(crate) started_unix_ms: u64,
    pub(crate) engine: EngineHandle,
    /// The engine's device, for building training runs.
    pub(crate) device: burn::tensor::Device,
    pub(crate) deps: WorkerDeps,
    pub(crate) served: RwLock<HashMap<VersionKey, Served>>,
    /// What the worker reports in its record.
    pub(crate) loaded: Mutex<BTreeMap<VersionKey, LoadedRecord>>,
    pub(crate) lease: Mutex<Option<LeaseId>>,
    /// Set when the worker shuts down: it must not register again.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// The cancel flags of the training runs in progress, set when the worker shuts down:
    /// their jobs go back to the scheduler, which resumes them elsewhere.
    pub(crate) runs: Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicBool>>>,
    /// Poked whenever `loaded` changes, so the record is rewritten.
    pub(crate) report: Notify,
    /// The record as last written, so that renewals without news write nothing.
    pub(crate) written: Mutex<Option<WorkerRecord>>,
    /// When each version last served a request.
    pub(crate) last_used: Mutex<HashMap<VersionKey, u64>>,
    /// Bytes of weights this worker may hold (0: no limit).
    pub(crate) memory_bytes: u64,
    /// How long model loads took, by outcome (success, failure).
    pub(crate) load_seconds: Mutex<[kiln_telemetry::metrics::Histogram; 2]>,
    /// FP32 parameter bytes of each version served.
    pub(crate) weight_bytes: Mutex<HashMap<VersionKey, u64>>,
}

/// Run a worker on `listener` until `shutdown` resolves, then drain: deregister (revoke the
/// lease), finish in-flight calls, stop.
pub async fn serve(
    config: WorkerConfig,
    listener: TcpListener,
    deps: WorkerDeps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let choice = config.device.clone();
    let selected = tokio::task::spawn_blocking(move || select_device(&choice))
        .await
        .map_err(|e| Error::Device(e.to_string()))?
        .map_err(|e| Error::Device(format!("cannot open device {}: {e}", config.device)))?;
    tracing::info!(worker = %config.id, backend = selected.backend, adapter = %selected.adapter, "device ready");
    let engine = EngineHandle::spawn(selected.device.clone(), &config.id)
        .map_err(|e| Error::Device(format!("cannot start the engine thread: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Invalid(format!("listener: {e}")))?;
    let state = Arc::new(State {
        id: config.id.clone(),
        address: config
            .advertise
            .clone()
            .unwrap_or_else(|| local.to_string()),
        backend: selected.backend,
        adapter: selected.adapter,
        started_unix_ms: now_unix_ms(),
        engine,
        device: selected.device,
        deps,
        served: RwLock::new(HashMap::new()),
        loaded: Mutex::new(BTreeMap::new()),
        lease: Mutex::new(None),
        stopping: std::sync::atomic::AtomicBool::new(false),
        runs: Mutex::new(Vec::new()),
        report: Notify::new(),
        written: Mutex::new(None),
        last_used: Mutex::new(HashMap::new()),
        memory_bytes: config.memory_bytes,
        load_seconds: Mutex::new(std::array::from_fn(|_| {
            kiln_telemetry::metrics::Histogram::new(kiln_telemetry::metrics::LONG_SECONDS_BOUNDS)
        })),
        weight_bytes: Mutex::new(HashMap::new()),
    });

    state.deps.metrics.add(&state);
    let metrics = match config.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Invalid(format!("cannot serve metrics on {addr}: {e}")))?;
            let mut registry = kiln_telemetry::metrics::Registry::default();
            registry.register_collector(Box::new(state.deps.metrics.clone()));
            Some(tokio::spawn(kiln_telemetry::metrics::serve(
                listener,
                Arc::new(registry),
            )))
        }
        None => None,
    };
    register(&state, config.lease_ttl).await?;
    let background = [
        tokio::spawn(keep_registered(state.clone(), config.lease_ttl)),
        tokio::spawn(follow_placement(state.clone())),
    ];

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    let service = WorkerServer::new(WorkerService {
        state: state.clone(),
    })
    .max_decoding_message_size(256 * 1024 * 1024)
    .max_encoding_message_size(256 * 1024 * 1024);
    // A gateway in this process (`kiln up`) calls the same service without a socket.
    kiln_rpc::local::register(&state.address, service.clone());
    let stop_state = state.clone();
    let on_shutdown = async move {
        shutdown.await;
        kiln_rpc::local::unregister(&stop_state.address);
        health_reporter
            .set_not_serving::<WorkerServer<WorkerService>>()
            .await;
        // Leave the routing table first, so no new work arrives while draining.
        deregister(&stop_state).await;
    };
    let reflection = kiln_rpc::reflection(&["kiln.internal.v1.Worker"])
        .map_err(|e| Error::Invalid(e.to_string()))?;
    // In-flight calls get DRAIN to finish once shutdown begins; then the server stops.
    let (draining_tx, draining) = tokio::sync::oneshot::channel::<()>();
    let on_shutdown = async move {
        on_shutdown.await;
        let _ = draining_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        // A server span per call, continuing the caller's trace.
        .layer(kiln_telemetry::trace::ServerLayer)
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(kiln_rpc::net::incoming(listener), on_shutdown);
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        _ = async {
            if draining.await.is_ok() {
                tokio::time::sleep(DRAIN).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(worker = %state.id, "in-flight calls did not finish within {DRAIN:?}; stopping anyway");
            Ok(())
        }
    };
    for task in background.into_iter().chain(metrics) {
        task.abort();
    }
    deregister(&state).await;
    result.map_err(|e| Error::Device(format!("worker server: {e}")))
}

// === registration ===

fn record(state: &State) -> WorkerRecord {
    WorkerRecord {
        schema: SCHEMA,
        id: state.id.clone(),
        address: state.address.clone(),
        backend: state.backend.to_owned(),
        adapter: state.adapter.clone(),
        loaded: {
            let used = lock(&state.last_used);
            lock(&state.loaded)
                .values()
                .cloned()
                .map(|mut l| {
                    // To the second: a busy model changes its record once per renewal at most.
                    l.last_used_unix_ms = used.get(&l.key).map_or(0, |ms| ms / 1000 * 1000);
                    l
                })
                .collect()
        },
        started_unix_ms: state.started_unix_ms,
        memory_bytes: state.memory_bytes,
    }
}

async fn register(state: &State, ttl: Duration) -> Result<()> {
    let lease = state.deps.registry.grant_lease(ttl).await?;
    *lock(&state.lease) = Some(lease);
    let now = record(state);
    state.deps.registry.put_worker(&now, lease).await?;
    *lock(&state.written) = Some(now);
    Ok(())
}

async fn deregister(state: &State) {
    state
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Training runs stop before their next batch; their streams end and the scheduler
    // hands the jobs to other workers.
    for run in lock(&state.runs).drain(..) {
        if let Some(cancel) = run.upgrade() {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let lease = lock(&state.lease).take();
    if let Some(lease) = lease
        && let Err(e) = state.deps.registry.store().revoke_lease(lease).await
    {
        tracing::warn!(error = %e, "could not revoke the worker's lease");
    }
}

/// Keep the lease alive and the record current; a lease that was lost (e.g. the process
/// stalled past its TTL) is replaced by a fresh registration.
async fn keep_registered(state: Arc<State>, ttl: Duration) {
    let period = ttl / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = state.report.notified() => {}
        }
        if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let lease = *lock(&state.lease);
        let alive = match lease {
            Some(lease) => state.deps.registry.store().keep_alive(lease).await.is_ok(),
            None => false,
        };
        let result = if let (true, Some(lease)) = (alive, lease) {
            // The lease is renewed; the record is written only when it says something new.
            let now = record(&state);
            if lock(&state.written).as_ref() == Some(&now) {
                Ok(())
            } else {
                let written = state.deps.registry.put_worker(&now, lease).await;
                if written.is_ok() {
                    *lock(&state.written) = Some(now);
                }
                written
            }
        } else {
            if lease.is_some() {
                tracing::warn!(worker = %state.id, "lease lost; taking no work until registered again");
                *lock(&state.lease) = None;
            }
            register(&state, ttl).await.map_err(|e| match e {
                Error::Registry(e) => e,
                other => kiln_registry::Error::Storage(other.to_string()),
            })
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not refresh the worker record");
        }
    }
}

// === placement ===

async fn follow_placement(state: Arc<State>) {
    let registry = state.deps.registry.clone();
    let key = format!("{}{}", registry.prefix(), keys::placement(&state.id));
    loop {
        let revision = match registry.store().list(&key).await {
            Ok(listing) => listing.revision,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match registry.placement(&state.id).await {
            Ok(placement) => {
                let desired: BTreeSet<VersionKey> = placement.versions.into_iter().collect();
                reconcile(&state, &desired).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read placement"),
        }
        let Ok(mut changes) = registry.store().watch(&key, revision + 1).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Any change (or a broken watch) sends us round the loop to re-read and reconcile;
        // so does a quiet spell, which retries versions that failed to load.
        let _ = tokio::time::timeout(RETRY_FAILED_LOADS, changes.next()).await;
    }
}

async fn reconcile(state: &Arc<State>, desired: &BTreeSet<VersionKey>) {
    let held: Vec<VersionKey> = lock(&state.loaded).keys().cloned().collect();
    for key in held.iter().filter(|k| !desired.contains(*k)) {
        unload_version(state, key).await;
    }
    for key in desired {
        let held = lock(&state.loaded)
            .get(key)
            .is_some_and(|l| l.state != LoadState::Failed);
        if !held {
            let _ = load_version(state, key, None).await;
        }
    }
}

fn set_loaded(state: &State, key: &VersionKey, load: LoadState, reason: String) {
    lock(&state.loaded).insert(
        key.clone(),
        LoadedRecord {
            key: key.clone(),
            state: load,
            reason,
            last_used_unix_ms: 0,
        },
    );
    state.report.notify_one();
}

async fn load_version(
    state: &Arc<State>,
    key: &VersionKey,
    batching: Option<BatchingSettings>,
) -> Result<()> {
    set_loaded(state, key, LoadState::Loading, String::new());
    let started = Instant::now();
    let span = tracing::info_span!(
        "model load",
        kiln.model.name = %key.model,
        kiln.model.version = key.version as i64,
    );
    match fetch_and_build(state, key, batching)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            lock(&state.load_seconds)[0].observe(started.elapsed().as_secs_f64());
            span.in_scope(|| tracing::info!(version = %key, elapsed_ms = started.elapsed().as_millis() as u64, "model loaded"));
            set_loaded(state, key, LoadState::Ready, String::new());
            Ok(())
        }
        Err(e) => {
            lock(&state.load_seconds)[1].observe(started.elapsed().as_secs_f64());
            span.in_scope(|| tracing::warn!(version = %key, error = %e, "model failed to load"));
            set_loaded(state, key, LoadState::Failed, e.to_string());
            Err(e)
        }
    }
}

async fn fetch_and_build(
    state: &Arc<State>,
    key: &VersionKey,
    batching: Option<BatchingSettings>,
) -> Result<()> {
    let registry = &state.deps.registry;
    let view = registry.view().await?;
    let (entry, version) = view.resolve(&key.model, &key.version.to_string())?;
    let spec = entry.record.spec.clone();
    let bytes = state.deps.artifacts.get(&version.artifact).await?;
    let weights = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || MlpWeights::from_safetensors(&spec, &bytes))
            .await
            .map_err(|e| Error::Device(e.to_string()))??
    };
    let batching = batching.unwrap_or_else(|| view.deployment(&key.model).batching);
    state
        .engine
        .load(
            key.clone(),
            spec.clone(),
            weights,
            version.preprocessing.clone(),
        )
        .await?;
    let batcher = Batcher::spawn(key.clone(), batching, state.engine.clone());
    lock(&state.weight_bytes).insert(key.clone(), spec.parameter_count() * 4);
    state
        .served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key.clone(),
            Served {
                batcher,
                input_width: spec.input_width(),
            },
        );
    Ok(())
}

async fn unload_version(state: &Arc<State>, key: &VersionKey) {
    state
        .served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
    let _ = state.engine.unload(key.clone()).await;
    lock(&state.weight_bytes).remove(key);
    lock(&state.loaded).remove(key);
    state.report.notify_one();
    tracing::info!(version = %key, "model unloaded");
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === training ===

/// Sets the run's cancel flag when the caller's stream goes away.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An epoch report on the wire.
pub fn epoch_to_proto(r: &EpochReport) -> kiln_proto::kiln::v1::EpochMetrics {
    kiln_proto::kiln::v1::EpochMetrics {
        epoch: r.epoch,
        train_loss: r.train_loss,
        train_accuracy: r.train_accuracy,
        validation_loss: r.validation_loss,
        validation_accuracy: r.validation_accuracy,
        samples_per_second: r.samples_per_second,
        elapsed_ms: r.elapsed_ms,
    }
}

fn invalid_json(field: &str, e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

type TrainStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::TrainProgress, Status>> + Send>>;

/// Decode and check a run's request, then build the run on the device (off tokio's
/// threads): the part of Train and TrainShard that is the same.
async fn prepare_run(
    state: &Arc<State>,
    req: &pb::TrainRequest,
) -> Result<(TrainingRun, ModelSpec), Status> {
    let spec: ModelSpec =
        serde_json::from_slice(&req.spec_json).map_err(|e| invalid_json("spec_json", e))?;
    spec.validate().map_err(Error::from)?;
    let config: TrainingConfig =
        serde_json::from_slice(&req.config_json).map_err(|e| invalid_json("config_json", e))?;
    let init = MlpWeights::from_safetensors(&spec, &req.init_weights).map_err(Error::from)?;
    let decode = |bytes: &[u8]| -> std::result::Result<Option<Dataset>, Status> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let (features, labels, rows) = decode_dataset(bytes).map_err(Error::from)?;
        Ok(Some(Dataset {
            features,
            labels,
            rows,
        }))
    };
    let data = decode(&req.dataset)?.ok_or_else(|| Status::invalid_argument("dataset is empty"))?;
    let validation = decode(&req.validation_dataset)?;
    let test = decode(&req.test_dataset)?;
    let resume = (req.resume_epoch > 0).then(|| Resume {
        epoch: req.resume_epoch,
        optimizer_state: req.resume_optimizer_state.to_vec(),
    });
    // The run checks the rows and the config (the scheduler applied the caps already).
    let device = state.device.clone();
    // Building the run puts the model on the device: not on tokio's threads.
    let run_spec = spec.clone();
    let run = tokio::task::spawn_blocking(move || {
        let rows = JobData {
            train: &data,
            validation: validation.as_ref(),
            test: test.as_ref(),
        };
        TrainingRun::resume(&run_spec, &init, &rows, &config, &device, resume)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    Ok((run, spec))
}

/// Remember a run's cancel flag, so that a stopping worker can hand the run back.
fn track_run(state: &State, cancel: &Arc<std::sync::atomic::AtomicBool>) {
    let mut runs = lock(&state.runs);
    runs.retain(|r| r.strong_count() > 0);
    runs.push(Arc::downgrade(cancel));
}

async fn start_training(state: &Arc<State>, req: pb::TrainRequest) -> Result<TrainStream, Status> {
    let (run, spec) = prepare_run(state, &req).await?;
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    track_run(state, &cancel);
    let events = state.engine.train(run, cancel.clone()).await?;
    tracing::info!(job = %req.job_id, "training started");
    let stream = futures::stream::unfold(
        (events, CancelOnDrop(cancel), spec, false),
        |(mut events, guard, spec, finished)| async move {
            if finished {
                return None;
            }
            let item = match events.recv().await? {
                TrainingEvent::Epoch(report) => (
                    Ok(pb::TrainProgress {
                        progress: Some(pb::train_progress::Progress::Epoch(epoch_to_proto(
                            &report,
                        ))),
                    }),
                    false,
                ),
                TrainingEvent::Finished(outcome) => (
                    result_to_proto(&outcome, &spec).map(|r| pb::TrainProgress {
                        progress: Some(pb::train_progress::Progress::Result(r)),
                    }),
                    true,
                ),
                TrainingEvent::Checkpoint(epoch, weights, state) => {
                    match weights.to_safetensors(&spec) {
                        Ok(bytes) => (
                            Ok(pb::TrainProgress {
                                progress: Some(pb::train_progress::Progress::Checkpoint(
                                    pb::TrainCheckpoint {
                                        epoch,
                                        weights: bytes.into(),
                                        optimizer_state: state.into(),
                                    },
                                )),
                            }),
                            false,
                        ),
                        Err(e) => (Err(Status::internal(e.to_string())), true),
                    }
                }
                TrainingEvent::Stopped(e) => (Err(Status::from(e)), true),
            };
            Some((item.0, (events, guard, spec, item.1)))
        },
    );
    Ok(Box::pin(stream))
}

/// A finished run's result on the wire.
fn result_to_proto(outcome: &TrainingOutcome, spec: &ModelSpec) -> Result<pb::TrainResult, Status> {
    let weights = outcome
        .weights
        .to_safetensors(spec)
        .map_err(|e| Status::internal(e.to_string()))?;
    let preprocessing_json = outcome
        .standardization
        .as_ref()
        .and_then(|p| serde_json::to_vec(p).ok())
        .unwrap_or_default();
    Ok(pb::TrainResult {
        weights: weights.into(),
        preprocessing_json: preprocessing_json.into(),
        stopped_early: outcome.stopped_early,
        test: outcome
            .test
            .as_ref()
            .map(|t| kiln_proto::kiln::v1::EvaluationMetrics {
                loss: t.loss,
                accuracy: t.accuracy,
                rows: t.rows,
            }),
        best_epoch: outcome.best_epoch,
    })
}

// === data-parallel replicas ===

type ShardStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ShardReply, Status>> + Send>>;

fn shard_reply(reply: pb::shard_reply::Reply) -> pb::ShardReply {
    pb::ShardReply { reply: Some(reply) }
}

/// One step of a replica, on the engine thread: apply the averaged gradients (if any),
/// report the epoch they ended (rank 0 with its checkpoint), else compute the next shard.
fn replica_step(
    run: &mut TrainingRun,
    step: &pb::ShardStep,
    role: ShardRole,
    spec: &ModelSpec,
) -> Result<pb::ShardStepped> {
    // The replica's busy time (update and gradients): the rest of a step is communication.
    let started = Instant::now();
    let mut out = pb::ShardStepped::default();
    if !step.gradients.is_empty() {
        let gradients = f32_from_bytes("step.gradients", &step.gradients)?;
        let ended = match run.apply_gradients(&gradients, step.loss_sum, step.correct)? {
            Step::Batch => None,
            Step::Epoch(r) => Some((r, false)),
            Step::Done(r) => Some((r, true)),
        };
        if let Some((report, done)) = ended {
            out.epoch_ended = true;
            if role.rank == 0 {
                out.epoch = Some(epoch_to_proto(&report));
                out.done = done;
                if !done && run.checkpoint_due() {
                    let (epoch, weights, state) = run.checkpoint()?;
                    out.checkpoint = Some(pb::TrainCheckpoint {
                        epoch,
                        weights: weights.to_safetensors(spec)?.into(),
                        optimizer_state: state.into(),
                    });
                }
            }
            return Ok(out);
        }
    }
    let g = run.compute_shard()?;
    out.gradients = Some(pb::ShardGradients {
        rows: g.rows as u32,
        loss_sum: g.loss_sum,
        correct: g.correct,
        data: f32_to_bytes(&g.gradients).into(),
        compute_ns: started.elapsed().as_nanos() as u64,
    });
    Ok(out)
}

/// Hold one replica of a data-parallel run for as long as the coordinator's stream lasts.
/// The run goes to the engine thread for each step and comes back (a pointer moves, not
/// its tensors), so inference on the same device goes on between steps.
async fn hold_replica(
    state: Arc<State>,
    mut commands: tonic::Streaming<pb::ShardCommand>,
    replies: tokio::sync::mpsc::Sender<Result<pb::ShardReply, Status>>,
) -> Result<(), Status> {
    use pb::shard_command::Command;
    use pb::shard_reply::Reply;
    let setup = match commands.message().await? {
        Some(pb::ShardCommand {
            command: Some(Command::Setup(setup)),
        }) => setup,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of TrainShard must be a setup",
            ));
        }
    };
    if setup.world == 0 || setup.world > MAX_REPLICAS || setup.rank >= setup.world {
        return Err(Status::invalid_argument(format!(
            "setup.world must be 1 to {MAX_REPLICAS} and setup.rank below it; got rank {} of {}",
            setup.rank, setup.world
        )));
    }
    let request = setup
        .run
        .ok_or_else(|| Status::invalid_argument("setup.run is missing"))?;
    let role = ShardRole {
        rank: setup.rank,
        world: setup.world,
    };
    let (run, spec) = prepare_run(&state, &request).await?;
    let mut run = Some(Box::new(run.into_replica(role)?));
    let spec = Arc::new(spec);
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    track_run(&state, &cancel);
    tracing::info!(job = %request.job_id, rank = role.rank, world = role.world, "data-parallel replica ready");
    if replies
        .send(Ok(shard_reply(Reply::Ready(pb::ShardReady {}))))
        .await
        .is_err()
    {
        return Ok(());
    }
    while let Some(command) = commands.message().await? {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::unavailable(format!(
                "worker {} is shutting down; the run goes back to the scheduler",
                state.id
            )));
        }
        let mut taken = run
            .take()
            .ok_or_else(|| Status::failed_precondition("the replica's run already finished"))?;
        let spec = spec.clone();
        let reply = match command.command {
            Some(Command::Step(step)) => {
                let (back, stepped) = state
                    .engine
                    .exec(move || {
                        let stepped = replica_step(&mut taken, &step, role, &spec)?;
                        Ok((taken, stepped))
                    })
                    .await?;
                run = Some(back);
                Reply::Stepped(stepped)
            }
            Some(Command::Finish(_)) if role.rank == 0 => {
                let outcome = state.engine.exec(move || taken.finish()).await?;
                Reply::Result(result_to_proto(&outcome, &spec)?)
            }
            Some(Command::Finish(_)) => {
                return Err(Status::invalid_argument(
                    "only rank 0 hands over a data-parallel run's result",
                ));
            }
            Some(Command::Setup(_)) | None => {
                return Err(Status::invalid_argument(
                    "a replica takes one setup, then steps",
                ));
            }
        };
        if replies.send(Ok(shard_reply(reply))).await.is_err() {
            break;
        }
    }
    Ok(())
}

// === impl Worker ===

struct WorkerService {
    state: Arc<State>,
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<pb::InferResponse>, Status> {
        let deadline =
            kiln_rpc::deadline::from_metadata(request.metadata()).map(|d| Instant::now() + d);
        // A worker whose registration lapsed is not in the routing table: it takes no work
        // until it has registered again.
        if lock(&self.state.lease).is_none() {
            return Err(Status::unavailable(format!(
                "worker {} is not registered in the cluster right now",
                self.state.id
            )));
        }
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        kiln_telemetry::trace::attributes(|| {
            use kiln_telemetry::trace::KeyValue;
            vec![
                KeyValue::new(
                    "kiln.model.name",
                    kiln_telemetry::trace::name_value(&key.model),
                ),
                KeyValue::new("kiln.model.version", key.version as i64),
                KeyValue::new("kiln.batch_size", i64::from(req.rows)),
            ]
        });
        let (batcher, width) = {
            let served = self.state.served.read().unwrap_or_else(|p| p.into_inner());
            let s = served
                .get(&key)
                .ok_or_else(|| Error::NotLoaded(key.clone()))?;
            (s.batcher.clone(), s.input_width)
        };
        let rows = req.rows as usize;
        let expected = rows.checked_mul(width).and_then(|n| n.checked_mul(4));
        if expected != Some(req.features.len()) {
            return Err(Error::Invalid(format!(
                "features: {} bytes do not make {rows} rows of {width} FP32 values",
                req.features.len()
            ))
            .into());
        }
        let reply = batcher.infer(req.features, rows, deadline).await?;
        lock(&self.state.last_used).insert(key, now_unix_ms());
        Ok(Response::new(pb::InferResponse {
            rows: req.rows,
            cols: reply.cols as u32,
            outputs: reply.outputs,
            queue_ns: reply.queue.as_nanos() as u64,
            compute_ns: reply.compute.as_nanos() as u64,
            batch_rows: reply.batch_rows as u32,
            queue_depth: batcher.queue_depth() as u32,
        }))
    }

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        let batching = req.batching.map(|b| BatchingSettings {
            max_batch_size: b.max_batch_size,
            max_queue_delay_us: b.max_queue_delay_us,
            max_queue_size: b.max_queue_size,
        });
        if let Some(b) = &batching {
            if !(1..=65_536).contains(&b.max_batch_size) {
                return Err(Status::invalid_argument(
                    "batching.max_batch_size must be between 1 and 65536",
                ));
            }
            if !(1..=1_000_000).contains(&b.max_queue_size) {
                return Err(Status::invalid_argument(
                    "batching.max_queue_size must be between 1 and 1000000",
                ));
            }
        }
        load_version(&self.state, &key, batching).await?;
        Ok(Response::new(pb::LoadResponse {}))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        unload_version(&self.state, &key).await;
        Ok(Response::new(pb::UnloadResponse {}))
    }

    type TrainStream = TrainStream;

    type TrainShardStream = ShardStream;

    async fn train_shard(
        &self,
        request: Request<tonic::Streaming<pb::ShardCommand>>,
    ) -> Result<Response<Self::TrainShardStream>, Status> {
        // One reply in flight at a time: the coordinator waits for every replica's answer
        // before its next command, so a small buffer is all a replica needs.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let state = self.state.clone();
        let commands = request.into_inner();
        tokio::spawn(async move {
            if let Err(status) = hold_replica(state, commands, tx.clone()).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn train(
        &self,
        request: Request<pb::TrainRequest>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        let stream = start_training(&self.state, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::WorkerStatus>, Status> {
        let served = self.state.served.read().unwrap_or_else(|p| p.into_inner());
        let loaded = lock(&self.state.loaded)
            .values()
            .map(|l| pb::LoadedVersion {
                model: l.key.model.clone(),
                version: l.key.version,
                state: format!("{:?}", l.state).to_uppercase(),
                reason: l.reason.clone(),
                queue_depth: served
                    .get(&l.key)
                    .map_or(0, |s| s.batcher.queue_depth() as u32),
            })
            .collect();
        Ok(Response::new(pb::WorkerStatus {
            id: self.state.id.clone(),
            backend: self.state.backend.to_owned(),
            adapter: self.state.adapter.clone(),
            loaded,
        }))
    }
}
