//! Depthwise conv with one vector lane per channel (AVX-512, 16 channels).
//!
//! The per-plane kernels in `depthwise.rs` vectorize along a plane's
//! positions. On the small planes of late layers (7x7, 14x14: 49 to 196
//! outputs) a plane is a few vectors of work and the fixed cost per plane
//! (phase splitting, tap tables, tails, the epilogue call) dominated: kiln took
//! 5-10x ONNX Runtime's time on these convs. Here 16 channels of one image go
//! through together, each in its own lane:
//!
//! 1. a band of input rows of the 16 planes is transposed (16x16 blocks) into
//!    a zero-padded tile `tile[row][col][lane]`, so every tap of every output
//!    is one vector load;
//! 2. each output position is `bias + sum over taps of tile[...] * w[tap]`,
//!    eight positions at a time in registers, with Relu/Clip applied there;
//! 3. the band's outputs are transposed back into the 16 output planes.
//!
//! Any stride, dilation and padding works: the tile holds the padded input
//! the band reads. The reference is `conv_reference` (im2col + GEMM).

use super::conv::Epi;
use super::depthwise::Plane2d;
use rayon::prelude::*;

/// Channels per block: one per lane of an AVX-512 vector.
const LANES: usize = 16;

/// Budget for one band's padded input tile. Bands that fit stay in L1/L2
/// between the transpose and the taps.
const TILE_BYTES: usize = 48 * 1024;

/// A block's bias vector and its Relu/Clip bounds (lo, hi), in registers.
type Bounds = (
    std::arch::x86_64::__m512,
    std::arch::x86_64::__m512,
    std::arch::x86_64::__m512,
);

/// Output positions accumulated together (independent FMA chains).
const POS_BLOCK: usize = 8;

/// Largest output plane the tiled kernel takes: on bigger planes the
/// per-plane kernel's long vector runs are as fast without the two
/// transposes (measured on MobileNetV2's 28x28 to 112x112 layers).
const MAX_OUT_PLANE: usize = 28 * 28;

/// Output planes up to this size take the tiled kernel whatever the input's
/// size.
const ALWAYS_OUT_PLANE: usize = 8 * 8;

/// Above this many input bytes (more than the cores' L2s hold), only planes
/// up to [`ALWAYS_OUT_PLANE`] take the tiled kernel: reading 16 planes at once
/// is 16 row streams, which ran up to 2x slower than the per-plane kernel's
/// one stream when the input came from L3 (MobileNetV2 at batch 8: the 14x14
/// and 28x28 layers; its 7x7 ones stayed 2.5x faster tiled).
const CACHED_INPUT_BYTES: usize = 2 << 20;

/// Whether this CPU and geometry take the channel-tiled kernel: AVX-512, one
/// output channel per input channel (no channel multiplier), planes up to
/// [`MAX_OUT_PLANE`] outputs (up to [`ALWAYS_OUT_PLANE`] when the whole
/// input, `input_bytes`, is bigger than [`CACHED_INPUT_BYTES`]) and at least
/// one tile row in the budget.
pub(super) fn applies(g: &Plane2d, mg: usize, input_bytes: usize) -> bool {
    let max_out = if input_bytes <= CACHED_INPUT_BYTES {
        MAX_OUT_PLANE
    } else {
        ALWAYS_OUT_PLANE
    };
    mg == 1
        && g.oh * g.ow <= max_out
        && g.oh > 0
        && g.ow > 0
        && band_rows(g) > 0
        && std::is_x86_feature_detected!("avx512f")
}

