//! The GEMM core plus the Gemm and MatMul operators.

use super::{float_prec, float_tensor, numel, values, MatElem, Prec, Real};
use crate::util::{broadcast_indices, broadcast_shape, tensor};
use crate::{invalid, unsupported, Result};
use kiln_gemm::{sgemm, sgemm_fused, Finish, Lhs, MatRef, PackedB, Residual, Rhs};
use kiln_ir::{DType, Tensor, TensorData};
use rayon::prelude::*;
use std::borrow::Cow;

/// Depth of one k-block: a `KC x NC` block of B stays cache-resident while all
/// rows of A stream past it.
const KC: usize = 256;
/// Width of one n-block (columns of B and C).
const NC: usize = 512;

/// `c[m x n] += a[m x k] * b[k x n]`, all row-major and contiguous.
///
/// Loop order i-k-j over contiguous rows of B and C (the inner loop
/// auto-vectorizes), four rows of C at a time so each loaded row of B is used
/// four times, blocked over k and n to stay in cache.
pub(crate) fn gemm_acc<T: MatElem>(m: usize, k: usize, n: usize, a: &[T], b: &[T], c: &mut [T]) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let (a, b, c) = (&a[..m * k], &b[..k * n], &mut c[..m * n]);
    for p0 in (0..k).step_by(KC) {
        let p1 = (p0 + KC).min(k);
        for j0 in (0..n).step_by(NC) {
            let j1 = (j0 + NC).min(n);
            let mut rows = c.chunks_exact_mut(n);
            let mut i = 0;
            while i + 4 <= m {
                let (Some(r0), Some(r1), Some(r2), Some(r3)) =
                    (rows.next(), rows.next(), rows.next(), rows.next())
                else {
                    break;
                };
                let (c0, c1, c2, c3) = (
                    &mut r0[j0..j1],
                    &mut r1[j0..j1],
                    &mut r2[j0..j1],
                    &mut r3[j0..j1],
                );
                let (a0, a1, a2, a3) = (
                    &a[i * k..(i + 1) * k],
                    &a[(i + 1) * k..(i + 2) * k],
                    &a[(i + 2) * k..(i + 3) * k],
                    &a[(i + 3) * k..(i + 4) * k],
                );
                for p in p0..p1 {
                    let (x0, x1, x2, x3) = (a0[p], a1[p], a2[p], a3[p]);
                    let br = &b[p * n + j0..p * n + j1];
                    for ((((y0, y1), y2), y3), &bv) in c0
                        .iter_mut()
                        .zip(c1.iter_mut())
                        .zip(c2.iter_mut())
                        .zip(c3.iter_mut())
                        .zip(br)
                    {
                        *y0 = T::madd(*y0, x0, bv);
                        *y1 = T::madd(*y1, x1, bv);
                        *y2 = T::madd(*y2, x2, bv);
                        *y3 = T::madd(*y3, x3, bv);
                    }
                }
                i += 4;
            }
            for r in rows {
                let cr = &mut r[j0..j1];
                let ar = &a[i * k..(i + 1) * k];
                for p in p0..p1 {
                    let x = ar[p];
                    let br = &b[p * n + j0..p * n + j1];
                    for (y, &bv) in cr.iter_mut().zip(br) {
                        *y = T::madd(*y, x, bv);
                    }
                }
                i += 1;
            }
        }
    }
}

/// Row-major transpose of a `rows x cols` matrix.
pub(crate) fn transpose<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * cols);
    for j in 0..cols {
        out.extend((0..rows).map(|i| v[i * cols + j]));
    }
    out
}

