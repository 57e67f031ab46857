//! AVX-512F microkernel: a 6 x 64 tile of C in 24 zmm accumulators. Each k step
//! loads four zmm of the packed B row (64 floats, one cache line each) and
//! broadcasts six A values, for 24 FMAs. Edge tiles run a narrower instance
//! (fewer rows, fewer B vectors) and store the last vector with a lane mask, so
//! no temporary tile is needed.

use core::arch::x86_64::*;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 64;

/// How far ahead (in k steps) B is prefetched into L1.
const PREFETCH_B: usize = 16;
/// How far ahead (in k steps) A is prefetched into L1 (A streams from L3 on a
/// task's first pass, too slowly for the hardware prefetcher alone).
const PREFETCH_A: usize = 48;

/// `C[..mr, ..nr] = alpha * A·B + beta * C` for one tile (`beta == 0`: C not read).
///
/// # Safety
/// The CPU must support AVX-512F. `a` must point to `kc * MR` readable floats
/// (as rows: each of the first `mr` to `kc` readable floats),
/// `b` to `kc` rows of `nr` readable floats (`NR` when `nr` is `NR`: a
/// partial tile reads only its live columns), `ldb` apart, and `c` to an
/// `mr x nr` tile with row stride `ldc`, with `1 <= mr <= MR`, `1 <= nr <= NR`.
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
    let nv = nr.div_ceil(16);
    let partial = nr != 16 * nv;
    macro_rules! dispatch {
        ($($r:literal),*) => {
            match (mr, nv, partial) {
                $(
                    ($r, 1, false) => tile::<$r, 1, false>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 1, true) => tile::<$r, 1, true>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 2, false) => tile::<$r, 2, false>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 2, true) => tile::<$r, 2, true>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 3, false) => tile::<$r, 3, false>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 3, true) => tile::<$r, 3, true>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 4, false) => tile::<$r, 4, false>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                    ($r, 4, true) => tile::<$r, 4, true>(kc, a, b, ldb, c, ldc, alpha, beta, nr, fin),
                )*
                _ => unreachable!("avx512 tile {mr}x{nr}"),
            }
        };
    }
    // SAFETY: forwarded from this function's contract (AVX-512F present, pointers
    // valid for the tile); `nv = ceil(nr / 16)` so the instance reads only the
    // B vectors that hold live columns, and a partial one masks the last.
    unsafe { dispatch!(1, 2, 3, 4, 5, 6) }
}

/// One tile of `R` rows and `V` B vectors. A `PARTIAL` tile loads only B's
/// live columns (the last vector masked): B may be a matrix read in place,
/// whose last row ends at the tile's last column.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const V: usize, const PARTIAL: bool>(
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
    let tail = nr - 16 * (V - 1);
    let mask: __mmask16 = if tail == 16 {
        0xffff
    } else {
        (1u16 << tail) - 1
    };
    // SAFETY (whole body): `a` has kc*MR floats, or R rows of kc floats, or
    // segments of R rows of seg_len floats whose pointers `ptrs` holds,
    // and `b` kc rows of NR floats, ldb apart (contract); step p of a
    // segment reads row r's value at rows[r] + p * a_step (r < R) and
    // b[..16*V], then advances b by ldb, ending at most one past B's
    // panel. C's tile (mr x nr, ldc apart) is the caller's: whole vectors
    // are stored unless PARTIAL (then the last one masked to `nr`), and
    // streamed only when nr == 16 * V on aligned lines. Prefetches never
    // fault, even past the end of the buffer.
    unsafe {
        // The C tile is read (or written) at the end; start fetching it now,
        // unless it is only written, by streaming stores, which need no line
        // in cache. So is a residual tile: it is often big and out of cache
        // (ResNet's block inputs at batch 8), and loading it only at the
        // store left most of the tile's time waiting on memory.
        // Streaming stores need whole, 64-byte-aligned lines. (Streaming
        // the whole lines of unaligned rows, with masked stores for the
        // partial ones at their ends, measured slower than plain stores:
        // 3.3 against 2.3 ms on MobileNetV2's 38 MiB output.)
        let stream = fin.is_some_and(|f| f.stream)
            && nr == 16 * V
            && (c as usize).is_multiple_of(64)
            && ldc.is_multiple_of(16);
        if !(stream && beta == 0.0) {
            for r in 0..R {
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(r * ldc + 16 * v) as *const i8);
                }
            }
        }
        // (Fetching the next tile's residual as well, all at once or a line
        // per step, measured no better.)
        if let Some(f) = fin.filter(|f| !f.res.is_null()) {
            for r in 0..R {
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(f.res.wrapping_add(r * f.ldr + 16 * v) as *const i8);
                }
            }
        }
        // Each arm starts its own sums: zeroed once at the top, the
        // accumulators of the segment loop (which live on the stack between
        // segments) made every tile begin with a 1.5 KiB memset, even the
        // plain path that keeps them in registers: 10-20% of a k = 16..32
        // tile (MobileNetV2's pointwise convs).
        let acc = match a {
            super::TileA::Segments { ptrs, seg_len } => {
                let mut acc = [[_mm512_setzero_ps(); V]; R];
                let mut b = b;
                for seg in 0..kc / seg_len {
                    let rows = std::array::from_fn(|r| *ptrs.add(seg * super::MAX_MR + r));
                    (acc, b) =
                        steps::<R, V, PARTIAL>(acc, rows, 1, PREFETCH_A, seg_len, b, ldb, mask);
                }
                acc
            }
            _ => {
                let (rows, a_step, a_ahead) = super::tile_rows::<R>(a, MR, PREFETCH_A);
                let zero = [[_mm512_setzero_ps(); V]; R];
                steps::<R, V, PARTIAL>(zero, rows, a_step, a_ahead, kc, b, ldb, mask).0
            }
        };
        let acc = epilogue::<R, V, PARTIAL>(acc, c, ldc, alpha, beta, mask, fin);
        for r in 0..R {
            let crow = c.add(r * ldc);
            for v in 0..V {
                let p = crow.add(16 * v);
                if stream {
                    _mm512_stream_ps(p, acc[r][v]);
                } else if PARTIAL && v + 1 == V {
                    _mm512_mask_storeu_ps(p, mask, acc[r][v]);
                } else {
                    _mm512_storeu_ps(p, acc[r][v]);
                }
            }
        }
    }
}

