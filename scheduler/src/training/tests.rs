//! The coordinator against fake workers: gRPC services that answer `Worker/Train` as a
//! script says, reached through the in-process transport (`kiln_rpc::local`) as `kiln up`
//! reaches its workers: no socket, the same handlers and codec. No Burn: these tests check the coordinator's own part
//! (records, events, retries on another worker, the registered version), not training.

use std::time::Instant;

use kiln_proto::kiln::internal::v1::worker_server::{Worker, WorkerServer};
use kiln_proto::kiln::v1::training_server::Training;
use kiln_registry::MemoryStore;

use super::*;

const PREFIX: &str = "/kiln/v1/";

/// How a fake worker answers a training run.
#[derive(Clone, Copy)]
enum Script {
    /// Two epochs, then the request's own initial weights as the result.
    Train,
    /// One epoch, then the stream fails as when the worker process dies.
    DieAfterOneEpoch,
    /// One epoch, then the run fails on the worker (a job error, not a lost worker).
    FailAfterOneEpoch,
}

struct FakeWorker {
    script: Script,
    /// The jobs this worker was asked to run.
    runs: Arc<Mutex<Vec<String>>>,
}

type TrainStream =
    Pin<Box<dyn Stream<Item = Result<internal::TrainProgress, Status>> + Send + 'static>>;

fn epoch(n: u32) -> internal::TrainProgress {
    internal::TrainProgress {
        progress: Some(internal::train_progress::Progress::Epoch(
            pb::EpochMetrics {
                epoch: n,
                train_loss: 1.0 / f64::from(n),
                samples_per_second: 100.0,
                ..Default::default()
            },
        )),
    }
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    type TrainStream = TrainStream;
    type TrainShardStream =
        Pin<Box<dyn Stream<Item = Result<internal::ShardReply, Status>> + Send + 'static>>;

    type GenerateStream =
        Pin<Box<dyn Stream<Item = Result<internal::GenerateEvent, Status>> + Send + 'static>>;

    async fn infer(
        &self,
        _: Request<internal::InferRequest>,
    ) -> Result<Response<internal::InferResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn generate(
        &self,
        _: Request<internal::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn load(
        &self,
        _: Request<internal::LoadRequest>,
    ) -> Result<Response<internal::LoadResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn unload(
        &self,
        _: Request<internal::UnloadRequest>,
    ) -> Result<Response<internal::UnloadResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn status(
        &self,
        _: Request<internal::StatusRequest>,
    ) -> Result<Response<internal::WorkerStatus>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn train_shard(
        &self,
        _: Request<tonic::Streaming<internal::ShardCommand>>,
    ) -> Result<Response<Self::TrainShardStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn train(
        &self,
        request: Request<internal::TrainRequest>,
    ) -> Result<Response<TrainStream>, Status> {
        let request = request.into_inner();
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.job_id.clone());
        let messages: Vec<Result<internal::TrainProgress, Status>> = match self.script {
            Script::Train => vec![
                Ok(epoch(1)),
                Ok(epoch(2)),
                Ok(internal::TrainProgress {
                    progress: Some(internal::train_progress::Progress::Result(
                        internal::TrainResult {
                            weights: request.init_weights.clone(),
                            best_epoch: 2,
                            ..Default::default()
                        },
                    )),
                }),
            ],
            Script::DieAfterOneEpoch => vec![
                Ok(epoch(1)),
                Err(Status::unavailable("the worker process went away")),
            ],
            Script::FailAfterOneEpoch => vec![
                Ok(epoch(1)),
                Err(Status::failed_precondition(
                    "training failed: the loss is not a number",
                )),
            ],
        };
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }
}

/// A number no other fixture in this process has.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A cluster state in memory with the fake workers registered, and a coordinator on it.
struct Fixture {
    coordinator: Arc<TrainingCoordinator>,
    registry: Registry,
    runs: Vec<Arc<Mutex<Vec<String>>>>,
    /// The fake workers' records, in script order.
    workers: Vec<kiln_core::records::WorkerRecord>,
    _artifacts: tempfile::TempDir,
}

async fn fixture(scripts: &[Script]) -> Fixture {
    let store: Arc<dyn kiln_registry::KvStore> = Arc::new(MemoryStore::new());
    let registry = Registry::new(store.clone(), PREFIX);
    let dir = tempfile::tempdir().unwrap();
    let artifacts = ArtifactStore::open(&dir.path().to_string_lossy()).unwrap();
    let mut runs = Vec::new();
    let mut workers = Vec::new();
    for (i, script) in scripts.iter().enumerate() {
        // Unique per fixture: tests run in parallel in one process, and the in-process
        // registry is the process's.
        let address = format!("fake-{}-{i}.in-process:1", unique());
        let worker_runs = Arc::new(Mutex::new(Vec::new()));
        runs.push(worker_runs.clone());
        kiln_rpc::local::register(
            &address,
            WorkerServer::new(FakeWorker {
                script: *script,
                runs: worker_runs,
            }),
        );
        let lease = registry.grant_lease(Duration::from_secs(60)).await.unwrap();
        let record = kiln_core::records::WorkerRecord {
            schema: SCHEMA,
            // Ids sort in script order: the coordinator takes the least busy, then by id.
            id: format!("fake-{i}"),
            address,
            backend: "cpu".into(),
            adapter: "fake".into(),
            loaded: Vec::new(),
            started_unix_ms: now_unix_ms(),
            memory_bytes: 0,
            training: 0,
        };
        registry.put_worker(&record, lease).await.unwrap();
        workers.push(record);
    }
    let view = WatchedView::start(store, PREFIX.into()).await.unwrap();
    let coordinator =
        TrainingCoordinator::start(registry.clone(), artifacts, view, TrainingLimits::default())
            .await
            .unwrap();
    Fixture {
        coordinator,
        registry,
        runs,
        workers,
        _artifacts: dir,
    }
}

