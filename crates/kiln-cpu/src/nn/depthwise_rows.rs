//! 3x3 depthwise convs (stride 1 or 2) straight from the input rows, on
//! AVX-512.
//!
//! The general per-plane kernel copies each input plane into zero-padded
//! phase planes first (for stride 2: even and odd rows and columns), then
//! runs the taps over them, then copies the result rows out and applies the
//! epilogue: four passes over a plane. On MobileNetV2's large planes
//! (56x56 and 112x112, inputs of 1.5-5 MB that come from L3) those passes
//! cost 2-3x ONNX Runtime's time. Here each output vector of 16 columns is
//! computed from the input rows in place: for each of the three kernel rows,
//!
//! - stride 1: three unaligned loads (columns `ox - pw + kx`);
//! - stride 2: the 34 input columns the 16 outputs span, split into even and
//!   odd columns with two-source permutes;
//!
//! with the padding done by masked loads (masked-off lanes read nothing and
//! are zero), bias and Relu/Clip in registers, one store. A residual or other
//! activation runs after, per output row.
//!
//! The reference is `conv_reference` (im2col + GEMM).

use super::conv::Epi;
use super::depthwise::Plane2d;

/// Output columns per vector.
const LANES: usize = 16;

/// Output vectors per row whose load masks are worked out once per plane
/// (rows up to 1024 wide).
const MAX_TABLE: usize = 64;

/// Output rows ahead whose input rows are prefetched: far enough to cover a
/// memory latency. MobileNetV2's 112 -> 56 stride-2 layer (a 4.8 MB input
/// from L3) on one thread: 2 rows ahead 0.24 ms, 5 rows 0.19, 8 rows 0.17.
const AHEAD: usize = 8;

/// One kernel row's three tap vectors.
#[cfg(target_arch = "x86_64")]
type RowTaps = (
    std::arch::x86_64::__m512,
    std::arch::x86_64::__m512,
    std::arch::x86_64::__m512,
);

/// Whether this kernel takes a depthwise plane of geometry `g`: a 3x3
/// kernel, the same stride (1 or 2) on both axes, no dilation, output rows at
/// least 8 wide (narrower ones are mostly masked lanes), and AVX-512.
pub(super) fn applies(g: &Plane2d) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.sh == g.sw
        && (g.sh == 1 || g.sh == 2)
        && g.dh == 1
        && g.dw == 1
        && g.ow >= 8
        && g.oh > 0
        && std::is_x86_feature_detected!("avx512f")
}

/// One output plane (`out`, `oh * ow`) of channel `ch` of image `ni` from its
/// input plane `src` (`ih * iw`) and 9 weights, epilogue included. Callers
/// check [`applies`] first.
#[allow(clippy::too_many_arguments)]
pub(super) fn plane(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    assert!(
        applies(g) && src.len() >= g.ih * g.iw && filt.len() == 9 && out.len() >= g.oh * g.ow,
        "depthwise_rows does not take {g:?}"
    );
    // SAFETY: `applies` (asserted) checked AVX-512F; the buffer sizes were
    // asserted above.
    unsafe {
        if g.sh == 1 {
            plane_avx512::<1>(g, src, filt, out, epi, ni, ch)
        } else {
            plane_avx512::<2>(g, src, filt, out, epi, ni, ch)
        }
    }
}

/// Lanes `j` of a 16-float load at input column `start + j` that lie inside
/// a row of `iw` columns.
#[inline(always)]
fn col_mask(start: isize, iw: usize) -> u16 {
    let lo = (-start).clamp(0, LANES as isize) as u32;
    let hi = (iw as isize - start).clamp(0, LANES as isize) as u32;
    if hi <= lo {
        return 0;
    }
    let upto = |n: u32| if n >= 16 { u16::MAX } else { (1u16 << n) - 1 };
    upto(hi) & !upto(lo)
}