/// Columns of the padded tile: every input column the outputs read.
fn tile_cols(g: &Plane2d) -> usize {
    (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1
}

/// Input rows a band of `ob` output rows reads.
fn tile_rows(g: &Plane2d, ob: usize) -> usize {
    (ob - 1) * g.sh + (g.kh - 1) * g.dh + 1
}

/// Output rows per band: as many as keep the tile within [`TILE_BYTES`]
/// (0 when not even one fits).
fn band_rows(g: &Plane2d) -> usize {
    let row_bytes = tile_cols(g) * LANES * std::mem::size_of::<f32>();
    let max_rows = TILE_BYTES / row_bytes;
    if max_rows < tile_rows(g, 1) {
        return 0;
    }
    // (ob - 1) * sh + span <= max_rows
    (1 + (max_rows - tile_rows(g, 1)) / g.sh).min(g.oh)
}

/// Depthwise conv (`c` channels, `n` images, channel `ci` of image `ni` at
/// `x[(ni * c + ci) * in_n..]`, filters `w[ci * taps..]`) into `y`, epilogue
/// included. Callers check [`applies`] first.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    g: &Plane2d,
    c: usize,
    in_n: usize,
    x: &[f32],
    w: &[f32],
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    let out_n = g.oh * g.ow;
    let taps = g.kh * g.kw;
    assert!(
        applies(g, 1, std::mem::size_of_val(x)),
        "channel-tiled depthwise does not take {g:?}"
    );
    assert!(
        w.len() == c * taps
            && x.len().is_multiple_of(c * in_n)
            && y.len().is_multiple_of(c * out_n),
        "depthwise buffers do not match {c} channels of {g:?}"
    );
    y.par_chunks_mut(c * out_n)
        .enumerate()
        .flat_map(|(ni, img)| {
            img.par_chunks_mut(LANES * out_n)
                .enumerate()
                .map(move |(b, blk)| (ni, b, blk))
        })
        .for_each(|(ni, b, blk)| {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let c0 = b * LANES;
                let xs = &x[(ni * c + c0) * in_n..];
                // SAFETY: `applies` (asserted above) checked AVX-512F.
                unsafe { block_avx512(g, ni, c0, in_n, xs, &w[c0 * taps..], epi, blk, &mut s) }
            })
        });
}

/// Whether [`conv_nhwc`] takes this geometry: AVX-512, a non-empty output
/// and at least one tile row in the budget.
pub(super) fn nhwc_applies(g: &Plane2d) -> bool {
    g.oh > 0 && g.ow > 0 && band_rows(g) > 0 && std::is_x86_feature_detected!("avx512f")
}

/// Depthwise conv on channels-last tensors: `x` is `[n, ih, iw, c]`, `y`
/// `[n, oh, ow, c]`, `w` `[c, kh * kw]`; the bias per channel and a
/// `(lo, hi)` clamp in registers (a residual or any other activation is the
/// caller's, after). A task per image, band of output rows and block of 16
/// channels (several blocks of a band when that would make many tasks):
/// the block's input rows of the band are copied into the zero-padded tile (16 neighbouring channels are already one vector, so
/// nothing is transposed, unlike [`conv`]), and its outputs are stored
/// straight into `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_nhwc(
    g: &Plane2d,
    n: usize,
    c: usize,
    x: &[f32],
    lanes: &[f32],
    bias: Option<&[f32]>,
    clamp: (f32, f32),
    y: &mut [f32],
) {
    let taps = g.kh * g.kw;
    assert!(
        nhwc_applies(g),
        "channels-last depthwise does not take {g:?}"
    );
    let (in_img, out_img) = (g.ih * g.iw * c, g.oh * g.ow * c);
    assert!(
        x.len() == n * in_img
            && y.len() == n * out_img
            && lanes.len() == c.div_ceil(LANES) * taps * LANES
            && bias.is_none_or(|b| b.len() == c),
        "channels-last depthwise buffers do not match {n} images of {c} channels of {g:?}"
    );
    let ob = band_rows(g);
    let (bands, blocks) = (g.oh.div_ceil(ob), c.div_ceil(LANES));
    // Blocks of a band taken together by one task, so that there are about
    // TASKS_PER_THREAD tasks per thread: a task per block made 480 tasks of
    // 49 positions each for MobileNetV2's 7x7 layers at batch 8.
    let tasks_max = TASKS_PER_THREAD * rayon::current_num_threads();
    let group = (n * bands * blocks).div_ceil(tasks_max).clamp(1, blocks);
    let groups = blocks.div_ceil(group);
    let out = super::SharedOut(y.as_mut_ptr());
    (0..n * bands * groups).into_par_iter().for_each(|t| {
        let (ni, rest) = (t / (bands * groups), t % (bands * groups));
        let (oy0, first) = ((rest / groups) * ob, (rest % groups) * group);
        let xs = &x[ni * in_img..(ni + 1) * in_img];
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            for blk in first..(first + group).min(blocks) {
                // SAFETY: `nhwc_applies` (asserted) checked AVX-512F. This
                // writes only channels blk * 16.. (16, fewer at the end) of
                // output rows oy0..oy0 + ob of image ni, inside `y` (its
                // length was asserted); tasks' pieces are disjoint and `y`
                // outlives the loop.
                unsafe {
                    block_nhwc(
                        g,
                        c,
                        xs,
                        &lanes[blk * taps * LANES..][..taps * LANES],
                        bias,
                        clamp,
                        (blk * LANES, oy0),
                        out.get().add(ni * out_img),
                        &mut s,
                    )
                }
            }
        })
    });
}

