//! A worker in the cluster: it registers itself under a lease, follows the placement the
//! scheduler writes for it (loading and unloading versions), reports what it holds, and
//! serves `kiln.internal.v1.Worker`.
//!
//! - this module: configuration, the worker's shared state, and [`serve`];
//! - [`membership`]: registration under a lease;
//! - [`placement`]: following placements, loading and unloading versions;
//! - [`run`]: training runs; [`replica`]: data-parallel replicas;
//! - [`service`]: the gRPC service.

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
use kiln_core::convert::epoch_to_proto;
use kiln_core::parallel::{MAX_REPLICAS, f32_from_bytes, f32_to_bytes};
use kiln_core::spec::ModelSpec;
use kiln_core::tensor::{Interface, tensor_from_proto, tensor_to_proto};
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
    /// The longest a training run holds the device at a time: batches are trained in
    /// slices of about this much compute, so inference waits at most one (zero: whole
    /// batches).
    pub training_slice: Duration,
    /// The share of the device training may take while inference is being served (0 to 1;
    /// 1: it never waits for inference).
    pub training_share: f64,
}

/// The default of [`WorkerConfig::training_slice`] (docs/training.md: how it was chosen).
pub const DEFAULT_TRAINING_SLICE: Duration = Duration::from_millis(5);

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
    /// What its requests must hold (checked before they are queued).
    pub(crate) interface: Interface,
    /// Its spec: the family's own request checks.
    pub(crate) spec: ModelSpec,
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
    /// Slice budget of training runs ([`WorkerConfig::training_slice`]).
    pub(crate) training_slice: Duration,
    /// How long model loads took, by outcome (success, failure).
    pub(crate) load_seconds: Mutex<[kiln_telemetry::metrics::Histogram; 2]>,
    /// Time to first token, between tokens, and in the queue, of generations.
    pub(crate) generation_metrics: crate::metrics::GenerationMetrics,
    /// FP32 parameter bytes of each version served.
    pub(crate) weight_bytes: Mutex<HashMap<VersionKey, u64>>,
}

/// Run a worker on `listener` until `shutdown` resolves, then drain: deregister (revoke the
/// lease), finish in-flight calls, stop.
pub async fn serve(
    config: WorkerConfig,
    listener: impl Into<kiln_rpc::net::Listener>,
    deps: WorkerDeps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = listener.into();
    let choice = config.device.clone();
    let selected = tokio::task::spawn_blocking(move || select_device(&choice))
        .await
        .map_err(|e| Error::Device(e.to_string()))?
        .map_err(|e| Error::Device(format!("cannot open device {}: {e}", config.device)))?;
    tracing::info!(worker = %config.id, backend = selected.backend, adapter = %selected.adapter, "device ready");
    let engine = EngineHandle::spawn(selected.device.clone(), &config.id, config.training_share)
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
        training_slice: config.training_slice,
        generation_metrics: Default::default(),
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
        .serve_with_incoming_shutdown(listener.incoming(), on_shutdown);
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

mod generate;
mod membership;
mod placement;
mod replica;
mod run;
mod service;

use membership::*;
use placement::*;
use replica::*;
use run::*;
use service::*;

/// A mutex's guard, whether or not a holder panicked: the worker's state stays usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
