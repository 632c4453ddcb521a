//! `kiln bench`: ModelInfer throughput and latency through the gateway and straight to a
//! worker, at several concurrencies and batch sizes, with batching on and off. It starts
//! its own embedded cluster (one worker) in a temporary directory and prints a Markdown
//! table (see docs/benchmarks.md for the method).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use kiln_core::MlpWeights;
use kiln_core::records::{BatchingSettings, DeploymentRecord, SCHEMA};
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Task};
use kiln_gateway::GatewayConfig;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::{ModelInferRequest, ModelReadyRequest};
use kiln_proto::kiln::internal::v1 as internal;
use kiln_proto::kiln::internal::v1::worker_client::WorkerClient;
use kiln_registry::{ArtifactStore, FileStore, KvStore, NewModel, NewVersion, Registry};
use kiln_worker::DeviceChoice;

use crate::embedded::{self, PREFIX, UpConfig};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Concurrent callers to try.
    pub concurrency: Vec<usize>,
    /// Rows per request to try.
    pub batch: Vec<usize>,
    /// How long each cell runs.
    pub duration: Duration,
    /// The worker's device.
    pub device: DeviceChoice,
    /// Hidden layer widths of the benchmarked MLP (10 inputs, 1 sigmoid output).
    pub hidden: Vec<u32>,
}

/// One measured cell.
#[derive(Debug, Clone)]
pub struct Cell {
    /// `gateway`, `worker`, or `rpc floor` (an empty worker call).
    pub path: &'static str,
    /// Batching on or off.
    pub batching: bool,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Rows per request.
    pub batch: usize,
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Failed requests.
    pub errors: u64,
}

fn bench_spec(hidden: &[u32]) -> ModelSpec {
    ModelSpec::Mlp(MlpSpec {
        input_width: 10,
        hidden: hidden.to_vec(),
        activation: Activation::Relu,
        output_width: 1,
        task: Task::BinaryClassification,
    })
}

/// The model names: batching on, or off for one request size (max_batch_size = its rows).
fn model_name(batching: bool, batch: usize) -> String {
    if batching {
        "bench-batched".into()
    } else {
        format!("bench-unbatched-{batch}")
    }
}

