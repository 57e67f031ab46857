//! `kiln bench`: how fast a model runs here. Load+compile time, latency
//! percentiles over timed runs, throughput, peak memory, achieved GFLOP/s and
//! its share of the machine's measured peak; with `--profile`, where the time
//! goes per op type and per node, each placed on the roofline.
//!
//! `kiln bench --server URL` loads a running server instead (`bench_server`).

use crate::bench_server::ServerBenchArgs;
use crate::flops::{self, Shape};
use crate::run::parse_dims;
use crate::Failure;
use clap::Args;
use kiln_ir::{DType, Dim, Node, Tensor};
use kiln_runtime::{IoInfo, NodeTiming, Session, SessionOptions, Value};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// The ONNX model file (not with --server).
    pub model: Option<PathBuf>,
    /// An input as `[NAME=]PATH` (.npy, or a .pb TensorProto); inputs without a
    /// name bind to the model's inputs in order. Inputs not given are random.
    #[arg(long = "input", short = 'i', value_name = "[NAME=]PATH")]
    pub inputs: Vec<String>,
    /// Value of a symbolic dimension, as NAME=VALUE: fixed at load, so the
    /// plan is compiled for it (as ONNX Runtime's free dimension overrides;
    /// with --no-optimize too); inputs given with --input must then have
    /// it. Random inputs use it (other symbolic dims there: 1).
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    pub dims: Vec<String>,
    /// Timed runs.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub iterations: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub warmup: usize,
    /// Compute threads (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Stop starting new runs after this many seconds (warmup included; at
    /// least one timed run always happens).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub max_seconds: f64,
    /// Time every node: per op type and per node, time, share, FLOPs, bytes,
    /// GFLOP/s, GB/s, and whether it is compute- or memory-bound.
    #[arg(long)]
    pub profile: bool,
    /// How many nodes the text profile lists (the JSON has all).
    #[arg(long, default_value_t = 15, value_name = "N")]
    pub top: usize,
    /// Run the graph as loaded, without the optimizer.
    #[arg(long)]
    pub no_optimize: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerBenchArgs,
}

pub fn bench(args: BenchArgs) -> Result<(), Failure> {
    if args.server.server.is_some() {
        if args.model.is_some() {
            return Err(Failure::usage(
                "give either a MODEL file or --server URL, not both",
            ));
        }
        return crate::bench_server::run(&args.server, args.json);
    }
    let model = args
        .model
        .clone()
        .ok_or_else(|| Failure::usage("kiln bench needs a MODEL file (or --server URL)"))?;
    if args.iterations == 0 {
        return Err(Failure::usage("--iterations must be at least 1"));
    }
    if args.threads == Some(0) {
        return Err(Failure::usage("--threads must be at least 1"));
    }
    if !(args.max_seconds > 0.0) {
        return Err(Failure::usage("--max-seconds must be positive"));
    }
    let dims = parse_dims(&args.dims)?;

    let options = SessionOptions {
        threads: args.threads,
        optimize: !args.no_optimize,
        fixed_dims: dims.clone(),
        ..SessionOptions::default()
    };
    let t0 = Instant::now();
    let session = Session::load(&model, &options)?;
    let load = t0.elapsed();
    crate::run::warn_unused_dims(&session, &dims);

    let inputs = build_inputs(session.inputs(), &args.inputs, &dims, args.server.seed)?;
    let bindings = bind_dims(session.inputs(), &inputs);
    let nodes = node_map(&session);

    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    // The first run is profiled even without --profile: it gives the shapes
    // every node saw, from which the FLOP count is exact.
    let mut first_profile: Option<Vec<NodeTiming>> = None;
    let mut warmed = 0;
    while warmed < args.warmup && Instant::now() < deadline {
        if first_profile.is_none() {
            first_profile = Some(session.run_profiled(inputs.clone())?.1);
        } else {
            drop(session.run(inputs.clone())?);
        }
        warmed += 1;
    }
    let mut profile = Profile::default();
    let mut latencies = Vec::with_capacity(args.iterations);
    let mut stopped_early = false;
    for i in 0..args.iterations {
        let feed = inputs.clone();
        let t = Instant::now();
        if args.profile || first_profile.is_none() {
            let (out, timings) = session.run_profiled(feed)?;
            latencies.push(t.elapsed());
            drop(out);
            if args.profile {
                profile.add(&timings, &nodes);
            }
            first_profile.get_or_insert(timings);
        } else {
            let out = session.run(feed)?;
            latencies.push(t.elapsed());
            drop(out);
        }
        if i + 1 < args.iterations && Instant::now() >= deadline {
            stopped_early = true;
            break;
        }
    }

    let (flop_total, flops_complete, flops_source) = match &first_profile {
        Some(t) => {
            let per_node: Vec<Option<u128>> = t.iter().map(|t| timing_flops(t, &nodes)).collect();
            (
                per_node.iter().flatten().sum::<u128>(),
                per_node.iter().all(Option::is_some),
                "profiled run",
            )
        }
        None => {
            let f = flops::estimate_graph(session.graph(), &bindings);
            (f.total, f.unknown_nodes == 0, "graph")
        }
    };
    let stats = Stats::new(&latencies);
    let (peak, _) = kiln_hw::measured(session.threads(), true);
    let gflops = flop_total as f64 / stats.mean_s / 1e9;
    let report = Report {
        model: &model,
        session: &session,
        inputs: &inputs,
        load,
        warmup: warmed,
        stats: &stats,
        latencies: &latencies,
        stopped_early,
        flops: flop_total,
        flops_complete,
        flops_source,
        gflops,
        peak: &peak,
        rss: peak_rss_bytes(),
        optimize: !args.no_optimize,
    };
    if args.json {
        let mut out = report.json();
        if args.profile {
            out["profile"] = profile.json(&peak);
        }
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        report.print();
        if args.profile {
            profile.print(&peak, args.top, stats.mean_s);
        }
    }
    Ok(())
}

