//! Attention fusion: the scaled dot-product core of a transformer's attention,
//! as exporters write it, becomes one `FusedOp::Attention` node:
//!
//! ```text
//! MatMul(Q, Kt) [-> Div/Mul by a scalar constant]
//!               [-> Add(mask) | Where(cond, ., fill) | Where(cond, fill, .)]
//!               -> Softmax(last axis) -> MatMul(., V)
//! ```
//!
//! (BERT-style exports add a float mask; GPT-2-style ones select a constant
//! fill where a causal bool mask is false.) The head Transposes around the
//! core (`[B, S, H, D] -> [B, H, S, D]` for Q and V, `-> [B, H, D, S]` for K,
//! and back for the output) are absorbed: the kernel reads the operands and
//! writes the output through strides (`AttnLayout`). The Reshapes that split
//! and merge the heads stay; on contiguous data they move no bytes.
//!
//! Conditions, so the fused node computes exactly what the chain did: every
//! value is f32 (the condition bool); every intermediate is read only by the
//! next step and is neither a graph output nor read by a subgraph; Q, Kt and V
//! have one rank and the same, known leading (batch) dims, so no MatMul
//! broadcasts; the mask does not grow the scores' shape; Softmax runs along
//! the last axis.

use crate::util::{
    dtype_of, is_binary, remove_nodes, rewrite_each, scalar_const, shape_of, single_output, Index,
};
use crate::PassCtx;
use kiln_ir::{AttnLayout, AttnMask, AttnScale, BinaryOp, DType, FusedOp, Graph, Op};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    rewrite_each(g, plan_at, apply)
}

struct Plan {
    /// The second MatMul, which becomes the fused node.
    base: usize,
    op: FusedOp,
    inputs: Vec<Option<String>>,
    /// With an absorbed output Transpose: the MatMul's output, which goes
    /// away, and the Transpose's, which the fused node writes instead.
    rename_out: Option<(String, String)>,
    remove: Vec<usize>,
}

fn apply(g: &mut Graph, p: Plan) {
    let node = &mut g.nodes[p.base];
    node.op = Op::Fused(p.op);
    node.inputs = p.inputs;
    if let Some((old, new)) = p.rename_out {
        node.outputs = vec![Some(new)];
        g.value_types.remove(&old);
    }
    remove_nodes(g, &p.remove);
}

