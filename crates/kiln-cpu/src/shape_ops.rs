//! Shape and data-movement kernels: Reshape, Flatten, Transpose, Squeeze,
//! Unsqueeze, Concat, Split, Slice, Gather, GatherElements, Expand, Pad, Shape,
//! ConstantOfShape, Range, Tile and Trilu.
//!
//! Every kernel works for every element type (including bool and string): the
//! element-moving code is generic over `T: Clone` and dispatched once per call
//! with `map_data!`. Data is moved in contiguous runs wherever the layout allows
//! (`extend_from_slice`, which is a `memcpy` for plain numbers), and every output
//! shape is checked for overflow and for an absurd element count before anything
//! is allocated, so a malicious model gets an error instead of an abort.

use crate::util::{broadcast_shape, i64_values, normalize_axis, strides, tensor};
use crate::{invalid, Result};
use kiln_ir::{checked_numel, map_data, Element, PadMode, Tensor, TensorData};

/// Largest element count a kernel here will allocate for one output.
const MAX_OUTPUT_ELEMENTS: usize = 1 << 32;

/// Element count of an output shape, or an error when it overflows or is absurd.
pub(crate) fn output_len(op: &str, shape: &[usize]) -> Result<usize> {
    match checked_numel(shape) {
        Some(n) if n <= MAX_OUTPUT_ELEMENTS => Ok(n),
        Some(n) => Err(invalid!(
            "{op}: output shape {shape:?} has {n} elements, more than the limit of {MAX_OUTPUT_ELEMENTS}"
        )),
        None => Err(invalid!(
            "{op}: output shape {shape:?} has too many elements (the count overflows)"
        )),
    }
}

/// Converts a dimension read from a tensor into `usize`, refusing negatives.
fn dim_from_i64(op: &str, what: &str, d: i64) -> Result<usize> {
    usize::try_from(d).map_err(|_| invalid!("{op}: {what} must be non-negative, got {d}"))
}

/// Values of a shape-like input that must be 1-D (shape, repeats, pads, starts...).
fn vector_values(op: &str, t: &Tensor, what: &str) -> Result<Vec<i64>> {
    if t.rank() != 1 {
        return Err(invalid!(
            "{op}: {what} must be a 1-D tensor, got shape {:?}",
            t.shape()
        ));
    }
    i64_values(t, &format!("{op}: {what}"))
}

/// Values of an integer index tensor (any integer dtype). Unsigned 64-bit values
/// that do not fit `i64` are rejected instead of wrapping.
fn index_values(op: &str, t: &Tensor) -> Result<Vec<i64>> {
    if !t.dtype().is_int() {
        return Err(invalid!(
            "{op}: indices must be an integer tensor, got {}",
            t.dtype()
        ));
    }
    if let Some(v) = t.as_slice::<u64>() {
        return v
            .iter()
            .map(|&x| i64::try_from(x).map_err(|_| invalid!("{op}: index {x} is out of range")))
            .collect();
    }
    i64_values(t, &format!("{op}: indices"))
}

/// The single value of a one-element tensor as i64 (k of Trilu).
fn scalar_i64(op: &str, t: &Tensor, what: &str) -> Result<i64> {
    if t.len() != 1 {
        return Err(invalid!(
            "{op}: {what} must hold exactly one element, got shape {:?}",
            t.shape()
        ));
    }
    let v = i64_values(t, &format!("{op}: {what}"))?;
    v.first()
        .copied()
        .ok_or_else(|| invalid!("{op}: {what} is empty"))
}

/// Normalizes a list of axes against `rank`, rejecting duplicates.
fn normalize_axes(op: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut seen = vec![false; rank];
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let ax = normalize_axis(a, rank).map_err(|e| invalid!("{op}: {e}"))?;
        if seen[ax] {
            return Err(invalid!("{op}: axis {a} is repeated in axes {axes:?}"));
        }
        seen[ax] = true;
        out.push(ax);
    }
    Ok(out)
}

/// Calls `f` with the flat source offset of every multi-index of `dims`
/// (`(size, stride)` pairs, row-major order), starting from `offset`.
fn for_each_offset(dims: &[(usize, isize)], offset: isize, mut f: impl FnMut(isize)) {
    let mut counter = vec![0usize; dims.len()];
    let mut base = offset;
    loop {
        f(base);
        let mut k = dims.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            counter[k] += 1;
            base += dims[k].1;
            if counter[k] < dims[k].0 {
                break;
            }
            base -= dims[k].1 * dims[k].0 as isize;
            counter[k] = 0;
        }
    }
}

/// `dst[i * cols + j] = src[base + i + j * stride]`, walked in square tiles so
/// that both the reads and the writes stay in cache.
fn transpose_block<T: Clone>(
    src: &[T],
    base: isize,
    rows: usize,
    cols: usize,
    stride: isize,
    dst: &mut [T],
) {
    const TILE: usize = 32;
    for i0 in (0..rows).step_by(TILE) {
        let i1 = (i0 + TILE).min(rows);
        for j0 in (0..cols).step_by(TILE) {
            let j1 = (j0 + TILE).min(cols);
            for i in i0..i1 {
                let mut p = base + i as isize + j0 as isize * stride;
                for d in &mut dst[i * cols + j0..i * cols + j1] {
                    *d = src[p as usize].clone();
                    p += stride;
                }
            }
        }
    }
}

/// Copies the strided view `src[offset + Σ i_k·strides_k]` over the multi-index
/// `i` of `shape` (row-major) into a new buffer. Size-1 dimensions are dropped and
/// dimensions that are contiguous with each other merged, so the innermost loop
/// is as long as possible; a unit inner stride copies whole runs, a zero inner
/// stride (broadcast) repeats one element, and a transpose-like pair of inner
/// axes (the last one strided, the one before it contiguous in the source) is
/// copied in cache-sized tiles. The caller guarantees every addressed element
/// is inside `src` and that the element count was checked.
fn strided_copy<T: Clone + Default>(
    src: &[T],
    offset: usize,
    shape: &[usize],
    strides: &[isize],
) -> Vec<T> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let mut dims: Vec<(usize, isize)> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut() {
            if last.1 == s * d as isize {
                last.0 *= d;
                last.1 = s;
                continue;
            }
        }
        dims.push((d, s));
    }
    let (inner_len, inner_stride) = dims.pop().unwrap_or((1, 1));
    if let Some(&(rows, 1)) = dims.last() {
        if inner_stride != 0 && inner_stride != 1 {
            dims.pop();
            let block = rows * inner_len;
            let mut out = vec![T::default(); n];
            let mut pos = 0;
            for_each_offset(&dims, offset as isize, |base| {
                let dst = &mut out[pos..pos + block];
                transpose_block(src, base, rows, inner_len, inner_stride, dst);
                pos += block;
            });
            return out;
        }
    }
    let mut out = Vec::with_capacity(n);
    for_each_offset(&dims, offset as isize, |base| {
        let b = base as usize;
        match inner_stride {
            1 => out.extend_from_slice(&src[b..b + inner_len]),
            0 => out.resize(out.len() + inner_len, src[b].clone()),
            s => {
                let mut p = base;
                for _ in 0..inner_len {
                    out.push(src[p as usize].clone());
                    p += s;
                }
            }
        }
    });
    out
}

/// Row-major strides of `shape` as `isize`.
fn istrides(shape: &[usize]) -> Vec<isize> {
    strides(shape).into_iter().map(|s| s as isize).collect()
}

/// The elements `[off, off + len)` along the axis that splits `src` into
/// `outer × dim × inner`, for every outer index.
fn take_along_axis<T: Clone>(
    src: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    off: usize,
    len: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * len * inner);
    if len * inner == 0 {
        return out;
    }
    for o in 0..outer {
        out.extend_from_slice(axis_run(src, o, dim, inner, off, len));
    }
    out
}

/// Outer index `o`'s run of [`take_along_axis`]: `len * inner` values.
fn axis_run<T>(src: &[T], o: usize, dim: usize, inner: usize, off: usize, len: usize) -> &[T] {
    let start = (o * dim + off) * inner;
    &src[start..start + len * inner]
}

/// A copy of `d`; f32 data from 4 KiB up into a recycled buffer
/// (`crate::buffers`: no zeroing, and big fresh ones page-fault on every
/// run), copied on the pool when big. (The runtime
/// moves a relabelled input into its output where this was its last
/// reader; a copy is left where another reader keeps it, as GPT-2's keys
/// and values, which are graph outputs too.)
fn copy_data(d: &TensorData) -> TensorData {
    match d {
        TensorData::F32(v) => {
            let mut out = crate::buffers::take_f32(v.len());
            copy_values(v, &mut out);
            TensorData::F32(out)
        }
        d => d.clone(),
    }
}

/// [`take_along_axis`] into `out` (`outer * len * inner` values).
fn copy_along_axis<T: Copy + Send + Sync>(
    src: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    off: usize,
    len: usize,
    out: &mut [T],
) {
    let run = len * inner;
    if run == 0 {
        return;
    }
    let copy = |(o, dst): (usize, &mut [T])| {
        dst.copy_from_slice(axis_run(src, o, dim, inner, off, len));
    };
    let out = &mut out[..outer * run];
    if out.len() >= PAR_COPY_MIN && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        // Runs grouped into tasks of about PAR_COPY_MIN values.
        let per = PAR_COPY_MIN.div_ceil(run).max(1);
        out.par_chunks_mut(per * run)
            .enumerate()
            .for_each(|(t, blk)| {
                blk.chunks_exact_mut(run)
                    .enumerate()
                    .for_each(|(i, d)| copy((t * per + i, d)))
            });
    } else {
        out.chunks_exact_mut(run).enumerate().for_each(copy);
    }
}

/// Copies of at least this many values run on the pool: one thread copying
/// from the caches moved about 17 GB/s here (GPT-2's QKV Split: 1.2 MB a
/// layer at batch 1, 9.4 MB at batch 8).
const PAR_COPY_MIN: usize = 64 * 1024;

/// `dst = src`, on the pool when big.
fn copy_values<T: Copy + Send + Sync>(src: &[T], dst: &mut [T]) {
    assert_eq!(src.len(), dst.len(), "copy_values: lengths differ");
    if dst.len() >= PAR_COPY_MIN && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        dst.par_chunks_mut(PAR_COPY_MIN)
            .zip(src.par_chunks(PAR_COPY_MIN))
            .for_each(|(d, s)| d.copy_from_slice(s));
    } else {
        dst.copy_from_slice(src);
    }
}

// ---------------------------------------------------------------------------
// Reshape, Flatten, Squeeze, Unsqueeze: new shape, same buffer.
// ---------------------------------------------------------------------------

pub fn reshape(x: &Tensor, s: &Tensor, allowzero: bool) -> Result<Tensor> {
    tensor(reshape_shape(x, s, allowzero)?, copy_data(x.data()))
}

/// The output shape of Reshape (every check included, nothing copied).
pub(crate) fn reshape_shape(x: &Tensor, s: &Tensor, allowzero: bool) -> Result<Vec<usize>> {
    let req = vector_values("Reshape", s, "shape")?;
    let in_shape = x.shape();
    if allowzero && req.contains(&0) && req.contains(&-1) {
        return Err(invalid!(
            "Reshape: shape {req:?} contains both 0 and -1, which is invalid with allowzero=1"
        ));
    }
    let mut out = Vec::with_capacity(req.len());
    let mut infer_at = None;
    for (i, &d) in req.iter().enumerate() {
        let dim = match d {
            -1 => {
                if infer_at.is_some() {
                    return Err(invalid!(
                        "Reshape: shape {req:?} has more than one -1 dimension"
                    ));
                }
                infer_at = Some(i);
                1
            }
            0 if !allowzero => *in_shape.get(i).ok_or_else(|| {
                invalid!(
                    "Reshape: shape {req:?} has 0 at index {i}, which copies an input dimension, \
                     but the input {in_shape:?} has rank {}",
                    in_shape.len()
                )
            })?,
            d if d < 0 => {
                return Err(invalid!(
                    "Reshape: shape {req:?} has invalid dimension {d} (only -1 may be negative)"
                ))
            }
            d => dim_from_i64("Reshape", "dimension", d)?,
        };
        out.push(dim);
    }
    let n = x.len();
    let known = checked_numel(&out);
    if let Some(i) = infer_at {
        match known {
            Some(0) => {
                return Err(invalid!(
                "Reshape: cannot infer the -1 dimension of {req:?} for input shape {in_shape:?}: \
                     the other dimensions multiply to 0, so any size would fit"
            ))
            }
            Some(k) if (n / k) * k == n => out[i] = n / k,
            _ => {
                return Err(invalid!(
                "Reshape: cannot reshape input of shape {in_shape:?} ({n} elements) to {req:?}: \
                     {n} is not a multiple of the other dimensions' product"
            ))
            }
        }
    } else if known != Some(n) {
        return Err(invalid!(
            "Reshape: cannot reshape input of shape {in_shape:?} ({n} elements) to {req:?} (resolved {out:?})"
        ));
    }
    Ok(out)
}

pub fn flatten(x: &Tensor, axis: i64) -> Result<Tensor> {
    tensor(flatten_shape(x, axis)?, copy_data(x.data()))
}

/// The output shape of Flatten.
pub(crate) fn flatten_shape(x: &Tensor, axis: i64) -> Result<Vec<usize>> {
    let r = x.rank() as i64;
    if axis < -r || axis > r {
        return Err(invalid!(
            "Flatten: axis {axis} is out of range for rank {r} (allowed [{}, {r}])",
            -r
        ));
    }
    let a = if axis < 0 { axis + r } else { axis } as usize;
    let rows: usize = x.shape()[..a].iter().product();
    let cols: usize = x.shape()[a..].iter().product();
    Ok(vec![rows, cols])
}

pub fn squeeze(x: &Tensor, axes: Option<&Tensor>) -> Result<Tensor> {
    tensor(squeeze_shape(x, axes)?, copy_data(x.data()))
}

