//! The span batch processor: one bounded queue of finished spans and one thread that
//! sends them to the collector in batches.
//!
//! Both kinds of span end up here: the request path's own spans
//! ([`crate::trace::Sink`], called as each ends) and the OpenTelemetry SDK's, from
//! `tracing` spans (this is the SDK tracer provider's span processor). Ending a span
//! takes an uncontended lock and a push; the thread is woken only when a full batch is
//! waiting, otherwise it wakes on its schedule. A full queue drops the span (counted and
//! logged by the thread), so a slow or absent collector never slows a request.
//!
//! Configured as the OpenTelemetry SDK's batch processor is, by `OTEL_BSP_MAX_QUEUE_SIZE`
//! (2048), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512), `OTEL_BSP_SCHEDULE_DELAY` (5000 ms)
//! and `OTEL_BSP_EXPORT_TIMEOUT` (30000 ms).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

use crate::otlp::Exporter;
use crate::{Error, Result};

/// How spans are batched: the `OTEL_BSP_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Spans held at most; more are dropped until the thread catches up.
    pub max_queue_size: usize,
    /// Spans sent in one export at most; a full batch is sent at once.
    pub max_export_batch_size: usize,
    /// The longest a span waits for a batch to fill.
    pub schedule_delay: Duration,
    /// The longest one export may take.
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            schedule_delay: Duration::from_millis(5000),
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

impl BatchConfig {
    /// The settings the variables `env` reads give (unset ones keep their defaults); a
    /// value that is not a whole number in range is an error naming the variable.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str, default: u64, least: u64| -> Result<u64> {
            let Some(text) = env(name).filter(|t| !t.trim().is_empty()) else {
                return Ok(default);
            };
            let n: u64 = text
                .trim()
                .parse()
                .map_err(|_| Error::Setting(format!("{name}: `{text}` is not a whole number")))?;
            if n < least {
                return Err(Error::Setting(format!(
                    "{name}: must be at least {least}, not {n}"
                )));
            }
            if n > 1 << 32 {
                return Err(Error::Setting(format!(
                    "{name}: must be at most {}, not {n}",
                    1u64 << 32
                )));
            }
            Ok(n)
        };
        let defaults = Self::default();
        let max_queue_size =
            number("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size as u64, 1)? as usize;
        let max_export_batch_size = number(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size as u64,
            1,
        )? as usize;
        Ok(Self {
            max_queue_size,
            // As the specification says: a batch no larger than the queue.
            max_export_batch_size: max_export_batch_size.min(max_queue_size),
            schedule_delay: Duration::from_millis(number(
                "OTEL_BSP_SCHEDULE_DELAY",
                defaults.schedule_delay.as_millis() as u64,
                1,
            )?),
            export_timeout: Duration::from_millis(number(
                "OTEL_BSP_EXPORT_TIMEOUT",
                defaults.export_timeout.as_millis() as u64,
                1,
            )?),
        })
    }
}

/// What the thread and the span producers share.
struct Pending {
    /// The records themselves, moved in (a few hundred bytes each): the thread that ends
    /// a span allocates nothing for it here, and the buffer keeps its capacity.
    spans: Vec<SpanData>,
    /// Flushes asked for, and done: a flush waits until the thread has sent everything
    /// queued before it asked.
    flushes_asked: u64,
    flushes_done: u64,
    stopping: bool,
    stopped: bool,
}

/// The queue spans are handed to; see the module documentation.
pub struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the thread (a full batch, a flush, the stop) and those waiting on it.
    wake: Condvar,
    done: Condvar,
    config: BatchConfig,
    dropped: AtomicU64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves the spans as they were: still usable.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, span: SpanData) {
        let mut pending = self.lock();
        if pending.spans.len() >= self.config.max_queue_size || pending.stopped {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return; // `span` is freed here, outside the lock.
        }
        pending.spans.push(span);
        if pending.spans.len() == self.config.max_export_batch_size {
            self.wake.notify_one();
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Wait until the thread has sent what is queued now, at most `timeout`.
    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let mut pending = self.lock();
        if pending.stopped {
            return Ok(());
        }
        pending.flushes_asked += 1;
        let ticket = pending.flushes_asked;
        self.wake.notify_one();
        let (pending, waited) = self
            .done
            .wait_timeout_while(pending, timeout, |p| p.flushes_done < ticket && !p.stopped)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if waited.timed_out() && pending.flushes_done < ticket {
            return Err(OTelSdkError::Timeout(timeout));
        }
        Ok(())
    }

    /// Send what is queued, then stop the thread; waits at most `timeout`.
    fn stop(&self, timeout: Duration) -> OTelSdkResult {
        let mut pending = self.lock();
        pending.stopping = true;
        self.wake.notify_one();
        let (pending, waited) = self
            .done
            .wait_timeout_while(pending, timeout, |p| !p.stopped)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(pending);
        if waited.timed_out() {
            return Err(OTelSdkError::Timeout(timeout));
        }
        Ok(())
    }
}

impl crate::trace::Sink for Queue {
    fn finished(&self, span: SpanData) {
        self.push(span);
    }
}

/// The processor: the queue, and the thread that drains it into an [`Exporter`].
pub struct Batcher {
    queue: Arc<Queue>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.queue.config)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Start the export thread, which owns `exporter` from now on.
    pub fn start(exporter: Exporter, config: BatchConfig) -> Result<Self> {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                spans: Vec::with_capacity(config.max_export_batch_size),
                flushes_asked: 0,
                flushes_done: 0,
                stopping: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            config,
            dropped: AtomicU64::new(0),
        });
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("kiln-span-export".into())
            .spawn(move || run(&thread_queue, &exporter))
            .map_err(|e| Error::start("start the span export thread", e))?;
        Ok(Self { queue })
    }

    /// Where the request path hands its spans.
    pub fn queue(&self) -> Arc<Queue> {
        self.queue.clone()
    }
}

