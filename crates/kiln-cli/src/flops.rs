//! FLOP and byte counts per node, from concrete shapes: the ones a graph's
//! inference gives at bound symbolic dims (`kiln inspect`, `kiln bench`), or
//! the ones a profiled run saw (`kiln bench --profile`).
//!
//! Counting rules: a multiply-add is 2 FLOPs (Conv, ConvTranspose, Gemm,
//! MatMul, LSTM and their fused forms); a bias (Conv's B, Gemm's C, a fused
//! op's bias), a fused residual and a fused activation each add one FLOP per
//! output element, as the separate Add or Relu node they replace counts, so
//! optimized and unoptimized graphs of one model count the same;
//! pooling and reductions count one per input element they read; ops that only
//! move or reshape data (Reshape, Transpose, Gather, Concat, Cast, ...) count
//! 0; every other op counts one FLOP per output element.
//!
//! Counts are the model's, not the kernel's: a 3x3 conv that kiln runs by
//! Winograd (4x fewer multiply-adds) counts the direct algorithm's FLOPs, so
//! its reported rate is the direct-equivalent one and can pass the peak.

use kiln_ir::{AttnLayout, Dim, FusedAct, FusedOp, Graph, Op};
use std::collections::HashMap;

/// A shape, when known.
pub type Shape = Option<Vec<usize>>;

fn numel(s: &[usize]) -> u128 {
    s.iter().map(|&d| d as u128).product()
}

/// FLOPs of one node from the shapes of its inputs and outputs (`None` where
/// one the count needs is unknown, or the op has subgraphs).
pub fn node_flops(op: &Op, inputs: &[Shape], outputs: &[Shape]) -> Option<u128> {
    let input = |i: usize| inputs.get(i).and_then(|s| s.as_deref());
    let present = |i: usize| input(i).is_some();
    let out = outputs.first().and_then(|s| s.as_deref());
    let out_numel = || out.map(numel);
    // Output elements times multiply-adds per element of a Conv.
    let conv = || {
        let w = input(1)?;
        Some(2 * out_numel()? * w.iter().skip(1).map(|&d| d as u128).product::<u128>())
    };
    // MatMul: K is A's last dim (its only dim when A is 1-D).
    let matmul = || Some(2 * out_numel()? * *input(0)?.last()? as u128);
    // One FLOP per output element for a bias (input 2) when there is one.
    let bias = || Some(if present(2) { out_numel()? } else { 0 });
    match op {
        Op::Conv(_) => Some(conv()? + bias()?),
        Op::ConvTranspose(_) => {
            // Each input element scatters into (M/group) * kernel outputs.
            let (x, w) = (input(0)?, input(1)?);
            Some(2 * numel(x) * w.iter().skip(1).map(|&d| d as u128).product::<u128>() + bias()?)
        }
        Op::MatMul => matmul(),
        Op::Gemm { trans_a, .. } => {
            let a = input(0)?;
            let k = if *trans_a { a.first() } else { a.last() };
            Some(2 * out_numel()? * *k? as u128 + bias()?)
        }
        Op::Fused(f) => {
            let base = match f {
                FusedOp::Conv { .. } | FusedOp::ConvNhwc { .. } => conv()?,
                FusedOp::MatMul { .. } => matmul()?,
                // Both convs, each with its bias and activation, as the two
                // nodes it replaces count.
                FusedOp::PointwiseDepthwise { pw_act, .. } => {
                    let (x, w1, wd) = (input(0)?, input(1)?, input(3)?);
                    let per_mul =
                        |w: &[usize]| w.iter().skip(1).map(|&d| d as u128).product::<u128>();
                    let mid = numel(x) / (*x.get(1)? as u128).max(1) * *w1.first()? as u128;
                    let out = out_numel()?;
                    let pw_epilogue = present(2) as u128 + (*pw_act != FusedAct::Identity) as u128;
                    let dw_epilogue = present(4) as u128 + (f.act() != FusedAct::Identity) as u128;
                    return Some(
                        2 * mid * per_mul(w1)
                            + mid * pw_epilogue
                            + 2 * out * per_mul(wd)
                            + out * dw_epilogue,
                    );
                }
                FusedOp::Attention { layout, .. } => {
                    // Q·Kt ([..., S, D] x [..., D, T]) and P·V ([..., S, T] x [..., T, E]),
                    // Q and V seen through their absorbed Transposes.
                    let q = AttnLayout::permuted(input(0)?, layout.inputs[0].as_deref())?;
                    let v = AttnLayout::permuted(input(2)?, layout.inputs[2].as_deref())?;
                    let (q, v) = (&q[..], &v[..]);
                    let (d, t) = (*q.last()? as u128, *v.get(v.len().checked_sub(2)?)? as u128);
                    let rows = numel(q) / d.max(1);
                    let out = out_numel()?;
                    return Some(2 * rows * d * t + 2 * out * t + 3 * rows * t);
                }
            };
            let epilogue =
                present(2) as u128 + present(3) as u128 + (f.act() != FusedAct::Identity) as u128;
            Some(base + epilogue * out_numel()?)
        }
        Op::Lstm(a) => {
            let x = input(0)?;
            let (s, b, i) = (
                *x.first()? as u128,
                x.get(1).copied().unwrap_or(1) as u128,
                x.get(2).copied().unwrap_or(1) as u128,
            );
            let h = a.hidden_size as u128;
            let dirs = if a.direction == kiln_ir::RnnDirection::Bidirectional {
                2
            } else {
                1
            };
            Some(2 * s * b * dirs * 4 * h * (i + h))
        }
        Op::MaxPool(p) | Op::AveragePool(p) => {
            Some(out_numel()? * p.kernel_shape.iter().map(|&k| k as u128).product::<u128>())
        }
        Op::GlobalAveragePool | Op::GlobalMaxPool | Op::Reduce { .. } => input(0).map(numel),
        Op::ArgMax { .. } | Op::ArgMin { .. } => input(0).map(numel),
        Op::If { .. } | Op::Loop { .. } => None,
        Op::Reshape { .. }
        | Op::Flatten { .. }
        | Op::Transpose { .. }
        | Op::Squeeze
        | Op::Unsqueeze
        | Op::Concat { .. }
        | Op::Split { .. }
        | Op::Slice
        | Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::Expand
        | Op::Pad { .. }
        | Op::Shape { .. }
        | Op::Size
        | Op::ConstantOfShape { .. }
        | Op::Range
        | Op::Tile
        | Op::Identity
        | Op::Dropout
        | Op::Cast { .. }
        | Op::CastLike => Some(0),
        _ => out_numel(),
    }
}

