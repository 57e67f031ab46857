//! The `kiln` command: run, inspect, benchmark and serve ONNX models, and show
//! what the hardware can do (`kiln hw`).

mod bench;
mod bench_server;
mod flops;
mod hw;
mod inspect;
mod npy;
mod run;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Large blocks start on a cache line, so the GEMM can stream outputs too
/// big to stay cached (see `kiln_runtime::LargeAligned`).
#[global_allocator]
static ALLOC: kiln_runtime::LargeAligned = kiln_runtime::LargeAligned;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Compile and run ONNX models on the hardware you have"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on inputs from files, or on random inputs when none are given.
    Run(run::RunArgs),
    /// Show a model's inputs, outputs, opsets, op types, parameters and FLOPs.
    Inspect(inspect::InspectArgs),
    /// Benchmark a model: load time, latency percentiles, throughput, peak memory,
    /// GFLOP/s against the machine's peak, and a per-op profile (--profile).
    /// With --server URL, load a running KServe v2 server instead.
    Bench(bench::BenchArgs),
    /// Show this machine's ISA features, cores, caches and measured peak
    /// FLOP/s and memory bandwidth.
    Hw(hw::HwArgs),
    /// Serve models over the KServe Open Inference Protocol v2 (HTTP + gRPC).
    Serve(serve::ServeArgs),
}

/// A failure with the exit code the CLI contract gives it.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Exit 1: invalid model, bad input, I/O.
    pub fn error(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// Exit 2: the command line itself is wrong.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<kiln_runtime::Error> for Failure {
    fn from(e: kiln_runtime::Error) -> Failure {
        // Exit 3: the model needs something kiln does not support yet.
        Failure {
            code: if e.is_unsupported() { 3 } else { 1 },
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs its lifecycle at info; the one-shot commands stay quiet.
    let default_log = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    // A bug must still end in one clear line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // `println!` panics when stdout is a closed pipe (`kiln inspect m | head`):
        // end quietly like any Unix filter does (128 + SIGPIPE).
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        eprintln!("error: internal error (please report): {msg}{at}");
    }));

    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Run(args) => run::run(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Serve(args) => serve::serve(args),
        Command::Bench(args) => bench::bench(args),
        Command::Hw(args) => hw::hw(args),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(f)) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
        Err(_) => ExitCode::from(1),
    }
}
