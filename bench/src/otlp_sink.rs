//! `kiln-bench otlp-sink`: an OTLP/gRPC trace receiver that counts the spans it is sent
//! and keeps nothing, so that the tracing benchmark measures Kiln's cost of exporting,
//! not a collector's cost of decoding and storing (it shares the serving cores).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

/// Spans in an encoded `ExportTraceServiceRequest`, counted by walking the wire format
/// (`resource_spans` = 1 → `scope_spans` = 2 → `spans` = 2) without decoding the spans:
/// a collector elsewhere would do that work, not the serving machine.
pub fn count_spans(request: &[u8]) -> Result<u64, String> {
    let mut spans = 0;
    for resource in fields(request, 1)? {
        for scope in fields(resource, 2)? {
            spans += fields(scope, 2)?.len() as u64;
        }
    }
    Ok(spans)
}

/// The bodies of the length-delimited fields numbered `wanted` in one message.
fn fields(mut message: &[u8], wanted: u32) -> Result<Vec<&[u8]>, String> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut found = Vec::new();
    while !message.is_empty() {
        let (tag, wire) = decode_key(&mut message).map_err(|e| e.to_string())?;
        let skip = match wire {
            WireType::Varint => {
                decode_varint(&mut message).map_err(|e| e.to_string())?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::LengthDelimited => {
                let len = decode_varint(&mut message).map_err(|e| e.to_string())?;
                usize::try_from(len).map_err(|_| "a length overflows")?
            }
            WireType::ThirtyTwoBit => 4,
            other => return Err(format!("wire type {other:?} is not used by OTLP")),
        };
        if skip > message.len() {
            return Err("a field runs past the end".into());
        }
        let (body, rest) = message.split_at(skip);
        if wire == WireType::LengthDelimited && tag == wanted {
            found.push(body);
        }
        message = rest;
    }
    Ok(found)
}

/// The export call's codec: a request decodes to its span count; the answer is an empty
/// `ExportTraceServiceResponse` (everything accepted).
struct Counting;

impl Codec for Counting {
    type Encode = ();
    type Decode = u64;
    type Encoder = Counting;
    type Decoder = Counting;

    fn encoder(&mut self) -> Counting {
        Counting
    }

    fn decoder(&mut self) -> Counting {
        Counting
    }
}

impl Encoder for Counting {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for Counting {
    type Item = u64;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, Status> {
        let body = src.copy_to_bytes(src.remaining());
        count_spans(&body)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("not an OTLP trace export: {e}")))
    }
}

#[derive(Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
}

impl tonic::server::NamedService for Sink {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<u64> for Sink {
    type Response = ();
    type Future = std::future::Ready<Result<Response<()>, Status>>;

    fn call(&mut self, request: Request<u64>) -> Self::Future {
        self.spans.fetch_add(*request.get_ref(), Ordering::Relaxed);
        std::future::ready(Ok(Response::new(())))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Sink {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            if request.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
            {
                return Ok(Status::unimplemented("this sink answers Export only").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(Counting)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .apply_max_message_size_config(Some(64 * 1024 * 1024), None);
            Ok(grpc.unary(sink, request).await)
        })
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
    let service = Sink {
        spans: spans.clone(),
    };
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(kiln_rpc::net::incoming(listener), shutdown)
        .await;
    writer.abort();
    println!("{} spans received", spans.load(Ordering::Relaxed));
    Ok(served?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message as _;

    #[test]
    fn spans_are_counted_across_resources_and_scopes_and_garbage_is_refused() {
        let span = |name: &str| Span {
            name: name.into(),
            trace_id: vec![7; 16],
            span_id: vec![8; 8],
            start_time_unix_nano: 1,
            flags: 0x100,
            ..Default::default()
        };
        let scope = |n: usize| ScopeSpans {
            spans: (0..n).map(|i| span(&format!("s{i}"))).collect(),
            schema_url: "x".into(),
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    scope_spans: vec![scope(3), scope(0), scope(2)],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![scope(4)],
                    schema_url: "y".into(),
                    ..Default::default()
                },
            ],
        };
        let bytes = request.encode_to_vec();
        assert_eq!(count_spans(&bytes), Ok(9));
        assert_eq!(count_spans(&[]), Ok(0));
        assert!(count_spans(&bytes[..bytes.len() - 3]).is_err(), "cut short");
        assert!(count_spans(&[0x0b, 1]).is_err(), "wire type 3");
    }
}
