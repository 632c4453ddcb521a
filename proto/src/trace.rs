//! Distributed tracing on every gRPC hop.
//!
//! [`Server`] wraps a tonic server: each call gets a server span whose parent is the W3C
//! trace context the caller sent (read through OpenTelemetry's global propagator), named
//! and attributed after the OpenTelemetry RPC conventions. [`Client`] wraps a channel:
//! each call gets a client span, and that span's context travels in the request's
//! metadata. The spans of the request path (these, and those of the gateway and the
//! worker's batcher) are made with the OpenTelemetry API itself and travel with the
//! request as its current OpenTelemetry context: an unsampled request then costs almost
//! nothing. `tracing` spans (model loads, training jobs, registry changes) join the same
//! traces through `tracing-opentelemetry`. Everything costs one relaxed atomic load
//! until a process turns tracing on with [`enable`] (it does when an OTLP endpoint is
//! configured).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

pub use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{Status, TraceContextExt as _, Tracer as _};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use opentelemetry::trace::SpanKind;
pub use opentelemetry::{KeyValue, Value};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<BoxedTracer> = OnceLock::new();

/// Turn span creation on for this process. Call once the global tracer provider and
/// propagator are installed.
pub fn enable() {
    let _ = TRACER.set(opentelemetry::global::tracer("kiln"));
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether this process traces its calls.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The context new spans start under: the request's (attached while its future is
/// polled), else that of the `tracing` span the code runs in (a model load, a job).
pub fn current() -> Context {
    let cx = Context::current();
    if cx.has_active_span() {
        return cx;
    }
    let span = tracing::Span::current();
    if span.is_none() { cx } else { span.context() }
}

/// Start a span named `name` under `parent`; the returned context holds it, and it ends
/// when the last clone of that context is dropped. None when tracing is off.
/// `attributes` is not called when no span is made (under an unsampled parent).
pub fn start(
    name: &'static str,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Context> {
    start_linked(name, kind, parent, attributes, Vec::new)
}

/// Whether `parent` is a span of this process that was not sampled. A child would not be
/// either (this process's sampler decided by the trace id or the parent, and would
/// again), so none is made: the parent's context stands in for it, still propagated
/// downstream, at no cost. A remote parent's flag is the caller's; the sampler judges it
/// (`always_on` overrides).
fn unsampled_local(parent: &Context) -> bool {
    let span = parent.span();
    let context = span.span_context();
    parent.has_active_span() && !context.is_remote() && !context.is_sampled()
}

fn start_linked(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    links: impl FnOnce() -> Vec<opentelemetry::trace::Link>,
) -> Option<Context> {
    if !enabled() {
        return None;
    }
    if unsampled_local(parent) {
        return Some(parent.clone());
    }
    let tracer = TRACER.get()?;
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes())
        .with_links(links())
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
}

/// Run `future` with `cx` (from [`start`]) as its current context; then the span ends.
pub async fn scoped<F: std::future::Future>(cx: Option<Context>, future: F) -> F::Output {
    match cx {
        Some(cx) => future.with_context(cx).await,
        None => future.await,
    }
}

/// Set attribute `key` on the current request's span (nothing when tracing is off).
pub fn attribute(key: &'static str, value: impl Into<Value>) {
    if enabled() {
        Context::current()
            .span()
            .set_attribute(KeyValue::new(key, value));
    }
}

/// Set the attributes `make` returns on the current request's span; `make` runs only
/// when that span is sampled, so an unsampled request builds none of them.
pub fn attributes(make: impl FnOnce() -> Vec<KeyValue>) {
    if enabled() {
        let cx = Context::current();
        let span = cx.span();
        if span.is_recording() {
            span.set_attributes(make());
        }
    }
}

/// Add the event `name` with string attributes to the current request's span.
pub fn event(name: &'static str, attributes: &[(&'static str, &str)]) {
    if enabled() {
        let attributes = attributes
            .iter()
            .map(|(k, v)| KeyValue::new(*k, v.to_string()))
            .collect();
        Context::current().span().add_event(name, attributes);
    }
}

