//! A pointwise conv whose output only a depthwise conv reads (a MobileNet
//! block's expansion and its depthwise conv) becomes one
//! `FusedOp::PointwiseDepthwise`, so the backend can run the two without
//! writing the expansion out: where the CPU backend says it may run such a
//! pair as one kernel (AVX-512, a 3x3 depthwise conv of stride 1 or 2, and
//! when the batch is known, an expansion too big for the caches:
//! `kiln_cpu::fused::pointwise_depthwise_one_kernel`). Other pairs stay
//! apart, on their prepared and tuned convs. With the batch unknown until
//! run time, the backend chooses per run and runs the rest apart (unprepared,
//! untuned convs).
//!
//! Matched on 2-D f32 NCHW convs (a Conv or a `FusedOp::Conv`): the first
//! 1x1, stride 1, no padding, one group, no residual, its output read by
//! nothing else (not a graph output, not read by a subgraph); the second
//! depthwise (one input and one output channel per group) over exactly
//! those channels, no residual. Runs after `channels_last`, whose regions
//! (small planes) are NHWC and stay as they are.

use crate::util::{dtype_of, remove_nodes, rewrite_each, shape_of, single_output, Index};
use crate::PassCtx;
use kiln_ir::{AutoPad, ConvAttrs, DType, Dim, FusedAct, FusedOp, Graph, Node, Op};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    run_where(g, kiln_cpu::fused::pointwise_depthwise_one_kernel)
}

/// Whether to fuse a pair, from X's batch (if known) and other dims, the
/// expanded channels, the depthwise conv and its weights' shape.
type Takes = fn(Option<usize>, [usize; 3], usize, &ConvAttrs, &[usize]) -> bool;

/// [`run`], fusing the pairs `takes` accepts (tests take every pair).
fn run_where(g: &mut Graph, takes: Takes) -> usize {
    rewrite_each(g, |g, ix, i| plan_at(g, ix, i, takes), apply)
}

struct Plan {
    /// The depthwise conv, rewritten in place.
    dw_node: usize,
    /// The pointwise conv, removed.
    pw_node: usize,
    op: FusedOp,
    inputs: Vec<Option<String>>,
    name: String,
}

fn apply(g: &mut Graph, p: Plan) {
    let node = &mut g.nodes[p.dw_node];
    node.op = Op::Fused(p.op);
    node.inputs = p.inputs;
    while node.inputs.last() == Some(&None) {
        node.inputs.pop();
    }
    node.name = p.name;
    remove_nodes(g, &[p.pw_node]);
}

/// A conv's attributes and fused activation (Identity for a plain Conv),
/// when it has no residual.
fn conv_of(n: &Node) -> Option<(&ConvAttrs, FusedAct)> {
    if n.input(3).is_some() {
        return None;
    }
    match &n.op {
        Op::Conv(c) => Some((c, FusedAct::Identity)),
        Op::Fused(FusedOp::Conv { conv, act }) => Some((conv, *act)),
        _ => None,
    }
}

fn known(s: &[Dim]) -> Option<Vec<usize>> {
    s.iter().map(Dim::known).collect()
}

/// A bias input, if present, is `[m]`.
fn bias_ok(g: &Graph, n: &Node, m: usize) -> bool {
    n.input(2)
        .is_none_or(|b| shape_of(g, b).is_some_and(|s| s == [Dim::Known(m)]))
}

