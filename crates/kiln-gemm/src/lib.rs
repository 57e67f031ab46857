//! kiln's f32 GEMM: `C = alpha * A·B + beta * C`, then an optional epilogue
//! (bias, activation, residual) applied to each finished block of C while it is
//! still in cache.
//!
//! Operands are strided views ([`MatRef`]) or operands packed once ahead of time
//! ([`PackedA`], [`PackedB`]: constant weights are packed at plan time, not on
//! every run). Work is split over the rayon pool the caller runs in.
//!
//! [`sgemm_reference`] is the plain triple loop every fast path is tested against.

use rayon::prelude::*;

/// A read-only strided view of a `rows x cols` f32 matrix: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view. Panics if the view reaches past `data` (a caller bug, not
    /// bad user input: kernels check shapes before building views).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> MatRef<'a> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "MatRef {rows}x{cols} strides ({row_stride}, {col_stride}) needs {} elements, slice has {}",
                last + 1,
                data.len()
            );
        }
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A contiguous row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef::new(data, rows, cols, cols, 1)
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> MatRef<'a> {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// The left operand (`m x k`), packed once for the microkernel.
#[derive(Clone, Debug)]
pub struct PackedA {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    pub fn new(a: MatRef<'_>) -> PackedA {
        let (m, k) = (a.rows, a.cols);
        let mut data = Vec::with_capacity(m * k);
        for i in 0..m {
            data.extend((0..k).map(|p| a.at(i, p)));
        }
        PackedA { m, k, data }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.k
    }
}

/// The right operand (`k x n`), packed once for the microkernel.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    pub fn new(b: MatRef<'_>) -> PackedB {
        let (k, n) = (b.rows, b.cols);
        let mut data = Vec::with_capacity(k * n);
        for p in 0..k {
            data.extend((0..n).map(|j| b.at(p, j)));
        }
        PackedB { k, n, data }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }
}

/// The left operand of one product.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedA),
}

/// The right operand of one product.
#[derive(Clone, Copy, Debug)]
pub enum Rhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedB),
}

impl Lhs<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Lhs::Mat(a) => a.rows,
            Lhs::Packed(a) => a.m,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Lhs::Mat(a) => a.cols,
            Lhs::Packed(a) => a.k,
        }
    }
}

impl Rhs<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Rhs::Mat(b) => b.rows,
            Rhs::Packed(b) => b.k,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Rhs::Mat(b) => b.cols,
            Rhs::Packed(b) => b.n,
        }
    }
}

/// Called once for every finished piece of C, with the piece's row, its first
/// column and its values (`vals[j]` is `C[row, col0 + j]`). The pieces of one
/// product cover C exactly once; they may be called from several threads.
pub type Epilogue<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// `C = alpha * A·B + beta * C`, then `epilogue` over every element of C.
///
/// C is `m x n` row-major with row stride `ldc` (`c.len() >= (m-1)*ldc + n`).
/// With `beta == 0` C's old contents are ignored (NaN included), as in BLAS.
/// Panics if the shapes disagree (a caller bug: kernels validate first).
pub fn sgemm(
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    epilogue: Option<&Epilogue<'_>>,
) {
    let (m, k, n) = check_dims(&a, &b, c.len(), ldc);
    if m == 0 || n == 0 {
        return;
    }
    // Row-major copies (the stand-in for real packing).
    let a_rows: std::borrow::Cow<'_, [f32]> = match a {
        Lhs::Packed(p) => std::borrow::Cow::Borrowed(&p.data[..]),
        Lhs::Mat(a) => std::borrow::Cow::Owned(PackedA::new(a).data),
    };
    let b_rows: std::borrow::Cow<'_, [f32]> = match b {
        Rhs::Packed(p) => std::borrow::Cow::Borrowed(&p.data[..]),
        Rhs::Mat(b) => std::borrow::Cow::Owned(PackedB::new(b).data),
    };
    let rows_per_task = m.div_ceil(rayon::current_num_threads().max(1) * 4).max(4);
    c.par_chunks_mut(ldc.max(n) * rows_per_task)
        .enumerate()
        .for_each(|(t, chunk)| {
            let i0 = t * rows_per_task;
            for (r, crow) in chunk.chunks_mut(ldc.max(n)).enumerate() {
                let i = i0 + r;
                if i >= m {
                    break;
                }
                let crow = &mut crow[..n];
                if beta == 0.0 {
                    crow.fill(0.0);
                } else if beta != 1.0 {
                    crow.iter_mut().for_each(|v| *v *= beta);
                }
                let arow = &a_rows[i * k..(i + 1) * k];
                for (p, &av) in arow.iter().enumerate() {
                    let x = alpha * av;
                    let brow = &b_rows[p * n..(p + 1) * n];
                    for (y, &bv) in crow.iter_mut().zip(brow) {
                        *y += x * bv;
                    }
                }
                if let Some(e) = epilogue {
                    e(i, 0, crow);
                }
            }
        });
}

