//! `kiln.v1.Training` at the gateway: every call is forwarded to the scheduler, which owns
//! training jobs. The gateway adds no state, so any gateway can take any call.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_client::TrainingClient;
use kiln_proto::kiln::v1::training_server::Training;
use std::sync::Mutex;

use kiln_registry::WatchedView;
use kiln_telemetry::trace::TracedChannel;
use tonic::{Request, Response, Status};

/// Where training calls go.
enum Target {
    /// A fixed scheduler address (the embedded cluster).
    Fixed(TrainingClient<TracedChannel>),
    /// Whichever scheduler leads, as the cluster state says (cluster mode).
    Leader {
        view: WatchedView,
        /// The leader's address and a client for it, reused while it leads.
        cached: Mutex<Option<(String, TrainingClient<TracedChannel>)>>,
    },
}

/// Forwards training calls to the scheduler.
pub struct TrainingProxy {
    target: Target,
    max_message_bytes: usize,
}

fn client_for(
    address: &str,
    max_message_bytes: usize,
) -> Result<TrainingClient<TracedChannel>, String> {
    let channel = kiln_rpc::channel::traced(address).map_err(|e| format!("scheduler: {e}"))?;
    Ok(TrainingClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

impl TrainingProxy {
    /// A proxy to the scheduler at `address` (`host:port`); connects on first use.
    pub fn new(address: &str, max_message_bytes: usize) -> Result<Self, String> {
        Ok(Self {
            target: Target::Fixed(client_for(address, max_message_bytes)?),
            max_message_bytes,
        })
    }

    /// A proxy to the leading scheduler named in `leader/scheduler`, followed as it changes.
    pub fn to_leader(view: WatchedView, max_message_bytes: usize) -> Self {
        Self {
            target: Target::Leader {
                view,
                cached: Mutex::new(None),
            },
            max_message_bytes,
        }
    }

    fn client(&self) -> Result<TrainingClient<TracedChannel>, Status> {
        match &self.target {
            Target::Fixed(client) => Ok(client.clone()),
            Target::Leader { view, cached } => {
                let leader = view.current().leader.clone().ok_or_else(|| {
                    Status::unavailable(
                        "no scheduler leads the cluster right now; training calls cannot be served",
                    )
                })?;
                let mut cached = cached.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((address, client)) = cached.as_ref()
                    && *address == leader.address
                {
                    return Ok(client.clone());
                }
                let client = client_for(&leader.address, self.max_message_bytes)
                    .map_err(Status::internal)?;
                *cached = Some((leader.address, client.clone()));
                Ok(client)
            }
        }
    }
}

/// Pass the caller's deadline on.
fn forward<T>(request: Request<T>) -> Request<T> {
    let timeout = kiln_rpc::deadline::from_metadata(request.metadata());
    let mut forwarded = Request::new(request.into_inner());
    if let Some(t) = timeout {
        forwarded.set_timeout(t);
    }
    forwarded
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TrainingEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Training for TrainingProxy {
    async fn submit_training_job(
        &self,
        request: Request<pb::SubmitTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        self.client()?.submit_training_job(forward(request)).await
    }

    type WatchTrainingJobStream = EventStream;

    async fn watch_training_job(
        &self,
        request: Request<pb::WatchTrainingJobRequest>,
    ) -> Result<Response<Self::WatchTrainingJobStream>, Status> {
        let stream = self
            .client()?
            .watch_training_job(forward(request))
            .await?
            .into_inner();
        Ok(Response::new(stream.boxed()))
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        self.client()?.get_training_job(forward(request)).await
    }

    async fn list_training_jobs(
        &self,
        request: Request<pb::ListTrainingJobsRequest>,
    ) -> Result<Response<pb::ListTrainingJobsResponse>, Status> {
        self.client()?.list_training_jobs(forward(request)).await
    }

    async fn upload_dataset(
        &self,
        request: Request<tonic::Streaming<pb::UploadDatasetChunk>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let timeout = kiln_rpc::deadline::from_metadata(request.metadata());
        // A broken client stream ends the forwarded one early; the scheduler then sees
        // fewer bytes than the header announced and keeps nothing.
        let chunks = request
            .into_inner()
            .take_while(|c| futures::future::ready(c.is_ok()))
            .filter_map(|c| futures::future::ready(c.ok()));
        let mut forwarded = Request::new(chunks);
        if let Some(t) = timeout {
            forwarded.set_timeout(t);
        }
        self.client()?.upload_dataset(forwarded).await
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        self.client()?.list_datasets(forward(request)).await
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        self.client()?.delete_dataset(forward(request)).await
    }

    async fn cancel_training_job(
        &self,
        request: Request<pb::CancelTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        self.client()?.cancel_training_job(forward(request)).await
    }
}
