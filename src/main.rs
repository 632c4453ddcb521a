//! `kiln`: one binary for every role and every client command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln::client;
use kiln::embedded::{self, UpConfig};
use kiln_gateway::GatewayConfig;
use kiln_telemetry::setup::{LogFormat, TraceFlags};
use kiln_worker::DeviceChoice;

/// mimalloc instead of glibc's allocator: a request makes a few dozen small allocations
/// (headers, messages, spans), often freed on another thread than the one that made
/// them; glibc's arenas spent a sixth of the serving CPU on them (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a gRPC model-serving and training cluster on Burn"
)]
struct Cli {
    /// Log filter (e.g. `info`, `kiln_worker=debug`). wgpu's own adapter probing is
    /// silenced by default: on machines without some graphics API it logs errors that
    /// mean nothing for Kiln.
    #[arg(
        long,
        env = "KILN_LOG",
        default_value = "info,wgpu_hal=off,wgpu_core=warn,naga=warn",
        global = true
    )]
    log: String,
    /// Log lines as `text` (for people) or `json` (one object a line, for log collectors).
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    trace: TraceFlags,
    /// Bearer token of client commands (default: the admin token `kiln up` wrote to
    /// ./kiln-data/admin.token, or to $KILN_DATA_DIR, when readable).
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: TlsFlags,
    #[command(subcommand)]
    command: Command,
}

/// TLS of listeners, of calls to other Kiln processes, and of etcd (docs/security.md).
#[derive(clap::Args)]
struct TlsFlags {
    /// This process's certificate chain (PEM): served on its listener, and presented to
    /// peers that ask for a client certificate. Re-read when the file changes.
    #[arg(long, env = "KILN_TLS_CERT", global = true)]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "KILN_TLS_KEY", global = true)]
    tls_key: Option<PathBuf>,
    /// Require every client of this process's listener to present a certificate from this
    /// CA (PEM): mutual TLS.
    #[arg(long, env = "KILN_TLS_CLIENT_CA", global = true)]
    tls_client_ca: Option<PathBuf>,
    /// Call gateways and other Kiln processes over TLS, trusting this CA (PEM).
    #[arg(long, env = "KILN_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// The name the called processes' certificates carry (default: the host called).
    #[arg(long, env = "KILN_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,
    /// CA (PEM) of etcd's certificate: etcd is reached over TLS (https:// endpoints).
    #[arg(long, env = "KILN_ETCD_CA", global = true)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd that asks for one.
    #[arg(long, env = "KILN_ETCD_CERT", global = true)]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "KILN_ETCD_KEY", global = true)]
    etcd_key: Option<PathBuf>,
}

fn read_file(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {} ({flag})", path.display()))
}

impl TlsFlags {
    /// A certificate and its key, given together or not at all.
    fn pair(
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
        names: (&str, &str),
    ) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        match (cert, key) {
            (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
            (None, None) => Ok(None),
            _ => anyhow::bail!("{} and {} go together", names.0, names.1),
        }
    }

    /// This process's certificate and key.
    fn identity(&self) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        Self::pair(&self.tls_cert, &self.tls_key, ("--tls-cert", "--tls-key"))
    }

    /// The listener's TLS, when a certificate is given.
    fn server(&self) -> anyhow::Result<Option<kiln_rpc::tls::ServerTlsFiles>> {
        match self.identity()? {
            Some((cert, key)) => Ok(Some(kiln_rpc::tls::ServerTlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca.clone(),
            })),
            None if self.tls_client_ca.is_some() => {
                anyhow::bail!(
                    "--tls-client-ca needs --tls-cert and --tls-key (a listener asks for client certificates only over TLS)"
                )
            }
            None => Ok(None),
        }
    }

    /// Make every channel of this process TLS, when a CA is given.
    fn install_client(&self) -> anyhow::Result<()> {
        let identity = self.identity()?;
        if let Some(ca) = &self.tls_ca {
            kiln_rpc::tls::set_client(&kiln_rpc::tls::ClientTlsFiles {
                ca: ca.clone(),
                identity,
                server_name: self.tls_server_name.clone(),
            })?;
        } else if self.tls_server_name.is_some() {
            anyhow::bail!("--tls-server-name needs --tls-ca");
        }
        Ok(())
    }

    /// TLS to etcd, when its CA is given.
    fn etcd(&self) -> anyhow::Result<Option<kiln_registry::EtcdTls>> {
        let identity = Self::pair(
            &self.etcd_cert,
            &self.etcd_key,
            ("--etcd-cert", "--etcd-key"),
        )?;
        let Some(ca) = &self.etcd_ca else {
            if identity.is_some() {
                anyhow::bail!("--etcd-cert needs --etcd-ca");
            }
            return Ok(None);
        };
        Ok(Some(kiln_registry::EtcdTls {
            ca: read_file(ca, "--etcd-ca")?,
            identity: match identity {
                Some((c, k)) => Some((read_file(&c, "--etcd-cert")?, read_file(&k, "--etcd-key")?)),
                None => None,
            },
        }))
    }
}