/// The plain definition, for tests: `C = alpha * A·B + beta * C` then the
/// epilogue row by row, one dot product per element accumulated in f64.
pub fn sgemm_reference(
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    epilogue: Option<&Epilogue<'_>>,
) {
    let (m, k, n) = check_dims(&a, &b, c.len(), ldc);
    let a = match a {
        Lhs::Packed(p) => MatRef::row_major(&p.data, p.m, p.k),
        Lhs::Mat(a) => a,
    };
    let b = match b {
        Rhs::Packed(p) => MatRef::row_major(&p.data, p.k, p.n),
        Rhs::Mat(b) => b,
    };
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * ldc + j] as f64
            };
            c[i * ldc + j] = (alpha as f64 * dot + old) as f32;
        }
        if let Some(e) = epilogue {
            e(i, 0, &mut c[i * ldc..i * ldc + n]);
        }
    }
}

fn check_dims(a: &Lhs<'_>, b: &Rhs<'_>, c_len: usize, ldc: usize) -> (usize, usize, usize) {
    let (m, k) = (a.rows(), a.cols());
    let (kb, n) = (b.rows(), b.cols());
    assert_eq!(k, kb, "sgemm: A is {m}x{k} but B is {kb}x{n}");
    assert!(ldc >= n, "sgemm: ldc {ldc} < n {n}");
    if m > 0 && n > 0 {
        assert!(
            c_len >= (m - 1) * ldc + n,
            "sgemm: C has {c_len} elements, needs {}",
            (m - 1) * ldc + n
        );
    }
    (m, k, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_on_random_shapes_and_layouts() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 65),
            (64, 1, 9),
            (2, 300, 1),
            (0, 4, 4),
            (5, 0, 3),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = rand_vec(m * k, 1);
                let bv = rand_vec(k * n, 2);
                let a = if ta {
                    MatRef::row_major(&av, k, m).t()
                } else {
                    MatRef::row_major(&av, m, k)
                };
                let b = if tb {
                    MatRef::row_major(&bv, n, k).t()
                } else {
                    MatRef::row_major(&bv, k, n)
                };
                let ldc = n + 3;
                let c0 = rand_vec(m.max(1) * ldc, 3);
                let mut want = c0.clone();
                sgemm_reference(0.5, Lhs::Mat(a), Rhs::Mat(b), 2.0, &mut want, ldc, None);
                let mut got = c0.clone();
                sgemm(0.5, Lhs::Mat(a), Rhs::Mat(b), 2.0, &mut got, ldc, None);
                let pa = PackedA::new(a);
                let pb = PackedB::new(b);
                let mut got_packed = c0.clone();
                sgemm(
                    0.5,
                    Lhs::Packed(&pa),
                    Rhs::Packed(&pb),
                    2.0,
                    &mut got_packed,
                    ldc,
                    None,
                );
                for i in 0..m {
                    for j in 0..n {
                        let w = want[i * ldc + j];
                        for g in [got[i * ldc + j], got_packed[i * ldc + j]] {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + k as f32),
                                "({m},{k},{n}) t=({ta},{tb}) [{i},{j}]: {g} vs {w}"
                            );
                        }
                    }
                    // Padding between rows is untouched.
                    for j in n..ldc {
                        assert_eq!(got[i * ldc + j], c0[i * ldc + j]);
                    }
                }
            }
        }
    }

    #[test]
    fn beta_zero_ignores_nan_and_epilogue_sees_every_element_once() {
        let (m, k, n) = (9, 4, 11);
        let av = rand_vec(m * k, 4);
        let bv = rand_vec(k * n, 5);
        let mut c = vec![f32::NAN; m * n];
        let seen = std::sync::Mutex::new(vec![0u32; m * n]);
        let epi = |row: usize, col0: usize, vals: &mut [f32]| {
            let mut s = seen.lock().unwrap();
            for (j, v) in vals.iter_mut().enumerate() {
                s[row * n + col0 + j] += 1;
                *v = v.max(0.0);
            }
        };
        sgemm(
            1.0,
            Lhs::Mat(MatRef::row_major(&av, m, k)),
            Rhs::Mat(MatRef::row_major(&bv, k, n)),
            0.0,
            &mut c,
            n,
            Some(&epi),
        );
        assert!(seen.into_inner().unwrap().iter().all(|&x| x == 1));
        let mut want = vec![0.0; m * n];
        sgemm_reference(
            1.0,
            Lhs::Mat(MatRef::row_major(&av, m, k)),
            Rhs::Mat(MatRef::row_major(&bv, k, n)),
            0.0,
            &mut want,
            n,
            Some(&|_, _, v: &mut [f32]| v.iter_mut().for_each(|x| *x = x.max(0.0))),
        );
        for (g, w) in c.iter().zip(&want) {
            assert!(!g.is_nan() && (g - w).abs() < 1e-5);
        }
    }
}