/// The session's nodes by name (profiles look up each timed node's op).
fn node_map(session: &Session) -> HashMap<&str, &Node> {
    session
        .graph()
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect()
}

/// Prints one profiled run (`kiln run --profile`) the way `bench --profile` does.
pub(crate) fn print_profile(session: &Session, timings: &[NodeTiming], top: usize, run_s: f64) {
    let nodes = node_map(session);
    let mut profile = Profile::default();
    profile.add(timings, &nodes);
    let (peak, _) = kiln_hw::measured(session.threads(), true);
    println!();
    profile.print(&peak, top, run_s);
}

struct Report<'a> {
    model: &'a Path,
    session: &'a Session,
    inputs: &'a [(String, Tensor)],
    load: Duration,
    warmup: usize,
    stats: &'a Stats,
    latencies: &'a [Duration],
    stopped_early: bool,
    flops: u128,
    flops_complete: bool,
    flops_source: &'static str,
    gflops: f64,
    peak: &'a kiln_hw::Measured,
    rss: Option<u64>,
    optimize: bool,
}

impl Report<'_> {
    fn json(&self) -> serde_json::Value {
        let ms = |s: f64| s * 1e3;
        let shapes: serde_json::Map<String, serde_json::Value> = self
            .inputs
            .iter()
            .map(|(n, t)| (n.clone(), json!(t.shape())))
            .collect();
        json!({
            "model": self.model.display().to_string(),
            "threads": self.session.threads(),
            "optimize": self.optimize,
            "shapes": shapes,
            "load_ms": ms(self.load.as_secs_f64()),
            "warmup": self.warmup,
            "iterations": self.latencies.len(),
            "stopped_early": self.stopped_early,
            "latency_ms": {
                "p50": ms(self.stats.p50_s),
                "p90": ms(self.stats.p90_s),
                "p99": ms(self.stats.p99_s),
                "mean": ms(self.stats.mean_s),
                "min": ms(self.stats.min_s),
                "max": ms(self.stats.max_s),
                "stddev": ms(self.stats.stddev_s),
            },
            "latencies_ms": self.latencies.iter().map(|d| ms(d.as_secs_f64())).collect::<Vec<_>>(),
            "throughput_per_s": 1.0 / self.stats.mean_s,
            "peak_rss_bytes": self.rss,
            "flops": self.flops as f64,
            "flops_complete": self.flops_complete,
            "flops_source": self.flops_source,
            "gflops": self.gflops,
            "peak_share": self.gflops / self.peak.peak_f32_gflops,
            "hw": crate::hw::measured_json(self.peak),
        })
    }

    fn print(&self) {
        let s = self.stats;
        let ms = |v: f64| format!("{:.3} ms", v * 1e3);
        println!(
            "model:      {} ({} thread(s), {})",
            self.model.display(),
            self.session.threads(),
            if self.optimize {
                "optimized"
            } else {
                "not optimized"
            }
        );
        for (name, t) in self.inputs {
            println!("input:      {name}: {} {:?}", t.dtype(), t.shape());
        }
        println!(
            "load:       {:.1} ms (parse, infer, optimize, compile)",
            self.load.as_secs_f64() * 1e3
        );
        let early = if self.stopped_early {
            " (stopped early: --max-seconds)"
        } else {
            ""
        };
        println!(
            "runs:       {} timed after {} warmup{early}",
            self.latencies.len(),
            self.warmup
        );
        println!(
            "latency:    p50 {}  p90 {}  p99 {}  mean {}  min {}",
            ms(s.p50_s),
            ms(s.p90_s),
            ms(s.p99_s),
            ms(s.mean_s),
            ms(s.min_s)
        );
        println!("throughput: {:.2} runs/s", 1.0 / s.mean_s);
        match self.rss {
            Some(b) => println!("peak RSS:   {}", crate::inspect::human_bytes(b as usize)),
            None => println!("peak RSS:   unknown"),
        }
        let lower = if self.flops_complete {
            ""
        } else {
            " (lower bound: some nodes could not be counted)"
        };
        println!(
            "compute:    {}FLOP per run{lower}, {:.2} GFLOP/s = {:.1}% of the measured f32 peak ({:.1} GFLOP/s on {} thread(s))",
            crate::inspect::human_count(self.flops as f64),
            self.gflops,
            100.0 * self.gflops / self.peak.peak_f32_gflops,
            self.peak.peak_f32_gflops,
            self.peak.threads
        );
    }
}

