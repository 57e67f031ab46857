//! kiln's graph optimizer: rewrites an inferred [`Graph`] into a cheaper one with
//! the same outputs.
//!
//! [`optimize`] runs the cleanup and recognition passes to a fixed point
//! (bounded), then fusion into [`kiln_ir::FusedOp`], then dead-node elimination.
//! Every pass changes the graph only where it can prove the rewrite safe from
//! known dtypes and shapes, constants that the caller cannot override, and
//! intermediates nothing else reads; otherwise it leaves the graph as it was.
//! Graph inputs, graph outputs (names and values) and every value a subgraph
//! reads by name from this graph are kept. Subgraphs themselves are not
//! optimized.

mod passes;
mod util;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod test_util;

use kiln_ir::{Dim, Graph, IrError};
use std::collections::{HashMap, HashSet};

/// How much to optimize.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptLevel {
    /// Leave the graph as it is.
    None,
    /// Exact cleanups: dead nodes, no-ops, constant folding, common
    /// subexpressions.
    Basic,
    /// Basic, plus BatchNorm folding, activation and normalization recognition,
    /// and fusion into `FusedOp`.
    #[default]
    All,
}

#[derive(Clone, Debug)]
pub struct OptOptions {
    pub level: OptLevel,
    /// The largest constant (in bytes) that folding may create.
    pub max_folded_bytes: usize,
}

impl Default for OptOptions {
    fn default() -> Self {
        OptOptions {
            level: OptLevel::All,
            max_folded_bytes: 64 << 20,
        }
    }
}

/// What [`optimize`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptReport {
    /// Rewrites per pass (summed over fixed-point iterations), in first-run order.
    pub passes: Vec<(String, usize)>,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

impl OptReport {
    fn add(&mut self, pass: &str, n: usize) {
        match self.passes.iter_mut().find(|(p, _)| p == pass) {
            Some((_, c)) => *c += n,
            None => self.passes.push((pass.to_string(), n)),
        }
    }