/// Gemm: `alpha * A' * B' + beta * C`, A' = A or A^T, B' = B or B^T, C
/// unidirectionally broadcast to `[M, N]`.
pub fn gemm(
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
) -> Result<Tensor> {
    if a.rank() != 2 || b.rank() != 2 {
        return Err(invalid!(
            "Gemm expects 2-D A and B, got A {:?} and B {:?}",
            a.shape(),
            b.shape()
        ));
    }
    if a.dtype() != b.dtype() {
        return Err(invalid!("Gemm: A is {} but B is {}", a.dtype(), b.dtype()));
    }
    let (m, ka) = if trans_a {
        (a.shape()[1], a.shape()[0])
    } else {
        (a.shape()[0], a.shape()[1])
    };
    let (kb, n) = if trans_b {
        (b.shape()[1], b.shape()[0])
    } else {
        (b.shape()[0], b.shape()[1])
    };
    if ka != kb {
        return Err(invalid!(
            "Gemm: inner dimensions differ: A {:?} (trans_a={trans_a}) gives K={ka}, B {:?} (trans_b={trans_b}) gives K={kb}",
            a.shape(),
            b.shape()
        ));
    }
    let c = c.filter(|_| beta != 0.0);
    let c_idx = match c {
        Some(c) => {
            let bs = broadcast_shape(c.shape(), &[m, n])?;
            if bs != [m, n] {
                return Err(invalid!(
                    "Gemm: C {:?} does not broadcast to the output [{m}, {n}]",
                    c.shape()
                ));
            }
            Some(broadcast_indices(c.shape(), &[m, n]))
        }
        None => None,
    };
    match a.dtype() {
        kiln_ir::DType::I32 | kiln_ir::DType::I64 | kiln_ir::DType::U32 | kiln_ir::DType::U64 => {
            return gemm_int(alpha, beta, trans_a, trans_b, a, b, c, c_idx, m, ka, n);
        }
        _ => {}
    }
    if a.dtype() == DType::F32 && c.is_none_or(|c| c.dtype() == DType::F32) {
        let (av, bv) = (f32_slice(a, "Gemm A")?, f32_slice(b, "Gemm B")?);
        let a_view = if trans_a {
            MatRef::row_major(av, ka, m).t()
        } else {
            MatRef::row_major(av, m, ka)
        };
        let b_view = if trans_b {
            MatRef::row_major(bv, n, ka).t()
        } else {
            MatRef::row_major(bv, ka, n)
        };
        let c = match (c, c_idx) {
            (Some(c), Some(idx)) => Some((f32_slice(c, "Gemm C")?, idx)),
            _ => None,
        };
        return gemm_f32(alpha, beta, a_view, Rhs::Mat(b_view), c);
    }
    match float_prec(a, "Gemm")? {
        Prec::F32 => gemm_float::<f32>(alpha, beta, trans_a, trans_b, a, b, c, c_idx, m, ka, n),
        Prec::F64 => gemm_float::<f64>(alpha, beta, trans_a, trans_b, a, b, c, c_idx, m, ka, n),
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_float<T: Real>(
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    c_idx: Option<Vec<usize>>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    let av = values::<T>(a, "Gemm A")?;
    let bv = values::<T>(b, "Gemm B")?;
    let av: Cow<[T]> = if trans_a {
        Cow::Owned(transpose(&av, k, m))
    } else {
        av
    };
    let bv: Cow<[T]> = if trans_b {
        Cow::Owned(transpose(&bv, n, k))
    } else {
        bv
    };
    let mut y = vec![T::ZERO; numel(&[m, n])?];
    gemm_acc(m, k, n, &av, &bv, &mut y);
    let alpha_t = T::from_f64(alpha as f64);
    if alpha != 1.0 {
        y.iter_mut().for_each(|v| *v *= alpha_t);
    }
    if let (Some(c), Some(idx)) = (c, c_idx) {
        let cv = values::<T>(c, "Gemm C")?;
        let beta_t = T::from_f64(beta as f64);
        for (v, &i) in y.iter_mut().zip(&idx) {
            *v += beta_t * cv[i];
        }
    }
    float_tensor(vec![m, n], y, a.dtype())
}

#[allow(clippy::too_many_arguments)]
fn gemm_int(
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    c_idx: Option<Vec<usize>>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    fn run<T: MatElem + std::ops::Add<Output = T> + TryFrom<i64>>(
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
        av: &[T],
        bv: &[T],
        c: Option<(&[T], Vec<usize>)>,
        m: usize,
        k: usize,
        n: usize,
        to_f64: fn(T) -> f64,
        from_f64: fn(f64) -> T,
    ) -> Vec<T> {
        let at;
        let av = if trans_a {
            at = transpose(av, k, m);
            &at[..]
        } else {
            av
        };
        let bt;
        let bv = if trans_b {
            bt = transpose(bv, n, k);
            &bt[..]
        } else {
            bv
        };
        let mut y = vec![T::ZERO; m * n];
        gemm_acc(m, k, n, av, bv, &mut y);
        if alpha != 1.0 {
            y.iter_mut()
                .for_each(|v| *v = from_f64(to_f64(*v) * alpha as f64));
        }
        if let Some((cv, idx)) = c {
            for (v, &i) in y.iter_mut().zip(&idx) {
                *v = if beta == 1.0 {
                    *v + cv[i]
                } else {
                    from_f64(to_f64(*v) + to_f64(cv[i]) * beta as f64)
                };
            }
        }
        y
    }
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let (Some(av), Some(bv)) = (a.as_slice::<$t>(), b.as_slice::<$t>()) else {
                return Err(invalid!("Gemm: A and B must have the same dtype"));
            };
            let cc = match (c, c_idx) {
                (Some(c), Some(idx)) => {
                    let cv = c.as_slice::<$t>().ok_or_else(|| {
                        invalid!("Gemm: C is {} but A is {}", c.dtype(), a.dtype())
                    })?;
                    Some((cv, idx))
                }
                _ => None,
            };
            let y = run::<$t>(
                alpha,
                beta,
                trans_a,
                trans_b,
                av,
                bv,
                cc,
                m,
                k,
                n,
                |x| x as f64,
                |x| x as $t,
            );
            tensor(vec![m, n], TensorData::$variant(y))
        }};
    }
    match a.dtype() {
        kiln_ir::DType::I32 => go!(i32, I32),
        kiln_ir::DType::I64 => go!(i64, I64),
        kiln_ir::DType::U32 => go!(u32, U32),
        kiln_ir::DType::U64 => go!(u64, U64),
        d => Err(unsupported!("Gemm on {d} tensors")),
    }
}

