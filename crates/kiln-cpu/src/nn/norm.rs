//! BatchNormalization (inference), InstanceNormalization, LayerNormalization and
//! Softmax / LogSoftmax.

use super::{float_prec, float_tensor, numel, values, Prec, Real};
use crate::util::{broadcast_indices, broadcast_shape, normalize_axis};
use crate::{fastmath, invalid, Result};
use kiln_ir::{DType, Tensor};
use rayon::prelude::*;

/// A per-channel parameter of length `c`, as f64.
fn channel_param(op: &str, what: &str, t: &Tensor, c: usize, x: &Tensor) -> Result<Vec<f64>> {
    if t.len() != c || t.rank() > 1 && t.shape().iter().filter(|&&d| d != 1).count() > 1 {
        return Err(invalid!(
            "{op}: {what} must have shape [{c}] (the channel count of X {:?}), got {:?}",
            x.shape(),
            t.shape()
        ));
    }
    if !t.dtype().is_float() {
        return Err(invalid!(
            "{op}: {what} must be a float tensor, got {}",
            t.dtype()
        ));
    }
    t.to_f64_vec().map_err(|e| invalid!("{op}: {what}: {e}"))
}

/// BatchNormalization in inference form:
/// `Y = (X - mean) / sqrt(var + eps) * scale + B`, per channel (axis 1).
pub fn batch_norm(
    eps: f32,
    x: &Tensor,
    scale: &Tensor,
    b: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> Result<Tensor> {
    match float_prec(x, "BatchNormalization")? {
        // A separate vectorized f32 path measured no faster on 2 cores (the
        // optimizer folds inference BatchNorms into convs anyway).
        Prec::F32 => batch_norm_impl::<f32>(eps, x, scale, b, mean, var),
        Prec::F64 => batch_norm_impl::<f64>(eps, x, scale, b, mean, var),
    }
}

fn batch_norm_impl<T: Real>(
    eps: f32,
    x: &Tensor,
    scale: &Tensor,
    b: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "BatchNormalization";
    let xs = x.shape();
    if xs.is_empty() {
        return Err(invalid!("{OP} expects X of rank >= 1, got a scalar"));
    }
    // A 1-D input [N] has one channel.
    let c = if xs.len() == 1 { 1 } else { xs[1] };
    let inner = if xs.len() <= 2 { 1 } else { numel(&xs[2..])? };
    let s = channel_param(OP, "scale", scale, c, x)?;
    let bb = channel_param(OP, "B", b, c, x)?;
    let m = channel_param(OP, "input_mean", mean, c, x)?;
    let v = channel_param(OP, "input_var", var, c, x)?;
    let mul: Vec<T> = (0..c)
        .map(|i| T::from_f64(s[i] / (v[i] + eps as f64).sqrt()))
        .collect();
    let add: Vec<T> = (0..c)
        .map(|i| T::from_f64(bb[i] - m[i] * s[i] / (v[i] + eps as f64).sqrt()))
        .collect();
    let xv = values::<T>(x, OP)?;
    let mut y = xv.into_owned();
    for (i, chunk) in y.chunks_exact_mut(inner.max(1)).enumerate() {
        let ch = i % c;
        let (a, d) = (mul[ch], add[ch]);
        chunk.iter_mut().for_each(|v| *v = *v * a + d);
    }
    float_tensor(xs.to_vec(), y, x.dtype())
}

/// InstanceNormalization: normalize every (n, c) plane over its spatial axes.
pub fn instance_norm(eps: f32, x: &Tensor, scale: &Tensor, b: &Tensor) -> Result<Tensor> {
    match float_prec(x, "InstanceNormalization")? {
        Prec::F32 => instance_norm_impl::<f32>(eps, x, scale, b),
        Prec::F64 => instance_norm_impl::<f64>(eps, x, scale, b),
    }
}

fn instance_norm_impl<T: Real>(eps: f32, x: &Tensor, scale: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "InstanceNormalization";
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(invalid!(
            "{OP} expects X of rank >= 2 [N, C, ...], got {xs:?}"
        ));
    }
    let c = xs[1];
    let inner = numel(&xs[2..])?;
    let s = channel_param(OP, "scale", scale, c, x)?;
    let bb = channel_param(OP, "B", b, c, x)?;
    let mut y = values::<T>(x, OP)?.into_owned();
    if inner > 0 {
        for (i, plane) in y.chunks_exact_mut(inner).enumerate() {
            let ch = i % c;
            let (mean, inv) = mean_inv_std(plane, eps);
            let (mt, a, d) = (
                T::from_f64(mean),
                T::from_f64(s[ch] * inv),
                T::from_f64(bb[ch]),
            );
            plane.iter_mut().for_each(|v| *v = (*v - mt) * a + d);
        }
    }
    float_tensor(xs.to_vec(), y, x.dtype())
}

