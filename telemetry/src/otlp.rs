//! Kiln's OTLP/gRPC span exporter.
//!
//! The batch processor ([`crate::batch`]) hands it up to 512 finished spans at a time, on
//! the processor's own thread. It writes them straight into the bytes of an
//! `ExportTraceServiceRequest` (one pass, no intermediate messages, no part of it moved or
//! copied to join it: the request goes out as a few pieces) and sends those on one gRPC
//! channel to the collector. Measured against the stock exporter, which builds the whole
//! request as `prost` messages and encodes it on the serving runtime, this takes most of
//! the export cost off every traced request (docs/benchmarks.md, "Tracing overhead").
//!
//! The encoding follows `opentelemetry/proto/trace/v1/trace.proto` and is checked against
//! the protocol's own message types in the tests below.
//!
//! Why one long file: the encoder and the exporter that sends its bytes are one unit, and
//! a third of the file is the tests that decode its output with the protocol's own types.

use std::borrow::Borrow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, BufMut as _, Bytes};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encoded_len_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::{Error, Result};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Where and how spans are sent.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `http://HOST:PORT` of the collector's OTLP/gRPC receiver.
    pub endpoint: String,
    /// Gives up on one export after this long (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub timeout: Duration,
    /// Sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. a collector's API key.
    pub headers: Vec<(String, String)>,
    /// Gzip the requests (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip`).
    pub gzip: bool,
}

/// Sends encoded batches; see the module documentation.
pub struct Exporter {
    config: ExportConfig,
    /// The exporter's own single-threaded runtime: it carries the connection while an
    /// export waits on it, and lives as long as the exporter (on the batch processor's
    /// thread), whatever becomes of the process's main runtime at exit.
    runtime: Option<tokio::runtime::Runtime>,
    client: tonic::client::Grpc<tonic::transport::Channel>,
    headers: tonic::metadata::MetadataMap,
    /// The `resource` field of every `ResourceSpans`, encoded once.
    resource: Vec<u8>,
    resource_schema: String,
    /// Whether the last export failed: failures are logged once, and so is the recovery.
    failing: AtomicBool,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("endpoint", &self.config.endpoint)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter that connects when it first has spans to send (and again whenever the
    /// collector went away), sending them as spans of `resource` (this process). Encoding
    /// and sending run on the batch processor's thread.
    pub fn new(config: ExportConfig, resource: &Resource) -> Result<Self> {
        let endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
            .map_err(|_| {
                Error::Setting(format!("`{}` is not a collector address", config.endpoint))
            })?
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true);
        let mut headers = tonic::metadata::MetadataMap::new();
        for (name, value) in &config.headers {
            let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
                name.parse().map_err(|_| {
                    Error::Setting(format!(
                        "OTEL_EXPORTER_OTLP_HEADERS: `{name}` is not a header name"
                    ))
                })?;
            let value = value.parse().map_err(|_| {
                Error::Setting(format!(
                    "OTEL_EXPORTER_OTLP_HEADERS: the value of `{name}` is not printable ASCII"
                ))
            })?;
            headers.insert(key, value);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::start("start the trace exporter's runtime", e))?;
        let channel = {
            let _inside = runtime.enter();
            endpoint.connect_lazy()
        };
        let mut client = tonic::client::Grpc::new(channel);
        if config.gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        Ok(Self {
            config,
            runtime: Some(runtime),
            client,
            headers,
            resource: encode_resource(resource),
            resource_schema: resource.schema_url().unwrap_or_default().to_owned(),
            failing: AtomicBool::new(false),
        })
    }

