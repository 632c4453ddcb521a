//! Routing: pick a ready replica of a version (the scheduler's replica choice, power of
//! two choices, run here in-process), call it with the caller's remaining deadline, and
//! retry once on another replica when the first could not take the call. A request with
//! more rows than its deployment's shard threshold is split by the scheduler's shard
//! planner across every ready replica, sent in parallel and gathered in row order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use kiln_core::records::VersionKey;
use kiln_core::routing::{ReplicaLoad, choose_replica, mix64, plan_shards};
use kiln_core::tensor::{Tensor, tensor_from_proto, tensor_to_proto};
use kiln_proto::kiln::internal::v1 as pb;
use kiln_proto::kiln::internal::v1::worker_client::WorkerClient;
use kiln_registry::WatchedView;
use kiln_rpc::local::Transport;

use crate::{Error, Result};

struct Replica {
    client: WorkerClient<Transport>,
    load: Arc<Load>,
}

/// What this router knows of a replica's load.
#[derive(Default)]
struct Load {
    /// Requests this router sent and has not seen answered.
    in_flight: AtomicU64,
    /// The replica's queue depth as its last answer reported it.
    queue_depth: AtomicU64,
}

/// Routes inference to workers.
pub struct Router {
    view: WatchedView,
    /// One lazily-connected channel per worker address.
    replicas: Mutex<HashMap<String, Replica>>,
    rotation: AtomicUsize,
    max_message_bytes: usize,
    /// Where retries are counted.
    stats: Arc<crate::stats::Stats>,
}

/// Decrements a replica's in-flight count however the call ends.
struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A replica's answer to a request (or to the shards of one, joined).
#[derive(Debug)]
pub struct Answer {
    /// The model's outputs, in its interface's order, one row per input row.
    pub outputs: Vec<Tensor>,
    /// Nanoseconds the request waited in the batcher's queue (the longest of its shards).
    pub queue_ns: u64,
    /// Nanoseconds its batch took on the device (the longest of its shards).
    pub compute_ns: u64,
    /// Rows in the largest batch it rode in.
    pub batch_rows: u32,
    /// Rows whose input the model cut to fit (summed over its shards).
    pub truncated_rows: u32,
}

/// How a request's rows may be split (see [`Router::infer`]).
#[derive(Debug, Clone, Copy)]
pub struct Sharding {
    /// Requests with more rows than this are split across the ready replicas.
    pub threshold: usize,
    /// Queue slots of one replica's batcher: its capacity when idle.
    pub queue_capacity: u64,
}

impl Router {
    /// A router over the watched cluster view.
    pub fn new(
        view: WatchedView,
        max_message_bytes: usize,
        stats: Arc<crate::stats::Stats>,
    ) -> Self {
        Self {
            view,
            replicas: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            max_message_bytes,
            stats,
        }
    }

    fn replica(&self, address: &str) -> Result<(WorkerClient<Transport>, Arc<Load>)> {
        let mut map = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(address) {
            return Ok((r.client.clone(), r.load.clone()));
        }
        // A worker in this process is called without a socket (see `kiln_rpc::local`).
        let transport = kiln_rpc::channel::transport(address)
            .map_err(|e| Error::Internal(format!("worker address: {e}")))?;
        let client = WorkerClient::new(transport)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let load = Arc::new(Load::default());
        map.insert(
            address.to_owned(),
            Replica {
                client: client.clone(),
                load: load.clone(),
            },
        );
        Ok((client, load))
    }

    /// The load this router sees on each of `addresses` (whether its worker trains comes
    /// from the worker's record).
    fn loads(&self, addresses: &[String]) -> Vec<ReplicaLoad> {
        let view = self.view.current();
        // Usually none: an empty list, nothing allocated on the request path.
        let training: Vec<&str> = view
            .workers
            .values()
            .filter(|w| w.training > 0)
            .map(|w| w.address.as_str())
            .collect();
        let map = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        addresses
            .iter()
            .map(|a| {
                let mut load = map
                    .get(a)
                    .map_or_else(ReplicaLoad::default, |r| ReplicaLoad {
                        in_flight: r.load.in_flight.load(Ordering::Relaxed),
                        queue_depth: r.load.queue_depth.load(Ordering::Relaxed),
                        training: false,
                    });
                load.training = training.contains(&a.as_str());
                load
            })
            .collect()
    }