/// Shapes of a numpy-style matmul: batch shape of the output, M, K, N, the
/// batch shapes of A and B, and the final output shape.
pub(crate) struct MatmulShape {
    pub out_batch: Vec<usize>,
    pub a_batch: Vec<usize>,
    pub b_batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub out_shape: Vec<usize>,
}

pub(crate) fn matmul_shape(a: &[usize], b: &[usize]) -> Result<MatmulShape> {
    if a.is_empty() || b.is_empty() {
        return Err(invalid!(
            "MatMul does not accept scalars: got A {a:?} and B {b:?}"
        ));
    }
    // Promote 1-D operands: A [K] -> [1, K], B [K] -> [K, 1].
    let a2: Vec<usize> = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<usize> = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != kb {
        return Err(invalid!("MatMul: A {a:?} has K={k} but B {b:?} has K={kb}"));
    }
    let a_batch = a2[..a2.len() - 2].to_vec();
    let b_batch = b2[..b2.len() - 2].to_vec();
    let out_batch = broadcast_shape(&a_batch, &b_batch).map_err(|_| {
        invalid!("MatMul: batch dims of A {a:?} and B {b:?} cannot be broadcast together")
    })?;
    let mut out_shape = out_batch.clone();
    if a.len() > 1 {
        out_shape.push(m);
    }
    if b.len() > 1 {
        out_shape.push(n);
    }
    Ok(MatmulShape {
        out_batch,
        a_batch,
        b_batch,
        m,
        k,
        n,
        out_shape,
    })
}

/// Batched matmul over slices; see [`matmul`].
fn matmul_slices<T: MatElem>(s: &MatmulShape, a: &[T], b: &[T]) -> Result<Vec<T>> {
    let (m, k, n) = (s.m, s.k, s.n);
    let batch = numel(&s.out_batch)?;
    let mut y = vec![T::ZERO; numel(&s.out_shape)?];
    if y.is_empty() {
        return Ok(y);
    }
    let b_count = numel(&s.b_batch)?;
    let a_count = numel(&s.a_batch)?;
    // B shared by every batch and A's batches all distinct and contiguous: one
    // tall matmul [batch*M, K] x [K, N].
    if b_count == 1 && a_count == batch {
        gemm_acc(batch * m, k, n, a, b, &mut y);
        return Ok(y);
    }
    let ai = broadcast_indices(&s.a_batch, &s.out_batch);
    let bi = broadcast_indices(&s.b_batch, &s.out_batch);
    for (i, out) in y.chunks_exact_mut(m * n).enumerate() {
        let ao = ai[i] * m * k;
        let bo = bi[i] * k * n;
        gemm_acc(m, k, n, &a[ao..ao + m * k], &b[bo..bo + k * n], out);
    }
    Ok(y)
}

/// MatMul with numpy semantics: 1-D operands are promoted (and the added dim
/// removed from the result), batch dims broadcast. Floats and i32/i64/u32/u64
/// (integers exact, wrapping on overflow).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let s = matmul_shape(a.shape(), b.shape())?;
    if a.dtype() != b.dtype() {
        return Err(invalid!(
            "MatMul: A is {} {:?} but B is {} {:?}",
            a.dtype(),
            a.shape(),
            b.dtype(),
            b.shape()
        ));
    }
    macro_rules! int {
        ($t:ty, $variant:ident) => {{
            let (Some(av), Some(bv)) = (a.as_slice::<$t>(), b.as_slice::<$t>()) else {
                return Err(invalid!("MatMul: mismatched dtypes"));
            };
            let y = matmul_slices(&s, av, bv)?;
            tensor(s.out_shape.clone(), TensorData::$variant(y))
        }};
    }
    match a.dtype() {
        kiln_ir::DType::I32 => return int!(i32, I32),
        kiln_ir::DType::I64 => return int!(i64, I64),
        kiln_ir::DType::U32 => return int!(u32, U32),
        kiln_ir::DType::U64 => return int!(u64, U64),
        _ => {}
    }
    if a.dtype() == DType::F32 {
        let y = matmul_f32(
            &s,
            f32_slice(a, "MatMul A")?,
            MatmulB::Mat(f32_slice(b, "MatMul B")?),
            None,
        )?;
        return tensor(s.out_shape, TensorData::F32(y));
    }
    match float_prec(a, "MatMul")? {
        Prec::F32 => {
            let y = matmul_slices(
                &s,
                &values::<f32>(a, "MatMul A")?,
                &values::<f32>(b, "MatMul B")?,
            )?;
            float_tensor(s.out_shape, y, a.dtype())
        }
        Prec::F64 => {
            let y = matmul_slices(
                &s,
                &values::<f64>(a, "MatMul A")?,
                &values::<f64>(b, "MatMul B")?,
            )?;
            float_tensor(s.out_shape, y, a.dtype())
        }
    }
}

