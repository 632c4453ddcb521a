//! Distributed tracing on every gRPC hop.
//!
//! [`Server`] wraps a tonic server: each call gets a server span whose parent is the W3C
//! trace context the caller sent, named and attributed after the OpenTelemetry RPC
//! conventions. [`Client`] wraps a channel: each call gets a client span, and that span's
//! context travels in the request's metadata. The spans of the request path (these, and
//! those of the gateway and the worker's batcher) are Kiln's own: sampled by the
//! configured OpenTelemetry sampler, carried as the request's current OpenTelemetry
//! context (so `tracing` spans and the propagator see them as any span), and handed on
//! end, as the SDK's `SpanData`, straight to the process's exporter queue ([`Sink`]) —
//! without the SDK's tracer, span builder and batch processor on the way; the queue's
//! thread encodes them in batches. An unsampled request costs almost nothing. `tracing`
//! spans (model loads, training jobs, registry changes) join the same traces through
//! `tracing-opentelemetry`. Everything costs one
//! relaxed atomic load until a process turns tracing on with [`enable`] (it does when
//! an OTLP endpoint is configured).
//!
//! Why one long file: the span record, the context that carries it and the tonic server
//! and client wrappers share private invariants (a record is ended exactly once, by
//! whoever holds it last), and each piece was measured against the SDK's as a whole
//! (docs/benchmarks.md, "Tracing overhead"); about a quarter of the file is its tests.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

pub use opentelemetry::Context;
use opentelemetry::InstrumentationScope;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{Event, Link, SpanContext, SpanId, Status, TraceContextExt as _};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, ShouldSample as _, SpanData, SpanEvents, SpanLinks,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use opentelemetry::trace::SpanKind;
pub use opentelemetry::{KeyValue, Value};

/// Where a process's finished spans go: its exporter's queue.
pub trait Sink: Send + Sync {
    /// Take one finished, sampled span. Called on the request path: must not block.
    fn finished(&self, span: SpanData);
}

struct Tracing {
    sampler: Sampler,
    sink: Arc<dyn Sink>,
    scope: InstrumentationScope,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACING: OnceLock<Tracing> = OnceLock::new();

/// The most attributes, events and links one span keeps (as the SDK's default limits);
/// more are counted as dropped.
const LIMIT: usize = 128;

/// Turn span creation on for this process: request-path spans are sampled by `sampler`
/// (the one the SDK's tracer provider has) and go to `sink` when they end. Once per
/// process; later calls change nothing.
pub fn enable(sampler: Sampler, sink: Arc<dyn Sink>) {
    let _ = TRACING.set(Tracing {
        sampler,
        sink,
        scope: InstrumentationScope::builder("kiln").build(),
    });
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
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    links: impl FnOnce() -> Vec<Link>,
) -> Option<Context> {
    Some(match begin(name, kind, parent, attributes, links)? {
        Begun::Recording(span) => parent.with_span(span),
        Begun::SampledOut(context) => parent.with_remote_span_context(context),
        Begun::UnderUnsampled => parent.clone(),
    })
}

/// A span begun by [`begin`]: recorded; sampled out (its ids, marked not sampled, are
/// what travels on); or not made at all, under an unsampled span of this process (whose
/// context stands in for it). Only a caller that carries the span in a context builds
/// one from the last two.
#[allow(
    clippy::large_enum_variant,
    reason = "the record moves by value on purpose: a box per span was a measured cost"
)]
enum Begun {
    Recording(Recording),
    SampledOut(SpanContext),
    UnderUnsampled,
}

