//! Direct f32 kernels for convs that a GEMM serves badly:
//!
//! - **Depthwise** (and channel multipliers): every output channel reads
//!   exactly one input channel, so there is no reduction over channels to hand
//!   to a GEMM. 1-D convs run as 2-D ones of height 1.
//! - **Few input channels per group** (2 to 4: RGB stems, narrow grouped
//!   convs): as a GEMM, the depth is only `channels x kernel` (27 for a 3x3
//!   stem) and packing the im2col panels costs as much as the product.
//!
//! Each output plane is computed row by row: for each kernel row, the taps of
//! that row are accumulated into the output row in one pass over the positions
//! where all of them are inside the input (3 and 5 taps wide: fused loops),
//! single-tap passes at the edges. A strided conv first splits each input row
//! into `stride` phases (`phase p` holds columns `p, p + s, p + 2s, ...`), so
//! every tap reads a contiguous run and the loops vectorize. Common 2-D shapes
//! take the flat kernel instead ([`plane_flat`]). The loops are compiled for
//! AVX-512 / AVX2 too and chosen once per call by CPU feature.
//!
//! The reference is `conv_reference` (im2col + GEMM) in `conv.rs`.

use super::conv::{valid_range, ConvGeometry, Epi};
use crate::Result;
use kiln_ir::{ConvAttrs, FusedAct, Tensor};
use rayon::prelude::*;

/// One output plane's 2-D geometry (height 1 for 1-D convs).
#[derive(Clone, Copy, Debug)]
pub(super) struct Plane2d {
    pub(super) ih: usize,
    pub(super) iw: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
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

/// A conv that `conv::uses_direct_kernel` routes here, into `y` (`[N, M,
/// out...]`, fully overwritten), epilogue included: depthwise when there is
/// one input channel per group, else the few-channel kernel.
pub(crate) fn direct_conv(geo: &ConvGeometry, x: &[f32], w: &[f32], epi: &Epi<'_>, y: &mut [f32]) {
    direct_conv_with(geo, x, w, epi, y, detect_isa(), true)
}

/// `allow_special`: whether depthwise convs may take the channel-tiled or
/// the 3x3 row kernel where they apply (tests turn it off to cover the
/// per-plane kernels).
fn direct_conv_with(
    geo: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
    isa: Isa,
    allow_special: bool,
) {
    if geo.cg == 1 {
        depthwise_conv_with(geo, x, w, epi, y, isa, allow_special)
    } else {
        few_channel_conv_with(geo, x, w, epi, y, isa)
    }
}

/// Depthwise conv of every plane of X, with the epilogue applied per plane.
/// Needs `geo.cg == 1` and 1 or 2 spatial axes; parallel over output planes,
/// or over blocks of 16 channels in the channel-tiled kernel (small planes,
/// AVX-512; see `depthwise_tiled`).
fn depthwise_conv_with(
    geo: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
    isa: Isa,
    allow_special: bool,
) {
    assert!(
        geo.cg == 1 && (1..=2).contains(&geo.in_sp.len()),
        "depthwise_conv needs one input channel per group and 1-2 spatial axes, got {geo:?}"
    );
    let g = plane2d(geo);
    let (c, m, mg, kn, in_n, out_n) = (geo.c, geo.m, geo.mg, geo.kn, geo.in_n, geo.out_n);
    if out_n == 0 || m == 0 {
        return;
    }
    let kernel = dw_kernel(&g, mg, std::mem::size_of_val(x), isa, allow_special);
    #[cfg(target_arch = "x86_64")]
    if kernel == DwKernel::Tiled {
        return super::depthwise_tiled::conv(&g, c, in_n, x, w, epi, y);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
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
                    #[cfg(target_arch = "x86_64")]
                    if kernel == DwKernel::Rows {
                        super::depthwise_rows::plane(&g, src, filt, out, epi, ni, mi);
                        continue;
                    }
                    plane_dispatch(isa, &g, src, filt, &mut scratch, out, epi, ni, mi);
                }
            })
        });
}

/// Which kernel runs a depthwise conv.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum DwKernel {
    /// 16 channels per vector (`depthwise_tiled`).
    Tiled,
    /// 3x3 straight from the input rows (`depthwise_rows`).
    Rows,
    /// The per-plane kernels here.
    Plane,
}

/// The kernel for depthwise planes of geometry `g` (`mg` output channels
/// per input channel, X of `input_bytes`) on `isa`; `allow_special: false`
/// keeps the per-plane kernels (tests).
fn dw_kernel(
    g: &Plane2d,
    mg: usize,
    input_bytes: usize,
    isa: Isa,
    allow_special: bool,
) -> DwKernel {
    #[cfg(target_arch = "x86_64")]
    if allow_special && isa == Isa::Avx512 {
        let rows = super::depthwise_rows::applies(g);
        // Stride 2 takes the row kernel wherever it applies (MobileNetV2 b1,
        // 56x56 -> 28x28: 0.062 ms tiled, 0.042 by rows), and so do stride-1
        // rows 28+ wide (MobileNetV2 b1 in-model, 28x28 x 192 channels on
        // one thread: 0.072 ms tiled, 0.065 by rows); smaller stride-1
        // planes stay channel-tiled (14x14 x 576: 0.062 tiled, 0.077 by rows).
        if !(rows && (g.sh == 2 || g.ow >= 28))
            && super::depthwise_tiled::applies(g, mg, input_bytes)
        {
            return DwKernel::Tiled;
        }
        if rows {
            return DwKernel::Rows;
        }
    }
    let _ = (g, mg, input_bytes, isa, allow_special);
    DwKernel::Plane
}

/// A conv's 2-D plane geometry (1-D convs as height 1).
pub(super) fn plane2d(geo: &ConvGeometry) -> Plane2d {
    let win = &geo.win;
    if geo.in_sp.len() == 2 {
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
    }
}