fn plan_at(g: &Graph, ix: &Index, i: usize, takes: Takes) -> Option<Plan> {
    let dw = &g.nodes[i];
    let (dw_conv, act) = conv_of(dw)?;
    single_output(dw)?;
    let mid = dw.input(0)?;
    let j = ix.producer_of(mid)?;
    if ix.single_reader(mid) != Some(i) {
        return None;
    }
    let pw = &g.nodes[j];
    let (pw_conv, pw_act) = conv_of(pw)?;
    if single_output(pw)? != mid {
        return None;
    }
    let x = pw.input(0)?;
    if dtype_of(g, x) != Some(DType::F32) || dtype_of(g, mid) != Some(DType::F32) {
        return None;
    }
    let xs = shape_of(g, x)?;
    let w1 = known(&shape_of(g, pw.input(1)?)?)?;
    let wd = known(&shape_of(g, dw.input(1)?)?)?;
    if xs.len() != 4 || w1.len() != 4 || wd.len() != 4 {
        return None;
    }
    let (m, c) = (w1[0], xs[1].known()?);
    // Each attribute absent or of the conv's rank (a wrong length is an
    // error the Conv itself must still report), and the identity.
    let ones = |v: &[usize]| (v.is_empty() || v.len() == 2) && v.iter().all(|&d| d == 1);
    let pointwise = pw_conv.group == 1
        && w1[1] == c
        && w1[2] == 1
        && w1[3] == 1
        && ones(&pw_conv.strides)
        && ones(&pw_conv.dilations)
        && ones(&pw_conv.kernel_shape)
        && (pw_conv.pads.is_empty() || pw_conv.pads.len() == 4)
        && pw_conv.pads.iter().all(|&p| p == 0)
        && matches!(pw_conv.auto_pad, AutoPad::NotSet | AutoPad::Valid);
    let depthwise = m > 0 && dw_conv.group == m && wd[0] == m && wd[1] == 1;
    if !pointwise || !depthwise || !bias_ok(g, pw, m) || !bias_ok(g, dw, m) {
        return None;
    }
    let chw = [c, xs[2].known()?, xs[3].known()?];
    if !takes(xs[0].known(), chw, m, dw_conv, &wd) {
        return None;
    }
    let own = |v: Option<&str>| v.map(str::to_string);
    Some(Plan {
        dw_node: i,
        pw_node: j,
        op: FusedOp::PointwiseDepthwise {
            pw_act,
            dw: dw_conv.clone(),
            act,
        },
        inputs: vec![
            own(Some(x)),
            own(pw.input(1)),
            own(pw.input(2)),
            own(dw.input(1)),
            own(dw.input(2)),
        ],
        name: format!("{}+{}", pw.name, dw.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_pass, count_op, fused_conv as fused, Builder, RELU6 as CLIP};

    /// The pass fusing every pair it can prove safe.
    fn run_all(g: &mut Graph, _ctx: &PassCtx) -> usize {
        run_where(g, |_, _, _, _, _| true)
    }

    fn conv(group: usize, k: usize, stride: usize, pad: usize) -> ConvAttrs {
        crate::test_util::conv2d(group, k, stride, pad, 1)
    }

    /// MobileNetV2 blocks on `[2, 16, hw, hw]`: a 1x1 expansion to 48
    /// channels with `act`, a 3x3 depthwise conv (the given stride in the
    /// first block) with Clip, a 1x1 projection back to 16 plus the block's
    /// input where the shapes allow.
    fn blocks(hw: usize, n: usize, first_stride: usize, act: FusedAct) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 16, hw, hw]);
        let mut cur = "x".to_string();
        for i in 0..n {
            let s = if i == 0 { first_stride } else { 1 };
            let we = b.init_rand(&format!("we{i}"), &[48, 16, 1, 1], -0.5, 0.5);
            let be = b.init_rand(&format!("be{i}"), &[48], -0.5, 0.5);
            let wd = b.init_rand(&format!("wd{i}"), &[48, 1, 3, 3], -0.5, 0.5);
            let bd = b.init_rand(&format!("bd{i}"), &[48], -0.5, 0.5);
            let wp = b.init_rand(&format!("wp{i}"), &[16, 48, 1, 1], -0.5, 0.5);
            let (e, d, p) = (format!("e{i}"), format!("d{i}"), format!("p{i}"));
            b.node(fused(conv(1, 1, 1, 0), act), &[&cur, &we, &be], &[&e]);
            b.node(fused(conv(48, 3, s, 1), CLIP), &[&e, &wd, &bd], &[&d]);
            if s == 1 {
                let project = fused(conv(1, 1, 1, 0), FusedAct::Identity);
                b.node(project, &[&d, &wp, "", &cur], &[&p]);
            } else {
                b.node(Op::Conv(conv(1, 1, 1, 0)), &[&d, &wp], &[&p]);
            }
            cur = p;
        }
        b.output(&cur, DType::F32);
        b.finish()
    }

    /// Every block's expansion and depthwise conv fuse, on planes where the
    /// CPU runs them as one kernel (28x28 and under) and where it runs them
    /// apart (40x40), strides 1 and 2, with Relu, Clip and HardSwish; the
    /// outputs stay the same (checked by `check_pass`).
    #[test]
    fn fuses_each_expansion_with_its_depthwise_conv() {
        for (hw, stride, act) in [
            (28, 1, CLIP),
            (28, 2, FusedAct::Relu),
            (40, 2, FusedAct::HardSwish),
            (17, 1, FusedAct::Identity),
        ] {
            let g = blocks(hw, 2, stride, act);
            let (after, n) = check_pass(&g, run_all);
            assert_eq!(n, 2, "{hw}x{hw} stride {stride}");
            assert_eq!(count_op(&after, "FusedPointwiseDepthwise"), 2);
            // The two projections stay.
            assert_eq!(count_op(&after, "FusedConv") + count_op(&after, "Conv"), 2);
            assert_eq!(after.outputs, g.outputs);
        }
    }

    #[test]
    fn leaves_pairs_it_cannot_fuse() {
        // The expansion read twice (by the depthwise conv and a Relu that
        // is a graph output).
        let mut g = blocks(20, 1, 1, CLIP);
        g.nodes.push(Node {
            name: "extra".into(),
            op: Op::Unary(kiln_ir::UnaryOp::Relu),
            inputs: vec![Some("e0".into())],
            outputs: vec![Some("r".into())],
        });
        g.outputs.push(kiln_ir::ValueInfo {
            name: "r".into(),
            ty: kiln_ir::ValueType::new(DType::F32, None),
        });
        assert_eq!(check_pass(&g, run_all).1, 0);
        // A strided or padded "pointwise" conv, one padded SAME, one whose
        // strides have the wrong length (the Conv's error must stay), a
        // grouped (not depthwise) second conv, a residual on the expansion.
        let same = ConvAttrs {
            auto_pad: AutoPad::SameUpper,
            ..conv(1, 1, 1, 0)
        };
        let bad_strides = ConvAttrs {
            strides: vec![1],
            ..conv(1, 1, 1, 0)
        };
        for (pw, dw, residual) in [
            (conv(1, 1, 2, 0), conv(48, 3, 1, 1), false),
            (conv(1, 1, 1, 1), conv(48, 3, 1, 1), false),
            (same, conv(48, 3, 1, 1), false),
            (conv(1, 1, 1, 0), conv(24, 3, 1, 1), false),
            (conv(1, 1, 1, 0), conv(48, 3, 1, 1), true),
        ] {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[1, 48, 12, 12]);
            let we = b.init_rand("we", &[48, 48, 1, 1], -0.5, 0.5);
            let per_group = 48 / dw.group;
            let wd = b.init_rand("wd", &[48, per_group, 3, 3], -0.5, 0.5);
            let ins: Vec<&str> = if residual {
                vec!["x", &we, "", "x"]
            } else {
                vec!["x", &we]
            };
            b.node(fused(pw, CLIP), &ins, &["e"]);
            b.node(fused(dw, CLIP), &["e", &wd], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            assert_eq!(check_pass(&g, run_all).1, 0);
        }
        // (Not run: the original graph is invalid.)
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 48, 12, 12]);
        let we = b.init_rand("we", &[48, 48, 1, 1], -0.5, 0.5);
        let wd = b.init_rand("wd", &[48, 1, 3, 3], -0.5, 0.5);
        b.node(fused(bad_strides, CLIP), &["x", &we], &["e"]);
        b.node(fused(conv(48, 3, 1, 1), CLIP), &["e", &wd], &["y"]);
        b.output("y", DType::F32);
        // (Not inferred: inference rejects the strides.)
        let mut g = b.g;
        g.value_types.insert(
            "e".into(),
            kiln_ir::ValueType::new(
                DType::F32,
                Some([1, 48, 12, 12].iter().map(|&d| Dim::Known(d)).collect()),
            ),
        );
        let ctx = crate::test_util::ctx_for(&g);
        assert_eq!(run_all(&mut g, &ctx), 0);
    }

    /// `run` fuses exactly the pairs the CPU backend may run as one kernel:
    /// none on small planes at a known batch.
    #[test]
    fn fuses_what_the_backend_runs_as_one_kernel() {
        let g = blocks(20, 2, 1, CLIP);
        assert_eq!(check_pass(&g, run).1, 0);
        // A MobileNetV2 stem block at batch 8 (a 38 MB expansion); and a
        // batch known only at run time, fused wherever the kernel takes the
        // pair's window (the backend picks per run), on 20x20 too.
        for (batch, c, m, hw, stride) in [(Some(8), 16, 96, 112, 2), (None, 16, 48, 20, 1)] {
            let mut b = Builder::new();
            let n = batch.map_or(Dim::Named("N".into()), Dim::Known);
            let dims = vec![n, Dim::Known(c), Dim::Known(hw), Dim::Known(hw)];
            b.input_dims("x", DType::F32, dims);
            let we = b.init_rand("we", &[m, c, 1, 1], -0.5, 0.5);
            let wd = b.init_rand("wd", &[m, 1, 3, 3], -0.5, 0.5);
            b.node(fused(conv(1, 1, 1, 0), CLIP), &["x", &we], &["e"]);
            b.node(fused(conv(m, 3, stride, 1), CLIP), &["e", &wd], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            let takes = kiln_cpu::fused::pointwise_depthwise_one_kernel(
                batch,
                [c, hw, hw],
                m,
                &conv(m, 3, stride, 1),
                &[m, 1, 3, 3],
            );
            let (after, fused_pairs) = check_pass(&g, run);
            assert_eq!(fused_pairs, takes as usize, "batch {batch:?}");
            assert_eq!(count_op(&after, "FusedPointwiseDepthwise"), takes as usize);
            if !takes {
                eprintln!(
                    "batch {batch:?}: this CPU runs the pair apart (no AVX-512, or a big L3)"
                );
            }
        }
    }
}
