//! `kiln-bench floor`: the floor an Open Inference Protocol server cannot go below — a
//! bare tonic server that answers every ModelInfer with a canned response of the right
//! size, without decoding, routing or computing anything. It answers the metadata and
//! config calls a client such as perf_analyzer makes first, so the same client drives it
//! and Kiln; the difference between the two is what Kiln's own work costs.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kiln_core::tensor::{DataType, TensorSpec};
use kiln_gateway::oip::tensor_metadata;
use kiln_proto::inference as oip;
use kiln_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

/// What the canned model looks like.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    /// The model name it answers to.
    pub model: String,
    /// FP32 features per row.
    pub inputs: usize,
    /// FP32 outputs per row.
    pub outputs: usize,
    /// The max_batch_size its ModelConfig reports.
    pub max_batch_size: i32,
}

struct Floor {
    config: FloorConfig,
    /// One row's output, raw: the answer to every request is this, repeated per row.
    row: Arc<Vec<u8>>,
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!(
        "model {name:?} not found (this floor server has one model)"
    ))
}

impl Floor {
    fn check(&self, name: &str) -> Result<(), Status> {
        if name == self.config.model {
            Ok(())
        } else {
            Err(not_found(name))
        }
    }

    fn answer(&self, req: &oip::ModelInferRequest) -> Result<oip::ModelInferResponse, Status> {
        self.check(&req.model_name)?;
        // Only the row count is read: the floor does not look at the features.
        let rows = req
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .copied()
            .unwrap_or(1)
            .clamp(1, 1 << 20) as usize;
        Ok(oip::ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: "1".into(),
            id: req.id.clone(),
            outputs: vec![oip::model_infer_response::InferOutputTensor {
                name: "output".into(),
                datatype: "FP32".into(),
                shape: vec![rows as i64, self.config.outputs as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![self.row.repeat(rows).into()],
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Floor {
    async fn server_live(
        &self,
        _: Request<oip::ServerLiveRequest>,
    ) -> Result<Response<oip::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<oip::ServerReadyRequest>,
    ) -> Result<Response<oip::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        let ready = request.get_ref().name == self.config.model;
        Ok(Response::new(oip::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::ServerMetadataResponse {
            name: "kiln-bench-floor".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_configuration".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        self.check(&request.get_ref().name)?;
        Ok(Response::new(oip::ModelMetadataResponse {
            name: self.config.model.clone(),
            versions: vec!["1".into()],
            platform: "kiln_floor".into(),
            inputs: vec![fp32_metadata("input", self.config.inputs)],
            outputs: vec![fp32_metadata("output", self.config.outputs)],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        self.answer(request.get_ref()).map(Response::new)
    }

    type ModelStreamInferStream =
        Pin<Box<dyn Stream<Item = Result<oip::ModelStreamInferResponse, Status>> + Send>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<oip::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let floor = Floor {
            config: self.config.clone(),
            row: self.row.clone(),
        };
        let answers = request.into_inner().map(move |item| {
            let req = item?;
            Ok(match floor.answer(&req) {
                Ok(r) => oip::ModelStreamInferResponse {
                    error_message: String::new(),
                    infer_response: Some(r),
                },
                Err(s) => oip::ModelStreamInferResponse {
                    error_message: s.message().to_owned(),
                    infer_response: None,
                },
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<oip::ModelConfigRequest>,
    ) -> Result<Response<oip::ModelConfigResponse>, Status> {
        self.check(&request.get_ref().name)?;
        Ok(Response::new(oip::ModelConfigResponse {
            config: Some(oip::ModelConfig {
                name: self.config.model.clone(),
                platform: "kiln_floor".into(),
                max_batch_size: self.config.max_batch_size,
                input: vec![oip::ModelInput {
                    name: "input".into(),
                    data_type: oip::DataType::TypeFp32 as i32,
                    dims: vec![self.config.inputs as i64],
                    optional: false,
                }],
                output: vec![oip::ModelOutput {
                    name: "output".into(),
                    data_type: oip::DataType::TypeFp32 as i32,
                    dims: vec![self.config.outputs as i64],
                }],
                ..Default::default()
            }),
        }))
    }

    async fn model_statistics(
        &self,
        _: Request<oip::ModelStatisticsRequest>,
    ) -> Result<Response<oip::ModelStatisticsResponse>, Status> {
        Err(Status::unimplemented(
            "the floor server keeps no statistics",
        ))
    }

    async fn repository_index(
        &self,
        _: Request<oip::RepositoryIndexRequest>,
    ) -> Result<Response<oip::RepositoryIndexResponse>, Status> {
        Ok(Response::new(oip::RepositoryIndexResponse {
            models: vec![oip::repository_index_response::ModelIndex {
                name: self.config.model.clone(),
                version: "1".into(),
                state: "READY".into(),
                reason: String::new(),
            }],
        }))
    }

    async fn repository_model_load(
        &self,
        _: Request<oip::RepositoryModelLoadRequest>,
    ) -> Result<Response<oip::RepositoryModelLoadResponse>, Status> {
        Ok(Response::new(oip::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        _: Request<oip::RepositoryModelUnloadRequest>,
    ) -> Result<Response<oip::RepositoryModelUnloadResponse>, Status> {
        Ok(Response::new(oip::RepositoryModelUnloadResponse {}))
    }
}

/// Serve the floor on `listener` until `shutdown` resolves.
pub async fn serve(
    config: FloorConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let row: Vec<u8> = (0..config.outputs)
        .flat_map(|i| (0.5f32 + i as f32).to_le_bytes())
        .collect();
    let service = GrpcInferenceServiceServer::new(Floor {
        config,
        row: Arc::new(row),
    })
    .max_decoding_message_size(64 * 1024 * 1024)
    .max_encoding_message_size(64 * 1024 * 1024);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(kiln_rpc::net::incoming(listener), shutdown)
        .await
}

/// An FP32 tensor `[batch, width]` as `ModelMetadata` gives it.
fn fp32_metadata(
    name: &str,
    width: usize,
) -> kiln_proto::inference::model_metadata_response::TensorMetadata {
    tensor_metadata(&TensorSpec {
        name: name.into(),
        datatype: DataType::F32,
        shape: vec![-1, width as i64],
        optional: false,
    })
}
