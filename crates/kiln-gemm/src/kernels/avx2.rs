//! AVX2 + FMA microkernel: a 6 x 16 tile of C in 12 ymm accumulators (two B
//! vectors and one broadcast make 15 of the 16 registers). Partial-width edge
//! tiles are computed in registers, spilled to a small stack tile and merged
//! into C element by element.

use core::arch::x86_64::*;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;

/// `C[..mr, ..nr] = alpha * A·B + beta * C` for one tile (`beta == 0`: C not read).
///
/// # Safety
/// The CPU must support AVX2 and FMA. `a` must point to `kc * MR` readable
/// floats (as rows: each of the first `mr` to `kc` readable floats), `b` to `kc` rows of `NR` readable floats, `ldb` apart, and `c` to an `mr x nr` tile with row stride `ldc`,
/// with `1 <= mr <= MR`, `1 <= nr <= NR`.
pub(crate) unsafe fn micro(
    kc: usize,
    a: super::TileA,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
    fin: Option<&super::TileFinish>,
) {
    debug_assert!((1..=MR).contains(&mr) && (1..=NR).contains(&nr));
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match mr {
            1 => tile::<1>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            2 => tile::<2>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            3 => tile::<3>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            4 => tile::<4>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            5 => tile::<5>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            6 => tile::<6>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
            _ => unreachable!("avx2 tile rows {mr}"),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(
    kc: usize,
    a: super::TileA,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    nr: usize,
    fin: Option<&super::TileFinish>,
) {
    // SAFETY (whole body): `a` has kc*MR floats, or R rows of kc floats, or
    // segments of R rows of seg_len floats whose pointers `ptrs` holds,
    // and `b` kc rows of NR floats, ldb apart; step p of a segment reads
    // row r's value at rows[r] + p * a_step (r < R) and b[..16]. C (and `fin`'s bias/residual) accesses stay
    // inside the mr x nr tile: full vectors only when nr == 16, element-wise
    // otherwise.
    unsafe {
        // Each arm starts its own sums (see the AVX-512 tile: zeroed at the
        // top, the segment loop's stack-held sums cost every tile a memset).
        let acc = match a {
            super::TileA::Segments { ptrs, seg_len } => {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                let mut b = b;
                for seg in 0..kc / seg_len {
                    let rows = std::array::from_fn(|r| *ptrs.add(seg * super::MAX_MR + r));
                    (acc, b) = steps::<R>(acc, rows, 1, seg_len, b, ldb);
                }
                acc
            }
            _ => {
                let (rows, a_step, _) = super::tile_rows::<R>(a, MR, 0);
                let zero = [[_mm256_setzero_ps(); 2]; R];
                steps::<R>(zero, rows, a_step, kc, b, ldb).0
            }
        };
        let va = _mm256_set1_ps(alpha);
        if nr == NR {
            let vb = _mm256_set1_ps(beta);
            for r in 0..R {
                let p = c.add(r * ldc);
                for v in 0..2 {
                    let x = _mm256_mul_ps(acc[r][v], va);
                    let mut y = if beta == 0.0 {
                        x
                    } else {
                        _mm256_fmadd_ps(vb, _mm256_loadu_ps(p.add(8 * v)), x)
                    };
                    if let Some(f) = fin {
                        if !f.row_bias.is_null() {
                            y = _mm256_add_ps(y, _mm256_broadcast_ss(&*f.row_bias.add(r)));
                        }
                        if !f.col_bias.is_null() {
                            y = _mm256_add_ps(y, _mm256_loadu_ps(f.col_bias.add(8 * v)));
                        }
                        if !f.res.is_null() {
                            y = _mm256_add_ps(y, _mm256_loadu_ps(f.res.add(r * f.ldr + 8 * v)));
                        }
                        if let Some((lo, hi)) = f.clamp {
                            // vmaxps(a, b) is `a > b ? a : b`: max(lo, y) is
                            // `y < lo ? lo : y`, so NaN and -0.0 pass as in the
                            // Clip op; likewise min(hi, y).
                            y = _mm256_max_ps(_mm256_set1_ps(lo), y);
                            y = _mm256_min_ps(_mm256_set1_ps(hi), y);
                        }
                    }
                    _mm256_storeu_ps(p.add(8 * v), y);
                }
            }
        } else {
            let mut tmp = [0f32; NR];
            for r in 0..R {
                _mm256_storeu_ps(tmp.as_mut_ptr(), _mm256_mul_ps(acc[r][0], va));
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), _mm256_mul_ps(acc[r][1], va));
                let p = c.add(r * ldc);
                for (j, &x) in tmp.iter().enumerate().take(nr) {
                    let y = if beta == 0.0 {
                        x
                    } else {
                        beta.mul_add(*p.add(j), x)
                    };
                    *p.add(j) = match fin {
                        Some(f) => f.scalar(r, j, y),
                        None => y,
                    };
                }
            }
        }
    }
}

/// `len` k steps of a tile: row r's value at step p is `rows[r][p *
/// a_step]`, B's row p at `b + p * ldb`; returns the sums and B's next row.
/// (Its own function: with the segment loop around it in `tile`, LLVM
/// kept the sums in memory.)
///
/// # Safety
/// AVX2 and FMA; every row holds `len` values at its step, B `len` rows of
/// 16 floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn steps<const R: usize>(
    mut acc: [[__m256; 2]; R],
    rows: [*const f32; R],
    a_step: usize,
    len: usize,
    mut b: *const f32,
    ldb: usize,
) -> ([[__m256; 2]; R], *const f32) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut off = 0;
        for _ in 0..len {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*rows[r].add(off));
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
            off += a_step;
            b = b.wrapping_add(ldb);
        }
    }
    (acc, b)
}

/// `y += alpha * x`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    super::portable::axpy_body::<super::portable::Fused>(alpha, x, y)
}

/// One packed B panel times `x`; see `portable::panel_gemv_body`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn panel_gemv(x: &[f32], panel: &[f32], out: &mut [f32]) {
    super::portable::panel_gemv_body::<super::portable::Fused, NR>(x, panel, out)
}

/// `sum x[p] * y[p]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
    super::portable::dot_body::<super::portable::Fused>(x, y)
}