    /// A client for the worker at `address` (the channel routing uses).
    pub fn worker_client(&self, address: &str) -> Result<WorkerClient<Transport>> {
        self.replica(address).map(|(client, _)| client)
    }

    /// Addresses of the workers that report `key` ready.
    pub fn ready_addresses(&self, key: &VersionKey) -> Vec<String> {
        self.view
            .current()
            .workers
            .values()
            .filter(|w| w.is_ready(key))
            .map(|w| w.address.clone())
            .collect()
    }

    /// Run a request's inputs (`rows` rows each) through the ready replicas of `key` before
    /// `deadline`: on one replica, or,
    /// above `sharding.threshold` rows with two or more ready, split across all of them
    /// in proportion to their free queue slots. Each shard (or the whole request) is
    /// retried once on another replica if its first could not take it; the answer is the
    /// rows in order, whatever the split.
    pub async fn infer(
        &self,
        key: &VersionKey,
        inputs: Vec<Tensor>,
        rows: usize,
        sharding: Sharding,
        deadline: Instant,
    ) -> Result<Answer> {
        let addresses = self.ready_addresses(key);
        if addresses.is_empty() {
            return Err(Error::Unavailable(format!(
                "model {} version {} has no ready replica",
                key.model, key.version
            )));
        }
        if rows <= sharding.threshold || addresses.len() < 2 {
            return self.infer_on(key, inputs, addresses, None, deadline).await;
        }
        // Replicas on training workers take no shard while others can.
        let loads = self.loads(&addresses);
        let others_free = loads.iter().any(|l| !l.training);
        let capacities: Vec<u64> = loads
            .iter()
            .map(|l| {
                if others_free && l.training {
                    0
                } else {
                    sharding.queue_capacity.saturating_sub(l.outstanding())
                }
            })
            .collect();
        let plan = plan_shards(rows, &capacities);
        // Views of the caller's tensors, not copies.
        let mut parts = Vec::with_capacity(plan.shards.len());
        for shard in &plan.shards {
            let part = inputs
                .iter()
                .map(|t| t.slice_rows(shard.start, shard.rows))
                .collect::<kiln_core::Result<Vec<_>>>()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            parts.push((part, shard.replica));
        }
        let calls = parts.into_iter().map(|(part, replica)| {
            self.infer_on(key, part, addresses.clone(), Some(replica), deadline)
        });
        let fan_out = kiln_telemetry::trace::start(
            "shard fan-out",
            kiln_telemetry::trace::SpanKind::Internal,
            &kiln_telemetry::trace::current(),
            || {
                vec![
                    kiln_telemetry::trace::KeyValue::new("kiln.shards", plan.shards.len() as i64),
                    kiln_telemetry::trace::KeyValue::new("kiln.batch_size", rows as i64),
                ]
            },
        );
        // The first shard that fails for good fails the request; the others are dropped.
        let answers =
            kiln_telemetry::trace::scoped(fan_out, futures::future::try_join_all(calls)).await?;
        let queue_ns = answers.iter().map(|a| a.queue_ns).max().unwrap_or(0);
        let compute_ns = answers.iter().map(|a| a.compute_ns).max().unwrap_or(0);
        let batch_rows = answers.iter().map(|a| a.batch_rows).max().unwrap_or(0);
        let truncated_rows = answers.iter().map(|a| a.truncated_rows).sum();
        let count = answers.first().map_or(0, |a| a.outputs.len());
        let mut columns: Vec<Vec<Tensor>> = (0..count).map(|_| Vec::new()).collect();
        for a in answers {
            if a.outputs.len() != count {
                return Err(Error::Internal(
                    "replicas of one version answered with different outputs".into(),
                ));
            }
            for (column, t) in columns.iter_mut().zip(a.outputs) {
                column.push(t);
            }
        }
        let outputs = columns
            .into_iter()
            .map(Tensor::concat_rows)
            .collect::<kiln_core::Result<Vec<_>>>()
            .map_err(|e| {
                Error::Internal(format!("replicas of one version answered differently: {e}"))
            })?;
        Ok(Answer {
            outputs,
            queue_ns,
            compute_ns,
            batch_rows,
            truncated_rows,
        })
    }

