//! The training coordinator: `kiln.v1.Training`. It records every job in the cluster
//! state, runs it on a worker (`kiln.internal.v1.Worker/Train`), keeps the record current
//! epoch by epoch, fans events out to watchers, and on success stores the weights and
//! registers the new version — served at once, since the placement controller picks it up.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_proto::kiln::internal::v1 as internal;
use kiln_proto::kiln::internal::v1::worker_client::WorkerClient;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_server::Training;
use kiln_registry::parallel::{MAX_REPLICAS, average_gradients};
use kiln_registry::records::{ArtifactRef, SCHEMA, now_unix_ms};
use kiln_registry::spec::{ModelSpec, Signature, Standardization, validate_name};
use kiln_registry::training::{
    CheckpointRecord, DataParallelStats, Dataset, DatasetFormat, DatasetRecord, EarlyStopping,
    EpochReport, EvaluationReport, JobData, JobRecord, JobState, Loss, NewModelSpec, Optimizer,
    StopMetric, TrainingConfig, TrainingLimits, decode_dataset, encode_dataset, parse_csv,
    parse_npy, validate,
};
use kiln_registry::weights::SplitMix64;
use kiln_registry::{ArtifactStore, MlpWeights, NewModel, NewVersion, Registry, WatchedView};
use kiln_telemetry::metrics::Families;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{signature_from_proto, spec_from_proto, version_to_proto};

/// How long a queued job waits for a worker to register before it fails.
const WORKER_WAIT: Duration = Duration::from_secs(60);

/// Events a watcher may be behind before it is cut off (it can watch again).
const WATCH_BUFFER: usize = 1024;

/// Workers a job may lose before it fails.
const MAX_WORKER_LOSSES: usize = 3;

/// How one run of a job on a worker ended.
enum Attempt {
    /// The run finished with this result.
    Finished(internal::TrainResult),
    /// The worker went away mid-run.
    WorkerLost {
        /// Its id.
        worker: String,
        /// What was seen.
        reason: String,
    },
}

/// Whether a failed call means the worker is gone (crashed, unreachable, shutting down)
/// rather than that the job failed there.
fn worker_gone(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Connect to the worker at `address`. The outer error is a bad address (a job error);
/// the inner one says why the worker could not be reached (the worker is lost).
async fn connect(
    address: &str,
) -> Result<Result<WorkerClient<kiln_telemetry::trace::TracedChannel>, String>, Status> {
    Ok(match kiln_rpc::channel::connect_traced(address).await {
        Ok(channel) => Ok(WorkerClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)),
        Err(kiln_rpc::Error::Unreachable { detail, .. }) => Err(format!("unreachable: {detail}")),
        Err(_) => return Err(Status::internal("a worker's address is malformed")),
    })
}

/// One message read from a worker's stream: the message, or (inner error) why the worker
/// counts as lost — its stream ended before `awaited`, or it went away; any other failure
/// is the job's (outer error).
fn received<T>(
    message: Result<Option<T>, Status>,
    awaited: &str,
) -> Result<Result<T, String>, Status> {
    match message {
        Ok(Some(m)) => Ok(Ok(m)),
        Ok(None) => Ok(Err(format!("it ended the run without {awaited}"))),
        Err(s) if worker_gone(&s) => Ok(Err(s.message().to_owned())),
        Err(s) => Err(s),
    }
}

/// One replica of a data-parallel run, as the coordinator holds it.
struct Replica {
    /// The worker's id.
    id: String,
    /// Commands to it.
    commands: tokio::sync::mpsc::Sender<internal::ShardCommand>,
    /// Its answers.
    replies: tonic::Streaming<internal::ShardReply>,
}

/// The next answer of every replica, read at once. A replica that is gone (or answers
/// nothing) loses the run: its id and the reason.
async fn replies(
    replicas: &mut [Replica],
) -> Result<Result<Vec<internal::shard_reply::Reply>, (String, String)>, Status> {
    let answers = futures::future::join_all(replicas.iter_mut().map(|r| r.replies.message())).await;
    let mut out = Vec::with_capacity(answers.len());
    for (r, answer) in replicas.iter().zip(answers) {
        match received(answer, "an answer")? {
            Ok(internal::ShardReply { reply: Some(reply) }) => out.push(reply),
            Ok(_) => {
                return Ok(Err((
                    r.id.clone(),
                    "it ended the run without an answer".into(),
                )));
            }
            Err(reason) => return Ok(Err((r.id.clone(), reason))),
        }
    }
    Ok(Ok(out))
}

/// A job this coordinator is running.
struct Running {
    events: broadcast::Sender<pb::TrainingEvent>,
    cancel: watch::Sender<bool>,
    /// The workers it runs on, once started (for choosing the least busy workers).
    workers: Vec<String>,
}

/// Runs training jobs.
pub struct TrainingCoordinator {
    registry: Registry,
    artifacts: ArtifactStore,
    view: WatchedView,
    limits: TrainingLimits,
    running: Mutex<HashMap<String, Running>>,
    /// Set by `stop_all`: jobs cancelled now were stopped by a shutdown, not a user.
    stopping: std::sync::atomic::AtomicBool,
    /// What `prometheus` reports.
    stats: Mutex<CoordinatorStats>,
}

/// The `kiln_scheduler_training_jobs_running` gauge at `running` (a standby scheduler
/// reports 0).
pub(crate) fn running_jobs_gauge(f: &mut Families<'_>, running: usize) -> std::fmt::Result {
    f.gauge(
        "kiln_scheduler_training_jobs_running",
        "Training jobs this scheduler runs.",
        [(Vec::new(), running as u64)],
    )
}

/// Counters of the jobs this coordinator ran.
struct CoordinatorStats {
    /// Jobs ended, by final state: succeeded, failed, cancelled.
    ended: [u64; 3],
    /// Each epoch's wall time.
    epoch_seconds: kiln_telemetry::metrics::Histogram,
}

