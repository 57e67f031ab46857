//! `kiln inspect`: what a model takes, gives, contains and costs.

use crate::Failure;
use clap::Args;
use kiln_ir::{Dim, Graph};
use kiln_runtime::{IoInfo, Session, SessionOptions};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// The ONNX model file.
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Value of a symbolic dimension for the FLOP estimate, as NAME=VALUE (default 1).
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    pub dims: Vec<String>,
}

pub fn inspect(args: InspectArgs) -> Result<(), Failure> {
    let session = Session::load(
        &args.model,
        &SessionOptions {
            optimize: false,
            ..SessionOptions::default()
        },
    )?;
    let graph = session.graph();
    let bindings: HashMap<String, usize> =
        crate::run::parse_dims(&args.dims)?.into_iter().collect();
    let mut histogram: BTreeMap<&str, usize> = BTreeMap::new();
    count_ops(graph, &mut histogram);
    let (params, param_bytes) = session.parameter_stats();
    let flops = crate::flops::estimate_graph(graph, &bindings);
    let io = |v: &[IoInfo]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|i| {
                json!({
                    "name": i.name,
                    "dtype": i.dtype.name(),
                    "shape": i.shape.as_ref().map(|s| s.iter().map(dim_json).collect::<Vec<_>>()),
                    "has_default": i.has_default,
                })
            })
            .collect()
    };
    if args.json {
        let out = json!({
            "model": args.model.display().to_string(),
            "opset": session.opset(),
            "inputs": io(session.inputs()),
            "outputs": io(session.outputs()),
            "nodes": graph.nodes.len(),
            "op_types": histogram,
            "parameters": params,
            "parameter_bytes": param_bytes,
            "flops": flops.total,
            "flops_complete": flops.unknown_nodes == 0,
            "warnings": session.warnings(),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!("model: {}", args.model.display());
    println!("opset: {}", session.opset());
    println!("inputs:");
    for i in session.inputs() {
        let default = if i.has_default {
            " (has a default)"
        } else {
            ""
        };
        println!("  {}: {}{default}", i.name, i.type_string());
    }
    println!("outputs:");
    for o in session.outputs() {
        println!("  {}: {}", o.name, o.type_string());
    }
    println!("nodes: {}", graph.nodes.len());
    println!("op types:");
    let mut sorted: Vec<_> = histogram.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in sorted {
        println!("  {op:<24} {n}");
    }
    println!("parameters: {params} ({})", human_bytes(param_bytes));
    let note = if flops.unknown_nodes > 0 {
        format!(
            " (lower bound: {} nodes have shapes unknown before run time)",
            flops.unknown_nodes
        )
    } else {
        String::new()
    };
    println!("estimated FLOPs: {}{note}", human_count(flops.total as f64));
    for w in session.warnings() {
        println!("warning: {w}");
    }
    Ok(())
}

fn dim_json(d: &Dim) -> serde_json::Value {
    match d {
        Dim::Known(v) => json!(v),
        other => json!(other.to_string()),
    }
}

fn count_ops<'a>(g: &'a Graph, h: &mut BTreeMap<&'a str, usize>) {
    for n in &g.nodes {
        *h.entry(n.op.name()).or_default() += 1;
        for sub in n.op.subgraphs() {
            count_ops(sub, h);
        }
    }
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

pub fn human_count(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} K", v / 1e3)
    } else {
        format!("{v}")
    }
}