    async fn send(&self, body: Vec<Bytes>) -> Result<(), String> {
        let mut client = self.client.clone();
        client
            .ready()
            .await
            .map_err(|e| format!("the collector is unreachable: {e}"))?;
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = self.headers.clone();
        request.set_timeout(self.config.timeout);
        let answer = client
            .unary(
                request,
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                Raw,
            )
            .await
            .map_err(|status| format!("export failed: {status}"))?;
        let (rejected, why) = answer.into_inner();
        if rejected > 0 {
            tracing::warn!(
                endpoint = %self.config.endpoint,
                rejected,
                reason = %why,
                "the collector rejected spans"
            );
        }
        Ok(())
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Never blocks, so the exporter may be dropped anywhere (even inside a runtime).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Exporter {
    /// Encode `batch` and send it; waits for the collector's answer, at most the
    /// configured timeout. A failure is logged once (and the recovery once), and returned.
    pub fn export(&self, batch: &[impl Borrow<SpanData>]) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let body = encode_request(&self.resource, &self.resource_schema, batch);
        // The batch processor's thread is not a runtime thread: it runs the exporter's
        // runtime while it waits.
        let timeout = self.config.timeout;
        let sent = match &self.runtime {
            Some(runtime) => runtime.block_on(async {
                tokio::time::timeout(timeout, self.send(body))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("the collector did not answer within {timeout:?}"))
                    })
            }),
            None => Err("the exporter is shut down".to_owned()),
        };
        match &sent {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.config.endpoint, "exporting spans again");
                }
            }
            Err(why) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.config.endpoint,
                        error = %why,
                        "cannot export spans; they are dropped until the collector answers"
                    );
                }
            }
        }
        sent
    }
}

/// The gRPC codec of the export call: the request goes out as the pieces already encoded
/// (each copied once, into the call's frame); of the answer only the partial-success
/// fields are read (rejected spans, why).
struct Raw;

impl Codec for Raw {
    type Encode = Vec<Bytes>;
    type Decode = (i64, String);
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<Bytes>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<Bytes>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        for piece in &item {
            dst.put_slice(piece);
        }
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = (i64, String);
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<(i64, String)>, tonic::Status> {
        use prost::Message as _;
        let answer =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
                src.copy_to_bytes(src.remaining()),
            )
            .map_err(|e| tonic::Status::internal(format!("bad answer from the collector: {e}")))?;
        Ok(Some(
            answer
                .partial_success
                .map_or((0, String::new()), |p| (p.rejected_spans, p.error_message)),
        ))
    }
}

/// A varint (prost's `encode_varint` for a `Vec`, with the one-byte case first: nearly
/// every length and number in a span; under callgrind this halves the encoder's work).
#[inline]
fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint into a small buffer: how many of its bytes it took.
fn varint_into(buf: &mut [u8; 10], mut value: u64) -> usize {
    let mut n = 0;
    while value >= 0x80 {
        buf[n] = value as u8 | 0x80;
        value >>= 7;
        n += 1;
    }
    buf[n] = value as u8;
    n + 1
}

#[inline]
fn encode_key(field: u32, wire_type: WireType, out: &mut Vec<u8>) {
    encode_varint(u64::from(field << 3 | wire_type as u32), out);
}

#[inline]
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    out.reserve(data.len() + 8);
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// A string or bytes field, left out when empty (proto3's default).
fn nonempty(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    if !data.is_empty() {
        bytes_field(out, field, data);
    }
}

fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    encode_key(field, WireType::SixtyFourBit, out);
    out.extend_from_slice(&v.to_le_bytes());
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    encode_key(field, WireType::ThirtyTwoBit, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A nested message written in place: its body goes after `room` bytes for its length,
/// which is filled in once the body is known; the body moves (by a byte or two) only when
/// its length takes another number of bytes than `room`: the caller's guess from what it
/// writes (a span: two, up to 16 KiB; an event, a link, a status: one, up to 127 bytes).
/// For the messages whose length is cheap to know first, see [`key_value`].
fn message(out: &mut Vec<u8>, field: u32, room: usize, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, out);
    let at = out.len();
    out.resize(at + room, 0);
    body(out);
    let end = out.len();
    let len = (end - at - room) as u64;
    let n = encoded_len_varint(len);
    if n < room {
        out.copy_within(at + room..end, at + n);
        out.truncate(end - (room - n));
    } else if n > room {
        out.resize(end + (n - room), 0);
        out.copy_within(at + room..end, at + n);
    }
    let mut length = [0; 10];
    varint_into(&mut length, len);
    out[at..at + n].copy_from_slice(&length[..n]);
}

