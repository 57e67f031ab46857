//! Direct convolution with output channels in the vector lanes (AVX-512),
//! reading X in place in its NCHW layout.
//!
//! Why: convs with few input channels on big planes (stems over 3 colour
//! channels, YOLO's 16- to 64-channel stride-2 downsamplers) do little work
//! per output, so whatever a strategy spends besides multiply-adds shows:
//! the GEMMs pack an im2col panel per call, and the blocked direct kernel
//! (`depthwise.rs`, positions in lanes) copies X into phase planes for
//! stride 2 and loads one broadcast weight per output channel and tap.
//!
//! Here a register holds 16 output channels of one position. For each tap
//! (input channel, ky, kx) a block of `P` positions and `16 * OBV` output
//! channels loads the tap's `OBV` weight vectors once and broadcasts one
//! input value per position: `OBV * P` multiply-adds for `OBV + P` loads,
//! at any stride, straight from X. The accumulators start from the bias,
//! take Relu/Clip in registers when there is no residual, are transposed
//! (16x16, in registers) into rows of positions and stored into Y's output
//! rows; a residual, and the activation after it or any other activation,
//! runs on each finished row while it is in cache.
//!
//! Positions whose window leaves the input (the borders of padded convs)
//! run one at a time with their taps cut to the input; a row cuts its
//! vertical taps the same way. Interior runs are covered by blocks of `P`
//! positions, `P` chosen per conv for the run's length ([`pick_width`]:
//! the last block is shifted left to end at the run's end, so a `P` that
//! divides the run wastes nothing), then blocks of 4, then single positions.
//!
//! Measured on 2 threads (Zen 5), YOLOv8n's 16 -> 32 3x3 stride 2 on
//! 160x160: 0.14 ms (420 GFLOP/s) against 0.22-0.23 for the best GEMM or
//! blocked direct kernel; its 32 -> 64: 0.13 against 0.18; a 3 -> 32
//! stem on 224x224: 0.07 against 0.09.
//!
//! Which convs: one group, 1-D or 2-D, horizontal stride 1 or 2, any
//! window, vertical stride and dilation. It is a tuning candidate
//! (`tune.rs`, which times 2-D convs only), timed against the GEMMs and
//! the other direct kernels on the conv's real input, never the shape
//! heuristics' choice.

use super::conv::{ConvGeometry, Epi};
use super::depthwise::{plane2d, Plane2d};
use super::depthwise_tiled::transpose16;
use super::SharedOut;
use crate::{invalid, Result};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Output channels per vector register.
const LANES: usize = 16;

/// W packed for [`conv`]: per block of `block` output channels (16 or 32),
/// the weights tap-major, `[c][kh][kw][block]`, zero past the last channel.
#[derive(Clone, Debug)]
pub(crate) struct LanesWeights {
    packed: Vec<f32>,
    /// W's shape `[m, c, kh, kw]` (1-D convs as `kh = 1`).
    shape: [usize; 4],
    spatial_axes: usize,
    block: usize,
}

impl LanesWeights {
    /// Packs W (`[M, C, k...]`, row-major, one group, 1 or 2 spatial axes);
    /// `None` for any other shape or a length that does not match it.
    pub(crate) fn new(w: &[f32], w_shape: &[usize]) -> Option<LanesWeights> {
        let (m, c, kh, kw) = match *w_shape {
            [m, c, k] => (m, c, 1, k),
            [m, c, kh, kw] => (m, c, kh, kw),
            _ => return None,
        };
        let taps = c.checked_mul(kh)?.checked_mul(kw)?;
        if m.checked_mul(taps)? != w.len() {
            return None;
        }
        // 16 channels per block where there are at most 16: a second vector
        // would be all padding.
        let block = if m <= LANES { LANES } else { 2 * LANES };
        let per_block = taps * block;
        let mut packed = vec![0.0f32; m.div_ceil(block) * per_block];
        for (mo, wrow) in w.chunks_exact(taps.max(1)).take(m).enumerate() {
            let dst = &mut packed[(mo / block) * per_block + mo % block..];
            for (t, &v) in wrow.iter().enumerate() {
                dst[t * block] = v;
            }
        }
        Some(LanesWeights {
            packed,
            shape: [m, c, kh, kw],
            spatial_axes: w_shape.len() - 2,
            block,
        })
    }

