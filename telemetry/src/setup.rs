//! Logs and traces for every Kiln process.
//!
//! Logs go to standard error as text or JSON. Traces go to an OpenTelemetry collector
//! over OTLP/gRPC when an endpoint is configured (`--otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), through a bounded batch processor on its own thread:
//! a slow or absent collector costs dropped spans, never a slower request. Every log line
//! written inside a traced span ends with that span's `trace_id` and `span_id`.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::{Error, Result};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line: timestamp, level, target, fields, and the spans it is in.
    Json,
}

/// Trace export settings: the OpenTelemetry SDK's standard variables, each with a flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceFlags {
    /// OTLP/gRPC collector to send traces to (e.g. `http://127.0.0.1:4317`); tracing is
    /// off without one.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of this process's spans (default: `kiln-gateway`, `kiln-worker`,
    /// `kiln-scheduler`, or `kiln` for `kiln up`).
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    pub service_name: Option<String>,
    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off or parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on",
        global = true
    )]
    pub trace_sampler: String,
    /// The ratio of the `*traceidratio` samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", global = true)]
    pub trace_sampler_arg: Option<String>,
    /// More resource attributes, `key=value,key=value` (values percent-encoded).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", global = true)]
    pub resource_attributes: Option<String>,
}

/// The SDK pieces that must outlive the process's work: [`Telemetry::shutdown`] sends
/// what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flush and stop the trace exporter (waits at most a few seconds for the collector).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(Duration::from_secs(5), flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "trace exporter did not shut down cleanly")
            }
            _ => tracing::warn!("trace exporter did not flush within 5 s; spans may be lost"),
        }
    }
}

const SAMPLERS: &str = "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio";

/// The sampler `name` (with ratio `arg`) stands for.
pub fn sampler(name: &str, arg: Option<&str>) -> Result<Sampler> {
    let ratio = || -> Result<f64> {
        let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
            return Ok(1.0);
        };
        let ratio: f64 = arg.parse().map_err(|_| {
            Error::Setting(format!(
                "--trace-sampler-arg (OTEL_TRACES_SAMPLER_ARG): `{arg}` is not a number"
            ))
        })?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(Error::Setting(format!(
                "--trace-sampler-arg (OTEL_TRACES_SAMPLER_ARG): {ratio} is outside 0 to 1"
            )));
        }
        Ok(ratio)
    };
    Ok(match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => {
            return Err(Error::Setting(format!(
                "--trace-sampler (OTEL_TRACES_SAMPLER): `{other}` is not one of {SAMPLERS}"
            )));
        }
    })
}

/// `key=value,key=value` (the W3C baggage form the SDK specification gives
/// `OTEL_RESOURCE_ATTRIBUTES`) as key-value pairs.
pub fn resource_attributes(text: &str) -> Result<Vec<(String, String)>> {
    pairs(text, "--resource-attributes (OTEL_RESOURCE_ATTRIBUTES)")
}

/// `key=value,key=value` with percent-encoded values; `what` names the setting in errors.
fn pairs(text: &str, what: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| Error::Setting(format!("{what}: `{item}` is not key=value")))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(Error::Setting(format!("{what}: `{item}` has an empty key")));
        }
        pairs.push((key.to_owned(), percent_decode(value.trim())));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The collector address, checked: an `http://` URL with a host.
fn endpoint(text: &str) -> Result<String> {
    let uri: http::Uri = text.parse().map_err(|e| {
        Error::Setting(format!(
            "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): `{text}` is not a URL: {e}"
        ))
    })?;
    if uri.scheme_str() == Some("https") {
        return Err(Error::Setting(format!(
            "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): `{text}`: Kiln sends spans in plain \
             gRPC (http://); put TLS between a local collector and the backend"
        )));
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(Error::Setting(format!(
            "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): `{text}` must look like http://HOST:PORT"
        )));
    }
    Ok(text.to_owned())
}

/// The first of `names` that is set (and not blank) in the environment, with its name.
fn first_env(names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|&name| {
        let value = std::env::var(name).ok()?;
        (!value.trim().is_empty()).then(|| (name, value.trim().to_owned()))
    })
}