async fn prepare(dir: &std::path::Path, batches: &[usize], hidden: &[u32]) -> anyhow::Result<()> {
    let store: Arc<dyn KvStore> = Arc::new(FileStore::open(&dir.join("state.redb"))?);
    let artifacts = ArtifactStore::open(&dir.join("artifacts").to_string_lossy())?;
    let registry = Registry::new(store, PREFIX);
    let spec = bench_spec(hidden);
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(64) as u32;
    let mut models = vec![(
        model_name(true, 0),
        BatchingSettings {
            max_batch_size: max_batch * 2,
            max_queue_delay_us: 0,
            max_queue_size: 4096,
        },
    )];
    for b in batches {
        models.push((
            model_name(false, *b),
            BatchingSettings {
                max_batch_size: *b as u32,
                max_queue_delay_us: 0,
                max_queue_size: 4096,
            },
        ));
    }
    for (name, batching) in models {
        registry
            .set_deployment(&DeploymentRecord {
                schema: SCHEMA,
                model: name.clone(),
                replicas: None,
                loaded: true,
                batching,
                device: Default::default(),
                shard_rows: None,
                avoid_training: None,
            })
            .await?;
        registry
            .create_model(NewModel {
                name: name.clone(),
                spec: spec.clone(),
                signature: Signature::default(),
                description: "kiln bench".into(),
            })
            .await?;
        let bytes = MlpWeights::seeded(&spec, 1).to_safetensors(&spec)?;
        let artifact = artifacts.put(Bytes::from(bytes)).await?;
        registry
            .register_version(&name, NewVersion::new(artifact, "seed:1"))
            .await?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What one closed-loop run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Successful requests a second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th-percentile latency.
    pub p99: Duration,
    /// The slowest request.
    pub max: Duration,
    /// Failed calls.
    pub errors: u64,
}

/// Run `call` from `concurrency` callers in a closed loop for `duration`: requests a
/// second, p50, p99 and maximum latency, and the number of failed calls.
pub async fn run_cell<F, Fut>(concurrency: usize, duration: Duration, call: F) -> Measured
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // A short warm-up so connections and the first kernels are not measured.
    let warm = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm {
        call().await;
    }
    let start = Instant::now();
    let end = start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    if call().await {
                        latencies.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    Measured {
        rps: all.len() as f64 / elapsed,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        max: all.last().copied().unwrap_or_default(),
        errors,
    }
}

/// Run the benchmark and return every cell.
pub async fn run(config: BenchConfig) -> anyhow::Result<Vec<Cell>> {
    let dir = tempfile::tempdir()?;
    prepare(dir.path(), &config.batch, &config.hidden).await?;
    let cluster = embedded::start(UpConfig {
        grpc_addr: "127.0.0.1:0".parse()?,
        workers: 1,
        data_dir: dir.path().to_path_buf(),
        device: config.device.clone(),
        gateway: GatewayConfig::default(),
        lease_ttl: Duration::from_secs(10),
        training_limits: Default::default(),
        worker_memory_bytes: 0,
        training_slice: kiln_worker::DEFAULT_TRAINING_SLICE,
        training_share: kiln_worker::DEFAULT_TRAINING_SHARE,
        metrics_addr: None,
        tls: None,
    })
    .await?;
    // Measured as users run it: with token authentication on.
    let token = cluster
        .admin_token
        .as_ref()
        .and_then(|t| t.created.clone())
        .context("the benchmark cluster made no admin token")?;
    let channel = kiln_rpc::channel::connect(&cluster.addr.to_string()).await?;
    let oip = GrpcInferenceServiceClient::with_interceptor(
        channel,
        crate::client::Bearer::new(Some(&token))?,
    );
    // Wait for every model, then find the worker's own address for the direct path.
    let mut names = vec![model_name(true, 0)];
    names.extend(config.batch.iter().map(|b| model_name(false, *b)));
    for name in &names {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = oip
                .clone()
                .model_ready(ModelReadyRequest {
                    name: name.clone(),
                    version: String::new(),
                })
                .await?
                .into_inner()
                .ready;
            if ready {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let worker_addr = worker_address(&cluster)
        .await
        .context("no worker address")?;
    let worker_channel = kiln_rpc::channel::connect(&worker_addr).await?;
    let worker = WorkerClient::new(worker_channel);

    let mut cells = Vec::new();
    for &batch in &config.batch {
        let features: Vec<f32> = (0..batch * 10).map(|i| (i % 7) as f32 / 7.0).collect();
        let raw = Bytes::from(
            features
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        for batching in [true, false] {
            let name = model_name(batching, batch);
            for &concurrency in &config.concurrency {
                for path in ["gateway", "worker"] {
                    let Measured {
                        rps,
                        p50,
                        p99,
                        errors,
                        ..
                    } = if path == "gateway" {
                        let client = oip.clone();
                        let request = ModelInferRequest {
                            model_name: name.clone(),
                            inputs: vec![InferInputTensor {
                                name: "input".into(),
                                datatype: "FP32".into(),
                                shape: vec![batch as i64, 10],
                                ..Default::default()
                            }],
                            raw_input_contents: vec![raw.clone()],
                            ..Default::default()
                        };
                        run_cell(concurrency, config.duration, move || {
                            let mut client = client.clone();
                            let request = request.clone();
                            async move { client.model_infer(request).await.is_ok() }
                        })
                        .await
                    } else {
                        let client = worker.clone();
                        let request = internal::InferRequest {
                            model: name.clone(),
                            version: 1,
                            inputs: vec![internal::Tensor {
                                name: "input".into(),
                                datatype: "FP32".into(),
                                shape: vec![batch as u64, 10],
                                data: raw.clone(),
                            }],
                        };
                        run_cell(concurrency, config.duration, move || {
                            let mut client = client.clone();
                            let request = request.clone();
                            async move { client.infer(request).await.is_ok() }
                        })
                        .await
                    };
                    let cell = Cell {
                        path,
                        batching,
                        concurrency,
                        batch,
                        rps,
                        p50,
                        p99,
                        errors,
                    };
                    eprintln!("{}", row(&cell));
                    cells.push(cell);
                }
            }
        }
    }
    // The floor: a bare loopback gRPC round trip (Worker/Status: no model, no compute),
    // which is what the gateway hop adds at the least.
    for &concurrency in &config.concurrency {
        let client = worker.clone();
        let Measured {
            rps,
            p50,
            p99,
            errors,
            ..
        } = run_cell(concurrency, config.duration, move || {
            let mut client = client.clone();
            async move { client.status(internal::StatusRequest {}).await.is_ok() }
        })
        .await;
        let cell = Cell {
            path: "rpc floor",
            batching: false,
            concurrency,
            batch: 0,
            rps,
            p50,
            p99,
            errors,
        };
        eprintln!("{}", row(&cell));
        cells.push(cell);
    }
    cluster.stop().await?;
    Ok(cells)
}

async fn worker_address(cluster: &embedded::Embedded) -> Option<String> {
    cluster.worker_addresses().await.into_iter().next()
}

/// One Markdown table row.
pub fn row(c: &Cell) -> String {
    format!(
        "| {} | {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {} |",
        c.path,
        match (c.path, c.batching) {
            ("rpc floor", _) => "-",
            (_, true) => "on",
            (_, false) => "off",
        },
        c.concurrency,
        c.batch,
        c.rps,
        c.rps * c.batch as f64,
        c.p50.as_secs_f64() * 1e3,
        c.p99.as_secs_f64() * 1e3,
        c.errors
    )
}

/// The whole table.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| path | batching | concurrency | batch | requests/s | rows/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        out.push_str(&row(c));
        out.push('\n');
    }
    out
}
