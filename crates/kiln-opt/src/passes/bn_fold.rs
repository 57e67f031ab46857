//! BatchNormalization folded into the preceding Conv, Gemm or MatMul.
//!
//! With `s = scale / sqrt(var + eps)` per channel: a Conv gets
//! `W' = W * s` (per output channel) and `B' = (B - mean) * s + beta`; a Gemm
//! gets its B scaled per output column and `C' = beta_gemm * C * s + shift`; a
//! MatMul `[M, K] x [K, N]` gets B scaled per column and the BatchNorm becomes
//! an Add of the shift (which fusion then takes into the MatMul's epilogue).
//!
//! Requires constant f32 weights and statistics, the producer's output read by
//! the BatchNorm alone and by nothing outside the graph, and (for Gemm/MatMul)
//! a 2-D output whose channel axis is its last. New weights get new names, so
//! weights shared with other nodes stay intact.
//!
//! A Conv followed by a Mul by a constant that is one value per output
//! channel (or one for all: paddle's learnable affine blocks, `conv * s + b`
//! with scalar `s` and `b`) is folded the same way, `W' = W * s`, `B' = B * s`;
//! fusion then takes the Add of `b` as the Conv's bias.
//!
//! The same blocks also put `h * s + b` (scalar or per-channel constants)
//! after activations, in front of the next Conv. Where that Conv has no
//! padding (so every tap reads a real input), the affine folds into it:
//! `W'[m, c, k] = W[m, c, k] * s[c]`, `B'[m] = B[m] + sum over c, k of
//! W[m, c, k] * b[c]`.

use crate::util::{
    add_constant, constant, dtype_of, f32_tensor, shape_of, single_reader_is, Index,
};
use crate::PassCtx;
use kiln_ir::{BinaryOp, DType, Graph, Op, Tensor};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    let mut count = 0;
    'outer: loop {
        let Some(ix) = Index::new(g) else {
            return count;
        };
        for &i in &ix.order {
            if fold_one(g, &ix, i) {
                count += 1;
                continue 'outer;
            }
        }
        return count;
    }
}

/// Per-channel scale `s` and shift `beta - mean * s` of BatchNorm node `bn`.
fn bn_affine(g: &Graph, ix: &Index, bn: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    let n = &g.nodes[bn];
    let Op::BatchNormalization { epsilon } = n.op else {
        return None;
    };
    let vals = |k: usize| -> Option<Vec<f64>> {
        let t = constant(g, ix, n.input(k)?)?;
        (t.dtype() == DType::F32 && t.rank() == 1).then(|| t.to_f64_vec().ok())?
    };
    let (scale, beta, mean, var) = (vals(1)?, vals(2)?, vals(3)?, vals(4)?);
    let m = scale.len();
    if [beta.len(), mean.len(), var.len()] != [m, m, m] {
        return None;
    }
    // Only Y may be in use (training-mode outputs never are in inference graphs).
    if n.outputs
        .iter()
        .skip(1)
        .flatten()
        .any(|o| ix.is_pinned(o) || !ix.readers(o).is_empty())
    {
        return None;
    }
    let s: Vec<f64> = (0..m)
        .map(|c| scale[c] / (var[c] + epsilon as f64).sqrt())
        .collect();
    let shift = (0..m).map(|c| beta[c] - mean[c] * s[c]).collect();
    Some((s, shift))
}

