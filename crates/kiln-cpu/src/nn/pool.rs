//! MaxPool, AveragePool and the global pools, N-D.

use super::conv::resolve_window;
use super::{float_prec, float_tensor, numel, values, Prec, Real};
use crate::util::{strides, tensor};
use crate::{invalid, Result};
use kiln_ir::{DType, PoolAttrs, Tensor, TensorData};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Max,
    Avg,
}

/// Output of the generic pool: shape, values, and (max pool) flat indices.
type Pooled<T> = (Vec<usize>, Vec<T>, Option<Vec<i64>>);

fn pool_impl<T: Real>(
    op: &str,
    a: &PoolAttrs,
    x: &Tensor,
    kind: Kind,
    want_indices: bool,
) -> Result<Pooled<T>> {
    let xs = x.shape();
    if xs.len() < 3 {
        return Err(invalid!(
            "{op} expects X of rank >= 3 [N, C, spatial...], got {xs:?}"
        ));
    }
    let in_sp = &xs[2..];
    let nsp = in_sp.len();
    if a.kernel_shape.len() != nsp {
        return Err(invalid!(
            "{op}: kernel_shape {:?} must have one entry per spatial axis of X {xs:?}",
            a.kernel_shape
        ));
    }
    let ceil = a.ceil_mode && a.auto_pad == kiln_ir::AutoPad::NotSet;
    let win = resolve_window(
        op,
        in_sp,
        &a.kernel_shape,
        &a.strides,
        &a.dilations,
        &a.pads,
        a.auto_pad,
        ceil,
    )?;
    // Per axis and output position: the in-bounds input indices of the window,
    // and how many of its taps lie inside the padded extent.
    let mut valid: Vec<Vec<Vec<usize>>> = Vec::with_capacity(nsp);
    let mut padded: Vec<Vec<usize>> = Vec::with_capacity(nsp);
    for (ax, &len) in in_sp.iter().enumerate() {
        let (len, pb, pe) = (
            len as isize,
            win.pad_begin[ax] as isize,
            win.pad_end[ax] as isize,
        );
        let mut v_ax = Vec::with_capacity(win.out[ax]);
        let mut p_ax = Vec::with_capacity(win.out[ax]);
        for o in 0..win.out[ax] {
            let start = (o * win.strides[ax]) as isize - pb;
            let mut v = Vec::with_capacity(win.kernel[ax]);
            let mut cnt = 0;
            for j in 0..win.kernel[ax] {
                let p = start + (j * win.dilations[ax]) as isize;
                if p >= 0 && p < len {
                    v.push(p as usize);
                }
                if p >= -pb && p < len + pe {
                    cnt += 1;
                }
            }
            v_ax.push(v);
            p_ax.push(cnt);
        }
        valid.push(v_ax);
        padded.push(p_ax);
    }
    let (n, c) = (xs[0], xs[1]);
    let mut out_shape = vec![n, c];
    out_shape.extend_from_slice(&win.out);
    let out_n = numel(&win.out)?;
    let in_n = numel(in_sp)?;
    let total = numel(&out_shape)?;
    let mut y = vec![T::ZERO; total];
    let mut ind = if want_indices {
        Some(vec![0i64; total])
    } else {
        None
    };
    if total == 0 {
        return Ok((out_shape, y, ind));
    }
    let xv = values::<T>(x, op)?;
    let in_str = strides(in_sp);
    // Every output position's window as in-plane offsets (CSR layout), plus
    // the average's divisor.
    let mut offsets: Vec<usize> = Vec::new();
    let mut starts: Vec<usize> = Vec::with_capacity(out_n + 1);
    let mut divisors: Vec<T> = Vec::with_capacity(out_n);
    let mut oidx = vec![0usize; nsp];
    let mut tap = vec![0usize; nsp];
    for o_flat in 0..out_n {
        if o_flat > 0 {
            for ax in (0..nsp).rev() {
                oidx[ax] += 1;
                if oidx[ax] < win.out[ax] {
                    break;
                }
                oidx[ax] = 0;
            }
        }
        starts.push(offsets.len());
        let lists: Vec<&[usize]> = (0..nsp).map(|ax| &valid[ax][oidx[ax]][..]).collect();
        let count: usize = if a.count_include_pad {
            (0..nsp).map(|ax| padded[ax][oidx[ax]]).product()
        } else {
            lists.iter().map(|l| l.len()).product()
        };
        divisors.push(T::from_f64(count as f64));
        if lists.iter().any(|l| l.is_empty()) {
            continue;
        }
        tap.iter_mut().for_each(|t| *t = 0);
        'taps: loop {
            offsets.push((0..nsp).map(|ax| lists[ax][tap[ax]] * in_str[ax]).sum());
            for ax in (0..nsp).rev() {
                tap[ax] += 1;
                if tap[ax] < lists[ax].len() {
                    continue 'taps;
                }
                tap[ax] = 0;
            }
            break;
        }
    }
    starts.push(offsets.len());
    for (plane, (yp, xp)) in y
        .chunks_exact_mut(out_n)
        .zip(xv.chunks_exact(in_n.max(1)))
        .enumerate()
    {
        let base = plane * in_n;
        for (o, yv) in yp.iter_mut().enumerate() {
            let win_offs = &offsets[starts[o]..starts[o + 1]];
            match kind {
                Kind::Max => {
                    let mut best = T::NEG_INFINITY;
                    let mut best_i = win_offs.first().copied().unwrap_or(0);
                    for &off in win_offs {
                        let v = xp[off];
                        if v > best {
                            best = v;
                            best_i = off;
                        }
                    }
                    *yv = best;
                    if let Some(ind) = ind.as_mut() {
                        ind[plane * out_n + o] = (base + best_i) as i64;
                    }
                }
                Kind::Avg => {
                    let mut sum = T::ZERO;
                    for &off in win_offs {
                        sum += xp[off];
                    }
                    *yv = sum / divisors[o];
                }
            }
        }
    }
    Ok((out_shape, y, ind))
}