/// Whether the loads for the output vector at column `ox0` lie inside a row
/// of `iw` columns (then plain loads), else their column masks.
#[inline(always)]
fn vector_masks<const S: usize>(ox0: usize, ow: usize, iw: usize, pw: isize) -> (bool, [u16; 4]) {
    // Input columns the loads for one output vector span from its first
    // column `ox0 * S - pw`.
    let span = if S == 1 { LANES + 2 } else { 2 * LANES + 2 };
    let start = (ox0 * S) as isize - pw;
    let inside = LANES.min(ow - ox0) == LANES && start >= 0 && start as usize + span <= iw;
    if inside {
        return (true, [0; 4]);
    }
    (
        false,
        [
            col_mask(start, iw),
            col_mask(start + if S == 1 { 1 } else { 16 }, iw),
            col_mask(start + 2, iw),
            col_mask(start + 18, iw),
        ],
    )
}

/// A plane's constants in registers: the 9 weights, bias, Relu/Clip bounds,
/// and the even/odd permutes of stride 2.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct PlaneConsts {
    w: [std::arch::x86_64::__m512; 9],
    bias: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
    even: std::arch::x86_64::__m512i,
    odd: std::arch::x86_64::__m512i,
}

/// # Safety
/// The CPU must have AVX-512F; `src` holds `ih * iw` floats, `out` `oh * ow`,
/// `filt` 9.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx512<const S: usize>(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    use std::arch::x86_64::*;
    // Bias and Relu/Clip in registers; a residual or other activation after.
    let ((lo, hi), rest) = epi.in_registers();
    let k = PlaneConsts {
        w: std::array::from_fn(|i| _mm512_set1_ps(filt[i])),
        bias: _mm512_set1_ps(epi.bias.map_or(0.0, |b| b[ch])),
        lo: _mm512_set1_ps(lo),
        hi: _mm512_set1_ps(hi),
        // Lane j of the even (odd) split of two vectors a, b: element 2j
        // (2j+1) of their concatenation.
        even: _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0),
        odd: _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1),
    };
    let (iw, pw) = (g.iw, g.pw as isize);
    let base = src.as_ptr();
    // Padding rows read a row of zeros (no branch per kernel row). The
    // pointer outlives the borrow: only this function touches the
    // thread-local, it does not recurse, and it grows the row only here.
    let zero_row = ZEROS.with(|z| {
        let mut z = z.borrow_mut();
        if z.len() < iw {
            z.resize(iw, 0.0);
        }
        z.as_ptr()
    });
    // Per output vector (the same on every row), worked out once per plane;
    // rows wider than the table work the rest out per vector.
    let nvec = g.ow.div_ceil(LANES);
    let mut table = [(false, [0u16; 4]); MAX_TABLE];
    for (v, e) in table.iter_mut().enumerate().take(nvec) {
        *e = vector_masks::<S>(v * LANES, g.ow, iw, pw);
    }
    rows_pass::<S>(&k, g, base, zero_row, &table, out.as_mut_ptr());
    if let Some(rest) = &rest {
        rest.apply(ni, ch, 0, &mut out[..g.oh * g.ow]);
    }
}

