//! Routing: pick a ready replica of a version (the scheduler's replica choice, run here
//! in-process), call it with the caller's remaining deadline, and retry once on another
//! replica when the first could not take the call.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::kiln::internal::v1 as pb;
use kiln_proto::kiln::internal::v1::worker_client::WorkerClient;
use kiln_registry::WatchedView;
use kiln_registry::records::VersionKey;
use kiln_scheduler::plan::{ReplicaLoad, choose_replica};
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

struct Replica {
    client: WorkerClient<Channel>,
    in_flight: Arc<AtomicU64>,
}

/// Routes inference to workers.
pub struct Router {
    view: WatchedView,
    /// One lazily-connected channel per worker address.
    replicas: Mutex<HashMap<String, Replica>>,
    rotation: AtomicUsize,
    max_message_bytes: usize,
}

/// Decrements a replica's in-flight count however the call ends.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// A router over the watched cluster view.
    pub fn new(view: WatchedView, max_message_bytes: usize) -> Self {
        Self {
            view,
            replicas: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            max_message_bytes,
        }
    }

    fn replica(&self, address: &str) -> Result<(WorkerClient<Channel>, Arc<AtomicU64>)> {
        let mut map = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(address) {
            return Ok((r.client.clone(), r.in_flight.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Error::Internal(format!("worker address {address}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let in_flight = Arc::new(AtomicU64::new(0));
        map.insert(
            address.to_owned(),
            Replica {
                client: client.clone(),
                in_flight: in_flight.clone(),
            },
        );
        Ok((client, in_flight))
    }

    /// A client for the worker at `address` (the channel routing uses).
    pub fn worker_client(&self, address: &str) -> Result<WorkerClient<Channel>> {
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

    /// Run rows through a ready replica of `key` before `deadline`.
    pub async fn infer(
        &self,
        key: &VersionKey,
        rows: usize,
        features: Bytes,
        deadline: Instant,
    ) -> Result<pb::InferResponse> {
        let mut addresses = self.ready_addresses(key);
        if addresses.is_empty() {
            return Err(Error::Unavailable(format!(
                "model {} version {} has no ready replica",
                key.model, key.version
            )));
        }
        // At most two attempts: the second goes to another replica, inside the deadline.
        let mut last_error = None;
        for _ in 0..2 {
            if addresses.is_empty() {
                break;
            }
            let loads: Vec<ReplicaLoad> = addresses
                .iter()
                .map(|a| ReplicaLoad {
                    in_flight: self
                        .replicas
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(a)
                        .map_or(0, |r| r.in_flight.load(Ordering::Relaxed)),
                })
                .collect();
            let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
            let Some(i) = choose_replica(&loads, rotation) else {
                break;
            };
            let address = addresses.swap_remove(i);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded(
                    "the deadline passed before a replica was called".into(),
                ));
            }
            let (mut client, in_flight) = self.replica(&address)?;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let _guard = InFlight(in_flight);
            let mut request = tonic::Request::new(pb::InferRequest {
                model: key.model.clone(),
                version: key.version,
                rows: rows as u32,
                features: features.clone(),
            });
            request.set_timeout(remaining);
            match client.infer(request).await {
                Ok(response) => return Ok(response.into_inner()),
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