/// About this many tasks per thread for [`conv_nhwc`]: enough to balance
/// the threads, few enough that scheduling stays small next to the work.
const TASKS_PER_THREAD: usize = 16;

/// The weights `w` (`[c, taps]`) as [`conv_nhwc`] reads them: every
/// 16-channel block's weight vectors, block after block (lane l of a
/// block's vector t is its channel l's tap t; zeros past the last channel).
/// The plan builds them once (`prepared.rs`); laid out per call they took
/// 3-6 us a conv on one thread, before the conv's parallel part.
pub(crate) fn lane_weights(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let per_block = taps * LANES;
    let mut lanes = vec![0f32; c.div_ceil(LANES) * per_block];
    for (b, out) in lanes.chunks_exact_mut(per_block).enumerate() {
        let c0 = b * LANES;
        fill_block_lanes(&w[c0 * taps..], LANES.min(c - c0), taps, out);
    }
    lanes
}

/// One block's weight vectors: lane l of vector t is channel l's tap t of
/// `ws` (the block's filters, `[nch, taps]`), 0 past `nch`; `out` holds
/// `taps` vectors.
fn fill_block_lanes(ws: &[f32], nch: usize, taps: usize, out: &mut [f32]) {
    for (t, v) in out.chunks_exact_mut(LANES).enumerate() {
        for (l, e) in v.iter_mut().enumerate() {
            *e = if l < nch { ws[l * taps + t] } else { 0.0 };
        }
    }
}