/// MaxPool; a second output (when `num_outputs > 1`) holds the i64 flat
/// row-major index of each maximum in X (storage_order 0).
pub fn max_pool(a: &PoolAttrs, x: &Tensor, num_outputs: usize) -> Result<Vec<Tensor>> {
    let want = num_outputs > 1;
    // Small integer types are exact in f32.
    let (shape, data, ind) = match x.dtype() {
        DType::I8 | DType::U8 => {
            let xf = tensor(
                x.shape().to_vec(),
                TensorData::F32(
                    x.to_f64_vec()
                        .map_err(|e| invalid!("MaxPool: {e}"))?
                        .into_iter()
                        .map(|v| v as f32)
                        .collect(),
                ),
            )?;
            let (s, y, i) = pool_impl::<f32>("MaxPool", a, &xf, Kind::Max, want)?;
            let data = if x.dtype() == DType::I8 {
                TensorData::I8(y.into_iter().map(|v| v as i8).collect())
            } else {
                TensorData::U8(y.into_iter().map(|v| v as u8).collect())
            };
            (s, data, i)
        }
        _ => match float_prec(x, "MaxPool")? {
            Prec::F32 => {
                let fast = if want {
                    None
                } else {
                    pool2d_fast("MaxPool", a, x, Kind::Max)?
                };
                let (s, y, i) = match fast {
                    Some((s, y)) => (s, y, None),
                    None => pool_impl::<f32>("MaxPool", a, x, Kind::Max, want)?,
                };
                (s, f32::into_data(y, x.dtype()), i)
            }
            Prec::F64 => {
                let (s, y, i) = pool_impl::<f64>("MaxPool", a, x, Kind::Max, want)?;
                (s, f64::into_data(y, x.dtype()), i)
            }
        },
    };
    let mut outs = vec![tensor(shape.clone(), data)?];
    if let Some(ind) = ind {
        outs.push(tensor(shape, TensorData::I64(ind))?);
    }
    Ok(outs)
}

/// AveragePool (count_include_pad, ceil_mode, dilations, auto_pad).
pub fn avg_pool(a: &PoolAttrs, x: &Tensor) -> Result<Tensor> {
    match float_prec(x, "AveragePool")? {
        Prec::F32 => {
            let (s, y) = match pool2d_fast("AveragePool", a, x, Kind::Avg)? {
                Some(r) => r,
                None => {
                    let (s, y, _) = pool_impl::<f32>("AveragePool", a, x, Kind::Avg, false)?;
                    (s, y)
                }
            };
            float_tensor(s, y, x.dtype())
        }
        Prec::F64 => {
            let (s, y, _) = pool_impl::<f64>("AveragePool", a, x, Kind::Avg, false)?;
            float_tensor(s, y, x.dtype())
        }
    }
}

/// GlobalAveragePool / GlobalMaxPool: reduce every spatial axis to 1.
pub fn global_pool(x: &Tensor, is_max: bool) -> Result<Tensor> {
    let op = if is_max {
        "GlobalMaxPool"
    } else {
        "GlobalAveragePool"
    };
    match float_prec(x, op)? {
        Prec::F32 => global_fast(op, x, is_max),
        Prec::F64 => global_impl::<f64>(op, x, is_max),
    }
}

fn global_impl<T: Real>(op: &str, x: &Tensor, is_max: bool) -> Result<Tensor> {
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(invalid!(
            "{op} expects X of rank >= 2 [N, C, ...], got {xs:?}"
        ));
    }
    let planes = xs[0] * xs[1];
    let inner = numel(&xs[2..])?;
    let mut out_shape = xs[..2].to_vec();
    out_shape.resize(xs.len(), 1);
    let xv = values::<T>(x, op)?;
    let y: Vec<T> = (0..planes)
        .map(|p| {
            let s = &xv[p * inner..(p + 1) * inner];
            if is_max {
                s.iter().fold(T::NEG_INFINITY, |m, &v| {
                    if v > m || v.partial_cmp(&v).is_none() {
                        v
                    } else {
                        m
                    }
                })
            } else {
                let sum = s.iter().fold(0.0f64, |acc, &v| acc + v.to_f64());
                T::from_f64(sum / inner as f64)
            }
        })
        .collect();
    float_tensor(out_shape, y, x.dtype())
}

