//! Kernels of kiln's fused ops (`FusedOp`): a Conv or MatMul whose bias add,
//! residual add and activation run in one pass.
//!
//! `run_reference` composes the plain kernels and applies `FusedAct::eval`
//! element by element; it is the definition the fast path is tested against.
//!
//! The fast path (all inputs f32) runs the Conv / MatMul on `kiln_gemm::sgemm`
//! (or the direct depthwise kernel) with bias, residual and activation applied
//! in one pass over each finished piece of the output while it is in cache.

use crate::{invalid, nn, unsupported, Result};
use kiln_gemm::PackedB;
use kiln_ir::{AttnLayout, AttnMask, AttnScale, BinaryOp, DType, FusedAct, FusedOp, Tensor};

/// Runs a fused op. Inputs: X/A, W/B, bias?, residual?.
pub fn run(op: &FusedOp, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    if let FusedOp::Attention {
        scale,
        mask,
        layout,
    } = op
    {
        let (q, kt, v) = attention_qkv(inputs)?;
        let m = opt_input(inputs, 3);
        if let Some(y) = nn::attention_f32(q, kt, v, m, *scale, *mask, layout)? {
            return Ok(y);
        }
        return run_reference(op, inputs);
    }
    if fast_path_applies(op, inputs) {
        return run_fast(op, inputs, Packed::None);
    }
    run_reference(op, inputs)
}

fn opt_input<'t>(inputs: &[Option<&'t Tensor>], i: usize) -> Option<&'t Tensor> {
    inputs.get(i).copied().flatten()
}

fn attention_qkv<'t>(
    inputs: &[Option<&'t Tensor>],
) -> Result<(&'t Tensor, &'t Tensor, &'t Tensor)> {
    let get = |i: usize, what: &str| {
        opt_input(inputs, i).ok_or_else(|| invalid!("FusedAttention: missing input {i} ({what})"))
    };
    Ok((get(0, "Q")?, get(1, "Kt")?, get(2, "V")?))
}

/// Attention as the unfused ops compute it: the absorbed input Transposes,
/// MatMul, the scale (Mul or Div by a scalar), the mask (Add, or Where
/// against the fill), Softmax along the last axis, MatMul, the absorbed
/// output Transpose.
fn attention_reference(
    scale: AttnScale,
    mask: AttnMask,
    layout: &AttnLayout,
    inputs: &[Option<&Tensor>],
) -> Result<Tensor> {
    use crate::elementwise::{binary, where_};
    let transposed = |x: &Tensor, perm: &Option<Vec<usize>>| -> Result<Tensor> {
        match perm {
            None => Ok(x.clone()),
            Some(p) => {
                let p: Vec<i64> = p.iter().map(|&a| a as i64).collect();
                crate::shape_ops::transpose(x, Some(&p))
            }
        }
    };
    let (q, kt, v) = attention_qkv(inputs)?;
    let [pq, pk, pv] = &layout.inputs;
    let (q, kt, v) = (
        &transposed(q, pq)?,
        &transposed(kt, pk)?,
        &transposed(v, pv)?,
    );
    let scalar = |x: f32| -> Result<Tensor> {
        let t = crate::util::tensor(vec![], kiln_ir::TensorData::F32(vec![x]))?;
        crate::elementwise::cast(&t, q.dtype())
    };
    let mut s = nn::matmul(q, kt)?;
    s = match scale {
        AttnScale::None => s,
        AttnScale::Mul(c) => binary(BinaryOp::Mul, &s, &scalar(c)?)?,
        AttnScale::Div(c) => binary(BinaryOp::Div, &s, &scalar(c)?)?,
    };
    let m = || {
        opt_input(inputs, 3).ok_or_else(|| invalid!("FusedAttention: the mask input is missing"))
    };
    s = match mask {
        AttnMask::None => s,
        AttnMask::Add => binary(BinaryOp::Add, &s, m()?)?,
        AttnMask::Where {
            fill,
            keep_if_true: true,
        } => where_(m()?, &s, &scalar(fill)?)?,
        AttnMask::Where {
            fill,
            keep_if_true: false,
        } => where_(m()?, &scalar(fill)?, &s)?,
    };
    let p = nn::softmax(&s, -1, false, false)?;
    transposed(&nn::matmul(&p, v)?, &layout.out)
}

/// True when every present input is f32 (and, for MatMul, B is not 1-D: the
/// bias then runs along A's rows, a corner the reference handles).
fn fast_path_applies(op: &FusedOp, inputs: &[Option<&Tensor>]) -> bool {
    let all_f32 = inputs.iter().flatten().all(|t| t.dtype() == DType::F32);
    let b_ok = match op {
        FusedOp::Conv { .. } | FusedOp::ConvNhwc { .. } | FusedOp::PointwiseDepthwise { .. } => {
            true
        }
        // Takes its own route in `run`.
        FusedOp::Attention { .. } => false,
        FusedOp::MatMul { .. } => inputs
            .get(1)
            .copied()
            .flatten()
            .is_some_and(|b| b.rank() >= 2),
    };
    all_f32 && b_ok
}