/// The output shape of Squeeze.
pub(crate) fn squeeze_shape(x: &Tensor, axes: Option<&Tensor>) -> Result<Vec<usize>> {
    let shape = x.shape();
    let axes = match axes {
        Some(t) => i64_values(t, "Squeeze: axes")?,
        None => Vec::new(),
    };
    let out: Vec<usize> = if axes.is_empty() {
        shape.iter().copied().filter(|&d| d != 1).collect()
    } else {
        let axes = normalize_axes("Squeeze", &axes, shape.len())?;
        for &a in &axes {
            if shape[a] != 1 {
                return Err(invalid!(
                    "Squeeze: cannot squeeze axis {a} of shape {shape:?}: its size is {}, not 1",
                    shape[a]
                ));
            }
        }
        shape
            .iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect()
    };
    Ok(out)
}

pub fn unsqueeze(x: &Tensor, axes: &Tensor) -> Result<Tensor> {
    tensor(unsqueeze_shape(x, axes)?, copy_data(x.data()))
}

/// The output shape of Unsqueeze.
pub(crate) fn unsqueeze_shape(x: &Tensor, axes: &Tensor) -> Result<Vec<usize>> {
    let axes = i64_values(axes, "Unsqueeze: axes")?;
    let out_rank = x.rank() + axes.len();
    let axes = normalize_axes("Unsqueeze", &axes, out_rank)?;
    let mut dims = x.shape().iter();
    let mut out = Vec::with_capacity(out_rank);
    for i in 0..out_rank {
        if axes.contains(&i) {
            out.push(1);
        } else {
            out.push(dims.next().copied().unwrap_or(1));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Transpose, Expand, Tile, Slice: strided views copied out.
// ---------------------------------------------------------------------------

pub fn transpose(x: &Tensor, perm: Option<&[i64]>) -> Result<Tensor> {
    let rank = x.rank();
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => {
            if p.len() != rank {
                return Err(invalid!(
                    "Transpose: perm {p:?} has {} entries but the input has rank {rank}",
                    p.len()
                ));
            }
            normalize_axes("Transpose", p, rank)
                .map_err(|e| invalid!("{e} (perm {p:?} must be a permutation of 0..{rank})"))?
        }
    };
    let shape = x.shape();
    let in_strides = istrides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    // NCHW <-> NHWC of f32 (the edges of the optimizer's channels-last
    // regions): a batch of matrix transposes, in tiles.
    if let (Some(v), 4) = (x.as_slice::<f32>(), rank) {
        let n = shape[0];
        if perm == [0, 2, 3, 1] {
            let hw = shape[2] * shape[3];
            return tensor(
                out_shape,
                TensorData::F32(batched_transpose(v, n, shape[1], hw)),
            );
        }
        if perm == [0, 3, 1, 2] {
            let hw = shape[1] * shape[2];
            return tensor(
                out_shape,
                TensorData::F32(batched_transpose(v, n, hw, shape[3])),
            );
        }
    }
    let out_strides: Vec<isize> = perm.iter().map(|&p| in_strides[p]).collect();
    // permute_copy measured slower than strided_copy here; not wired.
    let data = map_data!(x.data(), v => strided_copy(v, 0, &out_shape, &out_strides));
    tensor(out_shape, data)
}

/// `batch` row-major `rows x cols` matrices, each transposed. Tasks of 16
/// output rows; each copies 16 x 16 tiles, so both sides stay in cache lines.
fn batched_transpose(src: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = crate::buffers::take_f32(batch * rows * cols);
    batched_transpose_into(src, batch, rows, cols, &mut out);
    out
}

/// [`batched_transpose`] into `out` (`batch * rows * cols` floats).
pub(crate) fn batched_transpose_into(
    src: &[f32],
    batch: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
) {
    batched_transpose_then(src, batch, rows, cols, out, |_, _, _| {});
}

/// [`batched_transpose_into`], then `post(b, c, row)` on each output row
/// (row `c` of matrix `b`) right after its task wrote it, while it is in
/// cache.
pub(crate) fn batched_transpose_then(
    src: &[f32],
    batch: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
    post: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    const T: usize = 16;
    let mat = rows * cols;
    assert!(src.len() >= batch * mat && out.len() == batch * mat);
    if out.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::is_x86_feature_detected!("avx512f");
    // Output row block (b, c0) is out[b][c0..c0 + 16][..]: contiguous.
    let blocks_per = cols.div_ceil(T);
    let task = |bi: usize, dst: &mut [f32]| {
        let (b, c0) = (bi / blocks_per, (bi % blocks_per) * T);
        let s = &src[b * mat..(b + 1) * mat];
        let nc = T.min(cols - c0);
        for r0 in (0..rows).step_by(T) {
            let nr = T.min(rows - r0);
            #[cfg(target_arch = "x86_64")]
            if nr == T && nc == T && avx512 {
                // SAFETY: AVX-512F was detected; the tile's 16 source rows
                // of 16 floats from (r0, c0) lie inside matrix b (r0 + 16
                // <= rows, c0 + 16 <= cols), and its 16 destination rows
                // of 16 floats from column r0 inside `dst` (16 rows of
                // `rows` floats).
                unsafe {
                    transpose_tile16(
                        s[r0 * cols + c0..].as_ptr(),
                        cols,
                        dst[r0..].as_mut_ptr(),
                        rows,
                    )
                };
                continue;
            }
            for c in 0..nc {
                let d = &mut dst[c * rows + r0..c * rows + r0 + nr];
                for (r, o) in d.iter_mut().enumerate() {
                    *o = s[(r0 + r) * cols + c0 + c];
                }
            }
        }
        for (c, row) in dst.chunks_exact_mut(rows).enumerate() {
            post(b, c0 + c, row);
        }
    };
    // Split the output at matrix boundaries and every 16 rows within.
    let chunks: Vec<(usize, &mut [f32])> = out
        .chunks_mut(mat)
        .enumerate()
        .flat_map(|(b, m)| {
            m.chunks_mut(T * rows)
                .enumerate()
                .map(move |(k, d)| (b * blocks_per + k, d))
        })
        .collect();
    if mat * batch >= 1 << 15 {
        chunks.into_par_iter().for_each(|(bi, d)| task(bi, d));
    } else {
        chunks.into_iter().for_each(|(bi, d)| task(bi, d));
    }
}

/// One 16 x 16 tile: `d[c * ld_d + r] = s[r * ld_s + c]`, in registers.
///
/// # Safety
/// AVX-512F; `s` has 16 rows of 16 readable floats `ld_s` apart, `d` 16
/// rows of 16 writable ones `ld_d` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile16(s: *const f32, ld_s: usize, d: *mut f32, ld_d: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let mut v: [__m512; 16] = std::array::from_fn(|r| _mm512_loadu_ps(s.add(r * ld_s)));
        crate::nn::transpose16(&mut v);
        for (c, vc) in v.iter().enumerate() {
            _mm512_storeu_ps(d.add(c * ld_d), *vc);
        }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// Transpose's fast copy for plain-data element types: the layout of
/// [`strided_copy`] (size-1 dims dropped, contiguous dims merged; whole inner
/// runs copied with `copy_from_slice`; a swap of the two innermost axes done
/// in cache-sized tiles), with the outer blocks split across threads when the
/// tensor is large. `strides` are the source strides of each output dim (a
/// permutation of the input's, so every offset is in range and non-negative).
fn permute_copy<T: Copy + Default + Send + Sync>(
    src: &[T],
    shape: &[usize],
    strides: &[isize],
) -> Vec<T> {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        let s = s as usize;
        if let Some(last) = dims.last_mut() {
            if last.1 == s * d {
                last.0 *= d;
                last.1 = s;
                continue;
            }
        }
        dims.push((d, s));
    }
    let (inner_len, inner_stride) = dims.pop().unwrap_or((1, 1));
    // The tile case: the dim before the last is contiguous in the source.
    let tile_rows = match dims.last() {
        Some(&(rows, 1)) if inner_stride != 1 => {
            dims.pop();
            Some(rows)
        }
        _ => None,
    };
    let block = inner_len * tile_rows.unwrap_or(1);
    let outer = n / block;
    // Copies outer blocks [first, first + dst.len() / block) into dst.
    let run = |first: usize, dst: &mut [T]| {
        // Source offset of outer block `first`, and the counter to walk on.
        let mut counter = vec![0usize; dims.len()];
        let mut base = 0usize;
        let mut rem = first;
        for k in (0..dims.len()).rev() {
            counter[k] = rem % dims[k].0;
            rem /= dims[k].0;
            base += counter[k] * dims[k].1;
        }
        for d in dst.chunks_exact_mut(block) {
            match tile_rows {
                Some(rows) => tile_transpose(src, base, rows, inner_len, inner_stride, d),
                None if inner_stride == 1 => d.copy_from_slice(&src[base..base + inner_len]),
                None => {
                    for (i, o) in d.iter_mut().enumerate() {
                        *o = src[base + i * inner_stride];
                    }
                }
            }
            for k in (0..dims.len()).rev() {
                counter[k] += 1;
                base += dims[k].1;
                if counter[k] < dims[k].0 {
                    break;
                }
                base -= dims[k].1 * dims[k].0;
                counter[k] = 0;
            }
        }
    };
    let mut out = vec![T::default(); n];
    if n < crate::fastmath::PAR_MIN || outer < 2 {
        run(0, &mut out);
    } else {
        let per = (crate::fastmath::PAR_CHUNK / block).max(1);
        out.par_chunks_mut(per * block)
            .enumerate()
            .for_each(|(t, d)| run(t * per, d));
    }
    out
}

#[cfg_attr(not(test), allow(dead_code))]
/// `dst[i * cols + j] = src[base + i + j * stride]` in square tiles (the
/// `Copy` twin of [`transpose_block`]).
fn tile_transpose<T: Copy>(
    src: &[T],
    base: usize,
    rows: usize,
    cols: usize,
    stride: usize,
    dst: &mut [T],
) {
    const TILE: usize = 16;
    for i0 in (0..rows).step_by(TILE) {
        let i1 = (i0 + TILE).min(rows);
        for j0 in (0..cols).step_by(TILE) {
            let j1 = (j0 + TILE).min(cols);
            for i in i0..i1 {
                let drow = &mut dst[i * cols + j0..i * cols + j1];
                let mut p = base + i + j0 * stride;
                for d in drow.iter_mut() {
                    *d = src[p];
                    p += stride;
                }
            }
        }
    }
}

pub fn expand(x: &Tensor, shape: &Tensor) -> Result<Tensor> {
    let req = vector_values("Expand", shape, "shape")?;
    let req: Vec<usize> = req
        .iter()
        .map(|&d| dim_from_i64("Expand", "shape dimension", d))
        .collect::<Result<_>>()?;
    let out_shape = broadcast_shape(x.shape(), &req).map_err(|e| invalid!("Expand: {e}"))?;
    output_len("Expand", &out_shape)?;
    let in_shape = x.shape();
    let pad = out_shape.len() - in_shape.len();
    let in_strides = istrides(in_shape);
    let eff: Vec<isize> = (0..out_shape.len())
        .map(|i| {
            if i < pad || in_shape[i - pad] == 1 {
                0
            } else {
                in_strides[i - pad]
            }
        })
        .collect();
    let data = map_data!(x.data(), v => strided_copy(v, 0, &out_shape, &eff));
    tensor(out_shape, data)
}

pub fn tile(x: &Tensor, repeats: &Tensor) -> Result<Tensor> {
    let reps = vector_values("Tile", repeats, "repeats")?;
    let shape = x.shape();
    if reps.len() != shape.len() {
        return Err(invalid!(
            "Tile: repeats {reps:?} has {} entries but the input has rank {}",
            reps.len(),
            shape.len()
        ));
    }
    let reps: Vec<usize> = reps
        .iter()
        .map(|&r| dim_from_i64("Tile", "repeats", r))
        .collect::<Result<_>>()?;
    let out_shape: Vec<usize> = shape
        .iter()
        .zip(&reps)
        .map(|(&d, &r)| d.checked_mul(r))
        .collect::<Option<_>>()
        .ok_or_else(|| invalid!("Tile: tiling {shape:?} by {reps:?} overflows"))?;
    output_len("Tile", &out_shape)?;
    // Row-major, an output of shape [r0*d0, r1*d1, ...] is the view
    // [r0, d0, r1, d1, ...] of the input with stride 0 along each r.
    let in_strides = istrides(shape);
    let mut view_shape = Vec::with_capacity(2 * shape.len());
    let mut view_strides = Vec::with_capacity(2 * shape.len());
    for i in 0..shape.len() {
        view_shape.extend([reps[i], shape[i]]);
        view_strides.extend([0, in_strides[i]]);
    }
    let data = map_data!(x.data(), v => strided_copy(v, 0, &view_shape, &view_strides));
    tensor(out_shape, data)
}

pub fn slice(
    x: &Tensor,
    starts: &Tensor,
    ends: &Tensor,
    axes: Option<&Tensor>,
    steps: Option<&Tensor>,
) -> Result<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    let starts = vector_values("Slice", starts, "starts")?;
    let ends = vector_values("Slice", ends, "ends")?;
    let n = starts.len();
    if ends.len() != n {
        return Err(invalid!(
            "Slice: starts {starts:?} and ends {ends:?} have different lengths"
        ));
    }
    let axes: Vec<usize> = match axes {
        Some(t) => {
            let a = vector_values("Slice", t, "axes")?;
            if a.len() != n {
                return Err(invalid!(
                    "Slice: axes {a:?} has {} entries but starts has {n}",
                    a.len()
                ));
            }
            normalize_axes("Slice", &a, rank)?
        }
        None => {
            if n > rank {
                return Err(invalid!(
                    "Slice: {n} starts given for an input of rank {rank}"
                ));
            }
            (0..n).collect()
        }
    };
    let steps: Vec<i64> = match steps {
        Some(t) => {
            let s = vector_values("Slice", t, "steps")?;
            if s.len() != n {
                return Err(invalid!(
                    "Slice: steps {s:?} has {} entries but starts has {n}",
                    s.len()
                ));
            }
            s
        }
        None => vec![1; n],
    };

    let in_strides = istrides(shape);
    let mut out_shape = shape.to_vec();
    let mut view_strides = in_strides.clone();
    let mut offset: isize = 0;
    for i in 0..n {
        let ax = axes[i];
        let step = steps[i] as i128;
        if step == 0 {
            return Err(invalid!("Slice: step for axis {ax} is 0"));
        }
        let dim = shape[ax] as i128;
        let mut start = starts[i] as i128;
        let mut end = ends[i] as i128;
        if start < 0 {
            start += dim;
        }
        if end < 0 {
            end += dim;
        }
        let count = if step > 0 {
            start = start.max(0).min(dim);
            end = end.max(0).min(dim);
            (end - start + step - 1).div_euclid(step).max(0)
        } else {
            start = start.max(0).min(dim - 1);
            end = end.max(-1).min(dim - 1);
            (start - end - step - 1).div_euclid(-step).max(0)
        };
        // 0 <= count <= dim, so these conversions cannot fail.
        out_shape[ax] = count as usize;
        if count > 0 {
            offset += start as isize * in_strides[ax];
            view_strides[ax] = in_strides[ax] * step as isize;
        }
    }
    if out_shape.contains(&0) {
        return tensor(out_shape, TensorData::zeros(x.dtype(), 0));
    }
    let data =
        map_data!(x.data(), v => strided_copy(v, offset as usize, &out_shape, &view_strides));
    tensor(out_shape, data)
}