/// The fused node for the Softmax at node `i`, if the chain around it matches.
fn plan_at(g: &Graph, ix: &Index, i: usize) -> Option<Plan> {
    let sm = &g.nodes[i];
    let Op::Softmax { axis, .. } = sm.op else {
        return None;
    };
    let probs = single_output(sm)?;
    let scores_in = sm.input(0)?;
    let rank = shape_of(g, probs)?.len();
    // Both Softmax forms (opset < 13 flattens at `axis`) are the last-axis
    // softmax when `axis` names the last axis.
    if rank < 2 || !(axis == rank as i64 - 1 || axis == -1) {
        return None;
    }
    // Softmax -> MatMul(probs, V).
    let base = ix.single_reader(probs)?;
    let pv = &g.nodes[base];
    if pv.op != Op::MatMul || pv.input(0) != Some(probs) || pv.input(1) == Some(probs) {
        return None;
    }
    let v = pv.input(1)?;
    let out = single_output(pv)?;
    let mut remove = vec![i];

    // Upward from the Softmax input: the mask, the scale, then MatMul(Q, Kt).
    let mut cur = scores_in.to_string();
    let mut mask = AttnMask::None;
    let mut mask_input = None;
    let mut scale = AttnScale::None;
    let step = |v: &str, remove: &[usize]| -> Option<usize> {
        let p = ix.producer_of(v)?;
        // Read only by the step after it (already in `remove`).
        let last = *remove.last()?;
        (ix.single_reader(v) == Some(last)).then_some(p)
    };
    let mut at = step(&cur, &remove)?;
    let n = &g.nodes[at];
    if is_binary(n, BinaryOp::Add) {
        let (a, b) = (n.input(0)?, n.input(1)?);
        // Either side may be the scores: the one the chain produces, read
        // only by this Add, with the Add's shape (a shared mask is read by
        // every layer's Add).
        let (scores, m) = [(a, b), (b, a)].into_iter().find(|&(s, m)| {
            s != m
                && producer_is_scale_or_matmul(g, ix, s)
                && ix.single_reader(s) == Some(at)
                && same_dims(g, s, &cur)
        })?;
        if dtype_of(g, m) != Some(DType::F32) {
            return None;
        }
        mask = AttnMask::Add;
        mask_input = Some(m.to_string());
        remove.push(at);
        cur = scores.to_string();
        at = step(&cur, &remove)?;
    } else if n.op == Op::Where && n.inputs.len() == 3 {
        let (c, x, y) = (n.input(0)?, n.input(1)?, n.input(2)?);
        if dtype_of(g, c) != Some(DType::Bool) {
            return None;
        }
        // Where(cond, scores, fill) keeps the scores where cond is true.
        let (scores, fill, keep_if_true) = scalar_beside(g, ix, x, y)?;
        if !same_dims(g, scores, &cur) {
            return None;
        }
        mask = AttnMask::Where { fill, keep_if_true };
        mask_input = Some(c.to_string());
        remove.push(at);
        cur = scores.to_string();
        at = step(&cur, &remove)?;
    }
    let n = &g.nodes[at];
    // Only scores / c: c / scores is not a scale.
    if is_binary(n, BinaryOp::Div) {
        let (num, den) = (n.input(0)?, n.input(1)?);
        if let Some(c) = f32_scalar(g, ix, den).filter(|_| num != den) {
            scale = AttnScale::Div(c);
            remove.push(at);
            cur = num.to_string();
            at = step(&cur, &remove)?;
        }
    } else if is_binary(n, BinaryOp::Mul) {
        let (a, b) = (n.input(0)?, n.input(1)?);
        if let Some((x, c, _)) = scalar_beside(g, ix, a, b) {
            scale = AttnScale::Mul(c);
            remove.push(at);
            cur = x.to_string();
            at = step(&cur, &remove)?;
        }
    }
    let qk = &g.nodes[at];
    if qk.op != Op::MatMul || single_output(qk) != Some(cur.as_str()) {
        return None;
    }
    let (q, kt) = (qk.input(0)?, qk.input(1)?);
    remove.push(at);

    // Every value of the chain is f32.
    for name in [q, kt, v, out, probs, scores_in, cur.as_str()] {
        if dtype_of(g, name) != Some(DType::F32) {
            return None;
        }
    }
    // One rank, the same known leading dims: no MatMul broadcasting.
    let (qs, ks, vs) = (shape_of(g, q)?, shape_of(g, kt)?, shape_of(g, v)?);
    let r = qs.len();
    if r < 2 || ks.len() != r || vs.len() != r || r != rank {
        return None;
    }
    if qs.iter().chain(&ks).chain(&vs).any(|d| d.is_unknown())
        || qs[..r - 2] != ks[..r - 2]
        || qs[..r - 2] != vs[..r - 2]
    {
        return None;
    }
    // The head Transposes: an operand that is a Transpose read only by its
    // MatMul is read from the Transpose's input; an output read only by a
    // Transpose that keeps the last axis last is written in its layout.
    let mut layout = AttnLayout::default();
    let mut inputs = Vec::with_capacity(4);
    for (slot, (name, reader)) in [(q, at), (kt, at), (v, base)].into_iter().enumerate() {
        match absorbable_transpose(g, ix, name, reader, r) {
            Some((tnode, src, perm)) => {
                layout.inputs[slot] = Some(perm);
                remove.push(tnode);
                inputs.push(Some(src.to_string()));
            }
            None => inputs.push(Some(name.to_string())),
        }
    }
    let mut rename_out = None;
    if let Some(tn) = ix.single_reader(out) {
        let tnode = &g.nodes[tn];
        if let (Some(perm), Some(new)) = (transpose_perm(tnode, r), single_output(tnode)) {
            if perm[r - 1] == r - 1 && tnode.input(0) == Some(out) {
                layout.out = Some(perm);
                remove.push(tn);
                rename_out = Some((out.to_string(), new.to_string()));
            }
        }
    }
    if let Some(m) = mask_input {
        inputs.push(Some(m));
    }
    Some(Plan {
        base,
        op: FusedOp::Attention {
            scale,
            mask,
            layout,
        },
        inputs,
        rename_out,
        remove,
    })
}