/// Every output row of one plane (into `out`, `oh * ow`) from the plane at
/// `base`, bias and Relu/Clip in registers. Its own function with no calls
/// in its loops, so the plane's constants stay in registers (a call there,
/// into a closure or the epilogue, made the compiler keep them on the
/// stack: two loads per multiply-add; a call per row cost more than a 14-wide
/// row's work).
///
/// # Safety
/// The CPU must have AVX-512F; `base` holds `ih * iw` floats, `zero_row`
/// `iw` zeros, `out` `oh * ow` writable floats.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn rows_pass<const S: usize>(
    k: &PlaneConsts,
    g: &Plane2d,
    base: *const f32,
    zero_row: *const f32,
    table: &[(bool, [u16; 4]); MAX_TABLE],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let (iw, pw) = (g.iw, g.pw as isize);
    // The input row kernel row `ky` of output row `oy` reads (a zero row
    // in the padding).
    let in_row = |oy: usize, ky: usize| {
        let iy = (oy * S + ky) as isize - g.ph as isize;
        if iy >= 0 && (iy as usize) < g.ih {
            base.wrapping_add(iy as usize * iw)
        } else {
            zero_row
        }
    };
    // Stride 1 takes output rows in pairs: rows oy and oy + 1 share two of
    // their four input rows, so each input vector is loaded once for both
    // (12 loads per two output vectors instead of 18).
    let mut oy = 0;
    // SAFETY (whole loop): the rows and the output rows passed on lie
    // inside the caller's buffers (this function's contract).
    unsafe {
        while oy < g.oh {
            let two = S == 1 && oy + 1 < g.oh;
            // The input rows AHEAD output rows ahead, into L1 (planes come
            // from L3 or memory; each output row needs S new input rows).
            // Past the plane's last row that is the next plane's first rows:
            // the next channel, which the caller usually runs next.
            // (Prefetches never fault, so the address may lie past the plane.)
            for ahead in AHEAD..AHEAD + if two { 2 } else { 1 } {
                // Its output row too: a store to a line not in cache waits
                // for the line to be read first (the output buffer is often
                // cold: last written a whole run ago).
                let o = out.wrapping_add((oy + ahead) * g.ow);
                for c in (0..g.ow).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(o.wrapping_add(c) as *const i8);
                }
                for kr in 0..S {
                    let iy = ((oy + ahead) * S + 2 - kr) as isize - g.ph as isize;
                    if iy >= 0 {
                        let r = base.wrapping_add(iy as usize * iw);
                        for c in (0..iw).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(c) as *const i8);
                        }
                    }
                }
            }
            let rows = [
                in_row(oy, 0),
                in_row(oy, 1),
                in_row(oy, 2),
                // Read only for a pair: output row oy + 1's last input row.
                if two { in_row(oy + 1, 2) } else { zero_row },
            ];
            let orow = out.add(oy * g.ow);
            if two {
                row_pass::<S, true>(k, rows, g.ow, iw, pw, table, orow);
                oy += 2;
            } else {
                row_pass::<S, false>(k, rows, g.ow, iw, pw, table, orow);
                oy += 1;
            }
        }
    }
}

/// One output row at `orow` from input rows `rows[0..3]` (and with `TWO`,
/// the next output row too, from `rows[1..4]`), bias and Relu/Clip in
/// registers.
///
/// # Safety
/// The CPU must have AVX-512F; each row holds `iw` readable floats and
/// `orow` `ow` writable ones (`2 * ow` with `TWO`).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn row_pass<const S: usize, const TWO: bool>(
    k: &PlaneConsts,
    rows: [*const f32; 4],
    ow: usize,
    iw: usize,
    pw: isize,
    table: &[(bool, [u16; 4]); MAX_TABLE],
    orow: *mut f32,
) {
    use std::arch::x86_64::*;
    // Copied out of `k`, so they are plainly values the stores cannot touch.
    let (w, bias, lo, hi, even, odd) = (k.w, k.bias, k.lo, k.hi, k.even, k.odd);
    let [r0, r1, r2, r3] = rows;
    let mut ox0 = 0;
    // SAFETY (whole loop): every load stays inside its row (plain loads
    // when `inside`, masked lanes otherwise) and every store inside the
    // output row(s): the caller's contract.
    unsafe {
        while ox0 < ow {
            let n = LANES.min(ow - ox0);
            let start = (ox0 * S) as isize - pw;
            let v = ox0 / LANES;
            let (inside, masks) = if v < MAX_TABLE {
                table[v]
            } else {
                vector_masks::<S>(ox0, ow, iw, pw)
            };
            let omask: __mmask16 = if n == LANES { !0 } else { (1u16 << n) - 1 };
            let a = taps_at::<S>(r0, start, inside, masks, even, odd);
            let b = taps_at::<S>(r1, start, inside, masks, even, odd);
            let c = taps_at::<S>(r2, start, inside, masks, even, odd);
            let y = output_vector([a, b, c], &w, bias, lo, hi);
            _mm512_mask_storeu_ps(orow.add(ox0), omask, y);
            if TWO {
                let d = taps_at::<S>(r3, start, inside, masks, even, odd);
                let y = output_vector([b, c, d], &w, bias, lo, hi);
                _mm512_mask_storeu_ps(orow.add(ow + ox0), omask, y);
            }
            ox0 += n;
        }
    }
}