/// Latency statistics, in seconds.
struct Stats {
    p50_s: f64,
    p90_s: f64,
    p99_s: f64,
    mean_s: f64,
    min_s: f64,
    max_s: f64,
    stddev_s: f64,
}

impl Stats {
    /// `samples` must not be empty.
    fn new(samples: &[Duration]) -> Stats {
        let mut v: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Stats {
            p50_s: percentile(&v, 50.0),
            p90_s: percentile(&v, 90.0),
            p99_s: percentile(&v, 99.0),
            mean_s: mean,
            min_s: v[0],
            max_s: v[v.len() - 1],
            stddev_s: var.sqrt(),
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One node's (or one op type's) accumulated profile.
#[derive(Default, Clone)]
struct Entry {
    op: String,
    seconds: f64,
    nodes: usize,
    flops: Option<u128>,
    bytes: u128,
    inputs: Vec<Shape>,
    outputs: Vec<Shape>,
}

#[derive(Default)]
struct Profile {
    runs: usize,
    /// Per node, in first-execution order.
    nodes: Vec<(String, Entry)>,
    index: HashMap<String, usize>,
}

fn shapes(v: &[Option<(DType, Vec<usize>)>]) -> Vec<Shape> {
    v.iter()
        .map(|s| s.as_ref().map(|(_, s)| s.clone()))
        .collect()
}

fn bytes(v: &[Option<(DType, Vec<usize>)>]) -> u128 {
    v.iter()
        .flatten()
        .map(|(d, s)| d.size() as u128 * s.iter().map(|&x| x as u128).product::<u128>())
        .sum()
}

fn timing_flops(t: &NodeTiming, nodes: &HashMap<&str, &Node>) -> Option<u128> {
    let node = nodes.get(t.node.as_str())?;
    flops::node_flops(&node.op, &shapes(&t.inputs), &shapes(&t.outputs))
}

/// Where an op sits on the roofline of `peak`.
struct Roofline {
    gflops: f64,
    gbs: f64,
    /// FLOPs per byte moved.
    intensity: Option<f64>,
    bound: &'static str,
    /// Achieved GFLOP/s over what the roofline allows at this intensity.
    of_roofline: Option<f64>,
}

fn roofline(flops: Option<u128>, bytes: u128, seconds: f64, peak: &kiln_hw::Measured) -> Roofline {
    let f = flops.unwrap_or(0) as f64;
    let b = bytes as f64;
    let gflops = if seconds > 0.0 {
        f / seconds / 1e9
    } else {
        0.0
    };
    let gbs = if seconds > 0.0 {
        b / seconds / 1e9
    } else {
        0.0
    };
    let ridge = peak.peak_f32_gflops / peak.mem_bandwidth_gbs;
    let intensity = (b > 0.0).then(|| f / b);
    let bound = match intensity {
        _ if flops.is_none() => "unknown",
        Some(i) if i >= ridge => "compute",
        Some(_) => "memory",
        None if f > 0.0 => "compute",
        None => "memory",
    };
    let of_roofline = intensity.filter(|_| f > 0.0).map(|i| {
        let attainable = (i * peak.mem_bandwidth_gbs).min(peak.peak_f32_gflops);
        gflops / attainable
    });
    Roofline {
        gflops,
        gbs,
        intensity,
        bound,
        of_roofline,
    }
}

impl Profile {
    fn add(&mut self, timings: &[NodeTiming], nodes: &HashMap<&str, &Node>) {
        self.runs += 1;
        for t in timings {
            let i = match self.index.get(&t.node) {
                Some(&i) => i,
                None => {
                    let entry = Entry {
                        op: t.op.to_string(),
                        nodes: 1,
                        flops: timing_flops(t, nodes),
                        bytes: bytes(&t.inputs) + bytes(&t.outputs),
                        inputs: shapes(&t.inputs),
                        outputs: shapes(&t.outputs),
                        ..Entry::default()
                    };
                    self.nodes.push((t.node.clone(), entry));
                    self.index.insert(t.node.clone(), self.nodes.len() - 1);
                    self.nodes.len() - 1
                }
            };
            self.nodes[i].1.seconds += t.seconds;
        }
    }

    /// Per node and per op type, each sorted by time (most first).
    fn tables(&self) -> (Vec<(String, Entry)>, Vec<(String, Entry)>) {
        let mut by_node = self.nodes.clone();
        by_node.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let mut ops: Vec<(String, Entry)> = Vec::new();
        for (_, e) in &self.nodes {
            match ops.iter_mut().find(|(op, _)| *op == e.op) {
                Some((_, agg)) => {
                    agg.seconds += e.seconds;
                    agg.nodes += 1;
                    agg.bytes += e.bytes;
                    agg.flops = agg.flops.zip(e.flops).map(|(a, b)| a + b);
                }
                None => ops.push((
                    e.op.clone(),
                    Entry {
                        inputs: Vec::new(),
                        outputs: Vec::new(),
                        ..e.clone()
                    },
                )),
            }
        }
        ops.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        (by_node, ops)
    }

    fn total_seconds(&self) -> f64 {
        self.nodes.iter().map(|(_, e)| e.seconds).sum()
    }

    fn row_json(&self, e: &Entry, peak: &kiln_hw::Measured) -> serde_json::Value {
        let runs = self.runs.max(1) as f64;
        let per_run = e.seconds / runs;
        let r = roofline(e.flops, e.bytes, per_run, peak);
        json!({
            "op": e.op,
            "ms_per_run": per_run * 1e3,
            "ms_total": e.seconds * 1e3,
            "share": e.seconds / self.total_seconds().max(f64::MIN_POSITIVE),
            "flops": e.flops.map(|f| f as f64),
            "bytes": e.bytes as f64,
            "gflops": r.gflops,
            "gbs": r.gbs,
            "intensity": r.intensity,
            "bound": r.bound,
            "of_roofline": r.of_roofline,
        })
    }

    fn json(&self, peak: &kiln_hw::Measured) -> serde_json::Value {
        let (by_node, by_op) = self.tables();
        let nodes: Vec<_> = by_node
            .iter()
            .map(|(name, e)| {
                let mut v = self.row_json(e, peak);
                v["node"] = json!(name);
                v["inputs"] = json!(e.inputs);
                v["outputs"] = json!(e.outputs);
                v
            })
            .collect();
        let ops: Vec<_> = by_op
            .iter()
            .map(|(_, e)| {
                let mut v = self.row_json(e, peak);
                v["nodes"] = json!(e.nodes);
                v
            })
            .collect();
        json!({
            "runs": self.runs,
            "node_ms_per_run": self.total_seconds() / self.runs.max(1) as f64 * 1e3,
            "ridge_flops_per_byte": peak.peak_f32_gflops / peak.mem_bandwidth_gbs,
            "ops": ops,
            "nodes": nodes,
        })
    }

    fn print(&self, peak: &kiln_hw::Measured, top: usize, mean_run_s: f64) {
        if self.runs == 0 {
            println!("profile: no profiled runs");
            return;
        }
        let (by_node, by_op) = self.tables();
        let runs = self.runs as f64;
        let total = self.total_seconds();
        println!();
        println!(
            "profile over {} runs: nodes {:.3} ms per run of {:.3} ms mean latency; ridge {:.1} FLOP/byte",
            self.runs,
            total / runs * 1e3,
            mean_run_s * 1e3,
            peak.peak_f32_gflops / peak.mem_bandwidth_gbs
        );
        println!(
            "(FLOPs are the direct algorithm's: a conv run by Winograd does fewer, so its rate and roof% can pass the peak)"
        );
        let header = |first: &str| {
            println!(
                "{first:<32} {:>9} {:>6} {:>9} {:>9} {:>8} {:>8} {:>7} {:>6}",
                "ms/run", "share", "FLOPs", "bytes", "GFLOP/s", "GB/s", "bound", "roof%"
            )
        };
        let row = |label: &str, e: &Entry| {
            let per_run = e.seconds / runs;
            let r = roofline(e.flops, e.bytes, per_run, peak);
            let label: String = if label.chars().count() > 32 {
                let tail: String = label
                    .chars()
                    .rev()
                    .take(31)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("~{tail}")
            } else {
                label.to_string()
            };
            println!(
                "{label:<32} {:>9.3} {:>5.1}% {:>9} {:>9} {:>8.2} {:>8.2} {:>7} {:>6}",
                per_run * 1e3,
                100.0 * e.seconds / total.max(f64::MIN_POSITIVE),
                e.flops
                    .map(|f| crate::inspect::human_count(f as f64))
                    .unwrap_or_else(|| "?".into()),
                crate::inspect::human_count(e.bytes as f64),
                r.gflops,
                r.gbs,
                r.bound,
                r.of_roofline
                    .map(|x| format!("{:.0}", 100.0 * x))
                    .unwrap_or_else(|| "-".into()),
            );
        };
        println!("\nby op type:");
        header("op (nodes)");
        for (op, e) in &by_op {
            row(&format!("{op} ({})", e.nodes), e);
        }
        println!("\nslowest nodes (of {}):", by_node.len());
        header("node [op]");
        for (name, e) in by_node.iter().take(top) {
            row(&format!("{name} [{}]", e.op), e);
        }
    }
}

/// Peak resident set size of this process: VmHWM from /proc/self/status, else
/// getrusage's ru_maxrss.
pub fn peak_rss_bytes() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            return Some(kb * 1024);
        }
    }
    rusage_max_rss()
}

