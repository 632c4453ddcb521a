//! `inference.GRPCInferenceService`: the Open Inference Protocol with Triton's extensions.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kiln_core::records::{LoadState, VersionKey};
use kiln_core::tensor::{DataType, TensorSpec};
use kiln_proto::inference as oip;
use kiln_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use kiln_proto::inference::model_metadata_response::TensorMetadata;
use kiln_registry::ClusterView;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{Limits, decode_inputs, encode_outputs, requested_outputs};
use crate::router::Sharding;
use crate::stats::Success;
use crate::{Error, Result, Shared};

/// Response parameter of families that cut long inputs (encoders): how many of the
/// request's rows were cut to the model's longest sequence.
pub const TRUNCATED_ROWS: &str = "truncated_rows";

/// Extensions this server answers (ServerMetadata lists them).
pub const EXTENSIONS: &[&str] = &["model_configuration", "statistics", "model_repository"];
/// How many requests of one ModelStreamInfer stream run at once (answers keep their order).
const STREAM_CONCURRENCY: usize = 32;

/// The OIP service.
pub struct InferenceService {
    pub(crate) shared: Arc<Shared>,
}

/// A version's serving state in Triton's words, with the reason when it is not ready.
pub fn version_state(view: &ClusterView, key: &VersionKey) -> (&'static str, String) {
    let mut loading = false;
    let mut failure = None;
    for w in view.workers.values() {
        for l in w.loaded.iter().filter(|l| &l.key == key) {
            match l.state {
                LoadState::Ready => return ("READY", String::new()),
                LoadState::Loading => loading = true,
                LoadState::Failed => failure = Some(l.reason.clone()),
            }
        }
    }
    if loading {
        return ("LOADING", String::new());
    }
    if let Some(reason) = failure {
        return ("UNAVAILABLE", reason);
    }
    if !view.deployment(&key.model).loaded {
        return ("UNAVAILABLE", "unloaded".into());
    }
    let placed = view.placements.values().any(|p| p.versions.contains(key));
    if placed {
        ("LOADING", String::new())
    } else {
        ("UNAVAILABLE", "no worker holds this version".into())
    }
}

impl Shared {
    /// Serve one inference request end to end.
    pub(crate) async fn infer(
        &self,
        req: oip::ModelInferRequest,
        timeout: Option<Duration>,
    ) -> Result<oip::ModelInferResponse> {
        let started = Instant::now();
        let deadline = started + timeout.unwrap_or(self.config.default_timeout);
        if req.model_name.is_empty() {
            return Err(Error::Invalid("model_name is empty".into()));
        }
        let elements = crate::codec::request_elements(&req);
        if elements > self.config.max_request_elements {
            return Err(Error::Overloaded(format!(
                "the request's inputs hold {elements} tensor elements; the gateway's limit is {} \
                 (--max-request-elements)",
                self.config.max_request_elements
            )));
        }
        let view = self.view.current();
        let ticket = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (entry, version) = view.resolve_request(&req.model_name, &req.model_version, ticket)?;
        let key = version.key();
        kiln_telemetry::trace::attributes(|| {
            vec![
                kiln_telemetry::trace::KeyValue::new(
                    "kiln.model.name",
                    kiln_telemetry::trace::name_value(&key.model),
                ),
                kiln_telemetry::trace::KeyValue::new("kiln.model.version", key.version as i64),
            ]
        });
        let _in_flight = self.stats.in_flight(&key);
        let interface = entry.record.spec.interface(&entry.record.signature);
        let deployment = view.deployment(&key.model);
        let batching = deployment.batching;
        let result = async {
            let decoding = Instant::now();
            let wanted = requested_outputs(&req, &interface)?;
            let decoded = decode_inputs(
                &req,
                &interface,
                &Limits {
                    max_batch: batching.max_batch_size as usize,
                    max_rows: batching.max_batch_size as usize
                        * batching.max_queue_size.max(1) as usize,
                },
            )?;
            entry
                .record
                .spec
                .family()
                .check_request(&decoded.inputs)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let input = decoding.elapsed();
            let rows = decoded.rows;
            kiln_telemetry::trace::attribute("kiln.batch_size", rows as i64);
            let sharding = Sharding {
                threshold: deployment
                    .shard_rows
                    .filter(|n| *n > 0)
                    .unwrap_or(batching.max_batch_size) as usize,
                queue_capacity: u64::from(batching.max_queue_size),
            };
            let answer = self
                .router
                .infer(&key, decoded.inputs, rows, sharding, deadline)
                .await?;
            let mut response = oip::ModelInferResponse {
                model_name: req.model_name.clone(),
                model_version: key.version.to_string(),
                id: req.id.clone(),
                ..Default::default()
            };
            let encoding = Instant::now();
            let mut outputs = answer.outputs.into_iter().map(Some).collect::<Vec<_>>();
            let outputs = wanted
                .iter()
                .filter_map(|i| outputs.get_mut(*i).and_then(Option::take))
                .collect();
            encode_outputs(&mut response, outputs, decoded.raw);
            if entry.record.spec.family().truncates() {
                response.parameters.insert(
                    TRUNCATED_ROWS.into(),
                    oip::InferParameter {
                        parameter_choice: Some(oip::infer_parameter::ParameterChoice::Int64Param(
                            i64::from(answer.truncated_rows),
                        )),
                    },
                );
            }
            let success = Success {
                total: Duration::ZERO,
                queue: Duration::from_nanos(answer.queue_ns),
                input,
                compute: Duration::from_nanos(answer.compute_ns),
                output: encoding.elapsed(),
                rows: rows as u64,
                batch_rows: u64::from(answer.batch_rows),
            };
            Ok::<_, Error>((response, success))
        }
        .await;
        match result {
            Ok((response, success)) => {
                self.stats.success(
                    &key,
                    Success {
                        total: started.elapsed(),
                        ..success
                    },
                );
                Ok(response)
            }
            Err(e) => {
                self.stats.failure(&key, started.elapsed());
                Err(e)
            }
        }
    }
}

