//! 3x3 stride-1 convs by Winograd's minimal filtering, F(4x4, 3x3), on
//! AVX-512.
//!
//! A direct (im2col + GEMM) 3x3 conv does 9 multiply-adds per output and
//! input channel. Winograd's algorithm computes each 4x4 block of outputs
//! from a 6x6 block of input with 36 products per channel pair instead of
//! 144, so the GEMM work drops 4x, for transforms that are linear in the
//! activations (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016). With `d` a 6x6 input tile, `g` a 3x3 filter:
//!
//! `Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A`
//!
//! summed over input channels, where the elementwise product of the 36
//! transformed values becomes 36 independent GEMMs over channels:
//!
//! 1. **weights**, once at plan time: `U_xi = (G g G^T)_xi`, kept as 36
//!    packed `[C, M]` GEMM operands (in f64, then rounded);
//! 2. **input**: for every tile, `V_xi[tile][c] = (B^T d B)_xi`, 16 channels
//!    per vector lane (a band of six input rows of 16 planes is transposed
//!    into a zero-padded `row x col x channel` tile first, as the channel-
//!    tiled depthwise kernel does);
//! 3. **products**: `M_xi[tiles, M] = V_xi[tiles, C] x U_xi[C, M]`, 36 GEMMs;
//! 4. **output**: `Y = A^T M A` per tile and 16 output channels, with bias
//!    and Relu/Clip in registers, transposed back into the output planes;
//!    a residual or other activation runs after, per output row.
//!
//! Tiles are processed in chunks of tile rows so that V and M of one chunk
//! stay in the caches between the three steps.
//!
//! The transforms use the interpolation points 0, ±1, ±2 and ∞. Their
//! rounding error is larger than a direct sum's (products with 1/6, 1/24,
//! sums of up to 36 terms of mixed sign); the tests bound it against the
//! plain reference conv.

use super::conv::{ConvGeometry, Epi};
use super::depthwise::Plane2d;
use super::depthwise_tiled::{pack_band, transpose16};
use crate::{invalid, Result};
use kiln_gemm::{sgemm, Lhs, MatRef, PackedB, Rhs};
use rayon::prelude::*;

/// Channels per vector: one per lane of an AVX-512 register.
const LANES: usize = 16;
/// Input tile side (output tile + kernel - 1).
const IT: usize = 6;
/// Output tile side.
const OT: usize = 4;
/// Transformed values per tile, one GEMM each.
const XI: usize = IT * IT;

/// Fewest 4x4 output tiles per image for which a conv takes this kernel
/// (plan time, from the inferred output shape): 14x14 planes have 16. On
/// 7x7 planes (4 tiles, 31% of them padding) the 36 transformed weight
/// matrices, 4x the bytes of W, stream from memory for little work.
const MIN_TILES: usize = 16;

/// Fewest input and output channels: below them the transforms cost more
/// than the products save.
const MIN_CHANNELS: usize = 16;

/// Budget for one chunk's V and M (bytes): big enough to feed the 36 GEMMs
/// rows, small enough to stay in L2/L3 between the steps.
const CHUNK_BYTES: usize = 4 << 20;

/// Most bytes of V and M one tile row may take (a chunk holds at least one
/// row): wider planes of many channels stay GEMMs rather than allocate
/// scratch out of proportion (4K-wide planes of 512 channels would take
/// 150 MB a row).
const MAX_ROW_BYTES: usize = 32 << 20;

// The transforms of F(4x4, 3x3) with interpolation points 0, 1, -1, 2,
// -1/2 and infinity (Toom-Cook). Lavin's usual points 0, ±1, ±2 have
// transform entries up to 8 and 1/24; these keep them within 8 and 1/8 and
// measured 2-4x less rounding error in f32 (the 36-term sums over channels
// then cancel less), for a few more operations in the input transform.