fn fold_one(g: &mut Graph, ix: &Index, bn: usize) -> bool {
    if matches!(g.nodes[bn].op, Op::Binary(BinaryOp::Mul)) {
        return fold_conv_scale(g, ix, bn);
    }
    if matches!(g.nodes[bn].op, Op::Conv(_)) {
        return fold_input_affine(g, ix, bn);
    }
    if !matches!(g.nodes[bn].op, Op::BatchNormalization { .. }) {
        return false;
    }
    let Some(x) = g.nodes[bn].input(0).map(str::to_string) else {
        return false;
    };
    let Some(bn_out) = g.nodes[bn].outputs.first().cloned().flatten() else {
        return false;
    };
    let Some(p) = ix.producer_of(&x) else {
        return false;
    };
    if !single_reader_is(ix, &x, bn) || dtype_of(g, &x) != Some(DType::F32) {
        return false;
    }
    let Some((s, shift)) = bn_affine(g, ix, bn) else {
        return false;
    };
    let m = s.len();
    let prod = g.nodes[p].clone();
    match &prod.op {
        Op::Conv(_) => {
            if !rescale_conv(g, ix, p, &s, Some(&shift), "bnfold") {
                return false;
            }
            g.nodes[p].outputs[0] = Some(bn_out);
            g.value_types.remove(&x);
            g.nodes.remove(bn);
            true
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let Some(bt) = prod.input(1).and_then(|b| constant(g, ix, b)) else {
                return false;
            };
            let cols_last = !trans_b;
            let Some(b2) = scale_columns(bt, &s, cols_last) else {
                return false;
            };
            // C' = beta * C * s + shift, as a [M] vector.
            let c: Vec<f64> = match prod.input(2) {
                None => vec![0.0; m],
                Some(cn) => match constant(g, ix, cn) {
                    Some(t)
                        if t.dtype() == DType::F32
                            && t.len() == m
                            && (t.shape() == [m] || t.shape() == [1, m]) =>
                    {
                        t.to_f64_vec().expect("f32")
                    }
                    Some(t) if t.dtype() == DType::F32 && t.len() == 1 && t.rank() <= 2 => {
                        vec![t.to_f64_vec().expect("f32")[0]; m]
                    }
                    _ => return false,
                },
            };
            let c2: Vec<f32> = (0..m)
                .map(|k| (*beta as f64 * c[k] * s[k] + shift[k]) as f32)
                .collect();
            let base = prod.input(1).unwrap_or("B").to_string();
            let bn_name = add_constant(g, &format!("{base}_bnfold"), b2);
            let cn = add_constant(
                g,
                &format!("{}_C_bnfold", prod.name),
                f32_tensor(vec![m], c2),
            );
            let gemm = &mut g.nodes[p];
            gemm.op = Op::Gemm {
                alpha: *alpha,
                beta: 1.0,
                trans_a: *trans_a,
                trans_b: *trans_b,
            };
            gemm.inputs.resize(3, None);
            gemm.inputs[1] = Some(bn_name);
            gemm.inputs[2] = Some(cn);
            gemm.outputs[0] = Some(bn_out);
            g.value_types.remove(&x);
            g.nodes.remove(bn);
            true
        }
        Op::MatMul => {
            // The BatchNorm channel axis (1) is the last only for 2-D outputs.
            if shape_of(g, &x).map(|s| s.len()) != Some(2) {
                return false;
            }
            let Some(bt) = prod.input(1).and_then(|b| constant(g, ix, b)) else {
                return false;
            };
            if bt.rank() != 2 {
                return false;
            }
            let Some(b2) = scale_columns(bt, &s, true) else {
                return false;
            };
            let base = prod.input(1).unwrap_or("B").to_string();
            let bn_name = add_constant(g, &format!("{base}_bnfold"), b2);
            let shift32: Vec<f32> = shift.iter().map(|&v| v as f32).collect();
            let sh = add_constant(
                g,
                &format!("{}_shift_bnfold", prod.name),
                f32_tensor(vec![m], shift32),
            );
            g.nodes[p].inputs[1] = Some(bn_name);
            let node = &mut g.nodes[bn];
            node.op = Op::Binary(BinaryOp::Add);
            node.inputs = vec![Some(x), Some(sh)];
            node.outputs.truncate(1);
            true
        }
        _ => false,
    }
}

