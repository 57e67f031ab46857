//! A MatMul with constant weights whose output only a Split along its last
//! axis reads becomes one `FusedOp::MatMul` per part, each with its own
//! columns of the weights (and of the bias), writing its part directly.
//!
//! Exporters fuse attention's Q, K and V projections into one product and
//! split its output (GPT-2's `c_attn`: `[S, 768] x [768, 2304]`, then a
//! Split into three `[S, 768]`). The Split copies the whole output again:
//! 12 of them cost GPT-2 small 1.3% of a run at batch 1. Products narrower
//! by the split cost nothing more, since the GEMM reads a row-major A in
//! place, and each part's weights are packed once at plan time as before.
//!
//! Matched on f32: a `MatMul` or a `FusedOp::MatMul` without residual, its
//! B a constant matrix `[K, N]` and its bias (if any) a constant `[N]`; its
//! output read by nothing but one Split (not a graph output, not read by a
//! subgraph) along the last axis, every Split output present with a known
//! last dim. The activation, applied element by element, goes to every
//! part. Runs after `fusion`, which makes the bias and activation part of
//! the product.

use crate::util::{
    add_constant, constant, dtype_of, f32_tensor, fresh_name, remove_nodes, rewrite_each, shape_of,
    single_output, Index,
};
use crate::PassCtx;
use kiln_ir::{DType, Dim, FusedAct, FusedOp, Graph, Node, Op, Tensor};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    rewrite_each(g, plan_at, apply)
}

/// One part of the split: its output and its columns of B and the bias.
struct Part {
    out: String,
    w: Tensor,
    bias: Option<Tensor>,
}

struct Plan {
    /// The product, replaced by the parts.
    mm: usize,
    /// The Split, removed.
    split: usize,
    a: String,
    act: FusedAct,
    name: String,
    parts: Vec<Part>,
}

fn apply(g: &mut Graph, p: Plan) {
    let mut nodes = Vec::with_capacity(p.parts.len());
    for (k, part) in p.parts.into_iter().enumerate() {
        let name = fresh_name(g, &format!("{}_part{k}", p.name));
        let w = add_constant(g, &format!("{name}_w"), part.w);
        let mut inputs = vec![Some(p.a.clone()), Some(w)];
        if let Some(b) = part.bias {
            inputs.push(Some(add_constant(g, &format!("{name}_b"), b)));
        }
        nodes.push(Node {
            name,
            op: Op::Fused(FusedOp::MatMul { act: p.act }),
            inputs,
            outputs: vec![Some(part.out)],
        });
    }
    // The parts take the product's place in the node list; the Split (which
    // comes after it) and the product go.
    let at = p.mm + 1;
    let n = nodes.len();
    g.nodes.splice(at..at, nodes);
    let split = if p.split >= at { p.split + n } else { p.split };
    remove_nodes(g, &[p.mm, split]);
}

/// The product's activation, if it is a MatMul or a fused one without
/// residual.
fn product_act(n: &Node) -> Option<FusedAct> {
    match &n.op {
        Op::MatMul if n.inputs.len() == 2 => Some(FusedAct::Identity),
        Op::Fused(FusedOp::MatMul { act }) if n.input(3).is_none() => Some(*act),
        _ => None,
    }
}

/// Columns `c0..c0 + w` of the row-major `[rows, cols]` values `v`.
fn columns(v: &[f32], cols: usize, c0: usize, w: usize) -> Vec<f32> {
    v.chunks_exact(cols)
        .flat_map(|row| &row[c0..c0 + w])
        .copied()
        .collect()
}