fn status(e: kiln_registry::Error) -> Status {
    use kiln_registry::Error as E;
    match e {
        E::Invalid(m) => Status::invalid_argument(m),
        E::NotFound { .. } => Status::not_found(e.to_string()),
        E::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// An epoch report from the wire.
pub fn epoch_from_proto(m: &pb::EpochMetrics) -> EpochReport {
    EpochReport {
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        validation_loss: m.validation_loss,
        validation_accuracy: m.validation_accuracy,
        samples_per_second: m.samples_per_second,
        elapsed_ms: m.elapsed_ms,
    }
}

fn epoch_to_proto(r: &EpochReport) -> pb::EpochMetrics {
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

/// A job record on the wire.
pub fn job_to_proto(job: &JobRecord) -> pb::TrainingJob {
    pb::TrainingJob {
        id: job.id.clone(),
        state: job_state(job.state) as i32,
        model_name: job.model_name.clone(),
        epochs: job.config.epochs,
        history: job.history.iter().map(epoch_to_proto).collect(),
        result_version: job.result_version.unwrap_or(0),
        reason: job.reason.clone(),
        worker: job.worker.clone(),
        created_unix_ms: job.created_unix_ms,
        finished_unix_ms: job.finished_unix_ms,
        stopped_early: job.stopped_early,
        checkpoint_epoch: job.checkpoint.as_ref().map_or(0, |c| c.epoch),
        test: job.test.as_ref().map(|t| pb::EvaluationMetrics {
            loss: t.loss,
            accuracy: t.accuracy,
            rows: t.rows,
        }),
        best_epoch: job.best_epoch,
        workers: job.workers.max(1),
        data_parallel: job.data_parallel.map(|d| pb::DataParallelStats {
            workers: d.workers,
            steps: d.steps,
            mean_step_ms: d.mean_step_ms,
            mean_communication_ms: d.mean_communication_ms,
        }),
    }
}

fn event(state: JobState, e: pb::training_event::Event) -> pb::TrainingEvent {
    pb::TrainingEvent {
        state: job_state(state) as i32,
        event: Some(e),
    }
}

/// The events that tell a job's story so far (what a late watcher gets first).
fn history_events(job: &JobRecord) -> Vec<pb::TrainingEvent> {
    use pb::training_event::Event;
    let mut events = vec![event(JobState::Queued, Event::Queued(job.id.clone()))];
    if !job.worker.is_empty() {
        events.push(event(JobState::Running, Event::Started(job.worker.clone())));
    }
    for r in &job.history {
        events.push(event(JobState::Running, Event::Epoch(epoch_to_proto(r))));
    }
    match job.state {
        JobState::Failed => events.push(event(job.state, Event::Failed(job.reason.clone()))),
        JobState::Cancelled => events.push(event(job.state, Event::Cancelled(job.reason.clone()))),
        _ => {}
    }
    events
}

/// A job spec from the wire, checked: the job record (without id and data) and its rows.
struct Submission {
    model_name: String,
    new_model: Option<NewModelSpec>,
    continue_from: Option<String>,
    config: TrainingConfig,
    alias: Option<String>,
    workers: u32,
    data: Dataset,
    validation: Option<Dataset>,
    test: Option<Dataset>,
}

/// The rows a job names: the training, validation and test rows, each inline or uploaded.
struct Rows {
    train: Dataset,
    validation: Option<Dataset>,
    test: Option<Dataset>,
}

impl TrainingCoordinator {
    /// A coordinator over the cluster state. Jobs that were queued or running when the
    /// last coordinator stopped (a restart, or a new leader after a failover) go on: from
    /// their last checkpoint, or from the start.
    pub async fn start(
        registry: Registry,
        artifacts: ArtifactStore,
        view: WatchedView,
        limits: TrainingLimits,
    ) -> kiln_registry::Result<Arc<Self>> {
        let unfinished: Vec<JobRecord> = registry
            .list_jobs()
            .await?
            .into_iter()
            .filter(|j| !j.state.is_final())
            .collect();
        let me = Arc::new(Self {
            registry,
            artifacts,
            view,
            limits,
            running: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            stats: Mutex::new(CoordinatorStats {
                ended: [0; 3],
                epoch_seconds: kiln_telemetry::metrics::Histogram::new(
                    kiln_telemetry::metrics::LONG_SECONDS_BOUNDS,
                ),
            }),
        });
        for mut job in unfinished {
            match me.spec_of(&job) {
                Ok(spec) => {
                    let from = job.checkpoint.as_ref().map_or(0, |c| c.epoch);
                    job.history.retain(|r| r.epoch <= from);
                    tracing::info!(job = %job.id, from, "resuming a job the last scheduler left running");
                    me.registry.put_job(&job).await?;
                    me.launch(job, spec);
                }
                Err(e) => {
                    job.state = JobState::Failed;
                    job.reason = format!("the scheduler restarted and cannot resume the job: {e}");
                    job.finished_unix_ms = now_unix_ms();
                    me.registry.put_job(&job).await?;
                }
            }
        }
        Ok(me)
    }

    /// The architecture a job trains.
    fn spec_of(&self, job: &JobRecord) -> kiln_registry::Result<ModelSpec> {
        if let Some(new) = &job.new_model {
            return Ok(new.spec.clone());
        }
        let view = self.view.current();
        let name = job
            .continue_from
            .as_deref()
            .map_or(job.model_name.as_str(), |r| {
                r.split(':').next().unwrap_or(r)
            });
        view.models
            .get(name)
            .map(|m| m.record.spec.clone())
            .ok_or_else(|| kiln_registry::Error::NotFound {
                what: format!("model {name:?}"),
            })
    }

    /// Start running a recorded job in the background.
    fn launch(self: &Arc<Self>, job: JobRecord, spec: ModelSpec) {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (cancel, cancelled) = watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                job.id.clone(),
                Running {
                    events,
                    cancel,
                    workers: Vec::new(),
                },
            );
        let me = self.clone();
        // One span for the whole job, with an event per epoch (see `epoch_ended`).
        let span = tracing::info_span!(
            "training job",
            kiln.job.id = %job.id,
            kiln.model.name = %job.model_name,
            kiln.job.workers = i64::from(job.workers),
        );
        tokio::spawn(async move { me.run(job, spec, cancelled).await }.instrument(span));
    }

    /// The coordinator's metric families (see [`crate::metrics`]).
    pub(crate) fn describe(&self, f: &mut Families<'_>) -> std::fmt::Result {
        let running = self.running_jobs();
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f.counter(
            "kiln_scheduler_training_jobs_ended",
            "Training jobs this scheduler ran to an end, by final state.",
            ["SUCCEEDED", "FAILED", "CANCELLED"]
                .iter()
                .zip(stats.ended)
                .map(|(state, n)| (vec![("state", (*state).to_owned())], n)),
        )?;
        running_jobs_gauge(f, running)?;
        f.histogram(
            "kiln_scheduler_epoch_duration_seconds",
            "Wall time of each training epoch.",
            [(Vec::new(), &stats.epoch_seconds)],
        )
    }

    /// Jobs this coordinator runs now.
    pub fn running_jobs(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stop every running job because this scheduler stops: the runs end, and their records
    /// stay as they are, so that the next scheduler to lead goes on with them.
    pub fn stop_all(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for r in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = r.cancel.send(true);
        }
    }

    /// The gRPC service.
    pub fn service(self: &Arc<Self>) -> pb::training_server::TrainingServer<TrainingService> {
        TrainingService::standby(Arc::new(std::sync::RwLock::new(Some(self.clone()))))
    }

    fn check(
        &self,
        spec: pb::TrainingJobSpec,
        rows: Rows,
    ) -> Result<(Submission, ModelSpec), Status> {
        validate_name("spec.model_name", &spec.model_name).map_err(status)?;
        let view = self.view.current();
        let existing = view.models.get(&spec.model_name);
        let (model_spec, new_model, continue_from) = if !spec.continue_from.is_empty() {
            let (name, selector) = spec
                .continue_from
                .split_once(':')
                .unwrap_or((&spec.continue_from, ""));
            let (entry, _) = view.resolve(name, selector).map_err(status)?;
            (
                entry.record.spec.clone(),
                None,
                Some(spec.continue_from.clone()),
            )
        } else if spec.spec.is_some() {
            let model_spec = spec_from_proto(spec.spec.as_ref()).map_err(status)?;
            let signature: Signature =
                signature_from_proto(spec.signature.as_ref()).map_err(status)?;
            (
                model_spec.clone(),
                Some(NewModelSpec {
                    spec: model_spec,
                    signature,
                }),
                None,
            )
        } else if let Some(entry) = existing {
            // A model that exists: a fresh start from new weights with its architecture.
            (entry.record.spec.clone(), None, None)
        } else {
            return Err(Status::invalid_argument(
                "spec.spec is missing: give the architecture of a new model, or spec.continue_from",
            ));
        };
        if let (Some(new), Some(entry)) = (&new_model, existing)
            && (entry.record.spec != new.spec || entry.record.signature != new.signature)
        {
            return Err(Status::already_exists(format!(
                "model {:?} exists with a different architecture; choose another model_name",
                spec.model_name
            )));
        }
        let ModelSpec::Mlp(mlp) = &model_spec;
        let loss = match pb::LossKind::try_from(spec.loss) {
            Ok(pb::LossKind::Unspecified) => Loss::for_task(mlp.task),
            Ok(pb::LossKind::BinaryCrossEntropy) => Loss::BinaryCrossEntropy,
            Ok(pb::LossKind::CrossEntropy) => Loss::CrossEntropy,
            Ok(pb::LossKind::MeanSquaredError) => Loss::MeanSquaredError,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "spec.loss {} is not a known loss",
                    spec.loss
                )));
            }
        };
        let or = |v: f64, default: f64| if v == 0.0 { default } else { v };
        let optimizer = match spec.optimizer {
            Some(pb::training_job_spec::Optimizer::Sgd(s)) => Optimizer::Sgd {
                learning_rate: s.learning_rate,
                momentum: s.momentum,
                weight_decay: s.weight_decay,
            },
            Some(pb::training_job_spec::Optimizer::Adam(a)) => Optimizer::Adam {
                learning_rate: a.learning_rate,
                beta1: or(a.beta1, 0.9),
                beta2: or(a.beta2, 0.999),
                epsilon: or(a.epsilon, 1e-7),
                weight_decay: a.weight_decay,
            },
            None => Optimizer::Adam {
                learning_rate: 0.001,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-7,
                weight_decay: 0.0,
            },
        };
        let early_stopping = match spec.early_stopping {
            None => None,
            Some(e) => Some(EarlyStopping {
                metric: match e.metric.as_str() {
                    "" | "val_loss" => StopMetric::ValidationLoss,
                    "val_accuracy" => StopMetric::ValidationAccuracy,
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "spec.early_stopping.metric must be val_loss or val_accuracy, got {other:?}"
                        )));
                    }
                },
                patience: e.patience,
            }),
        };
        let config = TrainingConfig {
            epochs: spec.epochs,
            batch_size: spec.batch_size,
            seed: spec.seed,
            shuffle: !spec.no_shuffle,
            loss,
            optimizer,
            validation_fraction: spec.validation_fraction,
            standardize: spec.standardize,
            early_stopping,
            checkpoint_every: spec.checkpoint_every,
        };
        let job_data = JobData {
            train: &rows.train,
            validation: rows.validation.as_ref(),
            test: rows.test.as_ref(),
        };
        validate(&model_spec, &job_data, &config, &self.limits).map_err(status)?;
        if !spec.alias.is_empty() {
            validate_name("spec.alias", &spec.alias).map_err(status)?;
        }
        if spec.workers > MAX_REPLICAS {
            return Err(Status::invalid_argument(format!(
                "spec.workers must be between 1 and {MAX_REPLICAS}, got {}",
                spec.workers
            )));
        }
        Ok((
            Submission {
                model_name: spec.model_name,
                new_model,
                continue_from,
                config,
                alias: (!spec.alias.is_empty()).then_some(spec.alias),
                workers: spec.workers.max(1),
                data: rows.train,
                validation: rows.validation,
                test: rows.test,
            },
            model_spec,
        ))
    }

    async fn submit(
        self: &Arc<Self>,
        req: pb::SubmitTrainingJobRequest,
    ) -> Result<pb::TrainingJob, Status> {
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let (train, train_stored) = self
            .rows("data", spec.data.take(), &spec.dataset_id)
            .await?
            .ok_or_else(|| {
                Status::invalid_argument(
                    "spec.data is missing: give rows inline or an uploaded spec.dataset_id",
                )
            })?;
        let (validation, validation_stored) = self
            .rows(
                "validation_data",
                spec.validation_data.take(),
                &spec.validation_dataset_id,
            )
            .await?
            .unzip();
        let (test, test_stored) = self
            .rows("test_data", spec.test_data.take(), &spec.test_dataset_id)
            .await?
            .unzip();
        let (submission, model_spec) = self.check(
            spec,
            Rows {
                train,
                validation,
                test,
            },
        )?;
        // Uploaded datasets are in the artifact store already; inline rows go there now.
        let data = self.stored(&submission.data, train_stored).await?;
        let validation_data = match &submission.validation {
            Some(v) => Some(self.stored(v, validation_stored.flatten()).await?),
            None => None,
        };
        let test_data = match &submission.test {
            Some(t) => Some(self.stored(t, test_stored.flatten()).await?),
            None => None,
        };
        let created = now_unix_ms();
        let mut rng = SplitMix64::new(created ^ std::process::id() as u64 ^ (data.size << 17));
        let id = format!("job-{created:x}-{:06x}", rng.next_u64() & 0xff_ffff);
        let job = JobRecord {
            schema: SCHEMA,
            id,
            state: JobState::Queued,
            model_name: submission.model_name,
            new_model: submission.new_model,
            continue_from: submission.continue_from,
            config: submission.config,
            data,
            rows: submission.data.rows as u64,
            alias: submission.alias,
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            history: Vec::new(),
            result_version: None,
            reason: String::new(),
            worker: String::new(),
            created_unix_ms: created,
            finished_unix_ms: 0,
            stopped_early: false,
            checkpoint: None,
            validation_data,
            test_data,
            test: None,
            best_epoch: 0,
            workers: submission.workers,
            data_parallel: None,
        };
        let (job, created) = self.registry.create_job(&job).await.map_err(status)?;
        if created {
            self.launch(job.clone(), model_spec);
        }
        Ok(job_to_proto(&job))
    }

    /// One set of rows of a job: inline, or an uploaded dataset by id (with its artifact),
    /// or none.
    async fn rows(
        &self,
        field: &str,
        inline: Option<pb::InlineData>,
        dataset_id: &str,
    ) -> Result<Option<(Dataset, Option<ArtifactRef>)>, Status> {
        let id_field = match field {
            "data" => "dataset_id".to_owned(),
            other => format!("{}_dataset_id", other.trim_end_matches("_data")),
        };
        match (inline, dataset_id.is_empty()) {
            (Some(_), false) => Err(Status::invalid_argument(format!(
                "spec.{field} and spec.{id_field} are both set; give one"
            ))),
            (Some(inline), true) => Ok(Some((
                Dataset {
                    features: inline.features,
                    labels: inline.labels,
                    rows: inline.rows as usize,
                },
                None,
            ))),
            (None, true) => Ok(None),
            (None, false) => {
                let record = self
                    .registry
                    .get_dataset(dataset_id)
                    .await
                    .map_err(|e| match e {
                        kiln_registry::Error::NotFound { what } => {
                            Status::not_found(format!("spec.{id_field}: {what} not found"))
                        }
                        e => status(e),
                    })?;
                let bytes = self.artifacts.get(&record.artifact).await.map_err(status)?;
                let (features, labels, rows) = decode_dataset(&bytes).map_err(status)?;
                Ok(Some((
                    Dataset {
                        features,
                        labels,
                        rows,
                    },
                    Some(record.artifact),
                )))
            }
        }
    }

    /// The artifact of some rows: the one they came from, or a new one in the format
    /// workers read.
    async fn stored(
        &self,
        rows: &Dataset,
        from: Option<ArtifactRef>,
    ) -> Result<ArtifactRef, Status> {
        if let Some(artifact) = from {
            return Ok(artifact);
        }
        let bytes = encode_dataset(&rows.features, &rows.labels, rows.rows).map_err(status)?;
        self.artifacts.put(Bytes::from(bytes)).await.map_err(status)
    }

    fn publish(&self, id: &str, e: pb::TrainingEvent) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            let _ = r.events.send(e);
        }
    }

    async fn run(
        self: Arc<Self>,
        mut job: JobRecord,
        spec: ModelSpec,
        mut cancelled: watch::Receiver<bool>,
    ) {
        use pb::training_event::Event;
        let outcome = tokio::select! {
            result = self.execute(&mut job, &spec) => result,
            _ = cancelled.wait_for(|c| *c) => Err(Status::cancelled("cancelled by request")),
        };
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed)
            && matches!(&outcome, Err(s) if s.code() == tonic::Code::Cancelled)
        {
            tracing::info!(job = %job.id, "scheduler stopping; the job is left for the next one");
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job.id);
            return;
        }
        job.finished_unix_ms = now_unix_ms();
        let final_event = match outcome {
            Ok(version) => {
                job.state = JobState::Succeeded;
                job.result_version = Some(version.version);
                event(job.state, Event::Completed(version))
            }
            Err(s) if s.code() == tonic::Code::Cancelled => {
                job.state = JobState::Cancelled;
                job.reason = "cancelled by request".into();
                event(job.state, Event::Cancelled(job.reason.clone()))
            }
            Err(s) => {
                job.state = JobState::Failed;
                job.reason = s.message().to_owned();
                event(job.state, Event::Failed(job.reason.clone()))
            }
        };
        if let Err(e) = self.registry.put_job(&job).await {
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
        }
        tracing::info!(job = %job.id, state = ?job.state, "training job ended");
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            let i = match job.state {
                JobState::Succeeded => 0,
                JobState::Failed => 1,
                _ => 2,
            };
            stats.ended[i] += 1;
        }
        self.publish(&job.id, final_event);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.id);
    }

    /// Train on a worker and register the result; the returned version is served. A worker
    /// lost mid-run (its connection breaks, or it shuts down) hands the job to another
    /// worker, which goes on from the last checkpoint.
    async fn execute(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
    ) -> Result<pb::ModelVersion, Status> {
        use pb::training_event::Event;
        let mut lost: Vec<String> = Vec::new();
        let result = loop {
            match self.attempt(job, spec, &lost).await? {
                Attempt::Finished(result) => break result,
                Attempt::WorkerLost { worker, reason } => {
                    lost.push(worker.clone());
                    let from = job.checkpoint.as_ref().map_or(0, |c| c.epoch);
                    if lost.len() > MAX_WORKER_LOSSES {
                        return Err(Status::unavailable(format!(
                            "worker {worker} was lost ({reason}); the job lost {} workers and gives up",
                            lost.len()
                        )));
                    }
                    tracing::warn!(job = %job.id, %worker, %reason, from, "worker lost; resuming the job");
                    job.history.retain(|r| r.epoch <= from);
                    self.registry.put_job(job).await.map_err(status)?;
                    self.publish(
                        &job.id,
                        event(
                            JobState::Running,
                            Event::Resumed(pb::Resumed {
                                reason: format!("worker {worker} was lost: {reason}"),
                                from_epoch: from,
                            }),
                        ),
                    );
                }
            }
        };
        job.stopped_early = result.stopped_early;
        job.best_epoch = result.best_epoch;
        job.test = result.test.as_ref().map(|t| EvaluationReport {
            loss: t.loss,
            accuracy: t.accuracy,
            rows: t.rows,
        });
        let preprocessing: Option<Standardization> = if result.preprocessing_json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&result.preprocessing_json)
                    .map_err(|e| Status::internal(e.to_string()))?,
            )
        };
        // Check the weights before they are stored: the worker's answer is input too.
        MlpWeights::from_safetensors(spec, &result.weights).map_err(status)?;
        let artifact = self.artifacts.put(result.weights).await.map_err(status)?;
        if let Some(new) = &job.new_model {
            let created = self
                .registry
                .create_model(NewModel {
                    name: job.model_name.clone(),
                    spec: new.spec.clone(),
                    signature: new.signature.clone(),
                    description: format!("trained by {}", job.id),
                })
                .await;
            match created {
                Ok(_) | Err(kiln_registry::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(status(e)),
            }
        }
        // The metrics of the epoch whose weights are registered, and the test metrics.
        let mut metrics = std::collections::BTreeMap::new();
        let best = job
            .history
            .iter()
            .find(|r| r.epoch == job.best_epoch)
            .or(job.history.last());
        if let Some(last) = best {
            metrics.insert("train_loss".to_owned(), last.train_loss);
            let optional = [
                ("train_accuracy", last.train_accuracy),
                ("validation_loss", last.validation_loss),
                ("validation_accuracy", last.validation_accuracy),
            ];
            for (name, value) in optional {
                if let Some(v) = value {
                    metrics.insert(name.to_owned(), v);
                }
            }
        }
        if let Some(t) = &job.test {
            metrics.insert("test_loss".to_owned(), t.loss);
            if let Some(a) = t.accuracy {
                metrics.insert("test_accuracy".to_owned(), a);
            }
        }
        let version = self
            .registry
            .register_version(
                &job.model_name,
                NewVersion {
                    artifact,
                    source: format!("job:{}", job.id),
                    metrics,
                    preprocessing,
                },
            )
            .await
            .map_err(status)?;
        if let Some(alias) = &job.alias {
            self.registry
                .set_alias(&job.model_name, alias, version.version)
                .await
                .map_err(status)?;
        }
        let model = self
            .registry
            .get_model(&job.model_name)
            .await
            .map_err(status)?;
        Ok(version_to_proto(
            &version,
            &model.spec,
            &model.signature,
            "LOADING",
        ))
    }

    /// One run of the job on one worker (not one of `lost`), from its checkpoint if it has
    /// one. Errors of the job itself end it; a lost worker is reported for another try.
    async fn attempt(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        lost: &[String],
    ) -> Result<Attempt, Status> {
        // A job stays queued until a worker is there (e.g. right after start-up), bounded.
        let view = self
            .view
            .wait_for(WORKER_WAIT, |v| v.workers.keys().any(|w| !lost.contains(w)))
            .await
            .ok_or_else(|| {
                Status::unavailable(format!("no worker registered within {WORKER_WAIT:?}"))
            })?;
        if job.workers > 1 {
            return self.attempt_parallel(job, spec, lost).await;
        }
        // The worker running the fewest jobs right now (all equal: the first by id).
        let worker = self
            .least_busy(&view, lost)
            .into_iter()
            .next()
            .ok_or_else(|| Status::unavailable("no worker is available to train"))?;
        let request = self.run_request(job, spec, &view).await?;
        let lost_worker = |reason: String| Attempt::WorkerLost {
            worker: worker.id.clone(),
            reason,
        };
        let mut client = match connect(&worker.address).await? {
            Ok(client) => client,
            Err(reason) => return Ok(lost_worker(reason)),
        };
        let mut stream = match client.train(request).await {
            Ok(response) => response.into_inner(),
            Err(s) if worker_gone(&s) => return Ok(lost_worker(s.message().to_owned())),
            Err(s) => return Err(s),
        };
        self.started(job, std::slice::from_ref(&worker.id)).await?;
        loop {
            let message = match received(stream.message().await, "a result")? {
                Ok(message) => message,
                Err(reason) => return Ok(lost_worker(reason)),
            };
            match message.progress {
                Some(internal::train_progress::Progress::Epoch(m)) => {
                    self.epoch_ended(job, m).await?;
                }
                Some(internal::train_progress::Progress::Checkpoint(c)) => {
                    self.store_checkpoint(job, spec, c).await?;
                }
                Some(internal::train_progress::Progress::Result(r)) => {
                    return Ok(Attempt::Finished(r));
                }
                None => {}
            }
        }
    }
    /// The workers not in `lost`, those running the fewest jobs first (ties by id). Jobs
    /// per worker come from the jobs this coordinator runs (no store read).
    fn least_busy(
        &self,
        view: &kiln_registry::ClusterView,
        lost: &[String],
    ) -> Vec<kiln_registry::records::WorkerRecord> {
        let busy: HashMap<String, usize> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|r| r.workers.iter().cloned())
            .fold(HashMap::new(), |mut m, w| {
                *m.entry(w).or_default() += 1;
                m
            });
        let mut workers: Vec<_> = view
            .workers
            .values()
            .filter(|w| !lost.contains(&w.id))
            .cloned()
            .collect();
        workers.sort_by_key(|w| (busy.get(&w.id).copied().unwrap_or(0), w.id.clone()));
        workers
    }

    /// What a worker needs to run the job: weights to start from (the checkpoint's, a
    /// version's, or new seeded ones), the rows and the config.
    async fn run_request(
        &self,
        job: &JobRecord,
        spec: &ModelSpec,
        view: &kiln_registry::ClusterView,
    ) -> Result<internal::TrainRequest, Status> {
        let (init, resume_epoch, resume_optimizer_state) = match &job.checkpoint {
            Some(c) => (
                self.artifacts.get(&c.weights).await.map_err(status)?,
                c.epoch,
                self.artifacts
                    .get(&c.optimizer_state)
                    .await
                    .map_err(status)?,
            ),
            None => {
                let init = match &job.continue_from {
                    Some(reference) => {
                        let (name, selector) = reference.split_once(':').unwrap_or((reference, ""));
                        let (_, version) = view.resolve(name, selector).map_err(status)?;
                        self.artifacts
                            .get(&version.artifact)
                            .await
                            .map_err(status)?
                    }
                    None => Bytes::from(
                        MlpWeights::seeded(spec, job.config.seed)
                            .to_safetensors(spec)
                            .map_err(status)?,
                    ),
                };
                (init, 0, Bytes::new())
            }
        };
        let dataset = self.artifacts.get(&job.data).await.map_err(status)?;
        let validation_dataset = match &job.validation_data {
            Some(a) => self.artifacts.get(a).await.map_err(status)?,
            None => Bytes::new(),
        };
        let test_dataset = match &job.test_data {
            Some(a) => self.artifacts.get(a).await.map_err(status)?,
            None => Bytes::new(),
        };
        Ok(internal::TrainRequest {
            job_id: job.id.clone(),
            spec_json: Bytes::from(
                serde_json::to_vec(spec).map_err(|e| Status::internal(e.to_string()))?,
            ),
            init_weights: init,
            config_json: Bytes::from(
                serde_json::to_vec(&job.config).map_err(|e| Status::internal(e.to_string()))?,
            ),
            dataset,
            validation_dataset,
            test_dataset,
            resume_epoch,
            resume_optimizer_state,
        })
    }

    /// Record that the job runs now, on `workers`, and tell its watchers.
    async fn started(&self, job: &mut JobRecord, workers: &[String]) -> Result<(), Status> {
        job.state = JobState::Running;
        job.worker = workers.join(",");
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&job.id)
        {
            r.workers = workers.to_vec();
        }
        self.registry.put_job(job).await.map_err(status)?;
        self.publish(
            &job.id,
            event(
                JobState::Running,
                pb::training_event::Event::Started(job.worker.clone()),
            ),
        );
        Ok(())
    }

    /// Store a checkpoint's weights and optimizer state, and point the job at them.
    async fn store_checkpoint(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        c: internal::TrainCheckpoint,
    ) -> Result<(), Status> {
        MlpWeights::from_safetensors(spec, &c.weights).map_err(status)?;
        let weights = self.artifacts.put(c.weights).await.map_err(status)?;
        let optimizer_state = self
            .artifacts
            .put(c.optimizer_state)
            .await
            .map_err(status)?;
        job.checkpoint = Some(CheckpointRecord {
            epoch: c.epoch,
            weights,
            optimizer_state,
        });
        self.registry.put_job(job).await.map_err(status)
    }

    /// An epoch ended: keep its report and tell the watchers.
    async fn epoch_ended(&self, job: &mut JobRecord, m: pb::EpochMetrics) -> Result<(), Status> {
        tracing::info!(
            job = %job.id,
            epoch = m.epoch,
            train_loss = m.train_loss,
            validation_loss = m.validation_loss,
            validation_accuracy = m.validation_accuracy,
            elapsed_ms = m.elapsed_ms,
            "epoch ended"
        );
        let previous = job.history.last().map_or(0, |e| e.elapsed_ms);
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .epoch_seconds
            .observe(m.elapsed_ms.saturating_sub(previous) as f64 / 1000.0);
        job.history.push(epoch_from_proto(&m));
        self.registry.put_job(job).await.map_err(status)?;
        self.publish(
            &job.id,
            event(JobState::Running, pb::training_event::Event::Epoch(m)),
        );
        Ok(())
    }

    /// One data-parallel run of the job on up to `job.workers` workers (none of `lost`),
    /// from its checkpoint if it has one. Each step every replica applies the last batch's
    /// averaged gradients and computes its shard of the next; rank 0 reports the epochs.
    /// The first run waits for all the workers asked for; after a loss the job goes on
    /// with those left.
    async fn attempt_parallel(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        lost: &[String],
    ) -> Result<Attempt, Status> {
        use internal::shard_command::Command;
        use internal::shard_reply::Reply;
        let wanted = job.workers as usize;
        let need = if lost.is_empty() { wanted } else { 1 };
        let available =
            |v: &kiln_registry::ClusterView| v.workers.keys().filter(|w| !lost.contains(w)).count();
        let view = self
            .view
            .wait_for(WORKER_WAIT, |v| available(v) >= need)
            .await
            .ok_or_else(|| {
                let have = available(&self.view.current());
                Status::unavailable(format!(
                    "the job asks for {wanted} workers and {have} could take it within {WORKER_WAIT:?}"
                ))
            })?;
        let mut chosen = self.least_busy(&view, lost);
        chosen.truncate(wanted);
        let world = chosen.len() as u32;
        let request = self.run_request(job, spec, &view).await?;
        let lost_worker = |worker: &str, reason: String| Attempt::WorkerLost {
            worker: worker.to_owned(),
            reason,
        };

        // Open every replica: a command channel out, a reply stream back.
        let mut replicas = Vec::with_capacity(chosen.len());
        for (rank, worker) in chosen.iter().enumerate() {
            let mut client = match connect(&worker.address).await? {
                Ok(client) => client,
                Err(reason) => return Ok(lost_worker(&worker.id, reason)),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let setup = internal::ShardCommand {
                command: Some(Command::Setup(internal::ShardSetup {
                    run: Some(request.clone()),
                    rank: rank as u32,
                    world,
                })),
            };
            if tx.send(setup).await.is_err() {
                return Err(Status::internal("a replica's command channel closed"));
            }
            let stream = match client
                .train_shard(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(response) => response.into_inner(),
                Err(s) if worker_gone(&s) => {
                    return Ok(lost_worker(&worker.id, s.message().to_owned()));
                }
                Err(s) => return Err(s),
            };
            replicas.push(Replica {
                id: worker.id.clone(),
                commands: tx,
                replies: stream,
            });
        }
        let ready = match replies(&mut replicas).await? {
            Ok(replies) => replies,
            Err((id, reason)) => return Ok(lost_worker(&id, reason)),
        };
        for reply in ready {
            if !matches!(reply, Reply::Ready(_)) {
                return Err(Status::internal("a replica answered its setup out of turn"));
            }
        }
        let ids: Vec<String> = chosen.iter().map(|w| w.id.clone()).collect();
        self.started(job, &ids).await?;
        tracing::info!(job = %job.id, workers = %job.worker, "data-parallel run started");

        let mut step = internal::ShardStep::default();
        let (mut steps, mut step_time, mut communication) = (0u64, Duration::ZERO, Duration::ZERO);
        loop {
            let started = std::time::Instant::now();
            for r in &replicas {
                let command = internal::ShardCommand {
                    command: Some(Command::Step(step.clone())),
                };
                if r.commands.send(command).await.is_err() {
                    return Ok(lost_worker(&r.id, "its stream closed".into()));
                }
            }
            let answers = match replies(&mut replicas).await? {
                Ok(replies) => replies,
                Err((id, reason)) => return Ok(lost_worker(&id, reason)),
            };
            let mut stepped = Vec::with_capacity(replicas.len());
            for reply in answers {
                match reply {
                    Reply::Stepped(s) => stepped.push(s),
                    _ => return Err(Status::internal("a replica answered a step out of turn")),
                }
            }
            let lead = &mut stepped[0];
            if lead.epoch_ended {
                job.data_parallel = Some(DataParallelStats {
                    workers: world,
                    steps,
                    mean_step_ms: step_time.as_secs_f64() * 1e3 / steps.max(1) as f64,
                    mean_communication_ms: communication.as_secs_f64() * 1e3 / steps.max(1) as f64,
                });
                if let Some(m) = lead.epoch.take() {
                    self.epoch_ended(job, m).await?;
                }
                if let Some(c) = lead.checkpoint.take() {
                    self.store_checkpoint(job, spec, c).await?;
                }
                if lead.done {
                    let lead = &mut replicas[0];
                    let finish = internal::ShardCommand {
                        command: Some(Command::Finish(internal::ShardFinish {})),
                    };
                    if lead.commands.send(finish).await.is_err() {
                        return Ok(lost_worker(&lead.id, "its stream closed".into()));
                    }
                    return match received(lead.replies.message().await, "a result")? {
                        Ok(internal::ShardReply {
                            reply: Some(Reply::Result(r)),
                        }) => Ok(Attempt::Finished(r)),
                        Ok(_) => Ok(lost_worker(
                            &lead.id,
                            "it ended the run without a result".into(),
                        )),
                        Err(reason) => Ok(lost_worker(&lead.id, reason)),
                    };
                }
            }
            let shards: Vec<&internal::ShardGradients> = stepped
                .iter()
                .filter_map(|s| s.gradients.as_ref())
                .collect();
            if shards.is_empty() {
                // The update ended an epoch: the next step only computes.
                step = internal::ShardStep::default();
                continue;
            }
            if shards.len() != stepped.len() {
                return Err(Status::internal(
                    "the replicas disagree on where the epoch ends",
                ));
            }
            let parts: Vec<(usize, &[u8])> = shards
                .iter()
                .map(|g| (g.rows as usize, g.data.as_ref()))
                .collect();
            let averaged = average_gradients(&parts).map_err(|e| {
                Status::internal(format!("the replicas' gradients do not average: {e}"))
            })?;
            step = internal::ShardStep {
                gradients: Bytes::from(averaged),
                loss_sum: shards.iter().map(|g| g.loss_sum).sum(),
                correct: shards.iter().map(|g| g.correct).sum(),
            };
            let slowest = shards.iter().map(|g| g.compute_ns).max().unwrap_or(0);
            let elapsed = started.elapsed();
            steps += 1;
            step_time += elapsed;
            communication += elapsed.saturating_sub(Duration::from_nanos(slowest));
        }
    }
}

