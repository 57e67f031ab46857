//! Constant folding.
//!
//! - A node whose inputs are all constants (initializers the caller cannot
//!   override) is evaluated once with the reference kernels and becomes an
//!   initializer, unless an output would exceed both `max_folded_bytes` and
//!   the largest input (so a Transpose or Cast of a big weight still folds:
//!   it never creates a constant bigger than one the model already holds,
//!   and the runtime drops the original when nothing else reads it).
//! - `Shape`/`Size` of a value whose shape is fully known statically become
//!   constants (then the Gather/Concat/Slice/Unsqueeze/Cast chains over them fold
//!   by the first rule in the next round).
//! - A small integer value whose content inference computed to plain numbers
//!   (shape arithmetic over known dims) becomes a constant.
//!
//! Control flow, sequence/optional ops and nodes producing graph outputs or
//! values a subgraph reads are never folded.

use crate::util::{constant, static_shape, Index};
use crate::PassCtx;
use kiln_ir::{DType, Graph, Op, Tensor};
use std::sync::Arc;

pub fn run(g: &mut Graph, ctx: &PassCtx) -> usize {
    let Some(ix) = Index::new(g) else {
        return 0;
    };
    let mut folded = Vec::new();
    for &i in &ix.order {
        let n = &g.nodes[i];
        if !n.op.subgraphs().is_empty() || matches!(n.op, Op::Seq(_)) {
            continue;
        }
        if n.present_outputs().any(|o| ix.is_pinned(o)) || n.present_outputs().count() == 0 {
            continue;
        }
        let Some(outs) = fold_node(g, &ix, ctx, i) else {
            continue;
        };
        let names: Vec<String> = g.nodes[i].outputs.iter().flatten().cloned().collect();
        for (name, t) in names.into_iter().zip(outs) {
            g.initializers.insert(name, Arc::new(t));
        }
        folded.push(i);
    }
    let count = folded.len();
    crate::util::remove_nodes(g, &folded);
    count
}

/// The values of node `i`'s present outputs, when they can be known now.
fn fold_node(g: &Graph, ix: &Index, ctx: &PassCtx, i: usize) -> Option<Vec<Tensor>> {
    let n = &g.nodes[i];
    let largest_input = n
        .present_inputs()
        .filter_map(|name| constant(g, ix, name))
        .map(|t| t.byte_size())
        .max()
        .unwrap_or(0);
    let limit = ctx.max_folded_bytes.max(largest_input);
    let fits = |t: &Tensor| t.byte_size() <= limit;
    // Shape and Size only need the input's static shape.
    if let (Op::Shape { start, end }, Some(x)) = (&n.op, n.input(0)) {
        let dims = static_shape(g, x)?;
        let r = dims.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (s, e) = (clamp(*start), clamp(end.unwrap_or(r)));
        let v: Vec<i64> = dims[s..e.max(s)].iter().map(|&d| d as i64).collect();
        return single(n, Tensor::vector(v));
    }
    if let (Op::Size, Some(x)) = (&n.op, n.input(0)) {
        let dims = static_shape(g, x)?;
        return single(n, Tensor::scalar(dims.iter().product::<usize>() as i64));
    }
    let all_const = n.present_inputs().count() > 0
        && n.present_inputs()
            .all(|name| constant(g, ix, name).is_some());
    if all_const {
        // Refuse before computing when inference already says it is too big.
        for o in n.present_outputs() {
            if let (Some(shape), Some(dt)) = (static_shape(g, o), crate::util::dtype_of(g, o)) {
                let bytes = kiln_ir::checked_numel(&shape)?.checked_mul(dt.size().max(1))?;
                if bytes > limit {
                    return None;
                }
            }
        }
        let ins: Vec<Option<&Tensor>> = n
            .inputs
            .iter()
            .map(|o| o.as_ref().map(|name| &*g.initializers[name]))
            .collect();
        let outs = kiln_cpu::run_op(&n.op, &ins, n.outputs.len()).ok()?;
        if outs.len() != n.outputs.len() {
            return None;
        }
        let present: Vec<Tensor> = outs
            .into_iter()
            .zip(&n.outputs)
            .filter(|(_, o)| o.is_some())
            .map(|(t, _)| t)
            .collect();
        return present.iter().all(fits).then_some(present);
    }
    // A value inference computed to known numbers.
    let out = crate::util::single_output(n)?;
    if n.outputs.len() != 1 {
        return None;
    }
    let content = ctx.sym_values.get(out)?;
    let nums: Vec<i64> = content
        .iter()
        .map(|d| d.known().map(|v| v as i64))
        .collect::<Option<_>>()?;
    let shape = static_shape(g, out)?;
    if shape.len() > 1 || shape.iter().product::<usize>() != nums.len() {
        return None;
    }
    let t = match crate::util::dtype_of(g, out)? {
        DType::I64 => Tensor::from_vec(shape, nums).ok()?,
        DType::I32 => Tensor::from_vec(
            shape,
            nums.iter()
                .map(|&v| i32::try_from(v).ok())
                .collect::<Option<Vec<i32>>>()?,
        )
        .ok()?,
        _ => return None,
    };
    Some(vec![t])
}

