//! Per-version request statistics, as ModelStatistics reports them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use kiln_core::records::{VersionKey, now_unix_ms};
use kiln_proto::inference as oip;
use kiln_telemetry::metrics::{
    Collector, DescriptorEncoder, Families, Histogram, Labels, ROWS_BOUNDS, SECONDS_BOUNDS,
};

#[derive(Default, Clone, Copy)]
struct Counter {
    count: u64,
    ns: u64,
}

impl Counter {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns += d.as_nanos() as u64;
    }

    fn proto(self) -> Option<oip::StatisticDuration> {
        Some(oip::StatisticDuration {
            count: self.count,
            ns: self.ns,
        })
    }
}

/// The histograms of one version.
struct Histograms {
    /// End to end through the gateway, successes.
    success: Histogram,
    /// End to end through the gateway, failures.
    failure: Histogram,
    /// Waiting in a worker's batcher.
    queue: Histogram,
    /// Rows in the batch a request rode in.
    batch: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            success: Histogram::new(SECONDS_BOUNDS),
            failure: Histogram::new(SECONDS_BOUNDS),
            queue: Histogram::new(SECONDS_BOUNDS),
            batch: Histogram::new(ROWS_BOUNDS),
        }
    }
}

#[derive(Default)]
struct VersionStats {
    success: Counter,
    fail: Counter,
    queue: Counter,
    compute_input: Counter,
    compute_infer: Counter,
    compute_output: Counter,
    inference_count: u64,
    execution_count: u64,
    last_inference: u64,
    /// Executions by the batch size they ran at: input, infer, output.
    batches: BTreeMap<u64, [Counter; 3]>,
    histograms: Histograms,
    /// Requests being answered now.
    in_flight: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Calls to a worker repeated on another replica.
    retries: u64,
}

/// Counts a request as in flight until dropped.
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What one successful request measured.
pub struct Success {
    /// End to end, through the gateway.
    pub total: Duration,
    /// Waiting in the worker's batcher.
    pub queue: Duration,
    /// Decoding and checking its input tensor, in the gateway.
    pub input: Duration,
    /// Its batch's forward pass.
    pub compute: Duration,
    /// Encoding its output tensor, in the gateway.
    pub output: Duration,
    /// Rows in the request.
    pub rows: u64,
    /// Rows in the batch it rode in.
    pub batch_rows: u64,
}

/// Statistics of every version this gateway served.
#[derive(Default)]
pub struct Stats {
    versions: Mutex<HashMap<VersionKey, VersionStats>>,
}

impl Stats {
    /// Count a request to `key` as in flight while the returned guard lives.
    pub fn in_flight(&self, key: &VersionKey) -> InFlight {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let gauge = map.entry(key.clone()).or_default().in_flight.clone();
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(gauge)
    }

    /// Record a success.
    pub fn success(&self, key: &VersionKey, s: Success) {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry(key.clone()).or_default();
        v.success.add(s.total);
        v.queue.add(s.queue);
        v.compute_input.add(s.input);
        v.compute_infer.add(s.compute);
        v.compute_output.add(s.output);
        v.inference_count += s.rows;
        v.execution_count += 1;
        v.last_inference = now_unix_ms();
        let batch = v.batches.entry(s.batch_rows).or_default();
        batch[0].add(s.input);
        batch[1].add(s.compute);
        batch[2].add(s.output);
        let h = &mut v.histograms;
        h.success.observe(s.total.as_secs_f64());
        h.queue.observe(s.queue.as_secs_f64());
        h.batch.observe(s.batch_rows as f64);
    }

    /// Record a failure.
    pub fn failure(&self, key: &VersionKey, total: Duration) {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry(key.clone()).or_default();
        v.fail.add(total);
        v.histograms.failure.observe(total.as_secs_f64());
    }

    /// Count a call to a worker for `key` that is being repeated on another replica.
    pub fn retried(&self, key: &VersionKey) {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().retries += 1;
    }

