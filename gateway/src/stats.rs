//! Per-version request statistics, as ModelStatistics reports them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use kiln_proto::inference as oip;
use kiln_registry::records::{VersionKey, now_unix_ms};

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
    }

    /// Record a failure.
    pub fn failure(&self, key: &VersionKey, total: Duration) {
        let mut map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().fail.add(total);
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

/// A metric family: name, type, help, and the labelled values of one version.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&VersionStats) -> Vec<(&'static str, f64)>,
);

impl Stats {
    /// Every version's counters in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let map = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<&VersionKey> = map.keys().collect();
        keys.sort();
        let mut out = String::new();
        let families: [Family; 4] = [
            (
                "kiln_gateway_requests_total",
                "counter",
                "Inference requests answered, by model version and outcome.",
                |v| {
                    vec![
                        ("success", v.success.count as f64),
                        ("failure", v.fail.count as f64),
                    ]
                },
            ),
            (
                "kiln_gateway_request_seconds_total",
                "counter",
                "Time spent answering requests, end to end, by outcome.",
                |v| {
                    vec![
                        ("success", v.success.ns as f64 / 1e9),
                        ("failure", v.fail.ns as f64 / 1e9),
                    ]
                },
            ),
            (
                "kiln_gateway_queue_seconds_total",
                "counter",
                "Time successful requests waited in a worker's batcher.",
                |v| vec![("", v.queue.ns as f64 / 1e9)],
            ),
            (
                "kiln_gateway_rows_total",
                "counter",
                "Rows inferred by successful requests.",
                |v| vec![("", v.inference_count as f64)],
            ),
        ];
        for (name, kind, help, values) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for key in &keys {
                for (outcome, value) in values(&map[*key]) {
                    let outcome = if outcome.is_empty() {
                        String::new()
                    } else {
                        format!(",outcome=\"{outcome}\"")
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{model=\"{}\",version=\"{}\"{outcome}}} {value}",
                        kiln_proto::metrics::label(&key.model),
                        key.version
                    );
                }
            }
        }
        out
    }
}
