//! Synchronous data parallelism: one job on several workers through `Worker/TrainShard`,
//! each step's gradients averaged here and sent back to every replica.

use super::*;

/// One replica of a data-parallel run, as the coordinator holds it.
pub(super) struct Replica {
    /// The worker's id.
    id: String,
    /// Commands to it.
    commands: tokio::sync::mpsc::Sender<internal::ShardCommand>,
    /// Its answers.
    replies: tonic::Streaming<internal::ShardReply>,
}

/// The next answer of every replica, read at once. A replica that is gone (or answers
/// nothing) loses the run: its id and the reason.
pub(super) async fn replies(
    replicas: &mut [Replica],
) -> Result<Result<Vec<internal::shard_reply::Reply>, (String, String)>> {
    let answers = futures::future::join_all(replicas.iter_mut().map(|r| r.replies.message())).await;
    let mut out = Vec::with_capacity(answers.len());
    for (r, answer) in replicas.iter().zip(answers) {
        match received(answer, "an answer")? {
            Ok(internal::ShardReply { reply: Some(reply) }) => out.push(reply),
            Ok(_) => {
                return Ok(Err((
                    r.id.clone(),
                    "it ended the run without an answer".into(),
                )));
            }
            Err(reason) => return Ok(Err((r.id.clone(), reason))),
        }
    }
    Ok(Ok(out))
}

