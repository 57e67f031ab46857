//! `kiln serve`: the KServe Open Inference Protocol v2 server (HTTP + gRPC).

use crate::Failure;
use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// A model file (served under its file stem, version 1) or a repository
    /// folder laid out as <model>/<version>/model.onnx with optional <model>/config.json.
    pub path: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP/REST port (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    /// gRPC port (0: any free port).
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Serve no gRPC endpoint.
    #[arg(long)]
    pub no_grpc: bool,
    /// Compute threads that run inference (default: the machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest request body / gRPC message accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Default largest dynamic batch (sum of dim 0 over merged requests).
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// Default time the first request of a batch waits for others, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_us: u64,
    /// Default number of queued requests per model before 429.
    #[arg(long, default_value_t = 128)]
    pub max_queue_size: usize,
    /// Default number of batches per model running at once (one run already
    /// uses every compute thread).
    #[arg(long, default_value_t = 1)]
    pub max_concurrency: usize,
    /// Default per-request time limit in milliseconds (0: none).
    #[arg(long, default_value_t = 30000)]
    pub timeout_ms: u64,
    /// Turn dynamic batching off by default.
    #[arg(long)]
    pub no_batching: bool,
}

pub fn serve(args: ServeArgs) -> Result<(), Failure> {
    if args.threads == Some(0) {
        return Err(Failure::usage("--threads must be at least 1"));
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let cfg = kiln_serve::ServeConfig {
        path: args.path,
        host: args.host,
        http_port: args.http_port,
        grpc_port: (!args.no_grpc).then_some(args.grpc_port),
        threads,
        max_body_bytes: args.max_body_mb.saturating_mul(1 << 20),
        model_defaults: kiln_serve::ModelConfig {
            max_batch_size: args.max_batch_size.max(1),
            max_queue_delay_us: args.max_queue_delay_us,
            max_queue_size: args.max_queue_size.max(1),
            max_concurrency: args.max_concurrency.max(1),
            timeout_ms: args.timeout_ms,
            dynamic_batching: !args.no_batching,
        },
    };
    kiln_serve::serve(cfg).map_err(Failure::error)
}