fn single(n: &kiln_ir::Node, t: Tensor) -> Option<Vec<Tensor>> {
    (n.outputs.len() == 1 && n.outputs[0].is_some()).then(|| vec![t])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{BinaryOp, Dim, UnaryOp};

    #[test]
    fn folds_constant_subgraph_and_keeps_live_part() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3]);
        let w = b.init_rand("w", &[2, 3], -1.0, 1.0);
        let s = b.scalar("s", 2.0);
        b.node(Op::Binary(BinaryOp::Mul), &[&w, &s], &["w2"]);
        b.node(Op::Unary(UnaryOp::Exp), &["w2"], &["w3"]);
        b.node(Op::Binary(BinaryOp::Add), &["x", "w3"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 2);
        assert_eq!(after.nodes.len(), 1);
        assert!(after.initializers.contains_key("w3"));
    }

    #[test]
    fn folds_transpose_of_weight_past_limit_but_not_growth() {
        // A tied LM head reads Transpose(embedding): folding it never makes a
        // constant bigger than the embedding, so it folds past the limit; a
        // Tile of the same weight would double it, so it does not.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 64]);
        let w = b.init_rand("w", &[256, 64], -1.0, 1.0);
        let reps = b.init_i64("reps", vec![2, 1]);
        b.node(
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &[&w],
            &["wt"],
        );
        b.node(Op::MatMul, &["x", "wt"], &["y"]);
        b.node(Op::Tile, &[&w, &reps], &["w2"]);
        b.output("y", DType::F32);
        b.output("w2", DType::F32);
        let g = b.finish();
        let mut after = g.clone();
        let mut ctx = ctx_for(&g);
        ctx.max_folded_bytes = 1024; // far below the 64 KiB weight
        let n = run(&mut after, &ctx);
        assert_equivalent(&g, &after);
        assert_eq!(n, 1);
        assert!(after.initializers.contains_key("wt"));
        assert_eq!(count_op(&after, "Tile"), 1);
    }

    #[test]
    fn folds_shape_chain_of_static_input() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3, 4]);
        let idx = b.init("idx", Tensor::scalar(1i64));
        let ax = b.init_i64("ax", vec![0]);
        let minus1 = b.init_i64("m1", vec![-1]);
        b.node(
            Op::Shape {
                start: 0,
                end: None,
            },
            &["x"],
            &["sh"],
        );
        b.node(Op::Gather { axis: 0 }, &["sh", &idx], &["d1"]);
        b.node(Op::Unsqueeze, &["d1", &ax], &["d1v"]);
        b.node(Op::Concat { axis: 0 }, &[&minus1, "d1v"], &["newshape"]);
        b.node(Op::Reshape { allowzero: false }, &["x", "newshape"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        // Shape folds in the first run; the rest folds as constants in the same
        // walk (topological order sees the new initializer).
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 4, "{:#?}", after.nodes);
        assert_eq!(after.nodes.len(), 1);
        assert_eq!(
            after.initializers["newshape"].to_i64_vec().unwrap(),
            vec![-1, 3]
        );
    }

    #[test]
    fn folds_known_part_of_symbolic_shape_by_inferred_content() {
        let mut b = Builder::new();
        b.input_dims("x", DType::F32, vec![Dim::named("N"), Dim::Known(6)]);
        let idx = b.init("idx", Tensor::scalar(1i64));
        b.node(
            Op::Shape {
                start: 0,
                end: None,
            },
            &["x"],
            &["sh"],
        );
        b.node(Op::Gather { axis: 0 }, &["sh", &idx], &["d1"]);
        b.node(Op::Cast { to: DType::F32 }, &["d1"], &["d1f"]);
        b.node(Op::Binary(BinaryOp::Div), &["x", "d1f"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        // Shape(x) holds the symbol N and stays; Gather(.., 1) is 6; the Cast
        // folds as a constant in the same walk.
        assert!(n >= 2, "{n}");
        assert_eq!(count_op(&after, "Gather"), 0);
        assert_eq!(count_op(&after, "Cast"), 0);
    }

    #[test]
    fn leaves_overridable_inputs_unknown_shapes_and_oversized_results() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3]);
        b.input("w", DType::F32, &[3]);
        b.init_f32("w", &[3], vec![1.0, 2.0, 3.0]);
        b.input_dims("u", DType::F32, vec![Dim::Unknown]);
        let big = b.init_i64("big", vec![1024, 1024]);
        b.node(Op::Unary(UnaryOp::Exp), &["w"], &["we"]);
        b.node(Op::Binary(BinaryOp::Add), &["x", "we"], &["y"]);
        b.node(
            Op::Shape {
                start: 0,
                end: None,
            },
            &["u"],
            &["us"],
        );
        b.node(
            Op::ConstantOfShape {
                value: Tensor::from_vec(vec![1], vec![1.0f32]).unwrap(),
            },
            &[&big],
            &["ones"],
        );
        b.node(
            Op::Reduce {
                op: kiln_ir::ReduceOp::Sum,
                keepdims: false,
                noop_with_empty_axes: false,
            },
            &["ones"],
            &["total"],
        );
        b.output("y", DType::F32);
        b.output("us", DType::I64);
        b.output("total", DType::F32);
        let g = b.finish();
        let mut after = g.clone();
        let mut ctx = ctx_for(&g);
        ctx.max_folded_bytes = 1 << 20; // the 4 MiB ConstantOfShape must not fold
        let n = run(&mut after, &ctx);
        assert_eq!(n, 0);
        assert_eq!(after, g);
        assert_equivalent(&g, &after);
    }
}
