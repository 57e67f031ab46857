//! Reductions (ReduceSum, ReduceMean, ... over a set of axes) and
//! ArgMax / ArgMin.
//!
//! Float reductions accumulate in f64 (so f32 sums stay well within 1e-6 of
//! numpy) and round once at the end. Integer Sum/Mean/Prod/SumSquare/L1/Max/Min
//! accumulate in i128 with wrapping, which gives exactly the wrapped result of
//! the element type (Mean divides the exact sum, truncating toward zero);
//! L2/LogSum/LogSumExp on ints are computed in f64 and truncated.

use crate::elementwise::{FloatElem, IntElem, Plan};
use crate::util::{i64_values, normalize_axis, tensor};
use crate::{invalid, unsupported, Result};
use kiln_ir::{Op, ReduceOp, Tensor, TensorData};

/// Feeds every element of `v` (shape `shape`) into its output accumulator in
/// `acc`, laid out with shape `keep` (`shape` with the reduced axes set to 1).
fn accumulate<T, A>(
    shape: &[usize],
    keep: &[usize],
    v: &[T],
    acc: &mut [A],
    f: impl Fn(&mut A, &T),
) {
    let plan = Plan::new(shape, [shape, keep]);
    plan.for_each_row(|[ox, oa], n, [sx, sa]| match (sx, sa) {
        (1, 0) => {
            let a = &mut acc[oa];
            for x in &v[ox..ox + n] {
                f(a, x);
            }
        }
        (1, 1) => {
            for (a, x) in acc[oa..oa + n].iter_mut().zip(&v[ox..ox + n]) {
                f(a, x);
            }
        }
        _ => {
            for i in 0..n {
                f(&mut acc[oa + i * sa], &v[ox + i * sx]);
            }
        }
    });
}

/// The geometry of one reduction.
struct Geom<'a> {
    shape: &'a [usize],
    keep: &'a [usize],
    /// Number of outputs.
    n_out: usize,
    /// Number of inputs reduced into each output.
    count: usize,
}

/// Starts every output at `init` and folds its inputs in with `f`.
fn fold<T, A: Clone>(g: &Geom, v: &[T], init: A, f: impl Fn(&mut A, &T)) -> Vec<A> {
    let mut acc = vec![init; g.n_out];
    accumulate(g.shape, g.keep, v, &mut acc, f);
    acc
}

/// `a = max(a, x)` with NaN winning.
fn max_nan(a: &mut f64, x: f64) {
    if x > *a || x.is_nan() {
        *a = x;
    }
}

/// `a = min(a, x)` with NaN winning.
fn min_nan(a: &mut f64, x: f64) {
    if x < *a || x.is_nan() {
        *a = x;
    }
}

/// Any reduction in f64 over `conv`erted elements.
fn reduce_f64<T>(op: ReduceOp, v: &[T], g: &Geom, conv: impl Fn(&T) -> f64) -> Vec<f64> {
    let sum = |a: &mut f64, x: &T| *a += conv(x);
    let sum_sq = |a: &mut f64, x: &T| {
        let x = conv(x);
        *a += x * x;
    };
    match op {
        ReduceOp::Sum => fold(g, v, 0.0, sum),
        ReduceOp::Mean => {
            let n = g.count as f64;
            let mut acc = fold(g, v, 0.0, sum);
            acc.iter_mut().for_each(|a| *a /= n);
            acc
        }
        ReduceOp::Max => fold(g, v, f64::NEG_INFINITY, |a, x| max_nan(a, conv(x))),
        ReduceOp::Min => fold(g, v, f64::INFINITY, |a, x| min_nan(a, conv(x))),
        ReduceOp::Prod => fold(g, v, 1.0, |a, x| *a *= conv(x)),
        ReduceOp::L1 => fold(g, v, 0.0, |a, x| *a += conv(x).abs()),
        ReduceOp::SumSquare => fold(g, v, 0.0, sum_sq),
        ReduceOp::L2 => {
            let mut acc = fold(g, v, 0.0, sum_sq);
            acc.iter_mut().for_each(|a| *a = a.sqrt());
            acc
        }
        ReduceOp::LogSum => {
            let mut acc = fold(g, v, 0.0, sum);
            acc.iter_mut().for_each(|a| *a = a.ln());
            acc
        }
        ReduceOp::LogSumExp => {
            // max + ln(sum(exp(x - max))); an infinite or NaN max is the answer.
            let m = fold(g, v, f64::NEG_INFINITY, |a, x| max_nan(a, conv(x)));
            let mut acc: Vec<(f64, f64)> = m.iter().map(|&m| (m, 0.0)).collect();
            accumulate(g.shape, g.keep, v, &mut acc, |a, x| {
                a.1 += (conv(x) - a.0).exp();
            });
            acc.into_iter()
                .map(|(m, s)| if m.is_finite() { m + s.ln() } else { m })
                .collect()
        }
    }
}