    /// W back, `[M, C, k...]` row-major (tuning unpacks a remembered
    /// choice's weights this way).
    pub(crate) fn unpack(&self) -> Vec<f32> {
        let [m, c, kh, kw] = self.shape;
        let taps = c * kh * kw;
        let per_block = taps * self.block;
        let mut w = vec![0.0f32; m * taps];
        for (mo, wrow) in w.chunks_exact_mut(taps.max(1)).take(m).enumerate() {
            let src = &self.packed[(mo / self.block) * per_block + mo % self.block..];
            for (t, v) in wrow.iter_mut().enumerate() {
                *v = src[t * self.block];
            }
        }
        w
    }
}

/// Whether [`conv`] can run a conv with W of shape `w_shape` (`[M, C,
/// k...]`), `group` groups and these strides (empty: 1s) on this CPU:
/// AVX-512F, one group, 1 or 2 spatial axes, a horizontal stride of 1 or 2.
pub(crate) fn possible(w_shape: &[usize], group: usize, strides: &[usize]) -> bool {
    let axes = w_shape.len().saturating_sub(2);
    let sw = strides.last().copied().unwrap_or(1);
    group == 1
        && (axes == 1 || axes == 2)
        && (sw == 1 || sw == 2)
        && std::is_x86_feature_detected!("avx512f")
}

/// The conv of `geo` with weights `w` into `y` (`[N, M, out...]`, fully
/// overwritten), epilogue included. Errors when the weights were packed for
/// another shape or the conv is not one [`possible`] takes.
pub(crate) fn conv(
    geo: &ConvGeometry,
    x: &[f32],
    w: &LanesWeights,
    epi: &Epi<'_>,
    y: &mut [f32],
) -> Result<()> {
    let g = plane2d(geo);
    let [m, c, kh, kw] = w.shape;
    if (m, c, kh, kw, w.spatial_axes) != (geo.m, geo.cg, g.kh, g.kw, geo.in_sp.len()) {
        return Err(invalid!(
            "Conv: weights packed for W [{m}, {c}, {kh}, {kw}] do not fit this conv (W {:?}, X {} channels, {} groups)",
            [&[geo.m, geo.cg][..], &geo.kshape[..]].concat(),
            geo.c,
            geo.group
        ));
    }
    if geo.group != 1 || !(g.sw == 1 || g.sw == 2) || !std::is_x86_feature_detected!("avx512f") {
        return Err(invalid!(
            "Conv: the channels-in-lanes kernel takes one group and a horizontal stride of 1 or 2 on AVX-512; this conv has {} groups, horizontal stride {}{}",
            geo.group,
            g.sw,
            if std::is_x86_feature_detected!("avx512f") {
                ""
            } else {
                ", and this CPU has no AVX-512"
            }
        ));
    }
    if y.len() != geo.n * m * geo.out_n || x.len() != geo.n * c * geo.in_n {
        return Err(invalid!(
            "Conv: X holds {} and Y {} values, the conv needs {} and {}",
            x.len(),
            y.len(),
            geo.n * c * geo.in_n,
            geo.n * m * geo.out_n
        ));
    }
    if y.is_empty() {
        return Ok(());
    }
    let blocks = m.div_ceil(w.block);
    // Tasks of (image, channel block, band of output rows): about four per
    // thread, so a batch-1 conv with one block still spreads.
    let units = geo.n * blocks;
    let bands = (4 * rayon::current_num_threads())
        .div_ceil(units)
        .clamp(1, g.oh.max(1));
    let band = g.oh.div_ceil(bands).max(1);
    let bands = g.oh.div_ceil(band);
    let (bounds, after) = epi.in_registers();
    let yp = SharedOut(y.as_mut_ptr());
    let job = Job {
        g: &g,
        x,
        w,
        epi,
        after: after.as_ref(),
        bounds,
        in_n: geo.in_n,
        out_n: geo.out_n,
    };
    (0..units * bands).into_par_iter().for_each(|t| {
        let (unit, bi) = (t / bands, t % bands);
        let (ni, b) = (unit / blocks, unit % blocks);
        let rows = bi * band..((bi + 1) * band).min(g.oh);
        // SAFETY: AVX-512F was checked above. This task writes only rows
        // `rows` of output channels `b * block..` (up to M) of image `ni`,
        // which no other task writes; Y holds `n * m * out_n` values and X
        // `n * c * in_n` (checked above), and every read of X stays inside
        // image `ni` (`band` cuts each window to the input).
        unsafe {
            match (w.block, g.sw) {
                (LANES, 1) => job.band::<1, 1>(ni, b, rows, yp),
                (LANES, _) => job.band::<1, 2>(ni, b, rows, yp),
                (_, 1) => job.band::<2, 1>(ni, b, rows, yp),
                _ => job.band::<2, 2>(ni, b, rows, yp),
            }
        }
    });
    Ok(())
}