fn dataset_to_proto(d: &DatasetRecord) -> pb::DatasetInfo {
    pb::DatasetInfo {
        id: d.id.clone(),
        name: d.name.clone(),
        sha256: d.sha256.clone(),
        rows: d.rows,
        feature_columns: d.feature_columns.clone(),
        label_column: d.label_column.clone(),
        created_unix_ms: d.created_unix_ms,
        labels_sha256: d.labels_sha256.clone(),
        format: match d.format {
            DatasetFormat::Csv => pb::DatasetFormat::Csv,
            DatasetFormat::Npy => pb::DatasetFormat::Npy,
        } as i32,
    }
}

/// Where a scheduler's coordinator goes once it leads; empty while it stands by.
pub type CoordinatorSlot = Arc<std::sync::RwLock<Option<Arc<TrainingCoordinator>>>>;

/// `kiln.v1.Training` over the coordinator of the leading scheduler.
pub struct TrainingService {
    slot: CoordinatorSlot,
}

impl TrainingService {
    /// The service of a scheduler that may not lead yet: until a coordinator is put in
    /// `slot`, every call answers UNAVAILABLE.
    pub fn standby(slot: CoordinatorSlot) -> pb::training_server::TrainingServer<Self> {
        pb::training_server::TrainingServer::new(Self { slot })
            .max_decoding_message_size(256 * 1024 * 1024)
    }

