//! Fusion into [`FusedOp`]: a Conv or MatMul followed by a bias Add, a
//! residual Add and an activation becomes one node computing
//! `act(op(x) + bias + residual)`.
//!
//! - Conv [+ Add of a constant that is per output channel] [+ Add of a tensor
//!   of exactly the output's shape] [+ activation] -> `FusedOp::Conv`.
//! - MatMul [+ Add of a constant along the last axis] [+ residual]
//!   [+ activation] -> `FusedOp::MatMul`.
//! - Gemm with a constant B (and no transposed A) -> `FusedOp::MatMul`: the
//!   transposition and `alpha` go into a new B, `beta * C` into the bias when C
//!   is absent, a scalar, `[N]` or `[1, N]`; then the same chain as MatMul.
//!
//! Activations: Relu, Clip with constant bounds, Sigmoid, Tanh, HardSigmoid,
//! HardSwish, LeakyRelu, Gelu (both forms, after activation recognition) and
//! SiLU (`y * Sigmoid(y)`). Every value inside the chain must be f32, read
//! only by the next step, and neither a graph output nor read by a subgraph; a
//! Conv or MatMul with nothing to fuse is left alone.

use crate::util::{
    add_constant, constant, dtype_of, f32_tensor, is_binary, other_input, remove_nodes,
    rewrite_each, same_shape, scalar_const, shape_of, single_output, Index,
};
use crate::PassCtx;
use kiln_ir::{BinaryOp, DType, Dim, FusedAct, FusedOp, Graph, Op, Tensor, UnaryOp};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    rewrite_each(g, plan_at, apply)
}

/// A weight or bias for the fused node: an existing value or a new constant.
enum Operand {
    Value(String),
    New(String, Tensor),
}

struct Plan {
    base: usize,
    op: FusedOp,
    x: String,
    w: Operand,
    bias: Option<Operand>,
    residual: Option<String>,
    out: String,
    remove: Vec<usize>,
}

fn apply(g: &mut Graph, p: Plan) {
    let name = |g: &mut Graph, o: Operand| match o {
        Operand::Value(v) => v,
        Operand::New(base, t) => add_constant(g, &base, t),
    };
    let w = name(g, p.w);
    let bias = p.bias.map(|b| name(g, b));
    let old_out = g.nodes[p.base].outputs.first().cloned().flatten();
    let node = &mut g.nodes[p.base];
    node.op = Op::Fused(p.op);
    node.inputs = vec![Some(p.x), Some(w), bias, p.residual];
    while node.inputs.last() == Some(&None) {
        node.inputs.pop();
    }
    node.outputs = vec![Some(p.out.clone())];
    if let Some(o) = old_out {
        if o != p.out {
            g.value_types.remove(&o);
        }
    }
    remove_nodes(g, &p.remove);
}

/// Per-channel values of constant `c` added to an output of rank `rank` whose
/// axis `axis` has `len` entries: `c`'s dims (right-aligned) must all be 1
/// except that axis, which may be `len`.
fn per_axis_bias(c: &Tensor, rank: usize, axis: usize, len: usize) -> Option<Vec<f64>> {
    if c.dtype() != DType::F32 || c.rank() > rank {
        return None;
    }
    let pad = rank - c.rank();
    let mut along = 1;
    for (k, &d) in c.shape().iter().enumerate() {
        if pad + k == axis {
            if d != 1 && d != len {
                return None;
            }
            along = d;
        } else if d != 1 {
            return None;
        }
    }
    let v = c.to_f64_vec().ok()?;
    Some(if along == len { v } else { vec![v[0]; len] })
}