    /// Rewrites done by `pass` (0 when it did nothing or did not run).
    pub fn rewrites(&self, pass: &str) -> usize {
        self.passes
            .iter()
            .find(|(p, _)| p == pass)
            .map(|(_, c)| *c)
            .unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptError {
    /// The graph given to [`optimize`] does not validate.
    #[error("the graph to optimize is invalid: {0}")]
    InvalidInput(IrError),
}

/// What passes may consult besides the graph.
pub(crate) struct PassCtx {
    pub max_folded_bytes: usize,
    /// Contents inference found for small integer values (shape arithmetic),
    /// by value name; entries may be symbolic.
    pub sym_values: HashMap<String, Vec<Dim>>,
}

/// The most fixed-point rounds; each round runs every cleanup and recognition
/// pass once. Real models settle in two or three.
const MAX_ROUNDS: usize = 8;

type PassFn = fn(&mut Graph, &PassCtx) -> usize;

/// Optimizes `graph` in place. The graph should have been inferred
/// (`kiln_ir::infer::infer_graph`); the result validates and re-infers.
pub fn optimize(graph: &mut Graph, opts: &OptOptions) -> Result<OptReport, OptError> {
    graph
        .topo_order(&HashSet::new())
        .map_err(OptError::InvalidInput)?;
    let mut report = OptReport {
        nodes_before: graph.nodes.len(),
        ..Default::default()
    };
    if opts.level == OptLevel::None {
        report.nodes_after = graph.nodes.len();
        return Ok(report);
    }
    let all = opts.level == OptLevel::All;
    let mut ctx = PassCtx {
        max_folded_bytes: opts.max_folded_bytes,
        sym_values: HashMap::new(),
    };

    let mut rounds: Vec<(&str, PassFn)> = vec![
        ("identity-elim", passes::identity::run),
        ("const-fold", passes::const_fold::run),
        ("const-merge", passes::cse::merge_constants),
        ("cse", passes::cse::run),
    ];
    if all {
        rounds.push(("bn-fold", passes::bn_fold::run));
        rounds.push(("activation", passes::activation::run));
        rounds.push(("norm", passes::norm::run));
    }
    rounds.push(("dce", passes::dce::run));

    // The last graph known to infer cleanly: a round that breaks inference
    // (a pass bug) is undone.
    let mut last_good = graph.clone();
    for round in 0..MAX_ROUNDS {
        match refresh_types(graph) {
            Some(values) => {
                ctx.sym_values = values;
                last_good = graph.clone();
            }
            None => {
                debug_assert!(
                    false,
                    "kiln-opt: round {round} left a graph that does not infer"
                );
                tracing::warn!("kiln-opt: a rewrite broke inference; undoing round {round}");
                *graph = last_good.clone();
                break;
            }
        }
        let mut changed = 0;
        for (name, pass) in &rounds {
            changed += run_pass(graph, &ctx, name, *pass, &mut report);
        }
        if changed == 0 {
            break;
        }
    }
    // The copy holds every constant the rounds replaced (folded weights):
    // freed now, before the passes below make more, so a load's peak
    // memory holds one copy fewer.
    drop(last_good);
    if all {
        if let Some(values) = refresh_types(graph) {
            ctx.sym_values = values;
        }
        run_pass(
            graph,
            &ctx,
            "attention",
            passes::attention::run,
            &mut report,
        );
        run_pass(graph, &ctx, "fusion", passes::fusion::run, &mut report);
        run_pass(
            graph,
            &ctx,
            "channels-last",
            passes::channels_last::run,
            &mut report,
        );
        run_pass(graph, &ctx, "pw-dw", passes::pw_dw::run, &mut report);
        run_pass(graph, &ctx, "dce", passes::dce::run, &mut report);
    }
    drop_stale_types(graph);
    report.nodes_after = graph.nodes.len();
    Ok(report)
}

/// Runs one pass; if it left a graph that does not validate (a pass bug), the
/// graph is restored and the pass counts no rewrites.
fn run_pass(
    graph: &mut Graph,
    ctx: &PassCtx,
    name: &str,
    pass: PassFn,
    report: &mut OptReport,
) -> usize {
    let before = graph.clone();
    let n = pass(graph, ctx);
    if let Err(e) = graph.topo_order(&HashSet::new()) {
        debug_assert!(false, "kiln-opt: pass {name} broke the graph: {e}");
        tracing::warn!("kiln-opt: pass {name} broke the graph ({e}); undoing it");
        *graph = before;
        report.add(name, 0);
        return 0;
    }
    if n > 0 {
        tracing::debug!("kiln-opt: {name}: {n} rewrites");
    }
    report.add(name, n);
    n
}

/// Re-infers types after rewrites (on a copy, so a failure leaves the graph
/// untouched) and returns the symbolic contents of small integer values.
/// `None` when inference fails.
fn refresh_types(graph: &mut Graph) -> Option<HashMap<String, Vec<Dim>>> {
    drop_stale_types(graph);
    let mut probe = graph.clone();
    let (_, values) =
        kiln_ir::infer::infer_graph_with_values(&mut probe, &HashMap::new(), &HashMap::new())
            .ok()?;
    graph.value_types = probe.value_types;
    Some(values)
}

/// Forgets types of values no node produces any more (inference treats stored
/// types as declarations, so stale ones must not linger).
fn drop_stale_types(graph: &mut Graph) {
    let produced: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.present_outputs())
        .collect();
    graph
        .value_types
        .retain(|k, _| produced.contains(k.as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{AutoPad, BinaryOp, ConvAttrs, DType, Node, Op, UnaryOp, ValueInfo, ValueType};

    /// Conv -> BatchNorm -> Identity -> Relu, with a dead branch and a constant
    /// subexpression: every level does something different.
    fn small_cnn() -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 2, 4, 4]);
        let w = b.init_rand("w", &[3, 2, 3, 3], -1.0, 1.0);
        let s = b.init_rand("s", &[3], 0.5, 1.5);
        let bb = b.init_rand("bb", &[3], -0.5, 0.5);
        let m = b.init_rand("m", &[3], -0.5, 0.5);
        let v = b.init_rand("v", &[3], 0.5, 1.5);
        let two = b.scalar("two", 2.0);
        let conv = Op::Conv(ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![],
        });
        b.node(conv, &["x", &w], &["c"]);
        b.node(
            Op::BatchNormalization { epsilon: 1e-5 },
            &["c", &s, &bb, &m, &v],
            &["bn"],
        );
        b.node(Op::Identity, &["bn"], &["bi"]);
        b.node(Op::Unary(UnaryOp::Relu), &["bi"], &["r"]);
        b.node(Op::Binary(BinaryOp::Mul), &[&two, &two], &["four"]);
        b.node(Op::Binary(BinaryOp::Mul), &["r", "four"], &["y"]);
        b.node(Op::Unary(UnaryOp::Exp), &["x"], &["unused"]);
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn levels_none_basic_all() {
        let g = small_cnn();
        let mut none = g.clone();
        let r = optimize(
            &mut none,
            &OptOptions {
                level: OptLevel::None,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(none, g);
        assert_eq!((r.nodes_before, r.nodes_after), (7, 7));

        let mut basic = g.clone();
        let r = optimize(
            &mut basic,
            &OptOptions {
                level: OptLevel::Basic,
                ..Default::default()
            },
        )
        .unwrap();
        assert_equivalent(&g, &basic);
        // Identity, the folded Mul and the dead Exp go; Conv/BN/Relu stay.
        assert_eq!(r.nodes_after, 4, "{:#?}", basic.nodes);
        assert_eq!(count_op(&basic, "BatchNormalization"), 1);
        assert_eq!(r.rewrites("fusion"), 0);

        let mut all = g.clone();
        let r = optimize(&mut all, &OptOptions::default()).unwrap();
        assert_equivalent(&g, &all);
        // Conv+BN+Relu -> one FusedConv, then the Mul by the folded constant.
        assert_eq!(r.nodes_after, 2, "{:#?}", all.nodes);
        assert_eq!(count_op(&all, "FusedConv"), 1);
        assert_eq!(r.rewrites("bn-fold"), 1);
        assert_eq!(r.rewrites("fusion"), 1);
        assert!(r.rewrites("const-fold") >= 1 && r.rewrites("identity-elim") == 1);
        assert!(r.rewrites("dce") >= 1);
    }

    #[test]
    fn values_read_by_subgraphs_keep_their_names_and_producers() {
        // r = Relu(x); i = Identity(r); the If's branches read i (and r) by
        // name, so neither the Identity nor the Relu may be renamed, fused or
        // removed.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3]);
        b.input("flag", DType::Bool, &[]);
        b.node(Op::Unary(UnaryOp::Sigmoid), &["x"], &["sg"]);
        b.node(Op::Identity, &["sg"], &["i"]);
        let branch = |name: &str, op: Op, reads: &str| Graph {
            name: name.into(),
            outputs: vec![ValueInfo {
                name: format!("{name}_out"),
                ty: ValueType::new(DType::F32, None),
            }],
            nodes: vec![Node {
                name: format!("{name}_n"),
                op,
                inputs: vec![Some(reads.into())],
                outputs: vec![Some(format!("{name}_out"))],
            }],
            ..Default::default()
        };
        b.node(
            Op::If {
                then_branch: Box::new(branch("then", Op::Unary(UnaryOp::Neg), "i")),
                else_branch: Box::new(branch("else", Op::Unary(UnaryOp::Abs), "sg")),
            },
            &["flag"],
            &["y"],
        );
        b.output("y", DType::F32);
        let g = b.finish();
        let mut after = g.clone();
        optimize(&mut after, &OptOptions::default()).unwrap();
        assert_eq!(after.nodes, g.nodes);
        assert!(after.topo_order(&HashSet::new()).is_ok());
    }

    #[test]
    fn gelu_after_matmul_is_recognized_then_fused() {
        // MatMul + bias + erf-form Gelu: recognition feeds fusion.
        let mut b = Builder::new();
        b.input("a", DType::F32, &[2, 4]);
        let w = b.init_rand("w", &[4, 6], -1.0, 1.0);
        let bias = b.init_rand("bias", &[6], -1.0, 1.0);
        let sqrt2 = b.scalar("sqrt2", std::f32::consts::SQRT_2);
        let one = b.scalar("one", 1.0);
        let half = b.scalar("half", 0.5);
        b.node(Op::MatMul, &["a", &w], &["m"]);
        b.node(Op::Binary(BinaryOp::Add), &["m", &bias], &["x"]);
        b.node(Op::Binary(BinaryOp::Div), &["x", &sqrt2], &["t"]);
        b.node(Op::Unary(UnaryOp::Erf), &["t"], &["e"]);
        b.node(Op::Binary(BinaryOp::Add), &["e", &one], &["p"]);
        b.node(Op::Binary(BinaryOp::Mul), &["x", "p"], &["q"]);
        b.node(Op::Binary(BinaryOp::Mul), &["q", &half], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let mut after = g.clone();
        let r = optimize(&mut after, &OptOptions::default()).unwrap();
        assert_equivalent(&g, &after);
        assert_eq!(r.nodes_after, 1);
        assert_eq!(
            after.nodes[0].op,
            Op::Fused(kiln_ir::FusedOp::MatMul {
                act: kiln_ir::FusedAct::GeluErf
            })
        );
        // Unused constants are dropped.
        assert_eq!(after.initializers.len(), 2);
    }

    #[test]
    fn invalid_graph_is_an_error() {
        let mut g = small_cnn();
        g.nodes[0].inputs[0] = Some("nope".into());
        assert!(matches!(
            optimize(&mut g, &OptOptions::default()),
            Err(OptError::InvalidInput(_))
        ));
    }
}