/// `alpha * acc + beta * C`, then `fin` (bias, residual, clamp), on a
/// tile's sums in registers. Each step tests its condition once for the
/// whole tile, then runs over all R x V vectors: tested per vector, the
/// branches cost a k = 16..32 tile (MobileNetV2's pointwise convs) about a
/// tenth of its time. The additions keep the scalar finish's order.
///
/// # Safety
/// AVX-512F; C's live lanes (all of the first V - 1 vectors of each row,
/// `mask` of the last when `PARTIAL`) readable when `beta != 0`, and `fin`'s
/// pointers covering the same lanes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn epilogue<const R: usize, const V: usize, const PARTIAL: bool>(
    mut acc: [[__m512; V]; R],
    c: *const f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mask: __mmask16,
    fin: Option<&super::TileFinish>,
) -> [[__m512; V]; R] {
    // Lanes past nr are never read (masked loads).
    let lanes = |v: usize| if PARTIAL && v + 1 == V { mask } else { 0xffff };
    // SAFETY: every load is of live lanes the contract makes readable.
    unsafe {
        if alpha != 1.0 {
            let va = _mm512_set1_ps(alpha);
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = _mm512_mul_ps(*x, va);
                }
            }
        }
        if beta != 0.0 {
            let vb = _mm512_set1_ps(beta);
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(vb, load(lanes(v), c.add(r * ldc + 16 * v)), *x);
                }
            }
        }
        let Some(f) = fin else { return acc };
        if !f.row_bias.is_null() {
            for (r, row) in acc.iter_mut().enumerate() {
                let rb = _mm512_set1_ps(*f.row_bias.add(r));
                for x in row.iter_mut() {
                    *x = _mm512_add_ps(*x, rb);
                }
            }
        }
        if !f.col_bias.is_null() {
            for v in 0..V {
                let cb = load(lanes(v), f.col_bias.add(16 * v));
                for row in acc.iter_mut() {
                    row[v] = _mm512_add_ps(row[v], cb);
                }
            }
        }
        if !f.res.is_null() {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_add_ps(*x, load(lanes(v), f.res.add(r * f.ldr + 16 * v)));
                }
            }
        }
        if let Some((lo, hi)) = f.clamp {
            // vmaxps(a, b) is `a > b ? a : b`, so max(lo, y) is `y < lo ? lo : y`:
            // NaN and -0.0 pass as in the Clip op; likewise min(hi, y).
            let vlo = _mm512_set1_ps(lo);
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = _mm512_max_ps(vlo, *x);
                }
            }
            if hi != f32::INFINITY {
                let vhi = _mm512_set1_ps(hi);
                for row in acc.iter_mut() {
                    for x in row.iter_mut() {
                        *x = _mm512_min_ps(vhi, *x);
                    }
                }
            }
        }
    }
    acc
}

