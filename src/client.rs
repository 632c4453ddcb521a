//! Client commands: `kiln models …` and `kiln infer`, all over gRPC.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use kiln_core::spec::{ModelSpec, Signature};
use kiln_gateway::codec::fp32_input;
use kiln_gateway::convert::{signature_to_proto, spec_to_proto};
use kiln_proto::inference::ModelInferRequest;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::kiln::v1 as pb;
use kiln_proto::kiln::v1::models_client::ModelsClient;
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Largest message the CLI sends or accepts.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// A model definition file for `kiln models create --spec FILE`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// Model name.
    pub name: String,
    /// Architecture, e.g. `{"mlp": {"input_width": 4, …}}`.
    pub spec: ModelSpec,
    /// Tensor names (default `input` / `output`).
    #[serde(default)]
    pub signature: Option<Signature>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// How the CLI identifies itself to a gateway, set once from the command line.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The bearer token sent with every call (none: calls go without one).
    pub token: Option<String>,
}

static CREDENTIALS: OnceLock<Credentials> = OnceLock::new();

/// Use `credentials` for every call this process makes (the first setting wins).
pub fn set_credentials(credentials: Credentials) {
    let _ = CREDENTIALS.set(credentials);
}

/// Where `kiln up` writes its admin token, under its data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The token the CLI sends: `--token`/`KILN_TOKEN` when given, else the admin token that
/// `kiln up` wrote into `data_dir` (the same default as `kiln up`'s), when readable.
pub fn token_from(explicit: Option<String>, data_dir: &Path) -> Option<String> {
    explicit.filter(|t| !t.trim().is_empty()).or_else(|| {
        std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    })
}

/// Adds `authorization: Bearer …` to each call when the CLI has a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Send `token` (none: calls go without one).
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let header = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                    anyhow::anyhow!("the token (--token, KILN_TOKEN) is not printable ASCII")
                })
            })
            .transpose()?;
        Ok(Self(header))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to the gateway carrying the CLI's credentials.
pub type Conn = InterceptedService<Channel, Bearer>;

/// A connected channel to the gateway at `addr`, or an error a CLI user can act on.
pub(crate) async fn channel(addr: &str) -> anyhow::Result<Conn> {
    let channel = kiln_rpc::channel::connect(addr)
        .await
        .map_err(|e| match e {
            kiln_rpc::Error::Unreachable { ref detail, .. }
                if detail.contains("corrupt message") || detail.contains("InvalidContentType") =>
            {
                anyhow::anyhow!("{e}; the server does not speak TLS (drop --tls-ca / KILN_TLS_CA)")
            }
            kiln_rpc::Error::Unreachable { .. } => {
                anyhow::anyhow!("{e}; is `kiln up` running?")
            }
            other => other.into(),
        })?;
    let token = CREDENTIALS.get().and_then(|c| c.token.as_deref());
    Ok(InterceptedService::new(channel, Bearer::new(token)?))
}

/// A gRPC error as the CLI prints it: the code, then the server's message (and, when the
/// gateway wants a token, where to find one).
pub(crate) fn status(e: tonic::Status) -> anyhow::Error {
    let message = e.message();
    let hint = match e.code() {
        tonic::Code::Unauthenticated => {
            "\n(give a token with --token or KILN_TOKEN; `kiln up` writes its admin token to \
             DATA_DIR/admin.token)"
        }
        // What a plaintext call meets at a TLS port: the connection is dropped at once.
        tonic::Code::Internal | tonic::Code::Cancelled | tonic::Code::Unknown
            if message.contains("h2 protocol error")
                || message.contains("operation was canceled")
                || message.contains("transport error") =>
        {
            "\n(if the gateway serves TLS, give its CA with --tls-ca or KILN_TLS_CA)"
        }
        _ => "",
    };
    anyhow::anyhow!("{:?}: {message}{hint}", e.code())
}

/// `NAME[:VERSION]` → (name, version selector).
pub fn split_ref(reference: &str) -> (&str, &str) {
    reference.split_once(':').unwrap_or((reference, ""))
}

/// `kiln models list`: a table of models and versions.
pub async fn models_list(addr: &str) -> anyhow::Result<String> {
    let mut client = ModelsClient::new(channel(addr).await?);
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .models;
    let mut out = format!(
        "{:<24} {:>7} {:<12} {:<14} {}\n",
        "MODEL", "VERSION", "STATE", "SHA256", "ALIASES"
    );
    for m in &models {
        for v in &m.versions {
            let aliases: Vec<&str> = m
                .aliases
                .iter()
                .filter(|a| a.version == v.version)
                .map(|a| a.alias.as_str())
                .collect();
            out.push_str(&format!(
                "{:<24} {:>7} {:<12} {:<14} {}\n",
                m.name,
                v.version,
                v.state,
                v.sha256.get(..12).unwrap_or(&v.sha256),
                aliases.join(",")
            ));
        }
    }
    Ok(out)
}

