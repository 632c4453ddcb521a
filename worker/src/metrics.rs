//! The worker's Prometheus metrics: registration, memory, versions by state, queue depth
//! (per version, and the worker's total for autoscaling),
//! training runs, the device time training takes and the waits behind it, device, weights,
//! resident memory and model-load times.
//!
//! One [`WorkerMetrics`] describes the workers added to it when scraped. A worker process
//! has its own, unlabelled, as it always had; `kiln up` runs several workers in one
//! process and shares one that labels each sample with `worker="ID"`, so that one scrape
//! holds each metric family once.

use std::sync::{Arc, RwLock, Weak};

use kiln_core::records::{LoadState, VersionKey};
use kiln_telemetry::metrics::{Collector, DescriptorEncoder, Families, Labels};

use crate::batcher::Batcher;
use crate::node::{State, lock};

/// The metrics of the workers added to it (see the module docs).
#[derive(Default)]
pub struct WorkerMetrics {
    /// Whether samples carry a `worker` label (several workers in one process).
    labelled: bool,
    /// The workers, held weakly: a stopped worker drops out of the next scrape.
    workers: RwLock<Vec<Weak<State>>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("labelled", &self.labelled)
            .finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// Metrics shared by several workers of one process, each labelled with its id.
    pub fn labelled() -> Arc<Self> {
        Arc::new(Self {
            labelled: true,
            workers: RwLock::new(Vec::new()),
        })
    }

    /// Describe `state`'s worker from the next scrape on.
    pub(crate) fn add(&self, state: &Arc<State>) {
        let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
        workers.retain(|w| w.strong_count() > 0);
        workers.push(Arc::downgrade(state));
    }

    /// The live workers, by id.
    fn live(&self) -> Vec<Arc<State>> {
        let workers = self.workers.read().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<Arc<State>> = workers.iter().filter_map(Weak::upgrade).collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }

