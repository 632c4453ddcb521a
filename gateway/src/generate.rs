//! Generation at the gateway (`docs/models.md`, "Generation"): `kiln.v1.Generation`, and
//! decoder models on the Open Inference Protocol — `ModelInfer` answers the whole
//! completion, `ModelStreamInfer` streams it as Triton's vLLM backend does (the tensor
//! names of `kiln_core::generation`, the last response marked `triton_final_response`).
//! Either way the request is resolved (aliases, canaries), routed to the replica with the
//! most free slots, and its events read from the worker's `Generate` stream; dropping the
//! stream cancels the generation on the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use kiln_core::family::{Batching, GenerateInputs};
use kiln_core::generation::{
    FINISH_OUTPUT, INPUT_TOKENS_OUTPUT, OUTPUT_TOKENS_OUTPUT, Sampling, TEXT_OUTPUT,
    TOKEN_IDS_OUTPUT,
};
use kiln_core::records::VersionKey;
use kiln_core::tensor::{DataType, Tensor};
use kiln_proto::inference as oip;
use kiln_proto::kiln::internal::v1 as ipb;
use kiln_proto::kiln::v1 as pb;
use tonic::{Request, Response, Status};

use crate::codec::{Limits, decode_inputs, encode_outputs, requested_outputs};
use crate::router::{Generation, map_worker_status};
use crate::stats::Success;
use crate::{Error, Result, Shared};

/// Request parameter of Triton's decoupled models: end a stream with an empty response
/// that only carries the final flag.
pub const EMPTY_FINAL: &str = "triton_enable_empty_final_response";
/// Response parameter: whether this is the request's last response.
pub const FINAL: &str = "triton_final_response";

/// A generation's events, as the gateway reads them.
#[derive(Debug)]
pub(crate) enum Step {
    /// The prompt ran on the worker.
    Started { prompt_tokens: u32, queue_ns: u64 },
    /// One token, the text it completes, and its log-probabilities if asked for.
    Token {
        id: u32,
        text: String,
        logprob: Option<f32>,
        top: Vec<pb::TokenLogprob>,
    },
    /// The end: why, and text held back that was not a stop string.
    Finished {
        reason: String,
        text: String,
        completion_tokens: u32,
    },
}

/// A routed generation.
pub(crate) struct Running {
    pub(crate) key: VersionKey,
    generation: Generation,
    started: Instant,
    _in_flight: crate::stats::InFlight,
    shared: Arc<Shared>,
    ok: bool,
}

impl Running {
    /// The next event; `None` after `Finished`.
    pub(crate) async fn next(&mut self) -> Result<Option<Step>> {
        let event = self
            .generation
            .events
            .message()
            .await
            .map_err(map_worker_status)?;
        let Some(event) = event.and_then(|e| e.event) else {
            return Ok(None);
        };
        Ok(Some(match event {
            ipb::generate_event::Event::Started(s) => {
                self.generation.started(s.running);
                Step::Started {
                    prompt_tokens: s.prompt_tokens,
                    queue_ns: s.queue_ns,
                }
            }
            ipb::generate_event::Event::Token(t) => Step::Token {
                id: t.id,
                text: t.text,
                logprob: t.logprob,
                top: t.top_logprobs,
            },
            ipb::generate_event::Event::Finished(f) => {
                self.ok = true;
                Step::Finished {
                    reason: f.finish_reason,
                    text: f.text,
                    completion_tokens: f.completion_tokens,
                }
            }
        }))
    }
}

impl Drop for Running {
    /// Statistics: a generation that finished counts as a success, any other end (an
    /// error, a caller that went away) as a failure.
    fn drop(&mut self) {
        let total = self.started.elapsed();
        if self.ok {
            self.shared.stats.success(
                &self.key,
                Success {
                    total,
                    queue: Duration::ZERO,
                    input: Duration::ZERO,
                    compute: total,
                    output: Duration::ZERO,
                    rows: 1,
                    batch_rows: 1,
                },
            );
        } else {
            self.shared.stats.failure(&self.key, total);
        }
    }
}

impl Shared {
    /// Whether `model` (name or alias, version selector) generates text.
    pub(crate) fn is_generator(&self, model: &str, version: &str) -> bool {
        let view = self.view.current();
        view.resolve(model, version)
            .map(|(entry, _)| entry.record.spec.family().batching() == Batching::Generate)
            .unwrap_or(false)
    }

