//! Data-parallel replicas (`Worker/TrainShard`): one shard of a job, stepping when the
//! scheduler says, sending gradients and applying the averaged ones it sends back.

use super::*;

pub(super) type ShardStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ShardReply, Status>> + Send>>;

pub(super) fn shard_reply(reply: pb::shard_reply::Reply) -> pb::ShardReply {
    pb::ShardReply { reply: Some(reply) }
}

/// What applying the averaged gradients led to.
pub(super) enum Applied {
    /// The batch goes on: the next shard's gradients are due ([`shard_slices`]).
    Next,
    /// The epoch ended: the answer (rank 0's with its report and checkpoint).
    Ended(Box<pb::ShardStepped>),
    /// The epoch ended and rank 0 validates it a slice at a time ([`validation_slices`]).
    Validating,
}

/// The first part of a replica's step, on the engine thread: apply the averaged gradients
/// (if any).
pub(super) fn replica_step(
    run: &mut TrainingRun,
    step: &pb::ShardStep,
    role: ShardRole,
    spec: &ModelSpec,
) -> Result<Applied> {
    if step.gradients.is_empty() {
        return Ok(Applied::Next);
    }
    let gradients = f32_from_bytes("step.gradients", &step.gradients)?;
    match run.apply_gradients(&gradients, step.loss_sum, step.correct)? {
        Step::Batch => Ok(Applied::Next),
        Step::Slice => Ok(Applied::Validating),
        Step::Epoch(r) => {
            epoch_ended(run, &r, false, role, spec).map(|s| Applied::Ended(Box::new(s)))
        }
        Step::Done(r) => {
            epoch_ended(run, &r, true, role, spec).map(|s| Applied::Ended(Box::new(s)))
        }
    }
}

/// The answer to a step that ended an epoch: rank 0's carries the report, and the
/// checkpoint when one is due.
fn epoch_ended(
    run: &TrainingRun,
    report: &EpochReport,
    done: bool,
    role: ShardRole,
    spec: &ModelSpec,
) -> Result<pb::ShardStepped> {
    let mut out = pb::ShardStepped {
        epoch_ended: true,
        ..Default::default()
    };
    if role.rank == 0 {
        out.epoch = Some(epoch_to_proto(report));
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
    Ok(out)
}

/// Validate the epoch rank 0 just ended on the engine thread, one slice per turn, and
/// answer with its report.
async fn validation_slices(
    state: &State,
    mut run: Box<TrainingRun>,
    role: ShardRole,
    spec: Arc<ModelSpec>,
) -> Result<(Box<TrainingRun>, pb::ShardStepped), Status> {
    loop {
        let spec = spec.clone();
        let (back, ended) = state
            .engine
            .exec(move || {
                let ended = match run.step()? {
                    Step::Batch | Step::Slice => None,
                    Step::Epoch(r) => Some(epoch_ended(&run, &r, false, role, &spec)?),
                    Step::Done(r) => Some(epoch_ended(&run, &r, true, role, &spec)?),
                };
                Ok((run, ended))
            })
            .await?;
        run = back;
        if let Some(stepped) = ended {
            return Ok((run, stepped));
        }
    }
}

/// Compute the replica's shard of the next batch on the engine thread, one slice per turn
/// so that inference runs in between; `busy` is the device time of the step so far (the
/// rest of a step is communication).
async fn shard_slices(
    state: &State,
    mut run: Box<TrainingRun>,
    mut busy: Duration,
) -> Result<(Box<TrainingRun>, pb::ShardStepped), Status> {
    loop {
        let (back, gradients, took) = state
            .engine
            .exec(move || {
                let started = Instant::now();
                let g = run.compute_shard_slice()?;
                Ok((run, g, started.elapsed()))
            })
            .await?;
        run = back;
        busy += took;
        if let Some(g) = gradients {
            let stepped = pb::ShardStepped {
                gradients: Some(pb::ShardGradients {
                    rows: g.rows as u32,
                    loss_sum: g.loss_sum,
                    correct: g.correct,
                    data: f32_to_bytes(&g.gradients).into(),
                    compute_ns: busy.as_nanos() as u64,
                }),
                ..Default::default()
            };
            return Ok((run, stepped));
        }
    }
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
    let _running = track_run(&state, &cancel);
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
                let step_spec = spec.clone();
                let (back, applied, busy) = state
                    .engine
                    .exec(move || {
                        let started = Instant::now();
                        let applied = replica_step(&mut taken, &step, role, &step_spec)?;
                        Ok((taken, applied, started.elapsed()))
                    })
                    .await?;
                let (back, stepped) = match applied {
                    Applied::Ended(stepped) => (back, *stepped),
                    Applied::Validating => validation_slices(&state, back, role, spec).await?,
                    Applied::Next => shard_slices(&state, back, busy).await?,
                };
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