    /// One sample per version each worker serves, of `value` of its batcher, labelled by
    /// model and version (in order).
    fn per_version(
        &self,
        workers: &[Arc<State>],
        value: impl Fn(&Batcher) -> u64,
    ) -> Vec<(Labels, u64)> {
        workers
            .iter()
            .flat_map(|w| {
                let served = w.served.read().unwrap_or_else(|p| p.into_inner());
                let mut keys: Vec<&VersionKey> = served.keys().collect();
                keys.sort();
                keys.into_iter()
                    .map(|key| {
                        let labels = vec![
                            ("model", key.model.clone()),
                            ("version", key.version.to_string()),
                        ];
                        (self.labels(w, labels), value(&served[key].batcher))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The labels of a sample of `state`'s, before `more`.
    fn labels(&self, state: &State, more: Labels) -> Labels {
        let mut labels = if self.labelled {
            vec![("worker", state.id.clone())]
        } else {
            Vec::new()
        };
        labels.extend(more);
        labels
    }
}

impl Collector for WorkerMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        let workers = self.live();
        let mut f = Families::new(encoder);
        let each = |value: fn(&State) -> u64| {
            workers
                .iter()
                .map(move |w| (self.labels(w, Vec::new()), value(w)))
        };
        f.gauge(
            "kiln_worker_registered",
            "Whether the worker holds a live registration (1) or takes no work (0).",
            each(|w| u64::from(lock(&w.lease).is_some())),
        )?;
        f.gauge(
            "kiln_worker_memory_limit_bytes",
            "Bytes of model weights the worker may hold (0: no limit).",
            each(|w| w.memory_bytes),
        )?;
        f.gauge(
            "kiln_worker_versions",
            "Model versions on this worker, by state.",
            workers.iter().flat_map(|w| {
                let loaded = lock(&w.loaded);
                [
                    ("LOADING", LoadState::Loading),
                    ("READY", LoadState::Ready),
                    ("FAILED", LoadState::Failed),
                ]
                .map(|(name, state)| {
                    let n = loaded.values().filter(|l| l.state == state).count() as u64;
                    (self.labels(w, vec![("state", name.to_owned())]), n)
                })
            }),
        )?;
        f.counter(
            "kiln_worker_rows_computed",
            "Rows a version's batches gave the engine (requests dropped for their deadline, \
             or whose caller left, before compute are not counted).",
            self.per_version(&workers, Batcher::rows_computed),
        )?;
        f.gauge(
            "kiln_worker_queue_depth",
            "Requests waiting in a version's batcher.",
            self.per_version(&workers, |b| b.queue_depth() as u64),
        )?;
        f.gauge(
            "kiln_worker_queued_requests",
            "Requests waiting on this worker: in its versions' batchers, and generations \
             waiting for a cache slot (the autoscaling signal).",
            each(queued_requests),
        )?;
        f.gauge(
            "kiln_worker_training_runs",
            "Training runs in progress on this worker.",
            each(|w| {
                lock(&w.runs)
                    .iter()
                    .filter(|r| r.strong_count() > 0)
                    .count() as u64
            }),
        )?;
        f.counter(
            "kiln_worker_training_seconds",
            "Device time training has taken on this worker (its rate: the training share of \
             the device).",
            workers.iter().map(|w| {
                (
                    self.labels(w, Vec::new()),
                    w.engine.training_share().busy_seconds(),
                )
            }),
        )?;
        let waits: Vec<_> = workers
            .iter()
            .map(|w| w.engine.training_share().waits())
            .collect();
        f.histogram(
            "kiln_worker_inference_training_wait_seconds",
            "How long inference batches that waited behind training waited for it.",
            workers
                .iter()
                .zip(&waits)
                .map(|(w, h)| (self.labels(w, Vec::new()), h)),
        )?;
        f.gauge(
            "kiln_worker_device_info",
            "The device this worker computes on (always 1).",
            workers.iter().map(|w| {
                let labels = vec![
                    ("backend", w.backend.to_owned()),
                    ("adapter", w.adapter.clone()),
                ];
                (self.labels(w, labels), 1u64)
            }),
        )?;
        f.gauge(
            "kiln_worker_model_weight_bytes",
            "Bytes of FP32 weights of the versions loaded on the device.",
            each(|w| lock(&w.weight_bytes).values().sum()),
        )?;
        // One process: the same figure for every worker in it.
        if let Some(rss) = resident_bytes() {
            f.gauge(
                "kiln_worker_resident_memory_bytes",
                "Resident memory of the worker process.",
                workers.iter().map(|w| (self.labels(w, Vec::new()), rss)),
            )?;
        }
        f.gauge(
            "kiln_worker_generation_sequences",
            "Generations on a decoder version, by state (running in a cache slot, or waiting for one).",
            workers.iter().flat_map(|w| {
                let served = w.served.read().unwrap_or_else(|p| p.into_inner());
                let mut keys: Vec<&VersionKey> = served
                    .iter()
                    .filter(|(_, s)| matches!(s.spec, kiln_core::spec::ModelSpec::Llama(_)))
                    .map(|(k, _)| k)
                    .collect();
                keys.sort();
                keys.into_iter()
                    .flat_map(|key| {
                        let stats = w.engine.generation_stats(key);
                        [("running", stats.running), ("waiting", stats.waiting)].map(
                            |(state, n)| {
                                let labels = vec![
                                    ("model", key.model.clone()),
                                    ("version", key.version.to_string()),
                                    ("state", state.to_owned()),
                                ];
                                (self.labels(w, labels), n as u64)
                            },
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        )?;
        let generation: Vec<_> = workers
            .iter()
            .map(|w| w.generation_metrics.snapshot())
            .collect();
        for (i, (name, help)) in [
            (
                "kiln_worker_generation_time_to_first_token_seconds",
                "Time from a generation's arrival at the worker to its first token.",
            ),
            (
                "kiln_worker_generation_inter_token_seconds",
                "Time between consecutive tokens of a generation.",
            ),
            (
                "kiln_worker_generation_queue_seconds",
                "Time a generation waited for a cache slot.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            f.histogram(
                name,
                help,
                workers
                    .iter()
                    .zip(&generation)
                    .map(|(w, h)| (self.labels(w, Vec::new()), &h[i])),
            )?;
        }
        let loads: Vec<_> = workers
            .iter()
            .map(|w| lock(&w.load_seconds).clone())
            .collect();
        f.histogram(
            "kiln_worker_model_load_duration_seconds",
            "Time to fetch, check and load a model version onto the device, by outcome.",
            workers
                .iter()
                .zip(&loads)
                .flat_map(|(w, [success, failure])| {
                    [
                        (self.labels(w, vec![("outcome", "success".into())]), success),
                        (self.labels(w, vec![("outcome", "failure".into())]), failure),
                    ]
                }),
        )
    }
}

/// Requests waiting on `state`'s worker, over every version it serves: rows queued in a
/// batcher and generations waiting for a cache slot. Always present (0 on an idle or empty
/// worker), so that an autoscaler's query never finds no series.
fn queued_requests(state: &State) -> u64 {
    let served = state.served.read().unwrap_or_else(|p| p.into_inner());
    served
        .iter()
        .map(|(key, s)| {
            let generations = match s.spec {
                kiln_core::spec::ModelSpec::Llama(_) => state.engine.generation_stats(key).waiting,
                _ => 0,
            };
            s.batcher.queue_depth() as u64 + generations as u64
        })
        .sum()
}

/// Histograms of a worker's generations: time to first token, between tokens, queued.
pub(crate) struct GenerationMetrics {
    histograms: std::sync::Mutex<[kiln_telemetry::metrics::Histogram; 3]>,
}

impl Default for GenerationMetrics {
    fn default() -> Self {
        Self {
            histograms: std::sync::Mutex::new(std::array::from_fn(|_| {
                kiln_telemetry::metrics::Histogram::new(kiln_telemetry::metrics::SECONDS_BOUNDS)
            })),
        }
    }
}

impl GenerationMetrics {
    fn observe(&self, i: usize, d: std::time::Duration) {
        lock(&self.histograms)[i].observe(d.as_secs_f64());
    }

    /// A generation's first token, `d` after it arrived.
    pub(crate) fn first_token(&self, d: std::time::Duration) {
        self.observe(0, d);
    }

    /// A token `d` after the one before.
    pub(crate) fn between_tokens(&self, d: std::time::Duration) {
        self.observe(1, d);
    }

    /// A generation admitted after waiting `d`.
    pub(crate) fn queue(&self, d: std::time::Duration) {
        self.observe(2, d);
    }

    fn snapshot(&self) -> [kiln_telemetry::metrics::Histogram; 3] {
        lock(&self.histograms).clone()
    }
}

/// The process's resident set size, as the kernel reports it in `/proc/self/status`
/// (`VmRSS`, in kB whatever the page size: 4 KiB on x86, often 64 KiB on ARM servers).
fn resident_bytes() -> Option<u64> {
    vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmRSS:` line of a `/proc/PID/status` text, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod resident_tests {
    #[test]
    fn vm_rss_is_read_in_bytes_from_the_status_text() {
        let status = "Name:\tkiln\nVmPeak:\t  900 kB\nVmRSS:\t  12345 kB\nThreads:\t9\n";
        assert_eq!(super::vm_rss(status), Some(12345 * 1024));
        assert_eq!(super::vm_rss("Name:\tkiln\n"), None);
        // This process has a resident set, and it is more than a page.
        assert!(super::resident_bytes().unwrap() > 64 * 1024);
    }
}
