//! Distributed tracing on every gRPC hop.
//!
//! [`Server`] wraps a tonic server: each call gets a server span whose parent is the W3C
//! trace context the caller sent (read through OpenTelemetry's global propagator), named
//! and attributed after the OpenTelemetry RPC conventions. [`Client`] wraps a channel:
//! each call gets a client span, and that span's context travels in the request's
//! metadata. Both cost one relaxed atomic load and nothing else until a process turns
//! tracing on with [`enable`] (it does when an OTLP endpoint is configured).

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use opentelemetry::propagation::{Extractor, Injector};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn span creation on for this process (call once the OpenTelemetry layer and the
/// global propagator are installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether this process traces its calls.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// HTTP/2 headers (gRPC metadata) as a carrier the propagator writes into.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// HTTP/2 headers (gRPC metadata) as a carrier the propagator reads from.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// `/package.Service/Method` as (`package.Service`, `Method`).
fn rpc_names(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Calls not worth a span: health probes and server reflection run every few seconds
/// on every process and say nothing about requests.
fn untraced(service: &str) -> bool {
    service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.")
}

/// The gRPC status of a response, when its headers already carry it (an error answered
/// without a body); otherwise it travels in the trailers, and a response that got this
/// far without one is OK.
fn status_of(headers: &http::HeaderMap) -> i64 {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Codes that mean the server failed (the others are the caller's doing), following the
/// OpenTelemetry RPC conventions for server spans.
fn server_fault(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

fn record_status(span: &tracing::Span, code: i64, server: bool) {
    span.record("rpc.grpc.status_code", code);
    if (server && server_fault(code)) || (!server && code != 0) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The trace context of `span`, for a span link (invalid when tracing is off).
pub fn span_context(span: &tracing::Span) -> opentelemetry::trace::SpanContext {
    use opentelemetry::trace::TraceContextExt;
    span.context().span().span_context().clone()
}

/// Set attribute `key` on `span` (nothing when tracing is off).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

/// Link `span` to `to` (the OpenTelemetry span link: "caused by", across traces).
pub fn link(span: &tracing::Span, to: &tracing::Span) {
    if enabled() {
        span.add_link(span_context(to));
    }
}

/// Add the event `name` with string attributes to the current span.
pub fn event(name: &'static str, attributes: &[(&'static str, &str)]) {
    if enabled() {
        let attributes = attributes
            .iter()
            .map(|(k, v)| opentelemetry::KeyValue::new(*k, v.to_string()))
            .collect();
        tracing::Span::current().add_event(name, attributes);
    }
}

/// A span for one message of a stream that `parent` (the stream's call) carries, with
/// the same status attributes as a call.
pub fn message_span(parent: &tracing::Span, name: &'static str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: "kiln::rpc",
        parent: parent,
        "stream message",
        otel.name = name,
        otel.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// Record the gRPC status `code` a server answered on `span` (from [`message_span`]).
pub fn record_code(span: &tracing::Span, code: i64) {
    if enabled() {
        record_status(span, code, true);
    }
}

/// A tonic server (or any HTTP service) with a server span around every call.
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
}

impl<S> Server<S> {
    /// Trace the calls `inner` answers.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// [`Server`] as a layer for `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerLayer;

impl<S> tower::Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Server<S> {
        Server::new(inner)
    }
}

type Traced<F, T, E> = Either<F, BoxFuture<'static, Result<T, E>>>;

impl<S, B, R> tower::Service<http::Request<B>> for Server<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        if !enabled() || untraced(service) {
            return Either::Left(self.inner.call(request));
        }
        let span = tracing::info_span!(
            target: "kiln::rpc",
            "grpc server",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);
        let future = span.in_scope(|| self.inner.call(request));
        let recorded = span.clone();
        Either::Right(Box::pin(
            async move {
                let result = future.await;
                if let Ok(response) = &result {
                    record_status(&recorded, status_of(response.headers()), true);
                }
                result
            }
            .instrument(span),
        ))
    }
}

/// A gRPC channel (or any HTTP client service) with a client span around every call,
/// whose context goes out in the request's metadata.
#[derive(Debug, Clone)]
pub struct Client<S> {
    inner: S,
    peer: std::sync::Arc<str>,
}

/// A traced gRPC channel.
pub type TracedChannel = Client<tonic::transport::Channel>;

impl<S> Client<S> {
    /// Trace the calls made through `inner` to the server at `peer` (`host:port`).
    pub fn new(inner: S, peer: &str) -> Self {
        Self {
            inner,
            peer: peer.into(),
        }
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Client<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Either::Left(self.inner.call(request));
        }
        let (service, method) = rpc_names(request.uri().path());
        let span = tracing::info_span!(
            target: "kiln::rpc",
            "grpc client",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            server.address = %self.peer,
        );
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(request.headers_mut()))
        });
        let future = span.in_scope(|| self.inner.call(request));
        let recorded = span.clone();
        Either::Right(Box::pin(
            async move {
                let result = future.await;
                match &result {
                    Ok(response) => record_status(&recorded, status_of(response.headers()), false),
                    // The call never got an answer: the server was unreachable.
                    Err(_) => record_status(&recorded, 14, false),
                }
                result
            }
            .instrument(span),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_split_into_service_and_method() {
        assert_eq!(
            rpc_names("/inference.GRPCInferenceService/ModelInfer"),
            ("inference.GRPCInferenceService", "ModelInfer")
        );
        assert_eq!(rpc_names("/odd"), ("odd", ""));
        assert!(untraced("grpc.health.v1.Health"));
        assert!(!untraced("kiln.internal.v1.Worker"));
    }

    #[test]
    fn status_comes_from_headers_when_there_and_is_ok_otherwise() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_of(&headers), 0);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_of(&headers), 14);
        assert!(server_fault(14));
        assert!(!server_fault(3), "INVALID_ARGUMENT is the caller's fault");
    }

    #[test]
    fn headers_carry_what_the_propagator_writes() {
        let mut headers = http::HeaderMap::new();
        HeaderInjector(&mut headers).set("traceparent", "00-ab-cd-01".into());
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some("00-ab-cd-01"));
        assert_eq!(extractor.keys(), vec!["traceparent"]);
    }
}