/// One spatial axis of a 2-D pool: for every output position, the in-bounds
/// input range `[lo, hi)` of its window and its tap count for the divisor.
struct AxisWin {
    lo: Vec<usize>,
    hi: Vec<usize>,
    count: Vec<usize>,
}

fn axis_windows(
    len: usize,
    k: usize,
    s: usize,
    pb: usize,
    pe: usize,
    out: usize,
    include_pad: bool,
) -> AxisWin {
    let (mut lo, mut hi, mut count) = (
        Vec::with_capacity(out),
        Vec::with_capacity(out),
        Vec::with_capacity(out),
    );
    for o in 0..out {
        let start = (o * s) as isize - pb as isize;
        let end = start + k as isize;
        let l = start.clamp(0, len as isize) as usize;
        let h = end.clamp(0, len as isize) as usize;
        lo.push(l);
        hi.push(h.max(l));
        let c = if include_pad {
            // Taps inside the padded extent [-pb, len + pe).
            let pl = start.max(-(pb as isize));
            let ph = end.min((len + pe) as isize);
            (ph - pl).max(0) as usize
        } else {
            h.saturating_sub(l)
        };
        count.push(c);
    }
    AxisWin { lo, hi, count }
}

/// MaxPool / AveragePool over 2-D planes (rank-4 f32 input, no dilation):
/// for each output row, the window's input rows are first combined column by
/// column (a contiguous, vectorized pass), then each output takes the max or
/// sum of its columns. Planes run in parallel when large. Same semantics as
/// [`pool_impl`]: max ignores NaN and padding (-inf when a window has no
/// value), the average divides by the in-bounds (or, with count_include_pad,
/// the padded-extent) tap count. `None` when the input does not qualify.
fn pool2d_fast(
    op: &str,
    a: &PoolAttrs,
    x: &Tensor,
    kind: Kind,
) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    use rayon::prelude::*;
    let xs = x.shape();
    if xs.len() != 4 || a.kernel_shape.len() != 2 || a.dilations.iter().any(|&d| d != 1) {
        return Ok(None);
    }
    let ceil = a.ceil_mode && a.auto_pad == kiln_ir::AutoPad::NotSet;
    let win = resolve_window(
        op,
        &xs[2..],
        &a.kernel_shape,
        &a.strides,
        &a.dilations,
        &a.pads,
        a.auto_pad,
        ceil,
    )?;
    if win.dilations.iter().any(|&d| d != 1) {
        return Ok(None);
    }
    let (h, w) = (xs[2], xs[3]);
    let (oh, ow) = (win.out[0], win.out[1]);
    let planes = xs[0] * xs[1];
    let out_shape = vec![xs[0], xs[1], oh, ow];
    let total = numel(&out_shape)?;
    if total == 0 || h * w == 0 {
        return Ok(None);
    }
    let incl = a.count_include_pad;
    let wh = axis_windows(
        h,
        win.kernel[0],
        win.strides[0],
        win.pad_begin[0],
        win.pad_end[0],
        oh,
        incl,
    );
    let ww = axis_windows(
        w,
        win.kernel[1],
        win.strides[1],
        win.pad_begin[1],
        win.pad_end[1],
        ow,
        incl,
    );
    let xv = values::<f32>(x, op)?;
    // Every output is written below (interior columns, then the edges).
    let mut y = crate::buffers::take_f32(total);
    let (kw, sw, pw) = (win.kernel[1], win.strides[1], win.pad_begin[1]);
    let (c0, c1) = interior_columns(w, kw, sw, pw, ow);
    // The register-held running maximum pays while X is cached (ResNet-50's
    // MaxPool at batch 1, 3.2 MiB: 0.25 -> 0.19 ms on one thread). From
    // memory (batch 8, 26 MiB) its three interleaved row streams measured
    // 6% slower than the portable loop's row after row, so past the size
    // the GEMM treats as streaming (a third of L3) that loop runs.
    let avx512 = crate::fastmath::level() == crate::fastmath::Level::Avx512
        && std::mem::size_of_val(&xv[..]) < kiln_gemm::stream_min_bytes();
    let plane = |src: &[f32], dst: &mut [f32]| {
        let mut acc = vec![0.0f32; w];
        let mut phases = RowPhases::new(w, sw);
        crate::fastmath::simd(
            #[inline(always)]
            || {
                for (r, drow) in dst.chunks_exact_mut(ow).enumerate() {
                    let rows = &src[wh.lo[r] * w..wh.hi[r] * w];
                    match kind {
                        Kind::Max if avx512 => {
                            // SAFETY: AVX-512F was detected; `rows` holds
                            // whole rows of `w` and `acc` is `w` long.
                            unsafe { max_rows_avx512(rows, &mut acc) }
                        }
                        Kind::Max => {
                            acc.fill(f32::NEG_INFINITY);
                            for row in rows.chunks_exact(w) {
                                for (m, &v) in acc.iter_mut().zip(row) {
                                    *m = max_skip_nan(*m, v);
                                }
                            }
                        }
                        Kind::Avg => {
                            acc.fill(0.0);
                            for row in rows.chunks_exact(w) {
                                for (m, &v) in acc.iter_mut().zip(row) {
                                    *m += v;
                                }
                            }
                        }
                    }
                    // Columns whose window lies inside the row: one vectorized
                    // pass per tap over the row's stride phases, in tap order
                    // (the same order as the per-column loop below).
                    if c0 < c1 && kind == Kind::Max && avx512 && kw <= MAX_TAPS_AVX512 {
                        phases.split(&acc);
                        let n = c1 - c0;
                        let mut srcs: [&[f32]; MAX_TAPS_AVX512] = [&[]; MAX_TAPS_AVX512];
                        for (t, src) in srcs[..kw].iter_mut().enumerate() {
                            *src = phases.shifted(t as isize - pw as isize, c0, n);
                        }
                        // SAFETY: AVX-512F was detected; every source holds
                        // `n` values, as does the destination.
                        unsafe { max_taps_avx512(&srcs[..kw], &mut drow[c0..c1]) }
                    } else if c0 < c1 {
                        phases.split(&acc);
                        let d = &mut drow[c0..c1];
                        d.fill(if kind == Kind::Max {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        });
                        for t in 0..kw {
                            let src = phases.shifted(t as isize - pw as isize, c0, c1 - c0);
                            if kind == Kind::Max {
                                for (m, &v) in d.iter_mut().zip(src) {
                                    *m = max_skip_nan(*m, v);
                                }
                            } else {
                                for (m, &v) in d.iter_mut().zip(src) {
                                    *m += v;
                                }
                            }
                        }
                        if kind == Kind::Avg {
                            for (c, v) in (c0..c1).zip(d.iter_mut()) {
                                *v /= (wh.count[r] * ww.count[c]) as f32;
                            }
                        }
                    }
                    // The edge columns, one window at a time.
                    for c in (0..c0.min(ow)).chain(c1.max(c0)..ow) {
                        let taps = &acc[ww.lo[c]..ww.hi[c]];
                        drow[c] = match kind {
                            Kind::Max => {
                                taps.iter()
                                    .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
                            }
                            Kind::Avg => {
                                taps.iter().fold(0.0f32, |s, &v| s + v)
                                    / (wh.count[r] * ww.count[c]) as f32
                            }
                        };
                    }
                }
            },
        )
    };
    let (in_n, out_n) = (h * w, oh * ow);
    if xv.len() < crate::fastmath::PAR_MIN || planes < 2 {
        for (src, dst) in xv.chunks_exact(in_n).zip(y.chunks_exact_mut(out_n)) {
            plane(src, dst);
        }
    } else {
        y.par_chunks_mut(out_n)
            .zip(xv.par_chunks(in_n))
            .for_each(|(dst, src)| plane(src, dst));
    }
    Ok(Some((out_shape, y)))
}