// ---------------------------------------------------------------------------
// Fast f32 Gemm / MatMul on kiln_gemm::sgemm: transposes are strided views,
// constant operands may come packed, and an epilogue (bias, residual,
// activation) runs on each finished piece of the output.
// ---------------------------------------------------------------------------

/// An epilogue over the rows of a matmul's output, seen as `[batch * M, N]`:
/// called with the global row, the first column and the values.
pub(crate) type RowEpilogue<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// A tensor's f32 elements, or an error naming the operand.
pub(crate) fn f32_slice<'a>(t: &'a Tensor, what: &str) -> Result<&'a [f32]> {
    t.as_slice::<f32>()
        .ok_or_else(|| invalid!("{what}: expected f32, got {} {:?}", t.dtype(), t.shape()))
}

/// Gemm in f32: `alpha * A' B' + beta * C`, C given with its broadcast
/// indices into the `[M, N]` output.
pub(crate) fn gemm_f32(
    alpha: f32,
    beta: f32,
    a: MatRef<'_>,
    b: Rhs<'_>,
    c: Option<(&[f32], Vec<usize>)>,
) -> Result<Tensor> {
    let (m, n) = (a.rows(), b.cols());
    if a.cols() != b.rows() {
        return Err(invalid!(
            "Gemm: A' is {m}x{} but B' is {}x{n}",
            a.cols(),
            b.rows()
        ));
    }
    // Written in full below: from C, or by sgemm with beta 0, or zeros for
    // an empty sum.
    let mut y = if c.is_none() && a.cols() == 0 {
        vec![0.0f32; numel(&[m, n])?]
    } else {
        crate::buffers::take_f32(numel(&[m, n])?)
    };
    let beta = match c {
        Some((cv, idx)) => {
            for (v, &i) in y.iter_mut().zip(&idx) {
                *v = cv[i];
            }
            beta
        }
        None => 0.0,
    };
    if a.cols() == 0 {
        // An empty sum: only beta * C remains.
        y.iter_mut().for_each(|v| *v *= beta);
    } else if !y.is_empty() {
        sgemm(alpha, Lhs::Mat(a), b, beta, &mut y, n, None);
    }
    tensor(vec![m, n], TensorData::F32(y))
}