/// What every task of one [`conv`] shares.
struct Job<'a> {
    g: &'a Plane2d,
    x: &'a [f32],
    w: &'a LanesWeights,
    epi: &'a Epi<'a>,
    /// The epilogue left after the bias and clamp done in registers.
    after: Option<&'a Epi<'a>>,
    bounds: (f32, f32),
    in_n: usize,
    out_n: usize,
}

/// Where one block of positions reads: its first input row and column
/// (before the taps' offsets) and the taps that stay inside the input.
#[derive(Clone, Copy)]
struct Reach {
    iy0: isize,
    ky: (usize, usize),
    ix0: isize,
    kx: (usize, usize),
}

/// The taps `k` in `0..k_count` for which `start + k * dil` lies in
/// `0..len`, as a range (they are consecutive).
/// (An offset that overflows, from absurd dilations, is outside.)
fn taps_inside(start: isize, dil: usize, k_count: usize, len: usize) -> (usize, usize) {
    let inside = |k: usize| {
        k.checked_mul(dil)
            .and_then(|o| isize::try_from(o).ok())
            .and_then(|o| start.checked_add(o))
            .is_some_and(|i| i >= 0 && (i as usize) < len)
    };
    let lo = (0..k_count).find(|&k| inside(k)).unwrap_or(k_count);
    let hi = (lo..k_count).find(|&k| !inside(k)).unwrap_or(k_count);
    (lo, hi)
}

/// The output columns `first..last` whose whole window lies inside the
/// input row (none, `first == last`, when the window is wider than the
/// padded row or its span overflows).
fn interior(g: &Plane2d) -> (usize, usize) {
    let first = g.pw.div_ceil(g.sw);
    let span = (g.kw - 1).checked_mul(g.dw).and_then(|s| s.checked_add(1));
    let last = span
        .and_then(|s| g.iw.checked_add(g.pw)?.checked_sub(s))
        .map_or(0, |r| r / g.sw + 1)
        .min(g.ow);
    (first.min(last), last)
}

/// Positions per interior block for `OBV` vectors of channels (register
/// budget: `OBV * P` accumulators, the weights and a broadcast within 32).
fn widths(obv: usize) -> &'static [usize] {
    if obv == 1 {
        &[16, 20, 24]
    } else {
        &[8, 9, 10, 11, 12, 13]
    }
}

/// The block width for interior runs of `len` positions: the fewest
/// positions computed, counting each block's fixed cost (weight loads,
/// the transpose and stores) as 3 more; 0 when even the narrowest is wider
/// than the run. Shifting the last block to the run's end recomputes
/// positions, so a width that divides the run wins over a wider one.
fn pick_width(obv: usize, len: usize) -> usize {
    widths(obv)
        .iter()
        .filter(|&&p| p <= len)
        .min_by_key(|&&p| (len.div_ceil(p) * (p + 3), usize::MAX - p))
        .copied()
        .unwrap_or(0)
}

/// One output row's view for [`Kernel::run`].
struct Row<const OBV: usize> {
    iy0: isize,
    ky: (usize, usize),
    sw: usize,
    pw: usize,
    kw: usize,
    bias: [__m512; OBV],
    bounds: (__m512, __m512),
    /// Channel 0 of this row in Y (channel `ch` at `out + ch * out_n`).
    out: *mut f32,
    valid: usize,
    out_n: usize,
}