/// The export thread: wait for a full batch, a flush, the stop or the schedule; send one
/// batch; repeat. On stop, everything still queued is sent first.
fn run(queue: &Queue, exporter: &Exporter) {
    let config = queue.config;
    let mut batch: Vec<SpanData> = Vec::with_capacity(config.max_export_batch_size);
    let mut deadline = Instant::now() + config.schedule_delay;
    let mut reported = 0;
    let mut last_report: Option<Instant> = None;
    loop {
        let mut pending = queue.lock();
        loop {
            let asked = pending.flushes_asked > pending.flushes_done;
            if pending.spans.len() >= config.max_export_batch_size || pending.stopping || asked {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            pending = queue
                .wake
                .wait_timeout(pending, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let take = pending.spans.len().min(config.max_export_batch_size);
        if take == pending.spans.len() {
            // The whole queue: trade buffers (both keep their capacity).
            std::mem::swap(&mut batch, &mut pending.spans);
        } else {
            batch.extend(pending.spans.drain(..take));
        }
        let emptied = pending.spans.is_empty();
        let (flush, stopping) = (pending.flushes_asked, pending.stopping);
        drop(pending);

        if !batch.is_empty() {
            // Failures are logged by the exporter; the batch is dropped either way.
            let _ = exporter.export(&batch);
            batch.clear();
        }
        let dropped = queue.dropped();
        if dropped > reported && last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                dropped = dropped - reported,
                queue = config.max_queue_size,
                "the span queue was full: spans dropped (OTEL_BSP_MAX_QUEUE_SIZE)"
            );
            reported = dropped;
            last_report = Some(Instant::now());
        }
        if emptied {
            deadline = Instant::now() + config.schedule_delay;
            let mut pending = queue.lock();
            pending.flushes_done = pending.flushes_done.max(flush);
            if stopping && pending.spans.is_empty() {
                pending.stopped = true;
                queue.done.notify_all();
                return;
            }
            drop(pending);
            queue.done.notify_all();
        }
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.queue.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.queue.flush(self.queue.config.export_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.queue.stop(timeout)
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // The thread sends what is left and ends; nothing waits for it here.
        let mut pending = self.queue.lock();
        pending.stopping = true;
        self.queue.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    #[test]
    fn settings_come_from_the_bsp_variables_with_the_sdk_defaults() {
        let none = BatchConfig::from_env(|_| None).unwrap();
        assert_eq!(none, BatchConfig::default());
        let set = |pairs: &'static [(&'static str, &'static str)]| {
            BatchConfig::from_env(move |name| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        let config = set(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "2000"),
        ])
        .unwrap();
        assert_eq!(config.max_queue_size, 100);
        assert_eq!(
            config.max_export_batch_size, 100,
            "no batch above the queue"
        );
        assert_eq!(config.schedule_delay, Duration::from_millis(250));
        assert_eq!(config.export_timeout, Duration::from_secs(2));
        let error = set(&[("OTEL_BSP_SCHEDULE_DELAY", "soon")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "OTEL_BSP_SCHEDULE_DELAY: `soon` is not a whole number"
        );
        let error = set(&[("OTEL_BSP_MAX_QUEUE_SIZE", "0")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "OTEL_BSP_MAX_QUEUE_SIZE: must be at least 1, not 0"
        );
    }

    #[derive(Clone, Default)]
    struct Collector(Arc<Mutex<usize>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            *self.0.lock().unwrap() += spans;
            Ok(tonic::Response::new(Default::default()))
        }
    }

    fn span(i: u64) -> SpanData {
        let at = std::time::SystemTime::now();
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(i) + 1),
                SpanId::from(i + 1),
                TraceFlags::SAMPLED,
                false,
                Default::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "work".into(),
            start_time: at,
            end_time: at,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: opentelemetry::InstrumentationScope::builder("kiln").build(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_drops_spans_and_a_flush_or_the_stop_sends_the_rest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let exporter = Exporter::new(
            crate::otlp::ExportConfig {
                endpoint: format!("http://{addr}"),
                timeout: Duration::from_secs(5),
                headers: Vec::new(),
                gzip: false,
            },
            &opentelemetry_sdk::Resource::builder_empty().build(),
        )
        .unwrap();
        // A batch larger than the queue and a schedule longer than the test: nothing is
        // sent unless asked.
        let batcher = Batcher::start(
            exporter,
            BatchConfig {
                max_queue_size: 3,
                max_export_batch_size: 10,
                schedule_delay: Duration::from_secs(600),
                export_timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        let queue = batcher.queue();
        let done = tokio::task::spawn_blocking(move || {
            for i in 0..5 {
                crate::trace::Sink::finished(&*queue, span(i));
            }
            assert_eq!(queue.dropped(), 2, "two spans past the queue's three");
            batcher.force_flush().unwrap();
            let flushed = *collector.0.lock().unwrap();
            // An unsampled span is not the exporter's; a sampled one waits for the stop.
            let mut unsampled = span(9);
            unsampled.span_context = SpanContext::new(
                TraceId::from(10),
                SpanId::from(10),
                TraceFlags::default(),
                false,
                Default::default(),
            );
            batcher.on_end(unsampled);
            batcher.on_end(span(11));
            batcher
                .shutdown_with_timeout(Duration::from_secs(5))
                .unwrap();
            (flushed, *collector.0.lock().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(
            done,
            (3, 4),
            "the flush sent the three kept; the stop the last"
        );
    }
}
