//! Prometheus metrics: families written through `prometheus-client`'s encoder (the
//! classic text format, version 0.0.4, that every scraper reads), the histograms the
//! services keep, and the scrape endpoint every process can serve on its own port:
//! `GET /metrics` answers the registry's families; anything else is 404. The endpoint is a
//! plain HTTP/1.1 server (hyper), since a scraper is all that calls it.
//!
//! Services keep their numbers in their own structures, updated on the request path
//! without locks shared across versions, and describe them only when scraped: each is a
//! [`Collector`] that writes its [`Families`].

use std::sync::Arc;

use tokio::net::TcpListener;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::registry::Registry;

use prometheus_client::encoding::{EncodeCounterValue, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// The registry's families in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector that fails leaves its families out.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Serve `registry` at `/metrics` on `listener` (HTTP/1.1 through hyper) until the task is
/// dropped. Anything but `GET /metrics` is 404; a client gets 5 s to send its request head.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let answer = answer(&request, &registry);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                .await;
        });
    }
}

/// The answer to one scrape request.
fn answer<B>(request: &hyper::Request<B>, registry: &Registry) -> hyper::Response<String> {
    let (status, kind, body) =
        if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
            (
                hyper::StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                render(registry),
            )
        } else {
            (
                hyper::StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "only GET /metrics is served here\n".to_owned(),
            )
        };
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

/// Upper bounds of the latency histograms, seconds: 100 µs to 10 s.
pub const SECONDS_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Upper bounds of the batch-size histogram, rows: powers of two to 65,536.
pub const ROWS_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];

/// Upper bounds of the histograms of long work (model loads, training epochs),
/// seconds: 10 ms to 10 minutes.
pub const LONG_SECONDS_BOUNDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A Prometheus histogram: counts per bucket (not cumulative; cumulated when written).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    /// Observations above the last bound.
    over: u64,
    sum: f64,
}

impl Histogram {
    /// An empty histogram with these bucket upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            over: 0,
            sum: 0.0,
        }
    }

    /// Count one observation.
    pub fn observe(&mut self, value: f64) {
        self.sum += value;
        match self.bounds.iter().position(|b| value <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }

    /// Each bound with the observations in its bucket alone (not cumulated), as the
    /// encoder takes them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .zip(self.counts.iter().copied())
            .collect()
    }

    /// The sum of every observation.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// The labels of one sample: name and value pairs (values are escaped when written).
pub type Labels = Vec<(&'static str, String)>;

/// The metric families of one scrape, written through the encoder a [`Collector`] is
/// given. Counter names leave out `_total`: the encoder adds it.
pub struct Families<'a>(DescriptorEncoder<'a>);

impl<'a> Families<'a> {
    /// Families written into `encoder`.
    pub fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Self(encoder)
    }

    /// A counter family: one sample per label set.
    pub fn counter<V: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            if labels.is_empty() {
                family.encode_counter::<NoLabelSet, V, f64>(&value, None)?;
            } else {
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, V, f64>(&value, None)?;
            }
        }
        Ok(())
    }

    /// A gauge family: one sample per label set.
    pub fn gauge<V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            if labels.is_empty() {
                family.encode_gauge(&value)?;
            } else {
                family.encode_family(&labels)?.encode_gauge(&value)?;
            }
        }
        Ok(())
    }

    /// A histogram family: one histogram per label set.
    pub fn histogram<'h>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, &'h Histogram)>,
    ) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in samples {
            let buckets = h.buckets();
            if labels.is_empty() {
                family.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)?;
            } else {
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector from a function, for the tests' few numbers.
    struct FnCollector<F>(F);

    impl<F> std::fmt::Debug for FnCollector<F> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FnCollector")
        }
    }

    impl<F> Collector for FnCollector<F>
    where
        F: Fn(&mut Families<'_>) -> std::fmt::Result + Send + Sync + 'static,
    {
        fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
            (self.0)(&mut Families::new(encoder))
        }
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_nothing_else() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut registry = Registry::default();
        registry.register_collector(Box::new(FnCollector(|f: &mut Families<'_>| {
            f.gauge("kiln_test_served", "Served.", [(Vec::new(), 7u64)])
        })));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(registry)));
        let get = |path: &'static str| async move {
            let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            socket.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.lines().any(|l| l == "kiln_test_served 7"), "{ok}");
        let other = get("/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        server.abort();
    }

    #[test]
    fn families_are_written_in_the_text_format_scrapers_read() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(FnCollector(|f: &mut Families<'_>| {
            f.counter(
                "kiln_test_requests",
                "Requests.",
                [(vec![("model", "a\"b".to_owned())], 3u64)],
            )?;
            f.gauge("kiln_test_up", "Up.", [(Vec::new(), 1u64)])?;
            f.gauge("kiln_test_ratio", "A share.", [(Vec::new(), 0.25)])?;
            let mut h = Histogram::new(&[0.1, 1.0]);
            h.observe(0.05);
            h.observe(0.5);
            h.observe(5.0);
            f.histogram(
                "kiln_test_seconds",
                "Time.",
                [(vec![("outcome", "ok".into())], &h)],
            )
        })));
        let text = render(&registry);
        for line in [
            "# TYPE kiln_test_requests_total counter",
            "kiln_test_requests_total{model=\"a\\\"b\"} 3",
            "# TYPE kiln_test_up gauge",
            "kiln_test_up 1",
            "kiln_test_ratio 0.25",
            "# TYPE kiln_test_seconds histogram",
            "kiln_test_seconds_bucket{outcome=\"ok\",le=\"0.1\"} 1",
            "kiln_test_seconds_bucket{outcome=\"ok\",le=\"1\"} 2",
            "kiln_test_seconds_bucket{outcome=\"ok\",le=\"+Inf\"} 3",
            "kiln_test_seconds_sum{outcome=\"ok\"} 5.55",
            "kiln_test_seconds_count{outcome=\"ok\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }
}