    /// Resolve `model` (aliases and canaries choose the version when `version` is empty),
    /// check that it generates, and start a generation on a replica.
    pub(crate) async fn start_generation(
        self: &Arc<Self>,
        model: &str,
        version: &str,
        prompt: String,
        messages: Vec<pb::ChatMessage>,
        sampling: &Sampling,
    ) -> Result<Running> {
        if model.is_empty() {
            return Err(Error::Invalid("model is empty".into()));
        }
        let key = {
            let view = self.view.current();
            let ticket = self
                .tickets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (entry, v) = view.resolve_request(model, version, ticket)?;
            if entry.record.spec.family().batching() != Batching::Generate {
                return Err(Error::Invalid(format!(
                    "model {model:?} is a {} model; it does not generate text",
                    entry.record.spec.family_name()
                )));
            }
            v.key()
        };
        kiln_telemetry::trace::attributes(|| {
            vec![
                kiln_telemetry::trace::KeyValue::new(
                    "kiln.model.name",
                    kiln_telemetry::trace::name_value(&key.model),
                ),
                kiln_telemetry::trace::KeyValue::new("kiln.model.version", key.version as i64),
            ]
        });
        let in_flight = self.stats.in_flight(&key);
        let started = Instant::now();
        let request = ipb::GenerateRequest {
            model: key.model.clone(),
            version: key.version,
            prompt,
            messages,
            sampling: Some(kiln_core::convert::sampling_to_proto(sampling)),
        };
        let generation = match self.router.generate(&key, request).await {
            Ok(g) => g,
            Err(e) => {
                self.stats.failure(&key, started.elapsed());
                return Err(e);
            }
        };
        Ok(Running {
            key,
            generation,
            started,
            _in_flight: in_flight,
            shared: self.clone(),
            ok: false,
        })
    }

    /// `ModelInfer` on a decoder: the whole completion in one answer (the prompt first,
    /// unless `exclude_input_in_output`).
    pub(crate) async fn infer_generation(
        self: &Arc<Self>,
        req: oip::ModelInferRequest,
    ) -> Result<oip::ModelInferResponse> {
        let (inputs, wanted, raw) = self.generation_inputs(&req)?;
        self.complete(&req, inputs, &wanted, raw).await
    }

