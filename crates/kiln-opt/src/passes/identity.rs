//! No-op elimination: nodes whose output provably equals their data input.
//!
//! Identity; inference Dropout whose mask nobody reads; Cast/CastLike to the
//! input's own dtype; Reshape, Flatten, Expand, Squeeze and Unsqueeze whose
//! output shape equals the input's; Transpose with the identity permutation;
//! Add/Sub of an all-zero constant and Mul/Div by an all-one constant when the
//! output shape and dtype equal the other input's. Readers are redirected to the
//! input; when the output is a graph output, the input's producer is renamed
//! instead (see [`crate::util::redirect`]), and when neither is possible the
//! node stays.

use crate::util::{const_all_eq, dtype_of, redirect, remove_nodes, same_shape, shape_of, Index};
use crate::PassCtx;
use kiln_ir::{BinaryOp, Graph, Op};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    let mut count = 0;
    // One rewrite per index build (indices shift when a node goes).
    'outer: loop {
        let Some(ix) = Index::new(g) else {
            return count;
        };
        for &i in &ix.order {
            let Some((out, src)) = noop_alias(g, &ix, i) else {
                continue;
            };
            if redirect(g, &ix, &out, &src) {
                remove_nodes(g, &[i]);
                count += 1;
                continue 'outer;
            }
        }
        return count;
    }
}

/// `(output, input)` when node `i` is a no-op whose output equals that input.
fn noop_alias(g: &Graph, ix: &Index, i: usize) -> Option<(String, String)> {
    let n = &g.nodes[i];
    let out = n.outputs.first()?.clone()?;
    let x = n.input(0)?.to_string();
    // Only the first output may be in use (Dropout's mask aside, the ops below
    // have one output).
    for extra in n.outputs.iter().skip(1).flatten() {
        if !ix.readers(extra).is_empty() || ix.is_pinned(extra) {
            return None;
        }
    }
    let same_type = || {
        dtype_of(g, &x).is_some() && dtype_of(g, &x) == dtype_of(g, &out) && same_shape(g, &x, &out)
    };
    let is_noop = match &n.op {
        Op::Identity | Op::Dropout => true,
        Op::Cast { to } => dtype_of(g, &x) == Some(*to),
        Op::CastLike => {
            let t = n.input(1)?;
            dtype_of(g, &x).is_some() && dtype_of(g, &x) == dtype_of(g, t)
        }
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Expand | Op::Squeeze | Op::Unsqueeze => {
            same_type()
        }
        Op::Transpose { perm } => match perm {
            Some(p) => p.iter().enumerate().all(|(k, &v)| v == k as i64) && same_type(),
            None => shape_of(g, &x).is_some_and(|s| s.len() <= 1) && same_type(),
        },
        Op::Binary(b @ (BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div)) => {
            let (a, c) = (n.input(0)?, n.input(1)?);
            let neutral = if matches!(b, BinaryOp::Add | BinaryOp::Sub) {
                0.0
            } else {
                1.0
            };
            // x op c, or (for the commutative ones) c op x.
            let data = if const_all_eq(g, ix, c, neutral) {
                a
            } else if matches!(b, BinaryOp::Add | BinaryOp::Mul) && const_all_eq(g, ix, a, neutral)
            {
                c
            } else {
                return None;
            };
            let ok = dtype_of(g, data).is_some()
                && dtype_of(g, data) == dtype_of(g, &out)
                && same_shape(g, data, &out);
            return ok.then(|| (out, data.to_string()));
        }
        _ => false,
    };
    is_noop.then_some((out, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{DType, Dim, UnaryOp};

    fn relu() -> Op {
        Op::Unary(UnaryOp::Relu)
    }

    #[test]
    fn removes_each_kind_of_noop() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3]);
        let shape = b.init_i64("shape", vec![2, 3]);
        let perm = Op::Transpose {
            perm: Some(vec![0, 1]),
        };
        let zero = b.init_f32("zero", &[3], vec![0.0; 3]);
        let one = b.scalar("one", 1.0);
        let ax = b.init_i64("ax", vec![0]);
        b.node(relu(), &["x"], &["a"]);
        b.node(Op::Identity, &["a"], &["b"]);
        b.node(Op::Dropout, &["b"], &["c", ""]);
        b.node(Op::Cast { to: DType::F32 }, &["c"], &["d"]);
        b.node(Op::Reshape { allowzero: false }, &["d", &shape], &["e"]);
        b.node(perm, &["e"], &["f"]);
        b.node(Op::Binary(BinaryOp::Add), &["f", &zero], &["g"]);
        b.node(Op::Binary(BinaryOp::Mul), &[&one, "g"], &["h"]);
        b.node(Op::Expand, &["h", &shape], &["i"]);
        b.node(Op::Unsqueeze, &["i", &ax], &["j0"]); // not a no-op: adds an axis
        b.node(Op::Unary(UnaryOp::Exp), &["i"], &["j"]);
        b.output("j", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 8, "{:#?}", after.nodes);
        assert_eq!(after.nodes.len(), 3);
        assert_eq!(count_op(&after, "Unsqueeze"), 1);
    }

    #[test]
    fn noop_producing_a_graph_output_renames_its_input() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[4]);
        b.node(relu(), &["x"], &["r"]);
        b.node(Op::Identity, &["r"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 1);
        assert_eq!(after.nodes.len(), 1);
        assert_eq!(after.nodes[0].outputs[0].as_deref(), Some("y"));
    }

    #[test]
    fn keeps_identity_between_input_and_output_or_two_outputs() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[4]);
        b.node(Op::Identity, &["x"], &["y"]);
        b.node(relu(), &["x"], &["r"]);
        b.node(Op::Identity, &["r"], &["z"]);
        b.output("y", DType::F32);
        b.output("r", DType::F32);
        b.output("z", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }

    #[test]
    fn keeps_shape_ops_on_unknown_shapes_and_real_casts() {
        let mut b = Builder::new();
        b.input_dims("x", DType::F32, vec![Dim::Unknown, Dim::Known(3)]);
        let shape = b.init_i64("shape", vec![-1, 3]);
        b.node(Op::Reshape { allowzero: false }, &["x", &shape], &["a"]);
        b.node(Op::Cast { to: DType::F64 }, &["a"], &["b"]);
        b.node(Op::Cast { to: DType::F32 }, &["b"], &["c"]);
        b.output("c", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }

    #[test]
    fn keeps_add_of_overridable_zero_and_broadcasting_add() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3]);
        b.input("z", DType::F32, &[3]);
        b.init_f32("z", &[3], vec![0.0; 3]);
        let z2 = b.init_f32("z2", &[2, 3], vec![0.0; 6]);
        b.node(Op::Binary(BinaryOp::Add), &["x", "z"], &["a"]);
        b.node(Op::Binary(BinaryOp::Add), &["a", &z2], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }

    #[test]
    fn dropout_with_a_read_mask_stays() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3]);
        b.node(Op::Dropout, &["x"], &["y", "m"]);
        b.output("y", DType::F32);
        b.output("m", DType::Bool);
        let g = b.finish();
        let (_, n) = check_pass(&g, run);
        assert_eq!(n, 0);
    }
}
