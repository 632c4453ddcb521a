//! Training runs on this worker (`Worker/Train`): the job's data and weights prepared,
//! the run driven on the engine thread, epochs streamed back, the result returned.

use super::*;

/// Sets the run's cancel flag when the caller's stream goes away.
pub(super) struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(super) fn invalid_json(field: &str, e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

pub(super) type TrainStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::TrainProgress, Status>> + Send>>;

/// Decode and check a run's request, then build the run on the device (off tokio's
/// threads): the part of Train and TrainShard that is the same.
pub(super) async fn prepare_run(
    state: &Arc<State>,
    req: &pb::TrainRequest,
) -> Result<(TrainingRun, ModelSpec), Status> {
    let spec: ModelSpec =
        serde_json::from_slice(&req.spec_json).map_err(|e| invalid_json("spec_json", e))?;
    spec.validate().map_err(Error::from)?;
    let config: TrainingConfig =
        serde_json::from_slice(&req.config_json).map_err(|e| invalid_json("config_json", e))?;
    let init = MlpWeights::from_safetensors(&spec, &req.init_weights).map_err(Error::from)?;
    let decode = |bytes: &[u8]| -> std::result::Result<Option<Dataset>, Status> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let (features, labels, rows) = decode_dataset(bytes).map_err(Error::from)?;
        Ok(Some(Dataset {
            features,
            labels,
            rows,
        }))
    };
    let data = decode(&req.dataset)?.ok_or_else(|| Status::invalid_argument("dataset is empty"))?;
    let validation = decode(&req.validation_dataset)?;
    let test = decode(&req.test_dataset)?;
    let resume = (req.resume_epoch > 0).then(|| Resume {
        epoch: req.resume_epoch,
        optimizer_state: req.resume_optimizer_state.to_vec(),
    });
    // The run checks the rows and the config (the scheduler applied the caps already).
    let device = state.device.clone();
    // Building the run puts the model on the device: not on tokio's threads.
    let run_spec = spec.clone();
    let slice = state.training_slice;
    let run = tokio::task::spawn_blocking(move || {
        let rows = JobData {
            train: &data,
            validation: validation.as_ref(),
            test: test.as_ref(),
        };
        TrainingRun::resume(&run_spec, &init, &rows, &config, &device, resume).map(|mut run| {
            run.set_slice_budget(Some(slice));
            run
        })
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    Ok((run, spec))
}

/// Remember a run's cancel flag, so that a stopping worker can hand the run back, and
/// say in the worker's record that it trains (routing then prefers other workers). The
/// guard rewrites the record again when the run ends.
pub(super) fn track_run(
    state: &Arc<State>,
    cancel: &Arc<std::sync::atomic::AtomicBool>,
) -> RunEnds {
    let mut runs = lock(&state.runs);
    runs.retain(|r| r.strong_count() > 0);
    runs.push(Arc::downgrade(cancel));
    drop(runs);
    state.report.notify_one();
    RunEnds {
        cancel: CancelOnDrop(cancel.clone()),
        state: state.clone(),
    }
}

/// Held while a run lasts: at its end the run's flag is set (it no longer counts as
/// training) and the worker's record is rewritten.
pub(super) struct RunEnds {
    cancel: CancelOnDrop,
    state: Arc<State>,
}

impl Drop for RunEnds {
    fn drop(&mut self) {
        self.cancel
            .0
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.state.report.notify_one();
    }
}

pub(super) async fn start_training(
    state: &Arc<State>,
    req: pb::TrainRequest,
) -> Result<TrainStream, Status> {
    let (run, spec) = prepare_run(state, &req).await?;
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = track_run(state, &cancel);
    let events = state.engine.train(run, cancel.clone()).await?;
    tracing::info!(job = %req.job_id, "training started");
    let stream = futures::stream::unfold(
        (events, running, spec, false),
        |(mut events, guard, spec, finished)| async move {
            if finished {
                return None;
            }
            let item = match events.recv().await? {
                TrainingEvent::Epoch(report) => (
                    Ok(pb::TrainProgress {
                        progress: Some(pb::train_progress::Progress::Epoch(epoch_to_proto(
                            &report,
                        ))),
                    }),
                    false,
                ),
                TrainingEvent::Finished(outcome) => (
                    result_to_proto(&outcome, &spec).map(|r| pb::TrainProgress {
                        progress: Some(pb::train_progress::Progress::Result(r)),
                    }),
                    true,
                ),
                TrainingEvent::Checkpoint(epoch, weights, state) => {
                    match weights.to_safetensors(&spec) {
                        Ok(bytes) => (
                            Ok(pb::TrainProgress {
                                progress: Some(pb::train_progress::Progress::Checkpoint(
                                    pb::TrainCheckpoint {
                                        epoch,
                                        weights: bytes.into(),
                                        optimizer_state: state.into(),
                                    },
                                )),
                            }),
                            false,
                        ),
                        Err(e) => (Err(Status::internal(e.to_string())), true),
                    }
                }
                TrainingEvent::Stopped(e) => (Err(Status::from(e)), true),
            };
            Some((item.0, (events, guard, spec, item.1)))
        },
    );
    Ok(Box::pin(stream))
}

/// A finished run's result on the wire.
pub(super) fn result_to_proto(
    outcome: &TrainingOutcome,
    spec: &ModelSpec,
) -> Result<pb::TrainResult, Status> {
    let weights = outcome
        .weights
        .to_safetensors(spec)
        .map_err(|e| Status::internal(e.to_string()))?;
    let preprocessing_json = outcome
        .standardization
        .as_ref()
        .and_then(|p| serde_json::to_vec(p).ok())
        .unwrap_or_default();
    Ok(pb::TrainResult {
        weights: weights.into(),
        preprocessing_json: preprocessing_json.into(),
        stopped_early: outcome.stopped_early,
        test: outcome
            .test
            .as_ref()
            .map(|t| kiln_proto::kiln::v1::EvaluationMetrics {
                loss: t.loss,
                accuracy: t.accuracy,
                rows: t.rows,
            }),
        best_epoch: outcome.best_epoch,
    })
}