/// Most input channels per group the few-channel direct kernel takes.
const MAX_DIRECT_CHANNELS: usize = 4;
/// Most taps (channels per group x kernel elements) it takes: a 7x7 stem
/// over 4 channels is 196.
const MAX_DIRECT_TAPS: usize = 256;

/// Whether the few-channel direct kernel should run a conv with `cg` input
/// channels per group and this window: it can ([`few_channel_fits`]) and
/// this CPU has AVX-512 or AVX2. Only those kernels block output channels in
/// registers; without them the GEMM is faster.
pub(crate) fn few_channel_applies(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> bool {
    detect_isa() != Isa::Portable && few_channel_fits(cg, kernel, strides, dilations)
}

/// Whether the few-channel kernel can run this geometry (empty strides and
/// dilations mean 1s, as in ONNX): 2 to 4 channels per group, 2-D, the same
/// stride (1 or 2) on both axes, no dilation, at most [`MAX_DIRECT_TAPS`].
fn few_channel_fits(cg: usize, kernel: &[usize], strides: &[usize], dilations: &[usize]) -> bool {
    let all = |v: &[usize], f: fn(usize) -> bool| {
        v.is_empty() || (v.len() == 2 && v.iter().all(|&x| f(x)))
    };
    (2..=MAX_DIRECT_CHANNELS).contains(&cg)
        && kernel.len() == 2
        && kernel.iter().all(|&k| k > 0)
        && cg * kernel[0] * kernel[1] <= MAX_DIRECT_TAPS
        && all(strides, |s| s == 1 || s == 2)
        && (strides.is_empty() || strides[0] == strides[1])
        && all(dilations, |d| d == 1)
}

/// Narrowest output rows for which [`many_channel_fits`] takes a conv: the
/// flat layout computes `kw - 1` padding columns per row, and below 28
/// columns (measured: 3x3 convs on 14x14 and 7x7 planes) the GEMM wins.
const MIN_MANY_CHANNEL_WIDTH: usize = 28;

/// Whether the direct kernel should run a conv with 5 or more input channels
/// per group, output rows `out_w` wide (`None`: not known, so no): it can
/// ([`many_channel_fits`]) and this CPU has AVX-512, whose 32 registers hold
/// 8 output channels x 48 positions. Such convs as a GEMM pack an im2col
/// panel per call that their few output channels (64 in ResNet's first
/// stage) use too little: measured on 3x3 convs, 64 -> 64 channels on 56x56
/// planes 0.86 -> 0.63 ms, 128 -> 128 on 28x28 0.68 -> 0.61; stride 2 and
/// planes of 14x14 or less ran slower, so they stay GEMMs.
pub(crate) fn many_channel_applies(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    out_w: Option<usize>,
) -> bool {
    detect_isa() == Isa::Avx512 && many_channel_fits(cg, kernel, strides, dilations, out_w)
}

/// The geometry [`many_channel_applies`] takes: more than
/// [`MAX_DIRECT_CHANNELS`] channels per group, 2-D with a kernel of 3 or
/// more on both axes (1x1 and 1xN convs stay GEMMs: no im2col to save),
/// stride 1, no dilation, output rows at least [`MIN_MANY_CHANNEL_WIDTH`] wide.
fn many_channel_fits(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    out_w: Option<usize>,
) -> bool {
    let ones = |v: &[usize]| v.is_empty() || (v.len() == 2 && v.iter().all(|&x| x == 1));
    cg > MAX_DIRECT_CHANNELS
        && kernel.len() == 2
        && kernel.iter().all(|&k| k >= 3)
        && ones(strides)
        && ones(dilations)
        && out_w.is_some_and(|w| w >= MIN_MANY_CHANNEL_WIDTH)
}

/// Whether the blocked direct kernel should be timed (`tune.rs`) on a
/// conv with more than [`MAX_DIRECT_CHANNELS`] input channels per group:
/// AVX-512 (as [`many_channel_applies`] needs) and
/// [`many_channel_window`]. The shape heuristics choose the kernel only
/// where [`many_channel_applies`] says.
pub(crate) fn many_channel_possible(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> bool {
    detect_isa() == Isa::Avx512 && many_channel_window(cg, kernel, strides, dilations)
}

/// The convs with more than [`MAX_DIRECT_CHANNELS`] input channels per
/// group the blocked kernel can run: [`many_channel_fits`]' window at any
/// row width, at stride 1 or 2 (through phase planes, as for few channels).
fn many_channel_window(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> bool {
    let ones = |v: &[usize]| v.is_empty() || (v.len() == 2 && v.iter().all(|&x| x == 1));
    let same_stride = strides.is_empty()
        || (strides.len() == 2 && strides[0] == strides[1] && (1..=2).contains(&strides[0]));
    cg > MAX_DIRECT_CHANNELS
        && kernel.len() == 2
        && kernel.iter().all(|&k| k >= 3)
        && same_stride
        && ones(dilations)
}

/// A conv with few input channels per group ([`few_channel_fits`]), or many
/// ([`many_channel_possible`]).
/// Each (image, group)'s input channels are phase-split once (as the
/// depthwise flat kernel does); then each task computes a block of `OB`
/// output channels of one group and image together, so every input vector
/// loaded feeds `OB` multiply-adds (one per output channel) held in registers.
fn few_channel_conv_with(
    geo: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
    isa: Isa,
) {
    let win = &geo.win;
    let few = few_channel_fits(geo.cg, &win.kernel, &win.strides, &win.dilations);
    // Many channels at any width and stride 1 or 2: tuning (`tune.rs`) may
    // choose the kernel where the shape heuristics would not.
    assert!(
        few || many_channel_window(geo.cg, &win.kernel, &win.strides, &win.dilations),
        "the blocked direct kernel does not take {geo:?}"
    );
    let g = plane2d(geo);
    if geo.out_n == 0 {
        return;
    }
    // The widest block that divides the group's output channels, so no
    // block straddles two groups. Many channels: 3 vectors of positions per
    // block (each loaded source feeds 8 x 3 accumulators); few: 2, whose
    // shorter blocks measured better on the stems.
    match (geo.mg, few) {
        (mg, false) if mg % 8 == 0 => blocked_conv::<8, 3>(geo, &g, x, w, epi, y, isa),
        (mg, _) if mg % 8 == 0 => blocked_conv::<8, 2>(geo, &g, x, w, epi, y, isa),
        (mg, _) if mg % 4 == 0 => blocked_conv::<4, 2>(geo, &g, x, w, epi, y, isa),
        (mg, _) if mg % 2 == 0 => blocked_conv::<2, 2>(geo, &g, x, w, epi, y, isa),
        _ => blocked_conv::<1, 2>(geo, &g, x, w, epi, y, isa),
    }
}

/// Flat positions per register block of [`block_avx512`]: `v` vectors of 16.
const fn block_q(v: usize) -> usize {
    16 * v
}

fn blocked_conv<const OB: usize, const V: usize>(
    geo: &ConvGeometry,
    g: &Plane2d,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
    isa: Isa,
) {
    let (m, mg, cg, in_n, out_n) = (geo.m, geo.mg, geo.cg, geo.in_n, geo.out_n);
    let bq = block_q(V);
    let taps = cg * g.kh * g.kw;
    let lay = flat_layout(g, g.sh, cg);
    // Output rows per band: the band's accumulators (OB planes of it) stay
    // in L1/L2 until they are copied out with the epilogue, instead of
    // round-tripping whole planes through memory.
    let band_rows = (BAND_FLATS / lay.pitch).clamp(1, g.oh);
    let bpad = (band_rows * lay.pitch).div_ceil(bq) * bq;
    // Register blocks run up to `bq` positions past a band's end; the phases
    // get `bq` zeros more so those reads stay in bounds.
    let (phases_len, acc_len) = (lay.phases_len + bq, OB * bpad);
    // Every (image, group)'s phase planes first, once (each is read by all
    // of the group's output-channel blocks), in parallel over channels too:
    // at batch 1 a stem has one group, whose split alone kept one thread
    // busy while the other waited. Each channel's planes are built apart,
    // then the zeros past the last one.
    let per_channel = lay.phases_len - lay.pitch;
    let channel_lay = FlatLayout {
        phases_len: per_channel / cg.max(1),
        ..lay
    };
    let mut all_phases = crate::buffers::take_f32(geo.n * geo.group * phases_len);
    all_phases
        .par_chunks_mut(phases_len)
        .enumerate()
        .for_each(|(ng, buf)| {
            let xg = &x[ng * cg * in_n..][..cg * in_n];
            let (planes, tail) = buf.split_at_mut(per_channel);
            planes
                .par_chunks_mut(channel_lay.phases_len.max(1))
                .zip(xg.par_chunks(in_n.max(1)))
                .for_each(|(cbuf, xc)| phases_dispatch(isa, g, &channel_lay, xc, in_n, 1, cbuf));
            tail.fill(0.0);
        });
    let mut starts = vec![0usize; taps];
    fill_tap_starts(g, &lay, cg, &mut starts);
    let starts = &starts[..];
    y.par_chunks_mut(out_n * OB)
        .enumerate()
        .for_each(|(task, outs)| {
            let p0 = task * OB;
            let (ni, m0) = (p0 / m, p0 % m);
            let gi = m0 / mg;
            let phases = &all_phases[(ni * geo.group + gi) * phases_len..][..phases_len];
            // The AVX-512 block starts from the bias and applies Relu/Clip
            // (unless a residual comes first) in registers; the rest of the
            // epilogue runs on the rows copied out.
            let in_regs = isa == Isa::Avx512;
            let (bounds, after) = if in_regs {
                epi.in_registers()
            } else {
                ((f32::NEG_INFINITY, f32::INFINITY), Some(*epi))
            };
            let bias: [f32; OB] = std::array::from_fn(|o| match epi.bias {
                Some(b) if in_regs => b[m0 + o],
                _ => 0.0,
            });
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let need = acc_len + taps * OB;
                if scratch.len() < need {
                    scratch.resize(need, 0.0);
                }
                let (acc, rest) = scratch.split_at_mut(acc_len);
                // The block's weights tap-major: wt[t * OB + o].
                let wt = &mut rest[..taps * OB];
                for (t, row) in wt.chunks_exact_mut(OB).enumerate() {
                    for (o, v) in row.iter_mut().enumerate() {
                        *v = w[(m0 + o) * taps + t];
                    }
                }
                let mut oy0 = 0;
                while oy0 < g.oh {
                    let rows = band_rows.min(g.oh - oy0);
                    let q0 = oy0 * lay.pitch;
                    // This band's accumulator stride (the last band may be short).
                    let stride = (rows * lay.pitch).div_ceil(bq) * bq;
                    let acc = &mut acc[..OB * stride];
                    block_dispatch::<OB, V>(isa, starts, wt, phases, q0, acc, &bias, bounds);
                    for (o, out) in outs.chunks_exact_mut(out_n).enumerate() {
                        let band = &acc[o * stride..][..rows * lay.pitch];
                        let out = &mut out[oy0 * g.ow..][..rows * g.ow];
                        for (orow, arow) in
                            out.chunks_exact_mut(g.ow).zip(band.chunks_exact(lay.pitch))
                        {
                            orow.copy_from_slice(&arow[..g.ow]);
                        }
                        if let Some(after) = &after {
                            after.apply(ni, m0 + o, oy0 * g.ow, out);
                        }
                    }
                    oy0 += rows;
                }
            })
        });
    crate::buffers::recycle(all_phases);
}

/// Flat positions per band of [`blocked_conv`] (8 KiB per output channel).
const BAND_FLATS: usize = 2048;

/// `acc[o * bpad + i] = sum_t wt[t * OB + o] * phases[starts[t] + q0 + i]`
/// for `i < bpad` (`acc` is `OB x bpad`, bpad a multiple of `block_q(V)`).
/// The AVX-512 kernel also adds `bias[o]` and clamps to `bounds` (`(lo,
/// hi)`); the others ignore both (their callers apply the whole epilogue
/// after).
#[inline]
#[allow(clippy::too_many_arguments)]
fn block_dispatch<const OB: usize, const V: usize>(
    isa: Isa,
    starts: &[usize],
    wt: &[f32],
    phases: &[f32],
    q0: usize,
    acc: &mut [f32],
    bias: &[f32; OB],
    bounds: (f32, f32),
) {
    let bpad = acc.len() / OB;
    assert!(
        wt.len() >= starts.len() * OB && acc.len() == OB * bpad && bpad.is_multiple_of(block_q(V))
    );
    assert!(starts.iter().all(|&st| st + q0 + bpad <= phases.len()));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen after
        // `is_x86_feature_detected!("avx512f")` returned true; the bounds
        // the kernel relies on are asserted above.
        Isa::Avx512 => unsafe { block_avx512::<OB, V>(starts, wt, phases, q0, acc, bias, bounds) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen after AVX2 and FMA were
        // detected on this CPU; bounds asserted above.
        Isa::Avx2 => unsafe { block_avx2::<OB>(starts, wt, phases, q0, acc) },
        Isa::Portable => block::<OB>(starts, wt, phases, q0, acc),
    }
}

/// # Safety
/// AVX-512F must be present, and the bounds `block_dispatch` asserts hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const OB: usize, const V: usize>(
    starts: &[usize],
    wt: &[f32],
    phases: &[f32],
    q0: usize,
    acc: &mut [f32],
    bias: &[f32; OB],
    bounds: (f32, f32),
) {
    use core::arch::x86_64::*;
    let bpad = acc.len() / OB;
    let (vlo, vhi) = (_mm512_set1_ps(bounds.0), _mm512_set1_ps(bounds.1));
    let mut vbias = [_mm512_setzero_ps(); OB];
    for (v, &b) in vbias.iter_mut().zip(bias) {
        *v = _mm512_set1_ps(b);
    }
    let (ph, wp, ap) = (phases.as_ptr(), wt.as_ptr(), acc.as_mut_ptr());
    for q in (0..bpad).step_by(block_q(V)) {
        // SAFETY: every tap reads phases[st + q0 + q ..][..16 V] with
        // st + q0 + bpad <= len and q + 16 V <= bpad; weights
        // [t * OB, t * OB + OB) for t < starts.len(); stores go to
        // acc[o * bpad + q ..][..16 V] (the caller's asserted bounds).
        unsafe {
            let mut a = [[_mm512_setzero_ps(); V]; OB];
            for (ao, &b) in a.iter_mut().zip(&vbias) {
                *ao = [b; V];
            }
            for (t, &st) in starts.iter().enumerate() {
                let p = ph.add(st + q0 + q);
                let mut sv = [_mm512_setzero_ps(); V];
                for (v, x) in sv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(p.add(16 * v));
                }
                for (o, ao) in a.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*wp.add(t * OB + o));
                    for (acc, &x) in ao.iter_mut().zip(&sv) {
                        *acc = _mm512_fmadd_ps(wv, x, *acc);
                    }
                }
            }
            for (o, ao) in a.iter().enumerate() {
                let d = ap.add(o * bpad + q);
                for (v, &x) in ao.iter().enumerate() {
                    // x86 min/max return the second operand on NaN: x goes second.
                    let x = _mm512_min_ps(vhi, _mm512_max_ps(vlo, x));
                    _mm512_storeu_ps(d.add(16 * v), x);
                }
            }
        }
    }
}

