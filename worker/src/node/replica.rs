//! Data-parallel replicas (`Worker/TrainShard`): one shard of a job, stepping when the
//! scheduler says, sending gradients and applying the averaged ones it sends back.

use super::*;

pub(super) type ShardStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ShardReply, Status>> + Send>>;

pub(super) fn shard_reply(reply: pb::shard_reply::Reply) -> pb::ShardReply {
    pb::ShardReply { reply: Some(reply) }
}

/// One step of a replica, on the engine thread: apply the averaged gradients (if any),
/// report the epoch they ended (rank 0 with its checkpoint), else compute the next shard.
pub(super) fn replica_step(
    run: &mut TrainingRun,
    step: &pb::ShardStep,
    role: ShardRole,
    spec: &ModelSpec,
) -> Result<pb::ShardStepped> {
    // The replica's busy time (update and gradients): the rest of a step is communication.
    let started = Instant::now();
    let mut out = pb::ShardStepped::default();
    if !step.gradients.is_empty() {
        let gradients = f32_from_bytes("step.gradients", &step.gradients)?;
        let ended = match run.apply_gradients(&gradients, step.loss_sum, step.correct)? {
            Step::Batch => None,
            Step::Epoch(r) => Some((r, false)),
            Step::Done(r) => Some((r, true)),
        };
        if let Some((report, done)) = ended {
            out.epoch_ended = true;
            if role.rank == 0 {
                out.epoch = Some(epoch_to_proto(&report));
                out.done = done;
                if !done && run.checkpoint_due() {
                    let (epoch, weights, state) = run.checkpoint()?;
                    out.checkpoint = Some(pb::TrainCheckpoint {
                        epoch,
                        weights: weights.to_safetensors(spec)?.into(),
                        optimizer_state: state.into(),
                    });
                }
            }
            return Ok(out);
        }
    }
    let g = run.compute_shard()?;
    out.gradients = Some(pb::ShardGradients {
        rows: g.rows as u32,
        loss_sum: g.loss_sum,
        correct: g.correct,
        data: f32_to_bytes(&g.gradients).into(),
        compute_ns: started.elapsed().as_nanos() as u64,
    });
    Ok(out)
}

/// Hold one replica of a data-parallel run for as long as the coordinator's stream lasts.
/// The run goes to the engine thread for each step and comes back (a pointer moves, not
/// its tensors), so inference on the same device goes on between steps.
pub(super) async fn hold_replica(
    state: Arc<State>,
    mut commands: tonic::Streaming<pb::ShardCommand>,
    replies: tokio::sync::mpsc::Sender<Result<pb::ShardReply, Status>>,
) -> Result<(), Status> {
    use pb::shard_command::Command;
    use pb::shard_reply::Reply;
    let setup = match commands.message().await? {
        Some(pb::ShardCommand {
            command: Some(Command::Setup(setup)),
        }) => setup,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of TrainShard must be a setup",
            ));
        }
    };
    if setup.world == 0 || setup.world > MAX_REPLICAS || setup.rank >= setup.world {
        return Err(Status::invalid_argument(format!(
            "setup.world must be 1 to {MAX_REPLICAS} and setup.rank below it; got rank {} of {}",
            setup.rank, setup.world
        )));
    }
    let request = setup
        .run
        .ok_or_else(|| Status::invalid_argument("setup.run is missing"))?;
    let role = ShardRole {
        rank: setup.rank,
        world: setup.world,
    };
    let (run, spec) = prepare_run(&state, &request).await?;
    let mut run = Some(Box::new(run.into_replica(role)?));
    let spec = Arc::new(spec);
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    track_run(&state, &cancel);
    tracing::info!(job = %request.job_id, rank = role.rank, world = role.world, "data-parallel replica ready");
    if replies
        .send(Ok(shard_reply(Reply::Ready(pb::ShardReady {}))))
        .await
        .is_err()
    {
        return Ok(());
    }
    while let Some(command) = commands.message().await? {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::unavailable(format!(
                "worker {} is shutting down; the run goes back to the scheduler",
                state.id
            )));
        }
        let mut taken = run
            .take()
            .ok_or_else(|| Status::failed_precondition("the replica's run already finished"))?;
        let spec = spec.clone();
        let reply = match command.command {
            Some(Command::Step(step)) => {
                let (back, stepped) = state
                    .engine
                    .exec(move || {
                        let stepped = replica_step(&mut taken, &step, role, &spec)?;
                        Ok((taken, stepped))
                    })
                    .await?;
                run = Some(back);
                Reply::Stepped(stepped)
            }
            Some(Command::Finish(_)) if role.rank == 0 => {
                let outcome = state.engine.exec(move || taken.finish()).await?;
                Reply::Result(result_to_proto(&outcome, &spec)?)
            }
            Some(Command::Finish(_)) => {
                return Err(Status::invalid_argument(
                    "only rank 0 hands over a data-parallel run's result",
                ));
            }
            Some(Command::Setup(_)) | None => {
                return Err(Status::invalid_argument(
                    "a replica takes one setup, then steps",
                ));
            }
        };
        if replies.send(Ok(shard_reply(reply))).await.is_err() {
            break;
        }
    }
    Ok(())
}