/// `kiln models create --spec FILE [--weights FILE] [--seed N]`.
pub async fn models_create(
    addr: &str,
    spec_file: &Path,
    weights: Option<&Path>,
    seed: Option<u64>,
) -> anyhow::Result<pb::ModelVersion> {
    let text = std::fs::read_to_string(spec_file)
        .with_context(|| format!("cannot read {}", spec_file.display()))?;
    let file: SpecFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid model spec file", spec_file.display()))?;
    let weights = match (weights, seed) {
        (Some(_), Some(_)) => bail!("give --weights or --seed, not both"),
        (Some(path), None) => Some(pb::create_model_request::Weights::Safetensors(
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        )),
        (None, Some(seed)) => Some(pb::create_model_request::Weights::Seed(seed)),
        (None, None) => None,
    };
    let mut client = ModelsClient::new(channel(addr).await?).max_encoding_message_size(MAX_MESSAGE);
    let response = client
        .create_model(pb::CreateModelRequest {
            name: file.name,
            spec: Some(spec_to_proto(&file.spec)),
            signature: Some(signature_to_proto(&file.signature.unwrap_or_default())),
            description: file.description,
            weights,
        })
        .await
        .map_err(status)?;
    response
        .into_inner()
        .version
        .context("the server answered without a version")
}