/// The fields of a `Resource` message: its attributes.
fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in resource.iter() {
        message(&mut out, 1, 1, |out| key_value(out, key.as_str(), value));
    }
    out
}

/// Bytes a length-delimited field of `len` bytes takes (fields below 16 have one-byte tags).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `AnyValue` fields (its `oneof`): written even when zero, so the kind survives.
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => bytes_field(out, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        Value::F64(f) => fixed64(out, 4, f.to_bits()),
        Value::Array(array) => message(out, 5, 1, |out| array_values(out, array)),
        // A kind newer than this encoder: its text form.
        other => bytes_field(out, 1, other.as_str().as_bytes()),
    }
}

fn array_values(out: &mut Vec<u8>, array: &Array) {
    fn each<T: Clone + Into<Value>>(out: &mut Vec<u8>, items: &[T]) {
        for item in items {
            message(out, 1, 1, |out| any_value(out, &item.clone().into()));
        }
    }
    match array {
        Array::Bool(v) => each(out, v),
        Array::I64(v) => each(out, v),
        Array::F64(v) => each(out, v),
        Array::String(v) => each(out, v),
        other => message(out, 1, 1, |out| {
            bytes_field(out, 1, other.to_string().as_bytes())
        }),
    }
}

/// The length of an `AnyValue` holding `value`, when it is not an array.
fn scalar_len(value: &Value) -> Option<usize> {
    Some(match value {
        Value::String(s) => field_len(s.as_str().len()),
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + encoded_len_varint(*i as u64),
        Value::F64(_) => 9,
        _ => return None,
    })
}

/// A `KeyValue`'s fields. The common values (not arrays) have lengths known up front, so
/// they are written straight, without the move [`message`] may make.
fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    nonempty(out, 1, key.as_bytes());
    match scalar_len(value) {
        Some(len) => {
            encode_key(2, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
            any_value(out, value);
        }
        None => message(out, 2, 1, |out| any_value(out, value)),
    }
}

/// The common attribute — a key under 64 bytes with a short string, an integer or a bool,
/// so that every length is one byte — written in four copies, two of them of fixed size
/// (a third of the general path's instructions). False, and nothing written, for any other.
fn short_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) -> bool {
    let key = key.as_bytes();
    if key.is_empty() || key.len() >= 64 || field >= 16 {
        return false;
    }
    let tag = (field << 3 | WireType::LengthDelimited as u32) as u8;
    // KeyValue { key = 1, value = 2 }, AnyValue { string = 1, bool = 2, int = 3 }.
    let head = |out: &mut Vec<u8>, any: usize| {
        let kv = 2 + key.len() + 2 + any;
        out.reserve(kv + 2);
        out.extend_from_slice(&[tag, kv as u8, 0x0a, key.len() as u8]);
        out.extend_from_slice(key);
    };
    match value {
        Value::String(text) => {
            let text = text.as_str().as_bytes();
            if key.len() + text.len() >= 120 {
                return false;
            }
            let any = 2 + text.len();
            head(out, any);
            out.extend_from_slice(&[0x12, any as u8, 0x0a, text.len() as u8]);
            out.extend_from_slice(text);
        }
        Value::I64(i) => {
            let mut number = [0; 10];
            let n = varint_into(&mut number, *i as u64);
            head(out, 1 + n);
            out.extend_from_slice(&[0x12, 1 + n as u8, 0x18]);
            out.extend_from_slice(&number[..n]);
        }
        Value::Bool(b) => {
            head(out, 2);
            out.extend_from_slice(&[0x12, 2, 0x10, u8::from(*b)]);
        }
        _ => return false,
    }
    true
}

/// `KeyValue` messages as repeated field `field`.
fn attributes<'a>(
    out: &mut Vec<u8>,
    field: u32,
    attributes: impl IntoIterator<Item = &'a KeyValue>,
) {
    for kv in attributes {
        let key = kv.key.as_str();
        if short_attribute(out, field, key, &kv.value) {
            continue;
        }
        match scalar_len(&kv.value) {
            Some(value) => {
                let key_len = if key.is_empty() {
                    0
                } else {
                    field_len(key.len())
                };
                encode_key(field, WireType::LengthDelimited, out);
                encode_varint((key_len + field_len(value)) as u64, out);
                key_value(out, key, &kv.value);
            }
            None => message(out, field, 1, |out| key_value(out, key, &kv.value)),
        }
    }
}

