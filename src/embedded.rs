//! `kiln up`: gateway, scheduler and N workers in one process, wired through the same gRPC
//! code paths over loopback, with the embedded file store and a local artifact directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use kiln_core::MlpWeights;
use kiln_core::spec::{Activation, MlpSpec, ModelSpec, Signature, Task};
use kiln_gateway::{GatewayConfig, GatewayDeps};
use kiln_registry::{
    ArtifactStore, FileStore, KvStore, NewModel, NewVersion, Registry, WatchedView,
};
use kiln_worker::{DeviceChoice, WorkerConfig, WorkerDeps};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Key prefix of the cluster state (the same layout etcd uses in cluster mode).
pub const PREFIX: &str = "/kiln/v1/";
/// Name of the demo model created on first start.
pub const DEMO_MODEL: &str = "demo-mlp";
/// Seed of the demo model's weights.
pub const DEMO_SEED: u64 = 42;

/// How `kiln up` runs.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// Where the gateway listens (port 0: any free port).
    pub grpc_addr: SocketAddr,
    /// How many workers.
    pub workers: usize,
    /// State and artifacts live here.
    pub data_dir: PathBuf,
    /// The workers' device.
    pub device: DeviceChoice,
    /// Gateway settings.
    pub gateway: GatewayConfig,
    /// Lease TTL of the workers' registrations.
    pub lease_ttl: Duration,
    /// Caps on what one training job or upload may ask for.
    pub training_limits: kiln_core::training::TrainingLimits,
    /// Bytes of model weights each worker may hold (0: no limit; the least recently used
    /// versions give way).
    pub worker_memory_bytes: u64,
    /// The longest a training run holds a worker's device at a time (zero: whole batches).
    pub training_slice: Duration,
    /// The share of a worker's device training may take while inference is served.
    pub training_share: f64,
    /// Serve the Prometheus metrics of every part (gateway, workers labelled by id,
    /// scheduler) at `http://ADDR/metrics` (None: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// TLS of the gateway's listener (the other parts talk in-process or over loopback).
    pub tls: Option<kiln_rpc::tls::ServerTlsFiles>,
}

/// The admin token of a `kiln up` with authentication on.
#[derive(Debug, Clone)]
pub struct AdminToken {
    /// The file that holds it (mode 0600, in the data directory).
    pub path: PathBuf,
    /// The token, when this start made it (it is printed once).
    pub created: Option<String>,
}

/// A running embedded cluster.
pub struct Embedded {
    /// The gateway's bound address.
    pub addr: SocketAddr,
    /// The admin token (None with `--auth off`).
    pub admin_token: Option<AdminToken>,
    stop: watch::Sender<bool>,
    registry: Registry,
    /// Lets `stop` wait until every component has let go of the state file.
    store: std::sync::Weak<dyn KvStore>,
    gateway: JoinHandle<Result<(), tonic::transport::Error>>,
    others: Vec<JoinHandle<()>>,
    /// The `/metrics` endpoint, if served; it holds the coordinator, so it stops first.
    metrics: Option<JoinHandle<()>>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The demo model's spec: 10 FP32 inputs, one hidden layer of 16 (ReLU), one sigmoid output.
pub fn demo_spec() -> ModelSpec {
    ModelSpec::Mlp(MlpSpec {
        input_width: 10,
        hidden: vec![16],
        activation: Activation::Relu,
        output_width: 1,
        task: Task::BinaryClassification,
    })
}

async fn create_demo_model(registry: &Registry, artifacts: &ArtifactStore) -> anyhow::Result<()> {
    let spec = demo_spec();
    registry
        .create_model(NewModel {
            name: DEMO_MODEL.into(),
            spec: spec.clone(),
            signature: Signature::default(),
            description: "Demo: 10 FP32 features -> probability (seeded weights)".into(),
        })
        .await?;
    let bytes = MlpWeights::seeded(&spec, DEMO_SEED).to_safetensors(&spec)?;
    let artifact = artifacts.put(Bytes::from(bytes)).await?;
    registry
        .register_version(
            DEMO_MODEL,
            NewVersion::new(artifact, format!("seed:{DEMO_SEED}")),
        )
        .await?;
    Ok(())
}

/// The admin token in `data_dir`: kept when the file holds a token the cluster knows,
/// else a new one (named `admin`, or `admin-N` when taken) written there with mode 0600 —
/// deleting the file and restarting is how a lost token is replaced.
async fn ensure_admin_token(registry: &Registry, data_dir: &Path) -> anyhow::Result<AdminToken> {
    let path = data_dir.join(crate::client::ADMIN_TOKEN_FILE);
    let tokens = registry.list_tokens().await?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        let hash = kiln_core::auth::token_hash(text.trim());
        if tokens.iter().any(|t| t.sha256 == hash) {
            return Ok(AdminToken {
                path,
                created: None,
            });
        }
    }
    let taken = |name: &str| tokens.iter().any(|t| t.name == name);
    let name = std::iter::once("admin".to_owned())
        .chain((2..).map(|n| format!("admin-{n}")))
        .find(|n| !taken(n))
        .unwrap_or_else(|| "admin".to_owned());
    let (_, secret) = registry
        .create_token(&name, kiln_core::auth::Role::Admin, Default::default())
        .await?;
    write_private(&path, &secret)
        .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
    Ok(AdminToken {
        path,
        created: Some(secret),
    })
}