/// Mean and 1/sqrt(var + eps) of a slice (population variance, two passes in f64).
fn mean_inv_std<T: Real>(v: &[T], eps: f32) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| x.to_f64()).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|x| {
            let d = x.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// LayerNormalization over axes `[axis, rank)`; Scale and B broadcast to the
/// normalized shape. Outputs Y, and when asked Mean and InvStdDev (shape of X
/// with the normalized dims set to 1; f32, or f64 for f64 input).
pub fn layer_norm(
    axis: i64,
    eps: f32,
    x: &Tensor,
    scale: &Tensor,
    b: Option<&Tensor>,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    match float_prec(x, "LayerNormalization")? {
        Prec::F32 => layer_norm_fast(axis, eps, x, scale, b, num_outputs),
        Prec::F64 => layer_norm_impl::<f64>(axis, eps, x, scale, b, num_outputs),
    }
}

fn layer_norm_impl<T: Real>(
    axis: i64,
    eps: f32,
    x: &Tensor,
    scale: &Tensor,
    b: Option<&Tensor>,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    const OP: &str = "LayerNormalization";
    let xs = x.shape();
    let ax = normalize_axis(axis, xs.len()).map_err(|e| invalid!("{OP}: {e}"))?;
    let norm_shape = &xs[ax..];
    let inner = numel(norm_shape)?;
    let outer = numel(&xs[..ax])?;
    let param = |t: &Tensor, what: &str| -> Result<Vec<T>> {
        let ok = broadcast_shape(t.shape(), norm_shape)
            .map(|s| s == norm_shape)
            .unwrap_or(false);
        if !ok {
            return Err(invalid!(
                "{OP}: {what} {:?} does not broadcast to the normalized shape {norm_shape:?} of X {xs:?} (axis {axis})",
                t.shape()
            ));
        }
        let v = values::<T>(t, what)?;
        Ok(broadcast_indices(t.shape(), norm_shape)
            .into_iter()
            .map(|i| v[i])
            .collect())
    };
    let sv = param(scale, "Scale")?;
    let bv = match b {
        Some(b) => Some(param(b, "B")?),
        None => None,
    };
    let mut y = values::<T>(x, OP)?.into_owned();
    let mut means = Vec::with_capacity(outer);
    let mut invs = Vec::with_capacity(outer);
    if inner > 0 {
        for row in y.chunks_exact_mut(inner) {
            let (mean, inv) = mean_inv_std(row, eps);
            means.push(mean);
            invs.push(inv);
            let (mt, it) = (T::from_f64(mean), T::from_f64(inv));
            match &bv {
                Some(bv) => {
                    for ((v, &s), &bb) in row.iter_mut().zip(&sv).zip(bv) {
                        *v = (*v - mt) * it * s + bb;
                    }
                }
                None => {
                    for (v, &s) in row.iter_mut().zip(&sv) {
                        *v = (*v - mt) * it * s;
                    }
                }
            }
        }
    } else {
        means.resize(outer, f64::NAN);
        invs.resize(outer, f64::NAN);
    }
    let mut outs = vec![float_tensor(xs.to_vec(), y, x.dtype())?];
    if num_outputs > 1 {
        let mut stat_shape = xs[..ax].to_vec();
        stat_shape.resize(xs.len(), 1);
        let stat = |v: Vec<f64>| -> Result<Tensor> {
            if x.dtype() == DType::F64 {
                float_tensor(stat_shape.clone(), v, DType::F64)
            } else {
                float_tensor(
                    stat_shape.clone(),
                    v.into_iter().map(|x| x as f32).collect(),
                    DType::F32,
                )
            }
        };
        outs.push(stat(means)?);
        if num_outputs > 2 {
            outs.push(stat(invs)?);
        }
    }
    Ok(outs)
}

/// Mean and 1/sqrt(var + eps) of an f32 row: two passes accumulated in f64
/// (`fastmath::sum_f64` and `sum_sq_dev_f64`: independent lanes, so the
/// adds overlap), like [`mean_inv_std`].
#[inline(always)]
fn mean_inv_std_f32(v: &[f32], eps: f32) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = crate::fastmath::sum_f64(v) / n;
    let var = crate::fastmath::sum_sq_dev_f64(v, mean) / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// LayerNormalization for f32 compute: the formula of [`layer_norm_impl`],
/// rows in vectorized loops and in parallel when the tensor is large.
fn layer_norm_fast(
    axis: i64,
    eps: f32,
    x: &Tensor,
    scale: &Tensor,
    b: Option<&Tensor>,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    const OP: &str = "LayerNormalization";
    let xs = x.shape();
    let ax = normalize_axis(axis, xs.len()).map_err(|e| invalid!("{OP}: {e}"))?;
    let norm_shape = &xs[ax..];
    let inner = numel(norm_shape)?;
    let outer = numel(&xs[..ax])?;
    if inner == 0 {
        return layer_norm_impl::<f32>(axis, eps, x, scale, b, num_outputs);
    }
    let param = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
        let ok = broadcast_shape(t.shape(), norm_shape)
            .map(|s| s == norm_shape)
            .unwrap_or(false);
        if !ok {
            return Err(invalid!(
                "{OP}: {what} {:?} does not broadcast to the normalized shape {norm_shape:?} of X {xs:?} (axis {axis})",
                t.shape()
            ));
        }
        let v = values::<f32>(t, what)?;
        if v.len() == inner {
            return Ok(v.into_owned());
        }
        Ok(broadcast_indices(t.shape(), norm_shape)
            .into_iter()
            .map(|i| v[i])
            .collect())
    };
    let sv = param(scale, "Scale")?;
    let bv = match b {
        Some(b) => Some(param(b, "B")?),
        None => None,
    };
    // Y is written from X's rows directly (a copy of X first, normalized in
    // place, was a third of the time of BERT's 128 x 768 rows).
    let xv = values::<f32>(x, OP)?;
    let mut y = crate::buffers::take_f32(xv.len());
    let mut means = vec![0.0f64; outer];
    let mut invs = vec![0.0f64; outer];
    let rows = |src: &[f32], dst: &mut [f32], mc: &mut [f64], ic: &mut [f64]| {
        fastmath::simd(
            #[inline(always)]
            || {
                let pairs = src.chunks_exact(inner).zip(dst.chunks_exact_mut(inner));
                for (((row, out), m), iv) in pairs.zip(mc).zip(ic) {
                    let (mean, inv) = mean_inv_std_f32(row, eps);
                    *m = mean;
                    *iv = inv;
                    let (mt, it) = (mean as f32, inv as f32);
                    match &bv {
                        Some(bv) => {
                            for (((o, &v), &s), &bb) in out.iter_mut().zip(row).zip(&sv).zip(bv) {
                                *o = (v - mt) * it * s + bb;
                            }
                        }
                        None => {
                            for ((o, &v), &s) in out.iter_mut().zip(row).zip(&sv) {
                                *o = (v - mt) * it * s;
                            }
                        }
                    }
                }
            },
        )
    };
    if y.len() < fastmath::PAR_MIN || outer < 2 {
        rows(&xv, &mut y, &mut means, &mut invs);
    } else {
        let per = (fastmath::PAR_CHUNK / inner).max(1);
        y.par_chunks_mut(per * inner)
            .zip(xv.par_chunks(per * inner))
            .zip(means.par_chunks_mut(per))
            .zip(invs.par_chunks_mut(per))
            .for_each(|(((d, s), m), i)| rows(s, d, m, i));
    }
    let mut outs = vec![float_tensor(xs.to_vec(), y, x.dtype())?];
    if num_outputs > 1 {
        let mut stat_shape = xs[..ax].to_vec();
        stat_shape.resize(xs.len(), 1);
        let stat = |v: Vec<f64>| -> Result<Tensor> {
            float_tensor(
                stat_shape.clone(),
                v.into_iter().map(|x| x as f32).collect(),
                DType::F32,
            )
        };
        outs.push(stat(means)?);
        if num_outputs > 2 {
            outs.push(stat(invs)?);
        }
    }
    Ok(outs)
}

