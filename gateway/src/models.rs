//! `kiln.v1.Models`: create models, list them, read and export versions, set aliases.

use std::sync::Arc;

use bytes::Bytes;
use kiln_core::MlpWeights;
use kiln_core::spec::validate_name;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::models_server::Models;
use kiln_registry::{ClusterView, NewModel, NewVersion};
use tonic::{Request, Response, Status};

use crate::convert::{
    signature_from_proto, signature_to_proto, spec_from_proto, spec_to_proto, version_to_proto,
};
use crate::oip::version_state;
use crate::{Error, Result, Shared};

/// The model registry service.
pub struct ModelsService {
    pub(crate) shared: Arc<Shared>,
}

fn version_message(view: &ClusterView, name: &str, selector: &str) -> Result<pb::ModelVersion> {
    let (entry, version) = view.resolve(name, selector)?;
    let (state, _) = version_state(view, &version.key());
    Ok(version_to_proto(
        version,
        &entry.record.spec,
        &entry.record.signature,
        state,
    ))
}

impl ModelsService {
    async fn create(&self, req: pb::CreateModelRequest) -> Result<pb::ModelVersion> {
        let shared = &self.shared;
        validate_name("name", &req.name)?;
        let spec = spec_from_proto(req.spec.as_ref())?;
        let signature = signature_from_proto(req.signature.as_ref())?;
        let (weights, source) = match req.weights {
            Some(pb::create_model_request::Weights::Safetensors(bytes)) => {
                let weights = MlpWeights::from_safetensors(&spec, &bytes)?;
                (weights, "import".to_owned())
            }
            Some(pb::create_model_request::Weights::Seed(seed)) => {
                (MlpWeights::seeded(&spec, seed), format!("seed:{seed}"))
            }
            None => (MlpWeights::seeded(&spec, 0), "seed:0".to_owned()),
        };
        // Re-encode rather than store the upload as is: the artifact then always carries
        // the spec in its metadata and the canonical tensor layout.
        let artifact_bytes = weights.to_safetensors(&spec)?;

        match shared.registry.get_model(&req.name).await {
            Ok(existing) => {
                if existing.spec != spec || existing.signature != signature {
                    return Err(Error::AlreadyExists(format!(
                        "model {:?} exists with a different spec or signature; choose another name",
                        req.name
                    )));
                }
            }
            Err(kiln_registry::Error::NotFound { .. }) => {
                let created = shared
                    .registry
                    .create_model(NewModel {
                        name: req.name.clone(),
                        spec: spec.clone(),
                        signature: signature.clone(),
                        description: req.description.clone(),
                    })
                    .await;
                // Losing a race to an identical create is fine: both become versions.
                match created {
                    Ok(_) | Err(kiln_registry::Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        let artifact = shared.artifacts.put(Bytes::from(artifact_bytes)).await?;
        let version = shared
            .registry
            .register_version(&req.name, NewVersion::new(artifact, source))
            .await?;
        Ok(version_to_proto(&version, &spec, &signature, "LOADING"))
    }
}

/// A broken upload stream, as the caller sees it.
fn stream_failed(status: Status) -> Error {
    Error::Invalid(format!("the import stream failed: {}", status.message()))
}

/// Most bytes one import may upload (every file together).
pub const MAX_IMPORT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

impl ModelsService {
    /// Gather an import stream into its files, checking names and sizes as they come.
    async fn receive_import(
        stream: &mut tonic::Streaming<pb::ImportModelRequest>,
    ) -> Result<(pb::ImportHeader, std::collections::BTreeMap<String, Bytes>)> {
        use pb::import_model_request::Part;
        let header = match stream.message().await.map_err(stream_failed)? {
            Some(pb::ImportModelRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(Error::Invalid(
                    "an import starts with its header (name, description)".into(),
                ));
            }
        };
        validate_name("name", &header.name)?;
        if header.description.len() > 1024 {
            return Err(Error::Invalid(format!(
                "description is {} bytes; at most 1024 are allowed",
                header.description.len()
            )));
        }
        let mut files: std::collections::BTreeMap<String, bytes::BytesMut> = Default::default();
        let mut total = 0u64;
        let mut current = String::new();
        while let Some(message) = stream.message().await.map_err(stream_failed)? {
            let Some(Part::Chunk(chunk)) = message.part else {
                return Err(Error::Invalid("an import has one header, first".into()));
            };
            let path = chunk.path;
            if path != current {
                let known =
                    kiln_core::hf::wanted_files(files.get(kiln_core::hf::MODULES).map(|b| &b[..]));
                let safe = !path.is_empty()
                    && path.len() <= 256
                    && !path.starts_with('/')
                    && path
                        .split('/')
                        .all(|p| !p.is_empty() && p != "." && p != "..");
                if !safe {
                    return Err(Error::Invalid(format!(
                        "file path {path:?} must be relative, without . or .. parts, at most 256 bytes"
                    )));
                }
                if files.contains_key(&path) {
                    return Err(Error::Invalid(format!(
                        "file {path:?} is sent twice; send each file's chunks together"
                    )));
                }
                if !known.contains(&path) || files.len() >= kiln_core::hf::MAX_FILES {
                    return Err(Error::Invalid(format!(
                        "file {path:?} is not one Kiln reads ({})",
                        known.join(", ")
                    )));
                }
                current = path.clone();
            }
            total += chunk.data.len() as u64;
            if total > MAX_IMPORT_BYTES {
                return Err(Error::Overloaded(format!(
                    "the import is over {} GiB",
                    MAX_IMPORT_BYTES >> 30
                )));
            }
            files
                .entry(path)
                .or_default()
                .extend_from_slice(&chunk.data);
        }
        Ok((
            header,
            files.into_iter().map(|(k, v)| (k, v.freeze())).collect(),
        ))
    }

    async fn import(
        &self,
        mut stream: tonic::Streaming<pb::ImportModelRequest>,
    ) -> Result<pb::ModelVersion> {
        let (header, files) = Self::receive_import(&mut stream).await?;
        // Checked in full before anything is stored: a refusal registers nothing.
        let imported = kiln_core::hf::import(&files)?;
        let spec = imported.spec;
        let signature = kiln_core::spec::Signature::default();
        let shared = &self.shared;
        match shared.registry.get_model(&header.name).await {
            Ok(existing) => {
                if existing.spec != spec {
                    return Err(Error::AlreadyExists(format!(
                        "model {:?} exists with a different architecture; choose another name",
                        header.name
                    )));
                }
            }
            Err(kiln_registry::Error::NotFound { .. }) => {
                let created = shared
                    .registry
                    .create_model(NewModel {
                        name: header.name.clone(),
                        spec: spec.clone(),
                        signature: signature.clone(),
                        description: header.description.clone(),
                    })
                    .await;
                match created {
                    Ok(_) | Err(kiln_registry::Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        let artifact = shared.artifacts.put(imported.weights).await?;
        let mut new = NewVersion::new(artifact, "import");
        for (name, bytes) in imported.files {
            new.files.insert(name, shared.artifacts.put(bytes).await?);
        }
        let version = shared.registry.register_version(&header.name, new).await?;
        Ok(version_to_proto(&version, &spec, &signature, "LOADING"))
    }
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn import_model(
        &self,
        request: Request<tonic::Streaming<pb::ImportModelRequest>>,
    ) -> Result<Response<pb::CreateModelResponse>, Status> {
        let version = self.import(request.into_inner()).await?;
        Ok(Response::new(pb::CreateModelResponse {
            version: Some(version),
        }))
    }

    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::CreateModelResponse>, Status> {
        let version = self.create(request.into_inner()).await?;
        Ok(Response::new(pb::CreateModelResponse {
            version: Some(version),
        }))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        // A fresh read, not the watched view: a listing right after a create shows it.
        let view = self.shared.registry.view().await.map_err(Error::from)?;
        let live = self.shared.view.current();
        let models = view
            .models
            .values()
            .map(|entry| {
                let r = &entry.record;
                pb::ModelSummary {
                    name: r.name.clone(),
                    spec: Some(spec_to_proto(&r.spec)),
                    signature: Some(signature_to_proto(&r.signature)),
                    description: r.description.clone(),
                    versions: entry
                        .versions
                        .values()
                        .map(|v| {
                            version_to_proto(
                                v,
                                &r.spec,
                                &r.signature,
                                version_state(&live, &v.key()).0,
                            )
                        })
                        .collect(),
                    aliases: entry
                        .aliases
                        .values()
                        .map(|a| pb::Alias {
                            model: a.model.clone(),
                            alias: a.alias.clone(),
                            version: a.version,
                            canary_version: a.canary.map_or(0, |c| c.version),
                            canary_weight: a.canary.map_or(0.0, |c| c.weight),
                        })
                        .collect(),
                    created_unix_ms: r.created_unix_ms,
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model_version(
        &self,
        request: Request<pb::GetModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let req = request.into_inner();
        let view = self.shared.registry.view().await.map_err(Error::from)?;
        Ok(Response::new(version_message(
            &view,
            &req.name,
            &req.version,
        )?))
    }

    async fn export_weights(
        &self,
        request: Request<pb::ExportWeightsRequest>,
    ) -> Result<Response<pb::ExportWeightsResponse>, Status> {
        let req = request.into_inner();
        let view = self.shared.registry.view().await.map_err(Error::from)?;
        let message = version_message(&view, &req.name, &req.version)?;
        let (_, version) = view.resolve(&req.name, &req.version).map_err(Error::from)?;
        let bytes = self
            .shared
            .artifacts
            .get(&version.artifact)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ExportWeightsResponse {
            version: Some(message),
            safetensors: bytes.to_vec(),
        }))
    }

    async fn set_alias(
        &self,
        request: Request<pb::SetAliasRequest>,
    ) -> Result<Response<pb::Alias>, Status> {
        let req = request.into_inner();
        validate_name("name", &req.name).map_err(Error::from)?;
        let canary = match (req.canary_version, req.canary_weight) {
            (0, 0.0) => None,
            (0, _) => {
                return Err(Status::invalid_argument(
                    "canary_weight is set but canary_version is not",
                ));
            }
            (version, weight) => Some(kiln_core::records::Canary { version, weight }),
        };
        let alias = self
            .shared
            .registry
            .set_alias_with_canary(&req.name, &req.alias, req.version, canary)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::Alias {
            model: alias.model,
            alias: alias.alias,
            version: alias.version,
            canary_version: alias.canary.map_or(0, |c| c.version),
            canary_weight: alias.canary.map_or(0.0, |c| c.weight),
        }))
    }

    async fn set_deployment(
        &self,
        request: Request<pb::SetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        use kiln_core::records::DeviceClass;
        let req = request.into_inner();
        validate_name("name", &req.name).map_err(Error::from)?;
        if req.replicas > 1024 {
            return Err(Status::invalid_argument(format!(
                "replicas must be between 0 (every eligible worker) and 1024, got {}",
                req.replicas
            )));
        }
        let device = match pb::DeviceClass::try_from(req.device) {
            Ok(pb::DeviceClass::Any) => DeviceClass::Any,
            Ok(pb::DeviceClass::Gpu) => DeviceClass::Gpu,
            Ok(pb::DeviceClass::Cpu) => DeviceClass::Cpu,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "device {} is not ANY (0), GPU (1) or CPU (2)",
                    req.device
                )));
            }
        };
        if req.shard_rows > 1 << 20 {
            return Err(Status::invalid_argument(format!(
                "shard_rows must be between 0 (the model's max_batch_size) and 1048576, got {}",
                req.shard_rows
            )));
        }
        let registry = &self.shared.registry;
        // The model must exist; its deployment may not yet.
        registry.get_model(&req.name).await.map_err(Error::from)?;
        let mut deployment = registry.deployment(&req.name).await.map_err(Error::from)?;
        deployment.replicas = (req.replicas > 0).then_some(req.replicas);
        deployment.device = device;
        deployment.shard_rows = (req.shard_rows > 0).then_some(req.shard_rows);
        if let Some(avoid) = req.avoid_training {
            deployment.avoid_training = Some(avoid);
        }
        if let Some(b) = req.batching {
            if !(1..=65_536).contains(&b.max_batch_size) {
                return Err(Status::invalid_argument(format!(
                    "batching.max_batch_size must be between 1 and 65536, got {}",
                    b.max_batch_size
                )));
            }
            if !(1..=1_000_000).contains(&b.max_queue_size) {
                return Err(Status::invalid_argument(format!(
                    "batching.max_queue_size must be between 1 and 1000000, got {}",
                    b.max_queue_size
                )));
            }
            if b.max_queue_delay_us > 10_000_000 {
                return Err(Status::invalid_argument(format!(
                    "batching.max_queue_delay_us must be at most 10000000 (10 s), got {}",
                    b.max_queue_delay_us
                )));
            }
            deployment.batching = kiln_core::records::BatchingSettings {
                max_batch_size: b.max_batch_size,
                max_queue_delay_us: b.max_queue_delay_us,
                max_queue_size: b.max_queue_size,
            };
        }
        registry
            .set_deployment(&deployment)
            .await
            .map_err(Error::from)?;
        let avoid_training = deployment.avoids_training();
        Ok(Response::new(pb::Deployment {
            model: deployment.model,
            replicas: deployment.replicas.unwrap_or(0),
            device: req.device,
            loaded: deployment.loaded,
            shard_rows: deployment.shard_rows.unwrap_or(0),
            avoid_training,
            batching: Some(pb::Batching {
                max_batch_size: deployment.batching.max_batch_size,
                max_queue_delay_us: deployment.batching.max_queue_delay_us,
                max_queue_size: deployment.batching.max_queue_size,
            }),
        }))
    }
}
