//! `kiln.v1.Training` at the gateway: every call is forwarded to the scheduler, which owns
//! training jobs. The gateway adds no state, so any gateway can take any call.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::training_client::TrainingClient;
use kiln_proto::kiln::v1::training_server::Training;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Forwards training calls to the scheduler.
pub struct TrainingProxy {
    client: TrainingClient<Channel>,
}

impl TrainingProxy {
    /// A proxy to the scheduler at `address` (`host:port`); connects on first use.
    pub fn new(address: &str, max_message_bytes: usize) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("scheduler address {address}: {e}"))?;
        Ok(Self {
            client: TrainingClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        })
    }
}

/// Pass the caller's deadline on.
fn forward<T>(request: Request<T>) -> Request<T> {
    let timeout = kiln_proto::deadline::from_metadata(request.metadata());
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
        self.client
            .clone()
            .submit_training_job(forward(request))
            .await
    }

    type WatchTrainingJobStream = EventStream;

    async fn watch_training_job(
        &self,
        request: Request<pb::WatchTrainingJobRequest>,
    ) -> Result<Response<Self::WatchTrainingJobStream>, Status> {
        let stream = self
            .client
            .clone()
            .watch_training_job(forward(request))
            .await?
            .into_inner();
        Ok(Response::new(stream.boxed()))
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        self.client.clone().get_training_job(forward(request)).await
    }

    async fn list_training_jobs(
        &self,
        request: Request<pb::ListTrainingJobsRequest>,
    ) -> Result<Response<pb::ListTrainingJobsResponse>, Status> {
        self.client
            .clone()
            .list_training_jobs(forward(request))
            .await
    }

    async fn upload_dataset(
        &self,
        request: Request<tonic::Streaming<pb::UploadDatasetChunk>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let timeout = kiln_proto::deadline::from_metadata(request.metadata());
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
        self.client.clone().upload_dataset(forwarded).await
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        self.client.clone().list_datasets(forward(request)).await
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        self.client.clone().delete_dataset(forward(request)).await
    }

    async fn cancel_training_job(
        &self,
        request: Request<pb::CancelTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        self.client
            .clone()
            .cancel_training_job(forward(request))
            .await
    }
}