/// One band of one 16-channel block of [`conv_nhwc`]: output rows `oy0..`
/// (up to [`band_rows`]) of channels `c0..` of the image whose input is `xs`
/// and output starts at `y`; `wl` is the block's part of [`lane_weights`].
///
/// # Safety
/// AVX-512F; `y` points to the image's `oh * ow * c` output floats, and no
/// one else accesses this block's part of them during the call.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_nhwc(
    g: &Plane2d,
    c: usize,
    xs: &[f32],
    wl: &[f32],
    bias: Option<&[f32]>,
    (lo, hi): (f32, f32),
    (c0, oy0): (usize, usize),
    y: *mut f32,
    scratch: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let nch = LANES.min(c - c0);
    let full = nch == LANES;
    let lanes: __mmask16 = if full { !0 } else { (1u16 << nch) - 1 };
    let taps = g.kh * g.kw;
    let cols = tile_cols(g);
    let rows_out = band_rows(g).min(g.oh - oy0);
    let rows_in = tile_rows(g, rows_out);
    let tile_len = rows_in * cols * LANES;
    // A partial block's outputs go through a band buffer, then masked stores.
    let out_len = if full { 0 } else { rows_out * g.ow * LANES };
    let (_, tile, otile) = scratch_parts(scratch, 0, tile_len, out_len);
    // The padded tile: tile column j holds input column j - pw.
    let ncopy = g.iw.min(cols.saturating_sub(g.pw));
    let lead = g.pw.min(cols);
    assert!(
        xs.len() >= g.ih * g.iw * c
            && c0 + nch <= c
            && wl.len() == taps * LANES
            && bias.is_none_or(|b| b.len() >= c)
    );
    // SAFETY (whole body): every input read is channel c0 + l < c (masked
    // past nch) of a position inside the image (asserted above); tile and
    // band buffer writes stay inside their slices; output stores are the
    // caller's (this function's contract); prefetches never fault.
    unsafe {
        if full {
            // The block's output lines, read ahead of their stores while
            // the tile is filled: an output buffer last written a run ago
            // is out of cache, and each store would wait for its line
            // (MobileNetV2 b8, the first 7x7 depthwise conv of its stage,
            // whose buffer nothing touched since: 2.3x the time of the
            // same conv two blocks on).
            for p in 0..rows_out * g.ow {
                let line = y.add((oy0 * g.ow + p) * c + c0);
                _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
            }
        }
        for r in 0..rows_in {
            let trow = tile.as_mut_ptr().add(r * cols * LANES);
            let iy = (oy0 * g.sh + r) as isize - g.ph as isize;
            if !pad_tile_row(trow, iy, g.ih, cols, lead, ncopy) {
                continue;
            }
            let src = xs.as_ptr().add(iy as usize * g.iw * c + c0);
            for ix in 0..ncopy {
                // (Unmasked when the block is whole: masked loads from
                // memory run much slower on some cores.)
                let v = if full {
                    _mm512_loadu_ps(src.add(ix * c))
                } else {
                    _mm512_maskz_loadu_ps(lanes, src.add(ix * c))
                };
                _mm512_store_ps(trow.add((lead + ix) * LANES), v);
            }
        }
        let taps = Taps {
            w: wl.as_ptr(),
            kh: g.kh,
            kw: g.kw,
            krow: g.dh * cols * LANES,
            kcol: g.dw * LANES,
            step: g.sw * LANES,
        };
        let bounds = (
            match bias {
                Some(b) => _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(c0)),
                None => _mm512_setzero_ps(),
            },
            _mm512_set1_ps(lo),
            _mm512_set1_ps(hi),
        );
        let dst = if full {
            Dst {
                p: y.add(oy0 * g.ow * c + c0),
                row: g.ow * c,
                step: c,
            }
        } else {
            Dst {
                p: otile.as_mut_ptr(),
                row: g.ow * LANES,
                step: LANES,
            }
        };
        let row_step = g.sh * cols * LANES;
        if g.kh == 3 && g.kw == 3 {
            band::<true>(&taps, tile.as_ptr(), row_step, dst, g.ow, rows_out, bounds);
        } else {
            band::<false>(&taps, tile.as_ptr(), row_step, dst, g.ow, rows_out, bounds);
        }
        if !full {
            for p in 0..rows_out * g.ow {
                let v = _mm512_load_ps(otile.as_ptr().add(p * LANES));
                _mm512_mask_storeu_ps(y.add((oy0 * g.ow + p) * c + c0), lanes, v);
            }
        }
    }
}

thread_local! {
    /// Per-thread tile, output band and weight vectors, kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One block of up to 16 channels of image `ni` (`blk` holds their output
/// planes; `xs` starts at the block's first input plane, `ws` at its first
/// filter).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512(
    g: &Plane2d,
    ni: usize,
    c0: usize,
    in_n: usize,
    xs: &[f32],
    ws: &[f32],
    epi: &Epi<'_>,
    blk: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let out_n = g.oh * g.ow;
    let nch = blk.len() / out_n;
    let taps = g.kh * g.kw;
    let cols = tile_cols(g);
    let ob = band_rows(g);
    let tile_len = tile_rows(g, ob) * cols * LANES;
    let out_len = ob * g.ow * LANES;
    let (wv, tile, otile) = scratch_parts(scratch, taps * LANES, tile_len, out_len);
    fill_block_lanes(ws, nch, taps, wv);

    // The block's outputs, transposed out a band at a time: read their
    // lines now, while the tiles are packed and computed (MobileNetV2 b8,
    // 960x7x7: 0.265 -> 0.168 ms).
    super::prefetch_for_store(blk);
    // Bias and Relu/Clip in registers; a residual or other activation after.
    let ((lo, hi), rest) = epi.in_registers();
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let bias = match epi.bias {
        // SAFETY: the block's nch channels from c0 lie inside the bias
        // (one per channel); the masked load reads only those.
        Some(b) => unsafe {
            _mm512_maskz_loadu_ps((1u32 << nch).wrapping_sub(1) as u16, b[c0..].as_ptr())
        },
        None => _mm512_setzero_ps(),
    };
    // Tile strides (floats) between kernel rows, kernel columns and
    // neighbouring output positions.
    let (krow, kcol, step) = (g.dh * cols * LANES, g.dw * LANES, g.sw * LANES);

    let mut oy0 = 0;
    while oy0 < g.oh {
        let rows_out = ob.min(g.oh - oy0);
        let rows_in = tile_rows(g, rows_out);
        pack_band(g, oy0 * g.sh, rows_in, cols, xs, in_n, nch, tile);
        let tp = tile.as_ptr();
        let taps = Taps {
            w: wv.as_ptr(),
            kh: g.kh,
            kw: g.kw,
            krow,
            kcol,
            step,
        };
        let bounds = (bias, vlo, vhi);
        // The whole band in one call; 3x3 kernels with their weights in
        // registers.
        let row_step = g.sh * cols * LANES;
        let dst = Dst {
            p: otile.as_mut_ptr(),
            row: g.ow * LANES,
            step: LANES,
        };
        if g.kh == 3 && g.kw == 3 {
            band::<true>(&taps, tp, row_step, dst, g.ow, rows_out, bounds);
        } else {
            band::<false>(&taps, tp, row_step, dst, g.ow, rows_out, bounds);
        }
        unpack_band(g, oy0, rows_out, otile, nch, blk);
        if let Some(rest) = &rest {
            let pos0 = oy0 * g.ow;
            for (l, plane) in blk.chunks_exact_mut(out_n).enumerate() {
                rest.apply(ni, c0 + l, pos0, &mut plane[pos0..pos0 + rows_out * g.ow]);
            }
        }
        oy0 += rows_out;
    }
}

