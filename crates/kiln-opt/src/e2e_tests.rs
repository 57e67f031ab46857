//! End-to-end check on the generated test models (`scripts/make_models.py`):
//! load, infer, optimize, validate and re-infer, then run the original and the
//! optimized graph through the test interpreter on one random input and
//! compare. Ignored by default since it needs the generated files:
//!
//! `cargo test --release -p kiln-opt -- --ignored --nocapture`

use crate::test_util::{compare_outputs, random_inputs, run_graph};
use crate::{optimize, OptOptions};
use kiln_ir::Dim;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

fn model_dir() -> Option<PathBuf> {
    let mut dirs = vec![PathBuf::from("/tmp/kiln-models")];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache/kiln/models"));
    }
    dirs.into_iter().find(|d| d.join("resnet50.onnx").exists())
}

#[test]
#[ignore = "needs the generated models (scripts/make_models.py)"]
fn generated_models_keep_their_outputs() {
    let dir = model_dir().expect("generated models in /tmp/kiln-models or ~/.cache/kiln/models");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let model = kiln_onnx::load_model(&path, &Default::default()).unwrap();
        let mut g = model.graph;
        kiln_ir::infer::infer_graph(&mut g, &HashMap::new()).unwrap();
        let before = g.clone();
        let t = Instant::now();
        let report = optimize(&mut g, &OptOptions::default()).unwrap();
        let took = t.elapsed();
        g.topo_order(&HashSet::new())
            .unwrap_or_else(|e| panic!("{name}: optimized graph invalid: {e}"));
        let mut re = g.clone();
        kiln_ir::infer::infer_graph(&mut re, &HashMap::new())
            .unwrap_or_else(|e| panic!("{name}: optimized graph does not re-infer: {e}"));
        let passes: Vec<String> = report
            .passes
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| format!("{p}:{n}"))
            .collect();
        let mut ops: HashMap<&str, usize> = HashMap::new();
        for n in &g.nodes {
            *ops.entry(n.op.name()).or_default() += 1;
        }
        let mut ops: Vec<(&str, usize)> = ops.into_iter().collect();
        ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ops.truncate(8);
        // Sequence-like symbolic dims get 8, the rest (batch) 1.
        let mut dims = HashMap::new();
        for vi in before.inputs.iter() {
            for d in vi.ty.shape.iter().flatten() {
                if let Dim::Named(s) = d {
                    let l = s.to_lowercase();
                    let v = if l.contains("seq")
                        || l.contains("len")
                        || l == "s"
                        || l.contains("token")
                    {
                        8
                    } else {
                        1
                    };
                    dims.insert(s.clone(), v);
                }
            }
        }
        let ins = random_inputs(&before, 7, &dims, 1, 2);
        let diff = match (run_graph(&before, &ins), run_graph(&g, &ins)) {
            (Ok(want), Ok(got)) => {
                format!("max abs diff {:.3e}", compare_outputs(&want, &got, 1e-3))
            }
            (Err(e), _) => format!("not run ({e})"),
            (Ok(_), Err(e)) => {
                panic!("{name}: the original runs but the optimized graph fails: {e}")
            }
        };
        println!(
            "{name}: nodes {} -> {} in {:.0} ms; {}; passes [{}]; ops after {:?}",
            report.nodes_before,
            report.nodes_after,
            took.as_secs_f64() * 1e3,
            diff,
            passes.join(" "),
            ops
        );
    }
}
