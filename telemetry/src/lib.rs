//! Kiln's telemetry: what every process uses to be watched.
//!
//! - [`trace`]: the spans of the request path (server and client wrappers for tonic,
//!   detached spans for queue waits and batches) and the sampler they share;
//! - [`w3c`]: the W3C Trace Context propagator (`traceparent`, `tracestate`);
//! - [`batch`]: the bounded span queue and the thread that exports it in batches;
//! - [`otlp`]: the OTLP/gRPC encoder and exporter that thread calls;
//! - [`setup`]: logs and traces from the flags and `OTEL_*` variables, for a process's `main`;
//! - [`metrics`]: the Prometheus scrape endpoint and the histograms the services keep.
//!
//! Kiln writes its own span records, propagator and OTLP encoder instead of the
//! OpenTelemetry SDK's: each has a measured reason at the top of its file
//! (docs/benchmarks.md, "Tracing overhead").

#![forbid(unsafe_code)]

pub mod batch;
mod error;
pub mod metrics;
pub mod otlp;
pub mod setup;
pub mod trace;
pub mod w3c;

pub use error::{Error, Result};