/// Weights a prepared op packed ahead of time (see `prepared.rs`).
#[derive(Clone, Copy)]
pub(crate) enum Packed<'a> {
    /// Use the W/B input as given.
    None,
    /// Conv W packed per group, and the W shape it was packed from.
    Conv(&'a nn::ConvPack, &'a [usize]),
    /// MatMul's 2-D B packed.
    MatMul(&'a PackedB),
    /// A channels-last depthwise conv's W as the AVX-512 kernel reads it
    /// (`depthwise_tiled::lane_weights`); W is still given, for the other
    /// kernels.
    DepthwiseLanes(&'a [f32]),
}

/// The fast fused kernel; every present input must be f32. With `packed`, the
/// W/B input is not read (its shape was checked by the caller).
pub(crate) fn run_fast(
    op: &FusedOp,
    inputs: &[Option<&Tensor>],
    packed: Packed<'_>,
) -> Result<Tensor> {
    let get = |i: usize, what: &str| {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| invalid!("missing required input {i} ({what})"))
    };
    let opt = |i: usize| inputs.get(i).copied().flatten();
    match op {
        // Nothing is packed for attention; it has its own route.
        FusedOp::Attention { .. } => run(op, inputs),
        FusedOp::Conv { conv, act } => {
            let x = get(0, "X")?;
            match packed {
                Packed::Conv(p, w_shape) => nn::conv_f32(
                    conv,
                    x,
                    w_shape,
                    nn::ConvWeights::Packed(p),
                    opt(2),
                    opt(3),
                    *act,
                ),
                _ => {
                    let w = get(1, "W")?;
                    nn::conv_f32(
                        conv,
                        x,
                        w.shape(),
                        nn::ConvWeights::Raw(w),
                        opt(2),
                        opt(3),
                        *act,
                    )
                }
            }
        }
        FusedOp::ConvNhwc { conv, act } => {
            let y = match packed {
                Packed::Conv(nn::ConvPack::Gathered(w), w_shape) => {
                    nn::conv_nhwc_gathered(conv, get(0, "X")?, w_shape, w, opt(2), opt(3), *act)?
                }
                _ => {
                    let lanes = match packed {
                        Packed::DepthwiseLanes(l) => Some(l),
                        _ => None,
                    };
                    let (x, w) = (get(0, "X")?, get(1, "W")?);
                    nn::depthwise_conv_nhwc(conv, x, w, opt(2), opt(3), *act, lanes)?
                }
            };
            match y {
                Some(y) => Ok(y),
                None => nhwc_through_nchw(conv, *act, inputs, run),
            }
        }
        FusedOp::PointwiseDepthwise { pw_act, dw, act } => {
            #[cfg(target_arch = "x86_64")]
            if let Some(y) = nn::pointwise_depthwise_f32(
                *pw_act,
                dw,
                *act,
                get(0, "X")?,
                get(1, "W1")?,
                opt(2),
                get(3, "Wd")?,
                opt(4),
            )? {
                return Ok(y);
            }
            pointwise_depthwise_apart(*pw_act, dw, *act, inputs, run)
        }
        FusedOp::MatMul { act } => {
            let a = get(0, "A")?;
            let (b_shape, b) = match packed {
                Packed::MatMul(p) => (vec![p.rows(), p.cols()], nn::MatmulB::Packed(p)),
                _ => {
                    let b = get(1, "B")?;
                    (
                        b.shape().to_vec(),
                        nn::MatmulB::Mat(nn::f32_slice(b, "FusedMatMul B")?),
                    )
                }
            };
            if b_shape.len() < 2 {
                return Err(invalid!(
                    "FusedMatMul fast path needs B of rank >= 2, got {b_shape:?}"
                ));
            }
            let s = nn::matmul_shape(a.shape(), &b_shape)?;
            let n = s.n;
            let bias = crate::util::f32_of_shape(opt(2), &[n], "FusedMatMul: bias")?;
            let res = crate::util::f32_of_shape(opt(3), &s.out_shape, "FusedMatMul: residual")?;
            // Bias, residual and a Relu/Clip run in the GEMM's registers;
            // any other activation after them, per finished row strip.
            let act = *act;
            let clamp = nn::clamp_of(act);
            let finish = kiln_gemm::Finish {
                row_bias: None,
                col_bias: bias,
                residual: res.map(|data| kiln_gemm::Residual { data, ld: n }),
                clamp,
                stream: false,
            };
            let epi = |_row: usize, _col0: usize, vals: &mut [f32]| {
                crate::fastmath::fused_act(act, vals);
            };
            let act_left = clamp.is_none() && act != FusedAct::Identity;
            let y = nn::matmul_f32_fused(
                &s,
                nn::f32_slice(a, "FusedMatMul A")?,
                b,
                &finish,
                if act_left { Some(&epi) } else { None },
            )?;
            crate::util::tensor(s.out_shape, kiln_ir::TensorData::F32(y))
        }
    }
}

/// `FusedOp::ConvNhwc` as `conv` (a `FusedOp::Conv` run by `run_conv`) on X
/// and the residual with their channels moved to axis 1, and the result's
/// moved last: the reference, and the route of convs the channels-last
/// kernel does not take.
fn nhwc_through_nchw(
    conv: &kiln_ir::ConvAttrs,
    act: FusedAct,
    inputs: &[Option<&Tensor>],
    run_conv: fn(&FusedOp, &[Option<&Tensor>]) -> Result<Tensor>,
) -> Result<Tensor> {
    let x = opt_input(inputs, 0)
        .ok_or_else(|| invalid!("FusedConvNhwc: missing required input 0 (X)"))?;
    let r = x.rank();
    if r < 3 {
        return Err(invalid!(
            "FusedConvNhwc: X must have rank 3 or more, got {:?}",
            x.shape()
        ));
    }
    // [N, spatial..., C] -> [N, C, spatial...] and back.
    let to_first: Vec<i64> = [0, r - 1]
        .into_iter()
        .chain(1..r - 1)
        .map(|a| a as i64)
        .collect();
    let to_last: Vec<i64> = [0]
        .into_iter()
        .chain(2..r)
        .chain([1])
        .map(|a| a as i64)
        .collect();
    let xc = crate::shape_ops::transpose(x, Some(&to_first))?;
    let res = match opt_input(inputs, 3) {
        Some(t) if t.rank() == r => Some(crate::shape_ops::transpose(t, Some(&to_first))?),
        Some(t) => {
            return Err(invalid!(
                "FusedConvNhwc: residual must have X's rank {r}, got {:?}",
                t.shape()
            ))
        }
        None => None,
    };
    let mut ins: Vec<Option<&Tensor>> = inputs.to_vec();
    ins[0] = Some(&xc);
    if let Some(t) = &res {
        ins[3] = Some(t);
    }
    let op = FusedOp::Conv {
        conv: conv.clone(),
        act,
    };
    crate::shape_ops::transpose(&run_conv(&op, &ins)?, Some(&to_last))
}

/// Whether `run` may take `FusedOp::PointwiseDepthwise` as one kernel on
/// this CPU, rather than as its two convs: X `[n, c, h, w]` (`n` `None`
/// when the batch is not known yet: then whether some batch would), `m`
/// expanded channels, the depthwise conv `dw` with weights of `wd_shape`.
/// The optimizer (`kiln-opt`'s `pw_dw` pass) fuses only such pairs, so the
/// others keep their prepared, tuned convs. At run time the one kernel
/// takes only the batches where it pays.
pub fn pointwise_depthwise_one_kernel(
    n: Option<usize>,
    chw: [usize; 3],
    m: usize,
    dw: &kiln_ir::ConvAttrs,
    wd_shape: &[usize],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return nn::pointwise_depthwise_one_kernel(n, chw, m, dw, wd_shape);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, chw, m, dw, wd_shape);
        false
    }
}