/// A 2-D f32 weight with each output column `c` scaled by `s[c]`: columns are
/// the last axis when `cols_last`, else the first (a transposed weight).
fn scale_columns(t: &Tensor, s: &[f64], cols_last: bool) -> Option<Tensor> {
    if t.dtype() != DType::F32 || t.rank() != 2 {
        return None;
    }
    let (r, c) = (t.shape()[0], t.shape()[1]);
    if (cols_last && c != s.len()) || (!cols_last && r != s.len()) {
        return None;
    }
    let v = t.as_slice::<f32>()?;
    let out = v
        .iter()
        .enumerate()
        .map(|(k, &x)| {
            let ch = if cols_last { k % c } else { k / c };
            (x as f64 * s[ch]) as f32
        })
        .collect();
    Some(f32_tensor(vec![r, c], out))
}

/// `Mul(Conv(x), c)` (either order) with `c` a constant of one value per
/// output channel, or one value: the scale folded into the Conv's W and B.
fn fold_conv_scale(g: &mut Graph, ix: &Index, mul: usize) -> bool {
    let n = &g.nodes[mul];
    let (Some(a), Some(b), Some(out)) =
        (n.input(0), n.input(1), n.outputs.first().cloned().flatten())
    else {
        return false;
    };
    let conv_of = |v: &str| {
        ix.producer_of(v)
            .filter(|&p| matches!(g.nodes[p].op, Op::Conv(_)) && single_reader_is(ix, v, mul))
    };
    let (x, c, p) = match (conv_of(a), conv_of(b)) {
        (Some(p), _) => (a.to_string(), b, p),
        (None, Some(p)) => (b.to_string(), a, p),
        _ => return false,
    };
    if dtype_of(g, &x) != Some(DType::F32) || shape_of(g, &out) != shape_of(g, &x) {
        return false;
    }
    let Some(w) = g.nodes[p].input(1).and_then(|w| constant(g, ix, w)) else {
        return false;
    };
    if w.dtype() != DType::F32 || w.rank() < 3 {
        return false;
    }
    // One value per output channel (axis 1 of the output), or one for all.
    let (m, rank) = (w.shape()[0], w.rank());
    let Some(s) = constant(g, ix, c).and_then(|ct| channel_values(ct, rank, m)) else {
        return false;
    };
    if !rescale_conv(g, ix, p, &s, None, "scaled") {
        return false;
    }
    g.nodes[p].outputs[0] = Some(out);
    g.value_types.remove(&x);
    g.nodes.remove(mul);
    true
}

/// Conv node `p` with its W scaled per output channel, `W' = W * s`, and
/// its B made `B * s + shift` (no B and no shift: none), under new names
/// tagged `tag` (the old W and B may be shared). False, changing nothing,
/// unless W is a constant f32 with `s.len()` output channels and B, if any,
/// a constant f32 `[M]`.
fn rescale_conv(
    g: &mut Graph,
    ix: &Index,
    p: usize,
    s: &[f64],
    shift: Option<&[f64]>,
    tag: &str,
) -> bool {
    let prod = &g.nodes[p];
    let m = s.len();
    let Some(w) = prod.input(1).and_then(|w| constant(g, ix, w)) else {
        return false;
    };
    if w.dtype() != DType::F32 || w.rank() < 1 || w.shape()[0] != m {
        return false;
    }
    let bias: Option<Vec<f64>> = match prod.input(2) {
        None => None,
        Some(b) => match constant(g, ix, b) {
            Some(t) if t.dtype() == DType::F32 && t.shape() == [m] => t.to_f64_vec().ok(),
            _ => return false,
        },
    };
    let per = w.len() / m.max(1);
    let wv = w.as_slice::<f32>().expect("f32 checked");
    let w2: Vec<f32> = wv
        .iter()
        .enumerate()
        .map(|(k, &v)| (v as f64 * s[k / per.max(1)]) as f32)
        .collect();
    let b2: Option<Vec<f32>> = match (bias, shift) {
        (None, None) => None,
        (b, sh) => Some(
            (0..m)
                .map(|o| {
                    let scaled = b.as_ref().map_or(0.0, |b| b[o] * s[o]);
                    (scaled + sh.map_or(0.0, |sh| sh[o])) as f32
                })
                .collect(),
        ),
    };
    let w_shape = w.shape().to_vec();
    let (base, name) = (prod.input(1).unwrap_or("W").to_string(), prod.name.clone());
    let wn = add_constant(g, &format!("{base}_{tag}"), f32_tensor(w_shape, w2));
    let bn = b2.map(|b| add_constant(g, &format!("{name}_bias_{tag}"), f32_tensor(vec![m], b)));
    let conv = &mut g.nodes[p];
    conv.inputs.resize(conv.inputs.len().max(2), None);
    conv.inputs[1] = Some(wn);
    if let Some(bn) = bn {
        conv.inputs.resize(3, None);
        conv.inputs[2] = Some(bn);
    }
    true
}