/// `bias + sum over kernel rows ky and taps kx of rows[ky].kx * w[3 ky + kx]`,
/// clamped to `[lo, hi]`: one output vector. One partial sum per kernel row,
/// three short dependency chains instead of one of nine multiply-adds.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn output_vector(
    rows: [RowTaps; 3],
    w: &[std::arch::x86_64::__m512; 9],
    bias: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let [(a0, a1, a2), (b0, b1, b2), (c0, c1, c2)] = rows;
    let top = _mm512_fmadd_ps(a2, w[2], _mm512_fmadd_ps(a1, w[1], _mm512_mul_ps(a0, w[0])));
    let mid = _mm512_fmadd_ps(b2, w[5], _mm512_fmadd_ps(b1, w[4], _mm512_mul_ps(b0, w[3])));
    let low = _mm512_fmadd_ps(
        c2,
        w[8],
        _mm512_fmadd_ps(c1, w[7], _mm512_fmadd_ps(c0, w[6], bias)),
    );
    let acc = _mm512_add_ps(_mm512_add_ps(top, mid), low);
    // x86 min/max return the second operand on NaN: acc goes second.
    _mm512_min_ps(hi, _mm512_max_ps(lo, acc))
}

thread_local! {
    /// A row of zeros standing in for the padding rows.
    static ZEROS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`taps_plain`] when the loads lie `inside` the row, else [`taps_masked`].
///
/// # Safety
/// As for the one it calls.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn taps_at<const S: usize>(
    row: *const f32,
    start: isize,
    inside: bool,
    masks: [u16; 4],
    even: std::arch::x86_64::__m512i,
    odd: std::arch::x86_64::__m512i,
) -> RowTaps {
    // SAFETY: the caller's contract.
    unsafe {
        if inside {
            taps_plain::<S>(row.offset(start), even, odd)
        } else {
            taps_masked::<S>(row, start, masks, even, odd)
        }
    }
}

/// The three taps' input vectors of one kernel row for 16 outputs whose
/// input columns start at `p` and lie inside the row.
///
/// # Safety
/// The CPU must have AVX-512F; `p` must have 18 (stride 1) or 34 (stride 2)
/// readable floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn taps_plain<const S: usize>(
    p: *const f32,
    even: std::arch::x86_64::__m512i,
    odd: std::arch::x86_64::__m512i,
) -> RowTaps {
    use std::arch::x86_64::*;
    if S == 1 {
        (
            _mm512_loadu_ps(p),
            _mm512_loadu_ps(p.add(1)),
            _mm512_loadu_ps(p.add(2)),
        )
    } else {
        let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let (c, d) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
        (
            _mm512_permutex2var_ps(a, even, b),
            _mm512_permutex2var_ps(a, odd, b),
            _mm512_permutex2var_ps(c, even, d),
        )
    }
}

/// [`taps_plain`] at the row's edges: each load (from `start`, then `start
/// + 1` or `+ 16`, `+ 2`, `+ 18`) reads only the lanes its mask (from
/// [`col_mask`]) keeps inside the row; the others are zero.
///
/// # Safety
/// The CPU must have AVX-512F; the masked lanes of every load must be
/// readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn taps_masked<const S: usize>(
    row: *const f32,
    start: isize,
    masks: [u16; 4],
    even: std::arch::x86_64::__m512i,
    odd: std::arch::x86_64::__m512i,
) -> RowTaps {
    use std::arch::x86_64::*;
    let load = |m: u16, at: isize| _mm512_maskz_loadu_ps(m, row.wrapping_offset(at));
    if S == 1 {
        (
            load(masks[0], start),
            load(masks[1], start + 1),
            load(masks[2], start + 2),
        )
    } else {
        let (a, b) = (load(masks[0], start), load(masks[1], start + 16));
        let (c, d) = (load(masks[2], start + 2), load(masks[3], start + 18));
        (
            _mm512_permutex2var_ps(a, even, b),
            _mm512_permutex2var_ps(a, odd, b),
            _mm512_permutex2var_ps(c, even, d),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn col_mask_covers_the_row() {
        assert_eq!(col_mask(0, 100), u16::MAX);
        assert_eq!(col_mask(-1, 100), u16::MAX - 1);
        assert_eq!(col_mask(-2, 100), u16::MAX - 3);
        assert_eq!(col_mask(90, 100), (1 << 10) - 1);
        assert_eq!(col_mask(-1, 3), 0b1110);
        assert_eq!(col_mask(100, 100), 0);
        assert_eq!(col_mask(-20, 100), 0);
    }
}