impl Job<'_> {
    /// Output rows `rows` of channel block `b` of image `ni`.
    ///
    /// # Safety
    /// AVX-512F must be present; `ni < n`, `b` is a block of the weights
    /// and `rows` lies in `0..oh`; `y` must point at Y (`n * m * out_n`
    /// values), of which only this task writes these rows of this block.
    #[target_feature(enable = "avx512f")]
    unsafe fn band<const OBV: usize, const S: usize>(
        &self,
        ni: usize,
        b: usize,
        rows: std::ops::Range<usize>,
        y: SharedOut,
    ) {
        let g = self.g;
        let [m, c, _, _] = self.w.shape;
        let block = self.w.block;
        let oc0 = b * block;
        let valid = (m - oc0).min(block);
        let per_block = c * g.kh * g.kw * block;
        let wp = &self.w.packed[b * per_block..][..per_block];
        let x = &self.x[ni * c * self.in_n..][..c * self.in_n];
        let bias: [__m512; OBV] = std::array::from_fn(|o| {
            let mut v = [0.0f32; LANES];
            if let Some(bias) = self.epi.bias {
                for (j, d) in v.iter_mut().enumerate() {
                    if let Some(&bv) = bias
                        .get(oc0 + o * LANES + j)
                        .filter(|_| o * LANES + j < valid)
                    {
                        *d = bv;
                    }
                }
            }
            _mm512_loadu_ps(v.as_ptr())
        });
        let bounds = (_mm512_set1_ps(self.bounds.0), _mm512_set1_ps(self.bounds.1));
        let (sh, sw) = (g.sh as isize, g.sw as isize);
        let (first, last) = interior(g);
        let width = pick_width(OBV, last - first);
        let ybase = y.get().add((ni * m + oc0) * self.out_n);
        let kern = Kernel {
            x: x.as_ptr(),
            w: wp.as_ptr(),
            c,
            in_n: self.in_n,
            iw: g.iw,
            kh: g.kh,
            kw: g.kw,
            dh: g.dh,
            dw: g.dw,
        };
        for oy in rows {
            let iy0 = oy as isize * sh - g.ph as isize;
            let ky = taps_inside(iy0, g.dh, g.kh, g.ih);
            // A border position's window, cut to the input.
            let reach = |ox: usize| {
                let ix0 = ox as isize * sw - g.pw as isize;
                let kx = taps_inside(ix0, g.dw, g.kw, g.iw);
                Reach { iy0, ky, ix0, kx }
            };
            let out = ybase.add(oy * g.ow);
            let single = |ox: usize| {
                let acc = kern.block::<OBV, 1, S>(reach(ox), &bias, bounds);
                store::<OBV, 1>(&acc, out.add(ox), valid, self.out_n);
            };
            (0..first).for_each(single);
            // The interior: blocks of `width`, of 4, then single positions.
            let row = Row {
                iy0,
                ky,
                sw: g.sw,
                pw: g.pw,
                kw: g.kw,
                bias,
                bounds,
                out,
                valid,
                out_n: self.out_n,
            };
            let ox = match width {
                8 => kern.run::<OBV, 8, S>(&row, first, last),
                9 => kern.run::<OBV, 9, S>(&row, first, last),
                10 => kern.run::<OBV, 10, S>(&row, first, last),
                11 => kern.run::<OBV, 11, S>(&row, first, last),
                12 => kern.run::<OBV, 12, S>(&row, first, last),
                13 => kern.run::<OBV, 13, S>(&row, first, last),
                16 => kern.run::<OBV, 16, S>(&row, first, last),
                20 => kern.run::<OBV, 20, S>(&row, first, last),
                24 => kern.run::<OBV, 24, S>(&row, first, last),
                _ => first,
            };
            let ox = kern.run::<OBV, 4, S>(&row, ox, last);
            (ox..last).for_each(single);
            (last..g.ow).for_each(single);
            if let Some(after) = self.after {
                for ch in 0..valid {
                    let row = std::slice::from_raw_parts_mut(out.add(ch * self.out_n), g.ow);
                    after.apply(ni, oc0 + ch, oy * g.ow, row);
                }
            }
        }
    }
}

