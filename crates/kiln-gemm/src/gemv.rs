//! Matrix-vector products (`m == 1` or `n == 1`): memory-bound, so they stream
//! the matrix once with vectorized axpy/dot helpers instead of packing it.
//! Layouts without a streaming form (general strides) return `false` and take
//! the GEMM path.

use crate::kernels::Kernel;
use crate::{Epilogue, Lhs, Rhs};
use rayon::prelude::*;

/// Below this many matrix elements a GEMV runs on the caller's thread.
const PAR_MIN_ELEMS: usize = 1 << 16;
/// Output chunk of the row-vector GEMV (floats; the partial sums stay in L1).
const COL_CHUNK: usize = 1024;
/// Panel-form tasks per pool thread (several, so uneven progress evens out).
const TASKS_PER_THREAD: usize = 4;

/// Finishes output values: `c = alpha * acc + beta * c` (`beta == 0`: c ignored).
#[inline]
fn finish(alpha: f32, acc: f32, beta: f32, c: &mut f32) {
    *c = if beta == 0.0 {
        alpha * acc
    } else {
        alpha * acc + beta * *c
    };
}

/// `m == 1`: `c[0, :] = alpha * a[0, :]·B + beta * c[0, :]`. Returns false
/// (nothing done) when B's layout has no streaming form here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_times_matrix(
    kern: &'static Kernel,
    alpha: f32,
    a: &Lhs<'_>,
    b: &Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    epilogue: Option<&Epilogue<'_>>,
) -> bool {
    let (k, n) = (b.rows(), b.cols());
    enum Form<'b> {
        /// Row-major B: y += x[p] * B[p, :].
        Rows(&'b [f32], usize),
        /// Column-major B: y[j] = x · B[:, j].
        Cols(&'b [f32], usize),
        /// Packed B panels of the kernel's NR.
        Panels(&'b [f32]),
    }
    let form = match b {
        Rhs::Mat(v) if v.col_stride() == 1 => Form::Rows(v.data(), v.row_stride()),
        Rhs::Mat(v) if v.row_stride() == 1 => Form::Cols(v.data(), v.col_stride()),
        Rhs::Packed(p) if p.kind == kern.kind => Form::Panels(p.data.as_slice()),
        _ => return false,
    };
    let x: Vec<f32> = (0..k).map(|p| a_at(a, 0, p)).collect();
    let c = &mut c[..n];
    let parallel = k * n >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1;
    let chunk = match form {
        // Whole panels; a few per thread so a product with fewer columns
        // than `COL_CHUNK` still runs on every thread.
        Form::Panels(_) => {
            let panels = n.div_ceil(kern.nr);
            let tasks = if parallel {
                TASKS_PER_THREAD * rayon::current_num_threads()
            } else {
                1
            };
            kern.nr
                * panels
                    .div_ceil(tasks)
                    .clamp(1, (COL_CHUNK / kern.nr).max(1))
        }
        _ => COL_CHUNK,
    };
    let work = |(t, cs): (usize, &mut [f32])| {
        let j0 = t * chunk;
        let w = cs.len();
        let mut acc = vec![0f32; w];
        match form {
            Form::Rows(data, rs) => {
                for (p, &xp) in x.iter().enumerate() {
                    kern.axpy(xp, &data[p * rs + j0..p * rs + j0 + w], &mut acc);
                }
            }
            Form::Cols(data, cs_) => {
                for (j, s) in acc.iter_mut().enumerate() {
                    let col = (j0 + j) * cs_;
                    *s = kern.dot(&x, &data[col..col + k]);
                }
            }
            Form::Panels(data) => {
                let nr = kern.nr;
                for (q, out) in acc.chunks_mut(nr).enumerate() {
                    let jq = j0 / nr + q;
                    kern.panel_gemv(&x, &data[jq * nr * k..(jq + 1) * nr * k], out);
                }
            }
        }
        for (cv, &s) in cs.iter_mut().zip(&acc) {
            finish(alpha, s, beta, cv);
        }
        if let Some(e) = epilogue {
            e(0, j0, cs);
        }
    };
    if parallel {
        c.par_chunks_mut(chunk).enumerate().for_each(work);
    } else {
        c.chunks_mut(chunk).enumerate().for_each(work);
    }
    true
}

/// `n == 1`: `c[:, 0] = alpha * A·b[:, 0] + beta * c[:, 0]`. Returns false
/// when A's layout has no streaming form here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matrix_times_col(
    kern: &'static Kernel,
    alpha: f32,
    a: &Lhs<'_>,
    b: &Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    epilogue: Option<&Epilogue<'_>>,
) -> bool {
    let (m, k) = (a.rows(), a.cols());
    enum Form<'b> {
        /// Row-major A: c[i] = A[i, :] · x.
        Rows(&'b [f32], usize),
        /// Column-major A: y += x[p] * A[:, p].
        Cols(&'b [f32], usize),
        /// Packed A panels of the kernel's MR.
        Panels(&'b [f32]),
    }
    let form = match a {
        Lhs::Mat(v) if v.col_stride() == 1 => Form::Rows(v.data(), v.row_stride()),
        Lhs::Mat(v) if v.row_stride() == 1 => Form::Cols(v.data(), v.col_stride()),
        Lhs::Packed(p) if p.kind == kern.kind => Form::Panels(p.data.as_slice()),
        _ => return false,
    };
    let x: Vec<f32> = (0..k).map(|p| b_at(b, p, 0)).collect();
    let mr = kern.mr;
    assert!(mr <= 16, "packed-A GEMV keeps at most 16 row sums");
    // Rows per chunk: a multiple of MR so packed panels never straddle chunks.
    let rows_per = mr * (256 / mr).max(1);
    let ldc = ldc.max(1);
    let used = (m - 1) * ldc + 1;
    let work = |(t, cs): (usize, &mut [f32])| {
        let i0 = t * rows_per;
        let rows = rows_per.min(m - i0);
        let mut acc = vec![0f32; rows];
        match form {
            Form::Rows(data, rs) => {
                for (r, s) in acc.iter_mut().enumerate() {
                    let row = (i0 + r) * rs;
                    *s = kern.dot(&data[row..row + k], &x);
                }
            }
            Form::Cols(data, cs_) => {
                for (p, &xp) in x.iter().enumerate() {
                    kern.axpy(xp, &data[p * cs_ + i0..p * cs_ + i0 + rows], &mut acc);
                }
            }
            Form::Panels(data) => {
                for (q, out) in acc.chunks_mut(mr).enumerate() {
                    let ip = i0 / mr + q;
                    let panel = &data[ip * mr * k..(ip + 1) * mr * k];
                    let mut s = [0f32; 16];
                    for (col, &xp) in panel.chunks_exact(mr).zip(&x) {
                        for (sv, &av) in s.iter_mut().zip(col) {
                            *sv += av * xp;
                        }
                    }
                    out.copy_from_slice(&s[..out.len()]);
                }
            }
        }
        for (r, &s) in acc.iter().enumerate() {
            let cv = &mut cs[r * ldc];
            finish(alpha, s, beta, cv);
            if let Some(e) = epilogue {
                e(i0 + r, 0, std::slice::from_mut(cv));
            }
        }
    };
    let c = &mut c[..used];
    if m * k >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        c.par_chunks_mut(rows_per * ldc).enumerate().for_each(work);
    } else {
        c.chunks_mut(rows_per * ldc).enumerate().for_each(work);
    }
    true
}

/// Element (i, p) of the left operand, packed or not.
pub(crate) fn a_at(a: &Lhs<'_>, i: usize, p: usize) -> f32 {
    match a {
        Lhs::Mat(v) => v.at(i, p),
        Lhs::Packed(pa) => pa.get(i, p),
        Lhs::Panels(_) | Lhs::Gather(_) => {
            unreachable!("sgemm never reads caller-packed operands by element")
        }
    }
}

/// Element (p, j) of the right operand, packed or not.
pub(crate) fn b_at(b: &Rhs<'_>, p: usize, j: usize) -> f32 {
    match b {
        Rhs::Mat(v) => v.at(p, j),
        Rhs::Packed(pb) => pb.get(p, j),
        Rhs::Panels(_) => unreachable!("sgemm never reads caller-packed operands by element"),
    }
}