    /// Run a decoded generation request to its end and answer the whole completion.
    async fn complete(
        self: &Arc<Self>,
        req: &oip::ModelInferRequest,
        inputs: GenerateInputs,
        wanted: &[usize],
        raw: bool,
    ) -> Result<oip::ModelInferResponse> {
        let mut running = self
            .start_generation(
                &req.model_name,
                &req.model_version,
                inputs.prompt.clone(),
                Vec::new(),
                &inputs.sampling,
            )
            .await?;
        let mut text = if inputs.exclude_input {
            String::new()
        } else {
            inputs.prompt.clone()
        };
        let mut prompt_tokens = 0;
        let mut ids = Vec::new();
        let (reason, completion_tokens) = loop {
            match running.next().await? {
                Some(Step::Started {
                    prompt_tokens: p, ..
                }) => prompt_tokens = p,
                Some(Step::Token { text: t, id, .. }) => {
                    text.push_str(&t);
                    ids.push(id);
                }
                Some(Step::Finished {
                    reason,
                    text: t,
                    completion_tokens,
                }) => {
                    text.push_str(&t);
                    break (reason, completion_tokens);
                }
                None => {
                    return Err(Error::Unavailable(
                        "the worker ended the generation before it finished".into(),
                    ));
                }
            }
        };
        let mut response = oip::ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: running.key.version.to_string(),
            id: req.id.clone(),
            ..Default::default()
        };
        let outputs = outputs(&text, &reason, prompt_tokens, completion_tokens, &ids)?;
        encode_outputs(&mut response, pick(outputs, wanted), raw);
        Ok(response)
    }

    /// A request's generation inputs, the outputs it wants, and whether it used raw
    /// contents.
    fn generation_inputs(
        &self,
        req: &oip::ModelInferRequest,
    ) -> Result<(GenerateInputs, Vec<usize>, bool)> {
        let view = self.view.current();
        let (entry, _) = view.resolve(&req.model_name, &req.model_version)?;
        let interface = entry.record.spec.interface(&entry.record.signature);
        let wanted = requested_outputs(req, &interface)?;
        let decoded = decode_inputs(
            req,
            &interface,
            &Limits {
                max_batch: 1,
                max_rows: 1,
            },
        )?;
        let inputs = GenerateInputs::read(&decoded.inputs)?;
        Ok((inputs, wanted, decoded.raw))
    }

    /// `ModelStreamInfer` on a decoder: with `stream` true, a response per piece of new
    /// text; else one response with the whole completion. Every response carries
    /// `triton_final_response`; with `triton_enable_empty_final_response` the stream ends
    /// with an empty response that only says it is final. Errors become a response's
    /// `error_message`, as for every request on the stream.
    pub(crate) fn stream_generation(
        self: Arc<Self>,
        req: oip::ModelInferRequest,
    ) -> Pin<Box<dyn Stream<Item = Result<oip::ModelStreamInferResponse, Status>> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        tokio::spawn(async move {
            let id = req.id.clone();
            if let Err(e) = self.stream_into(&req, &tx).await {
                let status = Status::from(e);
                let _ = tx
                    .send(Ok(oip::ModelStreamInferResponse {
                        error_message: status.message().to_owned(),
                        infer_response: Some(oip::ModelInferResponse {
                            id,
                            ..Default::default()
                        }),
                    }))
                    .await;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn stream_into(
        self: &Arc<Self>,
        req: &oip::ModelInferRequest,
        tx: &tokio::sync::mpsc::Sender<Result<oip::ModelStreamInferResponse, Status>>,
    ) -> Result<()> {
        let (inputs, wanted, raw) = self.generation_inputs(req)?;
        if !inputs.stream {
            let response = self.complete(req, inputs, &wanted, raw).await?;
            let _ = tx.send(Ok(streamed(with_final(response, true)))).await;
            return Ok(());
        }
        let empty_final = req
            .parameters
            .get(EMPTY_FINAL)
            .and_then(|p| match p.parameter_choice {
                Some(oip::infer_parameter::ParameterChoice::BoolParam(b)) => Some(b),
                _ => None,
            })
            .unwrap_or(false);
        let mut running = self
            .start_generation(
                &req.model_name,
                &req.model_version,
                inputs.prompt.clone(),
                Vec::new(),
                &inputs.sampling,
            )
            .await?;
        let version = running.key.version.to_string();
        let respond = |text: &str, reason: &str, prompt: u32, completion: u32, ids: &[u32]| {
            let mut response = oip::ModelInferResponse {
                model_name: req.model_name.clone(),
                model_version: version.clone(),
                id: req.id.clone(),
                ..Default::default()
            };
            let outs = outputs(text, reason, prompt, completion, ids)?;
            encode_outputs(&mut response, pick(outs, &wanted), raw);
            Ok::<_, Error>(response)
        };
        let mut prompt_tokens = 0;
        let mut generated = 0;
        // A response waits until the next one exists, so that the last one with text can
        // carry the final flag and the finish reason.
        let mut pending: Option<(String, Vec<u32>)> = None;
        // Ids of tokens whose text is not out yet (part of a character, a possible stop).
        let mut ids: Vec<u32> = Vec::new();
        loop {
            let step = tokio::select! {
                _ = tx.closed() => return Ok(()),
                step = running.next() => step?,
            };
            match step {
                Some(Step::Started {
                    prompt_tokens: p, ..
                }) => prompt_tokens = p,
                Some(Step::Token { text, id, .. }) => {
                    generated += 1;
                    ids.push(id);
                    if text.is_empty() {
                        continue;
                    }
                    let held = ids.len() as u32;
                    if let Some((previous, previous_ids)) =
                        pending.replace((text, std::mem::take(&mut ids)))
                    {
                        let sent = generated - held;
                        let r = respond(&previous, "", prompt_tokens, sent, &previous_ids)?;
                        if tx.send(Ok(streamed(with_final(r, false)))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Some(Step::Finished {
                    reason,
                    text,
                    completion_tokens,
                }) => {
                    let (mut last, mut last_ids) = pending.take().unwrap_or_default();
                    last.push_str(&text);
                    last_ids.append(&mut ids);
                    let r = respond(&last, &reason, prompt_tokens, completion_tokens, &last_ids)?;
                    if empty_final {
                        let _ = tx.send(Ok(streamed(with_final(r, false)))).await;
                        let close = oip::ModelInferResponse {
                            model_name: req.model_name.clone(),
                            model_version: version.clone(),
                            id: req.id.clone(),
                            ..Default::default()
                        };
                        let _ = tx.send(Ok(streamed(with_final(close, true)))).await;
                    } else {
                        let _ = tx.send(Ok(streamed(with_final(r, true)))).await;
                    }
                    return Ok(());
                }
                None => {
                    return Err(Error::Unavailable(
                        "the worker ended the generation before it finished".into(),
                    ));
                }
            }
        }
    }
}

/// The outputs of the decoder interface, in its order.
fn outputs(
    text: &str,
    reason: &str,
    prompt: u32,
    completion: u32,
    ids: &[u32],
) -> Result<Vec<Tensor>> {
    let count = |name: &str, n: u32| {
        Tensor::new(
            name,
            DataType::U32,
            vec![1],
            Bytes::copy_from_slice(&n.to_le_bytes()),
        )
    };
    Ok(vec![
        Tensor::from_byte_strings(TEXT_OUTPUT, vec![1], &[text.as_bytes()])?,
        Tensor::from_byte_strings(FINISH_OUTPUT, vec![1], &[reason.as_bytes()])?,
        count(INPUT_TOKENS_OUTPUT, prompt)?,
        count(OUTPUT_TOKENS_OUTPUT, completion)?,
        Tensor::new(
            TOKEN_IDS_OUTPUT,
            DataType::U32,
            vec![ids.len()],
            ids.iter().flat_map(|i| i.to_le_bytes()).collect(),
        )?,
    ])
}

/// The outputs at `wanted`, in that order.
fn pick(outputs: Vec<Tensor>, wanted: &[usize]) -> Vec<Tensor> {
    let mut outputs: Vec<Option<Tensor>> = outputs.into_iter().map(Some).collect();
    wanted
        .iter()
        .filter_map(|i| outputs.get_mut(*i).and_then(Option::take))
        .collect()
}

fn with_final(mut response: oip::ModelInferResponse, last: bool) -> oip::ModelInferResponse {
    response.parameters.insert(
        FINAL.into(),
        oip::InferParameter {
            parameter_choice: Some(oip::infer_parameter::ParameterChoice::BoolParam(last)),
        },
    );
    response
}

fn streamed(response: oip::ModelInferResponse) -> oip::ModelStreamInferResponse {
    oip::ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(response),
    }
}

/// `kiln.v1.Generation`.
pub struct GenerationService {
    pub(crate) shared: Arc<Shared>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        let sampling =
            kiln_core::convert::sampling_from_proto(req.sampling.as_ref()).map_err(Error::from)?;
        let version = if req.version == 0 {
            String::new()
        } else {
            req.version.to_string()
        };
        let arrived = Instant::now();
        let mut running = self
            .shared
            .start_generation(&req.model, &version, req.prompt, req.messages, &sampling)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        tokio::spawn(async move {
            let version = running.key.version;
            let mut prompt_tokens = 0;
            let mut queue_ns = 0;
            let mut generated = 0;
            loop {
                let step = tokio::select! {
                    _ = tx.closed() => return,
                    step = running.next() => step,
                };
                let response = match step {
                    Ok(Some(Step::Started {
                        prompt_tokens: p,
                        queue_ns: q,
                    })) => {
                        prompt_tokens = p;
                        queue_ns = q;
                        continue;
                    }
                    Ok(Some(Step::Token {
                        id,
                        text,
                        logprob,
                        top,
                    })) => {
                        generated += 1;
                        pb::GenerateResponse {
                            logprob,
                            top_logprobs: top,
                            token_ids: vec![id],
                            text,
                            finish_reason: String::new(),
                            prompt_tokens,
                            completion_tokens: generated,
                            elapsed_ns: arrived.elapsed().as_nanos() as u64,
                            queue_ns: std::mem::take(&mut queue_ns),
                            version,
                        }
                    }
                    Ok(Some(Step::Finished {
                        reason,
                        text,
                        completion_tokens,
                    })) => {
                        let last = pb::GenerateResponse {
                            logprob: None,
                            top_logprobs: Vec::new(),
                            token_ids: Vec::new(),
                            text,
                            finish_reason: reason,
                            prompt_tokens,
                            completion_tokens,
                            elapsed_ns: arrived.elapsed().as_nanos() as u64,
                            queue_ns: 0,
                            version,
                        };
                        let _ = tx.send(Ok(last)).await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the worker ended the generation before it finished",
                            )))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
