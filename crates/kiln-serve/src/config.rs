//! Server and per-model configuration.

use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;

/// Per-model scheduling settings (`<model>/config.json` in a repository; every
/// field optional, missing ones take the server's defaults).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Largest batch (sum of dim 0 over the requests merged) dynamic batching forms.
    pub max_batch_size: usize,
    /// How long the first request of a batch waits for company, in microseconds.
    pub max_queue_delay_us: u64,
    /// Requests waiting beyond this are refused at once (429 / RESOURCE_EXHAUSTED).
    pub max_queue_size: usize,
    /// Batches of this model running at the same time. Default 1: one run
    /// already keeps every compute thread busy, and two interleaved on the
    /// same pool only thrash caches (MobileNetV2 on 2 cores, 16 clients,
    /// batching on: 132 req/s and p99 148 ms at 1, 101 req/s and p99 714 ms
    /// at 2).
    pub max_concurrency: usize,
    /// Per-request time limit, queueing included (0: none).
    pub timeout_ms: u64,
    /// Merge queued requests along dim 0 (only for models whose dim 0 is symbolic
    /// on every input and output).
    pub dynamic_batching: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: 8,
            max_queue_delay_us: 2000,
            max_queue_size: 128,
            max_concurrency: 1,
            timeout_ms: 30_000,
            dynamic_batching: true,
        }
    }
}

/// A `config.json` as written: every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigFile {
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    pub max_queue_size: Option<usize>,
    pub max_concurrency: Option<usize>,
    pub timeout_ms: Option<u64>,
    pub dynamic_batching: Option<bool>,
}

impl ModelConfigFile {
    pub fn apply(&self, base: &ModelConfig) -> ModelConfig {
        ModelConfig {
            max_batch_size: self.max_batch_size.unwrap_or(base.max_batch_size).max(1),
            max_queue_delay_us: self.max_queue_delay_us.unwrap_or(base.max_queue_delay_us),
            max_queue_size: self.max_queue_size.unwrap_or(base.max_queue_size).max(1),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency).max(1),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            dynamic_batching: self.dynamic_batching.unwrap_or(base.dynamic_batching),
        }
    }
}

/// Everything `kiln serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// A model file, or a repository folder `<model>/<version>/model.onnx`.
    pub path: PathBuf,
    pub host: IpAddr,
    pub http_port: u16,
    /// `None`: no gRPC endpoint.
    pub grpc_port: Option<u16>,
    /// Compute threads (inference runs only on these).
    pub threads: usize,
    /// Largest request body (REST) or message (gRPC) accepted, in bytes.
    pub max_body_bytes: usize,
    /// Defaults for models without a `config.json` (or fields it leaves out).
    pub model_defaults: ModelConfig,
}