    /// The statistics of one version (zeros if it never served).
    pub fn report(&self, key: &VersionKey) -> oip::ModelStatistics {
        let map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let empty = VersionStats::default();
        let v = map.get(key).unwrap_or(&empty);
        oip::ModelStatistics {
            name: key.model.clone(),
            version: key.version.to_string(),
            last_inference: v.last_inference,
            inference_count: v.inference_count,
            execution_count: v.execution_count,
            inference_stats: Some(oip::InferStatistics {
                success: v.success.proto(),
                fail: v.fail.proto(),
                queue: v.queue.proto(),
                // The three phases count the same requests (clients such as
                // perf_analyzer check that they do).
                compute_input: v.compute_input.proto(),
                compute_infer: v.compute_infer.proto(),
                compute_output: v.compute_output.proto(),
                cache_hit: Counter::default().proto(),
                cache_miss: Counter::default().proto(),
            }),
            batch_stats: v
                .batches
                .iter()
                .map(|(size, [input, infer, output])| oip::InferBatchStatistics {
                    batch_size: *size,
                    compute_input: input.proto(),
                    compute_infer: infer.proto(),
                    compute_output: output.proto(),
                })
                .collect(),
        }
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

/// The labels of one version, and of one outcome when there is one.
fn labels(key: &VersionKey, outcome: Option<&'static str>) -> Labels {
    let mut labels = vec![
        ("model", key.model.clone()),
        ("version", key.version.to_string()),
    ];
    if let Some(outcome) = outcome {
        labels.push(("outcome", outcome.to_owned()));
    }
    labels
}

impl Collector for Stats {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut versions: Vec<(&VersionKey, &VersionStats)> = map.iter().collect();
        versions.sort_by(|a, b| a.0.cmp(b.0));
        let mut f = Families::new(encoder);
        let both = |get: fn(&VersionStats) -> (u64, u64)| {
            versions.iter().flat_map(move |(k, v)| {
                let (success, failure) = get(v);
                [
                    (labels(k, Some("success")), success),
                    (labels(k, Some("failure")), failure),
                ]
            })
        };
        f.counter(
            "kiln_gateway_requests",
            "Inference requests answered, by model version and outcome.",
            both(|v| (v.success.count, v.fail.count)),
        )?;
        f.counter(
            "kiln_gateway_request_seconds",
            "Time spent answering requests, end to end, by outcome.",
            versions.iter().flat_map(|(k, v)| {
                [
                    (labels(k, Some("success")), v.success.ns as f64 / 1e9),
                    (labels(k, Some("failure")), v.fail.ns as f64 / 1e9),
                ]
            }),
        )?;
        f.counter(
            "kiln_gateway_queue_seconds",
            "Time successful requests waited in a worker's batcher.",
            versions
                .iter()
                .map(|(k, v)| (labels(k, None), v.queue.ns as f64 / 1e9)),
        )?;
        f.counter(
            "kiln_gateway_rows",
            "Rows inferred by successful requests.",
            versions
                .iter()
                .map(|(k, v)| (labels(k, None), v.inference_count)),
        )?;
        f.counter(
            "kiln_gateway_worker_retries",
            "Calls to a worker repeated on another replica after the first could not take them.",
            versions.iter().map(|(k, v)| (labels(k, None), v.retries)),
        )?;
        f.histogram(
            "kiln_gateway_request_duration_seconds",
            "Time to answer a request, end to end through the gateway, by outcome.",
            versions.iter().flat_map(|(k, v)| {
                [
                    (labels(k, Some("success")), &v.histograms.success),
                    (labels(k, Some("failure")), &v.histograms.failure),
                ]
            }),
        )?;
        f.histogram(
            "kiln_gateway_queue_wait_seconds",
            "Time successful requests waited in a worker's batcher.",
            versions
                .iter()
                .map(|(k, v)| (labels(k, None), &v.histograms.queue)),
        )?;
        f.histogram(
            "kiln_gateway_batch_rows",
            "Rows in the batch each successful request rode in (its own and others').",
            versions
                .iter()
                .map(|(k, v)| (labels(k, None), &v.histograms.batch)),
        )?;
        f.gauge(
            "kiln_gateway_in_flight_requests",
            "Requests being answered now.",
            versions.iter().map(|(k, v)| {
                (
                    labels(k, None),
                    v.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                )
            }),
        )
    }
}

#[cfg(test)]
impl Stats {
    /// Every version's metrics in the Prometheus text format (what a scrape of a registry
    /// holding these statistics returns).
    fn prometheus(self: &std::sync::Arc<Self>) -> String {
        let mut registry = kiln_telemetry::metrics::Registry::default();
        registry.register_collector(Box::new(self.clone()));
        kiln_telemetry::metrics::render(&registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_count_every_observation() {
        let stats = std::sync::Arc::new(Stats::default());
        let key = VersionKey {
            model: "m".into(),
            version: 2,
        };
        for ms in [0.05, 0.3, 0.3, 7.0, 20_000.0] {
            stats.failure(&key, Duration::from_secs_f64(ms / 1e3));
        }
        let guard = stats.in_flight(&key);
        let text = stats.prometheus();
        let line = |l: &str| text.lines().any(|x| x == l);
        let name = "kiln_gateway_request_duration_seconds";
        let labels = "model=\"m\",version=\"2\",outcome=\"failure\"";
        assert!(
            line(&format!("{name}_bucket{{{labels},le=\"0.0001\"}} 1")),
            "{text}"
        );
        assert!(
            line(&format!("{name}_bucket{{{labels},le=\"0.0005\"}} 3")),
            "{text}"
        );
        assert!(
            line(&format!("{name}_bucket{{{labels},le=\"0.01\"}} 4")),
            "{text}"
        );
        assert!(
            line(&format!("{name}_bucket{{{labels},le=\"10\"}} 4")),
            "{text}"
        );
        assert!(
            line(&format!("{name}_bucket{{{labels},le=\"+Inf\"}} 5")),
            "{text}"
        );
        assert!(line(&format!("{name}_count{{{labels}}} 5")), "{text}");
        assert!(line(
            "kiln_gateway_in_flight_requests{model=\"m\",version=\"2\"} 1"
        ));
        drop(guard);
        assert!(
            stats
                .prometheus()
                .lines()
                .any(|x| x == "kiln_gateway_in_flight_requests{model=\"m\",version=\"2\"} 0")
        );
    }
}
