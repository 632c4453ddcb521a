//! `kiln bench-otlp-sink`: an OTLP/gRPC trace receiver that counts the spans it is sent
//! and keeps nothing, so that the tracing benchmark measures Kiln's cost of exporting,
//! not a collector's cost of storing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serve on `listener` until `shutdown`; every 100 ms, write the spans received so far to
/// `count_file` (if given) as a decimal number.
pub async fn serve(
    listener: tokio::net::TcpListener,
    count_file: Option<PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let writer = tokio::spawn(async move {
        let Some(path) = count_file else { return };
        let staged = path.with_extension("tmp");
        loop {
            let n = counted.load(Ordering::Relaxed).to_string();
            // Written aside and renamed, so a reader never sees half a number.
            if tokio::fs::write(&staged, n).await.is_ok() {
                let _ = tokio::fs::rename(&staged, &path).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let service = TraceServiceServer::new(Sink {
        spans: spans.clone(),
    })
    .max_decoding_message_size(64 * 1024 * 1024);
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(kiln_proto::net::incoming(listener), shutdown)
        .await;
    writer.abort();
    crate::say!("{} spans received", spans.load(Ordering::Relaxed));
    Ok(served?)
}