/// The span of one batch (a forward pass) on `requests`, each the context of a request
/// it serves: it belongs to the trace of the first sampled one, links to every one, and
/// each records the batch's span id as `kiln.batch.span_id`. None when no request is
/// sampled (`attributes` is then never called).
pub fn batch(requests: &[&Context], attributes: impl FnOnce() -> Vec<KeyValue>) -> Option<Context> {
    let first = requests.iter().find(|cx| cx.span().is_recording())?;
    let links = || {
        requests
            .iter()
            .map(|cx| opentelemetry::trace::Link::with_context(cx.span().span_context().clone()))
            .collect()
    };
    let cx = start_linked("batch", SpanKind::Internal, first, attributes, links)?;
    let id = cx.span().span_context().span_id().to_string();
    for request in requests {
        request
            .span()
            .set_attribute(KeyValue::new("kiln.batch.span_id", id.clone()));
    }
    Some(cx)
}

/// Record the gRPC status `code` a server answered on the span of `cx`.
pub fn record_code(cx: &Context, code: i64) {
    record_status(cx, code, true);
}

/// HTTP/2 headers (gRPC metadata) as a carrier the propagator writes into.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The W3C names without parsing them again; the value's bytes are taken, not copied.
        let name = match key {
            "traceparent" => Ok(http::HeaderName::from_static("traceparent")),
            "tracestate" => Ok(http::HeaderName::from_static("tracestate")),
            other => http::HeaderName::from_bytes(other.as_bytes()),
        };
        if let (Ok(name), Ok(value)) = (name, http::HeaderValue::try_from(value)) {
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

/// The gRPC status in `headers` (a response's headers, for an error answered without a
/// body, or its trailers); none there is OK.
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

fn record_status(cx: &Context, code: i64, server: bool) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
    if (server && server_fault(code)) || (!server && code != 0) {
        span.set_status(Status::error(format!("gRPC status {code}")));
    }
}

fn rpc_attributes(service: &str, method: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", method.to_owned()),
    ]
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

pin_project_lite::pin_project! {
    /// A client call's future and its span (none when the call is not traced): the span
    /// records the gRPC status the answer's headers carry and ends when the answer is
    /// there. Unboxed: the call's own future stays in place (no allocation, no move).
    pub struct Traced<F> {
        #[pin]
        inner: F,
        span: Option<Context>,
    }
}

impl<F> Traced<F> {
    fn untraced(inner: F) -> Self {
        Self { inner, span: None }
    }
}