// ---------------------------------------------------------------------------
// Concat and Split: contiguous runs along an axis.
// ---------------------------------------------------------------------------

fn concat_typed<T: Element>(
    xs: &[&Tensor],
    outer: usize,
    runs: &[usize],
    total: usize,
) -> Result<Vec<T>> {
    let slices: Vec<&[T]> = xs
        .iter()
        .map(|x| {
            x.as_slice::<T>()
                .ok_or_else(|| invalid!("Concat: inputs have different dtypes"))
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(total);
    for o in 0..outer {
        for (s, &run) in slices.iter().zip(runs) {
            if run > 0 {
                out.extend_from_slice(&s[o * run..(o + 1) * run]);
            }
        }
    }
    Ok(out)
}

pub fn concat(xs: &[&Tensor], axis: i64) -> Result<Tensor> {
    let first = xs
        .first()
        .ok_or_else(|| invalid!("Concat: needs at least one input"))?;
    let rank = first.rank();
    if rank == 0 {
        return Err(invalid!("Concat: cannot concatenate scalars (rank 0)"));
    }
    let ax = normalize_axis(axis, rank).map_err(|e| invalid!("Concat: {e}"))?;
    let mut out_shape = first.shape().to_vec();
    out_shape[ax] = 0;
    for (i, x) in xs.iter().enumerate() {
        if x.dtype() != first.dtype() {
            return Err(invalid!(
                "Concat: input {i} has dtype {} but input 0 has {}",
                x.dtype(),
                first.dtype()
            ));
        }
        if x.rank() != rank {
            return Err(invalid!(
                "Concat: input {i} has shape {:?} of rank {} but input 0 has shape {:?}",
                x.shape(),
                x.rank(),
                first.shape()
            ));
        }
        for (d, (&a, &b)) in x.shape().iter().zip(first.shape()).enumerate() {
            if d != ax && a != b {
                return Err(invalid!(
                    "Concat: input {i} has shape {:?}, which differs from input 0's {:?} on axis {d} \
                     (only axis {ax} may differ)",
                    x.shape(),
                    first.shape()
                ));
            }
        }
        out_shape[ax] = out_shape[ax]
            .checked_add(x.shape()[ax])
            .ok_or_else(|| invalid!("Concat: the concatenated axis size overflows"))?;
    }
    let total = output_len("Concat", &out_shape)?;
    let outer: usize = first.shape()[..ax].iter().product();
    let inner: usize = first.shape()[ax + 1..].iter().product();
    let runs: Vec<usize> = xs.iter().map(|x| x.shape()[ax] * inner).collect();
    if total >= PAR_CONCAT_MIN {
        let f32s: Option<Vec<&[f32]>> = xs.iter().map(|x| x.as_slice::<f32>()).collect();
        if let Some(slices) = f32s {
            let data = concat_f32_parallel(&slices, &runs, total);
            return tensor(out_shape, TensorData::F32(data));
        }
    }
    let data = map_data!(first.data(), _v => concat_typed(xs, outer, &runs, total)?);
    tensor(out_shape, data)
}

/// Outputs of at least this many elements are copied by [`concat_f32_parallel`].
const PAR_CONCAT_MIN: usize = 1 << 16;

/// f32 Concat in parallel: the output cut into equal chunks, each filled
/// from whichever inputs' runs it spans. (A serial copy ran at 20 GB/s:
/// YOLOv8n's 33 Concats took 0.8 ms of its 8.6.) Every input's `runs[i]`
/// elements per outer index follow each other in the output.
fn concat_f32_parallel(slices: &[&[f32]], runs: &[usize], total: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let period: usize = runs.iter().sum();
    let mut out = crate::buffers::take_f32(total);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, dst)| {
        let start = ci * CHUNK;
        let mut pos = start;
        let end = start + dst.len();
        while pos < end {
            let (o, mut r) = (pos / period, pos % period);
            let mut k = 0;
            while r >= runs[k] {
                r -= runs[k];
                k += 1;
            }
            let n = (runs[k] - r).min(end - pos);
            dst[pos - start..pos - start + n]
                .copy_from_slice(&slices[k][o * runs[k] + r..o * runs[k] + r + n]);
            pos += n;
        }
    });
    out
}

pub fn split(x: &Tensor, split: Option<&Tensor>, axis: i64, parts: usize) -> Result<Vec<Tensor>> {
    let shape = x.shape();
    if shape.is_empty() {
        return Err(invalid!("Split: cannot split a scalar (rank 0)"));
    }
    let ax = normalize_axis(axis, shape.len()).map_err(|e| invalid!("Split: {e}"))?;
    let dim = shape[ax];
    let sizes: Vec<usize> = match split {
        Some(t) => {
            let s = i64_values(t, "Split: split")?;
            let s: Vec<usize> = s
                .iter()
                .map(|&v| dim_from_i64("Split", "split sizes", v))
                .collect::<Result<_>>()?;
            if s.len() != parts {
                return Err(invalid!(
                    "Split: split sizes {s:?} give {} outputs but the node has {parts}",
                    s.len()
                ));
            }
            let sum = s.iter().try_fold(0usize, |a, &b| a.checked_add(b));
            if sum != Some(dim) {
                return Err(invalid!(
                    "Split: split sizes {s:?} do not sum to the size {dim} of axis {ax} of shape {shape:?}"
                ));
            }
            s
        }
        None => {
            if parts == 0 {
                return Err(invalid!("Split: number of outputs must be positive"));
            }
            // Equal chunks of ceil(dim / parts); the last one takes what is left.
            let chunk = dim.div_ceil(parts);
            let used = chunk * (parts - 1);
            if used > dim {
                return Err(invalid!(
                    "Split: cannot split axis {ax} of size {dim} (shape {shape:?}) into {parts} parts"
                ));
            }
            let mut s = vec![chunk; parts];
            s[parts - 1] = dim - used;
            s
        }
    };
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product();
    let mut outs = Vec::with_capacity(sizes.len());
    let mut off = 0;
    for &len in &sizes {
        let mut out_shape = shape.to_vec();
        out_shape[ax] = len;
        let data = match x.data() {
            // f32 parts from 4 KiB up into recycled buffers (big fresh
            // ones page-fault on every run), copied on the pool when big:
            // GPT-2's QKV Split at batch 8 (3 x 3 MiB a layer), 12 ops
            // 8.4 -> 4.8 ms on 2 threads.
            TensorData::F32(v) => {
                let mut out = crate::buffers::take_f32(outer * len * inner);
                copy_along_axis(v, outer, dim, inner, off, len, &mut out);
                TensorData::F32(out)
            }
            d => map_data!(d, v => take_along_axis(v, outer, dim, inner, off, len)),
        };
        outs.push(tensor(out_shape, data)?);
        off += len;
    }
    Ok(outs)
}

// ---------------------------------------------------------------------------
// Gather, GatherElements.
// ---------------------------------------------------------------------------

fn gather_blocks<T: Clone>(
    src: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    idx: &[usize],
    total: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(total);
    if inner == 0 {
        return out;
    }
    for o in 0..outer {
        let base = o * dim;
        for &i in idx {
            let start = (base + i) * inner;
            out.extend_from_slice(&src[start..start + inner]);
        }
    }
    out
}

/// Resolves possibly negative indices against an axis of size `dim`.
fn resolve_indices(op: &str, raw: &[i64], dim: usize, axis: usize) -> Result<Vec<usize>> {
    let d = dim as i64;
    raw.iter()
        .map(|&i| {
            let j = if i < 0 { i + d } else { i };
            if (0..d).contains(&j) {
                Ok(j as usize)
            } else {
                Err(invalid!(
                    "{op}: index {i} is out of range for axis {axis} of size {dim} (allowed [{}, {}])",
                    -d,
                    d - 1
                ))
            }
        })
        .collect()
}

/// Gather's indices into an axis of size `dim`, negative ones resolved, each
/// checked to be in range.
pub(crate) fn gather_indices(idx: &Tensor, dim: usize, axis: usize) -> Result<Vec<usize>> {
    let raw = index_values("Gather", idx)?;
    resolve_indices("Gather", &raw, dim, axis)
}

pub fn gather(x: &Tensor, idx: &Tensor, axis: i64) -> Result<Tensor> {
    let shape = x.shape();
    if shape.is_empty() {
        return Err(invalid!("Gather: data must have rank >= 1, got a scalar"));
    }
    let ax = normalize_axis(axis, shape.len()).map_err(|e| invalid!("Gather: {e}"))?;
    let dim = shape[ax];
    let resolved = gather_indices(idx, dim, ax)?;
    let mut out_shape = shape[..ax].to_vec();
    out_shape.extend_from_slice(idx.shape());
    out_shape.extend_from_slice(&shape[ax + 1..]);
    let total = output_len("Gather", &out_shape)?;
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product();
    let data = map_data!(x.data(), v => gather_blocks(v, outer, dim, inner, &resolved, total));
    tensor(out_shape, data)
}

pub fn gather_elements(x: &Tensor, idx: &Tensor, axis: i64) -> Result<Tensor> {
    let shape = x.shape();
    let ishape = idx.shape();
    let rank = shape.len();
    if rank == 0 {
        return Err(invalid!(
            "GatherElements: data must have rank >= 1, got a scalar"
        ));
    }
    if ishape.len() != rank {
        return Err(invalid!(
            "GatherElements: indices shape {ishape:?} must have the same rank as data shape {shape:?}"
        ));
    }
    let ax = normalize_axis(axis, rank).map_err(|e| invalid!("GatherElements: {e}"))?;
    for (d, (&i, &s)) in ishape.iter().zip(shape).enumerate() {
        if d != ax && i > s {
            return Err(invalid!(
                "GatherElements: indices shape {ishape:?} exceeds data shape {shape:?} on axis {d}"
            ));
        }
    }
    let raw = index_values("GatherElements", idx)?;
    let resolved = resolve_indices("GatherElements", &raw, shape[ax], ax)?;
    // Data offset of each index position, with the gathered axis contributing 0.
    let n = resolved.len();
    let mut offsets = Vec::with_capacity(n);
    if n > 0 {
        let ds = strides(shape);
        let mut counter = vec![0usize; rank];
        let mut base = 0usize;
        for &r in &resolved {
            offsets.push(base + r * ds[ax]);
            for k in (0..rank).rev() {
                counter[k] += 1;
                let step = if k == ax { 0 } else { ds[k] };
                base += step;
                if counter[k] < ishape[k] {
                    break;
                }
                base -= step * counter[k];
                counter[k] = 0;
            }
        }
    }
    let data = x.data().gather(offsets.into_iter());
    tensor(ishape.to_vec(), data)
}

// ---------------------------------------------------------------------------
// Pad.
// ---------------------------------------------------------------------------

/// One piece of an output row along the innermost padded axis.
enum Seg {
    /// Copy `len` input elements starting at this offset (relative to the row).
    Run(usize, usize),
    /// `len` copies of the pad value.
    Fill(usize),
}

/// For each output position along one axis, the input position it reads
/// (`None`: the constant value). `d` is the axis size after cropping, `lo` the
/// first kept input position, `pad_lo` the number of positions added in front.
fn pad_axis_map(
    mode: PadMode,
    d: usize,
    lo: usize,
    pad_lo: usize,
    out_d: usize,
    axis: usize,
) -> Result<Vec<Option<usize>>> {
    if out_d > d && mode != PadMode::Constant {
        if d == 0 {
            return Err(invalid!(
                "Pad: cannot pad axis {axis} in {mode:?} mode: it has no elements to read from"
            ));
        }
        if mode == PadMode::Reflect && d == 1 {
            return Err(invalid!(
                "Pad: reflect mode needs at least 2 elements along axis {axis}, it has 1"
            ));
        }
    }
    let d_i = d as i64;
    let map = (0..out_d)
        .map(|o| {
            let c = o as i64 - pad_lo as i64;
            let c = if (0..d_i).contains(&c) {
                Some(c)
            } else {
                match mode {
                    PadMode::Constant => None,
                    PadMode::Edge => Some(c.clamp(0, d_i - 1)),
                    PadMode::Wrap => Some(c.rem_euclid(d_i)),
                    PadMode::Reflect => {
                        let period = 2 * (d_i - 1);
                        let m = c.rem_euclid(period);
                        Some(if m >= d_i { period - m } else { m })
                    }
                }
            };
            c.map(|c| c as usize + lo)
        })
        .collect();
    Ok(map)
}