/// `G`: a filter row `g` (3 taps) becomes `G g` (6 values).
const G: [[f64; 3]; IT] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0],
    [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0],
    [-16.0 / 15.0, 8.0 / 15.0, -4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// `B^T`: an input row `d` (6 values) becomes `B^T d`. The kernels spell
/// it out ([`bt6`]); the tests hold them to this table.
#[cfg(test)]
const BT: [[f32; IT]; IT] = [
    [1.0, 1.5, -2.0, -1.5, 1.0, 0.0],
    [0.0, -1.0, -2.5, -0.5, 1.0, 0.0],
    [0.0, 1.0, 0.5, -2.5, 1.0, 0.0],
    [0.0, -0.5, -1.0, 0.5, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 1.0, 1.5, -2.0, -1.5, 1.0],
];

/// `A^T`: six products `m` become four outputs `A^T m` (spelled out in
/// [`at6`], tested against this table).
#[cfg(test)]
const AT: [[f32; IT]; OT] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -0.5, 0.0],
    [0.0, 1.0, 1.0, 4.0, 0.25, 0.0],
    [0.0, 1.0, -1.0, 8.0, -0.125, 1.0],
];

/// The conv's weights transformed and packed for the 36 products.
#[derive(Clone, Debug)]
pub(crate) struct WinogradWeights {
    /// Input channels (GEMM depth).
    c: usize,
    /// Output channels (GEMM columns).
    m: usize,
    /// `U_xi^T` as `[C, M]` right operands, `xi = 6 * row + col`.
    panels: Vec<PackedB>,
}

impl WinogradWeights {
    /// Transforms W (`[M, C, 3, 3]`, row-major) into `U = G g G^T` per
    /// output/input channel pair (computed in f64) and packs it.
    pub(crate) fn new(w: &[f32], m: usize, c: usize) -> WinogradWeights {
        assert_eq!(w.len(), m * c * 9, "W must be [M, C, 3, 3]");
        let mut u = vec![0f32; XI * c * m];
        for k in 0..m {
            for ci in 0..c {
                let g = &w[(k * c + ci) * 9..][..9];
                // (G g): 6 x 3, then (G g) G^T: 6 x 6.
                let mut gg = [[0f64; 3]; IT];
                for (i, gi) in G.iter().enumerate() {
                    for b in 0..3 {
                        gg[i][b] = (0..3).map(|a| gi[a] * g[a * 3 + b] as f64).sum();
                    }
                }
                for i in 0..IT {
                    for (j, gj) in G.iter().enumerate() {
                        let v: f64 = (0..3).map(|b| gg[i][b] * gj[b]).sum();
                        u[((i * IT + j) * c + ci) * m + k] = v as f32;
                    }
                }
            }
        }
        let panels = u
            .chunks_exact(c * m)
            .map(|ux| PackedB::new(MatRef::row_major(ux, c, m)))
            .collect();
        WinogradWeights { c, m, panels }
    }
}

/// Whether a conv with W of shape `ws` and these attributes takes Winograd:
/// AVX-512, one group, a 3x3 kernel, stride and dilation 1 (empty lists
/// mean 1s), at least [`MIN_CHANNELS`] in and out, and output planes known
/// at plan time (`out_hw`) with at least [`MIN_TILES`] 4x4 tiles and tile
/// rows within [`MAX_ROW_BYTES`]. kiln-opt's channels-last pass mirrors
/// this rule (`winograd_candidate`) to leave such convs on NCHW: change
/// both together.
pub(crate) fn applies(
    ws: &[usize],
    group: usize,
    strides: &[usize],
    dilations: &[usize],
    out_hw: Option<(usize, usize)>,
) -> bool {
    let ones = |v: &[usize]| v.is_empty() || (v.len() == 2 && v.iter().all(|&s| s == 1));
    let Some((oh, ow)) = out_hw else {
        return false;
    };
    ws.len() == 4
        && ws[2] == 3
        && ws[3] == 3
        && group == 1
        && ws[0] >= MIN_CHANNELS
        && ws[1] >= MIN_CHANNELS
        && ones(strides)
        && ones(dilations)
        && oh.div_ceil(OT) * ow.div_ceil(OT) >= MIN_TILES
        && row_bytes(ws[1], ws[0], ow.div_ceil(OT)) <= MAX_ROW_BYTES
        && std::is_x86_feature_detected!("avx512f")
}