/// `len` k steps of a tile: row r's value at step p is `rows[r][p *
/// a_step]`, B's row p at `b + p * ldb`; returns the sums and B's next row.
/// (Its own function: with the segment loop around it in `tile`, LLVM
/// stored every FMA's result back to the stack, a third of the speed.)
///
/// # Safety
/// AVX-512F; every row holds `len` values at its step, B `len` rows of
/// the tile's live columns (`mask` on the last vector when `PARTIAL`).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn steps<const R: usize, const V: usize, const PARTIAL: bool>(
    mut acc: [[__m512; V]; R],
    rows: [*const f32; R],
    a_step: usize,
    a_ahead: usize,
    len: usize,
    mut b: *const f32,
    ldb: usize,
    mask: __mmask16,
) -> ([[__m512; V]; R], *const f32) {
    // SAFETY: the caller's contract; prefetches never fault.
    unsafe {
        let mut off = 0;
        for _ in 0..len {
            _mm_prefetch::<_MM_HINT_T0>(rows[0].wrapping_add(off + a_ahead) as *const i8);
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_B * ldb + 16 * v) as *const i8);
                bv[v] = if PARTIAL && v + 1 == V {
                    _mm512_maskz_loadu_ps(mask, b.add(16 * v))
                } else {
                    _mm512_loadu_ps(b.add(16 * v))
                };
            }
            for r in 0..R {
                let av = _mm512_set1_ps(*rows[r].add(off));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                }
            }
            off += a_step;
            b = b.wrapping_add(ldb);
        }
    }
    (acc, b)
}

/// The live `lanes` at `p` (a plain load when all are live: on some cores a
/// masked access costs more even with a full mask), zeros elsewhere.
///
/// # Safety
/// The CPU must support AVX-512F; the live lanes at `p` must be readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load(lanes: __mmask16, p: *const f32) -> __m512 {
    // SAFETY: the caller's contract; a masked load touches only live lanes.
    unsafe {
        if lanes == 0xffff {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(lanes, p)
        }
    }
}

/// `y[j] += sum_p x[p] * rows[p][j]` over contiguous rows: the m == 1 (GEMV) core.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let va = _mm512_set1_ps(alpha);
    let mut j = 0;
    // SAFETY: every access is below `n`, the shorter length; the tail uses a mask.
    unsafe {
        while j + 64 <= n {
            for v in 0..4 {
                let p = y.as_mut_ptr().add(j + 16 * v);
                let xv = _mm512_loadu_ps(x.as_ptr().add(j + 16 * v));
                _mm512_storeu_ps(p, _mm512_fmadd_ps(va, xv, _mm512_loadu_ps(p)));
            }
            j += 64;
        }
        while j < n {
            let lanes = (n - j).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            let p = y.as_mut_ptr().add(j);
            let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j));
            let yv = _mm512_maskz_loadu_ps(mask, p);
            _mm512_mask_storeu_ps(p, mask, _mm512_fmadd_ps(va, xv, yv));
            j += lanes;
        }
    }
}

/// One packed B panel times `x`; see `portable::panel_gemv_body`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn panel_gemv(x: &[f32], panel: &[f32], out: &mut [f32]) {
    super::portable::panel_gemv_body::<super::portable::Fused, NR>(x, panel, out)
}

/// `sum_p x[p] * y[p]` with eight independent accumulators.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut j = 0;
    // SAFETY: every access is below `n`; the tail uses a mask.
    unsafe {
        while j + 128 <= n {
            for (v, s) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.as_ptr().add(j + 16 * v));
                let yv = _mm512_loadu_ps(y.as_ptr().add(j + 16 * v));
                *s = _mm512_fmadd_ps(xv, yv, *s);
            }
            j += 128;
        }
        while j < n {
            let lanes = (n - j).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(j));
            let yv = _mm512_maskz_loadu_ps(mask, y.as_ptr().add(j));
            acc[0] = _mm512_fmadd_ps(xv, yv, acc[0]);
            j += lanes;
        }
    }
    let s = [
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
        _mm512_add_ps(acc[4], acc[5]),
        _mm512_add_ps(acc[6], acc[7]),
    ];
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(s[0], s[1]),
        _mm512_add_ps(s[2], s[3]),
    ))
}