fn pad_typed<T: Clone>(
    src: &[T],
    in_shape: &[usize],
    out_shape: &[usize],
    maps: &[Vec<Option<usize>>],
    last: usize,
    value: &T,
    total: usize,
) -> Vec<T> {
    // Axes after `last` are not padded: they form contiguous blocks.
    let block: usize = in_shape[last + 1..].iter().product();
    let in_strides = strides(in_shape);
    // Segments of one output row along axis `last`, in elements.
    let mut segs: Vec<Seg> = Vec::new();
    for m in &maps[last] {
        match (*m, segs.last_mut()) {
            (None, Some(Seg::Fill(len))) => *len += block,
            (None, _) => segs.push(Seg::Fill(block)),
            (Some(i), Some(Seg::Run(start, len))) if *start + *len == i * block => *len += block,
            (Some(i), _) => segs.push(Seg::Run(i * block, block)),
        }
    }
    let row_len = out_shape[last] * block;
    let rows: usize = out_shape[..last].iter().product();
    let mut out = Vec::with_capacity(total);
    let mut counter = vec![0usize; last];
    for _ in 0..rows {
        let mut base = Some(0usize);
        for (k, &c) in counter.iter().enumerate() {
            base = match (base, maps[k][c]) {
                (Some(b), Some(i)) => Some(b + i * in_strides[k]),
                _ => None,
            };
        }
        match base {
            None => out.resize(out.len() + row_len, value.clone()),
            Some(b) => {
                for s in &segs {
                    match *s {
                        Seg::Run(start, len) => {
                            out.extend_from_slice(&src[b + start..b + start + len])
                        }
                        Seg::Fill(len) => out.resize(out.len() + len, value.clone()),
                    }
                }
            }
        }
        for k in (0..last).rev() {
            counter[k] += 1;
            if counter[k] < out_shape[k] {
                break;
            }
            counter[k] = 0;
        }
    }
    out
}

/// The constant pad value: the given one-element tensor, or zero / false / "".
fn pad_value<T: Element>(value: Option<&Tensor>) -> Result<T> {
    let zero = TensorData::zeros(T::DTYPE, 1);
    let v = match value {
        Some(t) if !t.is_empty() => T::slice(t.data()),
        _ => T::slice(&zero),
    };
    v.and_then(|s| s.first().cloned())
        .ok_or_else(|| invalid!("Pad: constant_value has the wrong dtype"))
}

pub fn pad(
    mode: PadMode,
    x: &Tensor,
    pads: &Tensor,
    value: Option<&Tensor>,
    axes: Option<&Tensor>,
) -> Result<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    let pads = vector_values("Pad", pads, "pads")?;
    let axes: Vec<usize> = match axes {
        Some(t) => normalize_axes("Pad", &i64_values(t, "Pad: axes")?, rank)?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(invalid!(
            "Pad: pads {pads:?} must have 2 * {} = {} entries for input shape {shape:?}",
            axes.len(),
            2 * axes.len()
        ));
    }
    if let Some(v) = value {
        if mode == PadMode::Constant {
            if v.dtype() != x.dtype() {
                return Err(invalid!(
                    "Pad: constant_value has dtype {} but data has {}",
                    v.dtype(),
                    x.dtype()
                ));
            }
            if v.len() > 1 {
                return Err(invalid!(
                    "Pad: constant_value must be a scalar, got shape {:?}",
                    v.shape()
                ));
            }
        }
    }
    // Per axis: (pad before, pad after), negative values crop.
    let mut per_axis = vec![(0i64, 0i64); rank];
    for (i, &a) in axes.iter().enumerate() {
        per_axis[a] = (pads[i], pads[i + axes.len()]);
    }
    if per_axis.iter().all(|&p| p == (0, 0)) {
        return Ok(x.clone());
    }
    let mut out_shape = Vec::with_capacity(rank);
    let mut geom = Vec::with_capacity(rank); // (kept size, first kept, pad before)
    for (a, (&d, &(b, e))) in shape.iter().zip(&per_axis).enumerate() {
        let crop = (b.min(0) as i128).abs() + (e.min(0) as i128).abs();
        if crop > d as i128 {
            return Err(invalid!(
                "Pad: pads ({b}, {e}) crop more than the {d} elements of axis {a} of shape {shape:?}"
            ));
        }
        let kept = d as i128 - crop;
        let out_d = kept + b.max(0) as i128 + e.max(0) as i128;
        let out_d = usize::try_from(out_d)
            .map_err(|_| invalid!("Pad: padded size of axis {a} is too large"))?;
        out_shape.push(out_d);
        geom.push((kept as usize, (-b).max(0) as usize, b.max(0) as usize));
    }
    let total = output_len("Pad", &out_shape)?;
    if total == 0 {
        return tensor(out_shape, TensorData::zeros(x.dtype(), 0));
    }
    let mut maps = Vec::with_capacity(rank);
    for (a, &(kept, lo, pad_lo)) in geom.iter().enumerate() {
        maps.push(pad_axis_map(mode, kept, lo, pad_lo, out_shape[a], a)?);
    }
    let last = per_axis
        .iter()
        .rposition(|&p| p != (0, 0))
        .unwrap_or(rank - 1);
    let value = if mode == PadMode::Constant {
        value
    } else {
        None
    };
    let data = map_data!(x.data(), v => {
        let fill = pad_value(value)?;
        pad_typed(v, shape, &out_shape, &maps, last, &fill, total)
    });
    tensor(out_shape, data)
}

// ---------------------------------------------------------------------------
// Shape, ConstantOfShape, Range.
// ---------------------------------------------------------------------------

pub fn shape(x: &Tensor, start: i64, end: Option<i64>) -> Tensor {
    let r = x.rank() as i64;
    let clamp = |a: i64| (if a < 0 { a + r } else { a }).clamp(0, r) as usize;
    let s = clamp(start);
    let e = clamp(end.unwrap_or(r)).max(s);
    Tensor::vector(
        x.shape()[s..e]
            .iter()
            .map(|&d| d as i64)
            .collect::<Vec<i64>>(),
    )
}

pub fn constant_of_shape(shape: &Tensor, value: &Tensor) -> Result<Tensor> {
    let dims = vector_values("ConstantOfShape", shape, "shape")?;
    let dims: Vec<usize> = dims
        .iter()
        .map(|&d| dim_from_i64("ConstantOfShape", "shape dimensions", d))
        .collect::<Result<_>>()?;
    if value.len() != 1 {
        return Err(invalid!(
            "ConstantOfShape: value must hold exactly one element, got shape {:?}",
            value.shape()
        ));
    }
    let n = output_len("ConstantOfShape", &dims)?;
    let data = map_data!(value.data(), v => filled(v, n));
    tensor(dims, data)
}

/// `n` copies of the first element of `v` (which the caller checked exists).
fn filled<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    v.first().map(|x| vec![x.clone(); n]).unwrap_or_default()
}

/// Element count of an integer range, computed exactly.
fn int_range_count(start: i128, limit: i128, delta: i128) -> Result<usize> {
    if delta == 0 {
        return Err(invalid!("Range: delta must not be 0"));
    }
    let diff = limit - start;
    let n = if delta > 0 {
        (diff + delta - 1).div_euclid(delta)
    } else {
        (-diff - delta - 1).div_euclid(-delta)
    }
    .max(0);
    range_count_ok(n as f64, usize::try_from(n).ok())
}

fn range_count_ok(approx: f64, n: Option<usize>) -> Result<usize> {
    match n {
        Some(n) if n <= MAX_OUTPUT_ELEMENTS => Ok(n),
        _ => Err(invalid!(
            "Range: the range has {approx} elements, more than the limit of {MAX_OUTPUT_ELEMENTS}"
        )),
    }
}

/// Element count of a float range: max(ceil((limit - start) / delta), 0).
fn float_range_count(diff: f64, delta: f64) -> Result<usize> {
    if delta == 0.0 {
        return Err(invalid!("Range: delta must not be 0"));
    }
    let n = (diff / delta).ceil();
    if n.is_nan() {
        return Err(invalid!(
            "Range: the element count is not a number (start, limit or delta is NaN)"
        ));
    }
    if n <= 0.0 {
        return Ok(0);
    }
    let exact = if n <= MAX_OUTPUT_ELEMENTS as f64 {
        Some(n as usize)
    } else {
        None
    };
    range_count_ok(n, exact)
}

pub fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor> {
    for (t, name) in [(start, "start"), (limit, "limit"), (delta, "delta")] {
        if t.len() != 1 {
            return Err(invalid!(
                "Range: {name} must be a scalar, got shape {:?}",
                t.shape()
            ));
        }
        if t.dtype() != start.dtype() {
            return Err(invalid!(
                "Range: start, limit and delta must have the same dtype, got {}, {} and {}",
                start.dtype(),
                limit.dtype(),
                delta.dtype()
            ));
        }
    }
    macro_rules! int_range {
        ($t:ty, $s:expr, $l:expr, $d:expr) => {{
            let (s, l, d) = ($s[0] as i128, $l[0] as i128, $d[0] as i128);
            let n = int_range_count(s, l, d)?;
            Tensor::vector::<$t>((0..n).map(|i| (s + i as i128 * d) as $t).collect())
        }};
    }
    macro_rules! float_range {
        ($t:ty, $s:expr, $l:expr, $d:expr, $to:expr, $from:expr) => {{
            let to: fn($t) -> f64 = $to;
            let from: fn(f64) -> $t = $from;
            let (s, l, d) = ($s[0], $l[0], $d[0]);
            // Like ORT: the difference in the element type, the division in f64.
            let n = float_range_count(to(l - s), to(d))?;
            let (s, d) = (to(s), to(d));
            Tensor::vector::<$t>((0..n).map(|i| from(s + i as f64 * d)).collect())
        }};
    }
    use TensorData as D;
    let out = match (start.data(), limit.data(), delta.data()) {
        (D::F32(s), D::F32(l), D::F32(d)) => {
            float_range!(f32, s, l, d, |x| x as f64, |x| x as f32)
        }
        (D::F64(s), D::F64(l), D::F64(d)) => float_range!(f64, s, l, d, |x| x, |x| x),
        (D::F16(s), D::F16(l), D::F16(d)) => {
            float_range!(half::f16, s, l, d, |x| x.to_f64(), half::f16::from_f64)
        }
        (D::BF16(s), D::BF16(l), D::BF16(d)) => {
            float_range!(half::bf16, s, l, d, |x| x.to_f64(), half::bf16::from_f64)
        }
        (D::I8(s), D::I8(l), D::I8(d)) => int_range!(i8, s, l, d),
        (D::I16(s), D::I16(l), D::I16(d)) => int_range!(i16, s, l, d),
        (D::I32(s), D::I32(l), D::I32(d)) => int_range!(i32, s, l, d),
        (D::I64(s), D::I64(l), D::I64(d)) => int_range!(i64, s, l, d),
        (D::U8(s), D::U8(l), D::U8(d)) => int_range!(u8, s, l, d),
        (D::U16(s), D::U16(l), D::U16(d)) => int_range!(u16, s, l, d),
        (D::U32(s), D::U32(l), D::U32(d)) => int_range!(u32, s, l, d),
        (D::U64(s), D::U64(l), D::U64(d)) => int_range!(u64, s, l, d),
        _ => {
            return Err(invalid!(
                "Range: unsupported dtype {} (expected a numeric type)",
                start.dtype()
            ))
        }
    };
    Ok(out)
}

// ---------------------------------------------------------------------------
// Trilu.
// ---------------------------------------------------------------------------

fn trilu_typed<T: Clone + Default>(src: &[T], n: usize, m: usize, k: i64, upper: bool) -> Vec<T> {
    let mut out = src.to_vec();
    if n == 0 || m == 0 {
        return out;
    }
    let clamp = |c: i128| c.clamp(0, m as i128) as usize;
    for mat in out.chunks_mut(n * m) {
        for (i, row) in mat.chunks_mut(m).enumerate() {
            // Kept: j - i >= k (upper) or j - i <= k (lower).
            let diag = i as i128 + k as i128;
            let (a, b) = if upper {
                (0, clamp(diag))
            } else {
                (clamp(diag + 1), m)
            };
            row[a..b].fill(T::default());
        }
    }
    out
}