/// Bytes of V and M for one row of `tw` tiles, `c` channels in, `m` out.
fn row_bytes(c: usize, m: usize, tw: usize) -> usize {
    XI.saturating_mul(c.saturating_add(m))
        .saturating_mul(tw)
        .saturating_mul(std::mem::size_of::<f32>())
}

/// The conv `geo` over X into Y (`[N, M, OH, OW]`, fully overwritten),
/// epilogue included. Errors when the geometry is not one the weights were
/// transformed for.
pub(crate) fn conv(
    geo: &ConvGeometry,
    x: &[f32],
    wts: &WinogradWeights,
    epi: &Epi<'_>,
    y: &mut [f32],
) -> Result<()> {
    let win = &geo.win;
    if geo.in_sp.len() != 2
        || win.kernel != [3, 3]
        || win.strides != [1, 1]
        || win.dilations != [1, 1]
        || geo.group != 1
        || geo.c != wts.c
        || geo.m != wts.m
    {
        return Err(invalid!(
            "Conv: Winograd weights for {} -> {} channels (3x3, stride 1, one group) do not fit this conv {:?} (internal planning error)",
            wts.c,
            wts.m,
            win
        ));
    }
    if !std::is_x86_feature_detected!("avx512f") {
        return Err(invalid!(
            "Conv: Winograd weights were packed for AVX-512, which this CPU lacks"
        ));
    }
    let (n, c, m) = (geo.n, geo.c, geo.m);
    let (oh, ow) = (win.out[0], win.out[1]);
    let out_n = oh * ow;
    assert!(x.len() >= n * c * geo.in_n && y.len() >= n * m * out_n);
    if n == 0 || out_n == 0 {
        return Ok(());
    }
    let g = Plane2d {
        ih: geo.in_sp[0],
        iw: geo.in_sp[1],
        kh: 3,
        kw: 3,
        sh: 1,
        sw: 1,
        dh: 1,
        dw: 1,
        ph: win.pad_begin[0],
        pw: win.pad_begin[1],
        oh,
        ow,
    };
    let (th, tw) = (oh.div_ceil(OT), ow.div_ceil(OT));
    let tile_rows = n * th;
    let chunk_rows = (CHUNK_BYTES / row_bytes(c, m, tw)).clamp(1, tile_rows);
    let max_tiles = chunk_rows * tw;
    let mut v = crate::buffers::take_f32(max_tiles * XI * c);
    let mut mm = crate::buffers::take_f32(XI * max_tiles * m);
    let yp = super::SharedOut(y.as_mut_ptr());
    let mut r0 = 0;
    while r0 < tile_rows {
        let rows = chunk_rows.min(tile_rows - r0);
        let tiles = rows * tw;
        // 1. Input transform: V as [tile][xi][c], one task per tile row.
        v[..tiles * XI * c]
            .par_chunks_mut(tw * XI * c)
            .enumerate()
            .for_each(|(i, vrow)| {
                let (ni, ty) = ((r0 + i) / th, (r0 + i) % th);
                let xs = &x[ni * c * geo.in_n..][..c * geo.in_n];
                SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    // SAFETY: AVX-512F was checked above; `vrow` holds this
                    // tile row's `tw` tiles of 36 x c values.
                    unsafe { input_row(&g, ty, tw, c, geo.in_n, xs, vrow, &mut s) }
                })
            });
        // 2. The 36 products, M as [xi][tile][m].
        let vs = &v[..tiles * XI * c];
        mm[..XI * tiles * m]
            .par_chunks_mut(tiles * m)
            .enumerate()
            .for_each(|(xi, mx)| {
                let a = MatRef::new(&vs[xi * c..], tiles, c, XI * c, 1);
                sgemm(
                    1.0,
                    Lhs::Mat(a),
                    Rhs::Packed(&wts.panels[xi]),
                    0.0,
                    mx,
                    m,
                    None,
                );
            });
        // 3. Output transform, one task per (tile row, 16 output channels).
        let ms = &mm[..XI * tiles * m];
        let blocks = m.div_ceil(LANES);
        (0..rows * blocks).into_par_iter().for_each(|t| {
            let (i, kb) = (t / blocks, t % blocks);
            let (ni, ty) = ((r0 + i) / th, (r0 + i) % th);
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                // SAFETY: AVX-512F was checked above; this task writes only
                // output rows 4ty.. of channels 16kb.. of image ni, which no
                // other task of this loop writes; Y holds n * m * out_n.
                unsafe {
                    output_row(
                        &g,
                        epi,
                        (ni, ty, kb * LANES),
                        (i * tw, tiles, tw),
                        m,
                        ms,
                        yp.get(),
                        &mut s,
                    )
                }
            })
        });
        r0 += rows;
    }
    crate::buffers::recycle(v);
    crate::buffers::recycle(mm);
    Ok(())
}

