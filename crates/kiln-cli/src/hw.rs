//! `kiln hw`: what this machine is (ISA features, cores, caches) and what it
//! sustains (measured peak FLOP/s and memory bandwidth).

use crate::Failure;
use clap::Args;
use kiln_hw::{Measured, Source};
use serde_json::json;

#[derive(Args)]
pub struct HwArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Use the cached measurement when there is one for this hardware, instead
    /// of measuring again (about a second).
    #[arg(long)]
    pub cached: bool,
    /// Threads to measure the peaks with (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

pub fn hw(args: HwArgs) -> Result<(), Failure> {
    let cpu = kiln_hw::cpu();
    let threads = match args.threads {
        Some(0) => return Err(Failure::usage("--threads must be at least 1")),
        Some(n) => n,
        None => cpu.cores,
    };
    let (m, source) = kiln_hw::measured(threads, args.cached);
    if args.json {
        let out = json!({
            "arch": cpu.arch,
            "model_name": cpu.model_name,
            "cores": cpu.cores,
            "features": cpu.features,
            "caches": {
                "l1d_bytes": cpu.caches.l1d,
                "l2_bytes": cpu.caches.l2,
                "l3_bytes": cpu.caches.l3,
            },
            "gemm_kernel": gemm_kernel(),
            "measured": measured_json(&m),
            "measured_from_cache": source == Source::Cache,
            "cache_file": kiln_hw::default_cache_path().map(|p| p.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!(
        "cpu:        {}",
        cpu.model_name.as_deref().unwrap_or("unknown")
    );
    println!("arch:       {}", cpu.arch);
    println!("cores:      {}", cpu.cores);
    println!("features:   {}", cpu.features.join(" "));
    let size = |b: Option<usize>| {
        b.map(crate::inspect::human_bytes)
            .unwrap_or_else(|| "unknown".into())
    };
    println!(
        "caches:     L1d {}, L2 {}, L3 {}",
        size(cpu.caches.l1d),
        size(cpu.caches.l2),
        size(cpu.caches.l3)
    );
    if let Some(k) = gemm_kernel() {
        println!("gemm:       {k}");
    }
    let from = match source {
        Source::Cache => " (cached; `kiln hw` without --cached measures again)",
        Source::Fresh => "",
    };
    println!("measured with {} thread(s){from}:", m.threads);
    println!(
        "  peak f32:   {:.1} GFLOP/s ({} loop)",
        m.peak_f32_gflops, m.f32_path
    );
    match m.peak_bf16_gflops {
        Some(v) => println!("  peak bf16:  {v:.1} GFLOP/s (vdpbf16ps)"),
        None => println!("  peak bf16:  n/a (no AVX512_BF16)"),
    }
    match m.peak_int8_gops {
        Some(v) => println!("  peak int8:  {v:.1} GOP/s (vpdpbusd)"),
        None => println!("  peak int8:  n/a (no AVX512_VNNI)"),
    }
    println!(
        "  memory:     {:.1} GB/s (read+write stream)",
        m.mem_bandwidth_gbs
    );
    println!(
        "  ridge:      {:.1} FLOP/byte (f32 peak / bandwidth: ops below it are memory-bound)",
        m.peak_f32_gflops / m.mem_bandwidth_gbs
    );
    Ok(())
}

pub fn measured_json(m: &Measured) -> serde_json::Value {
    json!({
        "threads": m.threads,
        "peak_f32_gflops": m.peak_f32_gflops,
        "f32_path": m.f32_path,
        "peak_bf16_gflops": m.peak_bf16_gflops,
        "peak_int8_gops": m.peak_int8_gops,
        "mem_bandwidth_gbs": m.mem_bandwidth_gbs,
    })
}

/// The GEMM micro-kernel kiln-gemm dispatches to on this CPU.
fn gemm_kernel() -> Option<String> {
    Some(kiln_gemm::selected_kernel().to_string())
}