fn job_spec(name: &str) -> pb::TrainingJobSpec {
    pb::TrainingJobSpec {
        model_name: name.into(),
        spec: Some(pb::ArchitectureSpec {
            family: Some(pb::architecture_spec::Family::Mlp(pb::MlpSpec {
                input_width: 2,
                hidden: vec![4],
                activation: pb::Activation::Relu as i32,
                output_width: 1,
                task: pb::Task::BinaryClassification as i32,
            })),
        }),
        seed: 1,
        data: Some(pb::InlineData {
            features: vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
            labels: vec![1.0, 1.0, 0.0, 0.0],
            rows: 4,
        }),
        epochs: 2,
        batch_size: 2,
        ..Default::default()
    }
}

/// Submit `spec` and wait for the job to end; its record as the API gives it.
async fn run_to_end(f: &Fixture, spec: pb::TrainingJobSpec) -> pb::TrainingJob {
    let service = TrainingService {
        slot: Arc::new(std::sync::RwLock::new(Some(f.coordinator.clone()))),
    };
    let submitted = service
        .submit_training_job(Request::new(pb::SubmitTrainingJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = service
            .get_training_job(Request::new(pb::GetTrainingJobRequest {
                id: submitted.id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        let state = pb::JobState::try_from(job.state).unwrap();
        if !matches!(state, pb::JobState::Queued | pb::JobState::Running) {
            return job;
        }
        assert!(Instant::now() < deadline, "the job did not end: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_job_runs_on_a_worker_and_its_result_becomes_a_version() {
    let f = fixture(&[Script::Train]).await;
    let job = run_to_end(&f, job_spec("fake-trained")).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(
        job.history.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        [1, 2],
        "every epoch the worker reported is recorded"
    );
    assert_eq!(job.worker, "fake-0");
    assert_eq!(job.result_version, 1);
    let model = f.registry.get_model("fake-trained").await.unwrap();
    assert_eq!(model.last_version, 1);
    assert_eq!(*f.runs[0].lock().unwrap(), vec![job.id.clone()]);
}

#[tokio::test]
async fn a_job_goes_to_a_worker_without_latency_critical_replicas_when_there_is_one() {
    use kiln_core::records::{LoadState, LoadedRecord, VersionKey};
    let f = fixture(&[Script::Train, Script::Train]).await;
    // fake-0 (first by id, and as idle as fake-1) serves a version of a deployment that
    // avoids training (the default for more than one replica).
    let mut serving = f.workers[0].clone();
    serving.loaded = vec![LoadedRecord {
        key: VersionKey {
            model: "served".into(),
            version: 1,
        },
        state: LoadState::Ready,
        reason: String::new(),
        last_used_unix_ms: 0,
    }];
    let lease = f
        .registry
        .grant_lease(Duration::from_secs(60))
        .await
        .unwrap();
    f.registry.put_worker(&serving, lease).await.unwrap();
    // The coordinator's watched view follows the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = run_to_end(&f, job_spec("fake-placed")).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(
        job.worker, "fake-1",
        "the job went to the worker serving a model"
    );
}

#[tokio::test]
async fn a_lost_worker_hands_the_job_to_another_that_finishes_it() {
    let f = fixture(&[Script::DieAfterOneEpoch, Script::Train]).await;
    let job = run_to_end(&f, job_spec("fake-retried")).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.worker, "fake-1", "the second worker finished it");
    assert_eq!(
        f.runs[0].lock().unwrap().len(),
        1,
        "the first worker was tried once"
    );
    assert_eq!(f.runs[1].lock().unwrap().len(), 1);
    // Without a checkpoint the run starts over: the epochs are the second worker's.
    assert_eq!(
        job.history.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        [1, 2]
    );
}

#[tokio::test]
async fn a_run_that_fails_on_its_worker_fails_the_job_with_the_workers_reason() {
    let f = fixture(&[Script::FailAfterOneEpoch, Script::Train]).await;
    let job = run_to_end(&f, job_spec("fake-failed")).await;
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    assert_eq!(job.reason, "training failed: the loss is not a number");
    assert!(
        f.runs[1].lock().unwrap().is_empty(),
        "a job error is not retried on another worker"
    );
    assert!(
        f.registry.get_model("fake-failed").await.is_err(),
        "nothing is registered"
    );
}