#[cfg(all(unix, target_pointer_width = "64"))]
fn rusage_max_rss() -> Option<u64> {
    extern "C" {
        fn getrusage(who: i32, usage: *mut i64) -> i32;
    }
    // struct rusage on 64-bit Linux and macOS: two timevals (4 longs), then
    // 14 longs starting with ru_maxrss. 32 longs leaves room to spare.
    let mut buf = [0i64; 32];
    // SAFETY: `buf` is larger than struct rusage on every 64-bit unix and
    // suitably aligned for it; RUSAGE_SELF is 0 on Linux and macOS.
    let rc = unsafe { getrusage(0, buf.as_mut_ptr()) };
    if rc != 0 || buf[4] <= 0 {
        return None;
    }
    // Linux reports kilobytes, macOS bytes.
    let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
    Some(buf[4] as u64 * scale)
}

#[cfg(not(all(unix, target_pointer_width = "64")))]
fn rusage_max_rss() -> Option<u64> {
    None
}

/// The symbolic dims of the model's inputs, bound by the actual tensors.
fn bind_dims(infos: &[IoInfo], inputs: &[(String, Tensor)]) -> HashMap<String, usize> {
    let mut b = HashMap::new();
    for (name, t) in inputs {
        let Some(shape) = infos
            .iter()
            .find(|i| &i.name == name)
            .and_then(|i| i.shape.as_ref())
        else {
            continue;
        };
        for (d, &v) in shape.iter().zip(t.shape()) {
            if let Dim::Named(n) = d {
                b.insert(n.clone(), v);
            }
        }
    }
    b
}