/// A task's scratch cut into parts of `w_len` (a block's weight vectors),
/// `tile_len` (the padded tile) and `out_len` (the output band) floats,
/// each 64-byte aligned (the lengths are whole vectors).
fn scratch_parts(
    scratch: &mut Vec<f32>,
    w_len: usize,
    tile_len: usize,
    out_len: usize,
) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let need = w_len + tile_len + out_len + LANES;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let skew = scratch.as_ptr().align_offset(64).min(LANES);
    let (wv, rest) = scratch[skew..].split_at_mut(w_len);
    let (tile, rest) = rest.split_at_mut(tile_len);
    (wv, tile, &mut rest[..out_len])
}

/// The taps of one block: weight vectors (`kh * kw`, 16 lanes each, one
/// after another) and the tile strides between kernel rows, kernel columns
/// and neighbouring output positions.
struct Taps {
    w: *const f32,
    kh: usize,
    kw: usize,
    krow: usize,
    kcol: usize,
    step: usize,
}

/// Where a band's output vectors go: position `ox` of band row `r` at
/// `p + r * row + ox * step` (floats; unaligned stores).
#[derive(Clone, Copy)]
struct Dst {
    p: *mut f32,
    row: usize,
    step: usize,
}

/// The `rows` output rows of a band: output row r reads the tile from
/// `src + r * row_step` and writes `ow` vectors to `dst`'s row r.
/// POS_BLOCK positions at a time, then blocks of 4, 2 and 1 for the rest (a
/// 7-wide row, MobileNetV2's last layers, took one position at a time: a
/// single chain of dependent multiply-adds). With `K3` (a 3x3 kernel) the
/// nine weight vectors are loaded once into registers. Its own function with
/// no calls in its loops, so they stay there: loaded per position block, a
/// 7-wide row made one weight load per multiply-add.
///
/// # Safety
/// As for [`positions`], for all `ow` positions of every row.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn band<const K3: bool>(
    taps: &Taps,
    src: *const f32,
    row_step: usize,
    dst: Dst,
    ow: usize,
    rows: usize,
    bounds: Bounds,
) {
    // SAFETY (whole body): the weight vectors and every tile read and
    // output write lie inside the caller's buffers (this function's
    // contract).
    unsafe {
        let w = weight_regs::<K3>(taps);
        for r in 0..rows {
            let (src, out) = (src.add(r * row_step), dst.p.add(r * dst.row));
            row_positions::<K3>(&w, taps, src, out, dst.step, ow, bounds);
        }
    }
}

/// A 3x3 kernel's nine weight vectors, to keep in registers (zeros and
/// unused otherwise).
///
/// # Safety
/// AVX-512F; with `K3`, `taps.w` holds nine vectors.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn weight_regs<const K3: bool>(taps: &Taps) -> [std::arch::x86_64::__m512; 9] {
    use std::arch::x86_64::*;
    if K3 {
        // SAFETY: the caller's contract.
        std::array::from_fn(|t| unsafe { _mm512_loadu_ps(taps.w.add(t * LANES)) })
    } else {
        [_mm512_setzero_ps(); 9]
    }
}