fn plan_at(g: &Graph, ix: &Index, i: usize) -> Option<Plan> {
    let n = &g.nodes[i];
    let y = single_output(n)?.to_string();
    if n.outputs.len() != 1 || dtype_of(g, &y) != Some(DType::F32) {
        return None;
    }
    let x = n.input(0)?.to_string();
    let out_shape = shape_of(g, &y)?;
    let rank = out_shape.len();
    // (channel axis, channel count) of the output, for bias adds.
    let (mut op, w, mut bias, chan, is_gemm): (
        FusedOp,
        Operand,
        Option<Vec<f64>>,
        Option<(usize, usize)>,
        bool,
    ) = match &n.op {
        Op::Conv(attrs) => {
            let wn = n.input(1)?;
            let m = shape_of(g, wn)?.first().and_then(Dim::known);
            // An existing bias we can add to must be constant; a computed
            // one stays as it is (and then no bias Add is taken).
            let bias = match n.input(2) {
                None => Some(vec![]),
                Some(b) => constant(g, ix, b)
                    .filter(|t| t.dtype() == DType::F32 && t.rank() == 1)
                    .and_then(|t| t.to_f64_vec().ok()),
            };
            let chan = m.filter(|_| rank >= 3).map(|m| (1, m));
            (
                FusedOp::Conv {
                    conv: attrs.clone(),
                    act: FusedAct::Identity,
                },
                Operand::Value(wn.to_string()),
                bias,
                chan,
                false,
            )
        }
        Op::MatMul => {
            let last = out_shape.last().and_then(Dim::known);
            (
                FusedOp::MatMul {
                    act: FusedAct::Identity,
                },
                Operand::Value(n.input(1)?.to_string()),
                Some(vec![]),
                last.map(|l| (rank - 1, l)),
                false,
            )
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a: false,
            trans_b,
        } => {
            let bt = constant(g, ix, n.input(1)?)?;
            if bt.dtype() != DType::F32 || bt.rank() != 2 || rank != 2 {
                return None;
            }
            let (r, c) = (bt.shape()[0], bt.shape()[1]);
            let (k, nn) = if *trans_b { (c, r) } else { (r, c) };
            let v = bt.as_slice::<f32>()?;
            let mut w2 = vec![0f32; k * nn];
            for row in 0..k {
                for col in 0..nn {
                    let src = if *trans_b {
                        v[col * c + row]
                    } else {
                        v[row * c + col]
                    };
                    w2[row * nn + col] = alpha * src;
                }
            }
            let bias = match n.input(2) {
                None => vec![],
                Some(cn) => {
                    let ct = constant(g, ix, cn)?;
                    let cv = per_axis_bias(ct, 2, 1, nn)?;
                    cv.iter().map(|v| *beta as f64 * v).collect()
                }
            };
            let base = format!("{}_fused", n.input(1)?);
            (
                FusedOp::MatMul {
                    act: FusedAct::Identity,
                },
                Operand::New(base, f32_tensor(vec![k, nn], w2)),
                Some(bias),
                Some((1, nn)),
                true,
            )
        }
        _ => return None,
    };

    let mut cur = y.clone();
    let mut remove = Vec::new();
    let mut residual = None;
    let mut act = FusedAct::Identity;

    // 1. A constant bias along the channel axis.
    if let (Some(r), Some((axis, len)), Some(b)) = (ix.single_reader(&cur), chan, bias.as_ref()) {
        let rn = &g.nodes[r];
        if is_binary(rn, BinaryOp::Add) {
            let other = other_input(rn, &cur)?;
            if let Some(c) = constant(g, ix, other).and_then(|t| per_axis_bias(t, rank, axis, len))
            {
                let sum = if b.is_empty() {
                    c
                } else if b.len() == len {
                    b.iter().zip(&c).map(|(a, b)| a + b).collect()
                } else {
                    return None;
                };
                bias = Some(sum);
                remove.push(r);
                cur = single_output(rn)?.to_string();
            }
        }
    }
    // 2. A residual of exactly the output's shape.
    if let Some(r) = ix.single_reader(&cur) {
        let rn = &g.nodes[r];
        if is_binary(rn, BinaryOp::Add) {
            let other = other_input(rn, &cur)?;
            if other != cur && dtype_of(g, other) == Some(DType::F32) && same_shape(g, other, &cur)
            {
                residual = Some(other.to_string());
                remove.push(r);
                cur = single_output(rn)?.to_string();
            }
        }
    }
    // 3. An activation.
    if let Some((a, nodes, out)) = activation_after(g, ix, &cur) {
        act = a;
        remove.extend(nodes);
        cur = out;
    }
    if remove.is_empty() && !is_gemm {
        return None;
    }
    if dtype_of(g, &cur) != Some(DType::F32) {
        return None;
    }
    match &mut op {
        FusedOp::Conv { act: a, .. }
        | FusedOp::ConvNhwc { act: a, .. }
        | FusedOp::MatMul { act: a } => *a = act,
        FusedOp::Attention { .. } | FusedOp::PointwiseDepthwise { .. } => return None,
    }
    let bias = match bias {
        Some(b) if !b.is_empty() => {
            let v: Vec<f32> = b.iter().map(|&v| v as f32).collect();
            let len = v.len();
            Some(Operand::New(
                format!("{}_bias_fused", n.name),
                f32_tensor(vec![len], v),
            ))
        }
        // No bias to add: keep a computed Conv bias as it was.
        _ => n
            .input(2)
            .filter(|_| !is_gemm)
            .map(|b| Operand::Value(b.to_string())),
    };
    // A kept Conv bias that was constant and unchanged is simpler by name.
    let bias = match (bias, &n.op, n.input(2)) {
        (Some(Operand::New(_, t)), Op::Conv(_), Some(b))
            if constant(g, ix, b).is_some_and(|c| **c == t) =>
        {
            Some(Operand::Value(b.to_string()))
        }
        (b, _, _) => b,
    };
    Some(Plan {
        base: i,
        op,
        x,
        w,
        bias,
        residual,
        out: cur,
        remove,
    })
}

