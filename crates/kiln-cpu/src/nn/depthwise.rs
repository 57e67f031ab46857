//! Direct f32 kernel for depthwise convs (and channel multipliers): every output
//! channel reads exactly one input channel, so there is no reduction over
//! channels to hand to a GEMM. 1-D convs run as 2-D ones of height 1.
//!
//! Each output plane is computed row by row: for each kernel row, the taps of
//! that row are accumulated into the output row in one pass over the positions
//! where all of them are inside the input (3 and 5 taps wide: fused loops),
//! single-tap passes at the edges. A strided conv first splits each input row
//! into `stride` phases (`phase p` holds columns `p, p + s, p + 2s, ...`), so
//! every tap reads a contiguous run and the loops vectorize. The loops are
//! compiled for AVX-512 / AVX2 too and chosen once per call by CPU feature.
//!
//! The reference is `conv_reference` (im2col + GEMM) in `conv.rs`.

use super::conv::{valid_range, ConvGeometry, Epi};
use rayon::prelude::*;

/// One output plane's 2-D geometry (height 1 for 1-D convs).
#[derive(Clone, Copy, Debug)]
struct Plane2d {
    ih: usize,
    iw: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

/// The instruction set the plane kernel was compiled for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Depthwise conv of every plane of X into `y` (`[N, M, out...]`, fully
/// overwritten), with the epilogue applied row by row. Needs `geo.cg == 1` and
/// 1 or 2 spatial axes; parallel over output planes.
pub(crate) fn depthwise_conv(
    geo: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    depthwise_conv_with(geo, x, w, epi, y, detect_isa())
}

fn depthwise_conv_with(
    geo: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
    isa: Isa,
) {
    assert!(
        geo.cg == 1 && (1..=2).contains(&geo.in_sp.len()),
        "depthwise_conv needs one input channel per group and 1-2 spatial axes, got {geo:?}"
    );
    let win = &geo.win;
    let g = if geo.in_sp.len() == 2 {
        Plane2d {
            ih: geo.in_sp[0],
            iw: geo.in_sp[1],
            kh: win.kernel[0],
            kw: win.kernel[1],
            sh: win.strides[0],
            sw: win.strides[1],
            dh: win.dilations[0],
            dw: win.dilations[1],
            ph: win.pad_begin[0],
            pw: win.pad_begin[1],
            oh: win.out[0],
            ow: win.out[1],
        }
    } else {
        Plane2d {
            ih: 1,
            iw: geo.in_sp[0],
            kh: 1,
            kw: win.kernel[0],
            sh: 1,
            sw: win.strides[0],
            dh: 1,
            dw: win.dilations[0],
            ph: 0,
            pw: win.pad_begin[0],
            oh: 1,
            ow: win.out[0],
        }
    };
    let (c, m, mg, kn, in_n, out_n) = (geo.c, geo.m, geo.mg, geo.kn, geo.in_n, geo.out_n);
    if out_n == 0 {
        return;
    }
    // Several small planes per task: a 7x7 plane is ~100 ns of work, less
    // than scheduling a task costs.
    let per_task = (PLANE_TASK_ELEMS / out_n).clamp(1, 256);
    y.par_chunks_mut(out_n * per_task)
        .enumerate()
        .for_each(|(task, outs)| {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                for (k, out) in outs.chunks_exact_mut(out_n).enumerate() {
                    let p = task * per_task + k;
                    let (ni, mi) = (p / m, p % m);
                    let ci = mi / mg;
                    let src = &x[(ni * c + ci) * in_n..][..in_n];
                    let filt = &w[mi * kn..][..kn];
                    plane_dispatch(isa, &g, src, filt, &mut scratch, out, epi, ni, mi);
                }
            })
        });
}

/// Output elements per parallel task (whole planes).
const PLANE_TASK_ELEMS: usize = 4096;