/// The exporter's settings that have no flag: timeout, headers and compression, from the
/// standard variables as `env` reads them (the `_TRACES_` form first); [`first_env`] in
/// the process.
fn export_config_from(
    url: String,
    env: impl Fn(&[&'static str]) -> Option<(&'static str, String)>,
) -> Result<crate::otlp::ExportConfig> {
    let timeout = match env(&[
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]) {
        None => Duration::from_secs(10),
        Some((name, text)) => {
            let ms: u64 = text
                .parse()
                .ok()
                .filter(|ms| (1..=600_000).contains(ms))
                .ok_or_else(|| {
                    Error::Setting(format!(
                        "{name}: `{text}` is not a time in milliseconds from 1 to 600000"
                    ))
                })?;
            Duration::from_millis(ms)
        }
    };
    let headers = match env(&[
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_HEADERS",
    ]) {
        None => Vec::new(),
        Some((name, text)) => pairs(&text, name)?,
    };
    let gzip = match env(&[
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ]) {
        None => false,
        Some((name, text)) => match text.as_str() {
            "gzip" => true,
            "none" => false,
            other => {
                return Err(Error::Setting(format!(
                    "{name}: `{other}` is not one of gzip, none"
                )));
            }
        },
    };
    Ok(crate::otlp::ExportConfig {
        endpoint: url,
        timeout,
        headers,
        gzip,
    })
}

/// The SDK's tracer provider (for `tracing` spans) and what the request path's own spans
/// need: the same sampler and the batch processor's queue.
struct Pipeline {
    provider: SdkTracerProvider,
    sampler: Sampler,
    queue: std::sync::Arc<crate::batch::Queue>,
}

fn pipeline(flags: &TraceFlags, url: String, default_service: &str) -> Result<Pipeline> {
    let sampler = sampler(&flags.trace_sampler, flags.trace_sampler_arg.as_deref())?;
    let attributes = match &flags.resource_attributes {
        Some(text) => resource_attributes(text)?,
        None => Vec::new(),
    };
    let service = flags
        .service_name
        .clone()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default_service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_attributes(
            attributes
                .into_iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k, v)),
        )
        .with_service_name(service)
        .build();
    let batching = crate::batch::BatchConfig::from_env(|name| std::env::var(name).ok())?;
    let mut export = export_config_from(url, first_env)?;
    export.timeout = export.timeout.min(batching.export_timeout);
    let exporter = crate::otlp::Exporter::new(export, &resource)?;
    // The batch processor (OTEL_BSP_* variables) holds at most its queue size of spans and
    // drops the rest while the collector is slow or away.
    let batcher = crate::batch::Batcher::start(exporter, batching)?;
    let queue = batcher.queue();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batcher)
        .with_sampler(sampler.clone())
        .with_resource(resource)
        .build();
    Ok(Pipeline {
        provider,
        sampler,
        queue,
    })
}

/// Install the log formatter and, when an endpoint is configured, the trace exporter.
/// `default_service` names the process in traces; `None` (client commands) never traces.
pub fn init(
    log: &str,
    format: LogFormat,
    trace: &TraceFlags,
    default_service: Option<&str>,
) -> Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_new(log).unwrap_or_else(|_| "info".into());
    let url = match (
        default_service,
        trace.otlp_endpoint.as_deref().map(str::trim),
    ) {
        (Some(_), Some(url)) if !url.is_empty() => Some(endpoint(url)?),
        _ => None,
    };
    let pipeline = match (url, default_service) {
        (Some(url), Some(service)) => Some(pipeline(trace, url, service)?),
        _ => None,
    };
    let provider = pipeline.as_ref().map(|p| p.provider.clone());
    // Colours only on a terminal: the span fields the layer formats and the line alike.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .event_format(WithTraceIds {
                inner: tracing_subscriber::fmt::format().with_ansi(ansi),
                json: false,
            })
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .json()
            .event_format(WithTraceIds {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
                json: true,
            })
            .with_filter(filter)
            .boxed(),
    };
    let traces = provider.as_ref().map(|provider| {
        // Kiln's own spans and events at info and above, whatever the log filter says
        // (a target filter: cheaper per span than an EnvFilter).
        let info = tracing::level_filters::LevelFilter::INFO;
        let kiln = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::level_filters::LevelFilter::WARN)
            .with_targets([
                ("kiln", info),
                ("kiln_gateway", info),
                ("kiln_worker", info),
                ("kiln_scheduler", info),
                ("kiln_registry", info),
                ("kiln_proto", info),
                ("kiln_rpc", info),
                ("kiln_telemetry", info),
            ]);
        // No context activation: Kiln reads a span's context from the span itself, so
        // entering one (every poll of an instrumented future) need not touch
        // OpenTelemetry's thread-local context.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("kiln"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_context_activation(false)
            .with_filter(kiln)
            .boxed()
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| Error::start("install the log subscriber", e))?;
    if let Some(pipeline) = pipeline {
        opentelemetry::global::set_tracer_provider(pipeline.provider);
        opentelemetry::global::set_text_map_propagator(crate::w3c::Propagator);
        crate::trace::enable(pipeline.sampler, pipeline.queue);
    }
    Ok(Telemetry { provider })
}

