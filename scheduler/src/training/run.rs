//! Running a job: on one worker through `Worker/Train`, resumed from its checkpoint on
//! another when a worker is lost (up to a limit), recording epochs and the result.

use super::*;

/// How one run of a job on a worker ended.
pub(super) enum Attempt {
    /// The run finished with this result.
    Finished(internal::TrainResult),
    /// The worker went away mid-run.
    WorkerLost {
        /// Its id.
        worker: String,
        /// What was seen.
        reason: String,
    },
}

/// Whether a failed call means the worker is gone (crashed, unreachable, shutting down)
/// rather than that the job failed there.
pub(super) fn worker_gone(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Connect to the worker at `address` (in this process without a socket, when it runs
/// here). The outer error is a bad address (a job error); the inner one says why the worker
/// could not be reached (the worker is lost).
pub(super) async fn connect(
    address: &str,
) -> Result<Result<WorkerClient<kiln_rpc::local::Transport>, String>> {
    Ok(match kiln_rpc::channel::connect_transport(address).await {
        Ok(channel) => Ok(WorkerClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)),
        Err(kiln_rpc::Error::Unreachable { detail, .. }) => Err(format!("unreachable: {detail}")),
        Err(_) => return Err(Error::internal("a worker's address is malformed")),
    })
}

/// One message read from a worker's stream: the message, or (inner error) why the worker
/// counts as lost — its stream ended before `awaited`, or it went away; any other failure
/// is the job's (outer error).
pub(super) fn received<T>(
    message: Result<Option<T>, Status>,
    awaited: &str,
) -> Result<Result<T, String>> {
    match message {
        Ok(Some(m)) => Ok(Ok(m)),
        Ok(None) => Ok(Err(format!("it ended the run without {awaited}"))),
        Err(s) if worker_gone(&s) => Ok(Err(s.message().to_owned())),
        Err(s) => Err(s.into()),
    }
}

impl TrainingCoordinator {
    pub(super) async fn run(
        self: Arc<Self>,
        mut job: JobRecord,
        spec: ModelSpec,
        mut cancelled: watch::Receiver<bool>,
    ) {
        use pb::training_event::Event;
        let outcome = tokio::select! {
            result = self.execute(&mut job, &spec) => result,
            _ = cancelled.wait_for(|c| *c) => Err(Error::cancelled("cancelled by request")),
        };
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed)
            && matches!(&outcome, Err(s) if s.code() == tonic::Code::Cancelled)
        {
            tracing::info!(job = %job.id, "scheduler stopping; the job is left for the next one");
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job.id);
            return;
        }
        job.finished_unix_ms = now_unix_ms();
        let final_event = match outcome {
            Ok(version) => {
                job.state = JobState::Succeeded;
                job.result_version = Some(version.version);
                event(job.state, Event::Completed(version))
            }
            Err(s) if s.code() == tonic::Code::Cancelled => {
                job.state = JobState::Cancelled;
                job.reason = "cancelled by request".into();
                event(job.state, Event::Cancelled(job.reason.clone()))
            }
            Err(s) => {
                job.state = JobState::Failed;
                job.reason = Status::from(s).message().to_owned();
                event(job.state, Event::Failed(job.reason.clone()))
            }
        };
        if let Err(e) = self.registry.put_job(&job).await {
            tracing::error!(job = %job.id, error = %e, "cannot record the job's end");
        }
        tracing::info!(job = %job.id, state = ?job.state, "training job ended");
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            let i = match job.state {
                JobState::Succeeded => 0,
                JobState::Failed => 1,
                _ => 2,
            };
            stats.ended[i] += 1;
        }
        self.publish(&job.id, final_event);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.id);
    }

    /// Train on a worker and register the result; the returned version is served. A worker
    /// lost mid-run (its connection breaks, or it shuts down) hands the job to another
    /// worker, which goes on from the last checkpoint.
    pub(super) async fn execute(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
    ) -> Result<pb::ModelVersion> {
        use pb::training_event::Event;
        let mut lost: Vec<String> = Vec::new();
        let result = loop {
            match self.attempt(job, spec, &lost).await? {
                Attempt::Finished(result) => break result,
                Attempt::WorkerLost { worker, reason } => {
                    lost.push(worker.clone());
                    let from = job.checkpoint.as_ref().map_or(0, |c| c.epoch);
                    if lost.len() > MAX_WORKER_LOSSES {
                        return Err(Error::unavailable(format!(
                            "worker {worker} was lost ({reason}); the job lost {} workers and gives up",
                            lost.len()
                        )));
                    }
                    tracing::warn!(job = %job.id, %worker, %reason, from, "worker lost; resuming the job");
                    job.history.retain(|r| r.epoch <= from);
                    self.registry.put_job(job).await.map_err(Error::from)?;
                    self.publish(
                        &job.id,
                        event(
                            JobState::Running,
                            Event::Resumed(pb::Resumed {
                                reason: format!("worker {worker} was lost: {reason}"),
                                from_epoch: from,
                            }),
                        ),
                    );
                }
            }
        };
        job.stopped_early = result.stopped_early;
        job.best_epoch = result.best_epoch;
        job.test = result.test.as_ref().map(|t| EvaluationReport {
            loss: t.loss,
            accuracy: t.accuracy,
            rows: t.rows,
        });
        let preprocessing: Option<Standardization> = if result.preprocessing_json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&result.preprocessing_json)
                    .map_err(|e| Error::internal(e.to_string()))?,
            )
        };
        // Check the weights before they are stored: the worker's answer is input too.
        MlpWeights::from_safetensors(spec, &result.weights).map_err(Error::from)?;
        let artifact = self
            .artifacts
            .put(result.weights)
            .await
            .map_err(Error::from)?;
        if let Some(new) = &job.new_model {
            let created = self
                .registry
                .create_model(NewModel {
                    name: job.model_name.clone(),
                    spec: new.spec.clone(),
                    signature: new.signature.clone(),
                    description: format!("trained by {}", job.id),
                })
                .await;
            match created {
                Ok(_) | Err(kiln_registry::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(Error::from(e)),
            }
        }
        // The metrics of the epoch whose weights are registered, and the test metrics.
        let mut metrics = std::collections::BTreeMap::new();
        let best = job
            .history
            .iter()
            .find(|r| r.epoch == job.best_epoch)
            .or(job.history.last());
        if let Some(last) = best {
            metrics.insert("train_loss".to_owned(), last.train_loss);
            let optional = [
                ("train_accuracy", last.train_accuracy),
                ("validation_loss", last.validation_loss),
                ("validation_accuracy", last.validation_accuracy),
            ];
            for (name, value) in optional {
                if let Some(v) = value {
                    metrics.insert(name.to_owned(), v);
                }
            }
        }
        if let Some(t) = &job.test {
            metrics.insert("test_loss".to_owned(), t.loss);
            if let Some(a) = t.accuracy {
                metrics.insert("test_accuracy".to_owned(), a);
            }
        }
        let version = self
            .registry
            .register_version(
                &job.model_name,
                NewVersion {
                    artifact,
                    source: format!("job:{}", job.id),
                    metrics,
                    preprocessing,
                    files: Default::default(),
                },
            )
            .await
            .map_err(Error::from)?;
        if let Some(alias) = &job.alias {
            self.registry
                .set_alias(&job.model_name, alias, version.version)
                .await
                .map_err(Error::from)?;
        }
        let model = self
            .registry
            .get_model(&job.model_name)
            .await
            .map_err(Error::from)?;
        Ok(version_to_proto(
            &version,
            &model.spec,
            &model.signature,
            "LOADING",
        ))
    }

    /// One run of the job on one worker (not one of `lost`), from its checkpoint if it has
    /// one. Errors of the job itself end it; a lost worker is reported for another try.
    pub(super) async fn attempt(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        lost: &[String],
    ) -> Result<Attempt> {
        // A job stays queued until a worker is there (e.g. right after start-up), bounded.
        let view = self
            .view
            .wait_for(WORKER_WAIT, |v| v.workers.keys().any(|w| !lost.contains(w)))
            .await
            .ok_or_else(|| {
                Error::unavailable(format!("no worker registered within {WORKER_WAIT:?}"))
            })?;
        if job.workers > 1 {
            return self.attempt_parallel(job, spec, lost).await;
        }
        // The worker running the fewest jobs right now (all equal: the first by id).
        let worker = self
            .least_busy(&view, lost)
            .into_iter()
            .next()
            .ok_or_else(|| Error::unavailable("no worker is available to train"))?;
        let request = self.run_request(job, spec, &view).await?;
        let lost_worker = |reason: String| Attempt::WorkerLost {
            worker: worker.id.clone(),
            reason,
        };
        let mut client = match connect(&worker.address).await? {
            Ok(client) => client,
            Err(reason) => return Ok(lost_worker(reason)),
        };
        let mut stream = match client.train(request).await {
            Ok(response) => response.into_inner(),
            Err(s) if worker_gone(&s) => return Ok(lost_worker(s.message().to_owned())),
            Err(s) => return Err(s.into()),
        };
        self.started(job, std::slice::from_ref(&worker.id)).await?;
        loop {
            let message = match received(stream.message().await, "a result")? {
                Ok(message) => message,
                Err(reason) => return Ok(lost_worker(reason)),
            };
            match message.progress {
                Some(internal::train_progress::Progress::Epoch(m)) => {
                    self.epoch_ended(job, m).await?;
                }
                Some(internal::train_progress::Progress::Checkpoint(c)) => {
                    self.store_checkpoint(job, spec, c).await?;
                }
                Some(internal::train_progress::Progress::Result(r)) => {
                    return Ok(Attempt::Finished(r));
                }
                None => {}
            }
        }
    }
    /// The workers not in `lost`: those holding no latency-critical replicas first (ready
    /// versions of deployments that avoid training, see
    /// `DeploymentRecord::avoids_training`), then those running the fewest jobs, then by
    /// id. Jobs per worker come from the jobs this coordinator runs (no store read).
    pub(super) fn least_busy(
        &self,
        view: &kiln_registry::ClusterView,
        lost: &[String],
    ) -> Vec<kiln_core::records::WorkerRecord> {
        let busy: HashMap<String, usize> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|r| r.workers.iter().cloned())
            .fold(HashMap::new(), |mut m, w| {
                *m.entry(w).or_default() += 1;
                m
            });
        let mut workers: Vec<_> = view
            .workers
            .values()
            .filter(|w| !lost.contains(&w.id))
            .cloned()
            .collect();
        let serving = |w: &kiln_core::records::WorkerRecord| {
            w.loaded.iter().any(|l| {
                l.state == kiln_core::records::LoadState::Ready
                    && view.deployment(&l.key.model).avoids_training()
            })
        };
        workers.sort_by_key(|w| {
            (
                serving(w),
                busy.get(&w.id).copied().unwrap_or(0),
                w.id.clone(),
            )
        });
        workers
    }

    /// What a worker needs to run the job: weights to start from (the checkpoint's, a
    /// version's, or new seeded ones), the rows and the config.
    pub(super) async fn run_request(
        &self,
        job: &JobRecord,
        spec: &ModelSpec,
        view: &kiln_registry::ClusterView,
    ) -> Result<internal::TrainRequest> {
        let (init, resume_epoch, resume_optimizer_state) = match &job.checkpoint {
            Some(c) => (
                self.artifacts.get(&c.weights).await.map_err(Error::from)?,
                c.epoch,
                self.artifacts
                    .get(&c.optimizer_state)
                    .await
                    .map_err(Error::from)?,
            ),
            None => {
                let init = match &job.continue_from {
                    Some(reference) => {
                        let (name, selector) = reference.split_once(':').unwrap_or((reference, ""));
                        let (_, version) = view.resolve(name, selector).map_err(Error::from)?;
                        self.artifacts
                            .get(&version.artifact)
                            .await
                            .map_err(Error::from)?
                    }
                    None => Bytes::from(
                        MlpWeights::seeded(spec, job.config.seed)
                            .to_safetensors(spec)
                            .map_err(Error::from)?,
                    ),
                };
                (init, 0, Bytes::new())
            }
        };
        let dataset = self.artifacts.get(&job.data).await.map_err(Error::from)?;
        let validation_dataset = match &job.validation_data {
            Some(a) => self.artifacts.get(a).await.map_err(Error::from)?,
            None => Bytes::new(),
        };
        let test_dataset = match &job.test_data {
            Some(a) => self.artifacts.get(a).await.map_err(Error::from)?,
            None => Bytes::new(),
        };
        Ok(internal::TrainRequest {
            job_id: job.id.clone(),
            spec_json: Bytes::from(
                serde_json::to_vec(spec).map_err(|e| Error::internal(e.to_string()))?,
            ),
            init_weights: init,
            config_json: Bytes::from(
                serde_json::to_vec(&job.config).map_err(|e| Error::internal(e.to_string()))?,
            ),
            dataset,
            validation_dataset,
            test_dataset,
            resume_epoch,
            resume_optimizer_state,
        })
    }

    /// Record that the job runs now, on `workers`, and tell its watchers.
    pub(super) async fn started(&self, job: &mut JobRecord, workers: &[String]) -> Result<()> {
        job.state = JobState::Running;
        job.worker = workers.join(",");
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&job.id)
        {
            r.workers = workers.to_vec();
        }
        self.registry.put_job(job).await.map_err(Error::from)?;
        self.publish(
            &job.id,
            event(
                JobState::Running,
                pb::training_event::Event::Started(job.worker.clone()),
            ),
        );
        Ok(())
    }

    /// Store a checkpoint's weights and optimizer state, and point the job at them.
    pub(super) async fn store_checkpoint(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        c: internal::TrainCheckpoint,
    ) -> Result<()> {
        MlpWeights::from_safetensors(spec, &c.weights).map_err(Error::from)?;
        let weights = self.artifacts.put(c.weights).await.map_err(Error::from)?;
        let optimizer_state = self
            .artifacts
            .put(c.optimizer_state)
            .await
            .map_err(Error::from)?;
        job.checkpoint = Some(CheckpointRecord {
            epoch: c.epoch,
            weights,
            optimizer_state,
        });
        self.registry.put_job(job).await.map_err(Error::from)
    }

    /// An epoch ended: keep its report and tell the watchers.
    pub(super) async fn epoch_ended(&self, job: &mut JobRecord, m: pb::EpochMetrics) -> Result<()> {
        tracing::info!(
            job = %job.id,
            epoch = m.epoch,
            train_loss = m.train_loss,
            validation_loss = m.validation_loss,
            validation_accuracy = m.validation_accuracy,
            elapsed_ms = m.elapsed_ms,
            "epoch ended"
        );
        let previous = job.history.last().map_or(0, |e| e.elapsed_ms);
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .epoch_seconds
            .observe(m.elapsed_ms.saturating_sub(previous) as f64 / 1000.0);
        job.history.push(epoch_from_proto(&m));
        self.registry.put_job(job).await.map_err(Error::from)?;
        self.publish(
            &job.id,
            event(JobState::Running, pb::training_event::Event::Epoch(m)),
        );
        Ok(())
    }
}
