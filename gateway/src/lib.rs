//! Kiln's gateway: the public gRPC face of the cluster.
//!
//! - [`oip`]: `inference.GRPCInferenceService` (Open Inference Protocol + Triton extensions);
//! - [`models`]: the `kiln.v1.Models` service;
//! - [`training`]: `kiln.v1.Training`, forwarded to the scheduler;
//! - [`auth`]: tokens and roles, checked before every call; [`tokens`]: `kiln.v1.Tokens`;
//! - [`codec`]: OIP tensor decoding and encoding, with every validation rule;
//! - [`router`]: replica choice, deadlines and the one retry;
//! - [`convert`]: wire types to domain types; [`stats`]: ModelStatistics.
//!
//! Entry point: [`serve`].

#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod cluster;
pub mod codec;
mod error;
mod generate;
/// Wire ↔ domain conversions (they live in the scheduler crate, which both sides use).
pub use kiln_core::convert;
pub mod models;
pub mod oip;
pub mod router;
pub mod stats;
pub mod tokens;
pub mod training;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use kiln_proto::kiln::v1::models_server::ModelsServer;
use kiln_registry::{ArtifactStore, Registry, WatchedView};

pub use error::{Error, Result};

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest message accepted or sent (PROTOCOL.md: 64 MiB by default).
    pub max_message_bytes: usize,
    /// Deadline of a request that carries none.
    pub default_timeout: Duration,
    /// How long RepositoryModelLoad/Unload wait for the workers.
    pub load_timeout: Duration,
    /// Where `kiln.v1.Training` calls go.
    pub training: TrainingRoute,
    /// Whether calls need a bearer token (`--auth on`, the default).
    pub auth: bool,
    /// Each role's default limits per token (with `auth`).
    pub limits: admission::RoleLimits,
    /// Most tensor elements one inference request may declare, all inputs together.
    pub max_request_elements: u64,
}

/// Where the gateway sends `kiln.v1.Training` calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainingRoute {
    /// Training is not served.
    Off,
    /// A scheduler at a fixed `host:port` (the embedded cluster).
    Scheduler(String),
    /// The scheduler that leads, from `leader/scheduler` in the cluster state.
    Leader,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(60),
            training: TrainingRoute::Off,
            auth: true,
            limits: Default::default(),
            // 64 MiB of FP32: what the default message size carries.
            max_request_elements: 16 * 1024 * 1024,
        }
    }
}

/// What the gateway needs from the rest of the cluster.
#[derive(Clone)]
pub struct GatewayDeps {
    /// Cluster state (writes, and fresh reads for listings).
    pub registry: Registry,
    /// The watched view requests are routed from.
    pub view: WatchedView,
    /// Where weights are stored.
    pub artifacts: ArtifactStore,
    /// Request statistics (ModelStatistics, and Prometheus through [`stats::Stats::prometheus`]).
    pub stats: Arc<stats::Stats>,
}

pub(crate) struct Shared {
    registry: Registry,
    view: WatchedView,
    artifacts: ArtifactStore,
    router: router::Router,
    stats: Arc<stats::Stats>,
    /// One ticket per inference request: how canary aliases split traffic exactly.
    tickets: std::sync::atomic::AtomicU64,
    config: GatewayConfig,
    /// False once shutdown begins, so ServerReady turns false before the drain.
    ready: AtomicBool,
}

/// Whether `response` answers gRPC status `code` with a message containing `text`.
fn answers<B>(response: &http::Response<B>, code: &[u8], text: &str) -> bool {
    let headers = response.headers();
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == code)
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains(text))
}

/// Set `response`'s gRPC status to `code` with `message`.
fn answer_with<B>(response: &mut http::Response<B>, code: &'static str, message: &str) {
    let headers = response.headers_mut();
    headers.insert("grpc-status", http::HeaderValue::from_static(code));
    if let Ok(value) = http::HeaderValue::from_str(message) {
        headers.insert("grpc-message", value);
    }
}

/// Rewrite tonic's "decoded message length too large" (OUT_OF_RANGE, answered before any
/// handler runs) into RESOURCE_EXHAUSTED with a message that names the limit and its flag.
fn oversized_is_resource_exhausted<B>(
    mut response: http::Response<B>,
    limit: usize,
) -> http::Response<B> {
    if answers(&response, b"11", "message length too large") {
        let message = format!(
            "request message larger than the gateway's limit of {limit} bytes (--max-message-mib)"
        );
        answer_with(&mut response, "8", &message);
    }
    response
}