/// A pointwise conv's attributes over `spatial` axes: 1x1, stride 1, no
/// padding, one group.
pub(crate) fn pointwise_attrs(spatial: usize) -> kiln_ir::ConvAttrs {
    kiln_ir::ConvAttrs {
        auto_pad: kiln_ir::AutoPad::NotSet,
        dilations: vec![1; spatial],
        group: 1,
        kernel_shape: vec![1; spatial],
        pads: vec![0; 2 * spatial],
        strides: vec![1; spatial],
    }
}

/// `FusedOp::PointwiseDepthwise` as its two convs, each a `FusedOp::Conv`
/// run by `run_conv`: the reference, and the route where the one kernel
/// does not apply or pay. The expansion goes back to the buffer pool.
fn pointwise_depthwise_apart(
    pw_act: FusedAct,
    dw: &kiln_ir::ConvAttrs,
    act: FusedAct,
    inputs: &[Option<&Tensor>],
    run_conv: fn(&FusedOp, &[Option<&Tensor>]) -> Result<Tensor>,
) -> Result<Tensor> {
    let get = |i: usize, what: &str| {
        opt_input(inputs, i)
            .ok_or_else(|| invalid!("FusedPointwiseDepthwise: missing required input {i} ({what})"))
    };
    let x = get(0, "X")?;
    let spatial = x.rank().checked_sub(2).filter(|&s| s > 0).ok_or_else(|| {
        invalid!(
            "FusedPointwiseDepthwise: X must have rank 3 or more, got {:?}",
            x.shape()
        )
    })?;
    let pointwise = FusedOp::Conv {
        conv: pointwise_attrs(spatial),
        act: pw_act,
    };
    let mid = run_conv(
        &pointwise,
        &[Some(x), Some(get(1, "W1")?), opt_input(inputs, 2)],
    )?;
    let depthwise = FusedOp::Conv {
        conv: dw.clone(),
        act,
    };
    let y = run_conv(
        &depthwise,
        &[Some(&mid), Some(get(3, "Wd")?), opt_input(inputs, 4)],
    );
    crate::buffers::recycle_tensor(mid);
    y
}