thread_local! {
    /// Per-thread input band or output rows, kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The 64-byte aligned start of a scratch of at least `len` floats.
fn aligned(scratch: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if scratch.len() < len + LANES {
        scratch.resize(len + LANES, 0.0);
    }
    let skew = scratch.as_ptr().align_offset(64).min(LANES);
    &mut scratch[skew..skew + len]
}

/// `B^T d` for one column of six vectors: [`BT`] spelled out with shared
/// terms (`a = d1 - d3`, `b = d4 - d2`). The tests check it against the
/// table.
#[target_feature(enable = "avx512f")]
#[inline]
fn bt6(d: &[std::arch::x86_64::__m512; IT]) -> [std::arch::x86_64::__m512; IT] {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let a = _mm512_sub_ps(d[1], d[3]);
    let b = _mm512_sub_ps(d[4], d[2]);
    [
        // d0 + d4 + 1.5 a - 2 d2
        _mm512_fnmadd_ps(
            c(2.0),
            d[2],
            _mm512_fmadd_ps(c(1.5), a, _mm512_add_ps(d[0], d[4])),
        ),
        // d4 - d1 - 2.5 d2 - 0.5 d3
        _mm512_fnmadd_ps(
            c(0.5),
            d[3],
            _mm512_fnmadd_ps(c(2.5), d[2], _mm512_sub_ps(d[4], d[1])),
        ),
        // d4 + d1 + 0.5 d2 - 2.5 d3
        _mm512_fnmadd_ps(
            c(2.5),
            d[3],
            _mm512_fmadd_ps(c(0.5), d[2], _mm512_add_ps(d[4], d[1])),
        ),
        // b - 0.5 a
        _mm512_fnmadd_ps(c(0.5), a, b),
        // b + 2 a
        _mm512_fmadd_ps(c(2.0), a, b),
        // d1 + d5 + 1.5 (d2 - d4) - 2 d3
        _mm512_fnmadd_ps(
            c(2.0),
            d[3],
            _mm512_fmadd_ps(c(1.5), _mm512_sub_ps(d[2], d[4]), _mm512_add_ps(d[1], d[5])),
        ),
    ]
}

/// `A^T m` for one column of six vectors: [`AT`] spelled out.
#[target_feature(enable = "avx512f")]
#[inline]
fn at6(m: &[std::arch::x86_64::__m512; IT]) -> [std::arch::x86_64::__m512; OT] {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let s12 = _mm512_add_ps(m[1], m[2]);
    let d12 = _mm512_sub_ps(m[1], m[2]);
    [
        _mm512_add_ps(_mm512_add_ps(m[0], s12), _mm512_add_ps(m[3], m[4])),
        _mm512_fnmadd_ps(c(0.5), m[4], _mm512_fmadd_ps(c(2.0), m[3], d12)),
        _mm512_fmadd_ps(c(0.25), m[4], _mm512_fmadd_ps(c(4.0), m[3], s12)),
        _mm512_add_ps(
            _mm512_fnmadd_ps(c(0.125), m[4], _mm512_fmadd_ps(c(8.0), m[3], d12)),
            m[5],
        ),
    ]
}

/// The input transform of tile row `ty` of one image (`xs`: its `c` planes
/// of `in_n` floats) into `vrow` (`[tw][36][c]`).
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_row(
    g: &Plane2d,
    ty: usize,
    tw: usize,
    c: usize,
    in_n: usize,
    xs: &[f32],
    vrow: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let cols = OT * tw + 2;
    assert!(vrow.len() >= tw * XI * c);
    let band = aligned(scratch, IT * cols * LANES);
    let mut c0 = 0;
    while c0 < c {
        let nch = LANES.min(c - c0);
        let mask: __mmask16 = if nch == LANES { !0 } else { (1u16 << nch) - 1 };
        // Padded input rows 4ty .. 4ty + 6, every column, 16 channels.
        pack_band(g, OT * ty, IT, cols, &xs[c0 * in_n..], in_n, nch, band);
        let bp = band.as_ptr();
        for tx in 0..tw {
            // B^T d per column, then (B^T d) B per row.
            let mut cols_t = [[_mm512_setzero_ps(); IT]; IT];
            for (j, col) in cols_t.iter_mut().enumerate() {
                let mut d = [_mm512_setzero_ps(); IT];
                for (r, dr) in d.iter_mut().enumerate() {
                    *dr = _mm512_load_ps(bp.add((r * cols + OT * tx + j) * LANES));
                }
                *col = bt6(&d);
            }
            let vt = vrow.as_mut_ptr().add(tx * XI * c + c0);
            for i in 0..IT {
                let mut row = [_mm512_setzero_ps(); IT];
                for (j, rj) in row.iter_mut().enumerate() {
                    *rj = cols_t[j][i];
                }
                for (j, vij) in bt6(&row).iter().enumerate() {
                    _mm512_mask_storeu_ps(vt.add((i * IT + j) * c), mask, *vij);
                }
            }
        }
        c0 += LANES;
    }
}

/// The output transform of tile row `ty` of image `ni` for output channels
/// `k0..k0 + 16` (fewer at the end): reads M (`[36][tiles][m]`, this row's
/// tiles from `t0`), writes those channels' output rows `4ty..` of Y at `y`
/// with the epilogue applied.
///
/// # Safety
/// The CPU must have AVX-512F; `y` must point to the conv's whole output
/// (`[N, m, oh, ow]`), of which no other thread writes these rows.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_row(
    g: &Plane2d,
    epi: &Epi<'_>,
    (ni, ty, k0): (usize, usize, usize),
    (t0, tiles, tw): (usize, usize, usize),
    m: usize,
    ms: &[f32],
    y: *mut f32,
    scratch: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let nk = LANES.min(m - k0);
    let mask: __mmask16 = if nk == LANES { !0 } else { (1u16 << nk) - 1 };
    let (oh, ow) = (g.oh, g.ow);
    let width = OT * tw;
    assert!(ms.len() >= XI * tiles * m && t0 + tw <= tiles);
    // Bias and Relu/Clip in registers; a residual or other activation after.
    let ((lo, hi), rest) = epi.in_registers();
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let bias = match epi.bias {
        Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(k0)),
        None => _mm512_setzero_ps(),
    };
    // Output rows of the 16 channels: [lane][4 rows][width].
    let obuf = aligned(scratch, LANES * OT * width);
    let op = obuf.as_mut_ptr();
    for tx in 0..tw {
        let src = ms.as_ptr().add((t0 + tx) * m + k0);
        // A^T m per column, then (A^T m) A per row.
        let mut cols_t = [[_mm512_setzero_ps(); OT]; IT];
        for (j, col) in cols_t.iter_mut().enumerate() {
            let mut mv = [_mm512_setzero_ps(); IT];
            for (i, mi) in mv.iter_mut().enumerate() {
                *mi = _mm512_maskz_loadu_ps(mask, src.add((i * IT + j) * tiles * m));
            }
            *col = at6(&mv);
        }
        let mut o = [_mm512_setzero_ps(); LANES];
        for r in 0..OT {
            let mut row = [_mm512_setzero_ps(); IT];
            for (j, rj) in row.iter_mut().enumerate() {
                *rj = cols_t[j][r];
            }
            for (cc, v) in at6(&row).iter().enumerate() {
                // x86 min/max return the second operand on NaN: v goes second.
                let v = _mm512_add_ps(*v, bias);
                o[r * OT + cc] = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
            }
        }
        // o[pos] lane l -> o[l] lane pos: one channel's 4x4 tile per vector.
        transpose16(&mut o);
        for (l, ol) in o.iter().enumerate().take(nk) {
            let dst = op.add(l * OT * width + OT * tx);
            _mm_store_ps(dst, _mm512_extractf32x4_ps::<0>(*ol));
            _mm_store_ps(dst.add(width), _mm512_extractf32x4_ps::<1>(*ol));
            _mm_store_ps(dst.add(2 * width), _mm512_extractf32x4_ps::<2>(*ol));
            _mm_store_ps(dst.add(3 * width), _mm512_extractf32x4_ps::<3>(*ol));
        }
    }
    for l in 0..nk {
        for r in 0..OT.min(oh - OT * ty) {
            let oy = OT * ty + r;
            let src = std::slice::from_raw_parts(op.add((l * OT + r) * width), ow);
            let dst = std::slice::from_raw_parts_mut(y.add(((ni * m + k0 + l) * oh + oy) * ow), ow);
            dst.copy_from_slice(src);
            if let Some(rest) = &rest {
                rest.apply(ni, k0 + l, oy * ow, dst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::{conv_f32, conv_geometry, ConvPack, ConvWeights};
    use super::*;
    use crate::nn::test_util::*;
    use kiln_ir::{AutoPad, ConvAttrs, FusedAct};

    fn attrs(auto_pad: AutoPad, pads: &[usize]) -> ConvAttrs {
        ConvAttrs {
            auto_pad,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![3, 3],
            pads: pads.to_vec(),
            strides: vec![1, 1],
        }
    }

    /// Largest `|got - want|` over the RMS of `scale` (floating-point error
    /// scales with the magnitudes summed, not with each output's own size;
    /// `scale` is the conv's output before the activation).
    fn error_vs_rms(got: &[f32], want: &[f32], scale: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let rms = (scale.iter().map(|v| v * v).sum::<f32>() / scale.len().max(1) as f32).sqrt();
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| {
                if g.is_nan() && w.is_nan() {
                    0.0
                } else {
                    (g - w).abs()
                }
            })
            .fold(0.0, f32::max);
        worst / rms.max(f32::MIN_POSITIVE)
    }

    /// The tables are an exact F(4, 3): in f64, `A^T [(G g) ⊙ (B^T d)]`
    /// is the 1-D correlation of d (6 values) with g (3 taps).
    #[test]
    fn transform_tables_are_exact() {
        let mut rng = Rng::new(93);
        for _ in 0..20 {
            let d: Vec<f64> = rng.vec(IT).into_iter().map(f64::from).collect();
            let g: Vec<f64> = rng.vec(3).into_iter().map(f64::from).collect();
            let gg: Vec<f64> = G
                .iter()
                .map(|r| (0..3).map(|k| r[k] * g[k]).sum())
                .collect();
            let bd: Vec<f64> = BT
                .iter()
                .map(|r| (0..IT).map(|k| r[k] as f64 * d[k]).sum())
                .collect();
            for (i, a) in AT.iter().enumerate() {
                let y: f64 = (0..IT).map(|k| a[k] as f64 * gg[k] * bd[k]).sum();
                let want: f64 = (0..3).map(|k| d[i + k] * g[k]).sum();
                assert!((y - want).abs() < 1e-12, "output {i}: {y} vs {want}");
            }
        }
    }

    /// The spelled-out `bt6` / `at6` compute the tables' products.
    #[test]
    fn spelled_out_transforms_match_the_tables() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        let mut rng = Rng::new(94);
        let vals: Vec<f32> = rng.vec(IT * LANES);
        // SAFETY: AVX-512F was detected above; every load and store covers
        // 16 floats inside `vals` / `out`.
        let (bt, at) = unsafe {
            let v: [__m512; IT] =
                std::array::from_fn(|k| _mm512_loadu_ps(vals.as_ptr().add(k * LANES)));
            let mut bt = [[0f32; LANES]; IT];
            for (o, r) in bt.iter_mut().zip(bt6(&v)) {
                _mm512_storeu_ps(o.as_mut_ptr(), r);
            }
            let mut at = [[0f32; LANES]; OT];
            for (o, r) in at.iter_mut().zip(at6(&v)) {
                _mm512_storeu_ps(o.as_mut_ptr(), r);
            }
            (bt, at)
        };
        for l in 0..LANES {
            let x = |k: usize| vals[k * LANES + l] as f64;
            for (i, row) in BT.iter().enumerate() {
                let want: f64 = (0..IT).map(|k| row[k] as f64 * x(k)).sum();
                assert!(
                    (bt[i][l] as f64 - want).abs() < 1e-5,
                    "B^T row {i} lane {l}"
                );
            }
            for (i, row) in AT.iter().enumerate() {
                let want: f64 = (0..IT).map(|k| row[k] as f64 * x(k)).sum();
                assert!(
                    (at[i][l] as f64 - want).abs() < 1e-5,
                    "A^T row {i} lane {l}"
                );
            }
        }
    }

    /// Winograd against the reference conv computed in f64, with every
    /// epilogue form, on shapes with channel tails (not multiples of 16),
    /// planes that are not multiples of the 4x4 tile, asymmetric and auto
    /// pads, 1x1 outputs, batches, and enough tile rows for several chunks
    /// (a chunk boundary inside an image).
    #[test]
    fn winograd_matches_reference() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(91);
        // (N, C, M, H, W, auto_pad, pads [top, left, bottom, right])
        let cases = [
            (1, 16, 16, 14, 14, AutoPad::NotSet, [1, 1, 1, 1]),
            (2, 17, 33, 13, 9, AutoPad::NotSet, [1, 1, 1, 1]),
            (1, 40, 20, 8, 8, AutoPad::NotSet, [0, 0, 0, 0]),
            (1, 16, 24, 5, 7, AutoPad::NotSet, [0, 2, 1, 0]),
            (3, 24, 16, 3, 3, AutoPad::NotSet, [1, 1, 1, 1]),
            (1, 20, 18, 1, 1, AutoPad::NotSet, [1, 1, 1, 1]),
            (1, 16, 17, 6, 11, AutoPad::SameUpper, [0, 0, 0, 0]),
            (1, 18, 16, 9, 6, AutoPad::NotSet, [3, 0, 2, 4]),
            (2, 96, 100, 40, 40, AutoPad::NotSet, [1, 1, 1, 1]),
        ];
        for (case, &(n, c, m, h, w, auto_pad, pads)) in cases.iter().enumerate() {
            let a = attrs(
                auto_pad,
                if auto_pad == AutoPad::NotSet {
                    &pads
                } else {
                    &[]
                },
            );
            let x = t(&[n, c, h, w], rng.vec(n * c * h * w));
            let wt = t(&[m, c, 3, 3], rng.vec(m * c * 9));
            let bias = t(&[m], rng.vec(m));
            let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
            if case == cases.len() - 1 {
                let (th, tw) = (geo.win.out[0].div_ceil(OT), geo.win.out[1].div_ceil(OT));
                let per_chunk = CHUNK_BYTES / row_bytes(c, m, tw);
                assert!(
                    n * th > per_chunk && th % per_chunk != 0,
                    "the last case must span chunks with a boundary inside an image"
                );
            }
            let plain = conv_reference_f64(&a, &x, &wt, &bias);
            let res = t(&geo.out_shape, rng.vec(plain.len()));
            let packed = ConvPack::Winograd(WinogradWeights::new(&f32s(&wt), m, c));
            let w = ConvWeights::Packed(&packed);
            check_epilogues(
                &a,
                &x,
                wt.shape(),
                w,
                &bias,
                &plain,
                &res,
                |act, with_res, got, want| {
                    let err = error_vs_rms(got, want, &plain);
                    // F(4x4, 3x3) sums 36 transformed terms per channel that
                    // partly cancel: measured up to 1.5e-5 of the output's RMS
                    // here (the direct f32 conv: about 1e-6).
                    assert!(
                        err <= 3e-5,
                        "case {case} {act:?} residual {with_res}: error {err:e} of the RMS"
                    );
                },
            );
        }
    }

    /// A conv whose geometry the weights were not made for is an error.
    #[test]
    fn winograd_weights_reject_another_geometry() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(92);
        let wt = t(&[16, 16, 3, 3], rng.vec(16 * 16 * 9));
        let packed = ConvPack::Winograd(WinogradWeights::new(&f32s(&wt), 16, 16));
        let x = t(&[1, 16, 8, 8], rng.vec(16 * 64));
        let strided = ConvAttrs {
            strides: vec![2, 2],
            ..attrs(AutoPad::NotSet, &[1, 1, 1, 1])
        };
        let e = conv_f32(
            &strided,
            &x,
            wt.shape(),
            ConvWeights::Packed(&packed),
            None,
            None,
            FusedAct::Identity,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Winograd"), "{e}");
    }

    /// Plan-time routing: the shapes ResNet-50's stride-1 3x3 convs have on
    /// 56x56 to 14x14 planes take Winograd; 7x7 planes, strides, groups,
    /// dilation, other kernels, few channels and unknown planes do not.
    #[test]
    fn winograd_routing() {
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let hw = |s: usize| Some((s, s));
        assert_eq!(
            applies(&[64, 64, 3, 3], 1, &[1, 1], &[1, 1], hw(56)),
            avx512
        );
        assert_eq!(applies(&[256, 256, 3, 3], 1, &[], &[], hw(14)), avx512);
        assert!(!applies(&[512, 512, 3, 3], 1, &[1, 1], &[], hw(7)));
        assert!(!applies(&[64, 64, 3, 3], 1, &[2, 2], &[], hw(28)));
        assert!(!applies(&[64, 32, 3, 3], 2, &[], &[], hw(28)));
        assert!(!applies(&[64, 64, 3, 3], 1, &[], &[2, 2], hw(28)));
        assert!(!applies(&[64, 64, 5, 5], 1, &[], &[], hw(28)));
        assert!(!applies(&[64, 8, 3, 3], 1, &[], &[], hw(28)));
        assert!(!applies(&[64, 64, 3, 3], 1, &[], &[], None));
        // Tile rows too big for their scratch: 4K-wide, 512 channels.
        assert!(!applies(&[512, 512, 3, 3], 1, &[], &[], Some((64, 4096))));
    }
}
