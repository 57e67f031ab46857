//! `kiln bench --server URL`: load a running KServe v2 server (kiln serve or any
//! other) and report throughput, latency percentiles and errors. A thin adapter:
//! the load generator itself is `kiln_serve::loadgen`, compiled and tested there.

use crate::Failure;
use kiln_serve::loadgen::{self, LoadConfig, TensorFormat};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerBenchArgs {
    /// Base URL of a running kiln serve / KServe v2 server (loopback only), e.g. http://127.0.0.1:8000
    #[arg(long)]
    pub server: Option<String>,
    /// Model name on the server
    #[arg(long = "model")]
    pub model_name: Option<String>,
    /// Model version on the server (default: the server's choice)
    #[arg(long)]
    pub model_version: Option<String>,
    /// Closed loop: clients each sending one request after another
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Seconds to send requests for (requests in flight at the end are awaited)
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Poisson arrivals at this many requests per second (open loop) instead of closed loop
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: most requests outstanding at once; an arrival past it counts as dropped
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Stop after this many requests even if the duration has not passed
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Per-request time limit in milliseconds (a request past it counts as a timeout)
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Size of dim 0 of every input of each request (replaces a -1 batch dim)
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Shape of an input, NAME=D,D,... (replaces the model's metadata shape)
    #[arg(long = "shape", value_name = "NAME=D,D,...")]
    pub shapes: Vec<String>,
    /// How tensors travel: the binary tensor extension or JSON lists
    #[arg(long, value_parser = ["binary", "json"], default_value = "binary")]
    pub tensor_format: String,
    /// Seed of the random input data and the Poisson arrivals
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &ServerBenchArgs, json: bool) -> Result<(), Failure> {
    let server = args
        .server
        .clone()
        .ok_or_else(|| Failure::usage("--server URL is required to load a server"))?;
    let model = args
        .model_name
        .clone()
        .ok_or_else(|| Failure::usage("--model NAME is required with --server"))?;
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 86_400.0) {
        return Err(Failure::usage(
            "--duration must be between 0 and 86400 seconds",
        ));
    }
    let shapes = args
        .shapes
        .iter()
        .map(|s| loadgen::parse_shape_override(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let cfg = LoadConfig {
        server,
        model,
        model_version: args.model_version.clone(),
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.duration),
        rate: args.rate,
        max_in_flight: args.max_in_flight,
        max_requests: args.max_requests,
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        batch_size: args.batch_size,
        shapes,
        format: if args.tensor_format == "json" {
            TensorFormat::Json
        } else {
            TensorFormat::Binary
        },
        seed: args.seed,
    };
    let report = loadgen::run_blocking(&cfg).map_err(|e| Failure {
        code: if e.is_usage() { 2 } else { 1 },
        message: e.to_string(),
    })?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    if report.ok == 0 {
        return Err(Failure::error(format!(
            "no request succeeded ({} sent)",
            report.sent
        )));
    }
    Ok(())
}