/// `count` neighbouring output positions of one row: the first reads from
/// `src`, writes to `out`, the next `taps.step` and `dst_step` floats on.
/// [`POS_BLOCK`] at a time, then 4, 2 and 1.
///
/// # Safety
/// As for [`positions`], for all `count` positions.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_positions<const K3: bool>(
    w: &[std::arch::x86_64::__m512; 9],
    taps: &Taps,
    src: *const f32,
    out: *mut f32,
    dst_step: usize,
    count: usize,
    bounds: Bounds,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let at = |ox: usize| (src.add(ox * taps.step), out.add(ox * dst_step));
        let mut ox = 0;
        while ox + POS_BLOCK <= count {
            let (s, d) = at(ox);
            positions::<POS_BLOCK, K3>(w, taps, s, d, dst_step, bounds);
            ox += POS_BLOCK;
        }
        if ox + 4 <= count {
            let (s, d) = at(ox);
            positions::<4, K3>(w, taps, s, d, dst_step, bounds);
            ox += 4;
        }
        if ox + 2 <= count {
            let (s, d) = at(ox);
            positions::<2, K3>(w, taps, s, d, dst_step, bounds);
            ox += 2;
        }
        if ox < count {
            let (s, d) = at(ox);
            positions::<1, K3>(w, taps, s, d, dst_step, bounds);
        }
    }
}

/// `N` neighbouring output positions from the tile at `src` (the first
/// position's first tap) into `dst` (`N` vectors, `dst_step` floats
/// apart): bias plus every tap, clamped to
/// `(lo, hi)`, each position its own accumulator. With `K3` the kernel is
/// 3x3 and its weight vectors are `w`; otherwise they are read from
/// `taps.w` (and `w` is unused).
///
/// # Safety
/// AVX-512F; `taps.w` holds `kh * kw` vectors; every
/// read `src + ky * krow + kx * kcol + j * step` (j < N) lies inside the
/// caller's tile, and the 16 floats at `dst + j * dst_step` inside its
/// output.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn positions<const N: usize, const K3: bool>(
    w: &[std::arch::x86_64::__m512; 9],
    taps: &Taps,
    src: *const f32,
    dst: *mut f32,
    dst_step: usize,
    (bias, lo, hi): Bounds,
) {
    use std::arch::x86_64::*;
    let (kh, kw) = if K3 { (3, 3) } else { (taps.kh, taps.kw) };
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [bias; N];
        for ky in 0..kh {
            let prow = src.add(ky * taps.krow);
            for kx in 0..kw {
                let wt = if K3 {
                    w[ky * 3 + kx]
                } else {
                    _mm512_loadu_ps(taps.w.add((ky * kw + kx) * LANES))
                };
                let p = prow.add(kx * taps.kcol);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(j * taps.step)), wt, *a);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.add(j * dst_step), clamp_nan(*a, lo, hi));
        }
    }
}

/// `min(max(v, lo), hi)` lane-wise with NaN kept: x86 min/max return their
/// second operand when either is NaN, so `v` goes second.
#[target_feature(enable = "avx512f")]
#[inline]
fn clamp_nan(
    v: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_min_ps(hi, _mm512_max_ps(lo, v))
}

/// Zeroes the padding of tile row `trow` (`cols` vectors) for input row
/// `iy`: all of it when `iy` is outside the `ih` rows (returns false: no
/// input to copy), else the `lead` vectors before and those past `lead +
/// ncopy`, where the row's input columns go.
///
/// # Safety
/// AVX-512F; `trow` points to `cols` writable, aligned vectors.
#[target_feature(enable = "avx512f")]
unsafe fn pad_tile_row(
    trow: *mut f32,
    iy: isize,
    ih: usize,
    cols: usize,
    lead: usize,
    ncopy: usize,
) -> bool {
    use std::arch::x86_64::*;
    let inside = iy >= 0 && iy < ih as isize;
    let (lead, tail) = if inside {
        (lead, lead + ncopy)
    } else {
        (cols, cols)
    };
    for col in (0..lead).chain(tail..cols) {
        // SAFETY: col < cols; the caller's contract covers the row.
        unsafe { _mm512_store_ps(trow.add(col * LANES), _mm512_setzero_ps()) };
    }
    inside
}