/// The inner loop's view of one image and one channel block.
struct Kernel {
    /// The image's X, `c` planes of `in_n`.
    x: *const f32,
    /// The block's packed weights, `[c][kh][kw][16 * OBV]`.
    w: *const f32,
    c: usize,
    in_n: usize,
    iw: usize,
    kh: usize,
    kw: usize,
    dh: usize,
    dw: usize,
}

impl Kernel {
    /// `P` positions (`S` apart, from `r.ix0`) x `16 * OBV` channels: the
    /// bias plus every tap inside `r`'s ranges, clamped to `bounds`.
    /// `acc[o][p]` holds channels `16 o..` of position `p`.
    ///
    /// # Safety
    /// AVX-512F must be present, the weights must hold `16 * OBV` channels
    /// per tap, and every tap in `r`'s ranges must read inside the image:
    /// rows `r.iy0 + ky * dh` and columns `r.ix0 + kx * dw + p * S` for
    /// `p < P`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    // Indexes, not iterators: the unrolled loops must keep `acc` in registers.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const OBV: usize, const P: usize, const S: usize>(
        &self,
        r: Reach,
        bias: &[__m512; OBV],
        bounds: (__m512, __m512),
    ) -> [[__m512; P]; OBV] {
        let mut acc: [[__m512; P]; OBV] = std::array::from_fn(|o| [bias[o]; P]);
        let tap = OBV * LANES;
        let (ky0, ky1) = r.ky;
        let (kx0, kx1) = r.kx;
        for ci in 0..self.c {
            let xc = self.x.add(ci * self.in_n);
            for ky in ky0..ky1 {
                let row = (r.iy0 + (ky * self.dh) as isize) * self.iw as isize + r.ix0;
                let wr = self.w.add((ci * self.kh + ky) * self.kw * tap);
                for kx in kx0..kx1 {
                    let src = xc.offset(row + (kx * self.dw) as isize);
                    let wk = wr.add(kx * tap);
                    let wv: [__m512; OBV] =
                        std::array::from_fn(|o| _mm512_loadu_ps(wk.add(o * LANES)));
                    for p in 0..P {
                        let xb = _mm512_set1_ps(*src.add(p * S));
                        for o in 0..OBV {
                            acc[o][p] = _mm512_fmadd_ps(wv[o], xb, acc[o][p]);
                        }
                    }
                }
            }
        }
        // The value as max/min's second operand: a NaN passes through.
        for a in acc.iter_mut() {
            for v in a.iter_mut() {
                *v = _mm512_min_ps(bounds.1, _mm512_max_ps(bounds.0, *v));
            }
        }
        acc
    }
}

impl Kernel {
    /// Positions `ox..last` of `row` (all inside the input horizontally) in
    /// blocks of `P`, the last one shifted to end at `last`, when there are
    /// at least `P`; returns where it stopped (`ox` when there are fewer).
    ///
    /// # Safety
    /// As [`Kernel::block`], for every position of `ox..last`, and `row.out`
    /// must hold those positions of `row.valid` channels.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const OBV: usize, const P: usize, const S: usize>(
        &self,
        row: &Row<OBV>,
        mut ox: usize,
        last: usize,
    ) -> usize {
        if last - ox < P {
            return ox;
        }
        let block = |start: usize| {
            let r = Reach {
                iy0: row.iy0,
                ky: row.ky,
                ix0: (start * row.sw) as isize - row.pw as isize,
                kx: (0, row.kw),
            };
            let acc = self.block::<OBV, P, S>(r, &row.bias, row.bounds);
            store::<OBV, P>(&acc, row.out.add(start), row.valid, row.out_n);
        };
        while ox + P <= last {
            block(ox);
            ox += P;
        }
        if ox < last {
            block(last - P);
        }
        last
    }
}