/// `Span.flags`: the W3C trace flags, and whether the parent is remote.
fn span_flags(trace_flags: u8, remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

/// The ids (`trace_id` = 1, `span_id` = 2, and `parent` for a span's `parent_span_id` =
/// 4) in one copy, then the trace state (3).
fn context_ids(out: &mut Vec<u8>, context: &SpanContext, parent: Option<SpanId>) {
    let mut ids = [0u8; 38];
    ids[..2].copy_from_slice(&[0x0a, 16]);
    ids[2..18].copy_from_slice(&context.trace_id().to_bytes());
    ids[18..20].copy_from_slice(&[0x12, 8]);
    ids[20..28].copy_from_slice(&context.span_id().to_bytes());
    let mut n = 28;
    if let Some(parent) = parent.filter(|p| *p != SpanId::INVALID) {
        ids[28..30].copy_from_slice(&[0x22, 8]);
        ids[30..38].copy_from_slice(&parent.to_bytes());
        n = 38;
    }
    out.extend_from_slice(&ids[..n]);
    // The W3C `tracestate` header form, `key=value,key=value`, written without building it.
    let state = context.trace_state();
    let entries = state.into_iter().len();
    if entries > 0 {
        let len: usize = state.into_iter().map(|(k, v)| k.len() + 1 + v.len()).sum();
        encode_key(3, WireType::LengthDelimited, out);
        encode_varint((len + entries - 1) as u64, out);
        for (i, (key, value)) in state.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
        }
    }
}

fn span(out: &mut Vec<u8>, span: &SpanData) {
    // Fields in number order, as the reference encoder writes them; the trace state (3)
    // comes after the parent id (4) here, which protobuf readers accept in any order.
    context_ids(out, &span.span_context, Some(span.parent_span_id));
    nonempty(out, 5, span.name.as_bytes());
    let kind = match span.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    // kind = 6 (one byte), start = 7 and end = 8 (fixed64): one copy of fixed size.
    let mut times = [0u8; 20];
    times[..2].copy_from_slice(&[0x30, kind]);
    times[2] = 0x39;
    times[3..11].copy_from_slice(&nanos(span.start_time).to_le_bytes());
    times[11] = 0x41;
    times[12..20].copy_from_slice(&nanos(span.end_time).to_le_bytes());
    out.extend_from_slice(&times);
    attributes(out, 9, &span.attributes);
    uint(out, 10, span.dropped_attributes_count.into());
    for event in span.events.iter() {
        message(out, 11, 1, |out| {
            fixed64(out, 1, nanos(event.timestamp));
            nonempty(out, 2, event.name.as_bytes());
            attributes(out, 3, &event.attributes);
            uint(out, 4, event.dropped_attributes_count.into());
        });
    }
    uint(out, 12, span.events.dropped_count.into());
    for link in span.links.iter() {
        message(out, 13, 1, |out| {
            context_ids(out, &link.span_context, None);
            attributes(out, 4, &link.attributes);
            uint(out, 5, link.dropped_attributes_count.into());
            let flags = span_flags(
                link.span_context.trace_flags().to_u8(),
                link.span_context.is_remote(),
            );
            fixed32(out, 6, flags);
        });
    }
    uint(out, 14, span.links.dropped_count.into());
    // status = 15: { message = 2, code = 3 }.
    match &span.status {
        Status::Unset => out.extend_from_slice(&[0x7a, 0]),
        Status::Ok => out.extend_from_slice(&[0x7a, 2, 0x18, 1]),
        Status::Error { description } => message(out, 15, 1, |out| {
            nonempty(out, 2, description.as_bytes());
            uint(out, 3, 2);
        }),
    }
    let flags = span_flags(
        span.span_context.trace_flags().to_u8(),
        span.parent_span_is_remote,
    );
    fixed32(out, 16, flags);
}

fn scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    nonempty(out, 1, scope.name().as_bytes());
    nonempty(out, 2, scope.version().unwrap_or_default().as_bytes());
    attributes(out, 3, scope.attributes());
}