/// Fills `tile` (`rows` x `cols` x 16) with the zero-padded input rows from
/// padded row `prow0` on, lane l from input plane l (`xs[l * in_n..]`, zero
/// for lanes at or past `nch`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pack_band(
    g: &Plane2d,
    prow0: usize,
    rows: usize,
    cols: usize,
    xs: &[f32],
    in_n: usize,
    nch: usize,
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    // Input columns the tile holds: tile column pw + ix for ix < ncopy.
    let ncopy = g.iw.min(cols.saturating_sub(g.pw));
    let lead = g.pw.min(cols);
    assert!(
        tile.len() >= rows * cols * LANES
            && (nch == 0 || xs.len() >= (nch - 1) * in_n + g.ih * g.iw)
    );
    for r in 0..rows {
        let trow = tile.as_mut_ptr().add(r * cols * LANES);
        let iy = (prow0 + r) as isize - g.ph as isize;
        if !pad_tile_row(trow, iy, g.ih, cols, lead, ncopy) {
            continue;
        }
        let src_row = iy as usize * g.iw;
        let mut ix0 = 0;
        while ix0 < ncopy {
            let len = (ncopy - ix0).min(LANES);
            let mask: __mmask16 = if len == LANES { !0 } else { (1u16 << len) - 1 };
            let mut v = [zero; LANES];
            for (l, vl) in v.iter_mut().enumerate().take(nch) {
                *vl = _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(l * in_n + src_row + ix0));
            }
            transpose16(&mut v);
            for (j, vj) in v.iter().enumerate().take(len) {
                _mm512_store_ps(trow.add((lead + ix0 + j) * LANES), *vj);
            }
            ix0 += len;
        }
    }
}

/// Writes `rows` output rows from `otile` (`rows` x `ow` x 16) into the
/// output planes of the block's `nch` channels, from output row `oy0`.
#[target_feature(enable = "avx512f")]
unsafe fn unpack_band(
    g: &Plane2d,
    oy0: usize,
    rows: usize,
    otile: &[f32],
    nch: usize,
    blk: &mut [f32],
) {
    use std::arch::x86_64::*;
    let out_n = g.oh * g.ow;
    assert!(
        otile.len() >= rows * g.ow * LANES
            && blk.len() >= nch * out_n
            && (oy0 + rows) * g.ow <= out_n
    );
    let zero = _mm512_setzero_ps();
    for r in 0..rows {
        let orow = otile.as_ptr().add(r * g.ow * LANES);
        let mut ox0 = 0;
        while ox0 < g.ow {
            let len = (g.ow - ox0).min(LANES);
            let mask: __mmask16 = if len == LANES { !0 } else { (1u16 << len) - 1 };
            let mut v = [zero; LANES];
            for (j, vj) in v.iter_mut().enumerate().take(len) {
                *vj = _mm512_load_ps(orow.add((ox0 + j) * LANES));
            }
            transpose16(&mut v);
            for (l, vl) in v.iter().enumerate().take(nch) {
                let dst = blk.as_mut_ptr().add(l * out_n + (oy0 + r) * g.ow + ox0);
                _mm512_mask_storeu_ps(dst, mask, *vl);
            }
            ox0 += len;
        }
    }
}

/// In-register 16x16 transpose (shared with the GEMM's packing).
pub(crate) use kiln_gemm::transpose16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let src: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: AVX-512F was detected above; every pointer covers 16 floats
        // inside `src` / `out`.
        unsafe {
            use std::arch::x86_64::*;
            let mut v = [_mm512_setzero_ps(); LANES];
            for (i, vi) in v.iter_mut().enumerate() {
                *vi = _mm512_loadu_ps(src.as_ptr().add(i * LANES));
            }
            transpose16(&mut v);
            for (j, vj) in v.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(j * LANES), *vj);
            }
        }
        for j in 0..LANES {
            for i in 0..LANES {
                assert_eq!(out[j * LANES + i], src[i * LANES + j], "v[{j}] lane {i}");
            }
        }
    }
}