/// The reference: the plain op, then bias, residual and activation in order.
pub fn run_reference(op: &FusedOp, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let get = |i: usize, what: &str| {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| invalid!("missing required input {i} ({what})"))
    };
    let opt = |i: usize| inputs.get(i).copied().flatten();
    let (mut y, bias_axis) = match op {
        FusedOp::Conv { conv, .. } => (nn::conv(conv, get(0, "X")?, get(1, "W")?, opt(2))?, None),
        FusedOp::ConvNhwc { conv, act } => {
            return nhwc_through_nchw(conv, *act, inputs, run_reference)
        }
        FusedOp::PointwiseDepthwise { pw_act, dw, act } => {
            return pointwise_depthwise_apart(*pw_act, dw, *act, inputs, run_reference)
        }
        FusedOp::MatMul { .. } => {
            let y = nn::matmul(get(0, "A")?, get(1, "B")?)?;
            let last = y.rank().checked_sub(1);
            (y, last)
        }
        // No bias, residual or activation follows attention.
        FusedOp::Attention {
            scale,
            mask,
            layout,
        } => return attention_reference(*scale, *mask, layout, inputs),
    };
    if y.dtype() != DType::F32 {
        return Err(unsupported!("{} on {} tensors", op.name(), y.dtype()));
    }
    let shape = y.shape().to_vec();
    let out = y
        .as_slice_mut::<f32>()
        .ok_or_else(|| invalid!("{}: output is not f32", op.name()))?;
    let name = op.name();
    if let Some(axis) = bias_axis {
        let n = shape[axis];
        if let Some(b) = crate::util::f32_of_shape(opt(2), &[n], &format!("{name}: bias"))? {
            for row in out.chunks_exact_mut(n.max(1)) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
    }
    if let Some(r) = crate::util::f32_of_shape(opt(3), &shape, &format!("{name}: residual"))? {
        for (v, &rv) in out.iter_mut().zip(r) {
            *v += rv;
        }
    }
    let act = op.act();
    if act != FusedAct::Identity {
        for v in out.iter_mut() {
            *v = act.eval(*v);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{AutoPad, ConvAttrs};

    /// A deterministic pseudo-random vector in [-2, 2).
    fn rvec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn t(shape: &[usize], seed: u64) -> Tensor {
        Tensor::from_vec(shape.to_vec(), rvec(shape.iter().product(), seed)).unwrap()
    }

    fn all_acts() -> Vec<FusedAct> {
        vec![
            FusedAct::Identity,
            FusedAct::Relu,
            FusedAct::Clip { min: 0.0, max: 6.0 },
            FusedAct::Sigmoid,
            FusedAct::Tanh,
            FusedAct::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            FusedAct::HardSwish,
            FusedAct::LeakyRelu { alpha: 0.1 },
            FusedAct::GeluErf,
            FusedAct::GeluTanh,
            FusedAct::Silu,
        ]
    }

    #[track_caller]
    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap(),
        );
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            // NaN where the reference has NaN (a fully masked attention row),
            // infinities where it has the same.
            assert!(
                g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: element {i}: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn fast_conv_matches_reference_for_every_activation() {
        // (X shape, W shape, group, pads, strides): GEMM, pointwise, depthwise,
        // a few-channel stem (the direct kernel), a grouped GEMM (6 channels
        // per group: the bias and residual rows of group 2 start mid-tensor), and
        // a plane big enough that the GEMM runs in column chunks (the residual
        // and output columns of the second chunk start mid-row).
        let cases: &[(&[usize], &[usize], usize, &[usize], &[usize])] = &[
            (&[2, 5, 7, 6], &[5, 5, 3, 3], 1, &[1, 1, 1, 1], &[1, 1]),
            (&[1, 6, 5, 5], &[3, 6, 1, 1], 1, &[0; 4], &[1, 1]),
            (&[1, 4, 9, 8], &[4, 1, 3, 3], 4, &[1, 0, 1, 1], &[2, 2]),
            (&[1, 3, 11], &[2, 3, 3], 1, &[1, 1], &[1]),
            // The stem's plane spans three row bands (residual offsets per band).
            (&[2, 3, 120, 40], &[8, 3, 3, 3], 1, &[1, 1, 1, 1], &[1, 1]),
            (&[2, 12, 6, 6], &[14, 6, 3, 3], 2, &[1, 1, 1, 1], &[1, 1]),
            (&[1, 64, 48, 48], &[8, 64, 3, 3], 1, &[1, 1, 1, 1], &[1, 1]),
        ];
        for (ci, &(xs, ws, group, pads, strides)) in cases.iter().enumerate() {
            let conv = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![],
                group,
                kernel_shape: vec![],
                pads: pads.to_vec(),
                strides: strides.to_vec(),
            };
            let (x, w, b) = (t(xs, 1), t(ws, 2), t(&[ws[0]], 3));
            let y = nn::conv(&conv, &x, &w, None).unwrap();
            let res = t(y.shape(), 4);
            for act in all_acts() {
                let op = FusedOp::Conv {
                    conv: conv.clone(),
                    act,
                };
                for inputs in [
                    vec![Some(&x), Some(&w), Some(&b), Some(&res)],
                    vec![Some(&x), Some(&w), None, Some(&res)],
                    vec![Some(&x), Some(&w), Some(&b)],
                    vec![Some(&x), Some(&w)],
                ] {
                    let what = format!("case {ci} {act:?} with {} inputs", inputs.len());
                    let got = run_fast(&op, &inputs, Packed::None).unwrap();
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&got, &want, &what);
                    assert_close(&run(&op, &inputs).unwrap(), &want, &what);
                }
            }
        }
    }

    /// `FusedOp::PointwiseDepthwise` through `run` (the one kernel where it
    /// applies and pays, the two convs apart elsewhere) against the two
    /// reference convs: small planes (apart), an expansion of 16.8 MB (one
    /// kernel on AVX-512 with an L3 of 32 MB or less), strides 1 and 2, a
    /// 5x5 window, no biases, a 1-D conv, and every activation on either
    /// side.
    #[test]
    fn pointwise_depthwise_matches_the_two_convs() {
        // (X shape, M, depthwise kernel, stride)
        let cases: &[(&[usize], usize, usize, usize)] = &[
            (&[1, 8, 20, 20], 30, 3, 1),
            (&[2, 6, 15, 33], 12, 3, 2),
            (&[1, 4, 40, 40], 18, 3, 2),
            (&[1, 5, 9, 9], 7, 5, 1),
            (&[2, 3, 17], 6, 3, 1),
            (&[1, 2, 512, 512], 16, 3, 1),
        ];
        for (ci, &(xs, m, k, s)) in cases.iter().enumerate() {
            let sp = xs.len() - 2;
            let dw = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![1; sp],
                group: m,
                kernel_shape: vec![k; sp],
                pads: vec![k / 2; 2 * sp],
                strides: vec![s; sp],
            };
            let mut w1_shape = vec![m, xs[1]];
            w1_shape.extend(vec![1; sp]);
            let mut wd_shape = vec![m, 1];
            wd_shape.extend(vec![k; sp]);
            let (x, w1, b1, wd, bd) = (
                t(xs, 11),
                t(&w1_shape, 12),
                t(&[m], 13),
                t(&wd_shape, 14),
                t(&[m], 15),
            );
            for (pw_act, act) in all_acts().into_iter().zip(all_acts().into_iter().rev()) {
                let op = FusedOp::PointwiseDepthwise {
                    pw_act,
                    dw: dw.clone(),
                    act,
                };
                for inputs in [
                    vec![Some(&x), Some(&w1), Some(&b1), Some(&wd), Some(&bd)],
                    vec![Some(&x), Some(&w1), None, Some(&wd)],
                ] {
                    let what =
                        format!("case {ci} {pw_act:?} then {act:?}, {} inputs", inputs.len());
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&run(&op, &inputs).unwrap(), &want, &what);
                }
            }
        }
        // Pointwise weights for other channels, and no depthwise weights:
        // errors that say so.
        let dw = ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![1, 1],
            group: 8,
            kernel_shape: vec![3, 3],
            pads: vec![1; 4],
            strides: vec![1, 1],
        };
        let op = FusedOp::PointwiseDepthwise {
            pw_act: FusedAct::Relu,
            dw,
            act: FusedAct::Relu,
        };
        let (x, w1, wd) = (
            t(&[1, 4, 10, 10], 1),
            t(&[8, 5, 1, 1], 2),
            t(&[8, 1, 3, 3], 3),
        );
        let err = run(&op, &[Some(&x), Some(&w1), None, Some(&wd)]).unwrap_err();
        assert!(
            err.to_string().contains("channels") || err.to_string().contains("match"),
            "{err}"
        );
        let w1 = t(&[8, 4, 1, 1], 2);
        let err = run(&op, &[Some(&x), Some(&w1)]).unwrap_err();
        assert!(err.to_string().contains("Wd"), "{err}");
    }

    #[test]
    fn channels_last_depthwise_matches_reference() {
        // (N, H, W, C, kernel, strides, pads, dilations): whole 16-channel
        // blocks and partial ones (24, 7), stride 2 along one axis or both,
        // asymmetric pads, dilation, a 5x5 kernel, a 1x1 plane, and a plane
        // tall enough for several row bands.
        type Case = (
            usize,
            usize,
            usize,
            usize,
            [usize; 2],
            [usize; 2],
            [usize; 4],
            [usize; 2],
        );
        let cases: &[Case] = &[
            (1, 7, 7, 32, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            (2, 14, 14, 24, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            (1, 9, 11, 16, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]),
            (1, 12, 10, 48, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]),
            (3, 5, 6, 7, [3, 3], [2, 1], [0, 1, 1, 0], [1, 1]),
            (1, 1, 1, 64, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            (1, 60, 40, 16, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            // More bands x blocks than the AVX-512 kernel makes tasks: a
            // task takes several blocks, the last group and block partial.
            (9, 7, 7, 168, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
        ];
        let acts = [
            FusedAct::Identity,
            FusedAct::Relu,
            FusedAct::Clip { min: 0.0, max: 6.0 },
            FusedAct::HardSwish,
        ];
        // Two threads whatever the machine: the AVX-512 kernel's tasks per
        // thread decide how many blocks a task takes.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a test pool");
        for (ci, &(n, h, w, c, k, strides, pads, dil)) in cases.iter().enumerate() {
            let conv = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: dil.to_vec(),
                group: c,
                kernel_shape: k.to_vec(),
                pads: pads.to_vec(),
                strides: strides.to_vec(),
            };
            let (x, wt, b) = (t(&[n, h, w, c], 1), t(&[c, 1, k[0], k[1]], 2), t(&[c], 3));
            for act in acts {
                let op = FusedOp::ConvNhwc {
                    conv: conv.clone(),
                    act,
                };
                let out = run_reference(&op, &[Some(&x), Some(&wt)]).unwrap();
                let res = t(out.shape(), 4);
                for inputs in [
                    vec![Some(&x), Some(&wt), Some(&b), Some(&res)],
                    vec![Some(&x), Some(&wt), Some(&b)],
                    vec![Some(&x), Some(&wt)],
                ] {
                    let what = format!("case {ci} {act:?} with {} inputs", inputs.len());
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&run_fast(&op, &inputs, Packed::None).unwrap(), &want, &what);
                    // Prepared (W in vector lanes on AVX-512), W given or
                    // left out as the runtime does once it is prepared.
                    let node = kiln_ir::Op::Fused(op.clone());
                    let prepared = crate::prepared::prepare(&node, &[None, Some(&wt)], None);
                    #[cfg(target_arch = "x86_64")]
                    assert_eq!(
                        prepared.is_some(),
                        std::is_x86_feature_detected!("avx512f"),
                        "{what}: prepared where the AVX-512 kernel runs"
                    );
                    if let Some(p) = prepared {
                        assert!(format!("{p:?}").contains("vector lanes"), "{p:?}");
                        let mut no_w = inputs.clone();
                        no_w[1] = None;
                        for given in [&inputs, &no_w] {
                            let got = pool.install(|| p.run(given, 1)).unwrap();
                            assert_close(&got[0], &want, &format!("{what}, prepared"));
                        }
                    }
                    // Each channels-last kernel itself (the AVX-512 one where
                    // the CPU has it, and the portable one), not the NCHW route.
                    for allow_tiled in [true, false] {
                        let direct = pool
                            .install(|| {
                                nn::depthwise_conv_nhwc_with(
                                    &conv,
                                    &x,
                                    &wt,
                                    inputs.get(2).copied().flatten(),
                                    inputs.get(3).copied().flatten(),
                                    act,
                                    None,
                                    allow_tiled,
                                )
                            })
                            .unwrap()
                            .unwrap_or_else(|| panic!("{what}: no channels-last kernel took it"));
                        assert_close(&direct, &want, &format!("{what}, tiled {allow_tiled}"));
                    }
                }
            }
        }
    }

    #[test]
    fn channels_last_conv_of_any_other_shape_takes_the_nchw_route() {
        // A full 3x3 conv and a grouped one: no channels-last kernel takes
        // them, and the route through NCHW matches the reference.
        for (group, cin, m) in [(1, 5, 7), (2, 6, 4)] {
            let conv = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![],
                group,
                kernel_shape: vec![3, 3],
                pads: vec![1, 1, 1, 1],
                strides: vec![2, 1],
            };
            let (x, w, b) = (
                t(&[2, 6, 5, cin], 1),
                t(&[m, cin / group, 3, 3], 2),
                t(&[m], 3),
            );
            let op = FusedOp::ConvNhwc {
                conv: conv.clone(),
                act: FusedAct::Relu,
            };
            let inputs = [Some(&x), Some(&w), Some(&b)];
            assert!(
                nn::depthwise_conv_nhwc(&conv, &x, &w, Some(&b), None, FusedAct::Relu, None)
                    .unwrap()
                    .is_none()
            );
            let want = run_reference(&op, &inputs).unwrap();
            assert_eq!(want.shape(), &[2, 3, 5, m]);
            assert_close(
                &run(&op, &inputs).unwrap(),
                &want,
                &format!("group {group}"),
            );
        }
    }

    #[test]
    fn prepared_channels_last_dense_conv_matches_reference() {
        // One-group convs prepared for the gathered product read X
        // channels-last in place: 3x3 with stride, uneven pads and
        // dilation, a 1-D window, a batch; every activation, with and
        // without bias and residual, and W given or left out.
        let cases: &[(&[usize], usize, &[usize], &[usize], &[usize], &[usize])] = &[
            // (X [N, spatial..., C], M, kernel, strides, pads, dilations)
            (&[1, 7, 7, 32], 64, &[3, 3], &[1, 1], &[1, 1, 1, 1], &[1, 1]),
            (&[2, 9, 8, 16], 70, &[3, 3], &[2, 2], &[1, 0, 2, 1], &[1, 1]),
            (&[1, 6, 6, 8], 64, &[3, 2], &[1, 1], &[2, 2, 2, 2], &[2, 1]),
            (&[3, 12, 24], 65, &[5], &[2], &[2, 2], &[1]),
        ];
        for (ci, &(xs, m, k, strides, pads, dil)) in cases.iter().enumerate() {
            let c = xs[xs.len() - 1];
            let conv = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: dil.to_vec(),
                group: 1,
                kernel_shape: k.to_vec(),
                pads: pads.to_vec(),
                strides: strides.to_vec(),
            };
            let ws: Vec<usize> = [m, c].into_iter().chain(k.iter().copied()).collect();
            let (x, w, b) = (t(xs, 1), t(&ws, 2), t(&[m], 3));
            for act in all_acts() {
                let op = kiln_ir::Op::Fused(FusedOp::ConvNhwc {
                    conv: conv.clone(),
                    act,
                });
                let fop = FusedOp::ConvNhwc {
                    conv: conv.clone(),
                    act,
                };
                let out = run_reference(&fop, &[Some(&x), Some(&w)]).unwrap();
                let res = t(out.shape(), 4);
                let consts = [None, Some(&w)];
                let p = crate::prepared::prepare(&op, &consts, None)
                    .unwrap_or_else(|| panic!("case {ci}: a one-group ConvNhwc is prepared"));
                assert!(format!("{p:?}").contains("gathered"), "{p:?}");
                for inputs in [
                    vec![Some(&x), Some(&w), Some(&b), Some(&res)],
                    vec![Some(&x), None, Some(&b), Some(&res)],
                    vec![Some(&x), Some(&w), Some(&b)],
                    vec![Some(&x), None],
                ] {
                    let mut full = inputs.clone();
                    full[1] = Some(&w);
                    let want = run_reference(&fop, &full).unwrap();
                    let got = p.run(&inputs, 1).unwrap();
                    let what = format!("case {ci} {act:?} with {} inputs", inputs.len());
                    assert_close(&got[0], &want, &what);
                }
            }
        }
    }

    #[test]
    fn channels_last_reference_is_the_nchw_conv_transposed() {
        // A 1x2 plane of 2 channels, X stored channels-last, worked by hand.
        let conv = ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 2,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![],
        };
        let x = Tensor::from_vec(vec![1, 1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let w = Tensor::from_vec(vec![2, 1, 3, 3], (0..18).map(|v| v as f32).collect()).unwrap();
        let b = Tensor::from_vec(vec![2], vec![0.5f32, -0.5]).unwrap();
        let op = FusedOp::ConvNhwc {
            conv,
            act: FusedAct::Identity,
        };
        let y = run_reference(&op, &[Some(&x), Some(&w), Some(&b)]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        // Channel 0 reads 1, 3 along the row, channel 1 reads 2, 4; only
        // the kernel's middle row meets the plane. Position 0: 1 * w0[1][1]
        // + 3 * w0[1][2] = 4 + 15, and 2 * w1[1][1] + 4 * w1[1][2] = 26 +
        // 56; position 1: 1 * 3 + 3 * 4 and 2 * 12 + 4 * 13; plus the bias.
        assert_eq!(y.as_slice::<f32>().unwrap(), &[19.5, 81.5, 15.5, 75.5]);
    }

    #[test]
    fn fast_matmul_matches_reference_for_every_activation() {
        let shapes: &[(&[usize], &[usize])] = &[
            (&[3, 5], &[5, 7]),
            (&[2, 4, 3, 5], &[5, 9]),
            (&[2, 3, 5], &[2, 5, 4]),
            (&[5], &[5, 6]),
            (&[2, 1, 3, 5], &[3, 5, 2]),
            (&[0, 5], &[5, 3]),
        ];
        for &(ash, bsh) in shapes {
            let (a, b) = (t(ash, 5), t(bsh, 6));
            let y = nn::matmul(&a, &b).unwrap();
            let n = *y.shape().last().unwrap();
            let bias = t(&[n], 7);
            let res = t(y.shape(), 8);
            for act in all_acts() {
                let op = FusedOp::MatMul { act };
                for inputs in [
                    vec![Some(&a), Some(&b), Some(&bias), Some(&res)],
                    vec![Some(&a), Some(&b), None, Some(&res)],
                    vec![Some(&a), Some(&b), Some(&bias)],
                    vec![Some(&a), Some(&b)],
                ] {
                    let what = format!("{ash:?}x{bsh:?} {act:?} with {} inputs", inputs.len());
                    let got = run_fast(&op, &inputs, Packed::None).unwrap();
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&got, &want, &what);
                }
            }
        }
    }

    #[test]
    fn fast_path_rejects_bad_bias_and_residual() {
        let (a, b) = (t(&[3, 5], 1), t(&[5, 4], 2));
        let op = FusedOp::MatMul {
            act: FusedAct::Relu,
        };
        let bad_bias = t(&[3], 3);
        assert!(run(&op, &[Some(&a), Some(&b), Some(&bad_bias)]).is_err());
        let bad_res = t(&[4, 3], 4);
        assert!(run(&op, &[Some(&a), Some(&b), None, Some(&bad_res)]).is_err());
        let conv = FusedOp::Conv {
            conv: ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: vec![],
                group: 1,
                kernel_shape: vec![],
                pads: vec![],
                strides: vec![],
            },
            act: FusedAct::Relu,
        };
        let (x, w) = (t(&[1, 2, 4, 4], 5), t(&[3, 2, 3, 3], 6));
        let bad_res = t(&[1, 3, 4, 4], 7);
        let e = run(&conv, &[Some(&x), Some(&w), None, Some(&bad_res)]).unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
    }

    fn bools(shape: &[usize], seed: u64) -> Tensor {
        let v: Vec<bool> = rvec(shape.iter().product(), seed)
            .iter()
            .map(|&x| x > -1.0)
            .collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    /// Attention cases: (Q, Kt, V shapes, mask shape). Row counts that do and
    /// do not divide into blocks, one key, long keys (blocks of 8 rows), more
    /// heads than threads, rank 2 and 3, blocks of hundreds of rows.
    fn attention_shapes() -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>)> {
        vec![
            (
                vec![1, 3, 7, 5],
                vec![1, 3, 5, 9],
                vec![1, 3, 9, 4],
                vec![1, 1, 1, 9],
            ),
            (
                vec![2, 4, 33, 8],
                vec![2, 4, 8, 33],
                vec![2, 4, 33, 8],
                vec![1, 1, 33, 33],
            ),
            (
                vec![2, 2, 5, 3],
                vec![2, 2, 3, 1],
                vec![2, 2, 1, 6],
                vec![2, 1, 1, 1],
            ),
            (
                vec![1, 2, 20, 16],
                vec![1, 2, 16, 9000],
                vec![1, 2, 9000, 3],
                vec![1, 2, 20, 9000],
            ),
            (
                vec![2, 1, 9, 4],
                vec![2, 1, 4, 5],
                vec![2, 1, 5, 2],
                vec![1],
            ),
            (vec![3, 6, 4], vec![3, 4, 6], vec![3, 6, 2], vec![3, 6, 6]),
            (vec![40, 12], vec![12, 40], vec![40, 12], vec![40, 1]),
            // Few keys and many query rows: blocks of more rows than the
            // kernel keeps the row sums of on the stack (256) on pools of up
            // to 64 threads (rows per block: S / (4 * threads)).
            (
                vec![1, 1, 70000, 4],
                vec![1, 1, 4, 6],
                vec![1, 1, 6, 5],
                vec![1, 1, 1, 6],
            ),
        ]
    }

    #[test]
    fn fast_attention_matches_reference() {
        // Div(8) and Mul run as the GEMM's alpha, Div(3) as a division.
        let scales = [
            AttnScale::None,
            AttnScale::Div(8.0),
            AttnScale::Mul(0.125),
            AttnScale::Div(3.0),
        ];
        for (ci, (qs, ks, vs, ms)) in attention_shapes().into_iter().enumerate() {
            let (q, kt, v) = (t(&qs, 11), t(&ks, 12), t(&vs, 13));
            let add = t(&ms, 14);
            let cond = bools(&ms, 15);
            for (si, &scale) in scales.iter().enumerate() {
                let masks = [
                    (AttnMask::None, None),
                    (AttnMask::Add, Some(&add)),
                    (
                        AttnMask::Where {
                            fill: -1e4,
                            keep_if_true: true,
                        },
                        Some(&cond),
                    ),
                    (
                        AttnMask::Where {
                            fill: f32::NEG_INFINITY,
                            keep_if_true: false,
                        },
                        Some(&cond),
                    ),
                ];
                for (mask, m) in masks {
                    let what = format!("case {ci} scale {si} {mask:?}");
                    let op = FusedOp::Attention {
                        scale,
                        mask,
                        layout: AttnLayout::default(),
                    };
                    let mut inputs = vec![Some(&q), Some(&kt), Some(&v)];
                    if m.is_some() {
                        inputs.push(m);
                    }
                    let fast =
                        nn::attention_f32(&q, &kt, &v, m, scale, mask, &AttnLayout::default())
                            .unwrap()
                            .expect("the fast kernel takes equal batch dims");
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&fast, &want, &what);
                    assert_close(&run(&op, &inputs).unwrap(), &want, &what);
                }
            }
        }
    }

    /// Masks that replace whole runs of trailing keys: causal (per query
    /// row) and padding (the same for every row), whose masked keys the
    /// kernel leaves out where their probabilities are exactly 0. Fills far
    /// below the scores (left out), -inf, and one within the scores' range
    /// (kept: e^(fill - max) is not 0); V with an infinity in a masked row
    /// (kept, so 0 x inf gives the reference's NaN); a row with no key kept.
    #[test]
    fn attention_with_trailing_masked_keys_matches_reference() {
        let (h, s, d, e) = (3, 70, 8, 5);
        let q = t(&[1, h, s, d], 21);
        let kt = t(&[1, h, d, s], 22);
        let v = t(&[1, h, s, e], 23);
        let mut v_inf = v.as_slice::<f32>().unwrap().to_vec();
        v_inf[(s - 1) * e + 2] = f32::INFINITY;
        let v_inf = Tensor::from_vec(vec![1, h, s, e], v_inf).unwrap();
        let causal: Vec<bool> = (0..s * s).map(|i| i % s <= i / s).collect();
        let causal = Tensor::from_vec(vec![1, 1, s, s], causal).unwrap();
        let padding: Vec<bool> = (0..s).map(|j| j < 41).collect();
        let padding = Tensor::from_vec(vec![1, 1, 1, s], padding).unwrap();
        let mut no_key: Vec<bool> = (0..s * s).map(|i| i % s <= i / s).collect();
        no_key[5 * s..6 * s].iter_mut().for_each(|c| *c = false);
        let no_key = Tensor::from_vec(vec![1, 1, s, s], no_key).unwrap();
        for (mi, m) in [&causal, &padding, &no_key].into_iter().enumerate() {
            for fill in [f32::MIN, -1e4, f32::NEG_INFINITY, -3.0] {
                for (vi, vv) in [&v, &v_inf].into_iter().enumerate() {
                    let mask = AttnMask::Where {
                        fill,
                        keep_if_true: true,
                    };
                    let op = FusedOp::Attention {
                        scale: AttnScale::Div(8.0),
                        mask,
                        layout: AttnLayout::default(),
                    };
                    let inputs = [Some(&q), Some(&kt), Some(vv), Some(m)];
                    let what = format!("mask {mi} fill {fill} v {vi}");
                    let fast = nn::attention_f32(
                        &q,
                        &kt,
                        vv,
                        Some(m),
                        AttnScale::Div(8.0),
                        mask,
                        &AttnLayout::default(),
                    )
                    .unwrap()
                    .expect("the fast kernel takes these inputs");
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_close(&fast, &want, &what);
                    // (A check of the case itself, not of the kernel: the
                    // infinity in V's last row makes the reference NaN
                    // where rows mask it, which the kernel must then match.)
                    if vi == 1 && mi == 0 {
                        let w = want.as_slice::<f32>().unwrap();
                        assert!(
                            w[2].is_nan() || fill == -3.0,
                            "{what}: reference has no NaN"
                        );
                    }
                }
            }
        }
    }

    /// The kernel reading Q, Kt, V and writing the output through absorbed
    /// Transposes matches the reference that transposes first: BERT's head
    /// layout, every other input perm of rank 4, output perms that keep the
    /// last axis, with and without a mask.
    #[test]
    fn attention_through_transposes_matches_reference() {
        // Logical Q [2, 3, 5, 4], Kt [2, 3, 4, 6], V [2, 3, 6, 7]: the inputs
        // hold them transposed, `input = Transpose(logical, inverse(perm))`,
        // so that `Transpose(input, perm)` is the logical operand.
        let logical = [[2, 3, 5, 4], [2, 3, 4, 6], [2, 3, 6, 7]];
        let perms: Vec<Vec<usize>> = crate::nn::test_util::permutations(4);
        let bert = [
            Some(vec![0, 2, 1, 3]),
            Some(vec![0, 2, 3, 1]),
            Some(vec![0, 2, 1, 3]),
        ];
        let mut cases: Vec<[Option<Vec<usize>>; 3]> = vec![bert, [None, None, None]];
        for (i, p) in perms.iter().enumerate() {
            // Each perm on each operand, the others varied too.
            cases.push([
                Some(p.clone()),
                Some(perms[(i * 7 + 3) % perms.len()].clone()),
                Some(perms[(i * 5 + 11) % perms.len()].clone()),
            ]);
        }
        // (Involutions and a 3-cycle, whose inverse differs.)
        let outs = [
            None,
            Some(vec![0, 2, 1, 3]),
            Some(vec![2, 1, 0, 3]),
            Some(vec![1, 2, 0, 3]),
        ];
        let add = t(&[2, 1, 1, 6], 41);
        for (ci, ins) in cases.iter().enumerate() {
            let tensors: Vec<Tensor> = (0..3)
                .map(|k| {
                    let src_shape: Vec<usize> = match &ins[k] {
                        // src[perm[j]] = logical[j]
                        Some(p) => {
                            let mut sh = vec![0; 4];
                            for (j, &a) in p.iter().enumerate() {
                                sh[a] = logical[k][j];
                            }
                            sh
                        }
                        None => logical[k].to_vec(),
                    };
                    t(&src_shape, 50 + ci as u64 * 3 + k as u64)
                })
                .collect();
            for (oi, out) in outs.iter().enumerate() {
                for mask in [AttnMask::None, AttnMask::Add] {
                    let layout = AttnLayout {
                        inputs: ins.clone(),
                        out: out.clone(),
                    };
                    let op = FusedOp::Attention {
                        scale: AttnScale::Div(2.0),
                        mask,
                        layout: layout.clone(),
                    };
                    let mut inputs: Vec<Option<&Tensor>> = tensors.iter().map(Some).collect();
                    if mask == AttnMask::Add {
                        inputs.push(Some(&add));
                    }
                    let what = format!("case {ci} ({ins:?}) out {oi} {mask:?}");
                    let m = inputs.get(3).copied().flatten();
                    let fast = nn::attention_f32(
                        &tensors[0],
                        &tensors[1],
                        &tensors[2],
                        m,
                        AttnScale::Div(2.0),
                        mask,
                        &layout,
                    )
                    .unwrap()
                    .expect("the kernel takes permuted operands");
                    let want = run_reference(&op, &inputs).unwrap();
                    assert_eq!(fast.shape(), want.shape(), "{what}");
                    assert_close(&fast, &want, &what);
                }
            }
        }
        // A perm that does not fit its input, and an output perm that moves
        // the last axis, are errors.
        let (q, kt, v) = (
            t(&[2, 3, 5, 4], 1),
            t(&[2, 3, 4, 6], 2),
            t(&[2, 3, 6, 7], 3),
        );
        let bad_in = AttnLayout {
            inputs: [Some(vec![0, 1, 2]), None, None],
            out: None,
        };
        let bad_out = AttnLayout {
            inputs: [None, None, None],
            out: Some(vec![0, 1, 3, 2]),
        };
        for layout in [bad_in, bad_out] {
            let r = nn::attention_f32(&q, &kt, &v, None, AttnScale::None, AttnMask::None, &layout);
            assert!(r.is_err(), "{layout:?}");
        }
    }

    #[test]
    fn attention_definition_hand_checked() {
        // One query, two keys: scores [1*1 + 0*2, 1*3 + 0*4] / 2 = [0.5, 1.5],
        // mask adds [0, -1]: [0.5, 0.5] -> probabilities [0.5, 0.5];
        // output = 0.5 * [10, 20] + 0.5 * [30, 40] = [20, 30].
        let q = Tensor::from_vec(vec![1, 2], vec![1f32, 0.0]).unwrap();
        let kt = Tensor::from_vec(vec![2, 2], vec![1f32, 3.0, 2.0, 4.0]).unwrap();
        let v = Tensor::from_vec(vec![2, 2], vec![10f32, 20.0, 30.0, 40.0]).unwrap();
        let m = Tensor::from_vec(vec![2], vec![0f32, -1.0]).unwrap();
        let op = FusedOp::Attention {
            scale: AttnScale::Div(2.0),
            mask: AttnMask::Add,
            layout: AttnLayout::default(),
        };
        let y = run(&op, &[Some(&q), Some(&kt), Some(&v), Some(&m)]).unwrap();
        assert_eq!(y.shape(), &[1, 2]);
        let y = y.as_slice::<f32>().unwrap();
        assert!(
            (y[0] - 20.0).abs() < 1e-5 && (y[1] - 30.0).abs() < 1e-5,
            "{y:?}"
        );
        // Where keeps the first key only: output = V row 0.
        let c = Tensor::from_vec(vec![1, 2], vec![true, false]).unwrap();
        let op = FusedOp::Attention {
            scale: AttnScale::None,
            mask: AttnMask::Where {
                fill: f32::NEG_INFINITY,
                keep_if_true: true,
            },
            layout: AttnLayout::default(),
        };
        let y = run(&op, &[Some(&q), Some(&kt), Some(&v), Some(&c)]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[10.0, 20.0]);
    }

    #[test]
    fn attention_with_broadcast_batches_takes_the_composed_route() {
        // Kt shared by both images: MatMul broadcasting, which the fast
        // kernel declines; `run` still answers, as the unfused ops did.
        let (q, kt, v) = (
            t(&[2, 3, 4, 5], 21),
            t(&[1, 3, 5, 6], 22),
            t(&[2, 3, 6, 2], 23),
        );
        let op = FusedOp::Attention {
            scale: AttnScale::None,
            mask: AttnMask::None,
            layout: AttnLayout::default(),
        };
        assert!(nn::attention_f32(
            &q,
            &kt,
            &v,
            None,
            AttnScale::None,
            AttnMask::None,
            &AttnLayout::default()
        )
        .unwrap()
        .is_none());
        let y = run(&op, &[Some(&q), Some(&kt), Some(&v)]).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4, 2]);
    }

    #[test]
    fn attention_rejects_bad_masks_and_inner_dims() {
        let (q, kt, v) = (t(&[2, 4, 5], 31), t(&[2, 5, 6], 32), t(&[2, 6, 3], 33));
        let op = FusedOp::Attention {
            scale: AttnScale::None,
            mask: AttnMask::Add,
            layout: AttnLayout::default(),
        };
        let bad = t(&[3, 6], 34);
        let e = run(&op, &[Some(&q), Some(&kt), Some(&v), Some(&bad)]).unwrap_err();
        assert!(e.to_string().contains("broadcast"), "{e}");
        let e = run(&op, &[Some(&q), Some(&kt), Some(&v)]).unwrap_err();
        assert!(e.to_string().contains("mask"), "{e}");
        let short_v = t(&[2, 5, 3], 35);
        assert!(run(
            &op,
            &[Some(&q), Some(&kt), Some(&short_v), Some(&t(&[6], 36))]
        )
        .is_err());
    }
}