/// Most taps along a row that [`max_taps_avx512`] takes.
const MAX_TAPS_AVX512: usize = 8;

/// `acc[j] = max over the rows of rows[r][j]` (rows of `acc.len()`),
/// skipping NaN; see [`max_of_avx512`].
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_rows_avx512(rows: &[f32], acc: &mut [f32]) {
    let w = acc.len();
    let nrows = rows.len().checked_div(w).unwrap_or(0);
    assert!(nrows * w == rows.len());
    // SAFETY: AVX-512F is present (caller); row r holds the `w` floats
    // from r * w (asserted).
    unsafe { max_of_avx512(nrows, |r| rows.as_ptr().add(r * w), acc) }
}

/// `dst[j] = max over the sources of src[j]` (each at least `dst.len()`
/// long), skipping NaN; see [`max_of_avx512`].
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_taps_avx512(srcs: &[&[f32]], dst: &mut [f32]) {
    assert!(srcs.iter().all(|s| s.len() >= dst.len()));
    // SAFETY: AVX-512F is present (caller); each source holds `dst.len()`
    // floats (asserted).
    unsafe { max_of_avx512(srcs.len(), |t| srcs[t].as_ptr(), dst) }
}

/// `dst[j] = max over i < count of src(i)[j]`, the running maximum kept in
/// a register across the sources. The portable loop's `f32::max` compiles
/// to a max, a NaN compare and a blend per vector, and stores the running
/// maximum after every row; here `vmaxps(v, m)` alone skips a NaN `v` (x86
/// max returns its second operand when either is NaN, and `m` never is).
/// Full vectors load unmasked: from memory, masked loads made MaxPool at
/// batch 8 2.4x slower.
///
/// # Safety
/// AVX-512F must be present, and every `src(i)` must point to `dst.len()`
/// readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_of_avx512(count: usize, src: impl Fn(usize) -> *const f32, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let w = dst.len();
    let mut j = 0;
    while j < w {
        let n = (w - j).min(16);
        // SAFETY: lanes j..j + n of every source (the contract) and of
        // `dst` are in bounds; masked-off lanes are neither read nor written.
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            if n == 16 {
                for i in 0..count {
                    m = _mm512_max_ps(_mm512_loadu_ps(src(i).add(j)), m);
                }
                _mm512_storeu_ps(dst.as_mut_ptr().add(j), m);
            } else {
                let mask: __mmask16 = (1u16 << n) - 1;
                for i in 0..count {
                    m = _mm512_max_ps(_mm512_maskz_loadu_ps(mask, src(i).add(j)), m);
                }
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(j), mask, m);
            }
        }
        j += 16;
    }
}

