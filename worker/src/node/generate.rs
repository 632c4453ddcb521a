//! Generation on this worker (`Worker/Generate`): the request checked and queued on the
//! engine's generator for its version, its events streamed back as they happen, and the
//! generation metrics (time to first token, time between tokens, queue time) recorded.

use super::*;
use crate::generation::{ChatMessage, GenEvent, Prompt};

pub(super) type GenerateStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Check and queue a generation; its events as a stream. Dropping the stream (the caller
/// cancelled or went away) cancels the generation at the engine's next step.
pub(super) async fn start_generation(
    state: &Arc<State>,
    req: pb::GenerateRequest,
) -> Result<GenerateStream, Status> {
    let key = VersionKey {
        model: req.model,
        version: req.version,
    };
    {
        let served = state.served.read().unwrap_or_else(|p| p.into_inner());
        let s = served
            .get(&key)
            .ok_or_else(|| Error::NotLoaded(key.clone()))?;
        if !matches!(s.spec, ModelSpec::Llama(_)) {
            return Err(Status::invalid_argument(format!(
                "model {} is a {} model; it does not generate text",
                key.model,
                s.spec.family_name()
            )));
        }
    }
    let prompt = match (req.prompt.is_empty(), req.messages.is_empty()) {
        (_, false) if !req.prompt.is_empty() => {
            return Err(Status::invalid_argument(
                "give a prompt or messages, not both",
            ));
        }
        (_, false) => Prompt::Chat(
            req.messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
        (false, true) => Prompt::Text(req.prompt),
        (true, true) => {
            return Err(Status::invalid_argument(
                "the prompt is empty; give a prompt or messages",
            ));
        }
    };
    let sampling =
        kiln_core::convert::sampling_from_proto(req.sampling.as_ref()).map_err(Error::from)?;
    let arrived = Instant::now();
    let mut events = state.engine.generate(key.clone(), prompt, sampling).await?;
    lock(&state.last_used).insert(key.clone(), now_unix_ms());
    let state = state.clone();
    let stream = async_stream_events(move |tx| async move {
        let mut last_token: Option<Instant> = None;
        loop {
            // A caller that went away cancels at once: dropping `events` tells the
            // engine, which frees the slot at its next step.
            let event = tokio::select! {
                _ = tx.closed() => return,
                event = events.recv() => event,
            };
            let Some(event) = event else { break };
            let out = match event {
                GenEvent::Started {
                    prompt_tokens,
                    queue,
                } => {
                    state.generation_metrics.queue(queue);
                    let stats = state.engine.generation_stats(&key);
                    pb::generate_event::Event::Started(pb::GenerateStarted {
                        prompt_tokens,
                        queue_ns: queue.as_nanos() as u64,
                        running: stats.running as u32,
                        free_slots: stats.free_slots as u32,
                    })
                }
                GenEvent::Token { id, text, logprobs } => {
                    let now = Instant::now();
                    match last_token {
                        None => state.generation_metrics.first_token(now - arrived),
                        Some(t) => state.generation_metrics.between_tokens(now - t),
                    }
                    last_token = Some(now);
                    let (logprob, top_logprobs) = match logprobs {
                        Some(l) => (
                            Some(l.chosen),
                            l.top
                                .into_iter()
                                .map(|(id, logprob)| kiln_proto::kiln::v1::TokenLogprob {
                                    id,
                                    logprob,
                                })
                                .collect(),
                        ),
                        None => (None, Vec::new()),
                    };
                    pb::generate_event::Event::Token(pb::GenerateToken {
                        id,
                        text,
                        logprob,
                        top_logprobs,
                    })
                }
                GenEvent::Finished {
                    reason,
                    text,
                    completion_tokens,
                } => pb::generate_event::Event::Finished(pb::GenerateFinished {
                    finish_reason: reason.as_str().into(),
                    text,
                    completion_tokens,
                }),
                GenEvent::Failed(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            };
            let finished = matches!(out, pb::generate_event::Event::Finished(_));
            if tx
                .send(Ok(pb::GenerateEvent { event: Some(out) }))
                .await
                .is_err()
                || finished
            {
                return;
            }
        }
        // The generator went away without finishing (the worker is stopping).
        let _ = tx.send(Err(Status::from(Error::EngineStopped))).await;
    });
    Ok(stream)
}

/// A stream fed by `produce` through a small channel; dropping the stream drops the
/// producer's receiver side, which ends the producer at its next send.
fn async_stream_events<F, Fut>(produce: F) -> GenerateStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::GenerateEvent, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
