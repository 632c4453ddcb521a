//! `kiln-bench oip`: the closed loop of `kiln bench` against any Open Inference Protocol
//! server (Kiln, Triton, MLServer, the floor), so scripts compare servers with one client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use kiln::bench::run_cell;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln_proto::inference::{ModelInferRequest, ModelReadyRequest};

/// One load against any Open Inference Protocol server (`kiln-bench oip`).
#[derive(Debug, Clone)]
pub struct OipLoad {
    /// `host:port` of the server's gRPC endpoint.
    pub addr: String,
    /// The model to call.
    pub model: String,
    /// Its input tensor's name.
    pub input: String,
    /// FP32 features per row.
    pub width: usize,
    /// An output to ask for by name (None: the server's default outputs).
    pub output: Option<String>,
    /// Concurrent callers to try (each with a connection of its own).
    pub concurrency: Vec<usize>,
    /// Rows per request to try.
    pub batch: Vec<usize>,
    /// How long each cell runs.
    pub duration: Duration,
}

/// Drive `ModelInfer` on any OIP server with the closed loop `kiln bench` uses, raw FP32
/// input as tritonclient sends it; one JSON line per cell on standard output, so scripts
/// compare servers with the same client.
pub async fn run_oip(load: OipLoad) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for &batch in &load.batch {
        let raw: Vec<u8> = (0..batch * load.width)
            .flat_map(|i| ((i % 7) as f32 / 7.0).to_le_bytes())
            .collect();
        let request = ModelInferRequest {
            model_name: load.model.clone(),
            inputs: vec![InferInputTensor {
                name: load.input.clone(),
                datatype: "FP32".into(),
                shape: vec![batch as i64, load.width as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(raw)],
            outputs: load
                .output
                .iter()
                .map(|name| InferRequestedOutputTensor {
                    name: name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // The first answer must be a success: a misconfigured target is an error, not a
        // table of failures.
        let mut probe =
            GrpcInferenceServiceClient::new(kiln_rpc::channel::connect(&load.addr).await?);
        // A server still loading the model (one just started) is waited for, a minute at
        // most; one that does not answer readiness is probed as it is.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = probe
                .model_ready(ModelReadyRequest {
                    name: load.model.clone(),
                    version: String::new(),
                })
                .await
                .map_or(true, |r| r.into_inner().ready);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        probe.model_infer(request.clone()).await.with_context(|| {
            format!(
                "{} at {} refused a {batch}-row request",
                load.model, load.addr
            )
        })?;
        for &concurrency in &load.concurrency {
            let mut clients = Vec::with_capacity(concurrency);
            for _ in 0..concurrency {
                clients.push(GrpcInferenceServiceClient::new(
                    kiln_rpc::channel::connect(&load.addr).await?,
                ));
            }
            let clients = Arc::new(clients);
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let request = request.clone();
            let m = run_cell(concurrency, load.duration, move || {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut client = clients[i % clients.len()].clone();
                let request = request.clone();
                async move { client.model_infer(request).await.is_ok() }
            })
            .await;
            let cell = serde_json::json!({
                "concurrency": concurrency,
                "batch": batch,
                "requests_per_s": m.rps,
                "rows_per_s": m.rps * batch as f64,
                "p50_ms": m.p50.as_secs_f64() * 1e3,
                "p99_ms": m.p99.as_secs_f64() * 1e3,
                "max_ms": m.max.as_secs_f64() * 1e3,
                "errors": m.errors,
            });
            println!("{cell}");
            out.push(cell);
        }
    }
    Ok(out)
}