fn reduce_float<S: FloatElem>(op: ReduceOp, v: &[S], g: &Geom) -> Vec<S> {
    reduce_f64(op, v, g, |x| x.to_f64())
        .into_iter()
        .map(S::from_f64)
        .collect()
}

fn reduce_int<I: IntElem>(op: ReduceOp, v: &[I], g: &Geom, name: &str) -> Result<Vec<I>> {
    let run =
        |init: i128, f: fn(i128, i128) -> i128| fold(g, v, init, |a, x| *a = f(*a, x.to_i128()));
    let acc = match op {
        ReduceOp::Sum => fold(g, v, 0i128, |a, x| *a = a.wrapping_add(x.to_i128())),
        ReduceOp::Mean => {
            if g.count == 0 && g.n_out > 0 {
                return Err(invalid!(
                    "{name}: the mean of an empty set is undefined for integer tensors"
                ));
            }
            let acc = fold(g, v, 0i128, |a, x| *a = a.wrapping_add(x.to_i128()));
            let n = g.count as i128;
            acc.into_iter().map(|a| a / n).collect()
        }
        ReduceOp::Max => fold(g, v, I::MIN.to_i128(), |a, x| *a = (*a).max(x.to_i128())),
        ReduceOp::Min => fold(g, v, I::MAX.to_i128(), |a, x| *a = (*a).min(x.to_i128())),
        ReduceOp::Prod => run(1, |a, x| a.wrapping_mul(x)),
        ReduceOp::L1 => run(0, |a, x| a.wrapping_add(x.abs())),
        ReduceOp::SumSquare => run(0, |a, x| a.wrapping_add(x.wrapping_mul(x))),
        ReduceOp::L2 | ReduceOp::LogSum | ReduceOp::LogSumExp => {
            let r = reduce_f64(op, v, g, |x| x.to_f64());
            return Ok(r.into_iter().map(I::from_f64).collect());
        }
    };
    Ok(acc.into_iter().map(I::from_i128).collect())
}

/// Reduces `x` over the axes in the optional `axes` input (i64, negative
/// allowed, no duplicates). No axes: all axes, or none when
/// `noop_with_empty_axes` (then every output is the op over one element, so Sum,
/// Mean, Max, Min and Prod are the identity and SumSquare squares, as in the
/// ONNX reference). Empty reductions give Sum 0, Prod 1, Max the lowest value,
/// Min the highest, float Mean NaN, LogSum / LogSumExp -inf.
pub fn reduce(
    op: ReduceOp,
    x: &Tensor,
    axes: Option<&Tensor>,
    keepdims: bool,
    noop: bool,
) -> Result<Tensor> {
    let name = Op::Reduce {
        op,
        keepdims,
        noop_with_empty_axes: noop,
    }
    .name();
    let shape = x.shape();
    let rank = shape.len();
    let list = match axes {
        Some(t) => i64_values(t, &format!("{name} axes"))?,
        None => Vec::new(),
    };
    let mut reduced = vec![!noop; rank];
    if !list.is_empty() {
        reduced.fill(false);
        for &a in &list {
            let ax = normalize_axis(a, rank).map_err(|e| invalid!("{name}: {e}"))?;
            if reduced[ax] {
                return Err(invalid!(
                    "{name}: axis {a} appears more than once in axes {list:?}"
                ));
            }
            reduced[ax] = true;
        }
    }
    let dtype = x.dtype();
    let identity = matches!(
        op,
        ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min | ReduceOp::Prod
    );
    if identity && !reduced.contains(&true) && dtype.is_numeric() {
        return Ok(x.clone());
    }
    let keep: Vec<usize> = shape
        .iter()
        .zip(&reduced)
        .map(|(&d, &r)| if r { 1 } else { d })
        .collect();
    let out_shape: Vec<usize> = if keepdims {
        keep.clone()
    } else {
        shape
            .iter()
            .zip(&reduced)
            .filter(|(_, &r)| !r)
            .map(|(&d, _)| d)
            .collect()
    };
    let n_out: usize = keep.iter().product();
    let g = Geom {
        shape,
        keep: &keep,
        n_out,
        count: x.len().checked_div(n_out).unwrap_or(0),
    };
    if let TensorData::F32(v) = x.data() {
        if let Some(r) = reduce_f32_fast(op, v, shape, &reduced, g.count) {
            return tensor(out_shape, TensorData::F32(r));
        }
    }
    let data = match x.data() {
        TensorData::F32(v) => TensorData::F32(reduce_float(op, v, &g)),
        TensorData::F64(v) => TensorData::F64(reduce_float(op, v, &g)),
        TensorData::F16(v) => TensorData::F16(reduce_float(op, v, &g)),
        TensorData::BF16(v) => TensorData::BF16(reduce_float(op, v, &g)),
        TensorData::I8(v) => TensorData::I8(reduce_int(op, v, &g, name)?),
        TensorData::I16(v) => TensorData::I16(reduce_int(op, v, &g, name)?),
        TensorData::I32(v) => TensorData::I32(reduce_int(op, v, &g, name)?),
        TensorData::I64(v) => TensorData::I64(reduce_int(op, v, &g, name)?),
        TensorData::U8(v) => TensorData::U8(reduce_int(op, v, &g, name)?),
        TensorData::U16(v) => TensorData::U16(reduce_int(op, v, &g, name)?),
        TensorData::U32(v) => TensorData::U32(reduce_int(op, v, &g, name)?),
        TensorData::U64(v) => TensorData::U64(reduce_int(op, v, &g, name)?),
        // ReduceMax / ReduceMin on bool (opset 20): any / all.
        TensorData::Bool(v) if matches!(op, ReduceOp::Max | ReduceOp::Min) => {
            let bytes: Vec<u8> = v.iter().map(|&b| u8::from(b)).collect();
            let r = reduce_int(op, &bytes, &g, name)?;
            TensorData::Bool(r.into_iter().map(|b| b != 0).collect())
        }
        TensorData::Bool(_) | TensorData::String(_) | TensorData::Bits(..) => {
            return Err(unsupported!("{name} on {dtype} tensors"))
        }
    };
    tensor(out_shape, data)
}