/// Serve the public services on `listener` until `shutdown` resolves, then drain in-flight
/// calls and return.
pub async fn serve(
    config: GatewayConfig,
    listener: impl Into<kiln_rpc::net::Listener>,
    deps: GatewayDeps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::result::Result<(), tonic::transport::Error> {
    let listener = listener.into();
    let training_view = deps.view.clone();
    let authenticator = if config.auth {
        auth::Authenticator::Tokens(deps.view.clone())
    } else {
        auth::Authenticator::Off
    };
    let shared = Arc::new(Shared {
        router: router::Router::new(
            deps.view.clone(),
            config.max_message_bytes,
            deps.stats.clone(),
        ),
        registry: deps.registry,
        view: deps.view,
        artifacts: deps.artifacts,
        stats: deps.stats,
        tickets: std::sync::atomic::AtomicU64::new(0),
        config: config.clone(),
        ready: AtomicBool::new(true),
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GrpcInferenceServiceServer<oip::InferenceService>>()
        .await;
    // Reflection lists what this port answers: kiln.v1.Training only when it is routed.
    let mut served = vec![
        "inference.GRPCInferenceService",
        "kiln.v1.Models",
        "kiln.v1.Cluster",
        "kiln.v1.Generation",
        "kiln.v1.Tokens",
    ];
    if !matches!(config.training, TrainingRoute::Off) {
        served.push("kiln.v1.Training");
    }
    let reflection = kiln_rpc::reflection(&served)
        .expect("the descriptor sets are generated at build time and always valid");
    let inference = GrpcInferenceServiceServer::new(oip::InferenceService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let models = ModelsServer::new(models::ModelsService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let shared_for_cluster = shared.clone();
    let shared_for_generation = shared.clone();
    let shared_for_tokens = shared.clone();
    let proxy = match &config.training {
        TrainingRoute::Off => None,
        TrainingRoute::Scheduler(addr) => {
            match training::TrainingProxy::new(addr, config.max_message_bytes) {
                Ok(proxy) => Some(proxy),
                Err(e) => {
                    tracing::error!(error = %e, "kiln.v1.Training is not served");
                    None
                }
            }
        }
        TrainingRoute::Leader => Some(training::TrainingProxy::to_leader(
            training_view,
            config.max_message_bytes,
        )),
    };
    // Jobs carry their rows inline: the same limit as inference, not tonic's 4 MiB.
    let training = proxy.map(|proxy| {
        kiln_proto::kiln::v1::training_server::TrainingServer::new(proxy)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes)
    });
    let on_shutdown = async move {
        shutdown.await;
        shared.ready.store(false, Ordering::Relaxed);
        health_reporter
            .set_not_serving::<GrpcInferenceServiceServer<oip::InferenceService>>()
            .await;
    };
    let limit = config.max_message_bytes;
    tonic::transport::Server::builder()
        // A server span per call, continuing the caller's trace.
        .layer(kiln_telemetry::trace::ServerLayer)
        // tonic refuses an oversized request with OUT_OF_RANGE; the protocol (and Triton)
        // answer RESOURCE_EXHAUSTED, naming the limit.
        .layer(tower::util::MapResponseLayer::new(move |response| {
            oversized_is_resource_exhausted(response, limit)
        }))
        // Token and role, before any handler reads the request.
        .layer(auth::AuthLayer::new(
            authenticator,
            Arc::new(admission::Admission::new(config.limits)),
        ))
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_service(inference)
        .add_service(models)
        .add_optional_service(training)
        .add_service(
            kiln_proto::kiln::v1::generation_server::GenerationServer::new(
                generate::GenerationService {
                    shared: shared_for_generation,
                },
            ),
        )
        .add_service(kiln_proto::kiln::v1::tokens_server::TokensServer::new(
            tokens::TokensService {
                shared: shared_for_tokens,
            },
        ))
        .add_service(kiln_proto::kiln::v1::cluster_server::ClusterServer::new(
            cluster::ClusterService {
                shared: shared_for_cluster,
            },
        ))
        .serve_with_incoming_shutdown(listener.incoming(), on_shutdown)
        .await
}