impl TrainingCoordinator {
    /// One data-parallel run of the job on up to `job.workers` workers (none of `lost`),
    /// from its checkpoint if it has one. Each step every replica applies the last batch's
    /// averaged gradients and computes its shard of the next; rank 0 reports the epochs.
    /// The first run waits for all the workers asked for; after a loss the job goes on
    /// with those left.
    pub(super) async fn attempt_parallel(
        &self,
        job: &mut JobRecord,
        spec: &ModelSpec,
        lost: &[String],
    ) -> Result<Attempt> {
        use internal::shard_command::Command;
        use internal::shard_reply::Reply;
        let wanted = job.workers as usize;
        let need = if lost.is_empty() { wanted } else { 1 };
        let available =
            |v: &kiln_registry::ClusterView| v.workers.keys().filter(|w| !lost.contains(w)).count();
        let view = self
            .view
            .wait_for(WORKER_WAIT, |v| available(v) >= need)
            .await
            .ok_or_else(|| {
                let have = available(&self.view.current());
                Error::unavailable(format!(
                    "the job asks for {wanted} workers and {have} could take it within {WORKER_WAIT:?}"
                ))
            })?;
        let mut chosen = self.least_busy(&view, lost);
        chosen.truncate(wanted);
        let world = chosen.len() as u32;
        let request = self.run_request(job, spec, &view).await?;
        let lost_worker = |worker: &str, reason: String| Attempt::WorkerLost {
            worker: worker.to_owned(),
            reason,
        };

        // Open every replica: a command channel out, a reply stream back.
        let mut replicas = Vec::with_capacity(chosen.len());
        for (rank, worker) in chosen.iter().enumerate() {
            let mut client = match connect(&worker.address).await? {
                Ok(client) => client,
                Err(reason) => return Ok(lost_worker(&worker.id, reason)),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let setup = internal::ShardCommand {
                command: Some(Command::Setup(internal::ShardSetup {
                    run: Some(request.clone()),
                    rank: rank as u32,
                    world,
                })),
            };
            if tx.send(setup).await.is_err() {
                return Err(Error::internal("a replica's command channel closed"));
            }
            let stream = match client
                .train_shard(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(response) => response.into_inner(),
                Err(s) if worker_gone(&s) => {
                    return Ok(lost_worker(&worker.id, s.message().to_owned()));
                }
                Err(s) => return Err(s.into()),
            };
            replicas.push(Replica {
                id: worker.id.clone(),
                commands: tx,
                replies: stream,
            });
        }
        let ready = match replies(&mut replicas).await? {
            Ok(replies) => replies,
            Err((id, reason)) => return Ok(lost_worker(&id, reason)),
        };
        for reply in ready {
            if !matches!(reply, Reply::Ready(_)) {
                return Err(Error::internal("a replica answered its setup out of turn"));
            }
        }
        let ids: Vec<String> = chosen.iter().map(|w| w.id.clone()).collect();
        self.started(job, &ids).await?;
        tracing::info!(job = %job.id, workers = %job.worker, "data-parallel run started");

        let mut step = internal::ShardStep::default();
        let (mut steps, mut step_time, mut communication) = (0u64, Duration::ZERO, Duration::ZERO);
        loop {
            let started = std::time::Instant::now();
            for r in &replicas {
                let command = internal::ShardCommand {
                    command: Some(Command::Step(step.clone())),
                };
                if r.commands.send(command).await.is_err() {
                    return Ok(lost_worker(&r.id, "its stream closed".into()));
                }
            }
            let answers = match replies(&mut replicas).await? {
                Ok(replies) => replies,
                Err((id, reason)) => return Ok(lost_worker(&id, reason)),
            };
            let mut stepped = Vec::with_capacity(replicas.len());
            for reply in answers {
                match reply {
                    Reply::Stepped(s) => stepped.push(s),
                    _ => return Err(Error::internal("a replica answered a step out of turn")),
                }
            }
            let lead = &mut stepped[0];
            if lead.epoch_ended {
                job.data_parallel = Some(DataParallelStats {
                    workers: world,
                    steps,
                    mean_step_ms: step_time.as_secs_f64() * 1e3 / steps.max(1) as f64,
                    mean_communication_ms: communication.as_secs_f64() * 1e3 / steps.max(1) as f64,
                });
                if let Some(m) = lead.epoch.take() {
                    self.epoch_ended(job, m).await?;
                }
                if let Some(c) = lead.checkpoint.take() {
                    self.store_checkpoint(job, spec, c).await?;
                }
                if lead.done {
                    let lead = &mut replicas[0];
                    let finish = internal::ShardCommand {
                        command: Some(Command::Finish(internal::ShardFinish {})),
                    };
                    if lead.commands.send(finish).await.is_err() {
                        return Ok(lost_worker(&lead.id, "its stream closed".into()));
                    }
                    return match received(lead.replies.message().await, "a result")? {
                        Ok(internal::ShardReply {
                            reply: Some(Reply::Result(r)),
                        }) => Ok(Attempt::Finished(r)),
                        Ok(_) => Ok(lost_worker(
                            &lead.id,
                            "it ended the run without a result".into(),
                        )),
                        Err(reason) => Ok(lost_worker(&lead.id, reason)),
                    };
                }
            }
            let shards: Vec<&internal::ShardGradients> = stepped
                .iter()
                .filter_map(|s| s.gradients.as_ref())
                .collect();
            if shards.is_empty() {
                // The update ended an epoch: the next step only computes.
                step = internal::ShardStep::default();
                continue;
            }
            if shards.len() != stepped.len() {
                return Err(Error::internal(
                    "the replicas disagree on where the epoch ends",
                ));
            }
            let parts: Vec<(usize, &[u8])> = shards
                .iter()
                .map(|g| (g.rows as usize, g.data.as_ref()))
                .collect();
            let averaged = average_gradients(&parts).map_err(|e| {
                Error::internal(format!("the replicas' gradients do not average: {e}"))
            })?;
            step = internal::ShardStep {
                gradients: Bytes::from(averaged),
                loss_sum: shards.iter().map(|g| g.loss_sum).sum(),
                correct: shards.iter().map(|g| g.correct).sum(),
            };
            let slowest = shards.iter().map(|g| g.compute_ns).max().unwrap_or(0);
            let elapsed = started.elapsed();
            steps += 1;
            step_time += elapsed;
            communication += elapsed.saturating_sub(Duration::from_nanos(slowest));
        }
    }
}