/// Softmax / LogSoftmax, numerically stable (max subtracted). `coerce_2d`:
/// opset < 13 semantics, the input is viewed as 2-D `[prod(d[..axis]),
/// prod(d[axis..])]` and each row is normalized as a whole.
pub fn softmax(x: &Tensor, axis: i64, coerce_2d: bool, log: bool) -> Result<Tensor> {
    let op = if log { "LogSoftmax" } else { "Softmax" };
    match float_prec(x, op)? {
        Prec::F32 => softmax_fast(op, x, axis, coerce_2d, log),
        Prec::F64 => softmax_impl::<f64>(op, x, axis, coerce_2d, log),
    }
}

fn softmax_impl<T: Real>(
    op: &str,
    x: &Tensor,
    axis: i64,
    coerce_2d: bool,
    log: bool,
) -> Result<Tensor> {
    let xs = x.shape();
    let rank = xs.len();
    // Opset < 13 allows axis == rank (each element is its own block).
    let ax = if coerce_2d && axis == rank as i64 {
        rank
    } else {
        normalize_axis(axis, rank).map_err(|e| invalid!("{op}: {e}"))?
    };
    let (len, inner) = if coerce_2d {
        (numel(&xs[ax..])?, 1)
    } else {
        (xs[ax], numel(&xs[ax + 1..])?)
    };
    let mut y = values::<T>(x, op)?.into_owned();
    if y.is_empty() || len == 0 {
        return float_tensor(xs.to_vec(), y, x.dtype());
    }
    let block = len * inner;
    let mut tmp: Vec<T> = vec![T::ZERO; len];
    for blk in y.chunks_exact_mut(block) {
        for i in 0..inner {
            // Gather the (possibly strided) lane.
            for (j, t) in tmp.iter_mut().enumerate() {
                *t = blk[j * inner + i];
            }
            let max = tmp
                .iter()
                .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let mut sum = 0.0f64;
            for t in tmp.iter_mut() {
                let e = (*t - max).exp();
                sum += e.to_f64();
                if !log {
                    *t = e;
                }
            }
            if log {
                let ls = T::from_f64(sum.ln());
                for (j, t) in tmp.iter().enumerate() {
                    blk[j * inner + i] = *t - max - ls;
                }
            } else {
                let inv = T::from_f64(1.0 / sum);
                for (j, t) in tmp.iter().enumerate() {
                    blk[j * inner + i] = *t * inv;
                }
            }
        }
    }
    float_tensor(xs.to_vec(), y, x.dtype())
}

