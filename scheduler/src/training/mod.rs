//! The training coordinator: `kiln.v1.Training`. It records every job in the cluster
//! state, runs it on a worker (`kiln.internal.v1.Worker/Train`), keeps the record current
//! epoch by epoch, fans events out to watchers, and on success stores the weights and
//! registers the new version — served at once, since the placement controller picks it up.
//!
//! - this module: the coordinator itself (start, launch, stop, events, metrics);
//! - [`submit`]: checking a submission and resolving its rows;
//! - [`run`]: running a job on one worker, with retries on another when a worker is lost;
//! - [`parallel`]: synchronous data-parallel runs over several workers;
//! - [`service`]: the `kiln.v1.Training` service, datasets included;
//! - [`convert`]: job records and epochs to and from the wire.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_core::MlpWeights;
use kiln_core::parallel::{MAX_REPLICAS, average_gradients};
use kiln_core::records::{ArtifactRef, SCHEMA, now_unix_ms};
use kiln_core::spec::{ModelSpec, Signature, Standardization, validate_name};
use kiln_core::training::{
    CheckpointRecord, DataParallelStats, Dataset, DatasetFormat, DatasetRecord, EarlyStopping,
    EvaluationReport, JobData, JobRecord, JobState, Loss, NewModelSpec, Optimizer, StopMetric,
    TrainingConfig, TrainingLimits, decode_dataset, encode_dataset, parse_csv, parse_npy, validate,
};
use kiln_core::weights::SplitMix64;
use kiln_proto::kiln::internal::v1 as internal;
use kiln_proto::kiln::internal::v1::worker_client::WorkerClient;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_server::Training;
use kiln_registry::{ArtifactStore, NewModel, NewVersion, Registry, WatchedView};
use kiln_telemetry::metrics::Families;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{Error, Result};

use kiln_core::convert::{signature_from_proto, spec_from_proto, version_to_proto};

/// How long a queued job waits for a worker to register before it fails.
const WORKER_WAIT: Duration = Duration::from_secs(60);

/// Events a watcher may be behind before it is cut off (it can watch again).
const WATCH_BUFFER: usize = 1024;

/// Workers a job may lose before it fails.
const MAX_WORKER_LOSSES: usize = 3;

mod convert;
mod parallel;
mod run;
mod service;
mod submit;
#[cfg(test)]
mod tests;

pub use convert::job_to_proto;
use convert::*;
pub use kiln_core::convert::{epoch_from_proto, epoch_to_proto};
use run::{Attempt, connect, received, worker_gone};
pub use service::{CoordinatorSlot, TrainingService};

/// A job this coordinator is running.
pub(super) struct Running {
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
pub(super) struct CoordinatorStats {
    /// Jobs ended, by final state: succeeded, failed, cancelled.
    ended: [u64; 3],
    /// Each epoch's wall time.
    epoch_seconds: kiln_telemetry::metrics::Histogram,
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

    pub(super) fn publish(&self, id: &str, e: pb::TrainingEvent) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            let _ = r.events.send(e);
        }
    }
}
