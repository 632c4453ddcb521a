//! `kiln.internal.v1.Worker`: the gRPC service over the worker's state.

use super::*;

pub(super) struct WorkerService {
    pub(super) state: Arc<State>,
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<pb::InferResponse>, Status> {
        let deadline =
            kiln_rpc::deadline::from_metadata(request.metadata()).map(|d| Instant::now() + d);
        // A worker whose registration lapsed is not in the routing table: it takes no work
        // until it has registered again.
        if lock(&self.state.lease).is_none() {
            return Err(Status::unavailable(format!(
                "worker {} is not registered in the cluster right now",
                self.state.id
            )));
        }
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        let inputs = req
            .inputs
            .into_iter()
            .map(tensor_from_proto)
            .collect::<kiln_core::Result<Vec<_>>>()
            .map_err(Error::from)?;
        let (batcher, rows) = {
            let served = self.state.served.read().unwrap_or_else(|p| p.into_inner());
            let s = served
                .get(&key)
                .ok_or_else(|| Error::NotLoaded(key.clone()))?;
            // Checked here, per request, so that a malformed one never joins a batch.
            let rows = s.interface.check_inputs(&inputs).map_err(Error::from)?;
            s.spec
                .family()
                .check_request(&inputs)
                .map_err(Error::from)?;
            (s.batcher.clone(), rows)
        };
        kiln_telemetry::trace::attributes(|| {
            use kiln_telemetry::trace::KeyValue;
            vec![
                KeyValue::new(
                    "kiln.model.name",
                    kiln_telemetry::trace::name_value(&key.model),
                ),
                KeyValue::new("kiln.model.version", key.version as i64),
                KeyValue::new("kiln.batch_size", rows as i64),
            ]
        });
        let reply = batcher.infer(inputs, rows, deadline).await?;
        lock(&self.state.last_used).insert(key, now_unix_ms());
        Ok(Response::new(pb::InferResponse {
            outputs: reply.outputs.into_iter().map(tensor_to_proto).collect(),
            queue_ns: reply.queue.as_nanos() as u64,
            compute_ns: reply.compute.as_nanos() as u64,
            batch_rows: reply.batch_rows as u32,
            queue_depth: batcher.queue_depth() as u32,
            truncated_rows: reply.truncated as u32,
        }))
    }

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        let batching = req.batching.map(|b| BatchingSettings {
            max_batch_size: b.max_batch_size,
            max_queue_delay_us: b.max_queue_delay_us,
            max_queue_size: b.max_queue_size,
        });
        if let Some(b) = &batching {
            if !(1..=65_536).contains(&b.max_batch_size) {
                return Err(Status::invalid_argument(
                    "batching.max_batch_size must be between 1 and 65536",
                ));
            }
            if !(1..=1_000_000).contains(&b.max_queue_size) {
                return Err(Status::invalid_argument(
                    "batching.max_queue_size must be between 1 and 1000000",
                ));
            }
        }
        load_version(&self.state, &key, batching).await?;
        Ok(Response::new(pb::LoadResponse {}))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let req = request.into_inner();
        let key = VersionKey {
            model: req.model,
            version: req.version,
        };
        unload_version(&self.state, &key).await;
        Ok(Response::new(pb::UnloadResponse {}))
    }

    type TrainStream = TrainStream;

    type GenerateStream = generate::GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if lock(&self.state.lease).is_none() {
            return Err(Status::unavailable(format!(
                "worker {} is not registered in the cluster right now",
                self.state.id
            )));
        }
        let stream = generate::start_generation(&self.state, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type TrainShardStream = ShardStream;

    async fn train_shard(
        &self,
        request: Request<tonic::Streaming<pb::ShardCommand>>,
    ) -> Result<Response<Self::TrainShardStream>, Status> {
        // One reply in flight at a time: the coordinator waits for every replica's answer
        // before its next command, so a small buffer is all a replica needs.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let state = self.state.clone();
        let commands = request.into_inner();
        tokio::spawn(async move {
            if let Err(status) = hold_replica(state, commands, tx.clone()).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn train(
        &self,
        request: Request<pb::TrainRequest>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        let stream = start_training(&self.state, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::WorkerStatus>, Status> {
        let served = self.state.served.read().unwrap_or_else(|p| p.into_inner());
        let loaded = lock(&self.state.loaded)
            .values()
            .map(|l| pb::LoadedVersion {
                model: l.key.model.clone(),
                version: l.key.version,
                state: format!("{:?}", l.state).to_uppercase(),
                reason: l.reason.clone(),
                queue_depth: served
                    .get(&l.key)
                    .map_or(0, |s| s.batcher.queue_depth() as u32),
            })
            .collect();
        Ok(Response::new(pb::WorkerStatus {
            id: self.state.id.clone(),
            backend: self.state.backend.to_owned(),
            adapter: self.state.adapter.clone(),
            loaded,
        }))
    }
}