/// ModelMetadata's description of an FP32 `[batch, width]` tensor.
pub fn tensor_metadata(spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.datatype.name().into(),
        shape: spec.shape.clone(),
    }
}

/// A datatype as `ModelConfig` names it.
pub fn config_datatype(datatype: DataType) -> oip::DataType {
    match datatype {
        DataType::Bool => oip::DataType::TypeBool,
        DataType::U8 => oip::DataType::TypeUint8,
        DataType::U16 => oip::DataType::TypeUint16,
        DataType::U32 => oip::DataType::TypeUint32,
        DataType::U64 => oip::DataType::TypeUint64,
        DataType::I8 => oip::DataType::TypeInt8,
        DataType::I16 => oip::DataType::TypeInt16,
        DataType::I32 => oip::DataType::TypeInt32,
        DataType::I64 => oip::DataType::TypeInt64,
        DataType::F16 => oip::DataType::TypeFp16,
        DataType::Bf16 => oip::DataType::TypeBf16,
        DataType::F32 => oip::DataType::TypeFp32,
        DataType::F64 => oip::DataType::TypeFp64,
        DataType::Bytes => oip::DataType::TypeString,
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
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
        let ready = self.shared.ready.load(Ordering::Relaxed);
        Ok(Response::new(oip::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.view.current();
        let ready = match view.resolve(&req.name, &req.version) {
            Ok((_, version)) => version_state(&view, &version.key()).0 == "READY",
            Err(_) => false,
        };
        Ok(Response::new(oip::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| (*s).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.view.current();
        let (entry, _) = view.resolve(&req.name, &req.version).map_err(Error::from)?;
        let r = &entry.record;
        let interface = r.spec.interface(&r.signature);
        Ok(Response::new(oip::ModelMetadataResponse {
            name: r.name.clone(),
            versions: entry.versions.keys().map(|v| v.to_string()).collect(),
            platform: "kiln_burn".into(),
            inputs: interface.inputs.iter().map(tensor_metadata).collect(),
            outputs: interface.outputs.iter().map(tensor_metadata).collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        let timeout = kiln_rpc::deadline::from_metadata(request.metadata())
            .map(kiln_rpc::deadline::answer_within);
        let req = request.into_inner();
        if self
            .shared
            .is_generator(&req.model_name, &req.model_version)
        {
            let response = self.shared.infer_generation(req).await?;
            return Ok(Response::new(response));
        }
        let response = self.shared.infer(req, timeout).await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream =
        Pin<Box<dyn Stream<Item = Result<oip::ModelStreamInferResponse, Status>> + Send>>;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<oip::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let shared = self.shared.clone();
        // The call's context, taken now: the answers are made as the response body is
        // read, outside the call's own future.
        let call = kiln_telemetry::trace::current();
        let mut requests = request.into_inner();
        // Two lanes: answers of ordinary models keep their requests' order; generations
        // (decoupled models) stream their responses as they come, interleaved.
        type Answer = Result<oip::ModelStreamInferResponse, Status>;
        let (ordered_tx, ordered_rx) = tokio::sync::mpsc::channel::<
            Pin<Box<dyn std::future::Future<Output = Answer> + Send>>,
        >(STREAM_CONCURRENCY);
        let (streams_tx, streams_rx) = tokio::sync::mpsc::channel::<
            Pin<Box<dyn Stream<Item = Answer> + Send>>,
        >(STREAM_CONCURRENCY);
        tokio::spawn(async move {
            while let Some(item) = requests.next().await {
                let req = match item {
                    Ok(req) => req,
                    Err(status) => {
                        let _ = ordered_tx
                            .send(Box::pin(futures::future::ready(Err(status))))
                            .await;
                        return;
                    }
                };
                let cx = kiln_telemetry::trace::start(
                    "ModelStreamInfer request",
                    kiln_telemetry::trace::SpanKind::Internal,
                    &call,
                    Vec::new,
                );
                if shared.is_generator(&req.model_name, &req.model_version) {
                    let stream = kiln_telemetry::trace::scoped(cx, {
                        let shared = shared.clone();
                        async move { shared.stream_generation(req) }
                    })
                    .await;
                    if streams_tx.send(stream).await.is_err() {
                        return;
                    }
                    continue;
                }
                let shared = shared.clone();
                let answer = async move {
                    let id = req.id.clone();
                    let recorded = cx.clone();
                    let answer = kiln_telemetry::trace::scoped(cx, shared.infer(req, None))
                        .await
                        .map_err(Status::from);
                    if let Some(cx) = &recorded {
                        let code = answer.as_ref().err().map_or(0, |s| s.code() as i64);
                        kiln_telemetry::trace::record_code(cx, code);
                    }
                    Ok(match answer {
                        Ok(response) => oip::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(status) => oip::ModelStreamInferResponse {
                            error_message: status.message().to_owned(),
                            infer_response: Some(oip::ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    })
                };
                if ordered_tx.send(Box::pin(answer)).await.is_err() {
                    return;
                }
            }
        });
        let ordered =
            tokio_stream::wrappers::ReceiverStream::new(ordered_rx).buffered(STREAM_CONCURRENCY);
        let generated = tokio_stream::wrappers::ReceiverStream::new(streams_rx)
            .flatten_unordered(STREAM_CONCURRENCY);
        let answers = futures::stream::select(ordered, generated);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<oip::ModelConfigRequest>,
    ) -> Result<Response<oip::ModelConfigResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.view.current();
        let (entry, _) = view.resolve(&req.name, &req.version).map_err(Error::from)?;
        let r = &entry.record;
        let interface = r.spec.interface(&r.signature);
        let batching = view.deployment(&r.name).batching;
        // A decoder is decoupled (a stream of responses per request) and takes one
        // request per call: no batch dimension in its tensors.
        let decoupled = r.spec.family().batching() == kiln_core::family::Batching::Generate;
        let dims = |shape: &[i64]| -> Vec<i64> {
            if decoupled {
                shape.to_vec()
            } else {
                shape.get(1..).unwrap_or_default().to_vec()
            }
        };
        let runtime = view
            .workers
            .values()
            .next()
            .map_or_else(String::new, |w| w.backend.clone());
        let config = oip::ModelConfig {
            name: r.name.clone(),
            platform: "kiln_burn".into(),
            backend: "kiln".into(),
            runtime,
            version_policy: Some(oip::ModelVersionPolicy {
                policy_choice: Some(oip::model_version_policy::PolicyChoice::All(
                    oip::model_version_policy::All {},
                )),
            }),
            max_batch_size: if decoupled {
                0
            } else {
                batching.max_batch_size as i32
            },
            model_transaction_policy: Some(oip::ModelTransactionPolicy { decoupled }),
            // The batch dimension is implied by max_batch_size, as Triton reports it.
            input: interface
                .inputs
                .iter()
                .map(|t| oip::ModelInput {
                    name: t.name.clone(),
                    data_type: config_datatype(t.datatype) as i32,
                    dims: dims(&t.shape),
                    optional: t.optional,
                })
                .collect(),
            output: interface
                .outputs
                .iter()
                .map(|t| oip::ModelOutput {
                    name: t.name.clone(),
                    data_type: config_datatype(t.datatype) as i32,
                    dims: dims(&t.shape),
                })
                .collect(),
            scheduling_choice: Some(oip::model_config::SchedulingChoice::DynamicBatching(
                oip::ModelDynamicBatching {
                    preferred_batch_size: vec![],
                    max_queue_delay_microseconds: batching.max_queue_delay_us,
                    preserve_ordering: true,
                },
            )),
        };
        Ok(Response::new(oip::ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<oip::ModelStatisticsRequest>,
    ) -> Result<Response<oip::ModelStatisticsResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.view.current();
        let mut keys = Vec::new();
        if req.name.is_empty() {
            for entry in view.models.values() {
                keys.extend(entry.versions.values().map(|v| v.key()));
            }
        } else if req.version.is_empty() {
            let entry = view
                .models
                .get(&req.name)
                .ok_or_else(|| Status::not_found(format!("model {:?} not found", req.name)))?;
            keys.extend(entry.versions.values().map(|v| v.key()));
        } else {
            let (_, version) = view.resolve(&req.name, &req.version).map_err(Error::from)?;
            keys.push(version.key());
        }
        let model_stats = keys.iter().map(|k| self.shared.stats.report(k)).collect();
        Ok(Response::new(oip::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<oip::RepositoryIndexRequest>,
    ) -> Result<Response<oip::RepositoryIndexResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.view.current();
        let mut models = Vec::new();
        for entry in view.models.values() {
            for v in entry.versions.values() {
                let (state, reason) = version_state(&view, &v.key());
                if req.ready && state != "READY" {
                    continue;
                }
                models.push(oip::repository_index_response::ModelIndex {
                    name: v.model.clone(),
                    version: v.version.to_string(),
                    state: state.into(),
                    reason,
                });
            }
        }
        Ok(Response::new(oip::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<oip::RepositoryModelLoadRequest>,
    ) -> Result<Response<oip::RepositoryModelLoadResponse>, Status> {
        let req = request.into_inner();
        self.set_loaded(&req.model_name, true).await?;
        Ok(Response::new(oip::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<oip::RepositoryModelUnloadRequest>,
    ) -> Result<Response<oip::RepositoryModelUnloadResponse>, Status> {
        let req = request.into_inner();
        self.set_loaded(&req.model_name, false).await?;
        Ok(Response::new(oip::RepositoryModelUnloadResponse {}))
    }
}

impl InferenceService {
    /// Mark a model loaded or unloaded, then wait (bounded) until the workers agree.
    async fn set_loaded(&self, name: &str, loaded: bool) -> Result<()> {
        let shared = &self.shared;
        let view = shared.view.current();
        let (_, default) = view.resolve(name, "")?;
        let key = default.key();
        let mut deployment = shared.registry.deployment(name).await?;
        if deployment.loaded != loaded {
            deployment.loaded = loaded;
            shared.registry.set_deployment(&deployment).await?;
        }
        let settled = shared
            .view
            .wait_for(shared.config.load_timeout, |view| {
                if loaded {
                    // Ready, or failed on every worker that tried: either way, settled.
                    let mut states = view
                        .workers
                        .values()
                        .flat_map(|w| w.loaded.iter().filter(|l| l.key == key))
                        .map(|l| l.state)
                        .peekable();
                    let tried = states.peek().is_some();
                    let all_failed = states.all(|s| s == LoadState::Failed);
                    version_state(view, &key).0 == "READY" || (tried && all_failed)
                } else {
                    !view
                        .workers
                        .values()
                        .any(|w| w.loaded.iter().any(|l| l.key.model == name))
                }
            })
            .await;
        match settled {
            Some(view) if loaded => match version_state(&view, &key) {
                ("READY", _) => Ok(()),
                (_, reason) => Err(Error::Unavailable(format!(
                    "model {name:?} version {} failed to load: {reason}",
                    key.version
                ))),
            },
            Some(_) => Ok(()),
            None if loaded => Err(Error::Unavailable(format!(
                "model {name:?} did not become ready within {:?}",
                shared.config.load_timeout
            ))),
            None => Err(Error::Unavailable(format!(
                "model {name:?} was not unloaded within {:?}",
                shared.config.load_timeout
            ))),
        }
    }
}