/// Sum / Mean / Max / Min of f32 data whose reduced axes form one contiguous
/// block of the layout (size-1 axes ignored): the data is `[outer, count,
/// inner]` and each output is one row (`inner == 1`) or one column of a
/// `[count, inner]` block. Sums accumulate in f64 like the reference, in
/// independent lanes so the loops vectorize; Max/Min let NaN win. Large inputs
/// run their outer blocks in parallel. `None` for every other case (the
/// reference handles it).
fn reduce_f32_fast(
    op: ReduceOp,
    v: &[f32],
    shape: &[usize],
    reduced: &[bool],
    count: usize,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if !matches!(
        op,
        ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min
    ) || count == 0
        || v.is_empty()
    {
        return None;
    }
    // The reduced axes of size > 1 must be adjacent.
    let big: Vec<usize> = (0..shape.len())
        .filter(|&i| reduced[i] && shape[i] > 1)
        .collect();
    let (first, last) = match (big.first(), big.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return None,
    };
    if (first..=last).any(|i| !reduced[i] && shape[i] > 1) {
        return None;
    }
    let inner: usize = shape[last + 1..].iter().product();
    let outer = v.len() / (count * inner);
    let mut out = vec![0.0f32; outer * inner];
    let block = count * inner;
    let mean = op == ReduceOp::Mean;
    let is_max = op == ReduceOp::Max;
    // One output row of `inner` values from one [count, inner] block.
    let one = |src: &[f32], dst: &mut [f32]| {
        crate::fastmath::simd(
            #[inline(always)]
            || match op {
                ReduceOp::Sum | ReduceOp::Mean if inner == 1 => {
                    let s = crate::fastmath::sum_f64(src);
                    dst[0] = if mean {
                        (s / count as f64) as f32
                    } else {
                        s as f32
                    };
                }
                ReduceOp::Sum | ReduceOp::Mean => {
                    let mut acc = vec![0.0f64; inner];
                    for row in src.chunks_exact(inner) {
                        for (a, &x) in acc.iter_mut().zip(row) {
                            *a += x as f64;
                        }
                    }
                    for (d, a) in dst.iter_mut().zip(acc) {
                        *d = if mean {
                            (a / count as f64) as f32
                        } else {
                            a as f32
                        };
                    }
                }
                _ if inner == 1 => {
                    let mut m = [if is_max {
                        f32::NEG_INFINITY
                    } else {
                        f32::INFINITY
                    }; 16];
                    let mut nan = false;
                    let mut chunks = src.chunks_exact(16);
                    for c in &mut chunks {
                        for i in 0..16 {
                            let x = c[i];
                            nan |= x.is_nan();
                            let better = if is_max { x > m[i] } else { x < m[i] };
                            m[i] = if better { x } else { m[i] };
                        }
                    }
                    let mut r = m[0];
                    for &x in m[1..].iter().chain(chunks.remainder()) {
                        nan |= x.is_nan();
                        let better = if is_max { x > r } else { x < r };
                        r = if better { x } else { r };
                    }
                    dst[0] = if nan { f32::NAN } else { r };
                }
                _ => {
                    dst.copy_from_slice(&src[..inner]);
                    for row in src.chunks_exact(inner).skip(1) {
                        for (a, &x) in dst.iter_mut().zip(row) {
                            let better = if is_max { x > *a } else { x < *a };
                            *a = if better || x.is_nan() { x } else { *a };
                        }
                    }
                }
            },
        )
    };
    if v.len() < crate::fastmath::PAR_MIN || outer < 2 {
        for (src, dst) in v.chunks_exact(block).zip(out.chunks_exact_mut(inner)) {
            one(src, dst);
        }
    } else {
        out.par_chunks_mut(inner)
            .zip(v.par_chunks(block))
            .with_min_len((crate::fastmath::PAR_CHUNK / block).max(1))
            .for_each(|(dst, src)| one(src, dst));
    }
    Some(out)
}