/// Begin a span named `name` under `parent`, as the configured sampler decides. None when
/// tracing is off.
fn begin(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    links: impl FnOnce() -> Vec<Link>,
) -> Option<Begun> {
    if !enabled() {
        return None;
    }
    if unsampled_local(parent) {
        return Some(Begun::UnderUnsampled);
    }
    let tracing = TRACING.get()?;
    let parent_span = parent.span();
    let above = parent_span.span_context();
    let (trace_id, parent_id, parent_remote) = if above.is_valid() {
        (above.trace_id(), above.span_id(), above.is_remote())
    } else {
        (ids::trace_id(), SpanId::INVALID, false)
    };
    let span_id = ids::span_id();
    let name = name.into();
    let mut links = links();
    let verdict = tracing
        .sampler
        .should_sample(Some(parent), trace_id, &name, &kind, &[], &links);
    let flags = above.trace_flags();
    if !matches!(verdict.decision, SamplingDecision::RecordAndSample) {
        // Not sampled: fresh ids that say so travel on, and nothing is recorded.
        let context = SpanContext::new(
            trace_id,
            span_id,
            flags.with_sampled(false),
            false,
            verdict.trace_state,
        );
        return Some(Begun::SampledOut(context));
    }
    let context = SpanContext::new(
        trace_id,
        span_id,
        flags.with_sampled(true),
        false,
        verdict.trace_state,
    );
    let mut attributes = attributes();
    attributes.extend(verdict.attributes);
    let dropped_attributes = attributes.len().saturating_sub(LIMIT);
    attributes.truncate(LIMIT);
    let mut span_links = SpanLinks::default();
    span_links.dropped_count = links.len().saturating_sub(LIMIT) as u32;
    links.truncate(LIMIT);
    span_links.links = links;
    let now = SystemTime::now();
    Some(Begun::Recording(Recording {
        data: Some(SpanData {
            span_context: context.clone(),
            parent_span_id: parent_id,
            parent_span_is_remote: parent_remote,
            span_kind: kind,
            name,
            start_time: now,
            end_time: now,
            attributes,
            dropped_attributes_count: dropped_attributes as u32,
            events: SpanEvents::default(),
            links: span_links,
            status: Status::Unset,
            instrumentation_scope: tracing.scope.clone(),
        }),
        context,
    }))
}

/// A span no context carries: nothing starts under it and nothing looks it up, so it
/// skips what a context's span costs (a shared, locked, boxed span and its reference
/// counts). It ends when dropped. The worker's queue waits and batches are such spans.
pub struct Detached(Recording);

impl Detached {
    /// Start a span under `parent` that no context carries; None when it is not recorded
    /// (tracing off, or not sampled: then `attributes` is never called).
    pub fn start(
        name: &'static str,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Self> {
        Self::start_linked(name, parent, attributes, Vec::new)
    }

    /// As [`start`](Self::start), for a span that began at `started` (before now): one
    /// recorded after the fact, such as a queue wait noted when its request leaves the queue.
    pub fn start_at(
        name: &'static str,
        parent: &Context,
        started: SystemTime,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Self> {
        let mut span = Self::start(name, parent, attributes)?;
        if let Some(data) = &mut span.0.data {
            data.start_time = started.min(data.start_time);
        }
        Some(span)
    }

    fn start_linked(
        name: &'static str,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
        links: impl FnOnce() -> Vec<Link>,
    ) -> Option<Self> {
        match begin(name, SpanKind::Internal, parent, attributes, links)? {
            Begun::Recording(span) => Some(Self(span)),
            Begun::SampledOut(_) | Begun::UnderUnsampled => None,
        }
    }

    /// The span's ids.
    pub fn span_context(&self) -> &SpanContext {
        &self.0.context
    }
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Detached").field(&self.0.context).finish()
    }
}

/// A recording request-path span: what the OpenTelemetry API asks of a span, kept as
/// the `SpanData` the exporter takes when it ends (at [`end`](opentelemetry::trace::Span::end)
/// or when the last context holding it is dropped).
struct Recording {
    context: SpanContext,
    /// Held in place, not boxed: a span in a context is already on the heap (the context
    /// boxes it), and at its end the record is moved into the queue's buffer, so the
    /// serving thread neither allocates it alone nor leaves it to another thread to free.
    data: Option<SpanData>,
}