/// Whether the gateway asks for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    /// Every call but health and reflection needs a token with the right role.
    On,
    /// Anyone who reaches the port may do anything: only for trusted networks.
    Off,
}

/// How training shares a worker's device with serving (`kiln up`, `kiln worker`).
#[derive(clap::Args)]
struct TrainingFlags {
    /// Milliseconds a training run may hold the device at a time: each batch is
    /// trained in slices of about this much compute (gradients accumulate, the trained
    /// weights are the same), so inference waits at most one slice. 0: whole batches.
    #[arg(long, env = "KILN_TRAINING_SLICE_MS", default_value_t = kiln_worker::DEFAULT_TRAINING_SLICE.as_millis() as u64)]
    training_slice_ms: u64,
    /// Most of the device a training run may take while inference is being served (an
    /// inference batch in the last 100 ms): after each slice the device waits for
    /// inference up to slice × (1 − share) / share. Above 0, at most 1 (never waits).
    #[arg(long, env = "KILN_TRAINING_SHARE", default_value_t = kiln_worker::DEFAULT_TRAINING_SHARE)]
    training_share: f64,
}

impl TrainingFlags {
    fn slice(&self) -> Duration {
        Duration::from_millis(self.training_slice_ms)
    }

    /// `--training-share`, checked: above 0, at most 1.
    fn share(&self) -> anyhow::Result<f64> {
        let share = self.training_share;
        if share > 0.0 && share <= 1.0 {
            Ok(share)
        } else {
            anyhow::bail!("--training-share must be above 0 and at most 1, got {share}")
        }
    }
}