/// Index along the axis of the best element for every other position.
/// NaN beats every number (like numpy); ties keep the first index unless
/// `last`.
fn arg_scan<T: Copy + PartialOrd>(
    v: &[T],
    (outer, n, inner): (usize, usize, usize),
    last: bool,
    is_max: bool,
    is_nan: impl Fn(T) -> bool,
) -> Vec<i64> {
    let mut out = vec![0i64; outer * inner];
    if n == 0 || inner == 0 {
        return out;
    }
    let mut best: Vec<T> = Vec::with_capacity(inner);
    for (o, idx) in out.chunks_mut(inner).enumerate() {
        let base = o * n * inner;
        best.clear();
        best.extend_from_slice(&v[base..base + inner]);
        for k in 1..n {
            let row = &v[base + k * inner..base + (k + 1) * inner];
            for ((&x, b), id) in row.iter().zip(best.iter_mut()).zip(idx.iter_mut()) {
                let take = if is_nan(*b) {
                    last && is_nan(x)
                } else if is_nan(x) {
                    true
                } else if is_max {
                    if last {
                        x >= *b
                    } else {
                        x > *b
                    }
                } else if last {
                    x <= *b
                } else {
                    x < *b
                };
                if take {
                    *b = x;
                    *id = k as i64;
                }
            }
        }
    }
    out
}