impl opentelemetry::trace::Span for Recording {
    fn add_event_with_timestamp<T>(
        &mut self,
        name: T,
        timestamp: SystemTime,
        attributes: Vec<KeyValue>,
    ) where
        T: Into<Cow<'static, str>>,
    {
        if let Some(data) = &mut self.data {
            let event = Event::new(name, timestamp, attributes, 0);
            keep(
                &mut data.events.events,
                &mut data.events.dropped_count,
                event,
            );
        }
    }

    fn span_context(&self) -> &SpanContext {
        &self.context
    }

    fn is_recording(&self) -> bool {
        self.data.is_some()
    }

    fn set_attribute(&mut self, attribute: KeyValue) {
        if let Some(data) = &mut self.data {
            keep(
                &mut data.attributes,
                &mut data.dropped_attributes_count,
                attribute,
            );
        }
    }

    fn set_status(&mut self, status: Status) {
        // As the SDK: Ok > Error > Unset, and a status only moves up.
        if let Some(data) = &mut self.data
            && status > data.status
        {
            data.status = status;
        }
    }

    fn update_name<T>(&mut self, new_name: T)
    where
        T: Into<Cow<'static, str>>,
    {
        if let Some(data) = &mut self.data {
            data.name = new_name.into();
        }
    }

    fn add_link(&mut self, span_context: SpanContext, attributes: Vec<KeyValue>) {
        if let Some(data) = &mut self.data {
            let link = Link::new(span_context, attributes, 0);
            keep(&mut data.links.links, &mut data.links.dropped_count, link);
        }
    }

    fn end_with_timestamp(&mut self, timestamp: SystemTime) {
        if let Some(mut data) = self.data.take() {
            data.end_time = timestamp;
            if let Some(tracing) = TRACING.get() {
                tracing.sink.finished(data);
            }
        }
    }
}

/// Add `item` to a span's list, or count it as dropped once the list holds [`LIMIT`].
fn keep<T>(items: &mut Vec<T>, dropped: &mut u32, item: T) {
    if items.len() < LIMIT {
        items.push(item);
    } else {
        *dropped += 1;
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.data.is_some() {
            opentelemetry::trace::Span::end_with_timestamp(self, SystemTime::now());
        }
    }
}

/// Span and trace ids: a per-thread SplitMix64 stream seeded from the standard library's
/// per-process random hash keys (ids need to be unique, not secret).
mod ids {
    use std::cell::Cell;
    use std::hash::{BuildHasher as _, Hasher as _};

    use opentelemetry::trace::{SpanId, TraceId};

    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }

    fn seed() -> u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish()
    }

    fn next() -> u64 {
        STATE.with(|state| {
            let x = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            state.set(x);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    pub(super) fn span_id() -> SpanId {
        loop {
            let id = next();
            if id != 0 {
                return SpanId::from(id);
            }
        }
    }

    pub(super) fn trace_id() -> TraceId {
        loop {
            let id = u128::from(next()) << 64 | u128::from(next());
            if id != 0 {
                return TraceId::from(id);
            }
        }
    }
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
        // The current context borrowed where it is, not cloned (two atomic counts).
        Context::map_current(|cx| {
            let span = cx.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(key, value));
            }
        });
    }
}

/// Set the attributes `make` returns on the current request's span; `make` runs only
/// when that span is sampled, so an unsampled request builds none of them.
pub fn attributes(make: impl FnOnce() -> Vec<KeyValue>) {
    if enabled() {
        Context::map_current(|cx| {
            let span = cx.span();
            if span.is_recording() {
                span.set_attributes(make());
            }
        });
    }
}

/// Add the event `name` with string attributes to the current request's span.
pub fn event(name: &'static str, attributes: &[(&'static str, &str)]) {
    if enabled() {
        let attributes = attributes
            .iter()
            .map(|(k, v)| KeyValue::new(*k, v.to_string()))
            .collect();
        Context::map_current(|cx| cx.span().add_event(name, attributes));
    }
}