/// Softmax / LogSoftmax for f32 compute. Rows along the last axis (or the
/// coerced 2-D rows) run as max, `exp(x - max)` with its sum, and a scale, each
/// a vectorized pass; other axes work on whole `[len, inner]` blocks a row of
/// `inner` lanes at a time. Large tensors run their rows / blocks in parallel.
/// Sums are in f32 (16 partial sums); the reference sums in f64.
fn softmax_fast(op: &str, x: &Tensor, axis: i64, coerce_2d: bool, log: bool) -> Result<Tensor> {
    let xs = x.shape();
    let rank = xs.len();
    let ax = if coerce_2d && axis == rank as i64 {
        rank
    } else {
        normalize_axis(axis, rank).map_err(|e| invalid!("{op}: {e}"))?
    };
    let (len, inner) = if coerce_2d {
        (numel(&xs[ax..])?, 1)
    } else {
        (xs[ax], numel(&xs[ax + 1..])?)
    };
    let mut y = values::<f32>(x, op)?.into_owned();
    if y.is_empty() || len == 0 {
        return float_tensor(xs.to_vec(), y, x.dtype());
    }
    let block = len * inner;
    let per = (fastmath::PAR_CHUNK / block).max(1);
    let run = |chunk: &mut [f32]| {
        let mut tmp = Vec::new();
        for blk in chunk.chunks_exact_mut(block) {
            if inner == 1 {
                softmax_row(blk, log, &mut tmp);
            } else {
                softmax_block(blk, inner, log, &mut tmp);
            }
        }
    };
    if y.len() < fastmath::PAR_MIN || y.len() == block {
        run(&mut y);
    } else {
        y.par_chunks_mut(per * block).for_each(run);
    }
    float_tensor(xs.to_vec(), y, x.dtype())
}