/// Write `text` to `path` readable by its owner only (through a temporary file, so the
/// token is never in a file others can read, and a crash leaves the old file whole).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Start everything and return once the gateway is listening.
pub async fn start(config: UpConfig) -> anyhow::Result<Embedded> {
    if config.workers == 0 || config.workers > 64 {
        anyhow::bail!("--workers must be between 1 and 64, got {}", config.workers);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let state_path = config.data_dir.join("state.redb");
    let store: Arc<dyn KvStore> = Arc::new(
        FileStore::open(&state_path)
            .with_context(|| format!("cannot open the state store {}", state_path.display()))?,
    );
    let artifacts = ArtifactStore::open(&config.data_dir.join("artifacts").to_string_lossy())?;
    let registry = Registry::new(store.clone(), PREFIX);
    if registry.view().await?.models.is_empty() {
        create_demo_model(&registry, &artifacts).await?;
        tracing::info!(model = DEMO_MODEL, "created the demo model");
    }
    let admin_token = if config.gateway.auth {
        Some(ensure_admin_token(&registry, &config.data_dir).await?)
    } else {
        None
    };
    let view = WatchedView::start(store.clone(), PREFIX.to_owned()).await?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(crate::cluster::bind_metrics(addr).await?),
        None => None,
    };
    let gateway_listener =
        crate::cluster::bind(config.grpc_addr, None, config.tls.as_ref()).await?;
    let addr = gateway_listener.local_addr()?;

    let (stop, stop_rx) = watch::channel(false);
    let mut others = Vec::new();
    // One scrape for the whole process: every worker's samples carry its id.
    let worker_metrics = kiln_worker::WorkerMetrics::labelled();
    for i in 0..config.workers {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let worker = WorkerConfig {
            id: format!("worker-{i}"),
            device: config.device.clone(),
            advertise: None,
            lease_ttl: config.lease_ttl,
            memory_bytes: config.worker_memory_bytes,
            metrics_addr: None,
            training_slice: config.training_slice,
            training_share: config.training_share,
        };
        let deps = WorkerDeps {
            registry: registry.clone(),
            artifacts: artifacts.clone(),
            metrics: worker_metrics.clone(),
        };
        let shutdown = stopped(stop_rx.clone());
        others.push(tokio::spawn(async move {
            if let Err(e) = kiln_worker::serve(worker, listener, deps, shutdown).await {
                tracing::error!(error = %e, "worker stopped");
            }
        }));
    }
    {
        let registry = registry.clone();
        let view = view.clone();
        let shutdown = stopped(stop_rx.clone());
        others.push(tokio::spawn(async move {
            kiln_scheduler::run_placement_controller(registry, view, shutdown).await;
        }));
    }
    // The scheduler's training coordinator, served on loopback like a separate process.
    let coordinator = kiln_scheduler::training::TrainingCoordinator::start(
        registry.clone(),
        artifacts.clone(),
        view.clone(),
        config.training_limits,
    )
    .await?;
    let scheduler_metrics = kiln_scheduler::metrics::SchedulerMetrics(Arc::new(
        std::sync::RwLock::new(Some(coordinator.clone())),
    ));
    let scheduler_listener = TcpListener::bind("127.0.0.1:0").await?;
    let scheduler_addr = scheduler_listener.local_addr()?;
    {
        let shutdown = stopped(stop_rx.clone());
        others.push(tokio::spawn(async move {
            let service = coordinator.service();
            let on_shutdown = async move {
                shutdown.await;
                coordinator.stop_all();
            };
            let served = tonic::transport::Server::builder()
                // A server span per call, continuing the caller's trace.
                .layer(kiln_telemetry::trace::ServerLayer)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    kiln_rpc::net::incoming(scheduler_listener),
                    on_shutdown,
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "scheduler stopped");
            }
        }));
    }
    let mut gateway_config = config.gateway.clone();
    gateway_config.training = kiln_gateway::TrainingRoute::Scheduler(scheduler_addr.to_string());
    let stats: Arc<kiln_gateway::stats::Stats> = Default::default();
    let metrics = match metrics_listener {
        Some(listener) => Some(crate::cluster::serve_metrics_on(
            listener,
            vec![
                Box::new(stats.clone()),
                Box::new(worker_metrics),
                Box::new(scheduler_metrics),
            ],
        )?),
        None => None,
    };
    let deps = GatewayDeps {
        registry: registry.clone(),
        view,
        artifacts,
        stats,
    };
    let gateway = tokio::spawn(kiln_gateway::serve(
        gateway_config,
        gateway_listener,
        deps,
        stopped(stop_rx),
    ));
    Ok(Embedded {
        addr,
        admin_token,
        stop,
        store: Arc::downgrade(&store),
        registry,
        gateway,
        others,
        metrics,
    })
}

impl Embedded {
    /// The addresses of the live workers (for tools that call them directly).
    pub async fn worker_addresses(&self) -> Vec<String> {
        self.registry
            .view()
            .await
            .map(|v| v.workers.values().map(|w| w.address.clone()).collect())
            .unwrap_or_default()
    }

    /// Stop gracefully: readiness off, workers deregister, in-flight calls finish; bounded.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some(metrics) = self.metrics {
            metrics.abort();
        }
        drop(self.registry);
        let store = self.store;
        let drain = async {
            let gateway = self.gateway.await;
            for task in self.others {
                let _ = task.await;
            }
            // Connection and aborted tasks drop their handles a moment later; once the
            // last one goes the state file is closed and can be opened again.
            while store.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            gateway
        };
        match tokio::time::timeout(Duration::from_secs(30), drain).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => anyhow::bail!("shutdown did not finish within 30 s"),
        }
    }
}