/// The span of one batch (a forward pass) on `requests`, each the context of a request
/// it serves: it belongs to the trace of the first sampled one, links to every one, and
/// each records the batch's span id as `kiln.batch.span_id`. None when no request is
/// sampled (`attributes` is then never called). It ends when dropped.
pub fn batch(
    requests: &[&Context],
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Detached> {
    shared_step("batch", requests, attributes)
}

/// As [`batch`], for a step named `name` that serves several requests at once (a decode
/// step of every running generation).
pub fn shared_step(
    name: &'static str,
    requests: &[&Context],
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Detached> {
    let first = requests.iter().find(|cx| cx.span().is_recording())?;
    let links = || {
        requests
            .iter()
            .map(|cx| Link::with_context(cx.span().span_context().clone()))
            .collect()
    };
    let span = Detached::start_linked(name, first, attributes, links)?;
    let mut hex = [0u8; 16];
    crate::w3c::write_hex(&mut hex, &span.span_context().span_id().to_bytes());
    let id: Arc<str> = String::from_utf8_lossy(&hex).into();
    for request in requests {
        let span = request.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new(
                "kiln.batch.span_id",
                Value::String(id.clone().into()),
            ));
        }
    }
    Some(span)
}

/// Record the gRPC status `code` a server answered on the span of `cx`.
pub fn record_code(cx: &Context, code: i64) {
    record_status(cx, code, true);
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

/// Looked up by name, not by text (which would be parsed as a header name every time).
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC status in `headers` (a response's headers, for an error answered without a
/// body, or its trailers); none there is OK.
fn status_of(headers: &http::HeaderMap) -> i64 {
    headers
        .get(&GRPC_STATUS)
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

/// A call's path (`/package.Service/Method`) without its leading `/`, as a string that
/// lives as long as the process (see [`Names`]): spans borrow it (name, service, method)
/// instead of copying it every call.
fn call_name(path: &str) -> Cow<'static, str> {
    static CALLS: Names = Names::new();
    CALLS.get(path.trim_start_matches('/'))
}

/// The attribute value for a name a process sees few of and often — a model's, set on
/// the spans of every request for it: the text is kept once (see [`Names`]) and each
/// span borrows it, instead of a copy made on the request path and freed on the export
/// thread.
pub fn name_value(name: &str) -> Value {
    static MODELS: Names = Names::new();
    Value::from(MODELS.get(name))
}

/// Texts kept for the life of the process, so that spans can borrow them. Bounded: past
/// 256 distinct texts (a caller trying made-up names), or for one over 128 bytes, the
/// caller gets its own copy.
struct Names(std::sync::RwLock<Vec<&'static str>>);

impl Names {
    const fn new() -> Self {
        Self(std::sync::RwLock::new(Vec::new()))
    }

    fn get(&self, name: &str) -> Cow<'static, str> {
        // A process sees a few dozen: a scan (lengths first) is cheaper than hashing.
        let find = |names: &[&'static str]| names.iter().copied().find(|&known| known == name);
        if let Some(known) = find(&self.0.read().unwrap_or_else(|p| p.into_inner())) {
            return Cow::Borrowed(known);
        }
        let mut names = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = find(&names) {
            return Cow::Borrowed(known);
        }
        if names.len() >= 256 || name.len() > 128 {
            return Cow::Owned(name.to_owned());
        }
        let kept: &'static str = Box::leak(name.into());
        names.push(kept);
        Cow::Borrowed(kept)
    }
}

/// The RPC attributes of a call named `name` (see [`call_name`]), with room for those the
/// handler and the answer add.
#[allow(
    clippy::ptr_arg,
    reason = "a `'static` borrowed name stays borrowed in the attributes; a `&str` loses that"
)]
fn rpc_attributes(name: &Cow<'static, str>) -> Vec<KeyValue> {
    let (service, method) = match name {
        Cow::Borrowed(name) => {
            let (service, method) = rpc_names(name);
            (Cow::Borrowed(service), Cow::Borrowed(method))
        }
        Cow::Owned(name) => {
            let (service, method) = rpc_names(name);
            (
                Cow::Owned(service.to_owned()),
                Cow::Owned(method.to_owned()),
            )
        }
    };
    // Room for all a worker's call sets: these, the address, the model, its version, the
    // batch size, the status code and the batch's span id.
    let mut attributes = Vec::with_capacity(10);
    attributes.push(KeyValue::new("rpc.system", "grpc"));
    // A borrowed text stays borrowed in the value.
    attributes.push(KeyValue::new("rpc.service", Value::from(service)));
    attributes.push(KeyValue::new("rpc.method", Value::from(method)));
    attributes
}

/// The `server.address` attribute: the `host:port` called.
fn server_address(address: &Arc<str>) -> KeyValue {
    let address = opentelemetry::StringValue::from(address.clone());
    KeyValue::new("server.address", Value::String(address))
}

/// A tonic server (or any HTTP service) with a server span around every call.
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
    /// For a service called in this process (see `kiln_rpc::local`), its address: the
    /// caller's span is the current context, not a `traceparent` to read.
    in_process: Option<Arc<str>>,
}