    /// Run a request on one of `addresses`: `first` if given, else the power-of-two choice;
    /// then, if that replica could not take the call, once more on another.
    async fn infer_on(
        &self,
        key: &VersionKey,
        inputs: Vec<Tensor>,
        mut addresses: Vec<String>,
        mut first: Option<usize>,
        deadline: Instant,
    ) -> Result<Answer> {
        let rows = inputs.first().map_or(0, Tensor::rows);
        let inputs: Vec<pb::Tensor> = inputs.into_iter().map(tensor_to_proto).collect();
        let mut last_error = None;
        for _ in 0..2 {
            if addresses.is_empty() {
                break;
            }
            let i = match first.take() {
                Some(i) if i < addresses.len() => i,
                _ => {
                    let draw = mix64(self.rotation.fetch_add(1, Ordering::Relaxed) as u64);
                    match choose_replica(&self.loads(&addresses), draw) {
                        Some(i) => i,
                        None => break,
                    }
                }
            };
            let address = addresses.swap_remove(i);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded(
                    "the deadline passed before a replica was called".into(),
                ));
            }
            let (mut client, load) = self.replica(&address)?;
            load.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(load);
            let mut request = tonic::Request::new(pb::InferRequest {
                model: key.model.clone(),
                version: key.version,
                inputs: inputs.clone(),
            });
            request.set_timeout(remaining);
            // The deadline is kept here too: a worker in this process (`kiln up`) is called
            // without a server in between to enforce it. Dropping the call at the deadline
            // tells the worker's batcher its caller left, so it never computes the rows.
            let called = match tokio::time::timeout(remaining, client.infer(request)).await {
                Ok(called) => called,
                Err(_) => {
                    return Err(Error::DeadlineExceeded(
                        "the deadline passed before the model answered".into(),
                    ));
                }
            };
            match called {
                Ok(response) => {
                    let response = response.into_inner();
                    guard
                        .0
                        .queue_depth
                        .store(u64::from(response.queue_depth), Ordering::Relaxed);
                    return answer(response, rows);
                }
                Err(status) => {
                    // A replica that went away (refused, reset, or its stream cancelled
                    // under us) is retried on another while the deadline allows; a full
                    // queue or a bad request is not.
                    let gone = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown
                    ) || (status.code() == tonic::Code::Cancelled
                        && Instant::now() < deadline);
                    let retry = gone && !status.message().contains("queue is full");
                    let error = map_worker_status(status);
                    if !retry {
                        return Err(error);
                    }
                    tracing::debug!(%address, error = %error, "replica failed; trying another");
                    self.stats.retried(key);
                    kiln_telemetry::trace::event(
                        "retry",
                        &[("server.address", &address), ("error", &error.to_string())],
                    );
                    last_error = Some(error);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::Unavailable("no replica could take the request".into())))
    }
}

/// A generation in progress on one replica: its events, and the replica's count of open
/// generations from this router (released when this is dropped).
pub struct Generation {
    /// The worker's events.
    pub events: tonic::Streaming<pb::GenerateEvent>,
    _in_flight: InFlight,
}