fn plan_at(g: &Graph, ix: &Index, i: usize) -> Option<Plan> {
    let split = &g.nodes[i];
    let Op::Split { axis, .. } = split.op else {
        return None;
    };
    let mid = split.input(0)?;
    let j = ix.producer_of(mid)?;
    if ix.single_reader(mid) != Some(i) || ix.sub_reads.contains(mid) {
        return None;
    }
    let mm = &g.nodes[j];
    let act = product_act(mm)?;
    if single_output(mm)? != mid || dtype_of(g, mid) != Some(DType::F32) {
        return None;
    }
    let rank = shape_of(g, mid)?.len() as i64;
    if rank < 1 || (axis != -1 && axis != rank - 1) {
        return None;
    }
    let w = constant(g, ix, mm.input(1)?)?;
    let (&[k, n], Some(wv)) = (w.shape(), w.as_slice::<f32>()) else {
        return None;
    };
    let bias = match mm.input(2) {
        None => None,
        Some(b) => {
            let b = constant(g, ix, b)?;
            if b.shape() != [n] {
                return None;
            }
            Some(b.as_slice::<f32>()?)
        }
    };
    // Every part present, its width known; together they are B's columns.
    let mut widths = Vec::with_capacity(split.outputs.len());
    for o in &split.outputs {
        let o = o.as_deref()?;
        match shape_of(g, o)?.last()? {
            Dim::Known(d) => widths.push((o, *d)),
            _ => return None,
        }
    }
    if widths.len() < 2 || widths.iter().map(|w| w.1).sum::<usize>() != n {
        return None;
    }
    let mut parts = Vec::with_capacity(widths.len());
    let mut c0 = 0;
    for (out, width) in widths {
        parts.push(Part {
            out: out.to_string(),
            w: f32_tensor(vec![k, width], columns(wv, n, c0, width)),
            bias: bias.map(|b| f32_tensor(vec![width], b[c0..c0 + width].to_vec())),
        });
        c0 += width;
    }
    Some(Plan {
        mm: j,
        split: i,
        a: mm.input(0)?.to_string(),
        act,
        name: mm.name.clone(),
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_pass, count_op, Builder};

    /// `x [2, 3, 8]` times `w [8, 12]` (plus a bias, with `act`, when
    /// `fused`), split along `axis` into parts of `sizes` (the Split's
    /// `split` input), each part through a Relu to an output.
    fn qkv(fused: Option<FusedAct>, axis: i64, sizes: &[i64]) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3, 8]);
        let w = b.init_rand("w", &[8, 12], -0.5, 0.5);
        match fused {
            Some(act) => {
                let bias = b.init_rand("bias", &[12], -0.5, 0.5);
                b.node(
                    Op::Fused(FusedOp::MatMul { act }),
                    &["x", &w, &bias],
                    &["y"],
                );
            }
            None => b.node(Op::MatMul, &["x", &w], &["y"]),
        }
        let split = b.init_i64("sizes", sizes.to_vec());
        let outs: Vec<String> = (0..sizes.len()).map(|k| format!("p{k}")).collect();
        let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let op = Op::Split {
            axis,
            num_outputs: sizes.len(),
        };
        b.node(op, &["y", &split], &out_refs);
        for o in &outs {
            let r = format!("{o}_relu");
            b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &[o], &[&r]);
            b.output(&r, DType::F32);
        }
        b.finish()
    }

    #[test]
    fn splits_a_fused_product_into_one_per_part() {
        for (act, sizes) in [
            (FusedAct::Identity, vec![4, 4, 4]),
            (FusedAct::GeluErf, vec![5, 3, 4]),
            (FusedAct::Relu, vec![11, 1]),
        ] {
            for axis in [-1, 2] {
                let g = qkv(Some(act), axis, &sizes);
                let (after, n) = check_pass(&g, run);
                assert_eq!(n, 1, "{act:?} {sizes:?} axis {axis}");
                assert_eq!(count_op(&after, "Split"), 0);
                assert_eq!(count_op(&after, "FusedMatMul"), sizes.len());
            }
        }
        // A plain MatMul (no bias) too.
        let (after, n) = check_pass(&qkv(None, -1, &[6, 6]), run);
        assert_eq!((n, count_op(&after, "FusedMatMul")), (1, 2));
    }

    #[test]
    fn leaves_other_splits_alone() {
        // Along another axis.
        let g = qkv(Some(FusedAct::Identity), 1, &[1, 2]);
        assert_eq!(check_pass(&g, run).1, 0);
        // The product's output also a graph output.
        let mut g = qkv(Some(FusedAct::Identity), -1, &[6, 6]);
        g.outputs.push(kiln_ir::ValueInfo {
            name: "y".into(),
            ty: g.value_types["y"].clone(),
        });
        assert_eq!(check_pass(&g, run).1, 0);
        // A residual in the product.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3, 8]);
        b.input("r", DType::F32, &[3, 12]);
        let w = b.init_rand("w", &[8, 12], -0.5, 0.5);
        let op = Op::Fused(FusedOp::MatMul {
            act: FusedAct::Identity,
        });
        b.node(op, &["x", &w, "", "r"], &["y"]);
        let sizes = b.init_i64("sizes", vec![6, 6]);
        let split = Op::Split {
            axis: -1,
            num_outputs: 2,
        };
        b.node(split, &["y", &sizes], &["p0", "p1"]);
        b.output("p0", DType::F32);
        b.output("p1", DType::F32);
        assert_eq!(check_pass(&b.finish(), run).1, 0);
    }
}