impl<S> Server<S> {
    /// Trace the calls `inner` answers.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            in_process: None,
        }
    }

    /// Trace the calls `inner`, known in this process as `address`, answers when called
    /// without a socket: the caller's span (current while it makes the call) is the
    /// parent of the server span, and no client span stands between them — with no
    /// network in between, it would time the same work and say nothing more. The span
    /// records the address as `server.address`, as a client span would.
    pub fn in_process(inner: S, address: &str) -> Self {
        Self {
            inner,
            in_process: Some(address.into()),
        }
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
        let (service, _) = rpc_names(request.uri().path());
        if !enabled() || untraced(service) {
            return ServerCall::untraced(self.inner.call(request));
        }
        let parent = if self.in_process.is_some() {
            current()
        } else {
            // Kiln's W3C propagator (the global one), called directly.
            match crate::w3c::extract(request.headers()) {
                Some(caller) => Context::new().with_remote_span_context(caller),
                None => Context::new(),
            }
        };
        let name = call_name(request.uri().path());
        // The samplers do not look at attributes: an unsampled call skips making them.
        let attributes = || {
            let mut attributes = rpc_attributes(&name);
            if let Some(address) = &self.in_process {
                attributes.push(server_address(address));
            }
            attributes
        };
        let Some(cx) = start_linked(
            name.clone(),
            SpanKind::Server,
            &parent,
            attributes,
            Vec::new,
        ) else {
            return ServerCall::untraced(self.inner.call(request));
        };
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
                Some(cx) if response.headers().contains_key(&GRPC_STATUS) => {
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
            crate::w3c::inject(parent.span().span_context(), request.headers_mut());
            return Traced::untraced(self.inner.call(request));
        }
        let name = call_name(request.uri().path());
        let attributes = || {
            let mut attributes = rpc_attributes(&name);
            attributes.push(server_address(&self.peer));
            attributes
        };
        let Some(cx) = start_linked(
            name.clone(),
            SpanKind::Client,
            &parent,
            attributes,
            Vec::new,
        ) else {
            return Traced::untraced(self.inner.call(request));
        };
        crate::w3c::inject(cx.span().span_context(), request.headers_mut());
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

    /// A sink that keeps what it is given; shared by the tests of this process (tracing
    /// is enabled once), which tell their spans apart by trace id.
    #[derive(Default)]
    struct Kept(std::sync::Mutex<Vec<SpanData>>);

    impl Sink for Kept {
        fn finished(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
    }

    static KEPT: std::sync::LazyLock<Arc<Kept>> = std::sync::LazyLock::new(Default::default);

    fn traced() -> Arc<Kept> {
        enable(
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            KEPT.clone(),
        );
        KEPT.clone()
    }

    fn caller(trace: u128, sampled: bool) -> Context {
        use opentelemetry::trace::{TraceFlags, TraceId, TraceState};
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(7),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn spans_of(kept: &Kept, trace: u128) -> Vec<SpanData> {
        let id = opentelemetry::trace::TraceId::from(trace);
        let spans = kept.0.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.span_context.trace_id() == id)
            .cloned()
            .collect()
    }

    #[test]
    fn request_spans_follow_their_parent_record_what_is_set_and_end_with_the_context() {
        use opentelemetry::trace::TraceId;
        let kept = traced();
        let server = start("server", SpanKind::Server, &caller(0xc0ffee, true), || {
            vec![KeyValue::new("rpc.system", "grpc")]
        })
        .unwrap();
        let server_id = server.span().span_context().span_id();
        assert!(server.span().span_context().is_sampled());
        assert!(!server.span().span_context().is_remote());
        let child = start("queue wait", SpanKind::Internal, &server, Vec::new).unwrap();
        let child_id = child.span().span_context().span_id();
        assert_ne!(child_id, server_id, "every span gets its own id");
        drop(child);
        {
            let span = server.span();
            span.set_attribute(KeyValue::new("kiln.batch_size", 4_i64));
            span.add_event("retry", vec![KeyValue::new("peer", "w1")]);
            span.set_status(Status::error("gRPC status 14"));
            span.set_status(Status::Unset);
        }
        assert!(
            spans_of(&kept, 0xc0ffee).len() == 1,
            "the child ended with its context"
        );
        let later = server.clone();
        drop(server);
        assert_eq!(
            spans_of(&kept, 0xc0ffee).len(),
            1,
            "a clone still holds the span"
        );
        drop(later);
        let spans = spans_of(&kept, 0xc0ffee);
        let (child, server) = (&spans[0], &spans[1]);
        assert_eq!(child.name, "queue wait");
        assert_eq!(child.parent_span_id, server_id);
        assert!(!child.parent_span_is_remote);
        assert_eq!(server.parent_span_id, SpanId::from(7));
        assert!(server.parent_span_is_remote);
        assert_eq!(server.span_kind, SpanKind::Server);
        assert_eq!(
            server.attributes,
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("kiln.batch_size", 4_i64)
            ]
        );
        assert_eq!(server.events.events.len(), 1);
        assert_eq!(server.events.events[0].name, "retry");
        assert_eq!(
            server.status,
            Status::error("gRPC status 14"),
            "Unset does not undo it"
        );
        assert!(server.end_time >= child.end_time && child.start_time >= server.start_time);
        assert_eq!(server.instrumentation_scope.name(), "kiln");

        // A root span starts a new trace; a caller that did not sample gets no spans, but
        // its trace id travels on, marked not sampled, and children are not made.
        let root = start("root", SpanKind::Server, &Context::new(), Vec::new).unwrap();
        let trace = root.span().span_context().trace_id();
        assert_ne!(trace, TraceId::INVALID);
        let declined = start("server", SpanKind::Server, &caller(0xdec1, false), || {
            unreachable!("attributes of an unsampled span")
        })
        .unwrap();
        let context = declined.span().span_context().clone();
        assert!(!context.is_sampled() && !declined.span().is_recording());
        assert_eq!(context.trace_id(), TraceId::from(0xdec1));
        let child = start("child", SpanKind::Internal, &declined, Vec::new).unwrap();
        assert_eq!(
            child.span().span_context(),
            &context,
            "no child span is made"
        );
        drop((child, declined, root));
        assert!(spans_of(&kept, 0xdec1).is_empty());
        let root = spans_of(&kept, u128::from_be_bytes(trace.to_bytes()));
        assert_eq!(root.len(), 1);
        assert_eq!(
            root[0].parent_span_id,
            SpanId::INVALID,
            "a root has no parent"
        );
    }

    #[test]
    fn a_detached_span_ends_when_dropped_and_is_not_made_under_an_unsampled_caller() {
        let kept = traced();
        let parent = start("server", SpanKind::Server, &caller(0xd1, true), Vec::new).unwrap();
        let parent_id = parent.span().span_context().span_id();
        let wait = Detached::start("queue wait", &parent, || {
            vec![KeyValue::new("kiln.rows", 3_i64)]
        })
        .expect("a sampled caller's span is recorded");
        assert_eq!(
            wait.span_context().trace_id(),
            parent.span().span_context().trace_id()
        );
        assert!(
            spans_of(&kept, 0xd1).is_empty(),
            "nothing ends before the drop"
        );
        drop(wait);
        let spans = spans_of(&kept, 0xd1);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "queue wait");
        assert_eq!(spans[0].span_kind, SpanKind::Internal);
        assert_eq!(spans[0].parent_span_id, parent_id);
        assert_eq!(spans[0].attributes, vec![KeyValue::new("kiln.rows", 3_i64)]);
        drop(parent);

        let unsampled = start("server", SpanKind::Server, &caller(0xd2, false), Vec::new).unwrap();
        let none = Detached::start("queue wait", &unsampled, || {
            unreachable!("attributes of an unsampled span")
        });
        assert!(none.is_none());
        drop(unsampled);
        assert!(spans_of(&kept, 0xd2).is_empty());
    }

    #[tokio::test]
    async fn an_in_process_call_is_a_server_span_under_the_callers_with_no_client_span() {
        use tower::ServiceExt as _;
        let kept = traced();
        let address = "in-process.trace-test:1";
        // A trailers-only answer (its status in the headers), as gRPC servers give.
        let service = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            let mut answer = http::Response::new(tonic::body::Body::empty());
            answer
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok::<_, std::convert::Infallible>(answer)
        });
        // What `kiln_rpc::local` registers for a service in this process.
        let transport = Server::in_process(service, address);
        let cx = start("caller", SpanKind::Internal, &caller(0x1a, true), Vec::new).unwrap();
        let caller_id = cx.span().span_context().span_id();
        let request = http::Request::builder()
            .uri("http://in-process.trace-test:1/kiln.test.Echo/Ping")
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = scoped(Some(cx.clone()), transport.oneshot(request))
            .await
            .unwrap();
        // Read the answer to its end, as a gRPC client does.
        let mut body = std::pin::pin!(response.into_body());
        while std::future::poll_fn(|task| http_body::Body::poll_frame(body.as_mut(), task))
            .await
            .is_some()
        {}
        drop(cx);

        let spans = spans_of(&kept, 0x1a);
        assert_eq!(
            spans.len(),
            2,
            "the caller's span and the server's: {spans:?}"
        );
        assert!(spans.iter().all(|s| s.span_kind != SpanKind::Client));
        let server = spans
            .iter()
            .find(|s| s.name == "kiln.test.Echo/Ping")
            .expect("a server span named after the call");
        assert_eq!(server.span_kind, SpanKind::Server);
        assert_eq!(
            server.parent_span_id, caller_id,
            "a child of the caller's span"
        );
        assert!(!server.parent_span_is_remote);
        for expected in [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "kiln.test.Echo"),
            KeyValue::new("rpc.method", "Ping"),
            KeyValue::new("server.address", address),
            KeyValue::new("rpc.grpc.status_code", 0_i64),
        ] {
            assert!(
                server.attributes.contains(&expected),
                "{expected:?} in {:?}",
                server.attributes
            );
        }
    }

    #[test]
    fn a_batch_span_joins_the_first_sampled_request_and_links_every_one() {
        use opentelemetry::trace::TraceId;
        let kept = traced();
        // Two requests as a worker sees them: server spans under callers that did and
        // did not sample; the unsampled one queued first.
        let request = |trace: u128, sampled: bool| {
            start(
                "request",
                SpanKind::Server,
                &caller(trace, sampled),
                Vec::new,
            )
            .unwrap()
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
        let batch_id = cx.span_context().span_id();
        let sampled_id = sampled.span().span_context().span_id();
        drop((cx, sampled, unsampled));
        let spans = spans_of(&kept, 0xbbb);
        assert_eq!(
            spans.len(),
            2,
            "the sampled request and the batch: {spans:?}"
        );
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
            spans_of(&kept, 0xaaa).is_empty(),
            "nothing of the unsampled trace"
        );
    }
}
