//! The W3C Trace Context propagator (`traceparent`, `tracestate`) every Kiln process
//! installs as OpenTelemetry's global propagator.
//!
//! It follows <https://www.w3.org/TR/trace-context/> strictly: a `traceparent` is lowercase
//! hex of the exact lengths, neither id all zeros, version `ff` invalid, version `00`
//! exactly 55 characters, a later version at least 55 with a `-` after the flags; anything
//! else starts a new trace. It does the SDK propagator's work without its string splitting
//! and formatting (a request's hops parse and write one each), and it writes no
//! `tracestate` header when the state is empty. Tested against the SDK's propagator below.

use std::str::FromStr as _;
use std::sync::LazyLock;

use opentelemetry::Context;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
/// `00-` + 32 + `-` + 16 + `-` + 2.
const LENGTH: usize = 55;

static FIELDS: LazyLock<[String; 2]> =
    LazyLock::new(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()]);

/// See the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct Propagator;

impl TextMapPropagator for Propagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let context = span.span_context();
        if !context.is_valid() {
            return;
        }
        injector.set(TRACEPARENT, traceparent(context));
        let state = context.trace_state().header();
        if !state.is_empty() {
            injector.set(TRACESTATE, state);
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match caller(extractor.get(TRACEPARENT), || extractor.get(TRACESTATE)) {
            Some(caller) => cx.with_remote_span_context(caller),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(FIELDS.as_slice())
    }
}

static TRACEPARENT_NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);
static TRACESTATE_NAME: http::HeaderName = http::HeaderName::from_static(TRACESTATE);

/// The caller's span context in gRPC metadata, by the same rules as [`Propagator`] (which
/// the request path calls without: no global lookup, no header-name parsing). None when
/// there is no valid `traceparent`.
pub fn extract(headers: &http::HeaderMap) -> Option<SpanContext> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    caller(text(&TRACEPARENT_NAME), || text(&TRACESTATE_NAME))
}

/// The remote span context a `traceparent` (and `tracestate`, read only when the first is
/// valid) describe. A `tracestate` that does not parse is dropped; the parent stands.
fn caller<'a>(
    traceparent: Option<&str>,
    tracestate: impl FnOnce() -> Option<&'a str>,
) -> Option<SpanContext> {
    let (trace_id, span_id, flags) = parse(traceparent?)?;
    let state = tracestate()
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// Write `context` into gRPC metadata as [`Propagator`] does; nothing for an invalid one.
pub fn inject(context: &SpanContext, headers: &mut http::HeaderMap) {
    if !context.is_valid() {
        return;
    }
    let bytes = traceparent_bytes(context);
    // Lowercase hex and dashes: always a valid header value.
    if let Ok(value) = http::HeaderValue::from_bytes(&bytes) {
        headers.insert(TRACEPARENT_NAME.clone(), value);
    }
    let state = context.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = http::HeaderValue::try_from(state)
    {
        headers.insert(TRACESTATE_NAME.clone(), value);
    }
}

/// The `traceparent` header of `context`: version 00, and of the flags only "sampled".
fn traceparent(context: &SpanContext) -> String {
    let bytes = traceparent_bytes(context);
    // ASCII by construction.
    String::from_utf8_lossy(&bytes).into_owned()
}

fn traceparent_bytes(context: &SpanContext) -> [u8; LENGTH] {
    let flags = (context.trace_flags() & TraceFlags::SAMPLED).to_u8();
    let mut out = [b'-'; LENGTH];
    out[..2].copy_from_slice(b"00");
    write_hex(&mut out[3..35], &context.trace_id().to_bytes());
    write_hex(&mut out[36..52], &context.span_id().to_bytes());
    write_hex(&mut out[53..55], &[flags]);
    out
}

/// `bytes` as lowercase hex into `out` (twice as long).
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// The value of each lowercase hex digit; 0xff for every other byte.
const NIBBLES: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut c = 0;
    while c < 10 {
        table[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        table[b'a' as usize + c] = 10 + c as u8;
        c += 1;
    }
    table
};

/// Lowercase hex digits as bytes; None for anything else or an odd count.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0;
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (high, low) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
        bad |= high | low;
        *byte = high << 4 | (low & 0xf);
    }
    // Valid digits are below 16: any 0xff shows in the high bits.
    (bad & 0xf0 == 0).then_some(out)
}