/// Whether two spans' scopes are the same: copies of one scope (a name at the same
/// address, nothing else set) are told apart from the rest without comparing text.
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    let plain = |s: &InstrumentationScope| {
        s.version().is_none() && s.schema_url().is_none() && s.attributes().next().is_none()
    };
    (std::ptr::eq(a.name(), b.name()) && plain(a) && plain(b)) || a == b
}

/// The `ExportTraceServiceRequest` for `spans`, as the pieces it is sent in: one
/// `ResourceSpans` (this process), one `ScopeSpans` per instrumentation scope in the order
/// they first appear. Each scope's spans are written into a buffer of their own and the
/// headers (whose lengths they make) into small ones after, so nothing is moved to make
/// room for a length. No pieces for no spans.
pub fn encode_request(
    resource: &[u8],
    resource_schema: &str,
    spans: &[impl Borrow<SpanData>],
) -> Vec<Bytes> {
    if spans.is_empty() {
        return Vec::new();
    }
    // The scope of each span, as an index into `scopes`: most batches have one or two.
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    let mut group = Vec::with_capacity(spans.len());
    // Runs of spans share a scope (the request path's spans are all Kiln's): the last
    // span's is tried first, by its name's address, before any full comparison.
    let mut last = usize::MAX;
    for s in spans {
        let scope = &s.borrow().instrumentation_scope;
        if last == usize::MAX || !same_scope(scopes[last], scope) {
            last = match scopes.iter().position(|&known| same_scope(known, scope)) {
                Some(index) => index,
                None => {
                    scopes.push(scope);
                    scopes.len() - 1
                }
            };
        }
        group.push(last);
    }
    // Each `ScopeSpans`: its head (field key, length, scope) and body (spans, schema).
    let mut pieces = Vec::with_capacity(2 * scopes.len() + 1);
    let mut scope_spans_len = 0;
    for (index, &scope_of) in scopes.iter().enumerate() {
        let mut body = Vec::with_capacity(64 + spans.len() * 360);
        for (s, _) in spans.iter().zip(&group).filter(|&(_, &g)| g == index) {
            message(&mut body, 2, 2, |out| span(out, s.borrow()));
        }
        nonempty(
            &mut body,
            3,
            scope_of.schema_url().unwrap_or_default().as_bytes(),
        );
        let mut fields = Vec::new();
        message(&mut fields, 1, 1, |out| scope(out, scope_of));
        let len = fields.len() + body.len();
        let mut head = Vec::with_capacity(16 + fields.len());
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(len as u64, &mut head);
        head.extend_from_slice(&fields);
        scope_spans_len += head.len() + body.len();
        pieces.push(Bytes::from(head));
        pieces.push(Bytes::from(body));
    }
    let mut tail = Vec::new();
    nonempty(&mut tail, 3, resource_schema.as_bytes());
    // The request's one field, `resource_spans`, and the resource it starts with.
    let resource_spans_len = field_len(resource.len()) + scope_spans_len + tail.len();
    let mut top = Vec::with_capacity(16 + resource.len());
    encode_key(1, WireType::LengthDelimited, &mut top);
    encode_varint(resource_spans_len as u64, &mut top);
    bytes_field(&mut top, 1, resource);
    pieces.insert(0, Bytes::from(top));
    if !tail.is_empty() {
        pieces.push(Bytes::from(tail));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    fn context(trace: u128, span: u64, sampled: bool, remote: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = TraceState::from_key_value([("vendor", "x1"), ("kiln", "b2")]).unwrap();
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            flags,
            remote,
            state,
        )
    }

    /// Spans that use every field the encoder writes: every attribute kind, events,
    /// links, each status, remote and local parents, two scopes.
    fn spans() -> Vec<SpanData> {
        let kiln = InstrumentationScope::builder("kiln").build();
        let other = InstrumentationScope::builder("tracing")
            .with_version("0.1")
            .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
            .with_attributes([KeyValue::new("scope.flag", true)])
            .build();
        let at = UNIX_EPOCH + Duration::from_nanos(1_764_633_600_123_456_789);
        let attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("kiln.batch_size", 32_i64),
            KeyValue::new("kiln.zero", 0_i64),
            KeyValue::new("kiln.negative", -7_i64),
            KeyValue::new("kiln.ratio", 0.25),
            KeyValue::new("kiln.false", false),
            KeyValue::new("kiln.empty", ""),
            KeyValue::new("kiln.ints", Value::Array(Array::I64(vec![1, -2, 3]))),
            KeyValue::new(
                "kiln.names",
                Value::Array(Array::String(vec!["a".into(), "".into()])),
            ),
            KeyValue::new("kiln.bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("kiln.floats", Value::Array(Array::F64(vec![1.5]))),
            // Past the one-byte lengths of the short path: the general one.
            KeyValue::new("kiln.long", "x".repeat(200)),
            KeyValue::new("k".repeat(70), 7_i64),
            KeyValue::new("kiln.edge", "y".repeat(119 - "kiln.edge".len())),
            KeyValue::new("kiln.over", "z".repeat(120 - "kiln.over".len())),
            KeyValue::new("kiln.true", true),
            KeyValue::new("kiln.big", i64::MAX),
        ];
        let base = SpanData {
            span_context: context(0xabc, 0x11, true, false),
            parent_span_id: SpanId::from(0x22),
            parent_span_is_remote: true,
            span_kind: SpanKind::Server,
            name: "inference.GRPCInferenceService/ModelInfer".into(),
            start_time: at,
            end_time: at + Duration::from_micros(850),
            attributes,
            dropped_attributes_count: 2,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: kiln.clone(),
        };
        let mut events = SpanEvents::default();
        events.events.push(Event::new(
            "epoch ended",
            at + Duration::from_millis(3),
            vec![KeyValue::new("epoch", 4_i64)],
            1,
        ));
        events.events.push(Event::new("retry", at, Vec::new(), 0));
        events.dropped_count = 3;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(0xdef, 0x33, true, true),
            vec![KeyValue::new("kiln.rows", 8_i64)],
            0,
        ));
        links
            .links
            .push(Link::new(context(0xabc, 0x44, false, false), Vec::new(), 5));
        links.dropped_count = 1;
        vec![
            base.clone(),
            SpanData {
                span_context: context(0xabc, 0x55, true, false),
                parent_span_id: SpanId::INVALID,
                parent_span_is_remote: false,
                span_kind: SpanKind::Internal,
                name: "batch".into(),
                events,
                links,
                status: Status::error("worker w1 was lost"),
                instrumentation_scope: other.clone(),
                ..base.clone()
            },
            SpanData {
                span_kind: SpanKind::Client,
                status: Status::Ok,
                attributes: Vec::new(),
                dropped_attributes_count: 0,
                ..base.clone()
            },
            SpanData {
                span_kind: SpanKind::Producer,
                name: "".into(),
                instrumentation_scope: other,
                ..base.clone()
            },
            // Scalars only (the short path where they fit), a name and texts past one-
            // and two-byte lengths, a key past 127 bytes.
            SpanData {
                span_context: context(0xabc, 0x66, true, false),
                name: "n".repeat(300).into(),
                attributes: base
                    .attributes
                    .iter()
                    .filter(|kv| !matches!(kv.value, Value::Array(_)))
                    .cloned()
                    .chain([
                        KeyValue::new("kiln.huge", "h".repeat(20_000)),
                        KeyValue::new("q".repeat(130), "v"),
                        KeyValue::new("kiln.min", i64::MIN),
                    ])
                    .collect(),
                ..base.clone()
            },
            SpanData {
                span_kind: SpanKind::Consumer,
                start_time: UNIX_EPOCH,
                end_time: UNIX_EPOCH,
                ..base
            },
        ]
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("kiln-worker")
            .with_attributes([
                KeyValue::new("deployment.environment", "test"),
                KeyValue::new("host.cores", 2_i64),
            ])
            .with_schema_url([], "https://opentelemetry.io/schemas/1.30.0")
            .build()
    }

    /// What the OpenTelemetry project's own conversion makes of the same spans.
    fn reference(resource: &Resource, spans: Vec<SpanData>) -> ExportTraceServiceRequest {
        let resource = ResourceAttributesWithSchema::from(resource);
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &resource),
        }
    }

    fn sorted(mut request: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        // Resource attributes come from a hash map: order them before comparing.
        for r in &mut request.resource_spans {
            if let Some(res) = &mut r.resource {
                res.attributes.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        request
    }

    #[test]
    fn encoding_decodes_to_what_the_reference_conversion_builds() {
        let resource = resource();
        let spans = spans();
        let pieces = encode_request(
            &encode_resource(&resource),
            resource.schema_url().unwrap_or_default(),
            &spans,
        );
        assert_eq!(
            pieces.len(),
            6,
            "request head, two scopes' heads and bodies, schema"
        );
        let ours =
            ExportTraceServiceRequest::decode(pieces.concat().as_slice()).expect("valid protobuf");
        let theirs = reference(&resource, spans);
        assert_eq!(ours.resource_spans.len(), 1);
        assert_eq!(
            ours.resource_spans[0].scope_spans.len(),
            2,
            "one group a scope"
        );
        assert_eq!(sorted(ours), sorted(theirs));
    }

    #[test]
    fn lengths_of_every_size_are_written_in_the_fewest_bytes() {
        // 0..=127 take one length byte, up to 16,383 two, then three: whatever room was
        // guessed, the body moves by the difference and nothing of it is lost.
        for room in 1..=3 {
            for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
                let mut out = vec![0xee];
                message(&mut out, 7, room, |out| {
                    out.extend((0..len).map(|i| i as u8))
                });
                out.push(0xdd);
                let mut expect = vec![0xee];
                bytes_field(
                    &mut expect,
                    7,
                    &(0..len).map(|i| i as u8).collect::<Vec<_>>(),
                );
                expect.push(0xdd);
                assert_eq!(out, expect, "body of {len} bytes, room {room}");
            }
        }
    }

    #[test]
    fn an_empty_batch_is_an_empty_request() {
        assert!(encode_request(b"", "", &[] as &[SpanData]).is_empty());
    }

    /// An export the test collector got, with its `x-api-key` header.
    type Received = (ExportTraceServiceRequest, Option<String>);

    #[derive(Clone, Default)]
    struct Collector {
        got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    }

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for Collector
    {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
            >,
            tonic::Status,
        > {
            let key = request
                .metadata()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            self.got.lock().unwrap().push((request.into_inner(), key));
            Ok(tonic::Response::new(Default::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reaches_a_collector_with_the_configured_headers_gzipped_or_not() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        for gzip in [false, true] {
            let exporter = Exporter::new(
                ExportConfig {
                    endpoint: format!("http://{addr}"),
                    timeout: Duration::from_secs(5),
                    headers: vec![("x-api-key".into(), "secret".into())],
                    gzip,
                },
                &resource(),
            )
            .unwrap();
            let sent = tokio::task::spawn_blocking(move || exporter.export(&spans()))
                .await
                .unwrap();
            assert!(sent.is_ok(), "{sent:?}");
        }
        let got = collector.got.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        for (request, key) in got {
            assert_eq!(key.as_deref(), Some("secret"));
            assert_eq!(sorted(request), sorted(reference(&resource(), spans())));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_absent_collector_fails_the_export_within_the_timeout() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exporter = Exporter::new(
            ExportConfig {
                endpoint: format!("http://127.0.0.1:{port}"),
                timeout: Duration::from_secs(2),
                headers: Vec::new(),
                gzip: false,
            },
            &resource(),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let sent = tokio::task::spawn_blocking(move || exporter.export(&spans()))
            .await
            .unwrap();
        assert!(sent.is_err());
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_header_that_grpc_cannot_carry_is_refused_by_name() {
        let bad = Exporter::new(
            ExportConfig {
                endpoint: "http://127.0.0.1:4317".into(),
                timeout: Duration::from_secs(1),
                headers: vec![("bad header".into(), "x".into())],
                gzip: false,
            },
            &resource(),
        );
        let error = format!("{:#}", bad.unwrap_err());
        assert!(error.contains("`bad header`"), "{error}");
    }
}
