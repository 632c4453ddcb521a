//! `kiln-bench`: the servers and clients Kiln's benchmarks need and its users do not, kept
//! out of the production `kiln` binary. The scripts under `bench/` run them; what each
//! measures is in docs/benchmarks.md.

#![forbid(unsafe_code)]

mod floor;
mod oip;
mod otlp_sink;
mod placement;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// The same allocator as `kiln`, so the client's cost is measured as shipped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln-bench",
    version,
    about = "Benchmark servers and clients for Kiln (see docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive ModelInfer on any Open Inference Protocol server (Kiln, Triton, MLServer, the
    /// floor) with one closed-loop client; prints one JSON line per cell.
    Oip {
        /// The server's gRPC address.
        #[arg(long, default_value = "127.0.0.1:8001")]
        addr: String,
        /// The model to call.
        #[arg(long)]
        model: String,
        /// Its input tensor's name.
        #[arg(long, default_value = "input")]
        input: String,
        /// FP32 features per row.
        #[arg(long, default_value_t = 10)]
        width: usize,
        /// Ask for this output by name (e.g. predict_proba from MLServer's sklearn runtime).
        #[arg(long)]
        output: Option<String>,
        /// Concurrent callers, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Rows per request, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        batch: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// A bare OIP server that answers every ModelInfer with a canned response (the floor
    /// Kiln is measured against; see bench/serving).
    Floor {
        /// Address to listen on.
        #[arg(long, env = "KILN_FLOOR_ADDR", default_value = "127.0.0.1:8011")]
        listen: std::net::SocketAddr,
        /// The model name it answers to.
        #[arg(long, default_value = "mlp")]
        model: String,
        /// FP32 features per row.
        #[arg(long, default_value_t = 10)]
        inputs: usize,
        /// FP32 outputs per row.
        #[arg(long, default_value_t = 1)]
        outputs: usize,
        /// The max_batch_size its ModelConfig reports.
        #[arg(long, default_value_t = 64)]
        max_batch_size: i32,
    },
    /// An OTLP/gRPC trace receiver that counts spans and keeps none (the collector of the
    /// tracing benchmark; see bench/tracing).
    OtlpSink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: std::net::SocketAddr,
        /// Keep the number of spans received so far in this file.
        #[arg(long)]
        count_file: Option<PathBuf>,
    },
    /// Time the placement controller on a simulated cluster (in-memory registry): one full
    /// reconcile pass, and the reaction to one worker's loss.
    Placement {
        /// Simulated workers.
        #[arg(long, default_value_t = 1_000)]
        workers: usize,
        /// Simulated model versions (ten per model).
        #[arg(long, default_value_t = 10_000)]
        versions: usize,
        /// Replicas per version.
        #[arg(long, default_value_t = 2)]
        replicas: u32,
    },
}

/// The `--listen` address, bound.
async fn bind(listen: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--listen)"))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Oip {
            addr,
            model,
            input,
            width,
            output,
            concurrency,
            batch,
            seconds,
        } => {
            anyhow::ensure!(seconds > 0, "--seconds must be at least 1");
            anyhow::ensure!(width > 0, "--width must be at least 1");
            anyhow::ensure!(
                concurrency.iter().all(|n| (1..=4096).contains(n)),
                "--concurrency takes values from 1 to 4096"
            );
            anyhow::ensure!(
                batch.iter().all(|n| (1..=1 << 20).contains(n)),
                "--batch takes values from 1 to 1048576"
            );
            let load = oip::OipLoad {
                addr,
                model,
                input,
                width,
                output,
                concurrency,
                batch,
                duration: std::time::Duration::from_secs(seconds),
            };
            oip::run_oip(load).await?;
            Ok(())
        }
        Command::Floor {
            listen,
            model,
            inputs,
            outputs,
            max_batch_size,
        } => {
            let listener = bind(listen).await?;
            println!("floor server on {}", listener.local_addr()?);
            let config = floor::FloorConfig {
                model,
                inputs,
                outputs,
                max_batch_size,
            };
            floor::serve(config, listener, kiln::shutdown_signal()).await?;
            Ok(())
        }
        Command::OtlpSink { listen, count_file } => {
            let listener = bind(listen).await?;
            println!("OTLP sink on {}", listener.local_addr()?);
            otlp_sink::serve(listener, count_file, kiln::shutdown_signal()).await
        }
        Command::Placement {
            workers,
            versions,
            replicas,
        } => {
            let report = placement::run(workers, versions, replicas).await?;
            println!("{}", report.markdown().trim_end());
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