/// If `name` is made by a Transpose of a rank-`r` value and read only by
/// node `reader`: that Transpose's node, its input and its permutation.
fn absorbable_transpose<'g>(
    g: &'g Graph,
    ix: &Index,
    name: &str,
    reader: usize,
    r: usize,
) -> Option<(usize, &'g str, Vec<usize>)> {
    let p = ix.producer_of(name)?;
    let node = &g.nodes[p];
    let perm = transpose_perm(node, r)?;
    if ix.single_reader(name) != Some(reader) || single_output(node) != Some(name) {
        return None;
    }
    let src = node.input(0)?;
    (shape_of(g, src)?.len() == r && dtype_of(g, src) == Some(DType::F32)).then_some((p, src, perm))
}

/// The permutation of a Transpose node over rank `r` (no `perm`: the axes
/// reversed), if it is one.
fn transpose_perm(node: &kiln_ir::Node, r: usize) -> Option<Vec<usize>> {
    let Op::Transpose { perm } = &node.op else {
        return None;
    };
    let perm: Vec<usize> = match perm {
        Some(p) => p
            .iter()
            .map(|&a| usize::try_from(a).ok())
            .collect::<Option<_>>()?,
        None => (0..r).rev().collect(),
    };
    let shape: Vec<usize> = (0..r).collect();
    AttnLayout::permuted(&shape, Some(&perm)).map(|_| perm)
}

/// The value of `name` if it is a one-element f32 constant.
fn f32_scalar(g: &Graph, ix: &Index, name: &str) -> Option<f32> {
    (dtype_of(g, name) == Some(DType::F32))
        .then(|| scalar_const(g, ix, name))
        .flatten()
        .map(|c| c as f32)
}

/// Of two operands, the one beside a scalar f32 constant: `(operand,
/// constant, whether the constant is the second)`; `None` unless exactly
/// one side is such a constant (the second when both are).
fn scalar_beside<'n>(
    g: &Graph,
    ix: &Index,
    a: &'n str,
    b: &'n str,
) -> Option<(&'n str, f32, bool)> {
    match (f32_scalar(g, ix, b), f32_scalar(g, ix, a)) {
        (Some(c), _) if a != b => Some((a, c, true)),
        (None, Some(c)) => Some((b, c, false)),
        _ => None,
    }
}

/// Whether `v` is produced by a MatMul, Div or Mul (the scores side of a mask Add).
fn producer_is_scale_or_matmul(g: &Graph, ix: &Index, v: &str) -> bool {
    ix.producer_of(v).is_some_and(|p| {
        matches!(
            g.nodes[p].op,
            Op::MatMul | Op::Binary(BinaryOp::Div) | Op::Binary(BinaryOp::Mul)
        )
    })
}