impl<F, R, E> std::future::Future for Traced<F>
where
    F: std::future::Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(cx) = this.span.as_ref() else {
            return this.inner.poll(task);
        };
        let polled = this.inner.poll(task);
        if let Poll::Ready(result) = &polled {
            match result {
                Ok(response) => record_status(cx, status_of(response.headers()), false),
                // A call that never got an answer: the server was unreachable.
                Err(_) => record_status(cx, 14, false),
            }
            // The span ends here, with the call.
            *this.span = None;
        }
        polled
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Server<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<TracedBody<R>>;
    type Error = S::Error;
    type Future = ServerCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        if !enabled() || untraced(service) {
            return ServerCall::untraced(self.inner.call(request));
        }
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let name = request.uri().path().trim_start_matches('/').to_owned();
        let Some(cx) = start_linked(name, SpanKind::Server, &parent, Vec::new, Vec::new) else {
            return ServerCall::untraced(self.inner.call(request));
        };
        // The samplers do not look at attributes: an unsampled call skips making them.
        let span = cx.span();
        if span.is_recording() {
            span.set_attributes(rpc_attributes(service, method));
        }
        let inner = {
            let _attached = cx.clone().attach();
            self.inner.call(request)
        };
        ServerCall {
            inner,
            span: Some(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// A traced server call's future: the span's context is current while the handler
    /// runs (so its spans and attributes find it). An answer that carries its gRPC status
    /// in the headers (an error) ends the span there; otherwise the span goes on with the
    /// response body, to the trailers — for a stream, its whole life.
    pub struct ServerCall<F> {
        #[pin]
        inner: F,
        span: Option<Context>,
    }
}

impl<F> ServerCall<F> {
    fn untraced(inner: F) -> Self {
        Self { inner, span: None }
    }
}

impl<F, R, E> std::future::Future for ServerCall<F>
where
    F: std::future::Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<TracedBody<R>>, E>;

    fn poll(self: std::pin::Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = match this.span.as_ref() {
            Some(cx) => {
                let _current = cx.clone().attach();
                this.inner.poll(task)
            }
            None => this.inner.poll(task),
        };
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        let span = this.span.take();
        Poll::Ready(result.map(|response| {
            let span = match span {
                Some(cx) if response.headers().contains_key("grpc-status") => {
                    record_status(&cx, status_of(response.headers()), true);
                    None
                }
                other => other,
            };
            response.map(|inner| TracedBody { inner, span })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A traced call's response body: the span records the status its trailers carry and
    /// ends with the body. A body dropped before its end is a call the caller gave up on
    /// (CANCELLED).
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        span: Option<Context>,
    }

    impl<B> PinnedDrop for TracedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(cx) = this.project().span.take() {
                record_status(&cx, 1, true);
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        task: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(task);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(cx) = this.span.take()
                {
                    record_status(&cx, status_of(trailers), true);
                }
            }
            // The body broke off: the answer never completed (UNKNOWN).
            Poll::Ready(Some(Err(_))) => {
                if let Some(cx) = this.span.take() {
                    record_status(&cx, 2, true);
                }
            }
            // The end, with no trailers to say otherwise: OK.
            Poll::Ready(None) => {
                if let Some(cx) = this.span.take() {
                    record_status(&cx, 0, true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Traced::untraced(self.inner.call(request));
        }
        let parent = current();
        if unsampled_local(&parent) {
            // No span: the caller's context goes on, saying "not sampled".
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&parent, &mut HeaderInjector(request.headers_mut()))
            });
            return Traced::untraced(self.inner.call(request));
        }
        let (service, method) = rpc_names(request.uri().path());
        let mut attributes = rpc_attributes(service, method);
        attributes.push(KeyValue::new("server.address", self.peer.to_string()));
        let name = request.uri().path().trim_start_matches('/').to_owned();
        let Some(cx) = start_linked(name, SpanKind::Client, &parent, || attributes, Vec::new)
        else {
            return Traced::untraced(self.inner.call(request));
        };
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(request.headers_mut()))
        });
        Traced {
            inner: self.inner.call(request),
            span: Some(cx),
        }
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

    /// An exporter that keeps what it is given, for the test below.
    #[derive(Debug, Clone, Default)]
    struct Kept(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Kept {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn a_batch_span_joins_the_first_sampled_request_and_links_every_one() {
        use opentelemetry::trace::{SpanContext, TraceFlags, TraceId, TraceState};
        let kept = Kept::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                opentelemetry_sdk::trace::Sampler::AlwaysOn,
            )))
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        enable();
        // Two requests as a worker sees them: server spans under callers that did and
        // did not sample; the unsampled one queued first.
        let request = |trace: u128, sampled: bool| {
            let flags = if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let caller = Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(trace),
                opentelemetry::trace::SpanId::from(7),
                flags,
                true,
                TraceState::default(),
            ));
            start("request", SpanKind::Server, &caller, Vec::new).unwrap()
        };
        let unsampled = request(0xaaa, false);
        let sampled = request(0xbbb, true);
        assert!(!unsampled.span().is_recording() && sampled.span().is_recording());

        // No sampled request: no batch span, and its attributes are never made.
        let none = batch(&[&unsampled], || {
            unreachable!("attributes of an unsampled batch")
        });
        assert!(none.is_none());

        let cx = batch(&[&unsampled, &sampled], || {
            vec![KeyValue::new("kiln.batch.requests", 2_i64)]
        })
        .expect("a batch with a sampled request has a span");
        let batch_id = cx.span().span_context().span_id();
        let sampled_id = sampled.span().span_context().span_id();
        drop((cx, sampled, unsampled));
        let spans = kept.0.lock().unwrap().clone();
        let batch = spans
            .iter()
            .find(|s| s.name == "batch")
            .expect("batch exported");
        assert_eq!(batch.span_context.trace_id(), TraceId::from(0xbbb));
        assert_eq!(batch.parent_span_id, sampled_id);
        let linked: Vec<TraceId> = batch
            .links
            .iter()
            .map(|l| l.span_context.trace_id())
            .collect();
        assert_eq!(linked, vec![TraceId::from(0xaaa), TraceId::from(0xbbb)]);
        let request = spans
            .iter()
            .find(|s| s.span_context.span_id() == sampled_id)
            .expect("the sampled request exported");
        assert!(
            request
                .attributes
                .contains(&KeyValue::new("kiln.batch.span_id", batch_id.to_string()))
        );
        assert!(
            spans
                .iter()
                .all(|s| s.span_context.trace_id() != TraceId::from(0xaaa)),
            "nothing of the unsampled trace"
        );
        let _ = provider.shutdown();
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