/// No AVX-512 kernels off x86-64 (`avx512` is never true there).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn max_rows_avx512(_: &[f32], _: &mut [f32]) {
    unreachable!("AVX-512 is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn max_taps_avx512(_: &[&[f32]], _: &mut [f32]) {
    unreachable!("AVX-512 is x86-64 only")
}

/// `v` if it is greater than `m`, else `m` (so a NaN `v` is skipped; `m`
/// is never NaN). Spelled as a select of two values, this compiled to a
/// masked store into the running maximum, which the next row's load then
/// waited on (masked stores do not forward): MaxPool 3x3 stride 2 over
/// 8x64x112x112 took 2.0 ms against ONNX Runtime's 0.86. `f32::max`
/// (maxnum: the non-NaN operand) is the same function on every input but
/// signed zeros, where either may come back, and compiles to plain vector
/// max and blend.
#[inline(always)]
fn max_skip_nan(m: f32, v: f32) -> f32 {
    m.max(v)
}

/// Output columns `[c0, c1)` whose window `[c*s - pb, c*s - pb + k)` lies
/// inside a row of `w` (empty when none does).
fn interior_columns(w: usize, k: usize, s: usize, pb: usize, ow: usize) -> (usize, usize) {
    let c0 = pb.div_ceil(s);
    let c1 = if w + pb >= k {
        ((w + pb - k) / s + 1).min(ow)
    } else {
        0
    };
    (c0.min(c1), c1)
}

/// A row split into its `s` stride phases (phase p holds columns p, p + s,
/// ...), so that tap t of output columns c.. reads a contiguous run.
struct RowPhases {
    s: usize,
    len: usize,
    buf: Vec<f32>,
}

impl RowPhases {
    fn new(w: usize, s: usize) -> RowPhases {
        let len = w.div_ceil(s.max(1));
        RowPhases {
            s: s.max(1),
            len,
            buf: vec![0.0; len * s.max(1)],
        }
    }

    #[inline(always)]
    fn split(&mut self, row: &[f32]) {
        if self.s == 1 {
            self.buf[..row.len()].copy_from_slice(row);
            return;
        }
        if self.s == 2 {
            // Both phases in one pass over whole pairs (shuffle-vectorized),
            // then the odd last column.
            let (even, odd) = self.buf.split_at_mut(self.len);
            let pairs = row.len() / 2;
            for ((e, o), c) in even[..pairs]
                .iter_mut()
                .zip(odd[..pairs].iter_mut())
                .zip(row.chunks_exact(2))
            {
                *e = c[0];
                *o = c[1];
            }
            if row.len() % 2 == 1 {
                even[pairs] = row[row.len() - 1];
            }
            return;
        }
        for (p, ph) in self.buf.chunks_exact_mut(self.len).enumerate() {
            for (d, &v) in ph.iter_mut().zip(row.iter().skip(p).step_by(self.s)) {
                *d = v;
            }
        }
    }

    /// Row columns `c * s + off` for `c` in `c0..c0 + n` (all inside the
    /// row: the caller's interior columns).
    #[inline(always)]
    fn shifted(&self, off: isize, c0: usize, n: usize) -> &[f32] {
        let s = self.s as isize;
        let (p, q) = (off.rem_euclid(s) as usize, off.div_euclid(s));
        let j0 = (c0 as isize + q) as usize;
        &self.buf[p * self.len + j0..][..n]
    }
}