pub fn trilu(x: &Tensor, k: Option<&Tensor>, upper: bool) -> Result<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    if rank < 2 {
        return Err(invalid!(
            "Trilu: input must have rank >= 2, got shape {shape:?}"
        ));
    }
    let k = match k {
        Some(t) => scalar_i64("Trilu", t, "k")?,
        None => 0,
    };
    let (n, m) = (shape[rank - 2], shape[rank - 1]);
    let data = map_data!(x.data(), v => trilu_typed(v, n, m, k, upper));
    tensor(shape.to_vec(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelError;
    use half::f16;
    use kiln_ir::DType;

    fn t<T: Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }
    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        t(shape, (0..n).map(|i| i as f32).collect())
    }
    fn ints(v: &[i64]) -> Tensor {
        Tensor::vector(v.to_vec())
    }
    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn f(x: &Tensor) -> Vec<f32> {
        x.as_slice::<f32>().unwrap().to_vec()
    }
    fn err_msg(r: Result<Tensor>) -> String {
        match r {
            Err(KernelError::Invalid(m)) => m,
            Err(e) => panic!("expected Invalid, got {e:?}"),
            Ok(t) => panic!("expected an error, got {t:?}"),
        }
    }
    fn no_shape() -> &'static [usize] {
        &[]
    }

    /// Naive reference: element of `shape` at multi-index `idx`.
    fn flat(shape: &[usize], idx: &[usize]) -> usize {
        idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
    }
    fn unflat(shape: &[usize], mut i: usize) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for k in (0..shape.len()).rev() {
            idx[k] = i % shape[k];
            i /= shape[k];
        }
        idx
    }
    // ---- Reshape -------------------------------------------------------

    #[test]
    fn reshape_zero_and_minus_one() {
        let x = iota(&[2, 3, 4]);
        let y = reshape(&x, &ints(&[4, -1]), false).unwrap();
        assert_eq!(y.shape(), &[4, 6]);
        assert_eq!(f(&y), f(&x));
        let y = reshape(&x, &ints(&[0, -1]), false).unwrap();
        assert_eq!(y.shape(), &[2, 12]);
        let y = reshape(&x, &ints(&[0, 0, 2, 2]), false).unwrap();
        assert_eq!(y.shape(), &[2, 3, 2, 2]);
        let y = reshape(&x, &ints(&[-1]), false).unwrap();
        assert_eq!(y.shape(), &[24]);
        let y = reshape(&x, &t(&[3], vec![2i32, -1, 3]), false).unwrap();
        assert_eq!(y.shape(), &[2, 4, 3]);
    }

    #[test]
    fn reshape_scalars() {
        let s = Tensor::scalar(5.0f32);
        assert_eq!(reshape(&s, &ints(&[1, 1]), false).unwrap().shape(), &[1, 1]);
        assert_eq!(reshape(&s, &ints(&[-1]), false).unwrap().shape(), &[1]);
        let one = t(&[1, 1], vec![5.0f32]);
        let y = reshape(&one, &Tensor::vector(Vec::<i64>::new()), false).unwrap();
        assert_eq!(y.shape(), no_shape());
        assert_eq!(f(&y), vec![5.0]);
    }

    #[test]
    fn reshape_allowzero() {
        let x = t::<f32>(&[0, 3], vec![]);
        let y = reshape(&x, &ints(&[3, 0]), true).unwrap();
        assert_eq!(y.shape(), &[3, 0]);
        // Without allowzero the 0 copies input dim 1 (= 3): 9 elements != 0.
        assert!(reshape(&x, &ints(&[3, 0]), false).is_err());
        // allowzero with a non-empty input: 0 really means 0, so it mismatches.
        assert!(reshape(&iota(&[2, 3]), &ints(&[0, 6]), true).is_err());
        assert_eq!(
            reshape(&iota(&[2, 3]), &ints(&[0, 3]), false)
                .unwrap()
                .shape(),
            &[2, 3]
        );
    }

    #[test]
    fn reshape_errors() {
        let x = iota(&[2, 3]);
        let m = err_msg(reshape(&x, &ints(&[4, 2]), false));
        assert!(m.contains("[2, 3]") && m.contains("[4, 2]"), "{m}");
        assert!(err_msg(reshape(&x, &ints(&[-1, -1]), false)).contains("more than one -1"));
        assert!(err_msg(reshape(&x, &ints(&[-2, 3]), false)).contains("-2"));
        assert!(reshape(&x, &ints(&[4, -1]), false).is_err());
        assert!(reshape(&x, &ints(&[0, -1]), true).is_err());
        assert!(reshape(&x, &ints(&[1, 1, 0]), false).is_err());
        // -1 with a zero-size remainder is ambiguous.
        let e = t::<f32>(&[0, 3], vec![]);
        assert!(err_msg(reshape(&e, &ints(&[0, -1]), false)).contains("-1"));
        assert!(reshape(&x, &Tensor::scalar(6i64), false).is_err());
        // Huge dims overflow instead of panicking.
        assert!(reshape(&x, &ints(&[i64::MAX, i64::MAX, 2]), false).is_err());
    }

    // ---- Flatten -------------------------------------------------------

    #[test]
    fn flatten_axes() {
        let x = iota(&[2, 3, 4]);
        assert_eq!(flatten(&x, 0).unwrap().shape(), &[1, 24]);
        assert_eq!(flatten(&x, 1).unwrap().shape(), &[2, 12]);
        assert_eq!(flatten(&x, 3).unwrap().shape(), &[24, 1]);
        assert_eq!(flatten(&x, -1).unwrap().shape(), &[6, 4]);
        assert_eq!(flatten(&x, -3).unwrap().shape(), &[1, 24]);
        assert!(flatten(&x, 4).is_err());
        assert!(flatten(&x, -4).is_err());
        assert_eq!(flatten(&Tensor::scalar(1i64), 0).unwrap().shape(), &[1, 1]);
        assert_eq!(
            flatten(&t::<f32>(&[2, 0, 3], vec![]), 2).unwrap().shape(),
            &[0, 3]
        );
    }

    // ---- Transpose -----------------------------------------------------

    #[test]
    fn transpose_hand_checked() {
        let x = iota(&[2, 3]);
        let y = transpose(&x, None).unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(f(&y), vec![0., 3., 1., 4., 2., 5.]);
        let x = iota(&[2, 2, 3]);
        let y = transpose(&x, Some(&[1, 0, 2])).unwrap();
        assert_eq!(y.shape(), &[2, 2, 3]);
        assert_eq!(
            f(&y),
            vec![0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
        );
        let y = transpose(&x, Some(&[2, 0, 1])).unwrap();
        assert_eq!(y.shape(), &[3, 2, 2]);
        assert_eq!(
            f(&y),
            vec![0., 3., 6., 9., 1., 4., 7., 10., 2., 5., 8., 11.]
        );
    }

    #[test]
    fn transpose_matches_naive_for_all_rank4_perms() {
        let shape = [2, 3, 1, 4];
        let x = iota(&shape);
        for perm in crate::nn::test_util::permutations(4) {
            let p: Vec<i64> = perm.iter().map(|&a| a as i64).collect();
            let y = transpose(&x, Some(&p)).unwrap();
            let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
            assert_eq!(y.shape(), &out_shape[..]);
            let ys = f(&y);
            for (o, &val) in ys.iter().enumerate() {
                let oi = unflat(&out_shape, o);
                let mut ii = vec![0; 4];
                for (j, &a) in perm.iter().enumerate() {
                    ii[a] = oi[j];
                }
                assert_eq!(val, flat(&shape, &ii) as f32, "perm {perm:?}");
            }
        }
    }

    #[test]
    fn parallel_f32_concat_matches_the_serial_copy() {
        // Big enough for the parallel path: the same values concatenated as
        // f32 (parallel chunks) and as i64 (serial), on every axis, with an
        // empty input among them and chunks that span several inputs.
        for (shapes, axis) in [
            (
                vec![[1usize, 8, 48, 48], [1, 24, 48, 48], [1, 0, 48, 48]],
                1i64,
            ),
            (vec![[2, 3, 100, 120], [2, 3, 7, 120], [2, 3, 1, 120]], 2),
            (vec![[3, 5, 40, 200], [3, 5, 40, 1], [3, 5, 40, 63]], 3),
            (vec![[30, 4, 30, 30], [1, 4, 30, 30], [50, 4, 30, 30]], 0),
        ] {
            let mut next = 0i64;
            let mut fl = Vec::new();
            let mut il = Vec::new();
            for s in &shapes {
                let n: usize = s.iter().product();
                let v: Vec<i64> = (next..next + n as i64).collect();
                next += n as i64;
                fl.push(t(s, v.iter().map(|&x| x as f32).collect()));
                il.push(Tensor::from_vec(s.to_vec(), v).unwrap());
            }
            let yf = concat(&fl.iter().collect::<Vec<_>>(), axis).unwrap();
            let yi = concat(&il.iter().collect::<Vec<_>>(), axis).unwrap();
            assert!(
                yf.len() >= PAR_CONCAT_MIN,
                "{shapes:?} too small for the parallel path"
            );
            assert_eq!(yf.shape(), yi.shape());
            let want: Vec<f32> = yi
                .as_slice::<i64>()
                .unwrap()
                .iter()
                .map(|&x| x as f32)
                .collect();
            assert_eq!(f(&yf), want, "{shapes:?} axis {axis}");
        }
    }

    #[test]
    fn nchw_nhwc_transposes_match_naive() {
        // The batched-matrix path of f32 NCHW <-> NHWC: whole 16 x 16 tiles
        // (in registers on AVX-512), partial ones on either side, both, and
        // several images.
        for shape in [
            [1usize, 32, 4, 8],
            [2, 37, 5, 7],
            [3, 20, 6, 6],
            [1, 1280, 7, 7],
            [1, 16, 1, 1],
        ] {
            let x = iota(&shape);
            for perm in [[0usize, 2, 3, 1], [0, 3, 1, 2]] {
                let p: Vec<i64> = perm.iter().map(|&a| a as i64).collect();
                let y = transpose(&x, Some(&p)).unwrap();
                let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
                assert_eq!(y.shape(), &out_shape[..]);
                for (o, &val) in f(&y).iter().enumerate() {
                    let oi = unflat(&out_shape, o);
                    let mut ii = [0; 4];
                    for (j, &a) in perm.iter().enumerate() {
                        ii[a] = oi[j];
                    }
                    assert_eq!(val, flat(&shape, &ii) as f32, "{shape:?} perm {perm:?}");
                }
            }
        }
    }

    #[test]
    fn transpose_tiled_path_matches_naive() {
        // Sizes that are not multiples of the tile, with batch dims.
        let shape = [3, 70, 45];
        let x = iota(&shape);
        for perm in [[0usize, 2, 1], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let p: Vec<i64> = perm.iter().map(|&a| a as i64).collect();
            let y = transpose(&x, Some(&p)).unwrap();
            let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
            for (o, &val) in f(&y).iter().enumerate() {
                let oi = unflat(&out_shape, o);
                let mut ii = [0; 3];
                for (j, &a) in perm.iter().enumerate() {
                    ii[a] = oi[j];
                }
                assert_eq!(val, flat(&shape, &ii) as f32, "perm {perm:?}");
            }
        }
        let s: Vec<String> = (0..40 * 33).map(|i| i.to_string()).collect();
        let y = transpose(&t(&[40, 33], s), None).unwrap();
        let ys = y.as_slice::<String>().unwrap();
        assert_eq!(ys[1], "33");
        assert_eq!(ys[33 * 40 - 1], (40 * 33 - 1).to_string());
        assert_eq!(ys[40 * 5 + 7], (7 * 33 + 5).to_string());
    }

    #[test]
    fn permute_copy_matches_strided_copy() {
        // Every permutation of ranks 1..=5 on odd sizes (with size-1 dims),
        // plus BERT's shapes and sizes past the parallel threshold.
        let shapes: Vec<Vec<usize>> = vec![
            vec![7],
            vec![3, 5],
            vec![2, 1, 5],
            vec![3, 4, 5, 2],
            vec![2, 3, 1, 4, 5],
            vec![1, 128, 12, 64],
            vec![1, 12, 128, 64],
            vec![2, 33, 17, 65],
        ];
        for shape in &shapes {
            let n: usize = shape.iter().product();
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let st = istrides(shape);
            let perms: Vec<Vec<usize>> = if shape.len() <= 4 {
                crate::nn::test_util::permutations(shape.len())
            } else {
                vec![
                    vec![0, 2, 1, 4, 3],
                    vec![4, 3, 2, 1, 0],
                    vec![1, 0, 2, 3, 4],
                ]
            };
            for perm in perms {
                let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
                let out_strides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
                let fast = permute_copy(&src, &out_shape, &out_strides);
                let want = strided_copy(&src, 0, &out_shape, &out_strides);
                assert_eq!(fast, want, "shape {shape:?} perm {perm:?}");
            }
        }
        // Rank 6 and other element types through the public op.
        let shape = [2usize, 3, 1, 4, 5, 3];
        let n: usize = shape.iter().product();
        let x = t(&shape, (0..n as i64).collect::<Vec<i64>>());
        let y = transpose(&x, Some(&[5, 3, 1, 0, 4, 2])).unwrap();
        let st = istrides(&shape);
        let perm = [5usize, 3, 1, 0, 4, 2];
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let out_strides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
        let src: Vec<i64> = (0..n as i64).collect();
        assert_eq!(
            y.as_slice::<i64>().unwrap(),
            &strided_copy(&src, 0, &out_shape, &out_strides)[..]
        );
        let h = t(
            &[3, 2],
            (0..6).map(|i| f16::from_f32(i as f32)).collect::<Vec<_>>(),
        );
        let y = transpose(&h, None).unwrap();
        let hv: Vec<f32> = y
            .as_slice::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(hv, [0., 2., 4., 1., 3., 5.]);
    }

    /// `cargo test --release -p kiln-cpu --lib transpose_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn transpose_speed() {
        fn best(f: &mut dyn FnMut()) -> f64 {
            let mut b = f64::INFINITY;
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                f();
                b = b.min(t0.elapsed().as_secs_f64());
            }
            b * 1e6
        }
        for (shape, perm) in [
            (vec![1usize, 128, 12, 64], vec![0usize, 2, 1, 3]),
            (vec![1, 12, 128, 64], vec![0, 1, 3, 2]),
            (vec![8, 128, 12, 64], vec![0, 2, 1, 3]),
        ] {
            let n: usize = shape.iter().product();
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let st = istrides(&shape);
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let out_strides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
            let fast = best(&mut || drop(permute_copy(&src, &out_shape, &out_strides)));
            let refr = best(&mut || drop(strided_copy(&src, 0, &out_shape, &out_strides)));
            eprintln!(
                "Transpose {shape:?} perm {perm:?}: reference {refr:.1} us, fast {fast:.1} us"
            );
        }
    }

    #[test]
    fn transpose_strings_bool_empty_scalar() {
        let s = t(&[2, 2], strs(&["a", "b", "c", "d"]));
        let y = transpose(&s, None).unwrap();
        assert_eq!(
            y.as_slice::<String>().unwrap(),
            &strs(&["a", "c", "b", "d"])[..]
        );
        let b = t(&[1, 3], vec![true, false, true]);
        let y = transpose(&b, Some(&[1, 0])).unwrap();
        assert_eq!(y.shape(), &[3, 1]);
        assert_eq!(y.as_slice::<bool>().unwrap(), &[true, false, true]);
        let e = t::<f32>(&[2, 0, 3], vec![]);
        let y = transpose(&e, Some(&[2, 1, 0])).unwrap();
        assert_eq!(y.shape(), &[3, 0, 2]);
        assert!(y.is_empty());
        let sc = Tensor::scalar(7u8);
        assert_eq!(transpose(&sc, None).unwrap(), sc);
        assert_eq!(transpose(&sc, Some(&[])).unwrap(), sc);
    }

    #[test]
    fn transpose_bad_perm() {
        let x = iota(&[2, 3, 4]);
        assert!(transpose(&x, Some(&[0, 1])).is_err());
        assert!(transpose(&x, Some(&[0, 1, 1])).is_err());
        assert!(transpose(&x, Some(&[0, 1, 3])).is_err());
    }

    // ---- Squeeze / Unsqueeze ------------------------------------------

    #[test]
    fn squeeze_cases() {
        let x = iota(&[1, 3, 1, 2]);
        assert_eq!(squeeze(&x, None).unwrap().shape(), &[3, 2]);
        assert_eq!(squeeze(&x, Some(&ints(&[-2]))).unwrap().shape(), &[1, 3, 2]);
        assert_eq!(squeeze(&x, Some(&ints(&[0, 2]))).unwrap().shape(), &[3, 2]);
        // Empty axes behaves like no axes.
        assert_eq!(squeeze(&x, Some(&ints(&[]))).unwrap().shape(), &[3, 2]);
        assert!(err_msg(squeeze(&x, Some(&ints(&[1])))).contains("not 1"));
        assert!(squeeze(&x, Some(&ints(&[0, -4]))).is_err());
        assert!(squeeze(&x, Some(&ints(&[4]))).is_err());
        let one = t(&[1, 1], vec![3.0f32]);
        let y = squeeze(&one, None).unwrap();
        assert_eq!(y.shape(), no_shape());
        assert_eq!(f(&y), vec![3.0]);
    }

    #[test]
    fn unsqueeze_cases() {
        let x = iota(&[3]);
        assert_eq!(unsqueeze(&x, &ints(&[0, -1])).unwrap().shape(), &[1, 3, 1]);
        assert_eq!(unsqueeze(&x, &ints(&[1])).unwrap().shape(), &[3, 1]);
        let y = unsqueeze(&iota(&[3, 4]), &ints(&[2, 0, 4])).unwrap();
        assert_eq!(y.shape(), &[1, 3, 1, 4, 1]);
        let s = Tensor::scalar(true);
        assert_eq!(unsqueeze(&s, &Tensor::scalar(0i64)).unwrap().shape(), &[1]);
        assert!(unsqueeze(&x, &ints(&[0, 0])).is_err());
        assert!(unsqueeze(&x, &ints(&[0, -3])).is_err());
        assert!(unsqueeze(&x, &ints(&[2])).is_err());
    }

    // ---- Concat --------------------------------------------------------

    #[test]
    fn concat_hand_checked() {
        let a = iota(&[2, 2]);
        let b = t(&[2, 1], vec![10.0f32, 11.0]);
        let y = concat(&[&a, &b], 1).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f(&y), vec![0., 1., 10., 2., 3., 11.]);
        let y = concat(&[&a, &a], -2).unwrap();
        assert_eq!(y.shape(), &[4, 2]);
        assert_eq!(f(&y), vec![0., 1., 2., 3., 0., 1., 2., 3.]);
        let c = t::<f32>(&[2, 0], vec![]);
        let y = concat(&[&c, &a, &c, &b], 1).unwrap();
        assert_eq!(f(&y), vec![0., 1., 10., 2., 3., 11.]);
        let y = concat(&[&c, &c], 0).unwrap();
        assert_eq!(y.shape(), &[4, 0]);
        let i = concat(
            &[&Tensor::vector(vec![1i32]), &Tensor::vector(vec![2i32, 3])],
            0,
        )
        .unwrap();
        assert_eq!(i.as_slice::<i32>().unwrap(), &[1, 2, 3]);
    }

    #[test]
    fn concat_strings_bool() {
        let a = t(&[1, 2], strs(&["a", "b"]));
        let b = t(&[1, 2], strs(&["c", "d"]));
        let y = concat(&[&a, &b], 1).unwrap();
        assert_eq!(y.shape(), &[1, 4]);
        assert_eq!(
            y.as_slice::<String>().unwrap(),
            &strs(&["a", "b", "c", "d"])[..]
        );
        let y = concat(
            &[
                &Tensor::vector(vec![true]),
                &Tensor::vector(vec![false, true]),
            ],
            0,
        )
        .unwrap();
        assert_eq!(y.as_slice::<bool>().unwrap(), &[true, false, true]);
    }

    #[test]
    fn concat_errors() {
        let a = iota(&[2, 2]);
        assert!(concat(&[], 0).is_err());
        assert!(concat(&[&a, &iota(&[3, 3])], 0).is_err());
        assert!(concat(&[&a, &iota(&[2])], 0).is_err());
        assert!(concat(
            &[&a, &Tensor::from_vec(vec![2, 2], vec![0i64; 4]).unwrap()],
            0
        )
        .is_err());
        assert!(concat(&[&Tensor::scalar(1.0f32), &Tensor::scalar(2.0f32)], 0).is_err());
        assert!(concat(&[&a], 2).is_err());
        // A 0-sized input must still match the other dims.
        assert!(concat(&[&a, &t::<f32>(&[0, 3], vec![])], 0).is_err());
    }

    // ---- Split ---------------------------------------------------------

    #[test]
    fn split_sizes_and_parts() {
        let x = iota(&[2, 6]);
        let parts = split(&x, Some(&ints(&[1, 2, 3])), 1, 3).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(f(&parts[0]), vec![0., 6.]);
        assert_eq!(f(&parts[1]), vec![1., 2., 7., 8.]);
        assert_eq!(parts[2].shape(), &[2, 3]);
        assert_eq!(f(&parts[2]), vec![3., 4., 5., 9., 10., 11.]);
        let parts = split(&x, None, -1, 2).unwrap();
        assert_eq!(f(&parts[0]), vec![0., 1., 2., 6., 7., 8.]);
        assert_eq!(f(&parts[1]), vec![3., 4., 5., 9., 10., 11.]);
        let parts = split(&x, None, 0, 2).unwrap();
        assert_eq!(f(&parts[1]), vec![6., 7., 8., 9., 10., 11.]);
        // Zero-sized pieces.
        let parts = split(&x, Some(&ints(&[0, 6])), 1, 2).unwrap();
        assert_eq!(parts[0].shape(), &[2, 0]);
        assert_eq!(f(&parts[1]), f(&x));
    }

    /// Parts big enough to take recycled buffers (stale values in them) and
    /// to be copied on a 2-thread pool, along the last axis (short runs) and
    /// the first (one long run per part); a Reshape copy likewise.
    #[test]
    fn big_split_and_reshape_copies_overwrite_recycled_buffers() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        pool.install(|| {
            let (rows, cols) = (200, 3 * 2304);
            let x = iota(&[rows, cols]);
            let xv = f(&x);
            for (axis, parts) in [(1usize, 3usize), (0, 2)] {
                // Stale buffers of the parts' sizes for the pool to hand out.
                let part_len = rows * cols / parts;
                for _ in 0..parts + 1 {
                    crate::buffers::recycle(vec![f32::NAN; part_len]);
                }
                let outs = split(&x, None, axis as i64, parts).unwrap();
                for (p, t) in outs.iter().enumerate() {
                    let got = f(t);
                    let want: Vec<f32> = if axis == 1 {
                        let w = cols / parts;
                        (0..rows)
                            .flat_map(|r| xv[r * cols + p * w..r * cols + (p + 1) * w].to_vec())
                            .collect()
                    } else {
                        xv[p * part_len..(p + 1) * part_len].to_vec()
                    };
                    assert_eq!(got, want, "axis {axis} part {p}");
                }
            }
            crate::buffers::recycle(vec![f32::NAN; rows * cols]);
            let shape = Tensor::from_vec(vec![2], vec![cols as i64, rows as i64]).unwrap();
            let y = reshape(&x, &shape, false).unwrap();
            assert_eq!(f(&y), xv);
        });
    }

    #[test]
    fn split_uneven_parts() {
        let x = iota(&[7]);
        let parts = split(&x, None, 0, 3).unwrap();
        let shapes: Vec<&[usize]> = parts.iter().map(|p| p.shape()).collect();
        assert_eq!(shapes, vec![&[3][..], &[3], &[1]]);
        assert_eq!(f(&parts[2]), vec![6.]);
        // 4 into 3: chunks of 2, the last gets nothing.
        let parts = split(&iota(&[4]), None, 0, 3).unwrap();
        let sizes: Vec<usize> = parts.iter().map(|p| p.shape()[0]).collect();
        assert_eq!(sizes, vec![2, 2, 0]);
        // 1 into 3 cannot be done.
        assert!(split(&iota(&[1]), None, 0, 3).is_err());
        assert!(split(&iota(&[4]), None, 0, 0).is_err());
    }

    #[test]
    fn split_errors_and_strings() {
        let x = iota(&[2, 6]);
        assert!(split(&x, Some(&ints(&[1, 2])), 1, 2).is_err());
        assert!(split(&x, Some(&ints(&[3, 3])), 1, 3).is_err());
        assert!(split(&x, Some(&ints(&[7, -1])), 1, 2).is_err());
        assert!(split(&x, None, 2, 2).is_err());
        assert!(split(&Tensor::scalar(1.0f32), None, 0, 1).is_err());
        let s = t(&[3], strs(&["x", "y", "z"]));
        let parts = split(&s, Some(&ints(&[2, 1])), 0, 2).unwrap();
        assert_eq!(
            parts[0].as_slice::<String>().unwrap(),
            &strs(&["x", "y"])[..]
        );
        assert_eq!(parts[1].as_slice::<String>().unwrap(), &strs(&["z"])[..]);
    }

    // ---- Slice ---------------------------------------------------------

    #[test]
    fn slice_spec_examples() {
        let x = t(&[2, 4], (1..=8).map(|v| v as f32).collect());
        let y = slice(
            &x,
            &ints(&[1, 0]),
            &ints(&[2, 3]),
            Some(&ints(&[0, 1])),
            Some(&ints(&[1, 2])),
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 2]);
        assert_eq!(f(&y), vec![5., 7.]);
        let y = slice(&x, &ints(&[0, 1]), &ints(&[-1, 1000]), None, None).unwrap();
        assert_eq!(y.shape(), &[1, 3]);
        assert_eq!(f(&y), vec![2., 3., 4.]);
    }

    #[test]
    fn slice_negative_steps_and_sentinels() {
        let x = iota(&[5]);
        let s = |st: i64, en: i64, step: i64| {
            f(&slice(&x, &ints(&[st]), &ints(&[en]), None, Some(&ints(&[step]))).unwrap())
        };
        assert_eq!(s(-1, i64::MIN, -1), vec![4., 3., 2., 1., 0.]);
        assert_eq!(s(i64::MAX, i64::MIN, -1), vec![4., 3., 2., 1., 0.]);
        assert_eq!(s(0, i64::MAX, 1), vec![0., 1., 2., 3., 4.]);
        assert_eq!(s(i64::MIN, i64::MAX, 2), vec![0., 2., 4.]);
        assert_eq!(s(-1, i64::MIN, -2), vec![4., 2., 0.]);
        assert_eq!(s(3, 0, -1), vec![3., 2., 1.]);
        assert_eq!(s(-100, 100, 1), vec![0., 1., 2., 3., 4.]);
        assert_eq!(s(1, -1, 1), vec![1., 2., 3.]);
        assert_eq!(s(3, 1, 1), Vec::<f32>::new());
        assert_eq!(s(1, 3, -1), Vec::<f32>::new());
        assert_eq!(s(i64::MAX, i64::MIN, i64::MIN), vec![4.]);
        assert_eq!(s(0, 5, i64::MAX), vec![0.]);
    }

    #[test]
    fn slice_multi_axis_negative_axes_and_types() {
        let x = iota(&[3, 4]);
        // Reverse both axes via negative axes, with i32 inputs.
        let y = slice(
            &x,
            &Tensor::vector(vec![-1i32, -1]),
            &Tensor::vector(vec![i32::MIN, i32::MIN]),
            Some(&Tensor::vector(vec![-1i32, -2])),
            Some(&Tensor::vector(vec![-1i32, -2])),
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 4]);
        assert_eq!(f(&y), vec![11., 10., 9., 8., 3., 2., 1., 0.]);
        let s = t(&[2, 3], strs(&["a", "b", "c", "d", "e", "f"]));
        let y = slice(
            &s,
            &ints(&[2]),
            &ints(&[0]),
            Some(&ints(&[1])),
            Some(&ints(&[-1])),
        )
        .unwrap();
        assert_eq!(
            y.as_slice::<String>().unwrap(),
            &strs(&["c", "b", "f", "e"])[..]
        );
        let b = t(&[4], vec![true, false, false, true]);
        let y = slice(&b, &ints(&[1]), &ints(&[4]), None, Some(&ints(&[2]))).unwrap();
        assert_eq!(y.as_slice::<bool>().unwrap(), &[false, true]);
        // Empty output and empty input.
        let y = slice(&x, &ints(&[2]), &ints(&[2]), Some(&ints(&[1])), None).unwrap();
        assert_eq!(y.shape(), &[3, 0]);
        let e = t::<f32>(&[0, 2], vec![]);
        let y = slice(
            &e,
            &ints(&[-1]),
            &ints(&[i64::MIN]),
            None,
            Some(&ints(&[-1])),
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 2]);
    }

    #[test]
    fn slice_errors() {
        let x = iota(&[3, 4]);
        assert!(
            err_msg(slice(&x, &ints(&[0]), &ints(&[2]), None, Some(&ints(&[0])))).contains("0")
        );
        assert!(slice(
            &x,
            &ints(&[0, 0]),
            &ints(&[1, 1]),
            Some(&ints(&[1, -1])),
            None
        )
        .is_err());
        assert!(slice(&x, &ints(&[0]), &ints(&[1, 1]), None, None).is_err());
        assert!(slice(&x, &ints(&[0]), &ints(&[1]), Some(&ints(&[2])), None).is_err());
        assert!(slice(&x, &ints(&[0, 0, 0]), &ints(&[1, 1, 1]), None, None).is_err());
        assert!(slice(&x, &ints(&[0]), &ints(&[1]), None, Some(&ints(&[1, 1]))).is_err());
    }

    // ---- Gather --------------------------------------------------------

    #[test]
    fn gather_axes_and_index_types() {
        let x = t(&[3, 2], vec![1.0f32, 1.2, 2.3, 3.4, 4.5, 5.7]);
        let y = gather(&x, &t(&[2, 2], vec![0i64, 1, 1, 2]), 0).unwrap();
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(f(&y), vec![1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7]);
        let x = iota(&[3, 3]);
        let y = gather(&x, &t(&[1, 2], vec![0i32, 2]), 1).unwrap();
        assert_eq!(y.shape(), &[3, 1, 2]);
        assert_eq!(f(&y), vec![0., 2., 3., 5., 6., 8.]);
        let y = gather(&x, &Tensor::vector(vec![-1i8, 0]), -1).unwrap();
        assert_eq!(f(&y), vec![2., 0., 5., 3., 8., 6.]);
        let y = gather(&x, &Tensor::vector(vec![2u64]), 0).unwrap();
        assert_eq!(f(&y), vec![6., 7., 8.]);
    }

    #[test]
    fn gather_scalar_index_and_empty() {
        let x = iota(&[2, 3]);
        let y = gather(&x, &Tensor::scalar(1i64), 0).unwrap();
        assert_eq!(y.shape(), &[3]);
        assert_eq!(f(&y), vec![3., 4., 5.]);
        let y = gather(&x, &Tensor::scalar(-1i64), 1).unwrap();
        assert_eq!(y.shape(), &[2]);
        assert_eq!(f(&y), vec![2., 5.]);
        let y = gather(&iota(&[4]), &Tensor::scalar(2i64), 0).unwrap();
        assert_eq!(y.shape(), no_shape());
        assert_eq!(f(&y), vec![2.]);
        let y = gather(&x, &Tensor::vector(Vec::<i64>::new()), 1).unwrap();
        assert_eq!(y.shape(), &[2, 0]);
        let e = t::<f32>(&[2, 0], vec![]);
        let y = gather(&e, &Tensor::vector(vec![1i64, 0]), 0).unwrap();
        assert_eq!(y.shape(), &[2, 0]);
    }

    #[test]
    fn gather_strings_bool() {
        let s = t(&[3], strs(&["a", "b", "c"]));
        let y = gather(&s, &Tensor::vector(vec![2i64, 0, 2]), 0).unwrap();
        assert_eq!(y.as_slice::<String>().unwrap(), &strs(&["c", "a", "c"])[..]);
        let b = t(&[2, 2], vec![true, false, false, false]);
        let y = gather(&b, &Tensor::vector(vec![1i64, 0]), 1).unwrap();
        assert_eq!(y.as_slice::<bool>().unwrap(), &[false, true, false, false]);
    }

    #[test]
    fn gather_errors() {
        let x = iota(&[2, 3]);
        let m = err_msg(gather(&x, &Tensor::vector(vec![0i64, 3]), 1));
        assert!(m.contains("index 3") && m.contains("size 3"), "{m}");
        let m = err_msg(gather(&x, &Tensor::vector(vec![-3i64]), 0));
        assert!(m.contains("index -3") && m.contains("size 2"), "{m}");
        assert!(gather(&x, &Tensor::vector(vec![0.0f32]), 0).is_err());
        assert!(gather(&x, &Tensor::vector(vec![u64::MAX]), 0).is_err());
        assert!(gather(&x, &Tensor::vector(vec![0i64]), 2).is_err());
        assert!(gather(&Tensor::scalar(1.0f32), &Tensor::scalar(0i64), 0).is_err());
        // Out of range on an empty axis.
        assert!(gather(&t::<f32>(&[0, 2], vec![]), &Tensor::vector(vec![0i64]), 0).is_err());
    }

    #[test]
    fn gather_elements_cases() {
        let x = t(&[2, 2], vec![1.0f32, 2., 3., 4.]);
        let y = gather_elements(&x, &t(&[2, 2], vec![0i64, 0, 1, 0]), 1).unwrap();
        assert_eq!(f(&y), vec![1., 1., 4., 3.]);
        let x = t(&[3, 3], (1..=9).map(|v| v as f32).collect());
        let y = gather_elements(&x, &t(&[2, 3], vec![1i32, 2, 0, 2, 0, 0]), 0).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f(&y), vec![4., 8., 3., 7., 2., 3.]);
        let y = gather_elements(&x, &t(&[1, 2], vec![-1i64, -3]), -1).unwrap();
        assert_eq!(f(&y), vec![3., 1.]);
        let s = t(&[2], strs(&["p", "q"]));
        let y = gather_elements(&s, &Tensor::vector(vec![1i64, 1, 0]), 0).unwrap();
        assert_eq!(y.as_slice::<String>().unwrap(), &strs(&["q", "q", "p"])[..]);
        let m = err_msg(gather_elements(&x, &t(&[1, 1], vec![3i64]), 1));
        assert!(m.contains("index 3"), "{m}");
        assert!(gather_elements(&x, &Tensor::vector(vec![0i64]), 0).is_err());
        assert!(gather_elements(&x, &t(&[1, 4], vec![0i64; 4]), 0).is_err());
        let y = gather_elements(&x, &t::<i64>(&[0, 3], vec![]), 0).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
    }

    // ---- Expand / Tile -------------------------------------------------

    #[test]
    fn expand_cases() {
        let x = t(&[3, 1], vec![1.0f32, 2., 3.]);
        let y = expand(&x, &ints(&[2, 1, 6])).unwrap();
        assert_eq!(y.shape(), &[2, 3, 6]);
        let ys = f(&y);
        assert_eq!(&ys[..6], &[1.; 6]);
        assert_eq!(&ys[6..12], &[2.; 6]);
        assert_eq!(&ys[18..24], &[1.; 6]);
        // Shape dims of 1 keep x's dims.
        let x = iota(&[3, 4]);
        let y = expand(&x, &ints(&[1, 1])).unwrap();
        assert_eq!(y, x);
        // Fewer dims in the shape.
        let y = expand(&x, &ints(&[4])).unwrap();
        assert_eq!(y, x);
        let y = expand(&t(&[1, 2], vec![5.0f32, 6.]), &ints(&[3, 1])).unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(f(&y), vec![5., 6., 5., 6., 5., 6.]);
        let y = expand(&Tensor::scalar(true), &ints(&[2, 2])).unwrap();
        assert_eq!(y.as_slice::<bool>().unwrap(), &[true; 4]);
        let y = expand(&Tensor::scalar(String::from("s")), &ints(&[])).unwrap();
        assert_eq!(y.shape(), no_shape());
        let y = expand(&t(&[1, 3], vec![1.0f32, 2., 3.]), &ints(&[0, 1])).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
        assert!(expand(&x, &ints(&[2, 4])).is_err());
        assert!(expand(&x, &ints(&[-1, 4])).is_err());
        let m = err_msg(expand(&Tensor::scalar(1u8), &ints(&[1 << 40, 1 << 40])));
        assert!(m.contains("limit") || m.contains("overflow"), "{m}");
        assert!(expand(&Tensor::scalar(1u8), &ints(&[i64::MAX, i64::MAX, i64::MAX])).is_err());
    }

    #[test]
    fn tile_cases() {
        let x = t(&[2, 2], vec![1.0f32, 2., 3., 4.]);
        let y = tile(&x, &ints(&[2, 2])).unwrap();
        assert_eq!(y.shape(), &[4, 4]);
        assert_eq!(
            f(&y),
            vec![1., 2., 1., 2., 3., 4., 3., 4., 1., 2., 1., 2., 3., 4., 3., 4.]
        );
        let y = tile(&x, &ints(&[1, 3])).unwrap();
        assert_eq!(f(&y), vec![1., 2., 1., 2., 1., 2., 3., 4., 3., 4., 3., 4.]);
        let y = tile(&x, &ints(&[0, 1])).unwrap();
        assert_eq!(y.shape(), &[0, 2]);
        let s = t(&[2], strs(&["a", "b"]));
        let y = tile(&s, &ints(&[2])).unwrap();
        assert_eq!(
            y.as_slice::<String>().unwrap(),
            &strs(&["a", "b", "a", "b"])[..]
        );
        let y = tile(&Tensor::scalar(3i32), &ints(&[])).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[3]);
        assert!(tile(&x, &ints(&[2])).is_err());
        assert!(tile(&x, &ints(&[-1, 1])).is_err());
        assert!(tile(&x, &ints(&[i64::MAX, i64::MAX])).is_err());
    }

    // ---- Pad -----------------------------------------------------------

    fn pad_data() -> Tensor {
        t(&[3, 2], vec![1.0f32, 1.2, 2.3, 3.4, 4.5, 5.7])
    }

    #[test]
    fn pad_constant() {
        let y = pad(
            PadMode::Constant,
            &pad_data(),
            &ints(&[0, 2, 0, 0]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[3, 4]);
        assert_eq!(
            f(&y),
            vec![0., 0., 1.0, 1.2, 0., 0., 2.3, 3.4, 0., 0., 4.5, 5.7]
        );
        let v = Tensor::scalar(9.0f32);
        let y = pad(
            PadMode::Constant,
            &iota(&[1, 2]),
            &ints(&[1, 0, 0, 1]),
            Some(&v),
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f(&y), vec![9., 9., 9., 0., 1., 9.]);
        // Axes input with a negative axis.
        let y = pad(
            PadMode::Constant,
            &iota(&[2, 2]),
            &ints(&[1, 1]),
            Some(&v),
            Some(&ints(&[-1])),
        )
        .unwrap();
        assert_eq!(f(&y), vec![9., 0., 1., 9., 9., 2., 3., 9.]);
        // Strings default to "".
        let s = t(&[1], strs(&["a"]));
        let y = pad(PadMode::Constant, &s, &ints(&[1, 1]), None, None).unwrap();
        assert_eq!(y.as_slice::<String>().unwrap(), &strs(&["", "a", ""])[..]);
        let y = pad(
            PadMode::Constant,
            &s,
            &ints(&[0, 1]),
            Some(&Tensor::scalar(String::from("z"))),
            None,
        )
        .unwrap();
        assert_eq!(y.as_slice::<String>().unwrap(), &strs(&["a", "z"])[..]);
    }

    #[test]
    fn pad_reflect_edge_wrap() {
        let y = pad(
            PadMode::Reflect,
            &pad_data(),
            &ints(&[0, 2, 0, 0]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            f(&y),
            vec![1.0, 1.2, 1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7, 4.5, 5.7]
        );
        let y = pad(PadMode::Edge, &pad_data(), &ints(&[0, 2, 0, 0]), None, None).unwrap();
        assert_eq!(
            f(&y),
            vec![1.0, 1.0, 1.0, 1.2, 2.3, 2.3, 2.3, 3.4, 4.5, 4.5, 4.5, 5.7]
        );
        let x = t(&[3, 2], vec![1.0f32, 2., 3., 4., 5., 6.]);
        let y = pad(PadMode::Wrap, &x, &ints(&[2, 1, 1, 1]), None, None).unwrap();
        assert_eq!(y.shape(), &[6, 4]);
        assert_eq!(
            f(&y),
            vec![
                4., 3., 4., 3., 6., 5., 6., 5., 2., 1., 2., 1., 4., 3., 4., 3., 6., 5., 6., 5., 2.,
                1., 2., 1.
            ]
        );
        // 1-D reflect, edge and wrap, including pads beyond the axis (numpy semantics).
        let x = iota(&[3]);
        let y = pad(PadMode::Reflect, &x, &ints(&[2, 2]), None, None).unwrap();
        assert_eq!(f(&y), vec![2., 1., 0., 1., 2., 1., 0.]);
        let y = pad(PadMode::Reflect, &x, &ints(&[4, 0]), None, None).unwrap();
        assert_eq!(f(&y), vec![0., 1., 2., 1., 0., 1., 2.]);
        let y = pad(PadMode::Edge, &x, &ints(&[1, 3]), None, None).unwrap();
        assert_eq!(f(&y), vec![0., 0., 1., 2., 2., 2., 2.]);
        let y = pad(PadMode::Wrap, &x, &ints(&[4, 1]), None, None).unwrap();
        assert_eq!(f(&y), vec![2., 0., 1., 2., 0., 1., 2., 0.]);
        // Bool through edge mode; constant value is ignored in other modes.
        let b = Tensor::vector(vec![true, false]);
        let y = pad(
            PadMode::Edge,
            &b,
            &ints(&[1, 1]),
            Some(&Tensor::scalar(1.0f32)),
            None,
        )
        .unwrap();
        assert_eq!(y.as_slice::<bool>().unwrap(), &[true, true, false, false]);
    }

    #[test]
    fn pad_negative_crops() {
        let x = iota(&[4]);
        let y = pad(PadMode::Constant, &x, &ints(&[-1, -2]), None, None).unwrap();
        assert_eq!(f(&y), vec![1.]);
        let y = pad(PadMode::Constant, &x, &ints(&[-1, 2]), None, None).unwrap();
        assert_eq!(f(&y), vec![1., 2., 3., 0., 0.]);
        // Crop first, then reflect the cropped data (ORT).
        let y = pad(PadMode::Reflect, &x, &ints(&[-1, 2]), None, None).unwrap();
        assert_eq!(f(&y), vec![1., 2., 3., 2., 1.]);
        let y = pad(PadMode::Edge, &x, &ints(&[2, -3]), None, None).unwrap();
        assert_eq!(f(&y), vec![0., 0., 0.]);
        let x = iota(&[3, 3]);
        let y = pad(PadMode::Constant, &x, &ints(&[-1, 1, 0, -1]), None, None).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f(&y), vec![0., 3., 4., 0., 6., 7.]);
        let y = pad(PadMode::Constant, &x, &ints(&[-3, 0, 0, 0]), None, None).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
    }

    #[test]
    fn pad_errors_and_edge_cases() {
        let x = iota(&[2, 2]);
        assert!(pad(PadMode::Constant, &x, &ints(&[1, 1]), None, None).is_err());
        assert!(pad(PadMode::Constant, &x, &ints(&[-3, 0, 0, 0]), None, None).is_err());
        assert!(pad(
            PadMode::Constant,
            &x,
            &ints(&[0, 0, 0, 0]),
            Some(&Tensor::scalar(1i64)),
            None
        )
        .is_err());
        assert!(pad(
            PadMode::Constant,
            &x,
            &ints(&[1, 0, 0, 0]),
            Some(&Tensor::scalar(1i64)),
            None
        )
        .is_err());
        assert!(pad(
            PadMode::Constant,
            &x,
            &ints(&[1, 0, 0, 0]),
            Some(&ints(&[1, 2])),
            None
        )
        .is_err());
        assert!(pad(PadMode::Reflect, &iota(&[1]), &ints(&[1, 0]), None, None).is_err());
        assert!(pad(
            PadMode::Edge,
            &t::<f32>(&[0], vec![]),
            &ints(&[1, 0]),
            None,
            None
        )
        .is_err());
        assert!(pad(
            PadMode::Wrap,
            &t::<f32>(&[0], vec![]),
            &ints(&[0, 1]),
            None,
            None
        )
        .is_err());
        assert!(pad(
            PadMode::Constant,
            &x,
            &ints(&[1, 1]),
            None,
            Some(&ints(&[0, 0]))
        )
        .is_err());
        let m = err_msg(pad(
            PadMode::Constant,
            &x,
            &ints(&[i64::MAX, 0, i64::MAX, 0]),
            None,
            None,
        ));
        assert!(m.contains("Pad"), "{m}");
        // Constant padding of an empty axis is fine, and so is no padding at all.
        let y = pad(
            PadMode::Constant,
            &t::<f32>(&[0], vec![]),
            &ints(&[1, 1]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(f(&y), vec![0., 0.]);
        // Duplicate axes.
        assert!(pad(
            PadMode::Reflect,
            &iota(&[2, 2]),
            &ints(&[1, 0, 1, 0]),
            None,
            Some(&ints(&[0, -2])),
        )
        .is_err());
        // Reflect along an empty axis cannot read anything.
        assert!(pad(
            PadMode::Reflect,
            &t::<f32>(&[2, 0], vec![]),
            &ints(&[0, 1, 0, 1]),
            None,
            None,
        )
        .is_err());
        assert_eq!(
            pad(PadMode::Edge, &Tensor::scalar(1u8), &ints(&[]), None, None).unwrap(),
            Tensor::scalar(1u8)
        );
        // An empty output allocates nothing, whatever the pads.
        let e = t::<f32>(&[0, 2], vec![]);
        let y = pad(
            PadMode::Constant,
            &e,
            &ints(&[0, 1 << 40, 0, 0]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 2 + (1usize << 40)]);
    }

    // ---- Shape / ConstantOfShape / Range -------------------------------

    #[test]
    fn shape_start_end() {
        let x = iota(&[2, 3, 4]);
        let sh = |s: i64, e: Option<i64>| shape(&x, s, e).as_slice::<i64>().unwrap().to_vec();
        assert_eq!(sh(0, None), vec![2, 3, 4]);
        assert_eq!(sh(1, None), vec![3, 4]);
        assert_eq!(sh(-1, None), vec![4]);
        assert_eq!(sh(0, Some(-1)), vec![2, 3]);
        assert_eq!(sh(-10, Some(10)), vec![2, 3, 4]);
        assert_eq!(sh(2, Some(1)), Vec::<i64>::new());
        assert_eq!(sh(i64::MIN, Some(i64::MAX)), vec![2, 3, 4]);
        let s = shape(&Tensor::scalar(1.0f32), 0, None);
        assert_eq!(s.shape(), &[0]);
    }

    #[test]
    fn constant_of_shape_cases() {
        let y = constant_of_shape(&ints(&[2, 3]), &Tensor::vector(vec![7i32])).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[7; 6]);
        let y = constant_of_shape(&ints(&[]), &Tensor::vector(vec![1.5f32])).unwrap();
        assert_eq!(y.shape(), no_shape());
        assert_eq!(f(&y), vec![1.5]);
        let y = constant_of_shape(&ints(&[2, 0]), &Tensor::vector(vec![true])).unwrap();
        assert_eq!(y.shape(), &[2, 0]);
        let y = constant_of_shape(&ints(&[2]), &Tensor::vector(vec![String::from("k")])).unwrap();
        assert_eq!(y.as_slice::<String>().unwrap(), &strs(&["k", "k"])[..]);
        assert!(constant_of_shape(&ints(&[-1]), &Tensor::vector(vec![0i64])).is_err());
        assert!(constant_of_shape(&ints(&[2]), &Tensor::vector(vec![0i64, 1])).is_err());
        assert!(constant_of_shape(&ints(&[1 << 20, 1 << 20]), &Tensor::vector(vec![0u8])).is_err());
        assert!(
            constant_of_shape(&ints(&[i64::MAX, i64::MAX]), &Tensor::vector(vec![0u8])).is_err()
        );
    }

    #[test]
    fn range_ints() {
        let r = |s: i64, l: i64, d: i64| {
            range(&Tensor::scalar(s), &Tensor::scalar(l), &Tensor::scalar(d))
                .unwrap()
                .as_slice::<i64>()
                .unwrap()
                .to_vec()
        };
        assert_eq!(r(3, 9, 3), vec![3, 6]);
        assert_eq!(r(10, 4, -3), vec![10, 7]);
        assert_eq!(r(0, 5, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(r(5, 0, 1), Vec::<i64>::new());
        assert_eq!(
            r(i64::MIN, i64::MAX, i64::MAX),
            vec![i64::MIN, -1, i64::MAX - 1]
        );
        let y = range(
            &Tensor::scalar(250u8),
            &Tensor::scalar(255u8),
            &Tensor::scalar(2u8),
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[250, 252, 254]);
        let y = range(
            &Tensor::scalar(1i16),
            &Tensor::scalar(-2i16),
            &Tensor::scalar(-1i16),
        )
        .unwrap();
        assert_eq!(y.as_slice::<i16>().unwrap(), &[1, 0, -1]);
        assert!(range(
            &Tensor::scalar(0i64),
            &Tensor::scalar(5i64),
            &Tensor::scalar(0i64)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(0i64),
            &Tensor::scalar(i64::MAX),
            &Tensor::scalar(1i64)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(0i64),
            &Tensor::scalar(5i32),
            &Tensor::scalar(1i64)
        )
        .is_err());
        assert!(range(
            &Tensor::vector(vec![0i64, 1]),
            &Tensor::scalar(5i64),
            &Tensor::scalar(1i64)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(true),
            &Tensor::scalar(true),
            &Tensor::scalar(true)
        )
        .is_err());
    }

    #[test]
    fn range_floats() {
        let y = range(
            &Tensor::scalar(1.0f32),
            &Tensor::scalar(2.0f32),
            &Tensor::scalar(0.3f32),
        )
        .unwrap();
        let ys = f(&y);
        assert_eq!(ys.len(), 4);
        for (a, b) in ys.iter().zip([1.0, 1.3, 1.6, 1.9]) {
            assert!((a - b).abs() < 1e-6, "{ys:?}");
        }
        let y = range(
            &Tensor::scalar(1.0f64),
            &Tensor::scalar(-1.0f64),
            &Tensor::scalar(-0.5f64),
        )
        .unwrap();
        assert_eq!(y.as_slice::<f64>().unwrap(), &[1.0, 0.5, 0.0, -0.5]);
        let y = range(
            &Tensor::scalar(f16::from_f32(0.0)),
            &Tensor::scalar(f16::from_f32(2.0)),
            &Tensor::scalar(f16::from_f32(0.5)),
        )
        .unwrap();
        assert_eq!(y.len(), 4);
        assert_eq!(y.as_slice::<f16>().unwrap()[3], f16::from_f32(1.5));
        let y = range(
            &Tensor::scalar(0.0f32),
            &Tensor::scalar(-1.0f32),
            &Tensor::scalar(1.0f32),
        )
        .unwrap();
        assert!(y.is_empty());
        assert!(range(
            &Tensor::scalar(0.0f32),
            &Tensor::scalar(1.0f32),
            &Tensor::scalar(0.0f32)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(0.0f32),
            &Tensor::scalar(f32::NAN),
            &Tensor::scalar(1.0f32)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(0.0f32),
            &Tensor::scalar(f32::INFINITY),
            &Tensor::scalar(1.0f32)
        )
        .is_err());
        assert!(range(
            &Tensor::scalar(0.0f64),
            &Tensor::scalar(1e12),
            &Tensor::scalar(1e-3)
        )
        .is_err());
    }

    // ---- Trilu ---------------------------------------------------------

    #[test]
    fn trilu_cases() {
        let x = t(&[3, 4], (1..=12).map(|v| v as f32).collect());
        let y = trilu(&x, None, true).unwrap();
        assert_eq!(
            f(&y),
            vec![1., 2., 3., 4., 0., 6., 7., 8., 0., 0., 11., 12.]
        );
        let y = trilu(&x, None, false).unwrap();
        assert_eq!(
            f(&y),
            vec![1., 0., 0., 0., 5., 6., 0., 0., 9., 10., 11., 0.]
        );
        let y = trilu(&x, Some(&Tensor::scalar(1i64)), true).unwrap();
        assert_eq!(f(&y), vec![0., 2., 3., 4., 0., 0., 7., 8., 0., 0., 0., 12.]);
        let y = trilu(&x, Some(&Tensor::scalar(-1i64)), false).unwrap();
        assert_eq!(f(&y), vec![0., 0., 0., 0., 5., 0., 0., 0., 9., 10., 0., 0.]);
        let y = trilu(&x, Some(&Tensor::scalar(-1i64)), true).unwrap();
        assert_eq!(
            f(&y),
            vec![1., 2., 3., 4., 5., 6., 7., 8., 0., 10., 11., 12.]
        );
        let y = trilu(&x, Some(&Tensor::scalar(i64::MAX)), false).unwrap();
        assert_eq!(y, x);
        let y = trilu(&x, Some(&Tensor::scalar(i64::MIN)), false).unwrap();
        assert_eq!(f(&y), vec![0.; 12]);
        // Batch dims and bool.
        let b = t(&[2, 2, 2], vec![true; 8]);
        let y = trilu(&b, None, false).unwrap();
        assert_eq!(
            y.as_slice::<bool>().unwrap(),
            &[true, false, true, true, true, false, true, true]
        );
        let y = trilu(&t::<f32>(&[2, 0, 3], vec![]), None, true).unwrap();
        assert_eq!(y.shape(), &[2, 0, 3]);
        assert!(trilu(&iota(&[3]), None, true).is_err());
        assert!(trilu(&x, Some(&ints(&[1, 2])), true).is_err());
    }

    // ---- Cross-checks --------------------------------------------------

    /// Indices a Slice visits along one axis, computed the slow way.
    fn naive_slice_axis(dim: usize, start: i64, end: i64, step: i64) -> Vec<usize> {
        let d = dim as i128;
        let (mut s, mut e, st) = (start as i128, end as i128, step as i128);
        if s < 0 {
            s += d;
        }
        if e < 0 {
            e += d;
        }
        let mut out = Vec::new();
        if st > 0 {
            s = s.clamp(0, d);
            e = e.clamp(0, d);
            while s < e {
                out.push(s as usize);
                s += st;
            }
        } else {
            s = s.clamp(-1, d - 1).max(0).min(d - 1);
            e = e.clamp(-1, d - 1);
            while s > e && s >= 0 {
                out.push(s as usize);
                s += st;
            }
        }
        out
    }

    #[test]
    fn slice_matches_naive() {
        let shape = [3, 5];
        let x = iota(&shape);
        let bounds = [i64::MIN, -7, -5, -3, -1, 0, 1, 2, 4, 5, 6, i64::MAX];
        for &st in &[-3i64, -2, -1, 1, 2, 3] {
            for &b in &bounds {
                for &e in &bounds {
                    let y = slice(
                        &x,
                        &ints(&[2, b]),
                        &ints(&[0, e]),
                        Some(&ints(&[0, 1])),
                        Some(&ints(&[-1, st])),
                    )
                    .unwrap();
                    let rows = naive_slice_axis(3, 2, 0, -1);
                    let cols = naive_slice_axis(5, b, e, st);
                    assert_eq!(y.shape(), &[rows.len(), cols.len()]);
                    let want: Vec<f32> = rows
                        .iter()
                        .flat_map(|&r| cols.iter().map(move |&c| flat(&shape, &[r, c]) as f32))
                        .collect();
                    assert_eq!(f(&y), want, "start {b} end {e} step {st}");
                }
            }
        }
    }

    #[test]
    fn every_dtype_goes_through_every_data_movement_op() {
        for dt in DType::ALL {
            let x = tensor(vec![2, 3], TensorData::zeros(dt, 6)).unwrap();
            let check = |y: Tensor, shape: &[usize]| {
                assert_eq!(y.dtype(), dt);
                assert_eq!(y.shape(), shape, "{dt}");
            };
            check(reshape(&x, &ints(&[3, 2]), false).unwrap(), &[3, 2]);
            check(flatten(&x, 0).unwrap(), &[1, 6]);
            check(transpose(&x, None).unwrap(), &[3, 2]);
            check(unsqueeze(&x, &ints(&[0])).unwrap(), &[1, 2, 3]);
            check(
                squeeze(&unsqueeze(&x, &ints(&[0])).unwrap(), None).unwrap(),
                &[2, 3],
            );
            check(concat(&[&x, &x], 1).unwrap(), &[2, 6]);
            let parts = split(&x, None, 1, 3).unwrap();
            check(parts[2].clone(), &[2, 1]);
            check(
                slice(
                    &x,
                    &ints(&[-1]),
                    &ints(&[i64::MIN]),
                    Some(&ints(&[1])),
                    Some(&ints(&[-1])),
                )
                .unwrap(),
                &[2, 3],
            );
            check(
                gather(&x, &Tensor::vector(vec![1i64, 0, 1]), 0).unwrap(),
                &[3, 3],
            );
            check(
                gather_elements(&x, &t(&[1, 1], vec![2i64]), 1).unwrap(),
                &[1, 1],
            );
            check(expand(&x, &ints(&[2, 1, 1])).unwrap(), &[2, 2, 3]);
            check(tile(&x, &ints(&[2, 1])).unwrap(), &[4, 3]);
            for mode in [
                PadMode::Constant,
                PadMode::Reflect,
                PadMode::Edge,
                PadMode::Wrap,
            ] {
                check(
                    pad(mode, &x, &ints(&[1, 1, 1, 1]), None, None).unwrap(),
                    &[4, 5],
                );
            }
            check(trilu(&x, None, true).unwrap(), &[2, 3]);
            let one = tensor(vec![1], TensorData::zeros(dt, 1)).unwrap();
            check(constant_of_shape(&ints(&[2, 2]), &one).unwrap(), &[2, 2]);
            if dt.is_numeric() {
                let z = Tensor::new(vec![], TensorData::zeros(dt, 1)).unwrap();
                assert!(range(&z, &z, &z).is_err(), "delta 0 for {dt}");
            }
        }
    }

    #[test]
    fn huge_outputs_are_refused() {
        let x = iota(&[2, 2]);
        assert!(tile(&x, &ints(&[1 << 31, 1 << 31])).is_err());
        assert!(expand(&x, &ints(&[1 << 40, 2, 2])).is_err());
        assert!(pad(PadMode::Edge, &x, &ints(&[0, 0, 1 << 40, 0]), None, None).is_err());
        let wide = Tensor::zeros(DType::U8, vec![1, 1 << 20]).unwrap();
        let m = err_msg(gather(&wide, &Tensor::vector(vec![0i64; 1 << 13]), 0));
        assert!(m.contains("limit"), "{m}");
        assert!(constant_of_shape(&ints(&[1 << 33]), &Tensor::vector(vec![0u8])).is_err());
    }
}