/// Stores a block's accumulators (`acc[o][p]`: channels `16 o..` of
/// position `p`) into Y's rows: channel `ch < valid` of position `p` goes
/// to `out[ch * out_n + p]`.
///
/// # Safety
/// AVX-512F must be present and those `valid x P` places writable.
/// (Inlined into its AVX-512 callers, where the intrinsics compile as
/// such: as a call of its own, the accumulators went through memory.)
#[inline(always)]
unsafe fn store<const OBV: usize, const P: usize>(
    acc: &[[__m512; P]; OBV],
    out: *mut f32,
    valid: usize,
    out_n: usize,
) {
    for (o, a) in acc.iter().enumerate() {
        let chans = valid.saturating_sub(o * LANES).min(LANES);
        for q in (0..P).step_by(LANES) {
            let count = (P - q).min(LANES);
            let mut v = [_mm512_setzero_ps(); LANES];
            v[..count].copy_from_slice(&a[q..q + count]);
            // Now v[j] lane p is channel 16 o + j of position q + p.
            transpose16(&mut v);
            let mask: __mmask16 = if count == LANES {
                !0
            } else {
                (1u16 << count) - 1
            };
            for (j, vj) in v.iter().enumerate().take(chans) {
                _mm512_mask_storeu_ps(out.add((o * LANES + j) * out_n + q), mask, *vj);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::{conv_f32, conv_geometry, conv_reference, ConvPack, ConvWeights};
    use super::*;
    use crate::nn::test_util::*;
    use kiln_ir::{AutoPad, ConvAttrs};

    /// The kernel against the reference conv computed in f64, under every
    /// fused epilogue, on: 16- and 32-channel blocks with channel tails (1,
    /// 17, 40 output channels), 1 to 17 input channels, strides 1 and 2 (and
    /// a vertical 3), dilations, asymmetric and `SAME` pads, windows from
    /// 1x1 to 7x7 and 1x5, pads wider than the window reaches (rows and
    /// columns that see no input), rows narrower than a block of 4 and
    /// wider than several blocks of 24 (the shifted last block), batches,
    /// and a 1-D conv.
    #[test]
    fn lanes_conv_matches_reference() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(97);
        // (N, C, M, input spatial, kernel, strides, dilations, pads, auto_pad)
        type Case = (
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            AutoPad,
        );
        let cases: Vec<Case> = vec![
            (
                1,
                3,
                32,
                vec![23, 31],
                vec![3, 3],
                vec![2, 2],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
            (
                2,
                16,
                32,
                vec![20, 60],
                vec![3, 3],
                vec![2, 2],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                4,
                16,
                vec![9, 70],
                vec![3, 3],
                vec![1, 1],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                17,
                40,
                vec![11, 29],
                vec![3, 3],
                vec![1, 2],
                vec![],
                vec![0, 2, 1, 0],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                17,
                vec![30, 30],
                vec![7, 7],
                vec![2, 2],
                vec![],
                vec![3, 3, 3, 3],
                AutoPad::NotSet,
            ),
            (
                2,
                5,
                1,
                vec![6, 3],
                vec![3, 3],
                vec![1, 1],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                8,
                33,
                vec![13, 13],
                vec![1, 1],
                vec![1, 1],
                vec![],
                vec![0, 0, 0, 0],
                AutoPad::NotSet,
            ),
            (
                1,
                6,
                24,
                vec![12, 40],
                vec![3, 3],
                vec![1, 1],
                vec![2, 3],
                vec![2, 3, 2, 3],
                AutoPad::NotSet,
            ),
            (
                1,
                2,
                16,
                vec![5, 5],
                vec![3, 3],
                vec![1, 1],
                vec![],
                vec![4, 5, 3, 6],
                AutoPad::NotSet,
            ),
            (
                1,
                7,
                20,
                vec![14, 37],
                vec![5, 5],
                vec![3, 2],
                vec![],
                vec![],
                AutoPad::SameUpper,
            ),
            (
                1,
                9,
                18,
                vec![8, 2],
                vec![1, 5],
                vec![1, 1],
                vec![],
                vec![0, 2, 0, 2],
                AutoPad::NotSet,
            ),
            (
                1,
                1,
                64,
                vec![4, 100],
                vec![2, 2],
                vec![2, 2],
                vec![],
                vec![0, 0, 0, 0],
                AutoPad::NotSet,
            ),
            (
                2,
                4,
                32,
                vec![50],
                vec![5],
                vec![2],
                vec![],
                vec![2, 2],
                AutoPad::NotSet,
            ),
            (
                1,
                5,
                32,
                vec![17, 30],
                vec![3, 3],
                vec![2, 1],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                16,
                vec![15, 41],
                vec![3, 3],
                vec![1, 2],
                vec![2, 2],
                vec![2, 2, 2, 2],
                AutoPad::NotSet,
            ),
            (
                1,
                4,
                20,
                vec![10, 33],
                vec![4, 4],
                vec![2, 2],
                vec![],
                vec![],
                AutoPad::SameLower,
            ),
            (
                2,
                6,
                40,
                vec![9, 35],
                vec![3, 3],
                vec![1, 1],
                vec![],
                vec![1, 1, 1, 1],
                AutoPad::NotSet,
            ),
        ];
        for (n, c, m, sp, k, strides, dilations, pads, auto_pad) in cases {
            let a = ConvAttrs {
                auto_pad,
                dilations,
                group: 1,
                kernel_shape: k.clone(),
                pads,
                strides,
            };
            let xs = [&[n, c][..], &sp[..]].concat();
            let ws = [&[m, c][..], &k[..]].concat();
            let x = t(&xs, rng.vec(xs.iter().product()));
            let wt = t(&ws, rng.vec(ws.iter().product()));
            let bias = t(&[m], rng.vec(m));
            let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
            let plain = conv_reference_f64(&a, &x, &wt, &bias);
            let res = t(&geo.out_shape, rng.vec(plain.len()));
            let lanes = LanesWeights::new(&f32s(&wt), &ws).unwrap();
            assert_eq!(lanes.unpack(), f32s(&wt), "unpack gives W back: {ws:?}");
            let packed = ConvPack::Lanes(lanes);
            check_epilogues(
                &a,
                &x,
                &ws,
                ConvWeights::Packed(&packed),
                &bias,
                &plain,
                &res,
                |act, with_res, got, want| {
                    let what = format!("X {xs:?} W {ws:?} {act:?} residual {with_res}");
                    assert_close_in(what, got, want, 1e-4);
                },
            );
        }
    }

    /// Every row width from 1 to 60 at strides 1 and 2, with 16- and
    /// 32-channel blocks: every block width [`pick_width`] can choose, the
    /// blocks of 4 and the single positions after them.
    #[test]
    fn lanes_conv_covers_every_block_width() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(98);
        let mut chosen = std::collections::BTreeSet::new();
        for m in [16, 32] {
            for s in [1, 2] {
                for iw in 1..=60 {
                    let a = ConvAttrs {
                        auto_pad: AutoPad::NotSet,
                        dilations: vec![],
                        group: 1,
                        kernel_shape: vec![3, 3],
                        pads: vec![1, 1, 1, 1],
                        strides: vec![1, s],
                    };
                    let (c, ih) = (2, 3);
                    let x = t(&[1, c, ih, iw], rng.vec(c * ih * iw));
                    let wt = t(&[m, c, 3, 3], rng.vec(m * c * 9));
                    let want = f32s(&conv_reference(&a, &x, &wt, None).unwrap());
                    let ow = (iw + 2 - 3) / s + 1;
                    let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
                    let (first, last) = interior(&plane2d(&geo));
                    chosen.insert((m, pick_width(if m == 16 { 1 } else { 2 }, last - first)));
                    let packed =
                        ConvPack::Lanes(LanesWeights::new(&f32s(&wt), &[m, c, 3, 3]).unwrap());
                    let got = conv_f32(
                        &a,
                        &x,
                        &[m, c, 3, 3],
                        ConvWeights::Packed(&packed),
                        None,
                        None,
                        kiln_ir::FusedAct::Identity,
                    )
                    .unwrap();
                    assert_eq!(got.shape(), &[1, m, ih, ow]);
                    assert_close(&f32s(&got), &want, 1e-5);
                }
            }
        }
        for (obv, m) in [(1, 16), (2, 32)] {
            for &p in widths(obv) {
                assert!(
                    chosen.contains(&(m, p)),
                    "width {p} for {m} channels never ran"
                );
            }
        }
    }

    /// Every output is written (Y starts as NaN), and NaN inputs stay NaN
    /// through Relu and Clip in registers.
    #[test]
    fn lanes_conv_writes_every_output_and_keeps_nan() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(99);
        let a = ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: vec![1, 2, 0, 1],
            strides: vec![1, 2],
        };
        let (n, c, m, h, w) = (2, 3, 40, 9, 37);
        let mut xv = rng.vec(n * c * h * w);
        xv[5 * w + 20] = f32::NAN;
        let x = t(&[n, c, h, w], xv);
        let wt = t(&[m, c, 3, 3], rng.vec(m * c * 9));
        let bias: Vec<f32> = rng.vec(m);
        let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
        let plain = f32s(&conv_reference(&a, &x, &wt, Some(&t(&[m], bias.clone()))).unwrap());
        let lanes = LanesWeights::new(&f32s(&wt), wt.shape()).unwrap();
        for act in [
            kiln_ir::FusedAct::Relu,
            kiln_ir::FusedAct::Clip {
                min: -0.5,
                max: 0.5,
            },
        ] {
            let epi = Epi {
                bias: Some(&bias),
                res: None,
                act,
                m,
                out_n: geo.out_n,
            };
            let mut y = vec![f32::NAN; plain.len()];
            conv(&geo, &f32s(&x), &lanes, &epi, &mut y).unwrap();
            let mut nans = 0;
            for (i, (g, &p)) in y.iter().zip(&plain).enumerate() {
                if p.is_nan() {
                    nans += 1;
                    assert!(g.is_nan(), "{act:?}: element {i} got {g}, want NaN");
                } else {
                    let w = act.eval(p);
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{act:?}: element {i} got {g}, want {w}"
                    );
                }
            }
            assert!(nans > 0, "the NaN input reaches some outputs");
        }
    }

    /// Weights packed for another W shape, or a conv the kernel does not
    /// take, are an error, not a wrong answer.
    #[test]
    fn lanes_conv_rejects_what_it_cannot_run() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let a = ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: vec![1, 1, 1, 1],
            strides: vec![1, 1],
        };
        let x = t(&[1, 4, 8, 8], vec![0.5; 256]);
        let packed = ConvPack::Lanes(LanesWeights::new(&[0.0; 8 * 3 * 9], &[8, 3, 3, 3]).unwrap());
        let err = conv_f32(
            &a,
            &x,
            &[8, 4, 3, 3],
            ConvWeights::Packed(&packed),
            None,
            None,
            kiln_ir::FusedAct::Identity,
        )
        .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // Another M, another window, 1-D weights for a 2-D conv.
        for (wv, ws) in [
            (vec![0.0; 9 * 4 * 9], vec![9, 4, 3, 3]),
            (vec![0.0; 8 * 4 * 15], vec![8, 4, 3, 5]),
            (vec![0.0; 8 * 4 * 3], vec![8, 4, 3]),
        ] {
            let packed = ConvPack::Lanes(LanesWeights::new(&wv, &ws).unwrap());
            let err = conv_f32(
                &a,
                &x,
                &[8, 4, 3, 3],
                ConvWeights::Packed(&packed),
                None,
                None,
                kiln_ir::FusedAct::Identity,
            )
            .unwrap_err();
            assert!(err.to_string().contains("do not fit"), "{ws:?}: {err}");
        }
        let strided = ConvAttrs {
            strides: vec![1, 3],
            ..a
        };
        let packed = ConvPack::Lanes(LanesWeights::new(&[0.0; 8 * 4 * 9], &[8, 4, 3, 3]).unwrap());
        let err = conv_f32(
            &strided,
            &x,
            &[8, 4, 3, 3],
            ConvWeights::Packed(&packed),
            None,
            None,
            kiln_ir::FusedAct::Identity,
        )
        .unwrap_err();
        assert!(err.to_string().contains("horizontal stride 3"), "{err}");
        assert!(err.to_string().contains("takes one group"), "{err}");
        assert!(!possible(&[8, 4, 3, 3], 1, &[1, 3]));
        assert!(!possible(&[8, 4, 3, 3], 2, &[1, 1]));
        assert!(!possible(&[8, 4, 3, 3, 3], 1, &[1, 1, 1]));
        assert!(LanesWeights::new(&[0.0; 10], &[8, 4, 3, 3]).is_none());
    }
}