/// Values of constant `c` that is one value per channel of axis 1 of a
/// rank-`rank` operand with `len` channels, or one for all.
fn channel_values(c: &Tensor, rank: usize, len: usize) -> Option<Vec<f64>> {
    if c.dtype() != DType::F32 || c.rank() > rank {
        return None;
    }
    let pad = rank - c.rank();
    let ok = c
        .shape()
        .iter()
        .enumerate()
        .all(|(k, &d)| d == 1 || (pad + k == 1 && d == len));
    let v = c.to_f64_vec().ok()?;
    if !ok || v.is_empty() {
        return None;
    }
    Some(
        (0..len)
            .map(|i| if v.len() == len { v[i] } else { v[0] })
            .collect(),
    )
}

/// `Conv(x * s + b)` (the Mul, the Add or both; either operand order) with
/// no padding and per-input-channel or scalar constants: the affine folded
/// into the Conv's W and B.
fn fold_input_affine(g: &mut Graph, ix: &Index, conv: usize) -> bool {
    let n = &g.nodes[conv];
    let Op::Conv(attrs) = &n.op else {
        return false;
    };
    let unpadded = attrs.pads.iter().all(|&p| p == 0)
        && matches!(
            attrs.auto_pad,
            kiln_ir::AutoPad::NotSet | kiln_ir::AutoPad::Valid
        );
    let Some(w) = n.input(1).and_then(|w| constant(g, ix, w)) else {
        return false;
    };
    if !unpadded || w.dtype() != DType::F32 || w.rank() < 3 || attrs.group != 1 {
        return false;
    }
    let (m, c) = (w.shape()[0], w.shape()[1]);
    let rank = w.rank();
    // Walk back from X through an Add, then a Mul, each read only here.
    let mut x = match n.input(0) {
        Some(x) => x.to_string(),
        None => return false,
    };
    let mut reader = conv;
    let (mut scale, mut shift): (Option<Vec<f64>>, Option<Vec<f64>>) = (None, None);
    let mut removed = Vec::new();
    for want in [BinaryOp::Add, BinaryOp::Mul] {
        let Some(p) = ix.producer_of(&x) else { break };
        let pn = &g.nodes[p];
        if want == BinaryOp::Add && !matches!(pn.op, Op::Binary(BinaryOp::Add)) {
            // No shift: perhaps a scale alone.
            continue;
        }
        if !matches!(pn.op, Op::Binary(b) if b == want)
            || !single_reader_is(ix, &x, reader)
            || dtype_of(g, &x) != Some(DType::F32)
        {
            break;
        }
        let (Some(a), Some(b)) = (pn.input(0), pn.input(1)) else {
            break;
        };
        let (v, k) = match (constant(g, ix, a), constant(g, ix, b)) {
            (None, Some(k)) => (a, k),
            (Some(k), None) => (b, k),
            _ => break,
        };
        let Some(vals) = channel_values(k, rank, c) else {
            break;
        };
        // The other operand must have the Conv input's shape already (the
        // constant only broadcasts into it).
        if shape_of(g, v).is_none() || shape_of(g, v) != shape_of(g, &x) {
            break;
        }
        match want {
            BinaryOp::Add => shift = Some(vals),
            _ => scale = Some(vals),
        }
        removed.push(p);
        x = v.to_string();
        reader = p;
    }
    if removed.is_empty() {
        return false;
    }
    let s = scale.unwrap_or_else(|| vec![1.0; c]);
    let b = shift.unwrap_or_else(|| vec![0.0; c]);
    // With both, the graph computed (x * s) + b: the shift is after the scale.
    let per = w.len() / (m * c).max(1);
    let wv = w.as_slice::<f32>().expect("f32 checked");
    let mut w2 = vec![0f32; wv.len()];
    let mut extra = vec![0f64; m];
    for (i, &v) in wv.iter().enumerate() {
        let (mo, ci) = (i / (c * per), (i / per) % c);
        w2[i] = (v as f64 * s[ci]) as f32;
        extra[mo] += v as f64 * b[ci];
    }
    let bias: Vec<f64> = match n.input(2) {
        None => vec![0.0; m],
        Some(bn) => match constant(g, ix, bn) {
            Some(t) if t.dtype() == DType::F32 && t.shape() == [m] => t.to_f64_vec().expect("f32"),
            _ => return false,
        },
    };
    let b2: Vec<f32> = (0..m).map(|o| (bias[o] + extra[o]) as f32).collect();
    let w_shape = w.shape().to_vec();
    let base = n.input(1).unwrap_or("W").to_string();
    let name = n.name.clone();
    let wn = add_constant(g, &format!("{base}_affine"), f32_tensor(w_shape, w2));
    let bn = add_constant(g, &format!("{name}_bias_affine"), f32_tensor(vec![m], b2));
    let node = &mut g.nodes[conv];
    node.inputs.resize(3, None);
    node.inputs[0] = Some(x);
    node.inputs[1] = Some(wn);
    node.inputs[2] = Some(bn);
    crate::util::remove_nodes(g, &removed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{AutoPad, ConvAttrs, UnaryOp};

    fn conv_attrs() -> ConvAttrs {
        ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![],
        }
    }

    fn bn_params(b: &mut Builder, m: usize) -> Vec<String> {
        vec![
            b.init_rand("bn_s", &[m], 0.5, 1.5),
            b.init_rand("bn_b", &[m], -0.5, 0.5),
            b.init_rand("bn_m", &[m], -0.5, 0.5),
            b.init_rand("bn_v", &[m], 0.2, 2.0),
        ]
    }

    fn conv_bn(with_bias: bool, extra_reader: bool) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        let cb = b.init_rand("cb", &[4], -1.0, 1.0);
        let p = bn_params(&mut b, 4);
        let ins: Vec<&str> = if with_bias {
            vec!["x", &w, &cb]
        } else {
            vec!["x", &w]
        };
        b.node(Op::Conv(conv_attrs()), &ins, &["c"]);
        b.node(
            Op::BatchNormalization { epsilon: 1e-5 },
            &["c", &p[0], &p[1], &p[2], &p[3]],
            &["y"],
        );
        if extra_reader {
            b.node(Op::Unary(UnaryOp::Relu), &["c"], &["r"]);
            b.output("r", DType::F32);
        }
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn folds_into_conv_with_and_without_bias() {
        for bias in [false, true] {
            let g = conv_bn(bias, false);
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1);
            assert_eq!(count_op(&after, "BatchNormalization"), 0);
            assert_eq!(after.nodes.len(), 1);
            assert_eq!(after.nodes[0].outputs[0].as_deref(), Some("y"));
            // The original weight is untouched (it might be shared).
            assert_eq!(after.initializers["w"], g.initializers["w"]);
        }
    }

    #[test]
    fn folds_a_per_channel_or_scalar_mul_into_conv() {
        // conv * s (s scalar [1], per channel [1,4,1,1] or [4,1,1], either
        // operand order), then + b: the Mul folds into W and B.
        let cases: &[(&[usize], bool, bool)] = &[
            (&[1], true, false),
            (&[1, 4, 1, 1], false, true),
            (&[4, 1, 1], true, true),
            (&[], false, false),
        ];
        for &(s_shape, bias, swap) in cases {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[2, 3, 5, 5]);
            let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
            let bb = b.init_rand("bb", &[4], -1.0, 1.0);
            let sv = b.init_rand("s", s_shape, 0.5, 2.0);
            let add = b.init_rand("a", &[1], -1.0, 1.0);
            let ins: Vec<&str> = if bias {
                vec!["x", &w, &bb]
            } else {
                vec!["x", &w]
            };
            b.node(Op::Conv(conv_attrs()), &ins, &["c"]);
            let (l, r) = if swap {
                (sv.as_str(), "c")
            } else {
                ("c", sv.as_str())
            };
            b.node(Op::Binary(BinaryOp::Mul), &[l, r], &["m"]);
            b.node(Op::Binary(BinaryOp::Add), &["m", &add], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1, "scale {s_shape:?}");
            assert_eq!(count_op(&after, "Mul"), 0);
            assert_eq!(after.initializers["w"], g.initializers["w"]);
        }
    }

    #[test]
    fn folds_an_affine_in_front_of_an_unpadded_conv() {
        // relu(x) * s + b, relu(x) * s, relu(x) + b (scalar or per input
        // channel, either operand order) in front of a 1x1 conv: folded.
        let cases: &[(bool, bool, &[usize])] = &[
            (true, true, &[1]),
            (true, false, &[1, 3, 1, 1]),
            (false, true, &[3, 1, 1]),
            (true, true, &[1, 3, 1, 1]),
        ];
        for (ci, &(mul, add, cshape)) in cases.iter().enumerate() {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[2, 3, 5, 5]);
            let w = b.init_rand("w", &[4, 3, 1, 1], -1.0, 1.0);
            let bb = b.init_rand("bb", &[4], -1.0, 1.0);
            let sv = b.init_rand("s", cshape, 0.5, 2.0);
            let av = b.init_rand("a", cshape, -1.0, 1.0);
            b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &["x"], &["h"]);
            let mut cur = "h".to_string();
            if mul {
                b.node(Op::Binary(BinaryOp::Mul), &[&sv, &cur], &["hs"]);
                cur = "hs".into();
            }
            if add {
                b.node(Op::Binary(BinaryOp::Add), &[&cur, &av], &["hb"]);
                cur = "hb".into();
            }
            let mut a = conv_attrs();
            a.pads = vec![0; 4];
            a.kernel_shape = vec![1, 1];
            b.node(Op::Conv(a), &[&cur, &w, &bb], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1, "case {ci}");
            assert_eq!(
                count_op(&after, "Mul") + count_op(&after, "Add"),
                0,
                "case {ci}"
            );
        }
    }

    #[test]
    fn leaves_an_affine_in_front_of_a_padded_conv() {
        // Padding reads zeros where x * s + b would not be zero.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
        let av = b.init_rand("a", &[1], 0.5, 1.0);
        b.node(Op::Binary(BinaryOp::Add), &["x", &av], &["xb"]);
        b.node(Op::Conv(conv_attrs()), &["xb", &w], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn leaves_a_mul_that_is_not_per_channel_or_not_the_convs_only_reader() {
        for case in 0..2 {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[1, 3, 5, 5]);
            let w = b.init_rand("w", &[4, 3, 3, 3], -1.0, 1.0);
            // Per position, not per channel.
            let sv = b.init_rand("s", &[1, 1, 5, 5], 0.5, 2.0);
            let one = b.init_rand("one", &[1], 0.5, 2.0);
            b.node(Op::Conv(conv_attrs()), &["x", &w], &["c"]);
            if case == 0 {
                b.node(Op::Binary(BinaryOp::Mul), &["c", &sv], &["y"]);
            } else {
                b.node(Op::Binary(BinaryOp::Mul), &["c", &one], &["y"]);
                b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &["c"], &["r"]);
                b.output("r", DType::F32);
            }
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!((n, &after), (0, &g), "case {case}");
        }
    }

    #[test]
    fn leaves_conv_whose_output_has_other_readers() {
        let g = conv_bn(true, true);
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }

    #[test]
    fn leaves_conv_with_non_constant_weight_or_overridable_stats() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 3, 5, 5]);
        b.input("w", DType::F32, &[4, 3, 3, 3]);
        let p = bn_params(&mut b, 4);
        b.node(Op::Conv(conv_attrs()), &["x", "w"], &["c"]);
        b.node(
            Op::BatchNormalization { epsilon: 1e-5 },
            &["c", &p[0], &p[1], &p[2], &p[3]],
            &["y"],
        );
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        let mut g2 = conv_bn(false, false);
        // Make the running mean an overridable input.
        g2.inputs.push(kiln_ir::ValueInfo {
            name: "bn_m".into(),
            ty: kiln_ir::ValueType::new(DType::F32, Some(kiln_ir::known_shape(&[4]))),
        });
        let (after, n) = check_pass(&g2, run);
        assert_eq!((n, &after), (0, &g2));
    }

    #[test]
    fn folds_into_gemm_and_matmul() {
        for (trans_b, c_shape) in [
            (false, None),
            (true, Some(vec![4])),
            (true, Some(vec![1, 4])),
            (false, Some(vec![1])),
        ] {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[3, 5]);
            let w = if trans_b {
                b.init_rand("w", &[4, 5], -1.0, 1.0)
            } else {
                b.init_rand("w", &[5, 4], -1.0, 1.0)
            };
            let mut ins = vec!["x".to_string(), w];
            if let Some(cs) = &c_shape {
                ins.push(b.init_rand("c", cs, -1.0, 1.0));
            }
            let p = bn_params(&mut b, 4);
            let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
            b.node(
                Op::Gemm {
                    alpha: 0.7,
                    beta: 1.3,
                    trans_a: false,
                    trans_b,
                },
                &ins,
                &["g"],
            );
            b.node(
                Op::BatchNormalization { epsilon: 1e-3 },
                &["g", &p[0], &p[1], &p[2], &p[3]],
                &["y"],
            );
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1, "trans_b {trans_b} C {c_shape:?}");
            assert_eq!(after.nodes.len(), 1);
        }

        let mut b = Builder::new();
        b.input("x", DType::F32, &[3, 5]);
        let w = b.init_rand("w", &[5, 4], -1.0, 1.0);
        let p = bn_params(&mut b, 4);
        b.node(Op::MatMul, &["x", &w], &["g"]);
        b.node(
            Op::BatchNormalization { epsilon: 1e-3 },
            &["g", &p[0], &p[1], &p[2], &p[3]],
            &["y"],
        );
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 1);
        assert_eq!(count_op(&after, "Add"), 1);
        assert_eq!(count_op(&after, "BatchNormalization"), 0);
    }

    #[test]
    fn leaves_matmul_whose_channel_axis_is_not_last() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 4, 5]);
        let w = b.init_rand("w", &[5, 4], -1.0, 1.0);
        let p = bn_params(&mut b, 4);
        b.node(Op::MatMul, &["x", &w], &["g"]);
        b.node(
            Op::BatchNormalization { epsilon: 1e-3 },
            &["g", &p[0], &p[1], &p[2], &p[3]],
            &["y"],
        );
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }
}