    fn coordinator(&self) -> Result<Arc<TrainingCoordinator>, Status> {
        self.slot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                Status::unavailable(
                    "this scheduler is standing by (it does not lead the cluster); call the leader",
                )
            })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TrainingEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Training for TrainingService {
    async fn submit_training_job(
        &self,
        request: Request<pb::SubmitTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        Ok(Response::new(
            self.coordinator()?.submit(request.into_inner()).await?,
        ))
    }

    type WatchTrainingJobStream = EventStream;

    async fn watch_training_job(
        &self,
        request: Request<pb::WatchTrainingJobRequest>,
    ) -> Result<Response<Self::WatchTrainingJobStream>, Status> {
        let id = request.into_inner().id;
        let c = &self.coordinator()?;
        // Subscribe before reading the record, so nothing falls between history and live.
        let live = c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|r| r.events.subscribe());
        let job = c.registry.get_job(&id).await.map_err(status)?;
        let history = history_events(&job);
        let seen_epochs = job.history.len() as u32;
        let seen_start = !job.worker.is_empty();
        let completed = match (job.state, job.result_version) {
            (JobState::Succeeded, Some(v)) => {
                let view = c.registry.view().await.map_err(status)?;
                let (entry, version) = view
                    .resolve(&job.model_name, &v.to_string())
                    .map_err(status)?;
                Some(event(
                    JobState::Succeeded,
                    pb::training_event::Event::Completed(version_to_proto(
                        version,
                        &entry.record.spec,
                        &entry.record.signature,
                        "READY",
                    )),
                ))
            }
            _ => None,
        };
        let head = futures::stream::iter(history.into_iter().chain(completed).map(Ok));
        let tail = match (job.state.is_final(), live) {
            (false, Some(rx)) => tokio_stream::wrappers::BroadcastStream::new(rx)
                .filter_map(move |e| async move {
                    use pb::training_event::Event;
                    match e {
                        // Already sent as history.
                        Ok(pb::TrainingEvent {
                            event: Some(Event::Epoch(ref m)),
                            ..
                        }) if m.epoch <= seen_epochs => None,
                        Ok(pb::TrainingEvent {
                            event: Some(Event::Started(_)),
                            ..
                        }) if seen_start => None,
                        Ok(e) => Some(Ok(e)),
                        Err(_) => Some(Err(Status::data_loss(
                            "the watcher fell behind; watch again",
                        ))),
                    }
                })
                // Up to and including the event that ends the job.
                .scan(false, |ended, e| {
                    if *ended {
                        return futures::future::ready(None);
                    }
                    *ended = match &e {
                        Ok(ev) => matches!(
                            pb::JobState::try_from(ev.state),
                            Ok(pb::JobState::Succeeded
                                | pb::JobState::Failed
                                | pb::JobState::Cancelled)
                        ),
                        Err(_) => true,
                    };
                    futures::future::ready(Some(e))
                })
                .boxed(),
            _ => futures::stream::empty().boxed(),
        };
        Ok(Response::new(Box::pin(head.chain(tail))))
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let job = self
            .coordinator()?
            .registry
            .get_job(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(job_to_proto(&job)))
    }

    async fn list_training_jobs(
        &self,
        _: Request<pb::ListTrainingJobsRequest>,
    ) -> Result<Response<pb::ListTrainingJobsResponse>, Status> {
        let jobs = self
            .coordinator()?
            .registry
            .list_jobs()
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListTrainingJobsResponse {
            jobs: jobs.iter().map(job_to_proto).collect(),
        }))
    }

    async fn upload_dataset(
        &self,
        request: Request<tonic::Streaming<pb::UploadDatasetChunk>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        use pb::upload_dataset_chunk::Part;
        let mut chunks = request.into_inner();
        let header = match chunks.message().await? {
            Some(pb::UploadDatasetChunk {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be the header",
                ));
            }
        };
        validate_name("header.name", &header.name).map_err(status)?;
        let format = match pb::DatasetFormat::try_from(header.format) {
            Ok(pb::DatasetFormat::Csv) => DatasetFormat::Csv,
            Ok(pb::DatasetFormat::Npy) => DatasetFormat::Npy,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "header.format {} is not CSV (0) or NPY (1)",
                    header.format
                )));
            }
        };
        let max = self.coordinator()?.limits.max_upload_bytes;
        if header.size_bytes == 0 || header.size_bytes > max {
            return Err(Status::invalid_argument(format!(
                "header.size_bytes must be between 1 and {max} (the server's upload limit), got {}",
                header.size_bytes
            )));
        }
        let labels_size = match format {
            DatasetFormat::Csv if header.labels_size_bytes != 0 => {
                return Err(Status::invalid_argument(
                    "header.labels_size_bytes is for NPY uploads; a CSV file holds its labels",
                ));
            }
            DatasetFormat::Csv => 0,
            DatasetFormat::Npy => {
                let left = max - header.size_bytes;
                if header.labels_size_bytes == 0 || header.labels_size_bytes > left {
                    return Err(Status::invalid_argument(format!(
                        "header.labels_size_bytes must be between 1 and {left} (the server's upload limit less the features file), got {}",
                        header.labels_size_bytes
                    )));
                }
                header.labels_size_bytes
            }
        };
        let total = header.size_bytes + labels_size;
        // Everything stays in memory until the last byte: a broken upload leaves nothing.
        let mut file = Vec::with_capacity(total as usize);
        while let Some(chunk) = chunks.message().await? {
            match chunk.part {
                Some(Part::Data(bytes)) => {
                    if file.len() as u64 + bytes.len() as u64 > total {
                        return Err(Status::invalid_argument(format!(
                            "more bytes arrived than the header announced ({total})"
                        )));
                    }
                    file.extend_from_slice(&bytes);
                }
                _ => return Err(Status::invalid_argument("only data may follow the header")),
            }
        }
        if file.len() as u64 != total {
            return Err(Status::invalid_argument(format!(
                "the upload ended after {} of the {total} bytes the header announced; nothing was kept",
                file.len(),
            )));
        }
        let (features_file, labels_file) = file.split_at(header.size_bytes as usize);
        let sha256 = kiln_registry::sha256_hex(features_file);
        let (parsed, labels_sha256, label_column) = match format {
            DatasetFormat::Csv => {
                let text = std::str::from_utf8(features_file).map_err(|_| {
                    Status::invalid_argument(
                        "the dataset is not UTF-8 text (CSV); for NumPy files set header.format = NPY",
                    )
                })?;
                let parsed = parse_csv(text, &header.label_column).map_err(status)?;
                (parsed, String::new(), header.label_column)
            }
            DatasetFormat::Npy => {
                let parsed = parse_npy(features_file, labels_file).map_err(status)?;
                let label = if header.label_column.is_empty() {
                    "label".to_owned()
                } else {
                    header.label_column
                };
                (parsed, kiln_registry::sha256_hex(labels_file), label)
            }
        };
        let max_rows = self.coordinator()?.limits.max_rows;
        if parsed.rows > max_rows {
            return Err(Status::invalid_argument(format!(
                "the dataset has {} rows; at most {max_rows} are allowed (the server's row limit)",
                parsed.rows
            )));
        }
        let bytes =
            encode_dataset(&parsed.features, &parsed.labels, parsed.rows).map_err(status)?;
        let c = &self.coordinator()?;
        let artifact = c.artifacts.put(Bytes::from(bytes)).await.map_err(status)?;
        let created = now_unix_ms();
        let record = DatasetRecord {
            schema: SCHEMA,
            // The id comes from every byte uploaded (for NPY, both files).
            id: format!("ds-{}", &kiln_registry::sha256_hex(&file)[..16]),
            name: header.name,
            sha256,
            rows: parsed.rows as u64,
            feature_columns: parsed.feature_columns,
            label_column,
            artifact,
            created_unix_ms: created,
            format,
            labels_sha256,
        };
        c.registry.put_dataset(&record).await.map_err(status)?;
        Ok(Response::new(dataset_to_proto(&record)))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self
            .coordinator()?
            .registry
            .list_datasets()
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: datasets.iter().map(dataset_to_proto).collect(),
        }))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        self.coordinator()?
            .registry
            .delete_dataset(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteDatasetResponse {}))
    }

    async fn cancel_training_job(
        &self,
        request: Request<pb::CancelTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let id = request.into_inner().id;
        let c = &self.coordinator()?;
        let job = c.registry.get_job(&id).await.map_err(status)?;
        if job.state.is_final() {
            return Ok(Response::new(job_to_proto(&job)));
        }
        let cancel = c
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|r| r.cancel.clone());
        if let Some(cancel) = cancel {
            let _ = cancel.send(true);
        }
        // The run records the end; wait briefly so the answer shows it.
        for _ in 0..100 {
            let job = c.registry.get_job(&id).await.map_err(status)?;
            if job.state.is_final() {
                return Ok(Response::new(job_to_proto(&job)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::new(job_to_proto(
            &c.registry.get_job(&id).await.map_err(status)?,
        )))
    }
}
