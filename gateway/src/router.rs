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

use bytes::Bytes;
use kiln_core::records::VersionKey;
use kiln_core::routing::{ReplicaLoad, choose_replica, mix64, plan_shards};
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

    /// The load this router sees on each of `addresses`.
    fn loads(&self, addresses: &[String]) -> Vec<ReplicaLoad> {
        let map = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        addresses
            .iter()
            .map(|a| {
                map.get(a)
                    .map_or_else(ReplicaLoad::default, |r| ReplicaLoad {
                        in_flight: r.load.in_flight.load(Ordering::Relaxed),
                        queue_depth: r.load.queue_depth.load(Ordering::Relaxed),
                    })
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

    /// Run rows through the ready replicas of `key` before `deadline`: on one replica, or,
    /// above `sharding.threshold` rows with two or more ready, split across all of them
    /// in proportion to their free queue slots. Each shard (or the whole request) is
    /// retried once on another replica if its first could not take it; the answer is the
    /// rows in order, whatever the split.
    pub async fn infer(
        &self,
        key: &VersionKey,
        rows: usize,
        features: Bytes,
        sharding: Sharding,
        deadline: Instant,
    ) -> Result<pb::InferResponse> {
        let addresses = self.ready_addresses(key);
        if addresses.is_empty() {
            return Err(Error::Unavailable(format!(
                "model {} version {} has no ready replica",
                key.model, key.version
            )));
        }
        if rows <= sharding.threshold || addresses.len() < 2 {
            return self
                .infer_on(key, rows, features, addresses, None, deadline)
                .await;
        }
        let capacities: Vec<u64> = self
            .loads(&addresses)
            .iter()
            .map(|l| sharding.queue_capacity.saturating_sub(l.outstanding()))
            .collect();
        let plan = plan_shards(rows, &capacities);
        let row_bytes = features.len() / rows;
        let calls = plan.shards.iter().map(|shard| {
            // A view of the caller's bytes, not a copy.
            let part =
                features.slice(shard.start * row_bytes..(shard.start + shard.rows) * row_bytes);
            self.infer_on(
                key,
                shard.rows,
                part,
                addresses.clone(),
                Some(shard.replica),
                deadline,
            )
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
        let cols = answers.first().map_or(0, |a| a.cols);
        if answers.iter().any(|a| a.cols != cols) {
            return Err(Error::Internal(
                "replicas of one version answered with different output widths".into(),
            ));
        }
        let mut outputs =
            bytes::BytesMut::with_capacity(answers.iter().map(|a| a.outputs.len()).sum());
        for a in &answers {
            outputs.extend_from_slice(&a.outputs);
        }
        Ok(pb::InferResponse {
            rows: rows as u32,
            cols,
            outputs: outputs.freeze(),
            queue_ns: answers.iter().map(|a| a.queue_ns).max().unwrap_or(0),
            compute_ns: answers.iter().map(|a| a.compute_ns).max().unwrap_or(0),
            batch_rows: answers.iter().map(|a| a.batch_rows).max().unwrap_or(0),
            queue_depth: 0,
        })
    }

    /// Run rows on one of `addresses`: `first` if given, else the power-of-two choice;
    /// then, if that replica could not take the call, once more on another.
    async fn infer_on(
        &self,
        key: &VersionKey,
        rows: usize,
        features: Bytes,
        mut addresses: Vec<String>,
        mut first: Option<usize>,
        deadline: Instant,
    ) -> Result<pb::InferResponse> {
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
                rows: rows as u32,
                features: features.clone(),
            });
            request.set_timeout(remaining);
            match client.infer(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    guard
                        .0
                        .queue_depth
                        .store(u64::from(response.queue_depth), Ordering::Relaxed);
                    return Ok(response);
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

fn map_worker_status(status: tonic::Status) -> Error {
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::InvalidArgument => Error::Invalid(message),
        tonic::Code::ResourceExhausted => Error::Overloaded(message),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            Error::DeadlineExceeded("the deadline passed before the model answered".into())
        }
        tonic::Code::NotFound => Error::NotFound(message),
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            Error::Unavailable(format!("worker unavailable: {message}"))
        }
        _ => Error::Internal(format!("worker answered {:?}: {message}", status.code())),
    }
}
