//! Cluster mode: `kiln scheduler`, `kiln worker` and `kiln gateway` as separate processes
//! that meet in etcd. Each serves health and reflection, and shuts down gracefully:
//! readiness off, lease revoked, in-flight work drained, bounded wait.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_core::training::TrainingLimits;
use kiln_gateway::{GatewayConfig, GatewayDeps, TrainingRoute};
use kiln_registry::{ArtifactStore, EtcdStore, EtcdTls, KvStore, Registry, WatchedView};
use kiln_rpc::net::Listener;
use kiln_rpc::tls::{ServerTls, ServerTlsFiles};
use kiln_scheduler::training::{CoordinatorSlot, TrainingCoordinator, TrainingService};
use kiln_worker::{DeviceChoice, WorkerConfig, WorkerDeps};
use tokio::net::TcpListener;

/// How long a process waits for its in-flight work after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(30);

/// Where the cluster state and the artifacts are, common to every process.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Key prefix of the cluster state.
    pub prefix: String,
    /// Artifact store URL (`file:///shared/dir`).
    pub artifacts: String,
    /// Lease TTL of registrations and of the scheduler's leadership.
    pub lease_ttl: Duration,
    /// TLS to etcd.
    pub etcd_tls: Option<EtcdTls>,
    /// TLS of this process's listener (certificate, key, and the client CA of mutual TLS).
    pub tls: Option<ServerTlsFiles>,
}

/// What a process needs from the cluster: the store, the registry, the artifacts.
struct Connected {
    store: Arc<dyn KvStore>,
    registry: Registry,
    artifacts: ArtifactStore,
}

async fn connect(config: &ClusterConfig) -> anyhow::Result<Connected> {
    if !config.prefix.starts_with('/') || !config.prefix.ends_with('/') {
        anyhow::bail!(
            "--prefix must start and end with '/', got {:?}",
            config.prefix
        );
    }
    if config.lease_ttl < Duration::from_secs(2) {
        anyhow::bail!("--lease-ttl-secs must be at least 2 (etcd's shortest lease)");
    }
    let store: Arc<dyn KvStore> = Arc::new(
        EtcdStore::connect_with(
            &config.etcd,
            Duration::from_secs(10),
            config.etcd_tls.as_ref(),
        )
        .await
        .with_context(|| format!("cannot reach etcd at {}", config.etcd.join(",")))?,
    );
    let artifacts = ArtifactStore::open(&config.artifacts)
        .with_context(|| format!("cannot open the artifact store {}", config.artifacts))?;
    Ok(Connected {
        registry: Registry::new(store.clone(), config.prefix.clone()),
        store,
        artifacts,
    })
}

/// Bind `listen`, serving TLS when `tls` is given (its files read now: a bad one fails the
/// start, naming it).
pub(crate) async fn bind(
    listen: SocketAddr,
    addr_file: Option<&PathBuf>,
    tls: Option<&ServerTlsFiles>,
) -> anyhow::Result<Listener> {
    let tls = tls
        .map(|files| ServerTls::load(files.clone()))
        .transpose()?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(path) = addr_file {
        std::fs::write(path, listener.local_addr()?.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Listener::new(listener, tls))
}

/// The address others reach a process at: `--advertise`, else the bound address when it
/// is a specific one.
fn advertised(advertise: Option<String>, bound: SocketAddr, flag: &str) -> anyhow::Result<String> {
    match advertise {
        Some(a) => Ok(a),
        None if bound.ip().is_unspecified() => anyhow::bail!(
            "listening on {bound}: give {flag} with the address others reach this process at"
        ),
        None => Ok(bound.to_string()),
    }
}

/// Serve what `collectors` describe at `http://addr/metrics`; the task runs until aborted.
pub(crate) async fn serve_metrics(
    addr: SocketAddr,
    collectors: Vec<Box<dyn kiln_telemetry::metrics::Collector>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    serve_metrics_on(bind_metrics(addr).await?, collectors)
}

/// Bind the metrics port (before the process binds any port of its own choosing, so that
/// no such port can take the one asked for).
pub(crate) async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr} (--metrics-addr)"))
}

/// Serve what `collectors` describe at `/metrics` on `listener`.
pub(crate) fn serve_metrics_on(
    listener: TcpListener,
    collectors: Vec<Box<dyn kiln_telemetry::metrics::Collector>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "metrics at /metrics");
    let mut registry = kiln_telemetry::metrics::Registry::default();
    for collector in collectors {
        registry.register_collector(collector);
    }
    Ok(tokio::spawn(kiln_telemetry::metrics::serve(
        listener,
        Arc::new(registry),
    )))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A process id: the flag, else the host name (a pod's name on Kubernetes), else the pid.
pub fn default_id(kind: &str) -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .map(|h| format!("{kind}-{h}"))
        .unwrap_or_else(|| format!("{kind}-{}", std::process::id()))
}

/// `kiln worker`.
pub struct WorkerArgs {
    /// Worker id (unique in the cluster).
    pub id: String,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Address the gateways and the scheduler reach it at.
    pub advertise: Option<String>,
    /// Device.
    pub device: DeviceChoice,
    /// Write the bound address here.
    pub addr_file: Option<PathBuf>,
    /// Bytes of model weights it may hold (0: no limit).
    pub memory_bytes: u64,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Slice budget of training runs (zero: whole batches).
    pub training_slice: Duration,
    /// Device share of training while inference is served.
    pub training_share: f64,
}