/// `kiln models export NAME[:VERSION] -o FILE`.
pub async fn models_export(
    addr: &str,
    reference: &str,
    out: &Path,
) -> anyhow::Result<pb::ModelVersion> {
    let (name, version) = split_ref(reference);
    let mut client = ModelsClient::new(channel(addr).await?).max_decoding_message_size(MAX_MESSAGE);
    let response = client
        .export_weights(pb::ExportWeightsRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .map_err(status)?
        .into_inner();
    std::fs::write(out, &response.safetensors)
        .with_context(|| format!("cannot write {}", out.display()))?;
    response
        .version
        .context("the server answered without a version")
}

/// `kiln models alias NAME ALIAS VERSION`.
pub async fn models_alias(
    addr: &str,
    name: &str,
    alias: &str,
    version: u64,
    canary: Option<(u64, f64)>,
) -> anyhow::Result<pb::Alias> {
    let mut client = ModelsClient::new(channel(addr).await?);
    let (canary_version, canary_weight) = canary.unwrap_or((0, 0.0));
    Ok(client
        .set_alias(pb::SetAliasRequest {
            name: name.into(),
            alias: alias.into(),
            version,
            canary_version,
            canary_weight,
        })
        .await
        .map_err(status)?
        .into_inner())
}

/// `kiln models deploy NAME --replicas N --device gpu|cpu|any`.
pub async fn models_deploy(
    addr: &str,
    name: &str,
    replicas: u32,
    device: &str,
    shard_rows: u32,
    batching: Option<pb::Batching>,
    avoid_training: Option<bool>,
) -> anyhow::Result<pb::Deployment> {
    let device = match device {
        "any" => pb::DeviceClass::Any,
        "gpu" => pb::DeviceClass::Gpu,
        "cpu" => pb::DeviceClass::Cpu,
        other => anyhow::bail!("--device must be gpu, cpu or any, got {other:?}"),
    };
    let mut client = ModelsClient::new(channel(addr).await?);
    Ok(client
        .set_deployment(pb::SetDeploymentRequest {
            name: name.into(),
            replicas,
            device: device as i32,
            shard_rows,
            batching,
            avoid_training,
        })
        .await
        .map_err(status)?
        .into_inner())
}

/// `kiln infer NAME[:VERSION] --input JSON`: rows in (`[[…], […]]` or one row `[…]`),
/// JSON out.
pub async fn infer(addr: &str, reference: &str, input: &str) -> anyhow::Result<serde_json::Value> {
    let (name, version) = split_ref(reference);
    let value: serde_json::Value =
        serde_json::from_str(input).context("--input is not valid JSON")?;
    let rows: Vec<Vec<f32>> = match &value {
        serde_json::Value::Array(items) if items.iter().all(|v| v.is_number()) => {
            vec![serde_json::from_value(value.clone()).context("--input: expected numbers")?]
        }
        _ => serde_json::from_value(value)
            .context("--input must be a list of numbers or a list of rows")?,
    };
    let width = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || width == 0 || rows.iter().any(|r| r.len() != width) {
        bail!("--input rows must be non-empty and of equal length");
    }
    let channel = channel(addr).await?;
    let mut models = ModelsClient::new(channel.clone());
    let meta = models
        .get_model_version(pb::GetModelVersionRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let signature = meta.signature.unwrap_or_default();
    let n = rows.len();
    let mut client =
        GrpcInferenceServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: name.into(),
            model_version: version.into(),
            inputs: vec![fp32_input(
                &signature.input_name,
                n,
                rows.into_iter().flatten().collect(),
            )],
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut outputs = serde_json::Map::new();
    for out in &response.outputs {
        let values = out
            .contents
            .as_ref()
            .map(|c| c.fp32_contents.clone())
            .unwrap_or_default();
        let cols = out.shape.get(1).copied().unwrap_or(1).max(1) as usize;
        let rows: Vec<Vec<f32>> = values.chunks(cols).map(<[f32]>::to_vec).collect();
        outputs.insert(out.name.clone(), serde_json::json!(rows));
    }
    Ok(serde_json::json!({
        "model": response.model_name,
        "version": response.model_version,
        "outputs": outputs,
    }))
}

/// `kiln status`: the cluster as the gateway sees it, as tables (or JSON).
pub async fn cluster_status(addr: &str, json: bool) -> anyhow::Result<String> {
    let mut client = kiln_proto::kiln::v1::cluster_client::ClusterClient::new(channel(addr).await?);
    let s = client
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id,
                    "address": w.address,
                    "backend": w.backend,
                    "adapter": w.adapter,
                    "reachable": w.reachable,
                    "queue_depth": w.queue_depth,
                    "training_runs": w.training_runs,
                    "versions": w.versions.iter().map(|v| serde_json::json!({
                        "model": v.model,
                        "version": v.version,
                        "state": v.state,
                        "queue_depth": v.queue_depth,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let versions: Vec<serde_json::Value> = s
            .versions
            .iter()
            .map(|v| {
                serde_json::json!({
                    "model": v.model,
                    "version": v.version,
                    "state": v.state,
                    "ready_on": v.ready_on,
                    "placed_on": v.placed_on,
                    "aliases": v.aliases,
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "scheduler": s.scheduler,
            "scheduler_address": s.scheduler_address,
            "revision": s.revision,
            "workers": workers,
            "versions": versions,
        }))?);
    }
    let mut out = if s.scheduler.is_empty() {
        "scheduler: none in the cluster state (embedded cluster, or no leader)\n".to_owned()
    } else {
        format!(
            "scheduler: {} at {} (leader)\n",
            s.scheduler, s.scheduler_address
        )
    };
    out.push_str(&format!(
        "\n{:<16} {:<22} {:<28} {:>5} {:>8}  VERSIONS\n",
        "WORKER", "ADDRESS", "DEVICE", "QUEUE", "TRAINING"
    ));
    for w in &s.workers {
        let versions: Vec<String> = w
            .versions
            .iter()
            .map(|v| format!("{}:{} {}", v.model, v.version, v.state))
            .collect();
        let queue = if w.reachable {
            w.queue_depth.to_string()
        } else {
            "?".into()
        };
        out.push_str(&format!(
            "{:<16} {:<22} {:<28} {:>5} {:>8}  {}\n",
            w.id,
            w.address,
            format!("{} ({})", w.backend, w.adapter),
            queue,
            if w.training_runs == 0 {
                "-".to_owned()
            } else {
                w.training_runs.to_string()
            },
            if versions.is_empty() {
                "-".to_owned()
            } else {
                versions.join(", ")
            }
        ));
    }
    out.push_str(&format!(
        "\n{:<24} {:>7} {:<12} {:>7}  {:<24} ALIASES\n",
        "MODEL", "VERSION", "STATE", "READY", "PLACED ON"
    ));
    for v in &s.versions {
        out.push_str(&format!(
            "{:<24} {:>7} {:<12} {:>7}  {:<24} {}\n",
            v.model,
            v.version,
            v.state,
            format!("{}/{}", v.ready_on.len(), v.placed_on.len()),
            if v.placed_on.is_empty() {
                "-".to_owned()
            } else {
                v.placed_on.join(",")
            },
            v.aliases.join(",")
        ));
    }
    Ok(out)
}

/// How `kiln generate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerateOutput {
    /// The text as it comes.
    Text,
    /// The text, then the counts and timings.
    TextWithStats,
    /// Each response as a JSON line.
    Json,
}

/// `kiln generate`: stream a generation to standard output as it comes.
pub async fn generate(
    addr: &str,
    model: &str,
    version: u64,
    prompt: String,
    messages: Vec<(String, String)>,
    sampling: kiln_proto::kiln::v1::SamplingParameters,
    output: GenerateOutput,
) -> anyhow::Result<()> {
    use kiln_proto::kiln::v1::generation_client::GenerationClient;
    use std::io::Write;
    let mut client = GenerationClient::new(channel(addr).await?);
    let request = kiln_proto::kiln::v1::GenerateRequest {
        model: model.to_owned(),
        version,
        prompt,
        messages: messages
            .into_iter()
            .map(|(role, content)| kiln_proto::kiln::v1::ChatMessage { role, content })
            .collect(),
        sampling: Some(sampling),
    };
    let mut stream = client.generate(request).await.map_err(status)?.into_inner();
    let mut out = std::io::stdout().lock();
    let mut first_ns = None;
    while let Some(r) = stream.message().await.map_err(status)? {
        if !r.token_ids.is_empty() && first_ns.is_none() {
            first_ns = Some(r.elapsed_ns);
        }
        if output == GenerateOutput::Json {
            let line = serde_json::json!({
                "token_ids": r.token_ids,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "elapsed_ns": r.elapsed_ns,
                "queue_ns": r.queue_ns,
                "version": r.version,
                "logprob": r.logprob,
                "top_logprobs": r.top_logprobs.iter().map(|t| (t.id, t.logprob)).collect::<Vec<_>>(),
            });
            writeln!(out, "{line}")?;
            continue;
        }
        write!(out, "{}", r.text)?;
        out.flush()?;
        if !r.finish_reason.is_empty() {
            writeln!(out)?;
            if output == GenerateOutput::TextWithStats {
                let total = r.elapsed_ns as f64 / 1e9;
                let first = first_ns.unwrap_or(r.elapsed_ns) as f64 / 1e9;
                let rate = if total > first && r.completion_tokens > 1 {
                    f64::from(r.completion_tokens - 1) / (total - first)
                } else {
                    0.0
                };
                writeln!(
                    out,
                    "-- {} prompt tokens, {} generated ({}), first token after {:.3} s, {:.1} tokens/s after it",
                    r.prompt_tokens, r.completion_tokens, r.finish_reason, first, rate
                )?;
            }
        }
    }
    Ok(())
}

/// Bytes per message of an import stream.
const IMPORT_CHUNK: usize = 1024 * 1024;

/// `kiln models import DIR --name N`: send the files of a Hugging Face directory that Kiln
/// reads (see `kiln_core::hf`), with a progress bar over the bytes.
pub async fn models_import(
    addr: &str,
    dir: &Path,
    name: &str,
    description: &str,
) -> anyhow::Result<pb::ModelVersion> {
    use futures::StreamExt;
    use pb::import_model_request::Part;
    let mut files = Vec::new();
    let gguf = dir.is_file()
        && dir
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if gguf {
        let bytes = std::fs::read(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        files.push((kiln_core::hf::GGUF.to_owned(), bytes::Bytes::from(bytes)));
    } else if !dir.is_dir() {
        bail!(
            "{} is neither a model directory nor a .gguf file",
            dir.display()
        );
    }
    let modules = std::fs::read(dir.join(kiln_core::hf::MODULES)).ok();
    for path in kiln_core::hf::wanted_files(modules.as_deref())
        .into_iter()
        .filter(|_| !gguf)
    {
        let full = dir.join(&path);
        if full.is_file() {
            let bytes =
                std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
            files.push((path, bytes::Bytes::from(bytes)));
        }
    }
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let mut messages = vec![pb::ImportModelRequest {
        part: Some(Part::Header(pb::ImportHeader {
            name: name.to_owned(),
            description: description.to_owned(),
        })),
    }];
    for (path, bytes) in &files {
        let mut start = 0;
        // An empty file still sends one (empty) chunk, so the server knows it exists.
        loop {
            let end = (start + IMPORT_CHUNK).min(bytes.len());
            messages.push(pb::ImportModelRequest {
                part: Some(Part::Chunk(pb::ImportChunk {
                    path: path.clone(),
                    data: bytes.slice(start..end).to_vec(),
                })),
            });
            start = end;
            if start >= bytes.len() {
                break;
            }
        }
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("importing {name}"));
    let progress = bar.clone();
    let stream = futures::stream::iter(messages).inspect(move |m| {
        if let Some(Part::Chunk(c)) = &m.part {
            progress.inc(c.data.len() as u64);
        }
    });
    let mut client = ModelsClient::new(channel(addr).await?).max_encoding_message_size(MAX_MESSAGE);
    let response = client.import_model(stream).await.map_err(status);
    bar.finish_and_clear();
    response?
        .into_inner()
        .version
        .context("the server answered without a version")
}