/// A graph's FLOP total, and how many nodes could not be counted.
pub struct Flops {
    pub total: u128,
    pub unknown_nodes: usize,
}

/// The FLOPs of `g`'s top-level nodes at the shapes its inference gives with
/// the symbolic dims in `bindings` (a named dim not bound counts as 1).
pub fn estimate_graph(g: &Graph, bindings: &HashMap<String, usize>) -> Flops {
    let shape = |name: Option<&str>| -> Shape {
        let ty = g.value_type(name?)?;
        ty.shape?
            .iter()
            .map(|d| {
                d.eval(bindings)
                    .or(Some(1).filter(|_| matches!(d, Dim::Named(_))))
            })
            .collect()
    };
    let mut total: u128 = 0;
    let mut unknown = 0;
    for n in &g.nodes {
        let ins: Vec<Shape> = n.inputs.iter().map(|i| shape(i.as_deref())).collect();
        let outs: Vec<Shape> = n.outputs.iter().map(|o| shape(o.as_deref())).collect();
        match node_flops(&n.op, &ins, &outs) {
            Some(f) => total += f,
            None => unknown += 1,
        }
    }
    Flops {
        total,
        unknown_nodes: unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{AutoPad, ConvAttrs};

    fn s(v: &[usize]) -> Shape {
        Some(v.to_vec())
    }

    fn conv_attrs(group: usize) -> ConvAttrs {
        ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![1, 1],
            group,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![1, 1],
        }
    }

    #[test]
    fn conv_counts_two_flops_per_multiply_add() {
        // 1x8x4x4 output, weights 8x3x3x3: each output element is 27 MACs.
        let f = node_flops(
            &Op::Conv(conv_attrs(1)),
            &[s(&[1, 3, 4, 4]), s(&[8, 3, 3, 3])],
            &[s(&[1, 8, 4, 4])],
        );
        assert_eq!(f, Some(2 * 128 * 27));
    }

    #[test]
    fn depthwise_conv_counts_only_its_group() {
        // group = C: weights [C, 1, 3, 3], 9 MACs per output element.
        let f = node_flops(
            &Op::Conv(conv_attrs(16)),
            &[s(&[1, 16, 8, 8]), s(&[16, 1, 3, 3])],
            &[s(&[1, 16, 8, 8])],
        );
        assert_eq!(f, Some(2 * 1024 * 9));
    }

    #[test]
    fn matmul_and_gemm_use_the_inner_dim() {
        let mm = node_flops(&Op::MatMul, &[s(&[2, 5, 7]), s(&[7, 3])], &[s(&[2, 5, 3])]);
        assert_eq!(mm, Some(2 * 30 * 7));
        let gemm_t = node_flops(
            &Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: true,
                trans_b: false,
            },
            &[s(&[7, 5]), s(&[7, 3])],
            &[s(&[5, 3])],
        );
        assert_eq!(gemm_t, Some(2 * 15 * 7));
        // A 1-D A: K is its only dim.
        assert_eq!(
            node_flops(&Op::MatMul, &[s(&[7]), s(&[7, 3])], &[s(&[3])]),
            Some(2 * 3 * 7)
        );
    }

    #[test]
    fn fused_ops_count_like_their_unfused_nodes() {
        let a = s(&[4, 8]);
        let b = s(&[8, 16]);
        let out = s(&[4, 16]);
        let unfused = node_flops(&Op::MatMul, &[a.clone(), b.clone()], &[out.clone()]).unwrap()
            + 64 // bias Add
            + 64 // residual Add
            + 64; // Relu
        let fused = node_flops(
            &Op::Fused(FusedOp::MatMul {
                act: FusedAct::Relu,
            }),
            &[a.clone(), b.clone(), s(&[16]), out.clone()],
            &[out.clone()],
        );
        assert_eq!(fused, Some(unfused));
        // No bias, no residual, no activation: just the MatMul.
        let bare = node_flops(
            &Op::Fused(FusedOp::MatMul {
                act: FusedAct::Identity,
            }),
            &[a.clone(), b.clone(), None, None],
            &[out.clone()],
        );
        assert_eq!(bare, Some(2 * 64 * 8));
        let conv = node_flops(
            &Op::Fused(FusedOp::Conv {
                conv: conv_attrs(1),
                act: FusedAct::Clip { min: 0.0, max: 6.0 },
            }),
            &[s(&[1, 3, 4, 4]), s(&[8, 3, 3, 3]), s(&[8])],
            &[s(&[1, 8, 4, 4])],
        );
        assert_eq!(conv, Some(2 * 128 * 27 + 128 + 128));
        // The same Conv unfused (bias inside the Conv), then its Clip.
        let conv_b = node_flops(
            &Op::Conv(conv_attrs(1)),
            &[s(&[1, 3, 4, 4]), s(&[8, 3, 3, 3]), s(&[8])],
            &[s(&[1, 8, 4, 4])],
        );
        let clip = node_flops(&Op::Clip, &[s(&[1, 8, 4, 4])], &[s(&[1, 8, 4, 4])]);
        assert_eq!(conv, Some(conv_b.unwrap() + clip.unwrap()));
    }

    #[test]
    fn unknown_shapes_and_subgraph_ops_are_not_counted() {
        assert_eq!(
            node_flops(&Op::MatMul, &[None, s(&[7, 3])], &[s(&[5, 3])]),
            None
        );
        assert_eq!(
            node_flops(&Op::Binary(kiln_ir::BinaryOp::Add), &[s(&[2])], &[None]),
            None
        );
    }

    #[test]
    fn data_movement_is_free_and_elementwise_is_one_per_element() {
        assert_eq!(
            node_flops(&Op::Transpose { perm: None }, &[s(&[3, 4])], &[s(&[4, 3])]),
            Some(0)
        );
        assert_eq!(
            node_flops(&Op::Where, &[s(&[5]), s(&[5]), s(&[5])], &[s(&[5])]),
            Some(5)
        );
        // Empty tensors cost nothing.
        assert_eq!(node_flops(&Op::Where, &[], &[s(&[0, 5])]), Some(0));
        // A global pool reads every input element once.
        assert_eq!(
            node_flops(
                &Op::GlobalAveragePool,
                &[s(&[1, 8, 7, 7])],
                &[s(&[1, 8, 1, 1])]
            ),
            Some(8 * 49)
        );
    }
}