/// Run a worker until `shutdown`.
pub async fn worker(
    cluster: ClusterConfig,
    args: WorkerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    kiln_core::spec::validate_name("--id", &args.id)?;
    let c = connect(&cluster).await?;
    let listener = bind(args.listen, args.addr_file.as_ref(), cluster.tls.as_ref()).await?;
    let advertise = advertised(args.advertise, listener.local_addr()?, "--advertise")?;
    tracing::info!(worker = %args.id, %advertise, "worker starting");
    let config = WorkerConfig {
        id: args.id,
        device: args.device,
        advertise: Some(advertise),
        lease_ttl: cluster.lease_ttl,
        memory_bytes: args.memory_bytes,
        metrics_addr: args.metrics_addr,
        training_slice: args.training_slice,
        training_share: args.training_share,
    };
    let deps = WorkerDeps {
        registry: c.registry,
        artifacts: c.artifacts,
        metrics: Default::default(),
    };
    kiln_worker::serve(config, listener, deps, shutdown).await?;
    Ok(())
}

/// `kiln gateway`.
pub struct GatewayArgs {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Gateway settings (message size, default timeout).
    pub config: GatewayConfig,
    /// Write the bound address here.
    pub addr_file: Option<PathBuf>,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
}

/// Run a gateway until `shutdown`: it routes from its watched view of the cluster and
/// forwards training to the leading scheduler.
pub async fn gateway(
    cluster: ClusterConfig,
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let c = connect(&cluster).await?;
    let view = WatchedView::start(c.store.clone(), cluster.prefix.clone()).await?;
    let listener = bind(args.listen, args.addr_file.as_ref(), cluster.tls.as_ref()).await?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let config = GatewayConfig {
        training: TrainingRoute::Leader,
        ..args.config
    };
    let stats: Arc<kiln_gateway::stats::Stats> = Default::default();
    let metrics = match args.metrics_addr {
        Some(addr) => Some(serve_metrics(addr, vec![Box::new(stats.clone())]).await?),
        None => None,
    };
    let deps = GatewayDeps {
        registry: c.registry,
        view,
        artifacts: c.artifacts,
        stats,
    };
    let served = kiln_gateway::serve(config, listener, deps, shutdown).await;
    if let Some(m) = metrics {
        m.abort();
    }
    served?;
    Ok(())
}

/// `kiln scheduler`.
pub struct SchedulerArgs {
    /// Scheduler id.
    pub id: String,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Address the gateways reach it at.
    pub advertise: Option<String>,
    /// Caps on training jobs.
    pub limits: TrainingLimits,
    /// Write the bound address here.
    pub addr_file: Option<PathBuf>,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
}

/// Run a scheduler until `shutdown`: it serves health and `kiln.v1.Training` at once, and
/// once it leads (through etcd) it runs the placement controller and the training
/// coordinator. Losing the lead ends the process with an error, so that its supervisor
/// restarts it as a standby.
pub async fn scheduler(
    cluster: ClusterConfig,
    args: SchedulerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    kiln_core::spec::validate_name("--id", &args.id)?;
    let c = connect(&cluster).await?;
    let view = WatchedView::start(c.store.clone(), cluster.prefix.clone()).await?;
    let listener = bind(args.listen, args.addr_file.as_ref(), cluster.tls.as_ref()).await?;
    let advertise = advertised(args.advertise, listener.local_addr()?, "--advertise")?;

    let slot: CoordinatorSlot = Arc::new(std::sync::RwLock::new(None));
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let collector = kiln_scheduler::metrics::SchedulerMetrics(slot.clone());
            Some(serve_metrics(addr, vec![Box::new(collector)]).await?)
        }
        None => None,
    };
    let _metrics = AbortOnDrop(metrics);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<kiln_proto::kiln::v1::training_server::TrainingServer<TrainingService>>()
        .await;
    let reflection = kiln_rpc::reflection(&["kiln.v1.Training"])?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stop_server = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // A server span per call, continuing the caller's trace.
            .layer(kiln_telemetry::trace::ServerLayer)
            .add_service(health_service)
            .add_service(reflection.v1)
            .add_service(reflection.v1alpha)
            .add_service(TrainingService::standby(slot.clone()))
            .serve_with_incoming_shutdown(listener.incoming(), stop_server),
    );
    tracing::info!(scheduler = %args.id, %advertise, "scheduler listening; campaigning for the lead");

    tokio::pin!(shutdown);
    let campaign = kiln_scheduler::leader::campaign(
        &c.registry,
        &view,
        &args.id,
        &advertise,
        cluster.lease_ttl,
        &mut shutdown,
    );
    let Some(mut leadership) = campaign.await else {
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(DRAIN, server).await;
        return Ok(());
    };
    let coordinator = TrainingCoordinator::start(
        c.registry.clone(),
        c.artifacts.clone(),
        view.clone(),
        args.limits,
    )
    .await?;
    *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(coordinator.clone());
    health
        .set_serving::<kiln_proto::kiln::v1::training_server::TrainingServer<TrainingService>>()
        .await;
    let controller = tokio::spawn(kiln_scheduler::run_placement_controller(
        c.registry.clone(),
        view.clone(),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let lost = tokio::select! {
        _ = &mut shutdown => false,
        _ = leadership.lost() => true,
    };
    // Stop: training calls end, jobs in flight are cancelled (they register nothing), the
    // controller stops, the lead is given up for a standby.
    health
        .set_not_serving::<kiln_proto::kiln::v1::training_server::TrainingServer<TrainingService>>()
        .await;
    coordinator.stop_all();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN, async {
        let _ = controller.await;
        let _ = server.await;
    })
    .await;
    leadership.resign().await;
    if lost {
        anyhow::bail!("scheduler {} lost the lead (its etcd lease ended)", args.id);
    }
    Ok(())
}