/// # Safety
/// AVX2 and FMA must be present, and the bounds `block_dispatch` asserts hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const OB: usize>(
    starts: &[usize],
    wt: &[f32],
    phases: &[f32],
    q0: usize,
    acc: &mut [f32],
) {
    use core::arch::x86_64::*;
    let bpad = acc.len() / OB;
    let (ph, wp, ap) = (phases.as_ptr(), wt.as_ptr(), acc.as_mut_ptr());
    // One ymm per output channel (16 registers hold no more with the source
    // and weight).
    for q in (0..bpad).step_by(8) {
        // SAFETY: bounds as in `block_avx512`, 8 floats per step, q + 8 <= bpad.
        unsafe {
            let mut a = [_mm256_setzero_ps(); OB];
            for (t, &st) in starts.iter().enumerate() {
                let sv = _mm256_loadu_ps(ph.add(st + q0 + q));
                for (o, ao) in a.iter_mut().enumerate() {
                    *ao = _mm256_fmadd_ps(_mm256_set1_ps(*wp.add(t * OB + o)), sv, *ao);
                }
            }
            for (o, ao) in a.iter().enumerate() {
                _mm256_storeu_ps(ap.add(o * bpad + q), *ao);
            }
        }
    }
}

/// Portable: one output channel and tap at a time (no register blocking;
/// [`few_channel_applies`] does not route convs here, it serves the test
/// that every instruction set agrees).
fn block<const OB: usize>(
    starts: &[usize],
    wt: &[f32],
    phases: &[f32],
    q0: usize,
    acc: &mut [f32],
) {
    let bpad = acc.len() / OB;
    for (o, plane) in acc.chunks_exact_mut(bpad).enumerate() {
        plane.fill(0.0);
        for (t, &st) in starts.iter().enumerate() {
            tap1(plane, &phases[st + q0..][..bpad], wt[t * OB + o]);
        }
    }
}