/// A `traceparent` value's ids and flags (only "sampled" kept), by the rules above.
fn parse(header: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let h = header.trim().as_bytes();
    if h.len() < LENGTH || h[2] != b'-' || h[35] != b'-' || h[52] != b'-' {
        return None;
    }
    let [version] = unhex::<1>(&h[..2])?;
    let fits = match version {
        0xff => false,
        0 => h.len() == LENGTH,
        // A later version may add fields after its own `-`.
        _ => h.len() == LENGTH || h[LENGTH] == b'-',
    };
    if !fits {
        return None;
    }
    let trace_id = TraceId::from_bytes(unhex::<16>(&h[3..35])?);
    let span_id = SpanId::from_bytes(unhex::<8>(&h[36..52])?);
    let [flags] = unhex::<1>(&h[53..55])?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some((
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn extract(p: &dyn TextMapPropagator, headers: &[(&str, &str)]) -> SpanContext {
        let map: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        p.extract_with_context(&Context::new(), &map)
            .span()
            .span_context()
            .clone()
    }

    fn inject(p: &dyn TextMapPropagator, context: SpanContext) -> HashMap<String, String> {
        let mut map = HashMap::new();
        p.inject_context(&Context::new().with_remote_span_context(context), &mut map);
        map
    }

    /// A reproducible stream of numbers for the ids (no dependency for randomness).
    fn numbers(mut seed: u64) -> impl Iterator<Item = u64> {
        std::iter::from_fn(move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            Some(seed)
        })
    }

    #[test]
    fn well_formed_headers_read_and_write_as_the_sdk_propagator_does() {
        let sdk = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let mut n = numbers(0x9e37_79b9_7f4a_7c15);
        for i in 0..2_000 {
            let trace = u128::from(n.next().unwrap()) << 64 | u128::from(n.next().unwrap());
            let span = n.next().unwrap() | 1;
            let flags = (n.next().unwrap() & 0xff) as u8;
            let state = if i % 3 == 0 {
                let value = format!("x{i}");
                TraceState::from_key_value([("vendor", "v1"), ("kiln", value.as_str())]).unwrap()
            } else {
                TraceState::default()
            };
            let context = SpanContext::new(
                TraceId::from(trace),
                SpanId::from(span),
                TraceFlags::new(flags),
                true,
                state,
            );
            // Written: the same traceparent; the same tracestate when there is one.
            let ours = inject(&Propagator, context.clone());
            let theirs = inject(&sdk, context);
            assert_eq!(ours.get(TRACEPARENT), theirs.get(TRACEPARENT));
            match theirs.get(TRACESTATE).map(String::as_str) {
                Some("") | None => assert_eq!(ours.get(TRACESTATE), None),
                state => assert_eq!(ours.get(TRACESTATE).map(String::as_str), state),
            }
            // Read back: the same span context.
            let headers: Vec<(&str, &str)> = theirs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(extract(&Propagator, &headers), extract(&sdk, &headers));
            // The request path's header-map forms write and read the same.
            let mut map = http::HeaderMap::new();
            super::inject(&extract(&sdk, &headers), &mut map);
            assert_eq!(
                map.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
                theirs.get(TRACEPARENT).map(String::as_str)
            );
            assert_eq!(
                super::extract(&map).expect("valid"),
                extract(&sdk, &headers)
            );
        }
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let valid = extract(&Propagator, &[(TRACEPARENT, good)]);
        assert!(valid.is_valid() && valid.is_remote() && valid.is_sampled());
        assert_eq!(
            valid.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        // A later version may carry more; its first four fields are read.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-ever";
        let later = extract(&Propagator, &[(TRACEPARENT, future)]);
        assert!(later.is_sampled() && later.trace_id() == valid.trace_id());
        assert_eq!(
            later.trace_flags(),
            TraceFlags::SAMPLED,
            "unknown flags are dropped"
        );
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  // short trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",  // short span id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with more
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // no `-` after
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g", // not hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // separator
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1",
        ] {
            assert!(
                !extract(&Propagator, &[(TRACEPARENT, bad)]).is_valid(),
                "{bad:?}"
            );
            if let Ok(value) = http::HeaderValue::from_str(bad) {
                let mut map = http::HeaderMap::new();
                map.insert(TRACEPARENT, value);
                assert_eq!(super::extract(&map), None, "{bad:?}");
            }
        }
        // A tracestate that does not parse leaves the parent intact, with no state.
        let odd = extract(
            &Propagator,
            &[(TRACEPARENT, good), (TRACESTATE, "no equals")],
        );
        assert!(odd.is_valid() && odd.trace_state().header().is_empty());
        assert_eq!(
            Propagator.fields().collect::<Vec<_>>(),
            [TRACEPARENT, TRACESTATE]
        );
    }
}