/// Whether `a` and `b` have the same fully known (possibly symbolic) shape:
/// the mask step did not broadcast the scores to something bigger.
fn same_dims(g: &Graph, a: &str, b: &str) -> bool {
    match (shape_of(g, a), shape_of(g, b)) {
        (Some(x), Some(y)) => x == y && x.iter().all(|d| !d.is_unknown()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::Dim;

    fn softmax(axis: i64) -> Op {
        Op::Softmax {
            axis,
            coerce_2d: false,
        }
    }

    /// How the test chain is spelled.
    #[derive(Clone, Copy)]
    enum Masking {
        /// Add(mask, scores): the mask on the left.
        AddLeft,
        /// Where(cond, scores, -1e4).
        WhereKeep,
        /// Where(cond, -inf, scores).
        WhereFill,
        None,
    }

    /// Q [2,3,5,4] x Kt [2,3,4,6] -> Div or Mul by a scalar -> mask ->
    /// Softmax(axis) -> x V [2,3,6,4] -> y.
    fn chain(masking: Masking, div: bool, axis: i64, kt_batch: usize) -> Graph {
        let mut b = Builder::new();
        b.input("q", DType::F32, &[2, 3, 5, 4]);
        b.input("kt", DType::F32, &[kt_batch, 3, 4, 6]);
        b.input("v", DType::F32, &[2, 3, 6, 4]);
        b.input("mask", DType::F32, &[2, 1, 1, 6]);
        b.input("cond", DType::Bool, &[1, 1, 5, 6]);
        let c = b.scalar("c", if div { 2.0 } else { 0.5 });
        let fill = b.scalar("fill", -1e4);
        let ninf = b.scalar("ninf", f32::NEG_INFINITY);
        b.node(Op::MatMul, &["q", "kt"], &["s"]);
        let scale = if div { BinaryOp::Div } else { BinaryOp::Mul };
        b.node(Op::Binary(scale), &["s", &c], &["ss"]);
        match masking {
            Masking::AddLeft => b.node(Op::Binary(BinaryOp::Add), &["mask", "ss"], &["sm"]),
            Masking::WhereKeep => b.node(Op::Where, &["cond", "ss", &fill], &["sm"]),
            Masking::WhereFill => b.node(Op::Where, &["cond", &ninf, "ss"], &["sm"]),
            Masking::None => b.node(Op::Identity, &["ss"], &["sm"]),
        }
        b.node(softmax(axis), &["sm"], &["p"]);
        b.node(Op::MatMul, &["p", "v"], &["y"]);
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn bert_and_gpt2_chains_fuse() {
        for masking in [Masking::AddLeft, Masking::WhereKeep, Masking::WhereFill] {
            for div in [true, false] {
                let g = chain(masking, div, -1, 2);
                let (after, n) = check_pass(&g, run);
                assert_eq!(n, 1);
                assert_eq!(count_op(&after, "FusedAttention"), 1);
                assert_eq!(count_op(&after, "MatMul"), 0);
                assert_eq!(count_op(&after, "Softmax"), 0);
                let node = after
                    .nodes
                    .iter()
                    .find(|n| n.op.name() == "FusedAttention")
                    .unwrap();
                assert_eq!(node.inputs.len(), 4);
                let Op::Fused(FusedOp::Attention { scale, mask, .. }) = &node.op else {
                    unreachable!()
                };
                assert_eq!(
                    *scale,
                    if div {
                        AttnScale::Div(2.0)
                    } else {
                        AttnScale::Mul(0.5)
                    }
                );
                let want = match masking {
                    Masking::AddLeft => AttnMask::Add,
                    Masking::WhereKeep => AttnMask::Where {
                        fill: -1e4,
                        keep_if_true: true,
                    },
                    _ => AttnMask::Where {
                        fill: f32::NEG_INFINITY,
                        keep_if_true: false,
                    },
                };
                assert_eq!(*mask, want);
            }
        }
    }

    #[test]
    fn unmasked_chain_with_positive_axis_fuses() {
        // The Identity in the chain is another reader step: remove it first,
        // as optimize's cleanup rounds would.
        let mut g = chain(Masking::None, true, 3, 2);
        let ctx = ctx_for(&g);
        crate::passes::identity::run(&mut g, &ctx);
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 1);
        let node = after
            .nodes
            .iter()
            .find(|n| n.op.name() == "FusedAttention")
            .unwrap();
        assert_eq!(node.inputs.len(), 3);
    }

    #[test]
    fn chains_that_differ_are_left_alone() {
        // Softmax over another axis.
        let (_, n) = check_pass(&chain(Masking::AddLeft, true, 2, 2), run);
        assert_eq!(n, 0);
        // Kt broadcast over the batch.
        let (_, n) = check_pass(&chain(Masking::AddLeft, true, -1, 1), run);
        assert_eq!(n, 0);
        // The scores are also a graph output.
        let mut g = chain(Masking::AddLeft, true, -1, 2);
        g.outputs.push(kiln_ir::ValueInfo {
            name: "ss".into(),
            ty: kiln_ir::ValueType::new(DType::F32, None),
        });
        let (_, n) = check_pass(&g, run);
        assert_eq!(n, 0);
    }

    #[test]
    fn masks_that_grow_the_scores_and_reversed_division_are_left_alone() {
        // Scores [1,3,5,6] + mask [2,3,5,6]: the Add makes a bigger tensor.
        let mut b = Builder::new();
        b.input("q", DType::F32, &[1, 3, 5, 4]);
        b.input("kt", DType::F32, &[1, 3, 4, 6]);
        b.input("v", DType::F32, &[1, 3, 6, 4]);
        b.input("mask", DType::F32, &[2, 3, 5, 6]);
        b.node(Op::MatMul, &["q", "kt"], &["s"]);
        b.node(Op::Binary(BinaryOp::Add), &["s", "mask"], &["sm"]);
        b.node(softmax(-1), &["sm"], &["p"]);
        b.node(Op::MatMul, &["p", "v"], &["y"]);
        b.output("y", DType::F32);
        let (_, n) = check_pass(&b.finish(), run);
        assert_eq!(n, 0);
        // c / scores is not a scale.
        let mut b = Builder::new();
        b.input_dims(
            "q",
            DType::F32,
            vec![Dim::Named("B".into()), Dim::Known(5), Dim::Known(4)],
        );
        b.input_dims(
            "kt",
            DType::F32,
            vec![Dim::Named("B".into()), Dim::Known(4), Dim::Known(6)],
        );
        b.input_dims(
            "v",
            DType::F32,
            vec![Dim::Named("B".into()), Dim::Known(6), Dim::Known(4)],
        );
        let c = b.scalar("c", 3.0);
        b.node(Op::MatMul, &["q", "kt"], &["s"]);
        b.node(Op::Binary(BinaryOp::Div), &[&c, "s"], &["sd"]);
        b.node(softmax(-1), &["sd"], &["p"]);
        b.node(Op::MatMul, &["p", "v"], &["y"]);
        b.output("y", DType::F32);
        let (_, n) = check_pass(&b.finish(), run);
        assert_eq!(n, 0);
    }

    /// BERT's head layout: `[B, S, H, D]` operands transposed into heads,
    /// the output transposed back. `k_perm` is K's Transpose; `out_perm` the
    /// output's; `extra_reader` also reads Q's Transpose output elsewhere.
    fn headed(k_perm: &[i64], out_perm: &[i64], extra_reader: bool) -> Graph {
        let mut b = Builder::new();
        b.input("q4", DType::F32, &[2, 5, 3, 4]);
        b.input("k4", DType::F32, &[2, 6, 3, 4]);
        b.input("v4", DType::F32, &[2, 6, 3, 4]);
        b.input("mask", DType::F32, &[2, 1, 1, 6]);
        let tr = |p: &[i64]| Op::Transpose {
            perm: Some(p.to_vec()),
        };
        let c = b.scalar("c", 2.0);
        b.node(tr(&[0, 2, 1, 3]), &["q4"], &["q"]);
        b.node(tr(k_perm), &["k4"], &["kt"]);
        b.node(tr(&[0, 2, 1, 3]), &["v4"], &["v"]);
        b.node(Op::MatMul, &["q", "kt"], &["s"]);
        b.node(Op::Binary(BinaryOp::Div), &["s", &c], &["sd"]);
        b.node(Op::Binary(BinaryOp::Add), &["sd", "mask"], &["sm"]);
        b.node(softmax(-1), &["sm"], &["p"]);
        b.node(Op::MatMul, &["p", "v"], &["y"]);
        b.node(tr(out_perm), &["y"], &["yt"]);
        b.output("yt", DType::F32);
        if extra_reader {
            b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &["q"], &["qr"]);
            b.output("qr", DType::F32);
        }
        b.finish()
    }

    fn fused_layout(g: &Graph) -> AttnLayout {
        let node = g
            .nodes
            .iter()
            .find(|n| n.op.name() == "FusedAttention")
            .unwrap();
        let Op::Fused(FusedOp::Attention { layout, .. }) = &node.op else {
            unreachable!()
        };
        layout.clone()
    }

    #[test]
    fn head_transposes_are_absorbed() {
        let (after, n) = check_pass(&headed(&[0, 2, 3, 1], &[0, 2, 1, 3], false), run);
        assert_eq!(n, 1);
        assert_eq!(count_op(&after, "Transpose"), 0);
        assert_eq!(count_op(&after, "FusedAttention"), 1);
        let layout = fused_layout(&after);
        assert_eq!(
            layout.inputs,
            [
                Some(vec![0, 2, 1, 3]),
                Some(vec![0, 2, 3, 1]),
                Some(vec![0, 2, 1, 3])
            ]
        );
        assert_eq!(layout.out, Some(vec![0, 2, 1, 3]));
        // The fused node reads the untransposed inputs and writes yt.
        let node = after
            .nodes
            .iter()
            .find(|n| n.op.name() == "FusedAttention")
            .unwrap();
        assert_eq!(node.input(0), Some("q4"));
        assert_eq!(node.input(1), Some("k4"));
        assert_eq!(node.input(2), Some("v4"));
        assert_eq!(node.outputs, vec![Some("yt".to_string())]);
        assert!(!after.value_types.contains_key("y"));
    }

    #[test]
    fn transposes_that_cannot_go_stay() {
        // An output Transpose that moves the last axis stays; so does an
        // operand Transpose with another reader. The core fuses regardless.
        let (after, n) = check_pass(&headed(&[0, 2, 3, 1], &[0, 1, 3, 2], true), run);
        assert_eq!(n, 1);
        assert_eq!(count_op(&after, "Transpose"), 2);
        let layout = fused_layout(&after);
        assert_eq!(layout.inputs[0], None);
        assert_eq!(layout.inputs[1], Some(vec![0, 2, 3, 1]));
        assert_eq!(layout.out, None);
    }

    #[test]
    fn symbolic_batch_dims_fuse() {
        let mut b = Builder::new();
        let d = |n: &str, a: usize, c: usize| {
            vec![
                Dim::Named(n.into()),
                Dim::Known(2),
                Dim::Known(a),
                Dim::Known(c),
            ]
        };
        b.input_dims("q", DType::F32, d("B", 5, 4));
        b.input_dims("kt", DType::F32, d("B", 4, 5));
        b.input_dims("v", DType::F32, d("B", 5, 3));
        let c = b.scalar("c", 2.0);
        b.node(Op::MatMul, &["q", "kt"], &["s"]);
        b.node(Op::Binary(BinaryOp::Div), &["s", &c], &["sd"]);
        b.node(softmax(-1), &["sd"], &["p"]);
        b.node(Op::MatMul, &["p", "v"], &["y"]);
        b.output("y", DType::F32);
        let (after, n) = check_pass(&b.finish(), run);
        assert_eq!(n, 1);
        assert_eq!(count_op(&after, "FusedAttention"), 1);
    }
}