/// Where each tap (ci, ky, kx) of `cg` channels reads, in filter order: its
/// channel's phase plane at its shift. `N` (at least `cg * kh * kw`) sizes
/// the table on the stack: small for depthwise planes, where its setup is a
/// visible share. (Nested loops, not a division per tap, for the same reason.)
#[inline(always)]
fn tap_starts<const N: usize>(g: &Plane2d, lay: &FlatLayout, cg: usize) -> [usize; N] {
    let mut starts = [0usize; N];
    fill_tap_starts(g, lay, cg, &mut starts);
    starts
}

/// [`tap_starts`] into `starts` (at least `cg * kh * kw` long).
#[inline(always)]
fn fill_tap_starts(g: &Plane2d, lay: &FlatLayout, cg: usize, starts: &mut [usize]) {
    let s = g.sh;
    let mut t = 0;
    for ci in 0..cg {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let plane = (ci * s + ky % s) * s + kx % s;
                starts[t] = plane * lay.plane_len + (ky / s) * lay.pitch + kx / s;
                t += 1;
            }
        }
    }
}

/// [`build_phases`] for `cg` channels, compiled for the CPU's vector ISA
/// (the stride-2 de-interleave vectorizes much better with it).
fn phases_dispatch(
    isa: Isa,
    g: &Plane2d,
    lay: &FlatLayout,
    xg: &[f32],
    in_n: usize,
    cg: usize,
    buf: &mut [f32],
) {
    #[inline(always)]
    fn build(g: &Plane2d, lay: &FlatLayout, xg: &[f32], in_n: usize, cg: usize, buf: &mut [f32]) {
        if g.sh == 1 {
            build_phases::<1>(g, lay, xg, in_n, cg, buf)
        } else {
            build_phases::<2>(g, lay, xg, in_n, cg, buf)
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn build_avx512(
        g: &Plane2d,
        lay: &FlatLayout,
        xg: &[f32],
        in_n: usize,
        cg: usize,
        buf: &mut [f32],
    ) {
        build(g, lay, xg, in_n, cg, buf)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn build_avx2(
        g: &Plane2d,
        lay: &FlatLayout,
        xg: &[f32],
        in_n: usize,
        cg: usize,
        buf: &mut [f32],
    ) {
        build(g, lay, xg, in_n, cg, buf)
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only chosen after AVX-512F was detected.
        Isa::Avx512 => unsafe { build_avx512(g, lay, xg, in_n, cg, buf) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen after AVX2 was detected.
        Isa::Avx2 => unsafe { build_avx2(g, lay, xg, in_n, cg, buf) },
        Isa::Portable => build(g, lay, xg, in_n, cg, buf),
    }
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

/// Phase buffers up to this many floats are zeroed whole (see [`build_phases`]).
const SMALL_PHASES: usize = 4096;

/// Largest depthwise kernel (taps) [`plane_flat`] takes.
const MAX_FLAT_TAPS: usize = 64;

/// Where the phase planes of one or more input channels lie in the scratch
/// of the flat kernel (see [`plane_flat`]).
#[derive(Clone, Copy, Debug)]
struct FlatLayout {
    /// Row pitch of the phase planes (and of the accumulator).
    pitch: usize,
    /// Rows of each phase plane.
    rows: usize,
    plane_len: usize,
    /// Flat accumulator length: `oh * pitch`.
    n_out: usize,
    /// Phase planes of every channel, plus one zero row so the widest shift
    /// of the last plane stays in bounds.
    phases_len: usize,
}

fn flat_layout(g: &Plane2d, s: usize, channels: usize) -> FlatLayout {
    let pitch = g.ow + (g.kw - 1) / s;
    let rows = g.oh + (g.kh - 1) / s;
    let plane_len = rows * pitch;
    FlatLayout {
        pitch,
        rows,
        plane_len,
        n_out: g.oh * pitch,
        phases_len: channels * s * s * plane_len + pitch,
    }
}

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
    let lay = flat_layout(g, S, 1);
    let (phases, acc) = flat_scratch(scratch, &lay);
    build_phases::<S>(g, &lay, src, src.len(), 1, phases);
    flat_taps::<MAX_FLAT_TAPS>(g, &lay, phases, filt, acc, out);
    epi.apply(ni, ch, 0, &mut out[..g.oh * g.ow]);
}

/// The scratch of the flat kernel split into phase planes and accumulator
/// (grown when too small; the contents are stale, every user overwrites).
fn flat_scratch<'s>(scratch: &'s mut Vec<f32>, lay: &FlatLayout) -> (&'s mut [f32], &'s mut [f32]) {
    if scratch.len() < lay.phases_len + lay.n_out {
        scratch.resize(lay.phases_len + lay.n_out, 0.0);
    }
    let (phases, rest) = scratch.split_at_mut(lay.phases_len);
    (phases, &mut rest[..lay.n_out])
}

/// Splits `channels` input planes (channel `ci` at `x[ci * in_n..]`) into
/// their zero-padded phase planes, channel-major, in `buf[..lay.phases_len]`,
/// writing every element. Big buffers zero only their padding (whole-buffer
/// zeroing was a tenth of the kernel's time on 112x112 planes); small ones
/// zero all at once, cheaper than a call per row edge.
#[inline(always)]
fn build_phases<const S: usize>(
    g: &Plane2d,
    lay: &FlatLayout,
    x: &[f32],
    in_n: usize,
    channels: usize,
    buf: &mut [f32],
) {
    // The stride is a constant so that the index arithmetic compiles to
    // shifts and the stride-2 column split vectorizes.
    let s = S;
    let (pitch, plane_len) = (lay.pitch, lay.plane_len);
    let buf = &mut buf[..lay.phases_len];
    let zeroed = lay.phases_len <= SMALL_PHASES;
    if zeroed {
        buf.fill(0.0);
    } else {
        buf[channels * s * s * plane_len..].fill(0.0);
    }
    if S == 2 && pair_split_applies(g, pitch) {
        return build_phases_paired(g, lay, x, in_n, channels, buf, zeroed);
    }
    for ci in 0..channels {
        let src = &x[ci * in_n..][..g.ih * g.iw];
        for ry in 0..s {
            for rx in 0..s {
                let plane = &mut buf[((ci * s + ry) * s + rx) * plane_len..][..plane_len];
                for i in 0..lay.rows {
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
                        // Every s-th column from `a`, de-interleaved in whole
                        // chunks (shuffle-vectorized).
                        super::conv::strided_copy::<S>(&mut prow[lo..hi], &srow[a..]);
                    }
                }
            }
        }
    }
}

/// Column ranges of the two stride-2 column phases of a phase row: phase
/// `rx` column j is input column `2j + rx - pw`, valid for j in `[lo, hi)`,
/// starting at input column `a`.
fn column_phases(g: &Plane2d, pitch: usize) -> [(usize, usize, usize); 2] {
    let mut r = [(0, 0, 0); 2];
    for (rx, out) in r.iter_mut().enumerate() {
        let off = rx as isize - g.pw as isize;
        let (lo, hi) = valid_range(pitch, 2, off, g.iw);
        *out = (lo, hi, ((2 * lo) as isize + off).max(0) as usize);
    }
    r
}

/// Whether both column phases of every stride-2 row come from one pass over
/// the input row: both non-empty, starting on adjacent input columns.
fn pair_split_applies(g: &Plane2d, pitch: usize) -> bool {
    let [(lo0, hi0, a0), (lo1, hi1, a1)] = column_phases(g, pitch);
    lo0 < hi0 && lo1 < hi1 && a0.abs_diff(a1) == 1
}

/// [`build_phases`] for stride 2: each input row is read once and split into
/// its even and odd columns, written straight to the two column phases (the
/// general loop reads every row once per column phase).
#[inline(always)]
fn build_phases_paired(
    g: &Plane2d,
    lay: &FlatLayout,
    x: &[f32],
    in_n: usize,
    channels: usize,
    buf: &mut [f32],
    zeroed: bool,
) {
    let (pitch, plane_len) = (lay.pitch, lay.plane_len);
    let cols = column_phases(g, pitch);
    // The phase that starts on the earlier input column takes the even
    // elements of the run from there.
    let first = if cols[0].2 < cols[1].2 { 0 } else { 1 };
    for ci in 0..channels {
        let src = &x[ci * in_n..][..g.ih * g.iw];
        for ry in 0..2 {
            let planes = &mut buf[(ci * 2 + ry) * 2 * plane_len..][..2 * plane_len];
            let (p0, p1) = planes.split_at_mut(plane_len);
            for i in 0..lay.rows {
                let r0 = &mut p0[i * pitch..][..pitch];
                let r1 = &mut p1[i * pitch..][..pitch];
                let iy = (2 * i + ry) as isize - g.ph as isize;
                if iy < 0 || iy >= g.ih as isize {
                    if !zeroed {
                        r0.fill(0.0);
                        r1.fill(0.0);
                    }
                    continue;
                }
                if !zeroed {
                    for (r, &(lo, hi, _)) in [&mut *r0, &mut *r1].into_iter().zip(&cols) {
                        r[..lo].fill(0.0);
                        r[hi..].fill(0.0);
                    }
                }
                let srow = &src[iy as usize * g.iw..][..g.iw];
                let [c0, c1] = cols;
                let (dst0, dst1) = (&mut r0[c0.0..c0.1], &mut r1[c1.0..c1.1]);
                if first == 0 {
                    deinterleave2(&srow[c0.2..], dst0, dst1);
                } else {
                    deinterleave2(&srow[c1.2..], dst1, dst0);
                }
            }
        }
    }
}

/// `even[k] = src[2k]`, `odd[k] = src[2k + 1]` for every k of each (both
/// inside `src`): whole pairs first (shuffle-vectorized), then the ends.
#[inline(always)]
pub(crate) fn deinterleave2(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let pairs = even.len().min(odd.len()).min(src.len() / 2);
    for ((e, o), c) in even[..pairs]
        .iter_mut()
        .zip(odd[..pairs].iter_mut())
        .zip(src.chunks_exact(2))
    {
        *e = c[0];
        *o = c[1];
    }
    for (k, e) in even.iter_mut().enumerate().skip(pairs) {
        *e = src[2 * k];
    }
    for (k, o) in odd.iter_mut().enumerate().skip(pairs) {
        *o = src[2 * k + 1];
    }
}

/// One output plane from phase planes: `out = sum over (channel, ky, kx) of
/// w * shifted phase plane` (`filt` holds `channels * kh * kw` weights in
/// that order, at most `MAXT`: the size of its tap table on the stack, kept
/// small for depthwise planes, where the table's setup is a visible share),
/// written to `out` row by row without the epilogue.
#[inline(always)]
fn flat_taps<const MAXT: usize>(
    g: &Plane2d,
    lay: &FlatLayout,
    phases: &[f32],
    filt: &[f32],
    acc: &mut [f32],
    out: &mut [f32],
) {
    let (kh, kw, pitch, n_out) = (g.kh, g.kw, lay.pitch, lay.n_out);
    let taps = filt.len();
    assert!(
        taps % (kh * kw) == 0 && taps <= MAXT,
        "{taps} taps, at most {MAXT}"
    );
    let starts = tap_starts::<MAXT>(g, lay, taps / (kh * kw));
    // Chunks of the flat range keep the accumulator in L1 while the taps
    // (up to MAXT) pass over it.
    let mut q0 = 0;
    while q0 < n_out {
        let len = FLAT_CHUNK.min(n_out - q0);
        let acc = &mut acc[q0..q0 + len];
        let src_of = |t: usize| &phases[starts[t] + q0..][..len];
        let mut t0 = 0;
        if taps < 9 {
            acc.fill(0.0);
        }
        while t0 < taps {
            let left = taps - t0;
            if left >= 9 {
                // All nine taps of a 3x3 kernel row set in one pass; the
                // first pass assigns, so the accumulator needs no zeroing.
                // (Spelled out: `array::from_fn` is not inlined here.)
                let src = [
                    src_of(t0),
                    src_of(t0 + 1),
                    src_of(t0 + 2),
                    src_of(t0 + 3),
                    src_of(t0 + 4),
                    src_of(t0 + 5),
                    src_of(t0 + 6),
                    src_of(t0 + 7),
                    src_of(t0 + 8),
                ];
                let w: [f32; 9] = filt[t0..t0 + 9].try_into().expect("nine weights");
                if t0 == 0 {
                    taps9::<true>(acc, src, w);
                } else {
                    taps9::<false>(acc, src, w);
                }
                t0 += 9;
            } else if left >= 3 {
                let src = [src_of(t0), src_of(t0 + 1), src_of(t0 + 2)];
                taps3(acc, src, [filt[t0], filt[t0 + 1], filt[t0 + 2]]);
                t0 += 3;
            } else {
                tap1(acc, src_of(t0), filt[t0]);
                t0 += 1;
            }
        }
        q0 += len;
    }
    for (orow, arow) in out
        .chunks_exact_mut(g.ow)
        .zip(acc.chunks_exact(pitch))
        .take(g.oh)
    {
        orow.copy_from_slice(&arow[..g.ow]);
    }
}

/// Flat positions per accumulator chunk of [`flat_taps`] (16 KiB).
const FLAT_CHUNK: usize = 4096;

/// `dst = sum_t w[t] * s[t]` (`ASSIGN`) or `dst += ...` over nine sources
/// (each at least `dst.len()` long), summed in tap order.
#[inline(always)]
fn taps9<const ASSIGN: bool>(dst: &mut [f32], s: [&[f32]; 9], w: [f32; 9]) {
    let n = dst.len();
    // Named slices of exactly n elements, so the loop has no bounds checks
    // and vectorizes.
    let (s0, s1, s2) = (&s[0][..n], &s[1][..n], &s[2][..n]);
    let (s3, s4, s5) = (&s[3][..n], &s[4][..n], &s[5][..n]);
    let (s6, s7, s8) = (&s[6][..n], &s[7][..n], &s[8][..n]);
    for q in 0..n {
        let a = w[0] * s0[q] + w[1] * s1[q] + w[2] * s2[q];
        let a = a + w[3] * s3[q] + w[4] * s4[q] + w[5] * s5[q];
        let a = a + w[6] * s6[q] + w[7] * s7[q] + w[8] * s8[q];
        dst[q] = if ASSIGN { a } else { dst[q] + a };
    }
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

/// `FusedOp::ConvNhwc` for a 2-D depthwise conv (one input and one output
/// channel per group) on channels-last f32 tensors: X `[N, H, W, C]`, the
/// residual and the result `[N, OH, OW, C]`, with bias, residual and `act`.
/// On AVX-512 the channel-tiled kernel (`depthwise_tiled::conv_nhwc`), on
/// `lanes`, W laid out by `depthwise_tiled::lane_weights` when the plan
/// made them (else here), otherwise [`nhwc_rows`]. `Ok(None)` for any other
/// conv: the caller then runs it through the NCHW path.
pub(crate) fn conv_nhwc(
    a: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    res: Option<&Tensor>,
    act: FusedAct,
    lanes: Option<&[f32]>,
) -> Result<Option<Tensor>> {
    conv_nhwc_with(a, x, w, bias, res, act, lanes, true)
}

/// [`conv_nhwc`], with the AVX-512 kernel allowed or not (tests run both).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_nhwc_with(
    a: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    res: Option<&Tensor>,
    act: FusedAct,
    lanes: Option<&[f32]>,
    allow_tiled: bool,
) -> Result<Option<Tensor>> {
    let (Some(xv), Some(wv)) = (x.as_slice::<f32>(), w.as_slice::<f32>()) else {
        return Ok(None);
    };
    let &[n, h, wd, c] = x.shape() else {
        return Ok(None);
    };
    let geo = super::conv::conv_geometry(a, &[n, c, h, wd], w.shape())?;
    if geo.in_sp.len() != 2 || geo.cg != 1 || geo.mg != 1 || geo.group != c {
        return Ok(None);
    }
    let g = plane2d(&geo);
    if g.kh * g.kw > MAX_NHWC_TAPS {
        return Ok(None);
    }
    let out_shape = vec![n, g.oh, g.ow, c];
    let (b, r) = super::conv::nhwc_bias_and_residual(bias, res, c, &out_shape)?;
    // Relu/Clip in the kernel, unless a residual comes first.
    let clamp = super::conv::clamp_of(act).filter(|_| r.is_none());
    let bounds = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let mut y = crate::buffers::take_f32(n * g.oh * g.ow * c);
    #[cfg(target_arch = "x86_64")]
    let tiled = allow_tiled && super::depthwise_tiled::nhwc_applies(&g);
    #[cfg(not(target_arch = "x86_64"))]
    let tiled = {
        let _ = (allow_tiled, lanes);
        false
    };
    if tiled {
        #[cfg(target_arch = "x86_64")]
        {
            let built;
            let lanes = match lanes {
                Some(l) => l,
                None => {
                    built = super::depthwise_tiled::lane_weights(wv, c, g.kh * g.kw);
                    &built
                }
            };
            super::depthwise_tiled::conv_nhwc(&g, n, c, xv, lanes, b, bounds, &mut y);
        }
    } else {
        nhwc_rows(&g, n, c, xv, wv, b, bounds, &mut y);
    }
    if let Some(r) = r {
        for (v, &rv) in y.iter_mut().zip(r) {
            *v += rv;
        }
    }
    if clamp.is_none() {
        crate::fastmath::fused_act(act, &mut y);
    }
    Ok(Some(crate::util::tensor(
        out_shape,
        kiln_ir::TensorData::F32(y),
    )?))
}

/// The portable channels-last depthwise kernel: one task per output row;
/// each output position is the bias plus, per tap inside the input, that
/// input position's channels times the tap's weights, a loop over the
/// contiguous channels that the compiler vectorizes (built for the CPU's
/// vector ISA by `fastmath::simd`); then the `(lo, hi)` clamp, NaN kept.
/// Most taps of a kernel [`nhwc_rows`] takes (larger ones go through NCHW).
pub(crate) const MAX_NHWC_TAPS: usize = 64;

#[allow(clippy::too_many_arguments)]
fn nhwc_rows(
    g: &Plane2d,
    n: usize,
    c: usize,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (lo, hi): (f32, f32),
    y: &mut [f32],
) {
    let taps = g.kh * g.kw;
    assert!(
        x.len() == n * g.ih * g.iw * c && y.len() == n * g.oh * g.ow * c && w.len() == c * taps,
        "channels-last depthwise buffers do not match {n} images of {c} channels of {g:?}"
    );
    if y.is_empty() {
        return;
    }
    // Weights as [tap][channel], so each tap's are contiguous like X's.
    let mut wt = vec![0f32; taps * c];
    for (ci, wc) in w.chunks_exact(taps).enumerate() {
        for (t, &v) in wc.iter().enumerate() {
            wt[t * c + ci] = v;
        }
    }
    let zeros = vec![0f32; c];
    let b = bias.unwrap_or(&zeros);
    y.par_chunks_mut(g.ow * c)
        .enumerate()
        .for_each(|(row, out)| {
            let (ni, oy) = (row / g.oh, row % g.oh);
            let img = &x[ni * g.ih * g.iw * c..(ni + 1) * g.ih * g.iw * c];
            crate::fastmath::simd(
                #[inline(always)]
                || {
                    // Per position: input and weight offsets of the taps that
                    // fall inside the input.
                    let mut at = [(0usize, 0usize); MAX_NHWC_TAPS];
                    for (ox, o) in out.chunks_exact_mut(c).enumerate() {
                        let mut live = 0;
                        for ky in 0..g.kh {
                            let iy = (oy * g.sh + ky * g.dh) as isize - g.ph as isize;
                            if iy < 0 || iy >= g.ih as isize {
                                continue;
                            }
                            for kx in 0..g.kw {
                                let ix = (ox * g.sw + kx * g.dw) as isize - g.pw as isize;
                                if ix >= 0 && ix < g.iw as isize {
                                    let t = ky * g.kw + kx;
                                    at[live] = ((iy as usize * g.iw + ix as usize) * c, t * c);
                                    live += 1;
                                }
                            }
                        }
                        o.copy_from_slice(b);
                        for &(xo, wo) in &at[..live] {
                            let (xs, ws) = (&img[xo..xo + c], &wt[wo..wo + c]);
                            for ((v, &xv), &wv) in o.iter_mut().zip(xs).zip(ws) {
                                *v += xv * wv;
                            }
                        }
                        for v in o.iter_mut() {
                            // Comparisons with NaN are false: NaN stays.
                            if *v < lo {
                                *v = lo;
                            } else if *v > hi {
                                *v = hi;
                            }
                        }
                    }
                },
            );
        });
}

#[cfg(test)]
fn dw_kernel_of(geo: &ConvGeometry) -> DwKernel {
    let bytes = geo.n * geo.c * geo.in_n * std::mem::size_of::<f32>();
    if geo.cg != 1 {
        return DwKernel::Plane;
    }
    dw_kernel(&plane2d(geo), geo.mg, bytes, detect_isa(), true)
}

/// Test hook: whether this CPU runs a depthwise conv of this geometry on the
/// channel-tiled kernel.
#[cfg(test)]
pub(crate) fn takes_tiled(geo: &ConvGeometry) -> bool {
    dw_kernel_of(geo) == DwKernel::Tiled
}

/// Test hook: whether this CPU runs a depthwise conv of this geometry on the
/// 3x3 row kernel.
#[cfg(test)]
pub(crate) fn takes_rows(geo: &ConvGeometry) -> bool {
    dw_kernel_of(geo) == DwKernel::Rows
}

/// Test hook: runs a depthwise or few-channel conv through every instruction
/// set this CPU supports (the portable loops first) and returns each output.
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
    // Each ISA's per-plane kernels, then the channel-tiled or row kernel
    // where one runs.
    let mut runs: Vec<(Isa, bool)> = isas.into_iter().map(|isa| (isa, false)).collect();
    runs.push((detect_isa(), true));
    runs.into_iter()
        .map(|(isa, tiled)| {
            let mut y = vec![f32::NAN; geo.out_shape.iter().product()];
            direct_conv_with(&geo, xv, wv, &epi, &mut y, isa, tiled);
            y
        })
        .collect()
}

#[cfg(test)]
mod split_tests {
    use super::deinterleave2;

    #[test]
    fn deinterleave2_every_length_pair() {
        // Every even/odd length pair a source of 0..=9 elements can serve,
        // including the unequal ones whose ends take the scalar loops.
        for n in 0..=9usize {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            for ne in 0..=n.div_ceil(2) {
                for no in 0..=n / 2 {
                    let mut e = vec![-1.0; ne];
                    let mut o = vec![-1.0; no];
                    deinterleave2(&src, &mut e, &mut o);
                    for (k, &v) in e.iter().enumerate() {
                        assert_eq!(v, src[2 * k], "n {n} even {ne} odd {no}: even[{k}]");
                    }
                    for (k, &v) in o.iter().enumerate() {
                        assert_eq!(v, src[2 * k + 1], "n {n} even {ne} odd {no}: odd[{k}]");
                    }
                }
            }
        }
    }
}