/// The activation reading `v` (its only reader, or Sigmoid + Mul for SiLU):
/// the act, the nodes it spans and its output.
fn activation_after(g: &Graph, ix: &Index, v: &str) -> Option<(FusedAct, Vec<usize>, String)> {
    if ix.is_pinned(v) {
        return None;
    }
    let readers = ix.readers(v);
    if readers.len() == 2 {
        // SiLU: Sigmoid(v) read only by Mul(v, sigmoid).
        for (&s, &m) in [(&readers[0], &readers[1]), (&readers[1], &readers[0])] {
            let sn = &g.nodes[s];
            let mn = &g.nodes[m];
            if sn.op != Op::Unary(UnaryOp::Sigmoid) || !is_binary(mn, BinaryOp::Mul) {
                continue;
            }
            let so = single_output(sn)?;
            if ix.single_reader(so) == Some(m) && other_input(mn, v) == Some(so) {
                return Some((FusedAct::Silu, vec![s, m], single_output(mn)?.to_string()));
            }
        }
        return None;
    }
    let r = ix.single_reader(v)?;
    let n = &g.nodes[r];
    if n.input(0) != Some(v) {
        return None;
    }
    let act = match &n.op {
        Op::Unary(u) => match u {
            UnaryOp::Relu => FusedAct::Relu,
            UnaryOp::Sigmoid => FusedAct::Sigmoid,
            UnaryOp::Tanh => FusedAct::Tanh,
            UnaryOp::HardSigmoid { alpha, beta } => FusedAct::HardSigmoid {
                alpha: *alpha,
                beta: *beta,
            },
            UnaryOp::HardSwish => FusedAct::HardSwish,
            UnaryOp::LeakyRelu { alpha } => FusedAct::LeakyRelu { alpha: *alpha },
            UnaryOp::Gelu { tanh_approx: false } => FusedAct::GeluErf,
            UnaryOp::Gelu { tanh_approx: true } => FusedAct::GeluTanh,
            _ => return None,
        },
        Op::Clip => {
            let bound = |k: usize, dflt: f32| -> Option<f32> {
                match n.input(k) {
                    None => Some(dflt),
                    Some(b) => {
                        let t = constant(g, ix, b)?;
                        (t.dtype() == DType::F32).then_some(())?;
                        scalar_const(g, ix, b).map(|v| v as f32)
                    }
                }
            };
            FusedAct::Clip {
                min: bound(1, f32::NEG_INFINITY)?,
                max: bound(2, f32::INFINITY)?,
            }
        }
        _ => return None,
    };
    Some((act, vec![r], single_output(n)?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{AutoPad, ConvAttrs};

    fn conv() -> Op {
        Op::Conv(ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![],
        })
    }

    fn bin(b: BinaryOp) -> Op {
        Op::Binary(b)
    }

    fn fused_act(g: &Graph) -> Vec<FusedAct> {
        g.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Fused(f) => Some(f.act()),
                _ => None,
            })
            .collect()
    }

    /// x -> Conv(W, B?) -> Add(bias [1,4,1,1]) -> Add(residual) -> act -> y
    fn conv_chain(conv_bias: bool, bias_add: bool, residual: bool, act: Option<Op>) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        b.input("res", DType::F32, &[1, 4, 5, 5]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        let cb = b.init_rand("cb", &[4], -1.0, 1.0);
        let ab = b.init_rand("ab", &[1, 4, 1, 1], -1.0, 1.0);
        let mut ins = vec!["x", w.as_str()];
        if conv_bias {
            ins.push(&cb);
        }
        b.node(conv(), &ins, &["c"]);
        let mut cur = "c".to_string();
        if bias_add {
            b.node(bin(BinaryOp::Add), &[&ab, &cur], &["cb_out"]);
            cur = "cb_out".into();
        }
        if residual {
            b.node(bin(BinaryOp::Add), &[&cur, "res"], &["r_out"]);
            cur = "r_out".into();
        }
        if let Some(a) = act {
            let mut ins = vec![cur.clone()];
            if a == Op::Clip {
                ins.push(b.scalar("lo", 0.0));
                ins.push(b.scalar("hi", 6.0));
            }
            let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
            b.node(a, &ins, &["a_out"]);
            cur = "a_out".into();
        }
        b.node(Op::Identity, &[&cur], &["y"]);
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn fuses_conv_bias_residual_and_each_activation() {
        let acts = [
            (Op::Unary(UnaryOp::Relu), FusedAct::Relu),
            (Op::Clip, FusedAct::Clip { min: 0.0, max: 6.0 }),
            (Op::Unary(UnaryOp::Sigmoid), FusedAct::Sigmoid),
            (Op::Unary(UnaryOp::Tanh), FusedAct::Tanh),
            (
                Op::Unary(UnaryOp::HardSigmoid {
                    alpha: 0.2,
                    beta: 0.5,
                }),
                FusedAct::HardSigmoid {
                    alpha: 0.2,
                    beta: 0.5,
                },
            ),
            (Op::Unary(UnaryOp::HardSwish), FusedAct::HardSwish),
            (
                Op::Unary(UnaryOp::LeakyRelu { alpha: 0.1 }),
                FusedAct::LeakyRelu { alpha: 0.1 },
            ),
            (
                Op::Unary(UnaryOp::Gelu { tanh_approx: false }),
                FusedAct::GeluErf,
            ),
            (
                Op::Unary(UnaryOp::Gelu { tanh_approx: true }),
                FusedAct::GeluTanh,
            ),
        ];
        for (op, want) in acts {
            for (cb, ba, res) in [
                (true, true, true),
                (false, true, false),
                (false, false, true),
                (true, false, false),
            ] {
                let g = conv_chain(cb, ba, res, Some(op.clone()));
                let (after, n) = check_pass(&g, run);
                assert_eq!(n, 1, "{want:?} {cb} {ba} {res}");
                assert_eq!(after.nodes.len(), 2, "{want:?}: {:#?}", after.nodes);
                assert_eq!(fused_act(&after), vec![want]);
                let f = &after
                    .nodes
                    .iter()
                    .find(|n| n.op.name() == "FusedConv")
                    .unwrap();
                assert_eq!(f.inputs.get(3).cloned().flatten().is_some(), res);
            }
        }
        // Bias and residual with no activation.
        let g = conv_chain(true, true, true, None);
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, after.nodes.len()), (1, 2));
        assert_eq!(fused_act(&after), vec![FusedAct::Identity]);
    }

    #[test]
    fn fuses_silu_after_conv() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        b.node(conv(), &["x", &w], &["c"]);
        b.node(Op::Unary(UnaryOp::Sigmoid), &["c"], &["s"]);
        b.node(bin(BinaryOp::Mul), &["s", "c"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, after.nodes.len()), (1, 1));
        assert_eq!(fused_act(&after), vec![FusedAct::Silu]);
        assert_eq!(after.nodes[0].outputs[0].as_deref(), Some("y"));
    }

    #[test]
    fn leaves_conv_chain_with_shared_or_output_intermediates() {
        // The conv output is also a graph output.
        let mut g = conv_chain(true, false, false, Some(Op::Unary(UnaryOp::Relu)));
        g.outputs.push(kiln_ir::ValueInfo {
            name: "c".into(),
            ty: kiln_ir::ValueType::new(DType::F32, None),
        });
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        // The conv output has a second reader.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        b.node(conv(), &["x", &w], &["c"]);
        b.node(Op::Unary(UnaryOp::Relu), &["c"], &["r"]);
        b.node(bin(BinaryOp::Add), &["r", "c"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn residual_must_match_exactly_and_bias_must_be_per_channel() {
        // Add of a broadcast [4,1,1]-shaped non-constant: not a bias (not
        // constant), not a residual (shape differs): nothing to fuse.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        b.input("r", DType::F32, &[4, 1, 1]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        let full = b.init_rand("full", &[1, 1, 5, 5], -1.0, 1.0);
        b.node(conv(), &["x", &w], &["c"]);
        b.node(bin(BinaryOp::Add), &["c", "r"], &["y"]);
        b.node(conv(), &["x", &w], &["c2"]);
        b.node(bin(BinaryOp::Add), &["c2", &full], &["y2"]);
        b.output("y", DType::F32);
        b.output("y2", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn leaves_non_f32_and_unknown_shapes() {
        let mut b = Builder::new();
        b.input("a", DType::F64, &[2, 3]);
        let w = b.init("w", Tensor::from_vec(vec![3, 4], vec![0.5f64; 12]).unwrap());
        b.node(Op::MatMul, &["a", &w], &["m"]);
        b.node(Op::Unary(UnaryOp::Relu), &["m"], &["y"]);
        b.output("y", DType::F64);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        let mut b = Builder::new();
        b.input_unranked("a", DType::F32);
        b.input_unranked("bb", DType::F32);
        b.node(Op::MatMul, &["a", "bb"], &["m"]);
        b.node(bin(BinaryOp::Add), &["m", "a"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let mut after = g.clone();
        assert_eq!(run(&mut after, &ctx_for(&g)), 0);
        assert_eq!(after, g);
    }

    #[test]
    fn fuses_matmul_bias_residual_gelu() {
        let mut b = Builder::new();
        b.input_dims(
            "a",
            DType::F32,
            vec![Dim::named("N"), Dim::Known(4), Dim::Known(6)],
        );
        b.input_dims(
            "res",
            DType::F32,
            vec![Dim::named("N"), Dim::Known(4), Dim::Known(5)],
        );
        let w = b.init_rand("w", &[6, 5], -1.0, 1.0);
        let bias = b.init_rand("bias", &[5], -1.0, 1.0);
        b.node(Op::MatMul, &["a", &w], &["m"]);
        b.node(bin(BinaryOp::Add), &[&bias, "m"], &["mb"]);
        b.node(bin(BinaryOp::Add), &["res", "mb"], &["mr"]);
        b.node(
            Op::Unary(UnaryOp::Gelu { tanh_approx: false }),
            &["mr"],
            &["y"],
        );
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, after.nodes.len()), (1, 1));
        assert_eq!(fused_act(&after), vec![FusedAct::GeluErf]);
        assert_eq!(after.nodes[0].inputs.len(), 4);
    }

    #[test]
    fn converts_gemm_with_constant_b() {
        for (trans_b, c) in [
            (false, None),
            (true, Some(vec![5usize])),
            (true, Some(vec![1, 5])),
            (false, Some(vec![])),
        ] {
            let mut b = Builder::new();
            b.input("a", DType::F32, &[3, 4]);
            let w = if trans_b {
                b.init_rand("w", &[5, 4], -1.0, 1.0)
            } else {
                b.init_rand("w", &[4, 5], -1.0, 1.0)
            };
            let mut ins = vec!["a".to_string(), w];
            if let Some(cs) = &c {
                ins.push(b.init_rand("c", cs, -1.0, 1.0));
            }
            let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
            b.node(
                Op::Gemm {
                    alpha: 0.5,
                    beta: 2.0,
                    trans_a: false,
                    trans_b,
                },
                &ins,
                &["gm"],
            );
            b.node(Op::Unary(UnaryOp::Relu), &["gm"], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!((n, after.nodes.len()), (1, 1), "{trans_b} {c:?}");
            assert_eq!(fused_act(&after), vec![FusedAct::Relu]);
        }
        // A Gemm with a computed B or a full [M, N] C stays.
        let mut b = Builder::new();
        b.input("a", DType::F32, &[3, 4]);
        b.input("w", DType::F32, &[4, 5]);
        let c = b.init_rand("c", &[3, 5], -1.0, 1.0);
        let w2 = b.init_rand("w2", &[4, 5], -1.0, 1.0);
        b.node(
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: false,
            },
            &["a", "w"],
            &["y"],
        );
        b.node(
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: false,
            },
            &["a", &w2, &c],
            &["y2"],
        );
        b.output("y", DType::F32);
        b.output("y2", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }
}