/// GlobalAveragePool / GlobalMaxPool for f32 compute: each plane's mean
/// (accumulated in f64 lanes, like the reference's f64 sum) or NaN-winning
/// max, planes in parallel when large.
fn global_fast(op: &str, x: &Tensor, is_max: bool) -> Result<Tensor> {
    use rayon::prelude::*;
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(invalid!(
            "{op} expects X of rank >= 2 [N, C, ...], got {xs:?}"
        ));
    }
    let inner = numel(&xs[2..])?;
    let planes = xs[0] * xs[1];
    if inner == 0 || planes == 0 {
        return global_impl::<f32>(op, x, is_max);
    }
    let mut out_shape = xs[..2].to_vec();
    out_shape.resize(xs.len(), 1);
    let xv = values::<f32>(x, op)?;
    let one = |s: &[f32]| -> f32 {
        if is_max {
            crate::fastmath::simd(
                #[inline(always)]
                || crate::fastmath::max_of(s),
            )
        } else {
            crate::fastmath::simd(
                #[inline(always)]
                || (crate::fastmath::sum_f64(s) / inner as f64) as f32,
            )
        }
    };
    let y: Vec<f32> = if xv.len() < crate::fastmath::PAR_MIN {
        xv.chunks_exact(inner).map(one).collect()
    } else {
        xv.par_chunks(inner)
            .with_min_len((crate::fastmath::PAR_CHUNK / inner).max(1))
            .map(one)
            .collect()
    };
    float_tensor(out_shape, y, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::*;
    use kiln_ir::AutoPad;

    fn pa(kernel: &[usize], strides: &[usize], pads: &[usize]) -> PoolAttrs {
        PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
            dilations: vec![],
            kernel_shape: kernel.to_vec(),
            pads: pads.to_vec(),
            strides: strides.to_vec(),
            count_include_pad: false,
        }
    }

    fn x4x4() -> Tensor {
        t(&[1, 1, 4, 4], (1..=16).map(|v| v as f32).collect())
    }

    #[test]
    fn maxpool_basic_and_indices() {
        let y = max_pool(&pa(&[2, 2], &[2, 2], &[]), &x4x4(), 2).unwrap();
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(f32s(&y[0]), vec![6.0, 8.0, 14.0, 16.0]);
        assert_eq!(y[1].as_slice::<i64>().unwrap(), &[5, 7, 13, 15]);
        // Indices include the batch/channel offset.
        let x = t(&[2, 1, 1, 2], vec![1.0, 0.0, 0.0, 1.0]);
        let y = max_pool(&pa(&[1, 2], &[], &[]), &x, 2).unwrap();
        assert_eq!(y[1].as_slice::<i64>().unwrap(), &[0, 3]);
        assert_eq!(
            max_pool(&pa(&[2, 2], &[2, 2], &[]), &x4x4(), 1)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn maxpool_ceil_mode() {
        // ONNX example: 4x4 (1..16), kernel 3, stride 2, ceil_mode.
        let mut a = pa(&[3, 3], &[2, 2], &[]);
        a.ceil_mode = true;
        let y = max_pool(&a, &x4x4(), 1).unwrap();
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(f32s(&y[0]), vec![11.0, 12.0, 15.0, 16.0]);
        a.ceil_mode = false;
        let y = max_pool(&a, &x4x4(), 1).unwrap();
        assert_eq!(f32s(&y[0]), vec![11.0]);
    }

    #[test]
    fn maxpool_pads_dilation_same_and_1d_3d() {
        // Pads are ignored cells (-inf), not zeros.
        let x = t(&[1, 1, 3], vec![-1.0, -2.0, -3.0]);
        let y = max_pool(&pa(&[2], &[1], &[1, 1]), &x, 1).unwrap();
        assert_eq!(f32s(&y[0]), vec![-1.0, -1.0, -2.0, -3.0]);
        // Dilation 2 on 1..16 4x4 with kernel 2: taps (0,0),(0,2),(2,0),(2,2).
        let mut a = pa(&[2, 2], &[1, 1], &[]);
        a.dilations = vec![2, 2];
        let y = max_pool(&a, &x4x4(), 1).unwrap();
        assert_eq!(f32s(&y[0]), vec![11.0, 12.0, 15.0, 16.0]);
        // SAME_UPPER: 5 -> ceil(5/2) = 3, kernel 2 total pad 1 at the end.
        let x = t(&[1, 1, 5], vec![1.0, 5.0, 2.0, 4.0, 3.0]);
        let mut a = pa(&[2], &[2], &[]);
        a.auto_pad = AutoPad::SameUpper;
        assert_eq!(f32s(&max_pool(&a, &x, 1).unwrap()[0]), vec![5.0, 4.0, 3.0]);
        a.auto_pad = AutoPad::SameLower;
        assert_eq!(f32s(&max_pool(&a, &x, 1).unwrap()[0]), vec![1.0, 5.0, 4.0]);
        // 3-D.
        let x = t(&[1, 1, 2, 2, 2], (0..8).map(|v| v as f32).collect());
        let y = max_pool(&pa(&[2, 2, 2], &[], &[]), &x, 2).unwrap();
        assert_eq!(f32s(&y[0]), vec![7.0]);
        assert_eq!(y[1].as_slice::<i64>().unwrap(), &[7]);
        // u8 stays u8.
        let x = Tensor::from_vec(vec![1, 1, 3], vec![3u8, 200, 7]).unwrap();
        let y = max_pool(&pa(&[2], &[], &[]), &x, 1).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[200, 200]);
        assert!(max_pool(&pa(&[2], &[], &[]), &t(&[1, 3], vec![0.0; 3]), 1).is_err());
    }

    #[test]
    fn avgpool_count_include_pad_both_ways() {
        // ONNX example: 5x5 (1..25), kernel 3, pads 2.
        let x = t(&[1, 1, 5, 5], (1..=25).map(|v| v as f32).collect());
        let mut a = pa(&[3, 3], &[], &[2, 2, 2, 2]);
        let y = avg_pool(&a, &x).unwrap();
        assert_eq!(y.shape(), &[1, 1, 7, 7]);
        let v = f32s(&y);
        assert_eq!(v[0], 1.0); // only x[0,0] is inside
        assert_eq!(v[1], 1.5); // (1+2)/2
        assert_eq!(v[24], 13.0); // centre
        a.count_include_pad = true;
        let y = avg_pool(&a, &x).unwrap();
        let v = f32s(&y);
        assert!((v[0] - 1.0 / 9.0).abs() < 1e-6);
        assert!((v[1] - 3.0 / 9.0).abs() < 1e-6);
        assert_eq!(v[24], 13.0);
    }

    #[test]
    fn avgpool_ceil_mode_and_last_window_in_padding() {
        let mut a = pa(&[3, 3], &[2, 2], &[]);
        a.ceil_mode = true;
        let y = avg_pool(&a, &x4x4()).unwrap();
        assert_eq!(f32s(&y), vec![6.0, 7.5, 12.0, 13.5]);
        // 1-D: in 3, kernel 1, stride 2, pads 0/1, ceil_mode: the window that would
        // start at 4 (inside the end padding) is dropped -> 2 outputs.
        let x = t(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        let mut a = pa(&[1], &[2], &[0, 1]);
        a.ceil_mode = true;
        let y = avg_pool(&a, &x).unwrap();
        assert_eq!(f32s(&y), vec![1.0, 3.0]);
        // count_include_pad counts only taps within the padded extent, not the
        // ceil-mode overhang: in 4, k 3, s 2, ceil -> windows [0,3) and [2,5).
        let x = t(&[1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let mut a = pa(&[3], &[2], &[]);
        a.ceil_mode = true;
        a.count_include_pad = true;
        assert_eq!(f32s(&avg_pool(&a, &x).unwrap()), vec![2.0, 3.5]);
        // Dilated average.
        let mut a = pa(&[2], &[1], &[]);
        a.dilations = vec![2];
        assert_eq!(f32s(&avg_pool(&a, &x).unwrap()), vec![2.0, 3.0]);
    }

    #[test]
    fn global_pools() {
        let x = t(
            &[1, 2, 2, 2],
            vec![1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0],
        );
        let y = global_pool(&x, false).unwrap();
        assert_eq!(y.shape(), &[1, 2, 1, 1]);
        assert_eq!(f32s(&y), vec![2.5, -2.5]);
        let y = global_pool(&x, true).unwrap();
        assert_eq!(f32s(&y), vec![4.0, -1.0]);
        let y = global_pool(&t(&[0, 3, 4], vec![]), true).unwrap();
        assert_eq!(y.shape(), &[0, 3, 1]);
        let x64 = Tensor::from_vec(vec![1, 1, 3], vec![1.0f64, 2.0, 6.0]).unwrap();
        assert_eq!(
            global_pool(&x64, false).unwrap().as_slice::<f64>().unwrap(),
            &[3.0]
        );
    }

    #[test]
    fn empty_batch() {
        let x = t(&[0, 3, 4, 4], vec![]);
        let y = max_pool(&pa(&[2, 2], &[2, 2], &[]), &x, 2).unwrap();
        assert_eq!(y[0].shape(), &[0, 3, 2, 2]);
        assert_eq!(y[1].shape(), &[0, 3, 2, 2]);
        assert_eq!(
            avg_pool(&pa(&[2, 2], &[], &[]), &x).unwrap().shape(),
            &[0, 3, 3, 3]
        );
    }

    #[test]
    fn fast_pool2d_matches_reference() {
        let mut rng = Rng::new(17);
        // (input [N, C, H, W], kernel, strides, pads, ceil, count_include_pad, auto_pad)
        let cases: Vec<(
            Vec<usize>,
            [usize; 2],
            [usize; 2],
            [usize; 4],
            bool,
            bool,
            AutoPad,
        )> = vec![
            // Wide rows, whose interior columns take the per-tap passes over
            // stride phases: stride 3 with asymmetric pads, stride 1, an odd
            // width with ceil mode.
            (
                vec![1, 2, 6, 37],
                [2, 5],
                [1, 3],
                [0, 2, 1, 1],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 1, 4, 40],
                [3, 3],
                [1, 1],
                [1, 1, 1, 1],
                false,
                true,
                AutoPad::NotSet,
            ),
            (
                vec![1, 2, 5, 33],
                [2, 2],
                [2, 2],
                [0, 0, 0, 0],
                true,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 3, 9, 9],
                [3, 3],
                [2, 2],
                [1, 1, 1, 1],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 3, 9, 9],
                [3, 3],
                [2, 2],
                [1, 1, 1, 1],
                false,
                true,
                AutoPad::NotSet,
            ),
            (
                vec![2, 2, 8, 8],
                [2, 2],
                [2, 2],
                [0, 0, 0, 0],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 2, 7, 7],
                [2, 2],
                [2, 2],
                [0, 0, 0, 0],
                true,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 2, 7, 7],
                [3, 3],
                [2, 2],
                [1, 1, 1, 1],
                true,
                true,
                AutoPad::NotSet,
            ),
            (
                vec![1, 1, 5, 6],
                [2, 3],
                [1, 2],
                [0, 1, 1, 0],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 2, 6, 5],
                [3, 3],
                [1, 1],
                [0, 0, 0, 0],
                false,
                false,
                AutoPad::SameUpper,
            ),
            (
                vec![1, 2, 6, 5],
                [2, 2],
                [2, 2],
                [0, 0, 0, 0],
                false,
                true,
                AutoPad::SameLower,
            ),
            (
                vec![1, 1, 1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 1, 3, 3],
                [3, 3],
                [1, 1],
                [2, 2, 2, 2],
                false,
                true,
                AutoPad::NotSet,
            ),
            (
                vec![1, 64, 56, 56],
                [3, 3],
                [2, 2],
                [1, 1, 1, 1],
                false,
                false,
                AutoPad::NotSet,
            ),
            // A 5x5 stride-3 window over 37-wide rows (a partial vector at
            // each row's end), and one 9 wide, past the AVX-512 tap path's
            // 8 (the portable loop then).
            (
                vec![1, 3, 23, 37],
                [5, 5],
                [3, 3],
                [2, 1, 2, 2],
                false,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![1, 2, 12, 40],
                [3, 9],
                [1, 2],
                [1, 4, 1, 4],
                true,
                false,
                AutoPad::NotSet,
            ),
            (
                vec![2, 0, 4, 4],
                [2, 2],
                [2, 2],
                [0, 0, 0, 0],
                false,
                false,
                AutoPad::NotSet,
            ),
        ];
        for (shape, k, st, pads, ceil, incl, auto_pad) in cases {
            let n: usize = shape.iter().product();
            let mut v = rng.vec(n);
            // NaN and -inf inside some windows.
            if n > 10 {
                v[4] = f32::NAN;
                v[9] = f32::NEG_INFINITY;
            }
            let x = t(&shape, v);
            let a = PoolAttrs {
                auto_pad,
                ceil_mode: ceil,
                dilations: vec![],
                kernel_shape: k.to_vec(),
                pads: if auto_pad == AutoPad::NotSet {
                    pads.to_vec()
                } else {
                    vec![]
                },
                strides: st.to_vec(),
                count_include_pad: incl,
            };
            for kind in [Kind::Max, Kind::Avg] {
                let name = if kind == Kind::Max {
                    "MaxPool"
                } else {
                    "AveragePool"
                };
                let (ws, wv, _) = pool_impl::<f32>(name, &a, &x, kind, false).unwrap();
                let what = format!("{name} {shape:?} k{k:?} s{st:?} p{pads:?} ceil {ceil} incl {incl} {auto_pad:?}");
                match pool2d_fast(name, &a, &x, kind).unwrap() {
                    Some((gs, gv)) => {
                        assert_eq!(gs, ws, "{what}");
                        for (g, w) in gv.iter().zip(&wv) {
                            let ok = (g.is_nan() && w.is_nan())
                                || g == w
                                || (g - w).abs() <= 1e-6 * w.abs().max(1.0);
                            assert!(ok, "{what}: fast {gv:?} reference {wv:?}");
                        }
                    }
                    None => assert_eq!(n, 0, "{what}: fast path declined"),
                }
            }
        }
        // Dilation goes to the reference.
        let x = t(&[1, 1, 5, 5], rng.vec(25));
        let mut a = pa(&[2, 2], &[1, 1], &[]);
        a.dilations = vec![2, 2];
        assert!(pool2d_fast("MaxPool", &a, &x, Kind::Max).unwrap().is_none());
    }

    #[test]
    fn fast_global_pool_matches_reference() {
        let mut rng = Rng::new(5);
        for shape in [
            &[1usize, 2048, 7, 7][..],
            &[2, 3, 5],
            &[1, 4],
            &[2, 3, 0],
            &[3, 70, 33, 33],
        ] {
            let n: usize = shape.iter().product();
            let mut v = rng.vec(n);
            if n > 3 {
                v[2] = f32::NAN;
            }
            let x = t(shape, v);
            for is_max in [false, true] {
                let op = if is_max {
                    "GlobalMaxPool"
                } else {
                    "GlobalAveragePool"
                };
                let g = global_fast(op, &x, is_max).unwrap();
                let w = global_impl::<f32>(op, &x, is_max).unwrap();
                assert_eq!(g.shape(), w.shape());
                for (a, b) in f32s(&g).iter().zip(&f32s(&w)) {
                    assert!(
                        (a.is_nan() && b.is_nan())
                            || a == b
                            || (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{op} {shape:?}"
                    );
                }
            }
        }
    }

    /// `cargo test --release -p kiln-cpu --lib pool_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn pool_speed() {
        fn best(f: &mut dyn FnMut()) -> f64 {
            let mut b = f64::INFINITY;
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                f();
                b = b.min(t0.elapsed().as_secs_f64());
            }
            b * 1e6
        }
        let mut rng = Rng::new(1);
        let x = t(&[1, 64, 112, 112], rng.vec(64 * 112 * 112));
        let a = pa(&[3, 3], &[2, 2], &[1, 1, 1, 1]);
        let fast = best(&mut || drop(pool2d_fast("MaxPool", &a, &x, Kind::Max).unwrap()));
        let refr =
            best(&mut || drop(pool_impl::<f32>("MaxPool", &a, &x, Kind::Max, false).unwrap()));
        eprintln!("MaxPool 3x3s2 [1,64,112,112]: reference {refr:.0} us, fast {fast:.0} us");
        let x = t(&[1, 2048, 7, 7], rng.vec(2048 * 49));
        let fast = best(&mut || drop(global_fast("GlobalAveragePool", &x, false).unwrap()));
        let refr = best(&mut || drop(global_impl::<f32>("GlobalAveragePool", &x, false).unwrap()));
        eprintln!("GlobalAveragePool [1,2048,7,7]: reference {refr:.0} us, fast {fast:.0} us");
    }
}