/// ArgMax (`is_max`) or ArgMin along `axis`, as i64 indices.
pub fn arg_extreme(
    x: &Tensor,
    axis: i64,
    keepdims: bool,
    last: bool,
    is_max: bool,
) -> Result<Tensor> {
    let name = if is_max { "ArgMax" } else { "ArgMin" };
    let shape = x.shape();
    let ax = normalize_axis(axis, shape.len()).map_err(|e| invalid!("{name}: {e}"))?;
    let outer: usize = shape[..ax].iter().product();
    let n = shape[ax];
    let inner: usize = shape[ax + 1..].iter().product();
    if n == 0 && outer * inner > 0 {
        return Err(invalid!(
            "{name}: axis {axis} of shape {shape:?} is empty, so there is no element to pick"
        ));
    }
    let mut out_shape = shape.to_vec();
    if keepdims {
        out_shape[ax] = 1;
    } else {
        out_shape.remove(ax);
    }
    let dims = (outer, n, inner);
    let idx = match x.data() {
        TensorData::F32(v) => arg_scan(v, dims, last, is_max, f32::is_nan),
        TensorData::F64(v) => arg_scan(v, dims, last, is_max, f64::is_nan),
        TensorData::F16(v) => arg_scan(v, dims, last, is_max, |h: half::f16| h.is_nan()),
        TensorData::BF16(v) => arg_scan(v, dims, last, is_max, |h: half::bf16| h.is_nan()),
        TensorData::I8(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::I16(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::I32(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::I64(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::U8(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::U16(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::U32(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::U64(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::Bool(v) => arg_scan(v, dims, last, is_max, |_| false),
        TensorData::String(_) | TensorData::Bits(..) => {
            return Err(unsupported!("{name} on {} tensors", x.dtype()))
        }
    };
    tensor(out_shape, TensorData::I64(idx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelError;
    use half::f16;
    use kiln_ir::Element;

    fn t<T: Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn vals<T: Element>(x: &Tensor) -> Vec<T> {
        x.as_slice::<T>().unwrap().to_vec()
    }

    fn axes(a: &[i64]) -> Tensor {
        Tensor::vector(a.to_vec())
    }

    fn red(op: ReduceOp, x: &Tensor, a: Option<&[i64]>, keepdims: bool) -> Tensor {
        let ax = a.map(axes);
        reduce(op, x, ax.as_ref(), keepdims, false).unwrap()
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g as f64, *w, 1e-6), "got {got:?}, want {want:?}");
        }
    }

    fn is_invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(KernelError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// [[1, 2, 3], [4, 5, 6]]
    fn m23() -> Tensor {
        t(&[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])
    }

    #[test]
    fn sum_axes_and_keepdims() {
        let x = m23();
        let y = red(ReduceOp::Sum, &x, Some(&[1]), true);
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(vals::<f32>(&y), [6.0, 15.0]);
        let y = red(ReduceOp::Sum, &x, Some(&[1]), false);
        assert_eq!(y.shape(), &[2]);
        let y = red(ReduceOp::Sum, &x, Some(&[0]), false);
        assert_eq!(y.shape(), &[3]);
        assert_eq!(vals::<f32>(&y), [5.0, 7.0, 9.0]);
        let y = red(ReduceOp::Sum, &x, Some(&[-2]), true);
        assert_eq!(y.shape(), &[1, 3]);
        assert_eq!(vals::<f32>(&y), [5.0, 7.0, 9.0]);
        // No axes: everything.
        let y = red(ReduceOp::Sum, &x, None, true);
        assert_eq!(y.shape(), &[1, 1]);
        assert_eq!(vals::<f32>(&y), [21.0]);
        let y = red(ReduceOp::Sum, &x, Some(&[]), false);
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(vals::<f32>(&y), [21.0]);
        let y = red(ReduceOp::Sum, &x, Some(&[0, -1]), false);
        assert_eq!(vals::<f32>(&y), [21.0]);
    }

    #[test]
    fn noop_with_empty_axes() {
        let x = m23();
        let y = reduce(ReduceOp::Sum, &x, None, true, true).unwrap();
        assert_eq!(y, x);
        let y = reduce(ReduceOp::Max, &x, Some(&axes(&[])), false, true).unwrap();
        assert_eq!(y, x);
        // Reducing over no axes applies the per-element part of the op.
        let y = reduce(ReduceOp::SumSquare, &x, None, false, true).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(vals::<f32>(&y), [1.0, 4.0, 9.0, 16.0, 25.0, 36.0]);
        // Explicit axes win over noop.
        let y = reduce(ReduceOp::Sum, &x, Some(&axes(&[0])), false, true).unwrap();
        assert_eq!(vals::<f32>(&y), [5.0, 7.0, 9.0]);
    }

    #[test]
    fn axis_errors() {
        let x = m23();
        let m = is_invalid(reduce(
            ReduceOp::Sum,
            &x,
            Some(&axes(&[1, -1])),
            true,
            false,
        ));
        assert!(
            m.contains("more than once") && m.contains("ReduceSum"),
            "{m}"
        );
        let m = is_invalid(reduce(ReduceOp::Mean, &x, Some(&axes(&[2])), true, false));
        assert!(
            m.contains("ReduceMean") && m.contains("out of range"),
            "{m}"
        );
        let s = Tensor::vector(vec!["a".to_string()]);
        match reduce(ReduceOp::Sum, &s, None, true, false) {
            Err(KernelError::Unsupported(m)) => assert_eq!(m, "ReduceSum on string tensors"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_op_on_floats() {
        let x = t(&[2, 2], vec![1.0f32, -2.0, 3.0, 4.0]);
        let r = |op| vals::<f32>(&red(op, &x, Some(&[1]), false));
        assert_eq!(r(ReduceOp::Sum), [-1.0, 7.0]);
        assert_eq!(r(ReduceOp::Mean), [-0.5, 3.5]);
        assert_eq!(r(ReduceOp::Max), [1.0, 4.0]);
        assert_eq!(r(ReduceOp::Min), [-2.0, 3.0]);
        assert_eq!(r(ReduceOp::Prod), [-2.0, 12.0]);
        assert_eq!(r(ReduceOp::L1), [3.0, 7.0]);
        assert_eq!(r(ReduceOp::SumSquare), [5.0, 25.0]);
        assert_close(&r(ReduceOp::L2), &[5f64.sqrt(), 5.0]);
        let p = t(&[2, 2], vec![1.0f32, 2.0, 3.0, 4.0]);
        assert_close(
            &vals::<f32>(&red(ReduceOp::LogSum, &p, Some(&[1]), false)),
            &[3f64.ln(), 7f64.ln()],
        );
        assert_close(
            &vals::<f32>(&red(ReduceOp::LogSumExp, &p, Some(&[1]), false)),
            &[
                (1f64.exp() + 2f64.exp()).ln(),
                (3f64.exp() + 4f64.exp()).ln(),
            ],
        );
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let x = Tensor::vector(vec![1000.0f32, 1000.0]);
        let y = red(ReduceOp::LogSumExp, &x, None, false);
        assert_close(&vals::<f32>(&y), &[1000.0 + 2f64.ln()]);
        let x = Tensor::vector(vec![-1000.0f32, -1000.0]);
        assert_close(
            &vals::<f32>(&red(ReduceOp::LogSumExp, &x, None, false)),
            &[-1000.0 + 2f64.ln()],
        );
        let x = Tensor::vector(vec![f32::INFINITY, 1.0]);
        assert_eq!(
            vals::<f32>(&red(ReduceOp::LogSumExp, &x, None, false)),
            [f32::INFINITY]
        );
        let x = Tensor::vector(vec![f32::NEG_INFINITY, f32::NEG_INFINITY]);
        assert_eq!(
            vals::<f32>(&red(ReduceOp::LogSumExp, &x, None, false)),
            [f32::NEG_INFINITY]
        );
    }

    #[test]
    fn nan_propagates_through_max_min() {
        let x = t(&[2, 2], vec![f32::NAN, 1.0, 2.0, 3.0]);
        let y = vals::<f32>(&red(ReduceOp::Max, &x, Some(&[1]), false));
        assert!(y[0].is_nan() && y[1] == 3.0);
        let y = vals::<f32>(&red(ReduceOp::Min, &x, Some(&[1]), false));
        assert!(y[0].is_nan() && y[1] == 2.0);
        let x = Tensor::vector(vec![1.0f32, f32::NAN, 0.0]);
        assert!(vals::<f32>(&red(ReduceOp::Max, &x, None, false))[0].is_nan());
    }

    #[test]
    fn empty_reductions() {
        let x = Tensor::from_vec(vec![2, 0], Vec::<f32>::new()).unwrap();
        let r = |op| red(op, &x, Some(&[1]), true);
        assert_eq!(r(ReduceOp::Sum).shape(), &[2, 1]);
        assert_eq!(vals::<f32>(&r(ReduceOp::Sum)), [0.0, 0.0]);
        assert_eq!(vals::<f32>(&r(ReduceOp::Prod)), [1.0, 1.0]);
        assert_eq!(vals::<f32>(&r(ReduceOp::Max)), [f32::NEG_INFINITY; 2]);
        assert_eq!(vals::<f32>(&r(ReduceOp::Min)), [f32::INFINITY; 2]);
        assert!(vals::<f32>(&r(ReduceOp::Mean)).iter().all(|v| v.is_nan()));
        assert_eq!(vals::<f32>(&r(ReduceOp::L2)), [0.0, 0.0]);
        assert_eq!(vals::<f32>(&r(ReduceOp::SumSquare)), [0.0, 0.0]);
        assert_eq!(vals::<f32>(&r(ReduceOp::LogSum)), [f32::NEG_INFINITY; 2]);
        assert_eq!(vals::<f32>(&r(ReduceOp::LogSumExp)), [f32::NEG_INFINITY; 2]);
        // Reducing the non-empty axis leaves an empty output.
        let y = red(ReduceOp::Sum, &x, Some(&[0]), true);
        assert_eq!(y.shape(), &[1, 0]);
        assert!(y.is_empty());
        let y = red(ReduceOp::Mean, &x, Some(&[0]), false);
        assert_eq!(y.shape(), &[0]);
        // Everything.
        assert_eq!(vals::<f32>(&red(ReduceOp::Sum, &x, None, false)), [0.0]);
        let i = Tensor::from_vec(vec![0, 2], Vec::<i32>::new()).unwrap();
        assert_eq!(
            vals::<i32>(&red(ReduceOp::Max, &i, Some(&[0]), false)),
            [i32::MIN; 2]
        );
        assert_eq!(
            vals::<i32>(&red(ReduceOp::Min, &i, Some(&[0]), false)),
            [i32::MAX; 2]
        );
        assert_eq!(
            vals::<i32>(&red(ReduceOp::Prod, &i, Some(&[0]), false)),
            [1, 1]
        );
        let m = is_invalid(reduce(ReduceOp::Mean, &i, Some(&axes(&[0])), false, false));
        assert!(m.contains("empty"), "{m}");
    }

    #[test]
    fn integer_reductions() {
        let x = t(&[2, 3], vec![1i32, -2, 3, -4, 5, -7]);
        let r = |op| vals::<i32>(&red(op, &x, Some(&[1]), false));
        assert_eq!(r(ReduceOp::Sum), [2, -6]);
        assert_eq!(r(ReduceOp::Mean), [0, -2]); // 2/3 -> 0, -6/3 -> -2
        assert_eq!(r(ReduceOp::Max), [3, 5]);
        assert_eq!(r(ReduceOp::Min), [-2, -7]);
        assert_eq!(r(ReduceOp::Prod), [-6, 140]);
        assert_eq!(r(ReduceOp::L1), [6, 16]);
        assert_eq!(r(ReduceOp::SumSquare), [14, 90]);
        assert_eq!(r(ReduceOp::L2), [3, 9]); // sqrt(14) = 3.74, sqrt(90) = 9.49
        let m = t(&[2], vec![-1i64, -2]);
        assert_eq!(vals::<i64>(&red(ReduceOp::Mean, &m, None, false)), [-1]);
        // Wrapping like the element type.
        let w = Tensor::vector(vec![100i8, 100]);
        assert_eq!(vals::<i8>(&red(ReduceOp::Sum, &w, None, false)), [-56]);
        assert_eq!(vals::<i8>(&red(ReduceOp::Mean, &w, None, false)), [100]);
        let u = Tensor::vector(vec![u64::MAX, 1]);
        assert_eq!(vals::<u64>(&red(ReduceOp::Sum, &u, None, false)), [0]);
        assert_eq!(
            vals::<u64>(&red(ReduceOp::Max, &u, None, false)),
            [u64::MAX]
        );
        let l = Tensor::vector(vec![3i64, 4]);
        assert_eq!(vals::<i64>(&red(ReduceOp::L2, &l, None, false)), [5]);
    }

    #[test]
    fn half_and_bool() {
        let h = Tensor::vector(vec![f16::from_f32(1.5), f16::from_f32(2.5)]);
        let y = red(ReduceOp::Sum, &h, None, false);
        assert_eq!(vals::<f16>(&y), [f16::from_f32(4.0)]);
        let y = red(ReduceOp::Mean, &h, None, true);
        assert_eq!(y.shape(), &[1]);
        assert_eq!(vals::<f16>(&y), [f16::from_f32(2.0)]);
        let b = t(&[2, 2], vec![true, false, false, false]);
        assert_eq!(
            vals::<bool>(&red(ReduceOp::Max, &b, Some(&[1]), false)),
            [true, false]
        );
        assert_eq!(
            vals::<bool>(&red(ReduceOp::Min, &b, Some(&[1]), false)),
            [false, false]
        );
        assert!(matches!(
            reduce(ReduceOp::Sum, &b, None, false, false),
            Err(KernelError::Unsupported(_))
        ));
    }

    #[test]
    fn scalar_and_size_one_dims() {
        let s = Tensor::scalar(3.0f32);
        let y = red(ReduceOp::SumSquare, &s, None, true);
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(vals::<f32>(&y), [9.0]);
        let y = red(ReduceOp::Sum, &s, None, false);
        assert_eq!(vals::<f32>(&y), [3.0]);
        let x = t(&[1, 3, 1], vec![1.0f32, 2.0, 3.0]);
        let y = red(ReduceOp::Sum, &x, Some(&[0, 2]), false);
        assert_eq!(y.shape(), &[3]);
        assert_eq!(vals::<f32>(&y), [1.0, 2.0, 3.0]);
        let y = red(ReduceOp::Max, &x, Some(&[1]), true);
        assert_eq!(y.shape(), &[1, 1, 1]);
        assert_eq!(vals::<f32>(&y), [3.0]);
    }

    #[test]
    fn matches_naive_reference_for_every_axis_subset() {
        let shape = [2usize, 3, 4];
        let data: Vec<f64> = (0..24).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
        let x = t(&shape, data.clone());
        for mask in 0u32..8 {
            let ax: Vec<i64> = (0..3)
                .filter(|a| mask & (1 << a) != 0)
                .map(|a| a as i64)
                .collect();
            if ax.is_empty() {
                continue;
            }
            let keep: Vec<usize> = (0..3)
                .map(|d| if mask & (1 << d) != 0 { 1 } else { shape[d] })
                .collect();
            let n_out: usize = keep.iter().product();
            let mut want = vec![0.0f64; n_out];
            let mut want_max = vec![f64::NEG_INFINITY; n_out];
            for i in 0..2 {
                for j in 0..3 {
                    for k in 0..4 {
                        let v = data[(i * 3 + j) * 4 + k];
                        let idx = [i, j, k];
                        let o = (0..3).fold(0, |acc, d| {
                            acc * keep[d] + if keep[d] == 1 { 0 } else { idx[d] }
                        });
                        want[o] += v;
                        want_max[o] = want_max[o].max(v);
                    }
                }
            }
            let y = red(ReduceOp::Sum, &x, Some(&ax), true);
            assert_eq!(y.shape(), &keep[..]);
            assert_eq!(vals::<f64>(&y), want, "axes {ax:?}");
            let y = red(ReduceOp::Max, &x, Some(&ax), true);
            assert_eq!(vals::<f64>(&y), want_max, "axes {ax:?}");
        }
    }

    #[test]
    fn f32_sum_is_accumulated_precisely() {
        let n = 1_000_000;
        let x = Tensor::vector(vec![0.1f32; n]);
        let y = vals::<f32>(&red(ReduceOp::Sum, &x, None, false))[0];
        assert_eq!(y, (0.1f32 as f64 * n as f64) as f32);
        let y = vals::<f32>(&red(ReduceOp::Mean, &x, None, false))[0];
        assert_eq!(y, 0.1f32);
    }

    // --- ArgMax / ArgMin ------------------------------------------------------

    #[test]
    fn argmax_argmin_basics() {
        let x = t(&[2, 3], vec![1.0f32, 5.0, 5.0, 7.0, 2.0, 0.0]);
        let y = arg_extreme(&x, 1, true, false, true).unwrap();
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(vals::<i64>(&y), [1, 0]);
        let y = arg_extreme(&x, -1, false, true, true).unwrap();
        assert_eq!(y.shape(), &[2]);
        assert_eq!(vals::<i64>(&y), [2, 0]);
        let y = arg_extreme(&x, 0, false, false, false).unwrap();
        assert_eq!(y.shape(), &[3]);
        assert_eq!(vals::<i64>(&y), [0, 1, 1]);
        let y = arg_extreme(&x, 1, false, false, false).unwrap();
        assert_eq!(vals::<i64>(&y), [0, 2]);
        let tie = Tensor::vector(vec![3i32, 1, 3, 1]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&tie, 0, false, false, true).unwrap()),
            [0]
        );
        assert_eq!(
            vals::<i64>(&arg_extreme(&tie, 0, false, true, true).unwrap()),
            [2]
        );
        assert_eq!(
            vals::<i64>(&arg_extreme(&tie, 0, false, false, false).unwrap()),
            [1]
        );
        assert_eq!(
            vals::<i64>(&arg_extreme(&tie, 0, true, true, false).unwrap()),
            [3]
        );
        let u = t(&[1, 3], vec![0u8, 255, 7]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&u, 1, false, false, true).unwrap()),
            [1]
        );
        let h = Tensor::vector(vec![f16::from_f32(-1.0), f16::from_f32(-3.0)]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&h, 0, false, false, false).unwrap()),
            [1]
        );
    }

    #[test]
    fn arg_nan_wins() {
        let x = Tensor::vector(vec![1.0f64, f64::NAN, 9.0, f64::NAN]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&x, 0, false, false, true).unwrap()),
            [1]
        );
        assert_eq!(
            vals::<i64>(&arg_extreme(&x, 0, false, false, false).unwrap()),
            [1]
        );
        assert_eq!(
            vals::<i64>(&arg_extreme(&x, 0, false, true, true).unwrap()),
            [3]
        );
        let y = Tensor::vector(vec![f32::NAN, 2.0]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&y, 0, false, false, true).unwrap()),
            [0]
        );
    }

    #[test]
    fn arg_edge_cases() {
        let e = Tensor::from_vec(vec![0, 3], Vec::<f32>::new()).unwrap();
        let m = is_invalid(arg_extreme(&e, 0, true, false, true));
        assert!(m.contains("ArgMax") && m.contains("empty"), "{m}");
        let y = arg_extreme(&e, 1, true, false, false).unwrap();
        assert_eq!(y.shape(), &[0, 1]);
        assert!(
            is_invalid(arg_extreme(&Tensor::scalar(1.0f32), 0, true, false, true))
                .contains("ArgMax")
        );
        assert!(arg_extreme(&e, 2, true, false, true).is_err());
        let s = Tensor::vector(vec!["a".to_string()]);
        assert!(matches!(
            arg_extreme(&s, 0, true, false, true),
            Err(KernelError::Unsupported(_))
        ));
        // Size-1 axis: always index 0.
        let x = t(&[3, 1], vec![4i64, 5, 6]);
        assert_eq!(
            vals::<i64>(&arg_extreme(&x, 1, false, false, true).unwrap()),
            [0, 0, 0]
        );
    }

    #[test]
    fn fast_f32_reduce_matches_reference() {
        // Deterministic values with a NaN in some rows.
        let make = |shape: &[usize], nan_at: Option<usize>| {
            let n: usize = shape.iter().product();
            let mut v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 + 13) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            if let Some(k) = nan_at {
                if k < n {
                    v[k] = f32::NAN;
                }
            }
            t(shape, v)
        };
        let cases: &[(&[usize], &[i64])] = &[
            (&[3, 17], &[1]),
            (&[3, 17], &[0]),
            (&[2, 3, 5], &[1]),
            (&[2, 3, 5], &[1, 2]),
            (&[2, 3, 5], &[0, 1]),
            (&[2, 1, 3, 5], &[1, 2]),
            (&[1, 2048, 7, 7], &[2, 3]),
            (&[128, 3072], &[-1]),
            (&[300, 301], &[0]),
            (&[1, 1], &[1]),
            (&[4, 1, 6], &[1]),
            (&[2, 3, 4], &[0, 2]),
            (&[5, 0, 3], &[1]),
        ];
        for &(shape, ax) in cases {
            for nan in [None, Some(4)] {
                let x = make(shape, nan);
                for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                    for keep in [true, false] {
                        let got = red(op, &x, Some(ax), keep);
                        // The reference: the generic f64 path.
                        let want = {
                            let shape = x.shape();
                            let mut reduced = vec![false; shape.len()];
                            for &a in ax {
                                reduced[normalize_axis(a, shape.len()).unwrap()] = true;
                            }
                            let kp: Vec<usize> = shape
                                .iter()
                                .zip(&reduced)
                                .map(|(&d, &r)| if r { 1 } else { d })
                                .collect();
                            let n_out: usize = kp.iter().product();
                            let g = Geom {
                                shape,
                                keep: &kp,
                                n_out,
                                count: x.len().checked_div(n_out).unwrap_or(0),
                            };
                            reduce_float(op, x.as_slice::<f32>().unwrap(), &g)
                        };
                        let got_v = vals::<f32>(&got);
                        assert_eq!(got_v.len(), want.len(), "{op:?} {shape:?} {ax:?}");
                        for (g, w) in got_v.iter().zip(&want) {
                            assert!(
                                close(*g as f64, *w as f64, 1e-6),
                                "{op:?} {shape:?} axes {ax:?}: fast {got_v:?} reference {want:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