/// A log line formatter that appends the OpenTelemetry ids of the span the event is in.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let ids = if crate::trace::enabled() {
            trace_ids(event)
        } else {
            None
        };
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        match body.strip_suffix('}') {
            Some(object) if self.json => writeln!(
                writer,
                "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            _ => writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}"),
        }
    }
}

/// The trace and span ids (hex) of the span `event` belongs to: its `tracing` span's
/// (model loads, jobs), else the request path's current OpenTelemetry context (see
/// `crate::trace`); None outside any traced span.
fn trace_ids(event: &tracing::Event<'_>) -> Option<(String, String)> {
    let id = event
        .parent()
        .cloned()
        .or_else(|| tracing::Span::current().id());
    let context = id
        .and_then(|id| {
            tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&id, dispatch)
            })
        })
        .filter(|cx| cx.span().span_context().is_valid())
        .unwrap_or_else(opentelemetry::Context::current);
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_by_their_standard_names_and_reject_bad_ratios() {
        assert!(matches!(sampler("always_on", None), Ok(Sampler::AlwaysOn)));
        assert!(matches!(
            sampler("traceidratio", Some("0.01")),
            Ok(Sampler::TraceIdRatioBased(r)) if (r - 0.01).abs() < 1e-12
        ));
        assert!(matches!(
            sampler("parentbased_traceidratio", None),
            Ok(Sampler::ParentBased(_))
        ));
        let e = sampler("traceidratio", Some("1.5"))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("OTEL_TRACES_SAMPLER_ARG") && e.contains("0 to 1")));
        let e = sampler("sometimes", None).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("`sometimes`") && e.contains("always_on")));
    }

    #[test]
    fn resource_attributes_are_key_value_pairs_with_percent_encoded_values() {
        let pairs = resource_attributes("deployment.environment=prod, team=ml%20infra").ok();
        assert_eq!(
            pairs,
            Some(vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "ml infra".to_owned()),
            ])
        );
        let e = resource_attributes("novalue").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("`novalue` is not key=value")));
    }

    #[test]
    fn the_endpoint_must_be_an_http_url() {
        assert!(endpoint("http://127.0.0.1:4317").is_ok());
        let e = endpoint("127.0.0.1:4317").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("OTEL_EXPORTER_OTLP_ENDPOINT")));
        let e = endpoint("https://collector:4317")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("plain gRPC (http://)")));
    }

    #[test]
    fn exporter_settings_come_from_the_standard_variables_the_traces_form_first() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |names: &[&'static str]| {
                names.iter().find_map(|&n| {
                    set.iter()
                        .find(|(k, _)| *k == n)
                        .map(|(k, v)| (*k, (*v).to_owned()))
                })
            }
        };
        let url = || "http://127.0.0.1:4317".to_owned();
        let plain = export_config_from(url(), vars(&[])).unwrap();
        assert_eq!(plain.timeout, Duration::from_secs(10));
        assert!(plain.headers.is_empty() && !plain.gzip);
        let set = export_config_from(
            url(),
            vars(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=a%3Db,tenant=ml"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ]),
        )
        .unwrap();
        assert_eq!(set.timeout, Duration::from_millis(700));
        assert_eq!(
            set.headers,
            vec![
                ("x-api-key".to_owned(), "a=b".to_owned()),
                ("tenant".to_owned(), "ml".to_owned())
            ]
        );
        assert!(set.gzip);
        for (bad, says) in [
            (
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
                "OTEL_EXPORTER_OTLP_TIMEOUT: `soon` is not a time in milliseconds from 1 to 600000",
            ),
            (
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
                "OTEL_EXPORTER_OTLP_COMPRESSION: `zstd` is not one of gzip, none",
            ),
            (
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
                "OTEL_EXPORTER_OTLP_HEADERS: `novalue` is not key=value",
            ),
        ] {
            let one: &'static [(&'static str, &'static str)] = Box::leak(Box::new([bad]));
            let e = export_config_from(url(), vars(one)).unwrap_err();
            assert_eq!(format!("{e:#}"), says);
        }
    }
}