thread_local! {
    /// Per-thread scratch for phase planes and accumulators, kept between
    /// calls so planes do not allocate.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[inline]
#[allow(clippy::too_many_arguments)]
fn plane_dispatch(
    isa: Isa,
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    phases: &mut Vec<f32>,
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    mi: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen after
        // `is_x86_feature_detected!("avx512f")` returned true.
        Isa::Avx512 => unsafe { plane_avx512(g, src, filt, phases, out, epi, ni, mi) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen after AVX2 and FMA were
        // detected on this CPU.
        Isa::Avx2 => unsafe { plane_avx2(g, src, filt, phases, out, epi, ni, mi) },
        Isa::Portable => plane(g, src, filt, phases, out, epi, ni, mi),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx512(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    phases: &mut Vec<f32>,
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    plane(g, src, filt, phases, out, epi, ni, ch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn plane_avx2(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    phases: &mut Vec<f32>,
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    plane(g, src, filt, phases, out, epi, ni, ch)
}

/// One horizontal tap: its weight's column, the output range `[lo, hi)` it
/// reaches inside the input, its phase and the offset into the phase row.
#[derive(Clone, Copy)]
struct HTap {
    lo: usize,
    hi: usize,
    phase: usize,
    base: isize,
}

/// One output plane: `out[oy, ox] = sum_{ky,kx} w[ky,kx] * src[iy, ix]`, then
/// the epilogue per row. `phases` is scratch space kept between planes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plane(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    phases: &mut Vec<f32>,
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    if flat_applies(g) {
        return if g.sh == 1 {
            plane_flat::<1>(g, src, filt, phases, out, epi, ni, ch)
        } else {
            plane_flat::<2>(g, src, filt, phases, out, epi, ni, ch)
        };
    }
    let sw = g.sw;
    // Phase-split rows: phase p of input row iy is `rows[(p * ih + iy) * pl..][..pl]`.
    let (rows, pl): (&[f32], usize) = if sw == 1 {
        (src, g.iw)
    } else {
        let pl = g.iw.div_ceil(sw);
        phases.clear();
        phases.resize(sw * g.ih * pl, 0.0);
        for iy in 0..g.ih {
            let srow = &src[iy * g.iw..(iy + 1) * g.iw];
            for p in 0..sw {
                let prow = &mut phases[(p * g.ih + iy) * pl..][..pl];
                for (d, &s) in prow.iter_mut().zip(srow.iter().skip(p).step_by(sw)) {
                    *d = s;
                }
            }
        }
        (&phases[..], pl)
    };
    let htaps: Vec<HTap> = (0..g.kw)
        .map(|kx| {
            let off = (kx * g.dw) as isize - g.pw as isize;
            let (lo, hi) = valid_range(g.ow, sw, off, g.iw);
            HTap {
                lo,
                hi,
                phase: off.rem_euclid(sw as isize) as usize,
                base: off.div_euclid(sw as isize),
            }
        })
        .collect();
    // The output columns every horizontal tap reaches.
    let lo_all = htaps.iter().map(|t| t.lo).max().unwrap_or(0);
    let hi_all = htaps.iter().map(|t| t.hi).min().unwrap_or(0);
    let fused = lo_all < hi_all && (g.kw == 3 || g.kw == 5);
    let mut srcs: Vec<&[f32]> = Vec::with_capacity(g.kw);
    for (oy, orow) in out.chunks_exact_mut(g.ow).enumerate().take(g.oh) {
        orow.fill(0.0);
        for ky in 0..g.kh {
            let iy = (oy * g.sh + ky * g.dh) as isize - g.ph as isize;
            if iy < 0 || iy >= g.ih as isize {
                continue;
            }
            let iy = iy as usize;
            let wrow = &filt[ky * g.kw..(ky + 1) * g.kw];
            srcs.clear();
            // Each tap's source, aligned so that `srcs[t][ox]` is its input for
            // output column ox (valid for ox in [lo, hi)).
            for t in &htaps {
                let prow = &rows[(t.phase * g.ih + iy) * pl..][..pl];
                srcs.push(prow);
            }
            let tap_src = |t: usize, a: usize, b: usize| -> &[f32] {
                let h = htaps[t];
                let s0 = (a as isize + h.base) as usize;
                &srcs[t][s0..s0 + (b - a)]
            };
            if fused {
                let (a, b) = (lo_all, hi_all);
                let dst = &mut orow[a..b];
                if g.kw == 3 {
                    taps3(
                        dst,
                        [tap_src(0, a, b), tap_src(1, a, b), tap_src(2, a, b)],
                        [wrow[0], wrow[1], wrow[2]],
                    );
                } else {
                    taps5(
                        dst,
                        [
                            tap_src(0, a, b),
                            tap_src(1, a, b),
                            tap_src(2, a, b),
                            tap_src(3, a, b),
                            tap_src(4, a, b),
                        ],
                        [wrow[0], wrow[1], wrow[2], wrow[3], wrow[4]],
                    );
                }
                // The edges the fused pass left out.
                for (t, h) in htaps.iter().enumerate() {
                    if h.lo < a {
                        tap1(&mut orow[h.lo..a], tap_src(t, h.lo, a), wrow[t]);
                    }
                    if b < h.hi {
                        tap1(&mut orow[b..h.hi], tap_src(t, b, h.hi), wrow[t]);
                    }
                }
            } else {
                for (t, h) in htaps.iter().enumerate() {
                    if h.lo < h.hi {
                        tap1(&mut orow[h.lo..h.hi], tap_src(t, h.lo, h.hi), wrow[t]);
                    }
                }
            }
        }
        epi.apply(ni, ch, oy * g.ow, orow);
    }
}

/// Whether [`plane_flat`] handles this geometry: 2-D, no dilation, the same
/// stride (1 or 2) on both axes.
fn flat_applies(g: &Plane2d) -> bool {
    g.dh == 1
        && g.dw == 1
        && g.sh == g.sw
        && (g.sh == 1 || g.sh == 2)
        && g.oh > 0
        && g.ow > 0
        && g.kh * g.kw <= MAX_FLAT_TAPS
}

/// Phase buffers up to this many floats are zeroed whole (see [`plane_flat`]).
const SMALL_PHASES: usize = 4096;

/// Largest kernel [`plane_flat`] takes (its tap table lives on the stack).
const MAX_FLAT_TAPS: usize = 64;

/// One output plane as a single long 1-D convolution, which vectorizes well
/// however narrow the plane is (7x7 and 14x14 planes have rows shorter than
/// two AVX-512 vectors, so the row-by-row kernel ran mostly scalar).
///
/// The zero-padded input is split into `s * s` phase planes (row parity x
/// column parity for stride 2; one plane for stride 1):
/// `phase[ry][rx][i][j] = padded[s*i + ry][s*j + rx]`, each `rows` x `pitch`.
/// Output `(oy, ox)` is then `sum w[ky][kx] * phase[ky%s][kx%s][oy + ky/s][ox + kx/s]`:
/// at flat index `q = oy * pitch + ox` every tap reads its phase plane at the
/// constant shift `(ky/s) * pitch + kx/s`. The `pitch - ow` columns past each
/// output row are computed and dropped.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plane_flat<const S: usize>(
    g: &Plane2d,
    src: &[f32],
    filt: &[f32],
    scratch: &mut Vec<f32>,
    out: &mut [f32],
    epi: &Epi<'_>,
    ni: usize,
    ch: usize,
) {
    // The stride is a constant so that the index arithmetic below compiles
    // to shifts and the stride-2 column split vectorizes.
    let s = S;
    let (kh, kw) = (g.kh, g.kw);
    let pitch = g.ow + (kw - 1) / s;
    let rows = g.oh + (kh - 1) / s;
    let plane_len = rows * pitch;
    let n_out = g.oh * pitch;
    // Phase planes, then one padding row so the widest shift stays in
    // bounds, then the accumulator. Big planes zero only their padding (the
    // whole-buffer zeroing was a tenth of the kernel's time on 112x112
    // planes); small ones zero all of it in one call, cheaper than a call per
    // row edge. The accumulator is always fully written.
    let phases_len = s * s * plane_len + pitch;
    if scratch.len() < phases_len + n_out {
        scratch.resize(phases_len + n_out, 0.0);
    }
    let (phase_buf, rest) = scratch.split_at_mut(phases_len);
    let acc = &mut rest[..n_out];
    let zeroed = phases_len <= SMALL_PHASES;
    if zeroed {
        phase_buf.fill(0.0);
    } else {
        phase_buf[s * s * plane_len..].fill(0.0);
    }
    for ry in 0..s {
        for rx in 0..s {
            let plane = &mut phase_buf[(ry * s + rx) * plane_len..][..plane_len];
            for i in 0..rows {
                let prow = &mut plane[i * pitch..][..pitch];
                // Padded row s*i + ry is input row s*i + ry - ph.
                let iy = (s * i + ry) as isize - g.ph as isize;
                // Column j is input column s*j + off.
                let off = rx as isize - g.pw as isize;
                let (lo, hi) = valid_range(pitch, s, off, g.iw);
                if iy < 0 || iy >= g.ih as isize || lo >= hi {
                    if !zeroed {
                        prow.fill(0.0);
                    }
                    continue;
                }
                if !zeroed {
                    prow[..lo].fill(0.0);
                    prow[hi..].fill(0.0);
                }
                let srow = &src[iy as usize * g.iw..][..g.iw];
                let a = ((s * lo) as isize + off) as usize;
                if s == 1 {
                    prow[lo..hi].copy_from_slice(&srow[a..a + (hi - lo)]);
                } else {
                    // Every s-th column from `a`: whole s-column chunks (a
                    // shuffle-vectorized de-interleave), then a last partial one.
                    let dst = &mut prow[lo..hi];
                    let whole = ((g.iw - a) / s).min(dst.len());
                    let (head, tail) = dst.split_at_mut(whole);
                    for (d, chunk) in head.iter_mut().zip(srow[a..].chunks_exact(s)) {
                        *d = chunk[0];
                    }
                    for (j, d) in tail.iter_mut().enumerate() {
                        *d = srow[a + s * (whole + j)];
                    }
                }
            }
        }
    }
    let phase_buf = &*phase_buf;
    // Where each tap (ky, kx), in filter order, reads: its phase plane at
    // its shift.
    let mut starts = [0usize; MAX_FLAT_TAPS];
    for ky in 0..kh {
        for kx in 0..kw {
            starts[ky * kw + kx] = ((ky % s) * s + kx % s) * plane_len + (ky / s) * pitch + kx / s;
        }
    }
    let taps = kh * kw;
    let src_of = |t: usize| &phase_buf[starts[t]..][..n_out];
    if taps == 9 {
        // 3x3 (most depthwise convs): all nine taps in one pass, so the
        // accumulator is written once and never read back.
        let s: [&[f32]; 9] = std::array::from_fn(src_of);
        let w: [f32; 9] = std::array::from_fn(|t| filt[t]);
        taps9_assign(acc, s, w);
    } else {
        // Three taps per pass (one kernel row for 3x3), so the accumulator is
        // read and written a third as often; the first pass assigns it.
        acc.fill(0.0);
        for t0 in (0..taps).step_by(3) {
            let w = |t: usize| filt[t0 + t];
            let src_of = |t: usize| src_of(t0 + t);
            match taps - t0 {
                1 => tap1(acc, src_of(0), w(0)),
                2 => {
                    let (a, b, wa, wb) = (src_of(0), src_of(1), w(0), w(1));
                    for ((d, &x), &y) in acc.iter_mut().zip(a).zip(b) {
                        *d += wa * x + wb * y;
                    }
                }
                _ => taps3(acc, [src_of(0), src_of(1), src_of(2)], [w(0), w(1), w(2)]),
            }
        }
    }
    for (orow, arow) in out
        .chunks_exact_mut(g.ow)
        .zip(acc.chunks_exact(pitch))
        .take(g.oh)
    {
        orow.copy_from_slice(&arow[..g.ow]);
    }
    epi.apply(ni, ch, 0, &mut out[..g.oh * g.ow]);
}

#[inline(always)]
fn tap1(dst: &mut [f32], s: &[f32], w: f32) {
    for (d, &x) in dst.iter_mut().zip(s) {
        *d += w * x;
    }
}

#[inline(always)]
fn taps3(dst: &mut [f32], s: [&[f32]; 3], w: [f32; 3]) {
    for (((d, &a), &b), &c) in dst.iter_mut().zip(s[0]).zip(s[1]).zip(s[2]) {
        *d += w[0] * a + w[1] * b + w[2] * c;
    }
}

/// `dst = sum_t w[t] * s[t]` over nine sources (each at least `dst.len()`
/// long), summed in tap order as the reference does.
#[inline(always)]
fn taps9_assign(dst: &mut [f32], s: [&[f32]; 9], w: [f32; 9]) {
    let n = dst.len();
    // Named slices of exactly n elements, so the loop has no bounds checks
    // and vectorizes.
    let (s0, s1, s2) = (&s[0][..n], &s[1][..n], &s[2][..n]);
    let (s3, s4, s5) = (&s[3][..n], &s[4][..n], &s[5][..n]);
    let (s6, s7, s8) = (&s[6][..n], &s[7][..n], &s[8][..n]);
    for q in 0..n {
        let a = w[0] * s0[q] + w[1] * s1[q] + w[2] * s2[q];
        let a = a + w[3] * s3[q] + w[4] * s4[q] + w[5] * s5[q];
        dst[q] = a + w[6] * s6[q] + w[7] * s7[q] + w[8] * s8[q];
    }
}

#[inline(always)]
fn taps5(dst: &mut [f32], s: [&[f32]; 5], w: [f32; 5]) {
    for (((((d, &a), &b), &c), &e), &f) in dst
        .iter_mut()
        .zip(s[0])
        .zip(s[1])
        .zip(s[2])
        .zip(s[3])
        .zip(s[4])
    {
        *d += w[0] * a + w[1] * b + w[2] * c + w[3] * e + w[4] * f;
    }
}

/// Test hook: runs a depthwise conv through every instruction set this CPU
/// supports (the portable loops first) and returns each output.
#[cfg(test)]
pub(crate) fn all_isas(
    a: &kiln_ir::ConvAttrs,
    x: &kiln_ir::Tensor,
    w: &kiln_ir::Tensor,
) -> Vec<Vec<f32>> {
    let geo = super::conv::conv_geometry(a, x.shape(), w.shape()).unwrap();
    let epi = Epi {
        bias: None,
        res: None,
        act: kiln_ir::FusedAct::Identity,
        m: geo.m,
        out_n: geo.out_n,
    };
    let mut isas = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
        if std::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
    }
    let (xv, wv) = (x.as_slice::<f32>().unwrap(), w.as_slice::<f32>().unwrap());
    isas.into_iter()
        .map(|isa| {
            let mut y = vec![f32::NAN; geo.out_shape.iter().product()];
            depthwise_conv_with(&geo, xv, wv, &epi, &mut y, isa);
            y
        })
        .collect()
}