/// The right operand of an f32 MatMul: B's elements (with `s.b_batch`), or B
/// packed once (2-D B only).
#[derive(Clone, Copy)]
pub(crate) enum MatmulB<'a> {
    Mat(&'a [f32]),
    Packed(&'a PackedB),
}

/// Below this many multiply-adds per matrix, a batched MatMul runs its
/// matrices in parallel instead of relying on sgemm's own threading.
const SMALL_MATMUL_MACS: usize = 1 << 21;

/// Batched f32 MatMul (numpy semantics, see [`matmul_shape`]) on sgemm, with
/// an optional epilogue over the output rows. Returns the output's elements.
pub(crate) fn matmul_f32(
    s: &MatmulShape,
    a: &[f32],
    b: MatmulB<'_>,
    epi: Option<&RowEpilogue<'_>>,
) -> Result<Vec<f32>> {
    matmul_f32_fused(s, a, b, &Finish::default(), epi)
}

/// [`matmul_f32`] with a [`Finish`] done in the GEMM's registers before `epi`.
/// Its rows are the output's rows counted across the batch (`batch * M`);
/// a residual has the output's shape.
pub(crate) fn matmul_f32_fused(
    s: &MatmulShape,
    a: &[f32],
    b: MatmulB<'_>,
    finish: &Finish<'_>,
    epi: Option<&RowEpilogue<'_>>,
) -> Result<Vec<f32>> {
    let (m, k, n) = (s.m, s.k, s.n);
    let batch = numel(&s.out_batch)?;
    // sgemm with beta 0 writes every element; empty sums (k = 0) need zeros.
    let mut y = if k == 0 {
        vec![0.0f32; numel(&s.out_shape)?]
    } else {
        crate::buffers::take_f32(numel(&s.out_shape)?)
    };
    if y.is_empty() {
        return Ok(y);
    }
    let a_count = numel(&s.a_batch)?;
    let b_count = numel(&s.b_batch)?;
    if let MatmulB::Packed(p) = b {
        if b_count != 1 || p.rows() != k || p.cols() != n {
            return Err(invalid!(
                "MatMul: B was packed as {}x{}, the product needs {k}x{n} with no batch dims",
                p.rows(),
                p.cols()
            ));
        }
    }
    if k == 0 {
        // Empty sums: zeros, then the epilogue.
        for (row, vals) in y.chunks_exact_mut(n).enumerate() {
            finish.apply(row, 0, vals);
            if let Some(e) = epi {
                e(row, 0, vals);
            }
        }
        return Ok(y);
    }
    let rhs = |bo: usize| match b {
        MatmulB::Mat(bv) => Rhs::Mat(MatRef::row_major(&bv[bo..bo + k * n], k, n)),
        MatmulB::Packed(p) => Rhs::Packed(p),
    };
    // B shared by every batch entry and A's entries distinct and contiguous:
    // one tall product [batch*M, K] x [K, N].
    if b_count == 1 && a_count == batch {
        let lhs = Lhs::Mat(MatRef::row_major(a, batch * m, k));
        sgemm_fused(1.0, lhs, rhs(0), 0.0, &mut y, n, finish, epi);
        return Ok(y);
    }
    let ai = broadcast_indices(&s.a_batch, &s.out_batch);
    let bi = broadcast_indices(&s.b_batch, &s.out_batch);
    let one = |i: usize, out: &mut [f32]| {
        let ao = ai[i] * m * k;
        let lhs = Lhs::Mat(MatRef::row_major(&a[ao..ao + m * k], m, k));
        let shifted = |row: usize, col0: usize, vals: &mut [f32]| {
            if let Some(e) = epi {
                e(i * m + row, col0, vals)
            }
        };
        let e: Option<&RowEpilogue<'_>> = epi.map(|_| &shifted as &RowEpilogue<'_>);
        // This matrix's rows of the finish.
        let fin = Finish {
            row_bias: finish.row_bias.map(|b| &b[i * m..]),
            residual: finish.residual.map(|r| Residual {
                data: &r.data[i * m * r.ld..],
                ld: r.ld,
            }),
            ..*finish
        };
        sgemm_fused(1.0, lhs, rhs(bi[i] * k * n), 0.0, out, n, &fin, e);
    };
    if batch > 1 && m * k * n <= SMALL_MATMUL_MACS {
        y.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, out)| one(i, out));
    } else {
        for (i, out) in y.chunks_exact_mut(m * n).enumerate() {
            one(i, out);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::*;

    /// Naive triple loop reference.
    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_acc_matches_naive_on_odd_sizes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (4, 4, 4),
            (5, 1, 9),
            (9, 300, 5),
            (7, 257, 513),
            (13, 3, 1030),
            (1, 600, 1),
        ] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let mut c = vec![0.0; m * n];
            gemm_acc(m, k, n, &a, &b, &mut c);
            assert_close(&c, &naive(m, k, n, &a, &b), 1e-4);
        }
    }

    #[test]
    fn gemm_acc_accumulates() {
        let mut c = vec![1.0f32, 2.0];
        gemm_acc(1, 2, 2, &[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], &mut c);
        assert_eq!(c, vec![1.0 + 7.0, 2.0 + 10.0]);
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_ref(
        alpha: f32,
        beta: f32,
        ta: bool,
        tb: bool,
        a: &Tensor,
        b: &Tensor,
        c: &[f32],
        c_shape: &[usize],
    ) -> Vec<f32> {
        let (av, bv) = (f32s(a), f32s(b));
        let (m, k) = if ta {
            (a.shape()[1], a.shape()[0])
        } else {
            (a.shape()[0], a.shape()[1])
        };
        let n = if tb { b.shape()[0] } else { b.shape()[1] };
        let ci = broadcast_indices(c_shape, &[m, n]);
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let x = if ta { av[p * m + i] } else { av[i * k + p] };
                    let w = if tb { bv[j * k + p] } else { bv[p * n + j] };
                    s += x * w;
                }
                y[i * n + j] = alpha * s + beta * c[ci[i * n + j]];
            }
        }
        y
    }

    #[test]
    fn gemm_all_transpose_combos_and_broadcast_c() {
        let mut rng = Rng::new(2);
        let (m, k, n) = (3, 4, 5);
        for ta in [false, true] {
            for tb in [false, true] {
                let a = t(&if ta { [k, m] } else { [m, k] }, rng.vec(m * k));
                let b = t(&if tb { [n, k] } else { [k, n] }, rng.vec(k * n));
                for c_shape in [vec![], vec![n], vec![1, n], vec![m, 1], vec![m, n]] {
                    let cn: usize = c_shape.iter().product();
                    let cv = rng.vec(cn);
                    let c = t(&c_shape, cv.clone());
                    let y = gemm(0.5, 2.0, ta, tb, &a, &b, Some(&c)).unwrap();
                    assert_eq!(y.shape(), &[m, n]);
                    assert_close(
                        &f32s(&y),
                        &gemm_ref(0.5, 2.0, ta, tb, &a, &b, &cv, &c_shape),
                        1e-5,
                    );
                }
                // No C.
                let y = gemm(1.0, 1.0, ta, tb, &a, &b, None).unwrap();
                let zero = vec![0.0];
                assert_close(
                    &f32s(&y),
                    &gemm_ref(1.0, 0.0, ta, tb, &a, &b, &zero, &[]),
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn gemm_hand_checked_and_errors() {
        let a = t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = t(&[2, 2], vec![5.0, 6.0, 7.0, 8.0]);
        let c = t(&[2], vec![1.0, -1.0]);
        let y = gemm(1.0, 1.0, false, false, &a, &b, Some(&c)).unwrap();
        assert_eq!(f32s(&y), vec![20.0, 21.0, 44.0, 49.0]);
        // A^T B: [[1,3],[2,4]] x [[5,6],[7,8]] = [[26,30],[38,44]]
        let y = gemm(1.0, 0.0, true, false, &a, &b, Some(&c)).unwrap();
        assert_eq!(f32s(&y), vec![26.0, 30.0, 38.0, 44.0]);
        let bad = t(&[3, 2], vec![0.0; 6]);
        let e = gemm(1.0, 1.0, false, false, &a, &bad, None).unwrap_err();
        assert!(e.to_string().contains("K=2"), "{e}");
        let badc = t(&[3], vec![0.0; 3]);
        assert!(gemm(1.0, 1.0, false, false, &a, &b, Some(&badc)).is_err());
        let ai = Tensor::from_vec(vec![1, 2], vec![2i64, 3]).unwrap();
        let bi = Tensor::from_vec(vec![2, 1], vec![4i64, 5]).unwrap();
        let ci = Tensor::from_vec(vec![1], vec![100i64]).unwrap();
        let y = gemm(1.0, 1.0, false, false, &ai, &bi, Some(&ci)).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[123]);
    }

    #[test]
    fn matmul_1d_and_2d() {
        let v = t(&[3], vec![1.0, 2.0, 3.0]);
        let m = t(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let y = matmul(&v, &m).unwrap();
        assert_eq!(y.shape(), &[2]);
        assert_eq!(f32s(&y), vec![22.0, 28.0]);
        let mt = t(&[2, 3], vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        let y = matmul(&mt, &v).unwrap();
        assert_eq!(y.shape(), &[2]);
        assert_eq!(f32s(&y), vec![22.0, 28.0]);
        let y = matmul(&v, &v).unwrap();
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(f32s(&y), vec![14.0]);
        // 1-D x batched 3-D.
        let bm = t(&[2, 3, 1], vec![1.0, 1.0, 1.0, 0.0, 1.0, 2.0]);
        let y = matmul(&v, &bm).unwrap();
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(f32s(&y), vec![6.0, 8.0]);
    }

    #[test]
    fn matmul_batched_broadcast() {
        let mut rng = Rng::new(3);
        let a = t(&[2, 1, 3, 4], rng.vec(24));
        let b = t(&[5, 4, 2], rng.vec(40));
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 5, 3, 2]);
        let (av, bv, yv) = (f32s(&a), f32s(&b), f32s(&y));
        for i in 0..2 {
            for j in 0..5 {
                let want = naive(3, 4, 2, &av[i * 12..i * 12 + 12], &bv[j * 8..j * 8 + 8]);
                let o = (i * 5 + j) * 6;
                assert_close(&yv[o..o + 6], &want, 1e-5);
            }
        }
        // Shared 2-D B folds the batch.
        let b2 = t(&[4, 2], rng.vec(8));
        let y = matmul(&a, &b2).unwrap();
        assert_eq!(y.shape(), &[2, 1, 3, 2]);
        let b2v = f32s(&b2);
        assert_close(&f32s(&y), &naive(6, 4, 2, &av, &b2v), 1e-5);
        // Errors name both shapes.
        let e = matmul(&a, &t(&[3, 2], vec![0.0; 6]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 1, 3, 4]") && e.contains("[3, 2]"), "{e}");
        let e = matmul(&t(&[2, 1, 2], vec![0.0; 4]), &t(&[3, 2, 1], vec![0.0; 6]));
        assert!(e.is_err());
        let y = matmul(
            &t(&[2, 1, 2], vec![1.0; 4]),
            &t(&[3, 2, 2, 1], vec![1.0; 12]),
        )
        .unwrap();
        assert_eq!(y.shape(), &[3, 2, 1, 1]);
        assert_eq!(f32s(&y), vec![2.0; 6]);
    }

    #[test]
    fn matmul_integers_exact_and_f64_f16() {
        let a = Tensor::from_vec(vec![2, 2], vec![1i32, 2, 3, 4]).unwrap();
        let b = Tensor::from_vec(vec![2, 2], vec![5i32, 6, 7, 8]).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[19, 22, 43, 50]);
        let a = Tensor::from_vec(vec![1, 2], vec![1u64 << 40, 3]).unwrap();
        let b = Tensor::from_vec(vec![2, 1], vec![3u64, 1 << 41]).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.as_slice::<u64>().unwrap(), &[(3u64 << 40) + (3u64 << 41)]);
        let a = Tensor::from_vec(vec![1, 2], vec![1i64 << 40, -3]).unwrap();
        let b = Tensor::from_vec(vec![2, 1], vec![3i64, 1 << 41]).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[(3i64 << 40) - (3i64 << 41)]);
        let a = Tensor::from_vec(vec![1, 1], vec![7u32]).unwrap();
        let y = matmul(&a, &a).unwrap();
        assert_eq!(y.as_slice::<u32>().unwrap(), &[49]);
        let a = Tensor::from_vec(vec![1, 2], vec![0.5f64, 2.0]).unwrap();
        let b = Tensor::from_vec(vec![2], vec![2.0f64, 3.0]).unwrap();
        assert_eq!(matmul(&a, &b).unwrap().as_slice::<f64>().unwrap(), &[7.0]);
        let h = |v: &[f32]| {
            v.iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>()
        };
        let a = Tensor::from_vec(vec![1, 2], h(&[1.0, 2.0])).unwrap();
        let b = Tensor::from_vec(vec![2, 1], h(&[3.0, 4.0])).unwrap();
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.dtype(), kiln_ir::DType::F16);
        assert_eq!(y.as_slice::<half::f16>().unwrap()[0].to_f32(), 11.0);
        let a = Tensor::from_vec(vec![1, 1], vec![1u8]).unwrap();
        assert!(matches!(
            matmul(&a, &a),
            Err(crate::KernelError::Unsupported(_))
        ));
        assert!(matmul(&Tensor::scalar(1.0f32), &t(&[1], vec![1.0])).is_err());
    }

    #[test]
    fn matmul_empty_dims() {
        let a = t(&[0, 3], vec![]);
        let b = t(&[3, 2], vec![0.0; 6]);
        assert_eq!(matmul(&a, &b).unwrap().shape(), &[0, 2]);
        let a = t(&[2, 0], vec![]);
        let b = t(&[0, 2], vec![]);
        let y = matmul(&a, &b).unwrap();
        assert_eq!(f32s(&y), vec![0.0; 4]);
    }

    /// The sgemm MatMul path against the old gemm_acc path on broadcast
    /// batches, 1-D operands, empty dims and sizes that take either the
    /// batch-parallel or the single-product route.
    #[test]
    fn fast_matmul_matches_gemm_acc_path() {
        let mut rng = Rng::new(31);
        let shapes: &[(&[usize], &[usize])] = &[
            (&[3, 5], &[5, 7]),
            (&[2, 1, 3, 4], &[5, 4, 2]),
            (&[4], &[4]),
            (&[4], &[3, 4, 6]),
            (&[2, 3, 4], &[4]),
            (&[1, 12, 16, 8], &[1, 12, 8, 16]),
            (&[3, 1, 4, 9], &[1, 2, 9, 5]),
            (&[5, 4], &[2, 3, 4, 7]),
            (&[2, 70, 130], &[2, 130, 300]),
            (&[0, 3], &[3, 2]),
            (&[2, 0], &[0, 3]),
            (&[2, 3, 0], &[2, 0, 4]),
            (&[0, 2, 3], &[3, 3]),
            (&[1, 1], &[1, 1]),
        ];
        for &(ash, bsh) in shapes {
            let a = t(ash, rng.vec(ash.iter().product()));
            let b = t(bsh, rng.vec(bsh.iter().product()));
            let s = matmul_shape(ash, bsh).unwrap();
            let want = matmul_slices(&s, &f32s(&a), &f32s(&b)).unwrap();
            let y = matmul(&a, &b).unwrap();
            assert_eq!(y.shape(), &s.out_shape[..], "{ash:?} x {bsh:?}");
            assert_close(&f32s(&y), &want, 1e-4);
            // A packed 2-D B gives the same.
            if bsh.len() == 2 {
                let pb = PackedB::new(MatRef::row_major(
                    b.as_slice::<f32>().unwrap(),
                    bsh[0],
                    bsh[1],
                ));
                let got = matmul_f32(&s, &f32s(&a), MatmulB::Packed(&pb), None).unwrap();
                assert_close(&got, &want, 1e-4);
            }
        }
    }

    #[test]
    fn fast_matmul_epilogue_sees_global_rows() {
        // Batched (not foldable) product: the epilogue's row is batch*M + i.
        let mut rng = Rng::new(32);
        let (a, b) = (t(&[3, 2, 4], rng.vec(24)), t(&[3, 4, 5], rng.vec(60)));
        let s = matmul_shape(a.shape(), b.shape()).unwrap();
        let plain = matmul_slices(&s, &f32s(&a), &f32s(&b)).unwrap();
        let epi = |row: usize, col0: usize, vals: &mut [f32]| {
            for (j, v) in vals.iter_mut().enumerate() {
                *v += (row * 100 + col0 + j) as f32;
            }
        };
        let got = matmul_f32(&s, &f32s(&a), MatmulB::Mat(&f32s(&b)), Some(&epi)).unwrap();
        let want: Vec<f32> = plain
            .iter()
            .enumerate()
            .map(|(i, v)| v + ((i / 5) * 100 + i % 5) as f32)
            .collect();
        assert_close(&got, &want, 1e-5);
        // K = 0: zeros, and the epilogue still runs once per row.
        let (a, b) = (t(&[3, 0], vec![]), t(&[0, 2], vec![]));
        let s = matmul_shape(a.shape(), b.shape()).unwrap();
        let got = matmul_f32(&s, &[], MatmulB::Mat(&[]), Some(&epi)).unwrap();
        assert_eq!(got, vec![0.0, 1.0, 100.0, 101.0, 200.0, 201.0]);
    }

    #[test]
    fn fast_gemm_edge_cases() {
        // K = 0: only beta * C.
        let a = t(&[2, 0], vec![]);
        let b = t(&[0, 3], vec![]);
        let c = t(&[3], vec![1.0, 2.0, 3.0]);
        let y = gemm(1.0, 2.0, false, false, &a, &b, Some(&c)).unwrap();
        assert_eq!(f32s(&y), vec![2.0, 4.0, 6.0, 2.0, 4.0, 6.0]);
        // beta = 0 ignores NaN in C; M = 0 is an empty output.
        let a = t(&[1, 2], vec![1.0, 2.0]);
        let b = t(&[2, 1], vec![3.0, 4.0]);
        let c = t(&[1], vec![f32::NAN]);
        let y = gemm(1.0, 0.0, false, false, &a, &b, Some(&c)).unwrap();
        assert_eq!(f32s(&y), vec![11.0]);
        let y = gemm(1.0, 1.0, true, false, &t(&[2, 0], vec![]), &b, None).unwrap();
        assert_eq!(y.shape(), &[0, 1]);
        // Larger random shapes against the reference formula, all transposes.
        let mut rng = Rng::new(33);
        let (m, k, n) = (37, 70, 45);
        for (ta, tb) in [(false, false), (true, true), (true, false), (false, true)] {
            let a = t(&if ta { [k, m] } else { [m, k] }, rng.vec(m * k));
            let b = t(&if tb { [n, k] } else { [k, n] }, rng.vec(k * n));
            let cv = rng.vec(m);
            let c = t(&[m, 1], cv.clone());
            let y = gemm(1.5, -0.5, ta, tb, &a, &b, Some(&c)).unwrap();
            assert_close(
                &f32s(&y),
                &gemm_ref(1.5, -0.5, ta, tb, &a, &b, &cv, &[m, 1]),
                1e-4,
            );
        }
    }

    /// Speed of the BERT attention MatMul [1,12,128,64] x [1,12,64,128]:
    /// `cargo test -p kiln-cpu --release -- --ignored bert_matmul_speed --nocapture`.
    #[test]
    #[ignore]
    fn bert_matmul_speed() {
        let mut rng = Rng::new(10);
        let a = t(&[1, 12, 128, 64], rng.vec(12 * 128 * 64));
        let b = t(&[1, 12, 64, 128], rng.vec(12 * 64 * 128));
        let _ = matmul(&a, &b).unwrap();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = std::time::Instant::now();
            std::hint::black_box(matmul(&a, &b).unwrap());
            best = best.min(start.elapsed().as_secs_f64());
        }
        let flops = 2.0 * 12.0 * 128.0 * 64.0 * 128.0;
        println!(
            "bert matmul [1,12,128,64]x[1,12,64,128]: {:.3} ms, {:.1} GFLOP/s (best of 20)",
            best * 1e3,
            flops / best / 1e9
        );
    }

    /// Rough speed of a 1024^3 f32 matmul: `cargo test -p kiln-cpu --release
    /// -- --ignored matmul_speed --nocapture`.
    #[test]
    #[ignore]
    fn matmul_speed() {
        let n = 1024;
        let mut rng = Rng::new(9);
        let a = t(&[n, n], rng.vec(n * n));
        let b = t(&[n, n], rng.vec(n * n));
        let _ = matmul(&a, &b).unwrap();
        let reps = 3;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(matmul(&a, &b).unwrap());
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        let gflops = 2.0 * (n * n * n) as f64 / secs / 1e9;
        println!(
            "1024^3 f32 matmul: {:.1} ms, {gflops:.2} GFLOP/s",
            secs * 1e3
        );
    }
}