/// Say loudly that anyone may call everything.
fn warn_auth_off(addr: impl std::fmt::Display) {
    tracing::warn!(
        %addr,
        "AUTHENTICATION IS OFF (--auth off): anyone who can reach this port can read, \
         change and delete every model, dataset and job"
    );
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole cluster in one process: gateway, scheduler and workers.
    Up(UpArgs),
    /// Cluster mode: run a scheduler (placement controller and training coordinator; one
    /// of several leads through etcd).
    Scheduler {
        #[command(flatten)]
        cluster: ClusterFlags,
        /// Scheduler id (default: from the host name).
        #[arg(long, env = "KILN_SCHEDULER_ID")]
        id: Option<String>,
        /// Where to serve gRPC (kiln.v1.Training, health, reflection).
        #[arg(long, env = "KILN_SCHEDULER_ADDR", default_value = "127.0.0.1:8002")]
        listen: SocketAddr,
        /// Address gateways reach this scheduler at (default: the listen address).
        #[arg(long, env = "KILN_ADVERTISE")]
        advertise: Option<String>,
        #[command(flatten)]
        limits: LimitFlags,
        /// Write the bound address to this file once listening (for scripts).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Cluster mode: run a worker (registers in etcd, loads what the scheduler places on it).
    Worker {
        #[command(flatten)]
        cluster: ClusterFlags,
        /// Worker id, unique in the cluster (default: from the host name).
        #[arg(long, env = "KILN_WORKER_ID")]
        id: Option<String>,
        /// Where to serve gRPC (kiln.internal.v1.Worker, health, reflection).
        #[arg(long, env = "KILN_WORKER_ADDR", default_value = "127.0.0.1:8101")]
        listen: SocketAddr,
        /// Address gateways and the scheduler reach this worker at (default: the listen
        /// address; required when listening on 0.0.0.0).
        #[arg(long, env = "KILN_ADVERTISE")]
        advertise: Option<String>,
        /// Device: auto, cpu, wgpu, wgpu:N, or wgpu:cpu.
        #[arg(long, env = "KILN_DEVICE", default_value = "auto")]
        device: DeviceChoice,
        /// MiB of model weights this worker may hold (0: no limit); when full, the least
        /// recently used versions give way.
        #[arg(long, env = "KILN_MODEL_MEMORY_MIB", default_value_t = 0)]
        model_memory_mib: u64,
        #[command(flatten)]
        training: TrainingFlags,
        /// Write the bound address to this file once listening (for scripts).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Cluster mode: run a gateway (the public gRPC endpoint; routes straight to workers).
    Gateway {
        #[command(flatten)]
        cluster: ClusterFlags,
        /// Where to serve the public gRPC API.
        #[arg(long, env = "KILN_GRPC_ADDR", default_value = "127.0.0.1:8001")]
        listen: SocketAddr,
        /// Largest gRPC message, in MiB.
        #[arg(long, env = "KILN_MAX_MESSAGE_MIB", default_value_t = 64)]
        max_message_mib: usize,
        /// Deadline of requests that carry none, in milliseconds.
        #[arg(long, env = "KILN_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
        default_timeout_ms: u64,
        /// Token authentication: `on` (make the first admin token with `kiln tokens create
        /// --etcd …`) or `off` (trusted networks only).
        #[arg(long, env = "KILN_AUTH", value_enum, default_value_t = AuthMode::On)]
        auth: AuthMode,
        #[command(flatten)]
        caller_limits: CallerLimitFlags,
        /// Write the bound address to this file once listening (for scripts).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Bearer tokens: make, list and revoke them (admin only).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Manage models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Generate text with a decoder model, streaming the tokens to the terminal.
    Generate {
        /// Model name or alias (`NAME:VERSION` for one version).
        model: String,
        /// The prompt. With --chat it is the user's message, rendered with the model's chat
        /// template.
        prompt: String,
        /// Send the prompt as a user message of a conversation (the model's chat template).
        #[arg(long)]
        chat: bool,
        /// A system message before it (with --chat).
        #[arg(long)]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// 0 for greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling probability.
        #[arg(long)]
        top_p: Option<f64>,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: u32,
        /// Seed of the sampler (the same seed gives the same text).
        #[arg(long)]
        seed: Option<u64>,
        /// Stop at this text (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Go on past the model's end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Report the log-probabilities of the N most likely tokens at each step (with
        /// --json).
        #[arg(long, default_value_t = 0)]
        logprobs: u32,
        /// Print each response as a JSON object on its own line (token ids, text, timings,
        /// log-probabilities) instead of the text.
        #[arg(long)]
        json: bool,
        /// Print the token count and timings after the text.
        #[arg(long)]
        stats: bool,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Measure ModelInfer throughput and latency (starts its own embedded cluster).
    Bench {
        /// Concurrent callers, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Rows per request, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        batch: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The worker's device.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        /// Hidden layer widths of the benchmarked MLP (10 inputs, 1 output), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "64")]
        hidden: Vec<u32>,
        /// Also write the Markdown table to this file.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Train a model from a job file (JSON), with a live progress bar per epoch.
    Train {
        /// The job file (see docs/training.md).
        file: PathBuf,
        /// Override the epochs.
        #[arg(long)]
        epochs: Option<u32>,
        /// Override the batch size.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Override the learning rate.
        #[arg(long)]
        learning_rate: Option<f64>,
        /// Override the model name.
        #[arg(long)]
        model: Option<String>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Train on this many workers at once (synchronous data parallelism).
        #[arg(long)]
        workers: Option<u32>,
        /// Idempotency key: resubmitting with the same key returns the same job.
        #[arg(long)]
        key: Option<String>,
        /// Submit and print the job id without following it.
        #[arg(long)]
        detach: bool,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Uploaded datasets.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// Training jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// The cluster as the gateway sees it: the scheduler, workers with device and queue
    /// depth, model versions with their replicas and state.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Run one inference: JSON rows in, JSON out.
    Infer {
        /// `NAME` or `NAME:VERSION` (a number or an alias).
        model: String,
        /// The rows: `[[f, …], …]`, or one row `[f, …]`.
        #[arg(long)]
        input: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
}

/// Where a cluster-mode process finds the cluster.
#[derive(clap::Args)]
struct ClusterFlags {
    /// etcd endpoints, comma-separated (`http://host:2379`).
    #[arg(long, env = "KILN_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Key prefix of Kiln's state in etcd.
    #[arg(long, env = "KILN_PREFIX", default_value = "/kiln/v1/")]
    prefix: String,
    /// Artifact store: a directory every process shares (`file:///shared/kiln`).
    #[arg(long, env = "KILN_ARTIFACTS")]
    artifacts: String,
    /// Lease TTL of worker registrations and of the scheduler's lead, in seconds: how
    /// long a dead process keeps its place.
    #[arg(long, env = "KILN_LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "KILN_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

impl ClusterFlags {
    fn config(self, tls: &TlsFlags) -> anyhow::Result<kiln::cluster::ClusterConfig> {
        Ok(kiln::cluster::ClusterConfig {
            etcd: self.etcd,
            prefix: self.prefix,
            artifacts: self.artifacts,
            lease_ttl: Duration::from_secs(self.lease_ttl_secs),
            etcd_tls: tls.etcd()?,
            tls: tls.server()?,
        })
    }
}

/// Each role's default limits per token (a token's own limits override them).
#[derive(clap::Args)]
struct CallerLimitFlags {
    /// Sustained requests per second of each token of a role, `ROLE=N` (repeatable; 0: no
    /// limit, the default).
    #[arg(long, env = "KILN_REQUESTS_PER_SECOND", value_delimiter = ',')]
    requests_per_second: Vec<String>,
    /// Requests a token may send at once above its rate, `ROLE=N` (default: one second's
    /// worth).
    #[arg(long, env = "KILN_BURST", value_delimiter = ',')]
    burst: Vec<String>,
    /// Calls in flight at once per token of a role, `ROLE=N` (default 1024 for every role).
    #[arg(long, env = "KILN_MAX_IN_FLIGHT", value_delimiter = ',')]
    max_in_flight: Vec<String>,
    /// Most tensor elements one inference request may declare, all inputs together.
    #[arg(long, env = "KILN_MAX_REQUEST_ELEMENTS", default_value_t = 16 * 1024 * 1024)]
    max_request_elements: u64,
}

impl CallerLimitFlags {
    fn role_limits(&self) -> anyhow::Result<kiln_gateway::admission::RoleLimits> {
        use kiln_core::auth::Role;
        let mut limits = kiln_gateway::admission::RoleLimits::default();
        let pairs = |flag: &str, items: &[String]| -> anyhow::Result<Vec<(Role, f64)>> {
            items
                .iter()
                .map(|item| {
                    let (role, n) = item.split_once('=').with_context(|| {
                        format!("{flag} takes ROLE=N (e.g. infer=100), got {item:?}")
                    })?;
                    let role = Role::parse(role.trim()).with_context(|| flag.to_string())?;
                    let n: f64 = n
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
                        .with_context(|| format!("{flag}: {n:?} is not a number of at least 0"))?;
                    Ok((role, n))
                })
                .collect()
        };
        for (role, n) in pairs("--requests-per-second", &self.requests_per_second)? {
            role_slot(&mut limits, role).requests_per_second = n;
        }
        for (role, n) in pairs("--burst", &self.burst)? {
            role_slot(&mut limits, role).burst = n as u32;
        }
        for (role, n) in pairs("--max-in-flight", &self.max_in_flight)? {
            role_slot(&mut limits, role).max_in_flight = n as u32;
        }
        for (name, l) in [
            ("infer", limits.infer),
            ("train", limits.train),
            ("admin", limits.admin),
        ] {
            l.validate(&format!("{name}: "))?;
        }
        Ok(limits)
    }
}

fn role_slot(
    limits: &mut kiln_gateway::admission::RoleLimits,
    role: kiln_core::auth::Role,
) -> &mut kiln_core::auth::Limits {
    match role {
        kiln_core::auth::Role::Infer => &mut limits.infer,
        kiln_core::auth::Role::Train => &mut limits.train,
        kiln_core::auth::Role::Admin => &mut limits.admin,
    }
}

/// Caps on training jobs.
#[derive(clap::Args)]
struct LimitFlags {
    /// Most epochs one training job may ask for.
    #[arg(long, env = "KILN_MAX_EPOCHS", default_value_t = 1_000)]
    max_epochs: u32,
    /// Most rows in a job's training, validation or test data, or in an uploaded dataset.
    #[arg(long, env = "KILN_MAX_ROWS", default_value_t = 10_000_000)]
    max_rows: usize,
    /// Largest dataset upload, in MiB.
    #[arg(long, env = "KILN_MAX_UPLOAD_MIB", default_value_t = 512)]
    max_upload_mib: u64,
}

impl LimitFlags {
    fn limits(&self) -> anyhow::Result<kiln_core::training::TrainingLimits> {
        if self.max_epochs == 0 || self.max_rows == 0 || self.max_upload_mib == 0 {
            anyhow::bail!("--max-epochs, --max-rows and --max-upload-mib must be at least 1");
        }
        Ok(kiln_core::training::TrainingLimits {
            max_epochs: self.max_epochs,
            max_rows: self.max_rows,
            max_upload_bytes: self.max_upload_mib * 1024 * 1024,
        })
    }
}

#[derive(clap::Args)]
struct UpArgs {
    /// Address of the gateway's gRPC server (port 0: any free port).
    #[arg(long, env = "KILN_GRPC_ADDR", default_value = "127.0.0.1:8001")]
    grpc_addr: SocketAddr,
    /// Number of workers.
    #[arg(long, env = "KILN_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Directory for cluster state and artifacts.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    data_dir: PathBuf,
    /// Device of the workers: auto, cpu, wgpu, wgpu:N, or wgpu:cpu (a software adapter).
    #[arg(long, env = "KILN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Largest gRPC message, in MiB.
    #[arg(long, env = "KILN_MAX_MESSAGE_MIB", default_value_t = 64)]
    max_message_mib: usize,
    /// Deadline of requests that carry none, in milliseconds.
    #[arg(long, env = "KILN_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
    default_timeout_ms: u64,
    /// Write the gateway's bound address to this file once it listens (for scripts).
    #[arg(long, env = "KILN_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Token authentication: `on` (an admin token is made on first start and written to
    /// DATA_DIR/admin.token) or `off` (trusted networks only).
    #[arg(long, env = "KILN_AUTH", value_enum, default_value_t = AuthMode::On)]
    auth: AuthMode,
    #[command(flatten)]
    caller_limits: CallerLimitFlags,
    #[command(flatten)]
    limits: LimitFlags,
    /// MiB of model weights each worker may hold (0: no limit); when full, the least
    /// recently used versions give way.
    #[arg(long, env = "KILN_MODEL_MEMORY_MIB", default_value_t = 0)]
    model_memory_mib: u64,
    #[command(flatten)]
    training: TrainingFlags,
    /// Serve the Prometheus metrics of the gateway, every worker (labelled by id) and the
    /// scheduler at http://ADDR/metrics (off unless given; Triton's port is 8002).
    #[arg(long, env = "KILN_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Make a token; it is printed once and stored only as its SHA-256.
    Create {
        /// Its name (unique).
        #[arg(long)]
        name: String,
        /// What it may call: infer (inference, generation, metadata), train (training
        /// jobs, datasets) or admin (everything).
        #[arg(long)]
        role: String,
        /// Write it into etcd directly instead of asking a gateway: how the first admin
        /// token of a cluster is made (endpoints, comma-separated).
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix of the cluster's state in etcd (with --etcd).
        #[arg(long, env = "KILN_PREFIX", default_value = "/kiln/v1/")]
        prefix: String,
        /// Its own sustained requests per second (default: its role's, set by the
        /// gateway's --requests-per-second).
        #[arg(long, default_value_t = 0.0)]
        requests_per_second: f64,
        /// Requests it may send at once above its rate (default: one second's worth).
        #[arg(long, default_value_t = 0)]
        burst: u32,
        /// Its own limit of calls in flight (default: its role's).
        #[arg(long, default_value_t = 0)]
        max_in_flight: u32,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// List tokens: names, roles, fingerprints (never the tokens).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Revoke a token: every gateway refuses it within a second.
    Revoke {
        /// Its name.
        name: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Upload a CSV file (header row; numbers only), or NumPy features and labels files.
    Upload {
        /// The CSV file, or the features `.npy` file.
        file: PathBuf,
        /// The CSV file's label column (for NumPy files: a name for the labels).
        #[arg(long)]
        label: Option<String>,
        /// The labels `.npy` file, when FILE is a features `.npy` file.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// A name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// List datasets.
    List {
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Delete a dataset.
    Delete {
        /// Dataset id.
        id: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Show a job and its epochs.
    Show {
        /// Job id.
        id: String,
        /// Print JSON (full precision) instead of a table.
        #[arg(long)]
        json: bool,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Follow a job to its end.
    Watch {
        /// Job id.
        id: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Draw a job's loss and accuracy curves into a PNG file.
    Plot {
        /// Job id.
        id: String,
        /// Output file.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List models and their versions.
    List {
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Create a model (or a new version of it) from a JSON spec file.
    Create {
        /// The spec file: {"name": …, "spec": {"mlp": {…}}, "signature": …, "description": …}.
        #[arg(long)]
        spec: PathBuf,
        /// Initial weights as safetensors (default: random from --seed).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Seed of the random initial weights.
        #[arg(long)]
        seed: Option<u64>,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Import a pretrained model from a Hugging Face directory (config.json,
    /// model.safetensors, tokenizer.json; the sentence-transformers configs and
    /// tokenizer_config.json when present) or a GGUF file (llama.cpp's format). Served
    /// families: BERT encoders (sentence embeddings), BERT sequence classifiers (logits and
    /// labels) and Llama decoders (text generation). See docs/models.md.
    Import {
        /// The model directory, or a `.gguf` file.
        dir: PathBuf,
        /// Name to register it under (a new version when the model exists with the same
        /// architecture).
        #[arg(long)]
        name: String,
        /// Free text shown in listings.
        #[arg(long, default_value = "")]
        description: String,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Export a version's weights as safetensors.
    Export {
        /// `NAME` or `NAME:VERSION`.
        model: String,
        /// Output file.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Say how a model is served: replicas of each version, on which kind of worker.
    Deploy {
        /// Model name.
        model: String,
        /// Replicas of each version (0: every eligible worker).
        #[arg(long, default_value_t = 0)]
        replicas: u32,
        /// Which workers may hold it: gpu (wgpu backend), cpu, or any.
        #[arg(long, default_value = "any")]
        device: String,
        /// Split requests with more rows than this across the ready replicas (0: the
        /// model's max_batch_size).
        #[arg(long, default_value_t = 0)]
        shard_rows: u32,
        /// Most rows in one batch of each replica's batcher (with any batching flag, the
        /// others default to 64 rows, 1,024 queued requests, no delay).
        #[arg(long)]
        max_batch_size: Option<u32>,
        /// Most requests waiting in each replica's queue; beyond it, RESOURCE_EXHAUSTED.
        #[arg(long)]
        max_queue_size: Option<u32>,
        /// How long a batch's first request waits for more, in microseconds.
        #[arg(long)]
        max_queue_delay_us: Option<u64>,
        /// Keep replicas off workers that are running training when other eligible
        /// workers exist (default: on for more than one replica; unchanged when omitted).
        #[arg(long)]
        avoid_training: Option<bool>,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
    /// Point an alias (e.g. production) at a version.
    Alias {
        /// Model name.
        model: String,
        /// Alias name.
        alias: String,
        /// Version number.
        version: u64,
        /// Send part of the alias's requests to this version (a canary).
        #[arg(long, requires = "canary_weight")]
        canary: Option<u64>,
        /// The canary's share of requests, between 0 and 1 (e.g. 0.1).
        #[arg(long, requires = "canary")]
        canary_weight: Option<f64>,
        /// Gateway address.
        #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:8001")]
        addr: String,
    },
}

async fn up(args: UpArgs, server_tls: Option<kiln_rpc::tls::ServerTlsFiles>) -> anyhow::Result<()> {
    if args.max_message_mib == 0 || args.max_message_mib > 2047 {
        anyhow::bail!("--max-message-mib must be between 1 and 2047");
    }

    let config = UpConfig {
        grpc_addr: args.grpc_addr,
        workers: args.workers,
        data_dir: args.data_dir.clone(),
        device: args.device,
        gateway: GatewayConfig {
            max_message_bytes: args.max_message_mib * 1024 * 1024,
            default_timeout: Duration::from_millis(args.default_timeout_ms.max(1)),
            auth: args.auth == AuthMode::On,
            limits: args.caller_limits.role_limits()?,
            max_request_elements: args.caller_limits.max_request_elements.max(1),
            ..GatewayConfig::default()
        },
        lease_ttl: Duration::from_secs(10),
        training_limits: args.limits.limits()?,
        worker_memory_bytes: args.model_memory_mib.saturating_mul(1024 * 1024),
        training_slice: args.training.slice(),
        training_share: args.training.share()?,
        metrics_addr: args.metrics_addr,
        tls: server_tls,
    };
    let cluster = embedded::start(config).await?;
    let addr = cluster.addr;
    if let Some(path) = &args.addr_file {
        std::fs::write(path, addr.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    kiln::say!("Kiln is up: gRPC (Open Inference Protocol, kiln.v1) on {addr}");
    kiln::say!("  data directory: {}", args.data_dir.display());
    kiln::say!("  workers: {}", args.workers);
    if let Some(metrics) = args.metrics_addr {
        kiln::say!("  metrics: http://{metrics}/metrics");
    }
    let token_path = match &cluster.admin_token {
        Some(token) => {
            match &token.created {
                Some(secret) => {
                    kiln::say!();
                    kiln::say!("Authentication is on. The admin token (shown only now):");
                    kiln::say!();
                    kiln::say!("  {secret}");
                    kiln::say!();
                    kiln::say!(
                        "It is also in {} (mode 0600); the kiln CLI reads it from there.",
                        token.path.display()
                    );
                }
                None => kiln::say!(
                    "  authentication: on (admin token in {})",
                    token.path.display()
                ),
            }
            Some(token.path.clone())
        }
        None => {
            warn_auth_off(addr);
            kiln::say!(
                "  authentication: OFF (--auth off): anyone who reaches the port may do anything"
            );
            None
        }
    };
    kiln::say!();
    kiln::say!("Try it from Python (pip install 'tritonclient[grpc]' numpy):");
    kiln::say!();
    kiln::say!("  import numpy as np, tritonclient.grpc as grpcclient");
    kiln::say!("  c = grpcclient.InferenceServerClient(\"{addr}\")");
    if let Some(path) = &token_path {
        kiln::say!("  token = open(\"{}\").read().strip()", path.display());
        kiln::say!(
            "  c.register_plugin(lambda r: r.headers.update(authorization=\"Bearer \" + token))"
        );
    }
    kiln::say!("  x = grpcclient.InferInput(\"input\", [1, 10], \"FP32\")");
    kiln::say!("  x.set_data_from_numpy(np.ones((1, 10), dtype=np.float32))");
    kiln::say!(
        "  print(c.infer(\"{}\", [x]).as_numpy(\"output\"))",
        embedded::DEMO_MODEL
    );
    kiln::say!();
    kiln::say!(
        "or: kiln infer {} --addr {addr} --input '[1,2,3,4,5,6,7,8,9,10]'",
        embedded::DEMO_MODEL
    );
    kiln::shutdown_signal().await;
    kiln::say!("Shutting down…");
    cluster.stop().await
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Serving commands that probe graphics adapters: quiet on a machine with no display.
    if matches!(
        cli.command,
        Command::Up(_) | Command::Worker { .. } | Command::Bench { .. }
    ) {
        kiln::headless::quiet_vulkan_probe();
    }
    run(cli)
}

#[tokio::main]
async fn run(cli: Cli) -> std::process::ExitCode {
    // Only the serving processes trace; client commands just log.
    let service = match &cli.command {
        Command::Up(_) => Some("kiln"),
        Command::Gateway { .. } => Some("kiln-gateway"),
        Command::Worker { .. } => Some("kiln-worker"),
        Command::Scheduler { .. } => Some("kiln-scheduler"),
        _ => None,
    };
    let telemetry = match kiln_telemetry::setup::init(&cli.log, cli.log_format, &cli.trace, service)
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let data_dir = std::env::var_os("KILN_DATA_DIR")
        .map_or_else(|| PathBuf::from("./kiln-data"), PathBuf::from);
    client::set_credentials(client::Credentials {
        token: client::token_from(cli.token, &data_dir),
    });
    let tls = cli.tls;
    let result: anyhow::Result<()> = async {
        // `kiln up`'s own parts talk in-process or over loopback; every other command's
        // calls to Kiln processes use TLS when given a CA.
        if !matches!(cli.command, Command::Up(_)) {
            tls.install_client()?;
        }
        match cli.command {
            Command::Tokens { command } => {
                let out = match command {
                    TokensCommand::Create { name, role, etcd, prefix, requests_per_second, burst, max_in_flight, addr } => {
                        let limits = kiln_core::auth::Limits { requests_per_second, burst, max_in_flight };
                        let etcd_tls = tls.etcd()?;
                        let target = if etcd.is_empty() {
                            kiln::tokens::Target::Gateway(&addr)
                        } else {
                            kiln::tokens::Target::Etcd(&etcd, &prefix, etcd_tls.as_ref())
                        };
                        kiln::tokens::create(target, &name, &role, limits).await?
                    }
                    TokensCommand::List { json, addr } => kiln::tokens::list(&addr, json).await?,
                    TokensCommand::Revoke { name, addr } => kiln::tokens::revoke(&addr, &name).await?,
                };
                kiln::say!("{}", out.trim_end());
                Ok(())
            }
            Command::Up(args) => up(args, tls.server()?).await,
            Command::Status { json, addr } => {
                kiln::say!("{}", client::cluster_status(&addr, json).await?.trim_end());
                Ok(())
            }
            Command::Scheduler { cluster, id, listen, advertise, limits, addr_file } => {
                let args = kiln::cluster::SchedulerArgs {
                    id: id.unwrap_or_else(|| kiln::cluster::default_id("scheduler")),
                    listen,
                    advertise,
                    limits: limits.limits()?,
                    addr_file,
                    metrics_addr: cluster.metrics_addr,
                };
                kiln::cluster::scheduler(cluster.config(&tls)?, args, kiln::shutdown_signal()).await
            }
            Command::Worker { cluster, id, listen, advertise, device, model_memory_mib, training, addr_file } => {
                let args = kiln::cluster::WorkerArgs {
                    id: id.unwrap_or_else(|| kiln::cluster::default_id("worker")),
                    listen,
                    advertise,
                    device,
                    addr_file,
                    memory_bytes: model_memory_mib.saturating_mul(1024 * 1024),
                    metrics_addr: cluster.metrics_addr,
                    training_slice: training.slice(),
                    training_share: training.share()?,
                };
                kiln::cluster::worker(cluster.config(&tls)?, args, kiln::shutdown_signal()).await
            }
            Command::Gateway { cluster, listen, max_message_mib, default_timeout_ms, auth, caller_limits, addr_file } => {
                if max_message_mib == 0 || max_message_mib > 2047 {
                    anyhow::bail!("--max-message-mib must be between 1 and 2047");
                }
                let args = kiln::cluster::GatewayArgs {
                    listen,
                    config: GatewayConfig {
                        max_message_bytes: max_message_mib * 1024 * 1024,
                        default_timeout: Duration::from_millis(default_timeout_ms.max(1)),
                        auth: auth == AuthMode::On,
                        limits: caller_limits.role_limits()?,
                        max_request_elements: caller_limits.max_request_elements.max(1),
                        ..GatewayConfig::default()
                    },
                    addr_file,
                    metrics_addr: cluster.metrics_addr,
                };
                kiln::cluster::gateway(cluster.config(&tls)?, args, kiln::shutdown_signal()).await
            }
            Command::Bench { concurrency, batch, seconds, device, hidden, output } => {
                if concurrency.iter().chain(&batch).any(|n| *n == 0 || *n > 4096) || seconds == 0 {
                    anyhow::bail!("--concurrency and --batch take numbers from 1 to 4096, --seconds at least 1");
                }
                let cells = kiln::bench::run(kiln::bench::BenchConfig {
                    concurrency,
                    batch,
                    duration: Duration::from_secs(seconds),
                    device,
                    hidden,
                })
                .await?;
                let table = kiln::bench::table(&cells);
                kiln::say!("{}", table.trim_end());
                if let Some(path) = output {
                    std::fs::write(&path, &table).with_context(|| format!("cannot write {}", path.display()))?;
                }
                Ok(())
            }
            Command::Train { file, epochs, batch_size, learning_rate, model, seed, workers, key, detach, addr } => {
                let overrides = kiln::train::Overrides { epochs, batch_size, learning_rate, workers, model_name: model, seed };
                kiln::say!("{}", kiln::train::train(&addr, &file, &overrides, key, detach).await?);
                Ok(())
            }
            Command::Datasets { command } => {
                let out = match command {
                    DatasetsCommand::Upload {
                        file,
                        label,
                        labels,
                        name,
                        addr,
                    } => {
                        kiln::datasets::upload(&addr, &file, label.as_deref(), labels.as_deref(), name)
                            .await?
                    }
                    DatasetsCommand::List { addr } => kiln::datasets::datasets(&addr).await?,
                    DatasetsCommand::Delete { id, addr } => kiln::datasets::delete_dataset(&addr, &id).await?,
                };
                kiln::say!("{}", out.trim_end());
                Ok(())
            }
            Command::Jobs { command } => {
                let out = match command {
                    JobsCommand::List { addr } => kiln::jobs::list(&addr).await?,
                    JobsCommand::Show { id, json, addr } => kiln::jobs::show(&addr, &id, json).await?,
                    JobsCommand::Watch { id, addr } => kiln::jobs::watch_job(&addr, &id).await?,
                    JobsCommand::Cancel { id, addr } => kiln::jobs::cancel(&addr, &id).await?,
                    JobsCommand::Plot { id, output, addr } => kiln::jobs::plot(&addr, &id, &output).await?,
                };
                kiln::say!("{}", out.trim_end());
                Ok(())
            }
            Command::Infer { model, input, addr } => {
                let out = client::infer(&addr, &model, &input).await?;
                kiln::say!("{}", serde_json::to_string_pretty(&out)?);
                Ok(())
            }
            Command::Generate {
                model, prompt, chat, system, max_tokens, temperature, top_p, top_k, seed, stop,
                ignore_eos, logprobs, json, stats, addr,
            } => {
                let sampling = kiln_proto::kiln::v1::SamplingParameters {
                    temperature,
                    top_p,
                    top_k,
                    max_tokens,
                    stop,
                    seed,
                    ignore_eos,
                    logprobs,
                };
                let (name, version) = match model.split_once(':') {
                    Some((n, v)) => (n.to_owned(), v.parse::<u64>().context("VERSION must be a number")?),
                    None => (model.clone(), 0),
                };
                let messages = if chat {
                    let mut m = Vec::new();
                    if let Some(system) = system {
                        m.push(("system".to_owned(), system));
                    }
                    m.push(("user".to_owned(), prompt.clone()));
                    m
                } else {
                    Vec::new()
                };
                let prompt = if chat { String::new() } else { prompt };
                let output = if json {
                    client::GenerateOutput::Json
                } else if stats {
                    client::GenerateOutput::TextWithStats
                } else {
                    client::GenerateOutput::Text
                };
                client::generate(&addr, &name, version, prompt, messages, sampling, output).await
            }
            Command::Models { command } => match command {
                ModelsCommand::List { addr } => {
                    kiln::say!("{}", client::models_list(&addr).await?.trim_end());
                    Ok(())
                }
                ModelsCommand::Create { spec, weights, seed, addr } => {
                    let v = client::models_create(&addr, &spec, weights.as_deref(), seed).await?;
                    kiln::say!("created {} version {} (sha256 {})", v.model, v.version, v.sha256);
                    Ok(())
                }
                ModelsCommand::Import { dir, name, description, addr } => {
                    let v = client::models_import(&addr, &dir, &name, &description).await?;
                    kiln::say!("imported {} version {} (sha256 {})", v.model, v.version, v.sha256);
                    Ok(())
                }
                ModelsCommand::Export { model, output, addr } => {
                    let v = client::models_export(&addr, &model, &output).await?;
                    kiln::say!("wrote {} version {} to {} ({} bytes, sha256 {})", v.model, v.version, output.display(), v.size_bytes, v.sha256);
                    Ok(())
                }
                ModelsCommand::Deploy { model, replicas, device, shard_rows, max_batch_size, max_queue_size, max_queue_delay_us, avoid_training, addr } => {
                    let batching = (max_batch_size.is_some() || max_queue_size.is_some() || max_queue_delay_us.is_some())
                        .then(|| kiln_proto::kiln::v1::Batching {
                            max_batch_size: max_batch_size.unwrap_or(64),
                            max_queue_size: max_queue_size.unwrap_or(1024),
                            max_queue_delay_us: max_queue_delay_us.unwrap_or(0),
                        });
                    let d = client::models_deploy(&addr, &model, replicas, &device, shard_rows, batching, avoid_training).await?;
                    let replicas = if d.replicas == 0 { "every eligible worker".to_owned() } else { format!("{} replicas", d.replicas) };
                    let class = match kiln_proto::kiln::v1::DeviceClass::try_from(d.device) {
                        Ok(kiln_proto::kiln::v1::DeviceClass::Gpu) => "gpu",
                        Ok(kiln_proto::kiln::v1::DeviceClass::Cpu) => "cpu",
                        _ => "any",
                    };
                    kiln::say!("{}: {replicas} of each version, on {class} workers", d.model);
                    if d.avoid_training {
                        kiln::say!("  kept off workers that are running training while others can serve it");
                    }
                    if let Some(b) = d.batching {
                        kiln::say!("  batching: at most {} rows a batch, {} queued requests, {} µs delay", b.max_batch_size, b.max_queue_size, b.max_queue_delay_us);
                    }
                    Ok(())
                }
                ModelsCommand::Alias { model, alias, version, canary, canary_weight, addr } => {
                    let canary = canary.zip(canary_weight);
                    let a = client::models_alias(&addr, &model, &alias, version, canary).await?;
                    if a.canary_version > 0 {
                        kiln::say!("{}:{} -> version {} ({:.1}% to version {})", a.model, a.alias, a.version, a.canary_weight * 100.0, a.canary_version);
                    } else {
                        kiln::say!("{}:{} -> version {}", a.model, a.alias, a.version);
                    }
                    Ok(())
                }
            },
        }
    }
    .await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