/// Inputs from files where given (`[NAME=]PATH`, as `kiln run` reads them),
/// random tensors (`kiln run`'s scheme) for the other required inputs.
fn build_inputs(
    infos: &[IoInfo],
    specs: &[String],
    dims: &[(String, usize)],
    seed: u64,
) -> Result<Vec<(String, Tensor)>, Failure> {
    let mut out = Vec::new();
    for (name, v) in crate::run::file_inputs(infos, specs)? {
        match v {
            Value::Tensor(t) => out.push((name, t)),
            other => {
                return Err(Failure::usage(format!(
                    "input '{name}' is a {}: kiln bench runs tensor inputs only",
                    other.kind_name()
                )))
            }
        }
    }
    let given: Vec<String> = out.iter().map(|(n, _)| n.clone()).collect();
    out.extend(crate::run::random_inputs(infos, dims, seed, &given)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_millis(x)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0], 0.0), 1.0);
    }

    #[test]
    fn stats_of_unsorted_samples() {
        let s = Stats::new(&ms(&[30, 10, 20, 40]));
        assert_eq!(s.min_s, 0.010);
        assert_eq!(s.max_s, 0.040);
        assert!((s.mean_s - 0.025).abs() < 1e-12);
        assert_eq!(s.p50_s, 0.020);
        assert_eq!(s.p99_s, 0.040);
    }

    fn peak() -> kiln_hw::Measured {
        kiln_hw::Measured {
            threads: 1,
            peak_f32_gflops: 100.0,
            f32_path: "test".into(),
            peak_bf16_gflops: None,
            peak_int8_gops: None,
            mem_bandwidth_gbs: 10.0,
        }
    }

    #[test]
    fn roofline_splits_at_the_ridge() {
        // Ridge: 100 GFLOP/s / 10 GB/s = 10 FLOP/byte.
        let r = roofline(Some(2_000), 100, 1e-6, &peak());
        assert_eq!(r.bound, "compute");
        assert_eq!(r.intensity, Some(20.0));
        assert!((r.gflops - 2.0).abs() < 1e-9);
        // 2 GFLOP/s of an attainable 100.
        assert!((r.of_roofline.unwrap() - 0.02).abs() < 1e-9);
        let r = roofline(Some(500), 100, 1e-6, &peak());
        assert_eq!(r.bound, "memory");
        // Attainable at intensity 5: 5 * 10 GB/s = 50 GFLOP/s.
        assert!((r.of_roofline.unwrap() - 0.5 / 50.0).abs() < 1e-9);
        assert!((r.gbs - 0.1).abs() < 1e-9);
        // Pure data movement is memory-bound; uncountable ops say so.
        assert_eq!(roofline(Some(0), 100, 1e-6, &peak()).bound, "memory");
        assert_eq!(roofline(None, 100, 1e-6, &peak()).bound, "unknown");
    }

    #[test]
    fn bytes_count_every_present_tensor() {
        let v = vec![
            Some((DType::F32, vec![2, 3])),
            None,
            Some((DType::I64, vec![4])),
        ];
        assert_eq!(bytes(&v), 24 + 32);
        assert_eq!(bytes(&[Some((DType::F32, vec![0, 9]))]), 0);
    }

    #[test]
    fn dims_bound_from_actual_inputs() {
        let infos = vec![IoInfo {
            name: "x".into(),
            dtype: DType::F32,
            shape: Some(vec![Dim::Named("N".into()), Dim::Known(3)]),
            kind: kiln_ir::ValueKind::Tensor,
            has_default: false,
        }];
        let t = Tensor::from_vec(vec![8, 3], vec![0.0f32; 24]).unwrap();
        let b = bind_dims(&infos, &[("x".into(), t)]);
        assert_eq!(b.get("N"), Some(&8));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn random_tensor_uses_dim_values() {
        let info = IoInfo {
            name: "ids".into(),
            dtype: DType::I64,
            shape: Some(vec![Dim::Named("B".into()), Dim::Named("S".into())]),
            kind: kiln_ir::ValueKind::Tensor,
            has_default: false,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let t = crate::run::random_tensor(&info, &[("S".into(), 5)], &mut rng)
            .unwrap_or_else(|f| panic!("{}", f.message));
        assert_eq!(t.shape(), &[1, 5]);
        let v = t.as_slice::<i64>().unwrap();
        assert!(v.iter().all(|&x| x == 0 || x == 1), "{v:?}");
    }

    #[test]
    fn peak_rss_is_reported() {
        let rss = peak_rss_bytes();
        assert!(rss.is_some_and(|b| b > 0), "{rss:?}");
        assert!(rusage_max_rss().is_some_and(|b| b > 0));
    }
}