impl Router {
    /// Start a generation on a ready replica of `key`: the one with the most free slots as
    /// this router sees them (fewest open generations from here, then fewest running as
    /// the replica last reported), tried once more on another if the first could not take
    /// it.
    pub async fn generate(
        &self,
        key: &VersionKey,
        request: pb::GenerateRequest,
    ) -> Result<Generation> {
        let mut addresses = self.ready_addresses(key);
        if addresses.is_empty() {
            return Err(Error::Unavailable(format!(
                "model {} version {} has no ready replica",
                key.model, key.version
            )));
        }
        let mut last_error = None;
        for _ in 0..2 {
            let draw = mix64(self.rotation.fetch_add(1, Ordering::Relaxed) as u64);
            let Some(i) = choose_replica(&self.loads(&addresses), draw) else {
                break;
            };
            let address = addresses.swap_remove(i);
            let (mut client, load) = self.replica(&address)?;
            load.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(load);
            match client.generate(request.clone()).await {
                Ok(response) => {
                    return Ok(Generation {
                        events: response.into_inner(),
                        _in_flight: guard,
                    });
                }
                Err(status) => {
                    let gone = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown
                    );
                    let error = map_worker_status(status);
                    if !gone || addresses.is_empty() {
                        return Err(error);
                    }
                    self.stats.retried(key);
                    last_error = Some(error);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::Unavailable("no replica could take the request".into())))
    }
}

impl Generation {
    /// Note what the replica reported when the generation started: its sequences running
    /// and waiting, the depth the next replica choice weighs beside open generations.
    pub fn started(&self, running: u32) {
        self._in_flight
            .0
            .queue_depth
            .store(u64::from(running), Ordering::Relaxed);
    }
}

/// A worker's response, checked: every output well-formed with the request's rows.
fn answer(response: pb::InferResponse, rows: usize) -> Result<Answer> {
    let outputs = response
        .outputs
        .into_iter()
        .map(tensor_from_proto)
        .collect::<kiln_core::Result<Vec<_>>>()
        .map_err(|e| Error::Internal(format!("a worker answered a malformed tensor: {e}")))?;
    if let Some(t) = outputs.iter().find(|t| t.rows() != rows) {
        return Err(Error::Internal(format!(
            "a worker answered {} rows of {:?} for {rows}",
            t.rows(),
            t.name
        )));
    }
    Ok(Answer {
        outputs,
        queue_ns: response.queue_ns,
        compute_ns: response.compute_ns,
        batch_rows: response.batch_rows,
        truncated_rows: response.truncated_rows,
    })
}

/// Whether a transport's error text names internals (an address, a path, a source line)
/// that a caller must not see.
fn leaks_internals(message: &str) -> bool {
    let address = message
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|word| {
            word.rsplit_once(':').is_some_and(|(host, port)| {
                !port.is_empty()
                    && port.chars().all(|c| c.is_ascii_digit())
                    && (host.parse::<std::net::IpAddr>().is_ok()
                        || host
                            .trim_matches(['[', ']'])
                            .parse::<std::net::Ipv6Addr>()
                            .is_ok()
                        || host.contains('.'))
            })
        });
    address || message.contains(".rs:") || message.contains(" /") || message.starts_with('/')
}

pub(crate) fn map_worker_status(status: tonic::Status) -> Error {
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::InvalidArgument => Error::Invalid(message),
        tonic::Code::ResourceExhausted => Error::Overloaded(message),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            Error::DeadlineExceeded("the deadline passed before the model answered".into())
        }
        tonic::Code::NotFound => Error::NotFound(message),
        tonic::Code::Unavailable | tonic::Code::Unknown if leaks_internals(&message) => {
            tracing::warn!(error = %message, "worker unavailable");
            Error::Unavailable("worker unavailable: it could not be reached".into())
        }
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            Error::Unavailable(format!("worker unavailable: {message}"))
        }
        _ => Error::Internal(format!("worker answered {:?}: {message}", status.code())),
    }
}

#[cfg(test)]
mod leak_tests {
    use super::*;

    #[test]
    fn transport_errors_that_name_internals_are_not_passed_on() {
        for text in [
            "error trying to connect: tcp connect error 10.0.0.5:8101",
            "connect to [::1]:9000 failed",
            "panicked at worker/src/lib.rs:12",
            "cannot open /var/lib/kiln/x",
            "dns error: worker-0.kiln.svc:8101",
        ] {
            let e = map_worker_status(tonic::Status::unavailable(text)).to_string();
            assert_eq!(e, "worker unavailable: it could not be reached", "{text}");
        }
        let e = map_worker_status(tonic::Status::unavailable(
            "model version m:1 is not loaded on this worker",
        ));
        assert!(e.to_string().contains("not loaded"), "{e}");
    }
}