/// Softmax (or LogSoftmax) of one contiguous row in place.
pub(super) fn softmax_row(row: &mut [f32], log: bool, tmp: &mut Vec<f32>) {
    let max = fastmath::max_of(row);
    if log {
        tmp.clear();
        tmp.extend_from_slice(row);
        let sum = fastmath::exp_shift_sum(tmp, max);
        // (x - max) - ln(sum), like the reference: x - max is exact for
        // values near the max, so large logits do not lose precision.
        let ls = sum.ln();
        fastmath::simd(
            #[inline(always)]
            || row.iter_mut().for_each(|v| *v = (*v - max) - ls),
        );
    } else {
        let sum = fastmath::exp_shift_sum(row, max);
        let inv = 1.0 / sum;
        fastmath::simd(
            #[inline(always)]
            || row.iter_mut().for_each(|v| *v *= inv),
        );
    }
}

/// Softmax (or LogSoftmax) along the middle axis of a `[len, inner]` block:
/// the `inner` lanes are processed together, one row of the block at a time.
fn softmax_block(blk: &mut [f32], inner: usize, log: bool, tmp: &mut Vec<f32>) {
    // tmp = [max (inner) | sum (inner) | exp row (inner)]
    tmp.clear();
    tmp.resize(3 * inner, 0.0);
    let (max, rest) = tmp.split_at_mut(inner);
    let (sum, e) = rest.split_at_mut(inner);
    max.fill(f32::NEG_INFINITY);
    fastmath::simd(
        #[inline(always)]
        || {
            for row in blk.chunks_exact(inner) {
                for (m, &v) in max.iter_mut().zip(row) {
                    *m = if v > *m { v } else { *m };
                }
            }
        },
    );
    for row in blk.chunks_exact_mut(inner) {
        fastmath::simd(
            #[inline(always)]
            || {
                for ((d, &v), &m) in e.iter_mut().zip(row.iter()).zip(max.iter()) {
                    *d = v - m;
                }
            },
        );
        fastmath::exp_inplace(e);
        fastmath::simd(
            #[inline(always)]
            || {
                for (s, &v) in sum.iter_mut().zip(e.iter()) {
                    *s += v;
                }
                if !log {
                    row.copy_from_slice(e);
                }
            },
        );
    }
    fastmath::simd(
        #[inline(always)]
        || {
            if log {
                for s in sum.iter_mut() {
                    *s = s.ln();
                }
                for row in blk.chunks_exact_mut(inner) {
                    for ((v, &s), &m) in row.iter_mut().zip(sum.iter()).zip(max.iter()) {
                        *v = (*v - m) - s;
                    }
                }
            } else {
                for s in sum.iter_mut() {
                    *s = 1.0 / *s;
                }
                for row in blk.chunks_exact_mut(inner) {
                    for (v, &s) in row.iter_mut().zip(sum.iter()) {
                        *v *= s;
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::*;

    #[test]
    fn batch_norm_rank4_and_rank2() {
        let x = t(&[1, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let s = t(&[2], vec![1.0, 2.0]);
        let b = t(&[2], vec![0.0, 1.0]);
        let m = t(&[2], vec![1.0, 3.0]);
        let v = t(&[2], vec![4.0, 1.0]);
        let y = batch_norm(0.0, &x, &s, &b, &m, &v).unwrap();
        // ch0: (x-1)/2 ; ch1: (x-3)*2+1
        assert_close(&f32s(&y), &[0.0, 0.5, 1.0, 3.0], 1e-6);
        let x2 = t(&[2, 2], vec![1.0, 3.0, 3.0, 4.0]);
        let y = batch_norm(0.0, &x2, &s, &b, &m, &v).unwrap();
        assert_close(&f32s(&y), &[0.0, 1.0, 1.0, 3.0], 1e-6);
        let e = batch_norm(0.0, &x, &t(&[3], vec![1.0; 3]), &b, &m, &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2]") && e.contains("[3]"), "{e}");
        // epsilon
        let y = batch_norm(
            1.0,
            &t(&[1, 1], vec![2.0]),
            &t(&[1], vec![1.0]),
            &t(&[1], vec![0.0]),
            &t(&[1], vec![0.0]),
            &t(&[1], vec![3.0]),
        )
        .unwrap();
        assert_close(&f32s(&y), &[1.0], 1e-6);
        assert_eq!(
            batch_norm(0.0, &t(&[0, 2, 3], vec![]), &s, &b, &m, &v)
                .unwrap()
                .shape(),
            &[0, 2, 3]
        );
    }

    #[test]
    fn instance_norm_planes() {
        let x = t(&[1, 2, 2], vec![1.0, 3.0, 10.0, 10.0]);
        let s = t(&[2], vec![2.0, 1.0]);
        let b = t(&[2], vec![0.5, 7.0]);
        let y = instance_norm(0.0, &x, &s, &b).unwrap();
        // ch0: mean 2 var 1 -> [-1, 1]*2+0.5 ; ch1: var 0 (eps 0 -> 0/0) skip
        let v = f32s(&y);
        assert_close(&v[..2], &[-1.5, 2.5], 1e-6);
        let y = instance_norm(1e-5, &x, &s, &b).unwrap();
        assert_close(&f32s(&y)[2..], &[7.0, 7.0], 1e-6);
    }

    #[test]
    fn layer_norm_outputs_and_broadcast() {
        let x = t(&[2, 2], vec![1.0, 3.0, -2.0, 2.0]);
        let s = t(&[2], vec![1.0, 2.0]);
        let b = t(&[2], vec![0.0, 1.0]);
        let outs = layer_norm(-1, 0.0, &x, &s, Some(&b), 3).unwrap();
        assert_eq!(outs.len(), 3);
        assert_close(&f32s(&outs[0]), &[-1.0, 3.0, -1.0, 3.0], 1e-6);
        assert_eq!(outs[1].shape(), &[2, 1]);
        assert_close(&f32s(&outs[1]), &[2.0, 0.0], 1e-6);
        assert_close(&f32s(&outs[2]), &[1.0, 0.5], 1e-6);
        // axis 1 of [2, 2, 2]: normalize 4 values; scale [2] broadcasts to [2, 2].
        let x = t(&[1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let s = t(&[2], vec![1.0, -1.0]);
        let outs = layer_norm(1, 0.0, &x, &s, None, 2).unwrap();
        let inv = 1.0 / 1.25f32.sqrt();
        assert_close(
            &f32s(&outs[0]),
            &[-1.5 * inv, 0.5 * inv, 0.5 * inv, -1.5 * inv],
            1e-6,
        );
        assert_eq!(outs[1].shape(), &[1, 1, 1]);
        assert!(layer_norm(0, 0.0, &x, &t(&[3], vec![1.0; 3]), None, 1).is_err());
        assert!(layer_norm(3, 0.0, &x, &s, None, 1).is_err());
    }

    #[test]
    fn softmax_rows_sum_to_one_with_big_values() {
        let x = t(&[2, 3], vec![1000.0, 1001.0, 1002.0, -5.0, 0.0, 5.0]);
        let y = softmax(&x, -1, false, false).unwrap();
        let v = f32s(&y);
        assert!(v.iter().all(|x| x.is_finite()));
        assert!((v[0..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((v[3..6].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_close(&v[0..3], &[0.09003057, 0.24472848, 0.66524094], 1e-6);
        let l = softmax(&x, 1, false, true).unwrap();
        assert_close(&f32s(&l)[0..3], &[-2.407_606, -1.407_606, -0.407_606], 1e-6);
    }

    #[test]
    fn softmax_middle_axis_and_coerce_2d() {
        let x = t(&[1, 2, 2], vec![0.0, 1.0, 0.0, 3.0]);
        // axis 1: pairs (0,0) and (1,3).
        let y = softmax(&x, 1, false, false).unwrap();
        let e2 = (2.0f32).exp();
        assert_close(
            &f32s(&y),
            &[0.5, 1.0 / (1.0 + e2), 0.5, e2 / (1.0 + e2)],
            1e-6,
        );
        // coerce_2d at axis 1: the whole [2, 2] block is one row.
        let y = softmax(&x, 1, true, false).unwrap();
        let z = 1.0 + 1.0f32.exp() + 1.0 + 3.0f32.exp();
        assert_close(
            &f32s(&y),
            &[1.0 / z, 1.0f32.exp() / z, 1.0 / z, 3.0f32.exp() / z],
            1e-6,
        );
        assert_eq!(
            softmax(&t(&[0, 3], vec![]), -1, false, false)
                .unwrap()
                .shape(),
            &[0, 3]
        );
        assert!(softmax(&x, 3, false, false).is_err());
        let x64 = Tensor::from_vec(vec![2], vec![0.0f64, 0.0]).unwrap();
        assert_eq!(
            softmax(&x64, 0, false, false)
                .unwrap()
                .as_slice::<f64>()
                .unwrap(),
            &[0.5, 0.5]
        );
    }

    /// Random values (scaled to [-scale, scale)) with NaN / +-inf at the given
    /// flat positions.
    fn rand_t(shape: &[usize], seed: u64, scale: f32, specials: &[(usize, f32)]) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = Rng::new(seed)
            .vec(n)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        for &(i, s) in specials {
            if i < n {
                v[i] = s;
            }
        }
        t(shape, v)
    }

    /// Within `rel` relative + `abs` absolute, NaN where the reference is NaN.
    fn assert_near(got: &[f32], want: &[f32], rel: f32, abs: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= rel * w.abs() + abs;
            assert!(ok, "{what}: [{i}] fast {g:e}, reference {w:e}");
        }
    }

    #[test]
    fn fast_softmax_matches_reference() {
        let cases: &[(&[usize], i64, bool)] = &[
            (&[0, 3], -1, false),
            (&[1, 1], -1, false),
            (&[3, 17], -1, false),
            (&[5, 33], 1, false),
            (&[2, 3, 5], 1, false),
            (&[2, 3, 5], 0, false),
            (&[4, 129], 1, true),
            (&[2, 3, 4], 0, true),
            (&[2, 3, 4], 3, true),
            (&[12, 128, 128], -1, false),
            (&[4, 300, 70], 1, false),
            (&[3, 50_257], -1, false),
        ];
        for (k, &(shape, axis, coerce)) in cases.iter().enumerate() {
            // Large logits, and a NaN and an inf in some rows.
            let specials = [(7, f32::NAN), (40, f32::INFINITY), (90, f32::NEG_INFINITY)];
            let x = rand_t(shape, 11 + k as u64, 30.0, &specials);
            for log in [false, true] {
                let op = if log { "LogSoftmax" } else { "Softmax" };
                let got = softmax_fast(op, &x, axis, coerce, log).unwrap();
                let want = softmax_impl::<f32>(op, &x, axis, coerce, log).unwrap();
                assert_eq!(got.shape(), want.shape());
                let what = format!("{op} {shape:?} axis {axis} coerce {coerce}");
                // LogSoftmax's x - (max + ln sum) cancels: its error scales
                // with |max| (logits up to 30 here), i.e. 30 * 2^-23 ~ 4e-6.
                let abs = if log { 8e-6 } else { 1e-7 };
                assert_near(&f32s(&got), &f32s(&want), 2e-6, abs, &what);
            }
        }
        // The public entry point takes the fast path for f32.
        let x = rand_t(&[3, 9], 5, 4.0, &[]);
        assert_eq!(
            f32s(&softmax(&x, -1, false, false).unwrap()),
            f32s(&softmax_fast("Softmax", &x, -1, false, false).unwrap())
        );
    }

    #[test]
    fn fast_layer_norm_matches_reference() {
        let cases: &[(&[usize], i64, &[usize])] = &[
            (&[2, 768], -1, &[768]),
            (&[1, 1], -1, &[1]),
            (&[3, 5, 7], 1, &[5, 7]),
            (&[3, 5, 7], 1, &[7]),
            (&[3, 5, 7], -1, &[1]),
            (&[300, 301], -1, &[301]),
            (&[128, 768], -1, &[768]),
            (&[0, 4], -1, &[4]),
        ];
        for (k, &(shape, axis, pshape)) in cases.iter().enumerate() {
            let x = rand_t(shape, 3 + k as u64, 3.0, &[(5, f32::NAN)]);
            // An offset so the mean is far from zero (cancellation check).
            let x = t(shape, f32s(&x).iter().map(|v| v + 100.0).collect());
            let s = rand_t(pshape, 50 + k as u64, 2.0, &[]);
            let b = rand_t(pshape, 90 + k as u64, 1.0, &[]);
            for bias in [Some(&b), None] {
                let got = layer_norm_fast(axis, 1e-5, &x, &s, bias, 3).unwrap();
                let want = layer_norm_impl::<f32>(axis, 1e-5, &x, &s, bias, 3).unwrap();
                for (o, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.shape(), w.shape());
                    let what = format!("LayerNorm {shape:?} axis {axis} output {o}");
                    assert_near(&f32s(g), &f32s(w), 1e-5, 1e-5, &what);
                }
            }
        }
    }

    /// `cargo test --release -p kiln-cpu --lib norm_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn norm_speed() {
        fn best(f: &mut dyn FnMut()) -> f64 {
            let mut b = f64::INFINITY;
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                f();
                b = b.min(t0.elapsed().as_secs_f64());
            }
            b * 1e6
        }
        let x = rand_t(&[12, 128, 128], 1, 5.0, &[]);
        let fast = best(&mut || drop(softmax_fast("Softmax", &x, -1, false, false).unwrap()));
        let refr =
            best(&mut || drop(softmax_impl::<f32>("Softmax", &x, -1, false, false).unwrap()));
        eprintln!("Softmax [12,128,128]: reference {refr:.0} us, fast {fast:.0} us");
        let x = rand_t(&[128, 768], 2, 5.0, &[]);
        let s = rand_t(&[768], 3, 1.0, &[]);
        let b = rand_t(&[768], 4, 1.0, &[]);
        let fast = best(&mut || drop(layer_norm_fast(-1, 1e-5, &x, &s, Some(&b), 1).unwrap()));
        let refr =
            best(&mut || drop(layer_norm_impl::<f32>(-1, 1e-5, &x, &s, Some(&b), 1).unwrap()));
        eprintln!("LayerNorm [128,768]: reference {refr:.0} us, fast {fast:.0} us");
    }
}
