//! Conv (im2col + GEMM per group, direct path when each output channel reads a
//! single input channel) and ConvTranspose (GEMM + col2im), N-D.

use super::conv_phases::PhaseSplit;
use super::matmul::transpose;
use super::{float_prec, float_tensor, gemm_acc, numel, values, Prec, Real};
use crate::{invalid, Result};
use kiln_gemm::{
    sgemm, sgemm_fused, Finish, Gather, GatherTable, Lhs, MatRef, PackedA, PackedB, Panels,
    Residual, Rhs, GATHER_ZEROS,
};
use kiln_ir::{AutoPad, ConvAttrs, ConvTransposeAttrs, DType, FusedAct, Tensor};
use rayon::prelude::*;

/// Resolved per-axis geometry of a sliding window (Conv and the pools).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub out: Vec<usize>,
}

/// An attribute list that is either empty (every axis `default`) or has one
/// entry per spatial axis; zero entries are rejected when `positive`.
fn per_axis(
    op: &str,
    name: &str,
    v: &[usize],
    nsp: usize,
    default: usize,
    positive: bool,
) -> Result<Vec<usize>> {
    if v.is_empty() {
        return Ok(vec![default; nsp]);
    }
    if v.len() != nsp {
        return Err(invalid!(
            "{op}: {name} has {} values {v:?}, expected {nsp} (one per spatial axis)",
            v.len()
        ));
    }
    if positive && v.contains(&0) {
        return Err(invalid!("{op}: {name} {v:?} must be positive"));
    }
    Ok(v.to_vec())
}

/// Output size and pads of every spatial axis, per the ONNX Conv/pool rules.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resolve_window(
    op: &str,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: &[usize],
    auto_pad: AutoPad,
    ceil_mode: bool,
) -> Result<Window> {
    let nsp = input.len();
    let kernel = per_axis(op, "kernel_shape", kernel, nsp, 1, true)?;
    let strides = per_axis(op, "strides", strides, nsp, 1, true)?;
    let dilations = per_axis(op, "dilations", dilations, nsp, 1, true)?;
    let pads = if pads.is_empty() {
        vec![0; 2 * nsp]
    } else if pads.len() == 2 * nsp {
        pads.to_vec()
    } else {
        return Err(invalid!(
            "{op}: pads has {} values {pads:?}, expected {} (begin and end per spatial axis)",
            pads.len(),
            2 * nsp
        ));
    };
    let mut w = Window {
        kernel,
        strides,
        dilations,
        pad_begin: vec![0; nsp],
        pad_end: vec![0; nsp],
        out: vec![0; nsp],
    };
    for a in 0..nsp {
        let (inp, s) = (input[a], w.strides[a]);
        let dk = (w.kernel[a] - 1)
            .saturating_mul(w.dilations[a])
            .saturating_add(1);
        match auto_pad {
            AutoPad::NotSet => {
                let (pb, pe) = (pads[a], pads[nsp + a]);
                let padded = inp.saturating_add(pb).saturating_add(pe);
                if padded < dk {
                    return Err(invalid!(
                        "{op}: spatial axis {a} has size {inp} (+ pads {pb}+{pe}), smaller than the dilated kernel extent {dk}"
                    ));
                }
                let span = padded - dk;
                let mut out = if ceil_mode {
                    span.div_ceil(s)
                } else {
                    span / s
                } + 1;
                // A last window that would start inside the right padding is dropped.
                if ceil_mode && (out - 1) * s >= inp + pb {
                    out -= 1;
                }
                w.out[a] = out;
                w.pad_begin[a] = pb;
                w.pad_end[a] = pe;
            }
            AutoPad::Valid => {
                if inp < dk {
                    return Err(invalid!(
                        "{op}: spatial axis {a} has size {inp}, smaller than the dilated kernel extent {dk} (auto_pad VALID)"
                    ));
                }
                w.out[a] = (inp - dk) / s + 1;
            }
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = inp.div_ceil(s);
                let total = out
                    .saturating_sub(1)
                    .saturating_mul(s)
                    .saturating_add(dk)
                    .saturating_sub(inp);
                let small = total / 2;
                let (pb, pe) = if auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                w.out[a] = out;
                w.pad_begin[a] = pb;
                w.pad_end[a] = pe;
            }
        }
    }
    Ok(w)
}

/// The range `[lo, hi)` of positions `p < p_len` whose target `p*stride + off`
/// lies in `[0, q_len)`.
pub(crate) fn valid_range(p_len: usize, stride: usize, off: isize, q_len: usize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let lim = q_len as isize - off;
    let hi = if lim <= 0 { 0 } else { (lim + s - 1) / s };
    let hi = (hi as usize).min(p_len);
    let lo = (lo as usize).min(hi);
    (lo, hi)
}

/// Visits every row (all spatial axes but the last) of a "p" grid whose mapped
/// "q" row (`q = p*stride + off` on each of those axes) is in bounds, calling
/// `f(p_row_start, q_row_start)` with flat offsets of the rows' first elements.
fn for_each_row(
    p_shape: &[usize],
    q_shape: &[usize],
    strides: &[usize],
    offs: &[isize],
    mut f: impl FnMut(usize, usize),
) {
    let nd = p_shape.len();
    if nd == 0 || p_shape.contains(&0) {
        return;
    }
    let outer = nd - 1;
    let (p_last, q_last) = (p_shape[outer], q_shape[outer]);
    let mut idx = vec![0usize; outer];
    loop {
        let mut prow = 0;
        let mut qrow = 0;
        let mut ok = true;
        for a in 0..outer {
            prow = prow * p_shape[a] + idx[a];
            let q = idx[a] as isize * strides[a] as isize + offs[a];
            if q < 0 || q >= q_shape[a] as isize {
                ok = false;
                break;
            }
            qrow = qrow * q_shape[a] + q as usize;
        }
        if ok {
            f(prow * p_last, qrow * q_last);
        }
        let mut a = outer;
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < p_shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// Advances a multi-index over `shape` (row-major); false after the last one.
fn next_index(idx: &mut [usize], shape: &[usize]) -> bool {
    for a in (0..idx.len()).rev() {
        idx[a] += 1;
        if idx[a] < shape[a] {
            return true;
        }
        idx[a] = 0;
    }
    false
}

/// Per-axis offsets `tap*dilation - pad_begin` of one kernel tap.
fn tap_offsets(tap: &[usize], dil: &[usize], pad_begin: &[isize]) -> Vec<isize> {
    tap.iter()
        .zip(dil)
        .zip(pad_begin)
        .map(|((&t, &d), &p)| (t * d) as isize - p)
        .collect()
}

/// Conv. X `[N, C, D1..Dn]`, W `[M, C/group, k1..kn]`, B `[M]`.
///
/// All-f32 inputs take the fast kernels ([`conv_f32`]); other float dtypes
/// (and mixed ones) the plain reference ([`conv_reference`]).
pub fn conv(a: &ConvAttrs, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let f32_only = |t: &Tensor| t.dtype() == DType::F32;
    if f32_only(x) && f32_only(w) && b.is_none_or(f32_only) {
        return conv_f32(
            a,
            x,
            w.shape(),
            ConvWeights::Raw(w),
            b,
            None,
            FusedAct::Identity,
        );
    }
    conv_reference(a, x, w, b)
}

/// The plain Conv every fast path is tested against: im2col + the blocked
/// `gemm_acc` core, computed in f32 (f16/bf16/f32) or f64.
pub(crate) fn conv_reference(
    a: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    match float_prec(x, "Conv")? {
        Prec::F32 => conv_impl::<f32>(a, x, w, b),
        Prec::F64 => conv_impl::<f64>(a, x, w, b),
    }
}

/// The validated geometry of one Conv: batch, channels, groups and the
/// resolved sliding window. Shared by the reference and the fast kernels.
#[derive(Clone, Debug)]
pub(crate) struct ConvGeometry {
    pub n: usize,
    pub c: usize,
    pub m: usize,
    pub group: usize,
    /// Input channels per group.
    pub cg: usize,
    /// Output channels per group.
    pub mg: usize,
    pub in_sp: Vec<usize>,
    pub kshape: Vec<usize>,
    pub win: Window,
    pub out_shape: Vec<usize>,
    pub in_n: usize,
    pub out_n: usize,
    pub kn: usize,
}

/// Checks X and W shapes against the Conv attributes and resolves the window.
pub(crate) fn conv_geometry(a: &ConvAttrs, xs: &[usize], ws: &[usize]) -> Result<ConvGeometry> {
    if xs.len() < 3 {
        return Err(invalid!(
            "Conv expects X of rank >= 3 [N, C, spatial...], got {xs:?}"
        ));
    }
    if ws.len() != xs.len() {
        return Err(invalid!(
            "Conv: W {ws:?} must have the same rank as X {xs:?}"
        ));
    }
    let group = a.group;
    if group == 0 {
        return Err(invalid!("Conv: group must be >= 1, got 0"));
    }
    let (n, c) = (xs[0], xs[1]);
    let (m, cg) = (ws[0], ws[1]);
    if cg * group != c {
        return Err(invalid!(
            "Conv: X {xs:?} has {c} channels but W {ws:?} with group {group} expects {} (W.shape[1] * group)",
            cg * group
        ));
    }
    if m % group != 0 {
        return Err(invalid!(
            "Conv: W {ws:?} has {m} output channels, not divisible by group {group}"
        ));
    }
    let kshape = &ws[2..];
    if !a.kernel_shape.is_empty() && a.kernel_shape != kshape {
        return Err(invalid!(
            "Conv: kernel_shape {:?} does not match W {ws:?}",
            a.kernel_shape
        ));
    }
    let in_sp = &xs[2..];
    let win = resolve_window(
        "Conv",
        in_sp,
        kshape,
        &a.strides,
        &a.dilations,
        &a.pads,
        a.auto_pad,
        false,
    )?;
    let mut out_shape = vec![n, m];
    out_shape.extend_from_slice(&win.out);
    numel(&out_shape)?;
    Ok(ConvGeometry {
        n,
        c,
        m,
        group,
        cg,
        mg: m / group,
        in_sp: in_sp.to_vec(),
        kshape: kshape.to_vec(),
        out_n: numel(&win.out)?,
        in_n: numel(in_sp)?,
        kn: numel(kshape)?,
        win,
        out_shape,
    })
}

fn conv_impl<T: Real>(a: &ConvAttrs, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let geo = conv_geometry(a, x.shape(), w.shape())?;
    let (n, c, m, group, cg) = (geo.n, geo.c, geo.m, geo.group, geo.cg);
    let (in_sp, kshape, win) = (&geo.in_sp[..], &geo.kshape[..], &geo.win);
    let bias = match b {
        Some(b) => {
            if b.shape() != [m] {
                return Err(invalid!(
                    "Conv: bias B must have shape [{m}], got {:?}",
                    b.shape()
                ));
            }
            Some(values::<T>(b, "Conv B")?)
        }
        None => None,
    };
    let out_shape = geo.out_shape.clone();
    let (out_n, in_n, kn) = (geo.out_n, geo.in_n, geo.kn);
    let mut y = vec![T::ZERO; numel(&out_shape)?];
    if let Some(bias) = &bias {
        for (i, plane) in y.chunks_exact_mut(out_n.max(1)).enumerate() {
            plane.fill(bias[i % m]);
        }
    }
    if y.is_empty() || kn == 0 || cg == 0 {
        return float_tensor(out_shape, y, x.dtype());
    }
    let xv = values::<T>(x, "Conv X")?;
    let wv = values::<T>(w, "Conv W")?;
    let mg = m / group;
    let nsp = in_sp.len();
    let pb: Vec<isize> = win.pad_begin.iter().map(|&p| p as isize).collect();
    let last = nsp - 1;
    let (s_last, out_last) = (win.strides[last], win.out[last]);

    // Every kernel tap with its per-axis offsets.
    let mut taps = Vec::with_capacity(kn);
    let mut tap = vec![0usize; nsp];
    loop {
        taps.push(tap_offsets(&tap, &win.dilations, &pb));
        if !next_index(&mut tap, kshape) {
            break;
        }
    }

    if cg == 1 {
        // Direct path (depthwise and channel multipliers): each output channel
        // reads one input channel; accumulate tap by tap.
        for ni in 0..n {
            for mi in 0..m {
                let gi = mi / mg;
                let plane = &xv[(ni * c + gi) * in_n..][..in_n];
                let yo = (ni * m + mi) * out_n;
                let yplane = &mut y[yo..yo + out_n];
                let wrow = &wv[mi * kn..(mi + 1) * kn];
                for (offs, &wt) in taps.iter().zip(wrow) {
                    let off = offs[last];
                    let (lo, hi) = valid_range(out_last, s_last, off, in_sp[last]);
                    if lo >= hi {
                        continue;
                    }
                    for_each_row(&win.out, in_sp, &win.strides, offs, |orow, irow| {
                        let dst = &mut yplane[orow + lo..orow + hi];
                        let src0 = (irow as isize + lo as isize * s_last as isize + off) as usize;
                        if s_last == 1 {
                            let src = &plane[src0..src0 + (hi - lo)];
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d += wt * s;
                            }
                        } else {
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d += wt * plane[src0 + j * s_last];
                            }
                        }
                    });
                }
            }
        }
        return float_tensor(out_shape, y, x.dtype());
    }

    let pointwise = win.kernel.iter().all(|&k| k == 1)
        && win.strides.iter().all(|&s| s == 1)
        && pb.iter().all(|&p| p == 0)
        && win.out == in_sp;
    let rows = cg * kn;
    let mut col: Vec<T> = if pointwise {
        Vec::new()
    } else {
        vec![T::ZERO; rows * out_n]
    };
    for ni in 0..n {
        for gi in 0..group {
            let xg = &xv[(ni * c + gi * cg) * in_n..][..cg * in_n];
            let bmat: &[T] = if pointwise {
                xg
            } else {
                // im2col: row (ci, tap) holds the input seen by that tap at every
                // output position (zeros where it falls in the padding; those
                // cells are the same for every (n, g), so they stay zero).
                for ci in 0..cg {
                    let plane = &xg[ci * in_n..(ci + 1) * in_n];
                    for (ti, offs) in taps.iter().enumerate() {
                        let row = &mut col[(ci * kn + ti) * out_n..][..out_n];
                        let off = offs[last];
                        let (lo, hi) = valid_range(out_last, s_last, off, in_sp[last]);
                        if lo >= hi {
                            continue;
                        }
                        for_each_row(&win.out, in_sp, &win.strides, offs, |orow, irow| {
                            let dst = &mut row[orow + lo..orow + hi];
                            let src0 =
                                (irow as isize + lo as isize * s_last as isize + off) as usize;
                            if s_last == 1 {
                                dst.copy_from_slice(&plane[src0..src0 + (hi - lo)]);
                            } else {
                                for (j, d) in dst.iter_mut().enumerate() {
                                    *d = plane[src0 + j * s_last];
                                }
                            }
                        });
                    }
                }
                &col
            };
            let wg = &wv[gi * mg * rows..(gi + 1) * mg * rows];
            let yg = &mut y[(ni * m + gi * mg) * out_n..][..mg * out_n];
            gemm_acc(mg, rows, out_n, wg, bmat, yg);
        }
    }
    float_tensor(out_shape, y, x.dtype())
}

// ---------------------------------------------------------------------------
// Fast f32 Conv: strategy per node by shape.
//
// * depthwise / channel-multiplier 1-D and 2-D convs (one input channel per
//   output channel): the direct kernel in `depthwise.rs`;
// * pointwise (1x1, stride 1, no pads): `Y_g[Mg, HW] = W_g[Mg, Cg] x X_g[Cg, HW]`
//   straight on X as a strided view, no copy;
// * everything else: im2col into an L2-sized tile of output rows, then one
//   sgemm per tile with W as the left operand.
// Bias, residual and activation run in the GEMM epilogue, while each finished
// piece of Y is hot.
// ---------------------------------------------------------------------------

/// The weights of a fast f32 Conv: the W tensor as given, or W packed once
/// ahead of time for one of the two GEMM orientations ([`ConvPack`]).
#[derive(Clone, Copy)]
pub(crate) enum ConvWeights<'a> {
    Raw(&'a Tensor),
    Packed(&'a ConvPack),
}

/// W packed per group, in the orientation chosen for the node's output size.
///
/// * `Channels`: `Y_g[Mg, HW] = W_g[Mg, K] x im2col(X_g)[K, HW]`, W as the
///   packed left operand. Output channels are the GEMM rows and positions
///   its (wide) columns: right for big planes.
/// * `Positions`: `Y_g^T[N*HW, Mg] = im2col(X_g)^T[N*HW, K] x W_g^T[K, Mg]`,
///   W^T as the packed right operand. Every image's positions are GEMM rows,
///   so small planes (7x7, 14x14) and batches make one tall product instead
///   of many narrow ones whose last column panel is mostly padding.
///
/// * `Gathered`: the `Positions` product with X made channels-last first,
///   so im2col^T's row for an output position is one `Cg`-float segment of
///   that copy per tap ([`kiln_gemm::Gather`]): the GEMM reads the segments
///   where they lie, and nothing is packed or gathered element by element.
///   W^T's rows are in (tap, channel) order to match.
///
/// All are exact for any shape; the choice only affects speed.
///
/// * `Winograd` (x86-64, AVX-512; one group, 3x3, stride 1): W transformed
///   for Winograd F(4x4, 3x3) (see `winograd.rs`), where the 36 products
///   over channels replace the 3x3 conv's 144.
#[derive(Clone, Debug)]
pub(crate) enum ConvPack {
    Channels(Vec<PackedA>),
    Positions(Vec<PackedB>),
    Gathered(GatheredWeights),
    #[cfg(target_arch = "x86_64")]
    Winograd(super::winograd::WinogradWeights),
    /// W as it is (`[M, Cg, k...]`), for the direct kernels
    /// (`depthwise.rs`'s blocked one: few input channels, or many on
    /// stride-1 windows of 3 and more), which read it unpacked. Made for
    /// tuning (`tune.rs`), where they are one candidate among the GEMMs.
    Direct(Vec<f32>),
    /// W tap-major in blocks of output channels for the direct kernel with
    /// output channels in vector lanes (`conv_lanes.rs`; x86-64, AVX-512,
    /// one group): another tuning candidate.
    #[cfg(target_arch = "x86_64")]
    Lanes(super::conv_lanes::LanesWeights),
}

impl ConvPack {
    /// Which product the weights were packed for, in words.
    pub(crate) fn orientation(&self) -> &'static str {
        match self {
            ConvPack::Channels(_) => "for channel rows",
            ConvPack::Positions(_) => "for position rows",
            ConvPack::Gathered(_) => "for position rows gathered channels-last",
            #[cfg(target_arch = "x86_64")]
            ConvPack::Winograd(_) => "for Winograd F(4x4, 3x3)",
            ConvPack::Direct(_) => "unpacked for the direct kernel",
            #[cfg(target_arch = "x86_64")]
            ConvPack::Lanes(_) => "for the direct kernel with channels in lanes",
        }
    }

    /// The strategy's name, for the tuning cache (`tune.rs`).
    pub(crate) fn strategy(&self) -> &'static str {
        match self {
            ConvPack::Channels(_) => "channels",
            ConvPack::Positions(_) => "positions",
            ConvPack::Gathered(_) => "gathered",
            #[cfg(target_arch = "x86_64")]
            ConvPack::Winograd(_) => "winograd",
            ConvPack::Direct(_) => "direct",
            #[cfg(target_arch = "x86_64")]
            ConvPack::Lanes(_) => "lanes",
        }
    }

    /// W (`[M, Cg, k...]`, row-major) back from weights of one group (GEMM,
    /// direct or channels-in-lanes); None for Winograd, gathered (see
    /// [`ConvPack::unpack_with_shape`]) and several groups.
    pub(crate) fn unpack(&self) -> Option<Vec<f32>> {
        match self {
            ConvPack::Channels(p) if p.len() == 1 => Some(p[0].to_row_major()),
            ConvPack::Direct(w) => Some(w.clone()),
            #[cfg(target_arch = "x86_64")]
            ConvPack::Lanes(l) => Some(l.unpack()),
            ConvPack::Positions(p) if p.len() == 1 => {
                // Packed W^T: [K, M] back to [M, K].
                let (k, m) = (p[0].rows(), p[0].cols());
                let wt = p[0].to_row_major();
                let mut w = vec![0.0f32; m * k];
                for (kk, row) in wt.chunks_exact(m.max(1)).enumerate() {
                    for (mm, &v) in row.iter().enumerate() {
                        w[mm * k + kk] = v;
                    }
                }
                Some(w)
            }
            _ => None,
        }
    }

    /// [`ConvPack::unpack`] for `Gathered` weights of W shape `w_shape`
    /// (`[M, C, k...]`): W back from `W^T` in (tap, channel) row order.
    pub(crate) fn unpack_with_shape(&self, w_shape: &[usize]) -> Option<Vec<f32>> {
        let ConvPack::Gathered(g) = self else {
            return self.unpack();
        };
        let (m, c) = (*w_shape.first()?, *w_shape.get(1)?);
        let kn: usize = w_shape.iter().skip(2).product();
        let (k, cols) = (g.packed.rows(), g.packed.cols());
        if k != c * kn || cols != m {
            return None;
        }
        let wt = g.packed.to_row_major();
        let mut w = vec![0.0f32; m * k];
        for ci in 0..c {
            for t in 0..kn {
                let row = &wt[(t * c + ci) * m..][..m];
                for (mo, &v) in row.iter().enumerate() {
                    w[mo * k + ci * kn + t] = v;
                }
            }
        }
        Some(w)
    }

    /// The group count the weights were packed for; `None` for unpacked W,
    /// which serves any.
    fn groups(&self) -> Option<usize> {
        match self {
            ConvPack::Channels(p) => Some(p.len()),
            ConvPack::Positions(p) => Some(p.len()),
            ConvPack::Gathered(_) => Some(1),
            #[cfg(target_arch = "x86_64")]
            ConvPack::Winograd(_) => Some(1),
            ConvPack::Direct(_) => None,
            #[cfg(target_arch = "x86_64")]
            ConvPack::Lanes(_) => Some(1),
        }
    }
}

/// Largest operand (in f32 elements) one implicit-im2col GEMM packs at once;
/// bigger convolutions run as several GEMMs over column or image ranges.
const IM2COL_PACK_MAX: usize = 1 << 20;

/// True when a direct kernel (in `depthwise.rs`, reading W unpacked) runs
/// this conv instead of a GEMM: depthwise or channel multipliers (one input
/// channel per group, several groups, 1 or 2 spatial axes), or few input
/// channels per group (see `few_channel_applies`). Empty strides/dilations
/// mean 1s.
///
/// One input channel in one group (a waveform's first conv, a grayscale
/// stem) is a GEMM: there every output channel reads the same plane, which
/// the direct kernel would lay out again per output channel, and a wide
/// window of few outputs runs a tap loop per output vector (2 threads,
/// direct against GEMM: Silero VAD's STFT conv, 1 -> 258 channels of a
/// 256-tap window at stride 128 over 640 samples, 0.62 against 0.035 ms;
/// wav2vec2's 1 -> 512, 10 taps at stride 5 over 16000 samples, 2.68
/// against 0.24 ms; 3x3 stride 2 on 224x224 0.10 against 0.074; 1 -> 32
/// 3x3 on 28x28 and 7x7 stride 2 on 224x224 the same).
pub(crate) fn uses_direct_kernel(
    group: usize,
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> bool {
    (cg == 1 && group > 1 && kernel.len() <= 2)
        || super::depthwise::few_channel_applies(cg, kernel, strides, dilations)
}

/// Whether a direct kernel can run a conv with `cg` input channels per
/// group and this window at all, whatever its plane width or groups (the
/// candidates `tune.rs` times): one input channel per group (also in one
/// group, which [`uses_direct_kernel`] leaves to the GEMM), few channels,
/// or many on a window of 3 and more at stride 1 or 2 on AVX-512.
pub(crate) fn direct_possible(
    cg: usize,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> bool {
    (cg == 1 && kernel.len() <= 2)
        || super::depthwise::few_channel_applies(cg, kernel, strides, dilations)
        || super::depthwise::many_channel_possible(cg, kernel, strides, dilations)
}

/// True when a Conv whose output planes have `out_n` positions is faster as
/// the `Positions` product (see [`ConvPack`]), with `mg` output channels per
/// group and `k` = `Cg * k1 * ... * kn` (the GEMM's depth).
///
/// `Positions` wins on tile occupancy for small planes: measured on AVX-512
/// (6x64 tiles), a 3x3 conv on 7x7 (14x14) planes runs about 1.4x (1.1x)
/// faster. But it packs im2col as narrow 6-row A panels and transposes its
/// result into Y, which costs more per element than the `Channels` way; that
/// only pays off when each packed element feeds enough work (deep and wide
/// convs). Shallow ones (MobileNet's 1x1 expand/project at 14x14: k 64-384)
/// measured 20-40% slower that way, so they stay `Channels`. So do
/// `pointwise` convs (1x1, stride 1, no padding) whose X the GEMM reads in
/// place, packing nothing: MobileNetV2's 960 -> 160 on 7x7 planes, 0.064 ->
/// 0.045 ms on 2 threads, where the `Positions` product's three passes
/// (pack, multiply, transpose) each waited on the other core's data.
pub(crate) fn prefers_positions(out_n: usize, mg: usize, k: usize, pointwise: bool) -> bool {
    if out_n == 0 || out_n > 256 || k < 512 || mg < 128 {
        return false;
    }
    if pointwise && kiln_gemm::reads_b_in_place(mg, k, out_n) {
        return false;
    }
    // Share of the selected microkernel's tiles that is real work, each way.
    let (mr, nr) = kiln_gemm::selected_tile();
    let eff = |rows: usize, cols: usize| {
        (rows as f64 / (rows.div_ceil(mr) * mr) as f64)
            * (cols as f64 / (cols.div_ceil(nr) * nr) as f64)
    };
    eff(out_n, mg) > eff(mg, out_n)
}

/// Whether a Conv with these attributes and W shape (`[M, Cg, k...]`) is
/// pointwise: 1x1, stride 1, no padding, so X is its GEMM's right operand
/// as it is.
pub(crate) fn is_pointwise(a: &ConvAttrs, w_shape: &[usize]) -> bool {
    w_shape.len() >= 3
        && w_shape[2..].iter().all(|&k| k == 1)
        && a.strides.iter().all(|&s| s == 1)
        && a.pads.iter().all(|&p| p == 0)
}

/// Packs W (`[M, Cg, k...]`, f32) per group for [`ConvWeights::Packed`],
/// for the `Positions` product when `positions` (see [`prefers_positions`]),
/// else for the `Channels` one.
pub(crate) fn pack_conv_weights(w: &[f32], m: usize, group: usize, positions: bool) -> ConvPack {
    let mg = m / group.max(1);
    let rows = if m == 0 { 0 } else { w.len() / m };
    let view = |g: usize| MatRef::row_major(&w[g * mg * rows..(g + 1) * mg * rows], mg, rows);
    if positions {
        ConvPack::Positions((0..group).map(|g| PackedB::new(view(g).t())).collect())
    } else {
        ConvPack::Channels((0..group).map(|g| PackedA::new(view(g))).collect())
    }
}

/// Whether a Conv with W shape `[M, Cg, k...]` and `group` groups runs as
/// the `Gathered` product (see [`ConvPack`]). It needs a GEMM kernel that
/// reads A's rows in place (AVX2 or AVX-512), one group, and:
/// * a window wider than 1x1: a strided 1x1 conv reads a quarter of X, which
///   the channels-last copy would copy whole (ResNet-50's 256 -> 512 1x1
///   stride 2 on 56x56: 0.57 -> 0.75 ms);
/// * at least 8 input channels (a tap's segment; the stem's 3 would make
///   the product mostly loop overhead);
/// * at least 64 output channels, the AVX-512 tile's width: PP-OCR det's
///   96 -> 24 3x3 on 160x160, whose tiles would be 3/8 live, ran 4.3 -> 5.1
///   ms, where the `Channels` product's are all live.
///
/// Measured on 2 threads against the other products: ResNet-50's 3x3
/// stride-2 convs 0.65 -> 0.59 ms (128 on 56x56) and 0.63 -> 0.52 (512 on
/// 14x14); YOLOv8n's 128 -> 256 3x3 stride 2 on 20x20 0.26 -> 0.15 ms, and
/// its convs 7.7 -> 6.7 ms in all.
pub(crate) fn gathered_applies(w_shape: &[usize], group: usize) -> bool {
    w_shape.len() >= 3
        && group == 1
        && w_shape[0] >= 64
        && w_shape[1] >= 8
        && w_shape[2..].iter().any(|&k| k > 1)
        && kiln_gemm::gathers_in_place()
}

/// Whether the `Gathered` product can run a conv with this W shape and
/// group count at all (one group, a window wider than 1x1, a GEMM kernel
/// that reads gathers in place), whatever its sizes: the candidates
/// `tune.rs` times. [`gathered_applies`] is the heuristic's narrower rule.
pub(crate) fn gathered_possible(w_shape: &[usize], group: usize) -> bool {
    w_shape.len() >= 3
        && group == 1
        && w_shape[2..].iter().any(|&k| k > 1)
        && kiln_gemm::gathers_in_place()
}

/// Packs W (`[M, C, k...]` = `w_shape`, f32, one group) for
/// [`ConvPack::Gathered`]: `W^T` `[taps * C, M]`, its rows in (tap,
/// channel) order, where W's are in (channel, tap) order.
pub(crate) fn pack_conv_weights_gathered(w: &[f32], w_shape: &[usize]) -> ConvPack {
    let m = w_shape.first().copied().unwrap_or(0);
    let c = w_shape.get(1).copied().unwrap_or(0);
    let kn: usize = w_shape.iter().skip(2).product();
    let k = c * kn;
    // Row (t, ci) of W^T is column (ci, t) of W.
    let mut wt = vec![0.0f32; k * m];
    for (mo, row) in w.chunks_exact(k.max(1)).take(m).enumerate() {
        for ci in 0..c {
            for t in 0..kn {
                wt[(t * c + ci) * m + mo] = row[ci * kn + t];
            }
        }
    }
    ConvPack::Gathered(GatheredWeights {
        packed: PackedB::new(MatRef::row_major(&wt, k, m)),
        offsets: Default::default(),
    })
}

/// [`ConvPack::Gathered`]'s weights, and the gather table of the last input
/// shape it ran on (the table depends on nothing else, and building it is
/// a loop over every position and tap: 0.16 ms for a 3x3 conv with 6400
/// output positions, two thirds of its product).
pub(crate) struct GatheredWeights {
    packed: PackedB,
    offsets: std::sync::Mutex<Option<(Vec<usize>, std::sync::Arc<GatherTable>)>>,
}

impl GatheredWeights {
    /// The gather table for `geo` (see [`gather_offsets`]), built on the
    /// first run with X's image shape and reused after.
    fn offsets(&self, geo: &ConvGeometry) -> std::sync::Arc<GatherTable> {
        let mut cache = self
            .offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cache {
            Some((k, table)) if k[0] == geo.c && k[1..] == geo.in_sp[..] => table.clone(),
            _ => {
                let key = [&[geo.c][..], &geo.in_sp[..]].concat();
                let table = std::sync::Arc::new(GatherTable::new(gather_offsets(geo), geo.kn));
                *cache = Some((key, table.clone()));
                table
            }
        }
    }
}

impl Clone for GatheredWeights {
    fn clone(&self) -> Self {
        GatheredWeights {
            packed: self.packed.clone(),
            offsets: Default::default(),
        }
    }
}

impl std::fmt::Debug for GatheredWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.packed.fmt(f)
    }
}

/// The fast f32 Conv with a fused epilogue: `act(conv(X, W) + B + residual)`.
///
/// X, B and the residual must be f32 (the residual exactly the output's shape);
/// `w_shape` is W's shape (for packed weights, the shape they were packed from).
pub(crate) fn conv_f32(
    a: &ConvAttrs,
    x: &Tensor,
    w_shape: &[usize],
    w: ConvWeights<'_>,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: FusedAct,
) -> Result<Tensor> {
    let geo = conv_geometry(a, x.shape(), w_shape)?;
    let xv = x
        .as_slice::<f32>()
        .ok_or_else(|| invalid!("Conv: X must be f32 here, got {}", x.dtype()))?;
    let bias = crate::util::f32_of_shape(b, &[geo.m], "Conv: bias B")?;
    let res = crate::util::f32_of_shape(residual, &geo.out_shape, "Conv: residual")?;
    let wv: Option<&[f32]> = match w {
        ConvWeights::Raw(w) => Some(
            w.as_slice::<f32>()
                .ok_or_else(|| invalid!("Conv: W must be f32 here, got {}", w.dtype()))?,
        ),
        ConvWeights::Packed(ConvPack::Direct(w)) => {
            if w.len() != geo.m * geo.cg * geo.kn {
                return Err(invalid!(
                    "Conv: unpacked weights hold {} values, the op needs {}",
                    w.len(),
                    geo.m * geo.cg * geo.kn
                ));
            }
            Some(&w[..])
        }
        ConvWeights::Packed(p) => match p.groups() {
            Some(g) if g != geo.group => {
                return Err(invalid!(
                    "Conv: weights were packed for {g} groups, the op has {}",
                    geo.group
                ))
            }
            _ => None,
        },
    };
    // Every element is written below (GEMM with beta 0, depthwise planes
    // cleared first), except with no input channels, which needs zeros.
    let total = numel(&geo.out_shape)?;
    let mut y = if geo.cg == 0 {
        vec![0.0f32; total]
    } else {
        crate::buffers::take_f32(total)
    };
    let epi = Epi {
        bias,
        res,
        act,
        m: geo.m,
        out_n: geo.out_n,
    };
    if !y.is_empty() {
        if geo.cg == 0 {
            // No input channels: the output is the epilogue applied to zeros.
            for (p, plane) in y.chunks_exact_mut(geo.out_n).enumerate() {
                epi.apply(p / geo.m, p % geo.m, 0, plane);
            }
        } else if let Some(wv) = wv.filter(|_| takes_direct_kernel(&geo, w)) {
            super::depthwise::direct_conv(&geo, xv, wv, &epi, &mut y);
        } else if let Some(wts) = winograd_weights(w) {
            winograd_conv(&geo, xv, wts, &epi, &mut y)?;
        } else if let Some(lanes) = lanes_weights(w) {
            lanes_conv(&geo, xv, lanes, &epi, &mut y)?;
        } else {
            conv_gemm(&geo, xv, wv, w, &epi, &mut y);
        }
    }
    crate::util::tensor(geo.out_shape, kiln_ir::TensorData::F32(y))
}

/// Whether a conv of geometry `geo` with weights `w` runs on a direct
/// kernel: raw weights where the shape heuristics choose one
/// ([`uses_direct_kernel`], or many channels on wide rows), unpacked ones
/// (`ConvPack::Direct`, a tuning choice) wherever one can run; weights
/// packed for a GEMM, Winograd or the channels-in-lanes kernel run those.
fn takes_direct_kernel(geo: &ConvGeometry, w: ConvWeights<'_>) -> bool {
    let win = &geo.win;
    match w {
        ConvWeights::Raw(_) => {
            uses_direct_kernel(geo.group, geo.cg, &win.kernel, &win.strides, &win.dilations)
                || super::depthwise::many_channel_applies(
                    geo.cg,
                    &win.kernel,
                    &win.strides,
                    &win.dilations,
                    win.out.last().copied(),
                )
        }
        ConvWeights::Packed(ConvPack::Direct(_)) => {
            direct_possible(geo.cg, &win.kernel, &win.strides, &win.dilations)
        }
        ConvWeights::Packed(_) => false,
    }
}

/// The Winograd-transformed weights, when `w` holds them.
#[cfg(target_arch = "x86_64")]
fn winograd_weights<'a>(w: ConvWeights<'a>) -> Option<&'a super::winograd::WinogradWeights> {
    match w {
        ConvWeights::Packed(ConvPack::Winograd(wts)) => Some(wts),
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
use super::winograd::conv as winograd_conv;

/// The channels-in-lanes weights, when `w` holds them.
#[cfg(target_arch = "x86_64")]
fn lanes_weights<'a>(w: ConvWeights<'a>) -> Option<&'a super::conv_lanes::LanesWeights> {
    match w {
        ConvWeights::Packed(ConvPack::Lanes(l)) => Some(l),
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
use super::conv_lanes::conv as lanes_conv;

/// No channels-in-lanes weights off x86-64.
#[cfg(not(target_arch = "x86_64"))]
fn lanes_weights(_: ConvWeights<'_>) -> Option<&'static std::convert::Infallible> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn lanes_conv(
    _: &ConvGeometry,
    _: &[f32],
    never: &std::convert::Infallible,
    _: &Epi<'_>,
    _: &mut [f32],
) -> Result<()> {
    match *never {}
}

/// No Winograd weights off x86-64.
#[cfg(not(target_arch = "x86_64"))]
fn winograd_weights(_: ConvWeights<'_>) -> Option<&'static std::convert::Infallible> {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn winograd_conv(
    _: &ConvGeometry,
    _: &[f32],
    never: &std::convert::Infallible,
    _: &Epi<'_>,
    _: &mut [f32],
) -> Result<()> {
    match *never {}
}

/// The per-channel epilogue of a fast Conv: bias, residual, activation.
#[derive(Clone, Copy)]
pub(crate) struct Epi<'a> {
    pub bias: Option<&'a [f32]>,
    pub res: Option<&'a [f32]>,
    pub act: FusedAct,
    pub m: usize,
    pub out_n: usize,
}

impl Epi<'_> {
    /// Applies the epilogue to `vals`, the outputs of image `ni`, channel `ch`
    /// at spatial positions `pos0..pos0 + vals.len()`.
    #[inline]
    pub fn apply(&self, ni: usize, ch: usize, pos0: usize, vals: &mut [f32]) {
        if let Some(b) = self.bias {
            let bv = b[ch];
            vals.iter_mut().for_each(|v| *v += bv);
        }
        if let Some(r) = self.res {
            let o = (ni * self.m + ch) * self.out_n + pos0;
            let len = vals.len();
            for (v, &rv) in vals.iter_mut().zip(&r[o..o + len]) {
                *v += rv;
            }
        }
        crate::fastmath::fused_act(self.act, vals);
    }

    /// The epilogue of a channel-rows GEMM over image `ni`, channels `g0..`
    /// and positions `pos0..` (C row stride `out_n`): bias, residual and a
    /// Relu/Clip done in the GEMM's registers, plus whether an activation is
    /// left for a callback ([`Epi::act_only`]).
    pub(super) fn channel_rows_finish(
        &self,
        ni: usize,
        g0: usize,
        pos0: usize,
    ) -> (Finish<'_>, bool) {
        let clamp = clamp_of(self.act);
        let finish = Finish {
            row_bias: self.bias.map(|b| &b[g0..]),
            col_bias: None,
            residual: self.res.map(|r| Residual {
                data: &r[(ni * self.m + g0) * self.out_n + pos0..],
                ld: self.out_n,
            }),
            clamp,
            stream: false,
        };
        (finish, clamp.is_none() && self.act != FusedAct::Identity)
    }

    /// The activation alone (after a [`Finish`] did bias and residual).
    pub fn act_only(&self, vals: &mut [f32]) {
        crate::fastmath::fused_act(self.act, vals);
    }
}

impl<'a> Epi<'a> {
    /// How a kernel that adds the bias in its registers splits this
    /// epilogue: the bounds it clamps to there (Relu/Clip when no residual
    /// must be added first; else infinite, which leaves every value, NaN
    /// included, as it is: x86 min/max need the value as second operand),
    /// and what it must still apply to the outputs it stored (`None`:
    /// nothing).
    pub(crate) fn in_registers(&self) -> ((f32, f32), Option<Epi<'a>>) {
        let clamp = if self.res.is_none() {
            clamp_of(self.act)
        } else {
            None
        };
        let rest = (self.res.is_some() || (clamp.is_none() && self.act != FusedAct::Identity))
            .then_some(Epi {
                bias: None,
                res: self.res,
                act: self.act,
                m: self.m,
                out_n: self.out_n,
            });
        (clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY)), rest)
    }
}

/// The activations a GEMM can apply in registers, as `(lo, hi)` clamps.
pub(crate) fn clamp_of(act: FusedAct) -> Option<(f32, f32)> {
    match act {
        FusedAct::Relu => Some((0.0, f32::INFINITY)),
        FusedAct::Clip { min, max } => Some((min, max)),
        _ => None,
    }
}

/// Every kernel tap of a window, with its per-axis input offsets.
pub(super) fn window_taps(win: &Window, kshape: &[usize]) -> Vec<Vec<isize>> {
    let pb: Vec<isize> = win.pad_begin.iter().map(|&p| p as isize).collect();
    let mut taps = Vec::new();
    let mut tap = vec![0usize; kshape.len()];
    loop {
        taps.push(tap_offsets(&tap, &win.dilations, &pb));
        if !next_index(&mut tap, kshape) {
            break;
        }
    }
    taps
}

/// Conv as GEMMs with the im2col matrix never built: the GEMM's packing of
/// that operand gathers straight from X ([`Im2col::fill`]).
fn conv_gemm(
    geo: &ConvGeometry,
    xv: &[f32],
    wv: Option<&[f32]>,
    w: ConvWeights<'_>,
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    let taps = window_taps(&geo.win, &geo.kshape);
    let split = PhaseSplit::plan(geo, &taps);
    let src = Source {
        taps: &taps,
        split: split.as_ref(),
    };
    match w {
        ConvWeights::Packed(ConvPack::Positions(p)) => conv_gemm_positions(geo, xv, p, src, epi, y),
        ConvWeights::Packed(ConvPack::Gathered(p)) => conv_gemm_gathered(geo, xv, p, epi, y),
        ConvWeights::Packed(ConvPack::Channels(p)) => {
            conv_gemm_channels(geo, xv, |g| Lhs::Packed(&p[g]), src, epi, y)
        }
        #[cfg(target_arch = "x86_64")]
        ConvWeights::Packed(ConvPack::Winograd(_)) => {
            unreachable!("conv_f32 routes Winograd weights to winograd::conv")
        }
        #[cfg(target_arch = "x86_64")]
        ConvWeights::Packed(ConvPack::Lanes(_)) => {
            unreachable!("conv_f32 routes channels-in-lanes weights to conv_lanes::conv")
        }
        ConvWeights::Raw(_) | ConvWeights::Packed(ConvPack::Direct(_)) => {
            let wv = wv.expect("raw weights come with their values");
            let rows = geo.cg * geo.kn;
            let lhs = |g: usize| {
                Lhs::Mat(MatRef::row_major(
                    &wv[g * geo.mg * rows..(g + 1) * geo.mg * rows],
                    geo.mg,
                    rows,
                ))
            };
            conv_gemm_channels(geo, xv, lhs, src, epi, y)
        }
    }
}

/// Where a conv's im2col panels gather from: X through the window's taps,
/// or, for a strided conv, phase planes built from X first.
#[derive(Clone, Copy)]
struct Source<'a> {
    taps: &'a [Vec<isize>],
    split: Option<&'a PhaseSplit>,
}

impl<'a> Source<'a> {
    /// The geometry, taps and per-tap base offsets the fill reads through:
    /// the conv's own, or its phase planes'.
    fn fill_view(
        &self,
        geo: &'a ConvGeometry,
    ) -> (&'a ConvGeometry, &'a [Vec<isize>], &'a [usize]) {
        match self.split {
            Some(s) => (&s.geo, &s.taps, &s.bases),
            None => (geo, self.taps, &[]),
        }
    }

    /// A buffer for the phase planes of `channels` channels (none without
    /// a split); give it back with [`crate::buffers::recycle`].
    fn planes_buffer(&self, channels: usize) -> Option<Vec<f32>> {
        self.split
            .map(|s| crate::buffers::take_f32(channels * s.channel_len()))
    }
}

/// The `Channels` orientation: per image and group, `Y_g = W_g x im2col(X_g)`
/// straight into Y, epilogue fused.
fn conv_gemm_channels<'w>(
    geo: &ConvGeometry,
    xv: &[f32],
    lhs: impl Fn(usize) -> Lhs<'w>,
    src: Source<'_>,
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    let (c, m, cg, mg) = (geo.c, geo.m, geo.cg, geo.mg);
    let out_n = geo.out_n;
    let k = cg * geo.kn;
    // What the fill reads: X itself, or one image and group's phase planes.
    let (fill_geo, taps, bases) = src.fill_view(geo);
    let mut planes = src.planes_buffer(cg);
    let in_n = fill_geo.in_n;
    let win = &fill_geo.win;
    // 1x1, stride 1, no padding: X (or a 1x1 strided conv's one phase
    // plane, its subsampled input) itself is the right operand.
    let pointwise = win.kernel.iter().all(|&k| k == 1)
        && win.strides.iter().all(|&s| s == 1)
        && win.pad_begin.iter().all(|&p| p == 0)
        && win.out == fill_geo.in_sp;
    // Columns per GEMM: all of the plane unless the packed operand would be huge.
    let chunk = if pointwise || k * out_n <= IM2COL_PACK_MAX {
        out_n
    } else {
        (IM2COL_PACK_MAX / k).max(256)
    };
    // Each GEMM writes one image's planes; the batch's output as a whole
    // decides whether it can stay cached.
    let stream = std::mem::size_of_val(y) >= kiln_gemm::stream_min_bytes();
    for ni in 0..geo.n {
        for gi in 0..geo.group {
            let x0 = (ni * c + gi * cg) * geo.in_n;
            let xg = match (src.split, planes.as_deref_mut()) {
                (Some(s), Some(buf)) => {
                    s.split(xv, |j| x0 + j * geo.in_n, buf);
                    &*buf
                }
                _ => &xv[x0..],
            };
            let g0 = gi * mg;
            let y_off = (ni * m + g0) * out_n;
            let mut j0 = 0;
            while j0 < out_n {
                let nt = chunk.min(out_n - j0);
                let cols = Im2col {
                    x: xg,
                    image_stride: 0,
                    first: j0,
                    len: nt,
                    geo: fill_geo,
                    taps,
                    bases,
                };
                let fill =
                    |first: usize, width: usize, panel: &mut [f32]| cols.fill(first, width, panel);
                let rhs = if pointwise {
                    Rhs::Mat(MatRef::row_major(&xg[..cg * in_n], cg, in_n))
                } else {
                    Rhs::Panels(Panels {
                        rows: k,
                        cols: nt,
                        fill: &fill,
                    })
                };
                let c_len = (mg - 1) * out_n + nt;
                let c_out = &mut y[y_off + j0..y_off + j0 + c_len];
                let (mut finish, act_left) = epi.channel_rows_finish(ni, g0, j0);
                finish.stream = stream;
                let act = |_row: usize, _col0: usize, vals: &mut [f32]| epi.act_only(vals);
                sgemm_fused(
                    1.0,
                    lhs(gi),
                    rhs,
                    0.0,
                    c_out,
                    out_n,
                    &finish,
                    if act_left { Some(&act) } else { None },
                );
                j0 += nt;
            }
        }
    }
    if let Some(buf) = planes {
        crate::buffers::recycle(buf);
    }
}

/// The `Positions` orientation: per group and run of whole images,
/// `T = im2col(X_g)^T x W_g^T` (`[images*HW, Mg]`), then T is transposed into
/// Y's `[Mg, HW]` planes with the epilogue applied on the way.
fn conv_gemm_positions(
    geo: &ConvGeometry,
    xv: &[f32],
    packed: &[PackedB],
    src: Source<'_>,
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    let (c, cg, mg) = (geo.c, geo.cg, geo.mg);
    let (in_n, out_n) = (geo.in_n, geo.out_n);
    let k = cg * geo.kn;
    let images_per = (IM2COL_PACK_MAX / (k * out_n).max(1)).clamp(1, geo.n.max(1));
    let mut t = crate::buffers::take_f32(images_per * out_n * mg);
    // A strided conv's fill reads a run of images' phase planes instead.
    let (fill_geo, taps, bases) = src.fill_view(geo);
    let mut planes = src.planes_buffer(images_per * cg);
    let mut n0 = 0;
    while n0 < geo.n {
        let nb = images_per.min(geo.n - n0);
        let rows = nb * out_n;
        for (gi, w_t) in packed.iter().enumerate() {
            let (x, image_stride) = match (src.split, planes.as_deref_mut()) {
                (Some(s), Some(buf)) => {
                    let buf = &mut buf[..nb * cg * s.channel_len()];
                    let src_of = |j: usize| ((n0 + j / cg) * c + gi * cg + j % cg) * in_n;
                    s.split(xv, src_of, buf);
                    (&*buf, cg * s.channel_len())
                }
                _ => (&xv[(n0 * c + gi * cg) * in_n..], c * in_n),
            };
            let cols = Im2col {
                x,
                image_stride,
                first: 0,
                len: rows,
                geo: fill_geo,
                taps,
                bases,
            };
            let fill =
                |first: usize, width: usize, panel: &mut [f32]| cols.fill(first, width, panel);
            let tv = &mut t[..rows * mg];
            sgemm(
                1.0,
                Lhs::Panels(Panels {
                    rows,
                    cols: k,
                    fill: &fill,
                }),
                Rhs::Packed(w_t),
                0.0,
                tv,
                mg,
                None,
            );
            positions_to_planes(tv, geo, n0, nb, gi * mg, epi, y);
        }
        n0 += nb;
    }
    crate::buffers::recycle(t);
    if let Some(buf) = planes {
        crate::buffers::recycle(buf);
    }
}

/// The `Gathered` orientation (see [`ConvPack`]): X copied channels-last
/// (`[N, HW, C]`), then per group `T = gather(X)[N*HW_out, taps*Cg] x
/// W_g^T` with each tap's `Cg` channels read in place, then T transposed
/// into Y's planes with the epilogue.
fn conv_gemm_gathered(
    geo: &ConvGeometry,
    xv: &[f32],
    w: &GatheredWeights,
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    let (n, c, m) = (geo.n, geo.c, geo.m);
    let (in_n, out_n) = (geo.in_n, geo.out_n);
    debug_assert_eq!(geo.group, 1);
    let mut xh = crate::buffers::take_f32(n * c * in_n);
    crate::shape_ops::batched_transpose_into(&xv[..n * c * in_n], n, c, in_n, &mut xh);
    let table = w.offsets(geo);
    let rows = Gather {
        data: &xh,
        table: &table,
        seg_len: c,
        images: n,
        image_stride: in_n * c,
    };
    // Bias and a Relu/Clip go in the product's registers; a residual and
    // another activation on Y's planes as the transpose writes them (on
    // T's rows instead, a call per row of M values cost more than the
    // activation: 1600 calls of 32 on a 40x40 plane).
    let (clamp, rest) = epi.in_registers();
    let finish = Finish {
        col_bias: epi.bias,
        clamp: (clamp != (f32::NEG_INFINITY, f32::INFINITY)).then_some(clamp),
        ..Finish::default()
    };
    let mut t = crate::buffers::take_f32(n * out_n * m);
    sgemm_fused(
        1.0,
        Lhs::Gather(rows),
        Rhs::Packed(&w.packed),
        0.0,
        &mut t,
        m,
        &finish,
        None,
    );
    crate::buffers::recycle(xh);
    // Y's images are T's transposed.
    match rest {
        Some(rest) => {
            crate::shape_ops::batched_transpose_then(&t, n, out_n, m, y, |ni, ch, plane| {
                rest.apply(ni, ch, 0, plane)
            })
        }
        None => crate::shape_ops::batched_transpose_into(&t, n, out_n, m, y),
    }
    crate::buffers::recycle(t);
}

/// `FusedOp::ConvNhwc` for a one-group conv on channels-last f32 tensors
/// (X `[N, spatial..., C]`, the residual and the result `[N, out
/// spatial..., M]`), W packed for the gathered product: X is already the
/// gather's source and T is Y, so nothing is transposed; bias, residual and
/// a Relu/Clip run in the product's registers, another activation on each
/// finished row. `Ok(None)` when there is nothing to gather (no input
/// channels or no taps): the caller runs it through the NCHW path.
pub(crate) fn conv_nhwc_gathered(
    a: &ConvAttrs,
    x: &Tensor,
    w_shape: &[usize],
    w: &GatheredWeights,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: FusedAct,
) -> Result<Option<Tensor>> {
    let xs = x.shape();
    if xs.len() < 3 {
        return Err(invalid!(
            "FusedConvNhwc: X must have rank 3 or more, got {xs:?}"
        ));
    }
    let c = xs[xs.len() - 1];
    let nchw: Vec<usize> = [xs[0], c]
        .into_iter()
        .chain(xs[1..xs.len() - 1].iter().copied())
        .collect();
    let geo = conv_geometry(a, &nchw, w_shape)?;
    if geo.group != 1 {
        return Err(invalid!(
            "FusedConvNhwc: weights gathered for one group, the op has {}",
            geo.group
        ));
    }
    if c == 0 || geo.kn == 0 {
        return Ok(None);
    }
    let xv = x
        .as_slice::<f32>()
        .ok_or_else(|| invalid!("FusedConvNhwc: X must be f32 here, got {}", x.dtype()))?;
    let (n, m) = (geo.n, geo.m);
    let out_shape: Vec<usize> = [n]
        .into_iter()
        .chain(geo.win.out.iter().copied())
        .chain([m])
        .collect();
    let (bias, res) = nhwc_bias_and_residual(bias, residual, m, &out_shape)?;
    let total = numel(&out_shape)?;
    let mut y = crate::buffers::take_f32(total);
    if total > 0 {
        let table = w.offsets(&geo);
        let rows = Gather {
            data: xv,
            table: &table,
            seg_len: c,
            images: n,
            image_stride: geo.in_n * c,
        };
        let clamp = clamp_of(act);
        let finish = Finish {
            col_bias: bias,
            residual: res.map(|data| Residual { data, ld: m }),
            clamp,
            ..Finish::default()
        };
        let act_rows =
            |_row: usize, _col0: usize, vals: &mut [f32]| crate::fastmath::fused_act(act, vals);
        let act_left = clamp.is_none() && act != FusedAct::Identity;
        sgemm_fused(
            1.0,
            Lhs::Gather(rows),
            Rhs::Packed(&w.packed),
            0.0,
            &mut y,
            m,
            &finish,
            if act_left { Some(&act_rows) } else { None },
        );
    }
    crate::util::tensor(out_shape, kiln_ir::TensorData::F32(y)).map(Some)
}

/// A channels-last conv's bias (f32 `[m]`) and residual (f32, exactly
/// `out_shape`) as slices, or an error saying which is wrong.
pub(crate) fn nhwc_bias_and_residual<'a>(
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    m: usize,
    out_shape: &[usize],
) -> Result<(Option<&'a [f32]>, Option<&'a [f32]>)> {
    let bias = crate::util::f32_of_shape(bias, &[m], "FusedConvNhwc: bias")?;
    let res = crate::util::f32_of_shape(residual, out_shape, "FusedConvNhwc: residual")?;
    Ok((bias, res))
}

/// For every output position of an image, each tap's first input channel
/// in the image's channels-last copy (`[HW, C]`), or [`GATHER_ZEROS`] where
/// the tap falls in the padding: `offsets[pos * kn + tap]`.
fn gather_offsets(geo: &ConvGeometry) -> Vec<usize> {
    let win = &geo.win;
    let taps = window_taps(win, &geo.kshape);
    let nsp = geo.in_sp.len();
    let mut offsets = Vec::with_capacity(geo.out_n * geo.kn);
    let mut o = vec![0usize; nsp];
    for _ in 0..geo.out_n {
        for offs in &taps {
            let mut lin = 0usize;
            let mut inside = true;
            for a in 0..nsp {
                let q = (o[a] * win.strides[a]) as isize + offs[a];
                if q < 0 || q >= geo.in_sp[a] as isize {
                    inside = false;
                    break;
                }
                lin = lin * geo.in_sp[a] + q as usize;
            }
            offsets.push(if inside { lin * geo.c } else { GATHER_ZEROS });
        }
        next_index(&mut o, &win.out);
    }
    offsets
}

/// Rows `[images * out_n, Mg]` of a positions product (images `n0..n0 +
/// nb`, output channels `g0..g0 + Mg`) transposed into Y's planes, the
/// epilogue applied on the way: `CH_BLOCK` channels per task, each reading
/// T's rows once for all of them.
fn positions_to_planes(
    t: &[f32],
    geo: &ConvGeometry,
    n0: usize,
    nb: usize,
    g0: usize,
    epi: &Epi<'_>,
    y: &mut [f32],
) {
    const CH_BLOCK: usize = 16;
    let (m, mg, out_n) = (geo.m, geo.mg, geo.out_n);
    let images = &mut y[n0 * m * out_n..(n0 + nb) * m * out_n];
    images
        .par_chunks_mut(m * out_n)
        .enumerate()
        .for_each(|(ii, img)| {
            let planes = &mut img[g0 * out_n..(g0 + mg) * out_n];
            planes
                .par_chunks_mut(CH_BLOCK * out_n)
                .enumerate()
                .for_each(|(bi, block)| {
                    let ch0 = bi * CH_BLOCK;
                    let nch = block.len() / out_n;
                    let trows = &t[ii * out_n * mg..(ii + 1) * out_n * mg];
                    for (pos, trow) in trows.chunks_exact(mg).enumerate() {
                        for (j, &v) in trow[ch0..ch0 + nch].iter().enumerate() {
                            block[j * out_n + pos] = v;
                        }
                    }
                    for (j, plane) in block.chunks_exact_mut(out_n).enumerate() {
                        epi.apply(n0 + ii, g0 + ch0 + j, 0, plane);
                    }
                });
        });
}

/// The im2col matrix of one group, `[Cg * k1 * ... * kn, positions]`, as a
/// source of packed GEMM panels: row `ci * kn + tap`, column = an output
/// position (image-major when it spans several images). Packing it gathers
/// straight from X, so the matrix is never written out.
struct Im2col<'a> {
    /// Image 0, channel 0 of the group; images follow every `image_stride`.
    x: &'a [f32],
    image_stride: usize,
    /// The positions `first .. first + len` (over images, then the plane).
    first: usize,
    len: usize,
    geo: &'a ConvGeometry,
    taps: &'a [Vec<isize>],
    /// Per tap, an offset added to every source index (the tap's phase
    /// plane, [`PhaseSplit`]); empty: none.
    bases: &'a [usize],
}

/// Per-thread working lists of [`Im2col::fill`], kept between panels so
/// packing allocates nothing.
#[derive(Default)]
struct FillScratch {
    /// Runs of positions along one output row: (panel column, length,
    /// image, output row, first x).
    runs: Vec<(usize, usize, usize, usize, usize)>,
    /// Per tap and panel column, the source offset in a channel (-1: zero).
    table: Vec<isize>,
    /// An output row's multi-index over the outer spatial axes.
    idx: Vec<usize>,
    /// One tap's runs, where they read.
    spans: Vec<Span>,
}

/// One run of positions along an output row, as one tap reads it: panel
/// columns `t0 .. t0 + len`, of which `a .. b` (relative) read X from
/// `src0` on (the rest is padding).
#[derive(Clone, Copy)]
struct Span {
    t0: usize,
    len: usize,
    a: usize,
    b: usize,
    src0: usize,
}

/// When one tap's runs read one contiguous stretch of X in panel order
/// (stride 1 and an input row as wide as the output row, as after
/// [`PhaseSplit`] or in a "same"-padded conv: each run continues where the
/// previous one stopped, a row later), the panel columns `[t_a, t_b)` of
/// that stretch and where it starts. Columns inside it that are padding
/// (a run's `..a` or `b..`) read real values and must be zeroed after.
fn linear_stretch(spans: &[Span], stride: usize) -> Option<(usize, usize, usize)> {
    if stride != 1 || spans.len() < 2 {
        return None;
    }
    let first = spans.iter().position(|sp| sp.a < sp.b)?;
    let last = spans.iter().rposition(|sp| sp.a < sp.b)?;
    let inner = &spans[first..=last];
    let (s0, t_a) = (inner[0].src0, inner[0].t0 + inner[0].a);
    // Every run between is live and continues the stretch.
    let linear = inner
        .iter()
        .all(|sp| sp.a < sp.b && sp.src0 + t_a == s0 + sp.t0 + sp.a);
    let end = inner[inner.len() - 1];
    linear.then_some((t_a, end.t0 + end.b, s0))
}

thread_local! {
    static FILL_SCRATCH: std::cell::Cell<FillScratch> = std::cell::Cell::new(FillScratch::default());
}

impl Im2col<'_> {
    /// Writes positions `first .. first + width` (relative to `self.first`)
    /// as one packed panel: `panel[row * width + t]`, zero in the padding and
    /// past `len`. Works per run of positions along one output row, so every
    /// (row, run) is one copy (stride 1) or one strided gather.
    fn fill(&self, first: usize, width: usize, panel: &mut [f32]) {
        let mut scratch = FILL_SCRATCH.with(|c| c.take());
        self.fill_with(first, width, panel, &mut scratch);
        FILL_SCRATCH.with(|c| c.set(scratch));
    }

    fn fill_with(&self, first: usize, width: usize, panel: &mut [f32], scratch: &mut FillScratch) {
        let geo = self.geo;
        let win = &geo.win;
        let nsp = geo.in_sp.len();
        let last = nsp - 1;
        let (s_last, out_last, in_last) = (win.strides[last], win.out[last], geo.in_sp[last]);
        let (kn, in_n, out_n) = (geo.kn, geo.in_n, geo.out_n);
        let rows = geo.cg * kn;
        let valid = width.min(self.len.saturating_sub(first));
        if valid < width {
            for r in 0..rows {
                panel[r * width + valid..(r + 1) * width].fill(0.0);
            }
        }
        let FillScratch {
            runs,
            table,
            idx,
            spans,
        } = scratch;
        runs.clear();
        let mut t = 0;
        while t < valid {
            let q = self.first + first + t;
            let (img, pos) = (q / out_n, q % out_n);
            let (orow, ox) = (pos / out_last, pos % out_last);
            let len = (out_last - ox).min(valid - t);
            runs.push((t, len, img, orow, ox));
            t += len;
        }
        // Short runs (small planes, narrow A panels): one gather per element
        // through a table of source offsets, built once for all channels.
        // Long runs: one copy per (row, run).
        let gather = runs.len() * 16 > valid;
        table.clear();
        if gather {
            table.resize(kn * valid, -1);
        }
        idx.clear();
        idx.resize(last, 0);
        for (ti, offs) in self.taps.iter().enumerate() {
            let off = offs[last];
            let (lo, hi) = valid_range(out_last, s_last, off, in_last);
            let base = self.bases.get(ti).copied().unwrap_or(0);
            spans.clear();
            for &(t0, len, img, orow, ox0) in runs.iter() {
                // The input row this output row reads through this tap.
                let mut rem = orow;
                for a in (0..last).rev() {
                    idx[a] = rem % win.out[a];
                    rem /= win.out[a];
                }
                let mut irow = 0usize;
                let mut inside = lo < hi;
                for a in 0..last {
                    let q = (idx[a] * win.strides[a]) as isize + offs[a];
                    if q < 0 || q >= geo.in_sp[a] as isize {
                        inside = false;
                        break;
                    }
                    irow = irow * geo.in_sp[a] + q as usize;
                }
                // Valid x within the run: [a, b) relative to the run's start.
                let (a, b) = if inside {
                    let a = lo.clamp(ox0, ox0 + len) - ox0;
                    let b = hi.clamp(ox0, ox0 + len) - ox0;
                    (a, b.max(a))
                } else {
                    (0, 0)
                };
                // Offset (within a channel plane's image) of the first valid
                // output's input: (ox0 + a) * s + off >= 0 there.
                let src0 = ((img * self.image_stride + irow * in_last) as isize
                    + ((ox0 + a) * s_last) as isize
                    + off)
                    .max(0) as usize
                    + base;
                if gather {
                    let row = &mut table[ti * valid + t0..][..len];
                    for (j, o) in row[a..b].iter_mut().enumerate() {
                        *o = (src0 + j * s_last) as isize;
                    }
                    continue;
                }
                spans.push(Span {
                    t0,
                    len,
                    a,
                    b,
                    src0,
                });
            }
            if gather {
                continue;
            }
            let panel_row = |ci: usize| (ci * kn + ti) * width;
            if let Some((t_a, t_b, src)) = linear_stretch(spans, s_last) {
                // One copy per channel for the whole stretch, then zeros
                // where a run reads padding.
                for ci in 0..geo.cg {
                    let dst = &mut panel[panel_row(ci)..][..valid];
                    let src = src + ci * in_n;
                    dst[t_a..t_b].copy_from_slice(&self.x[src..src + (t_b - t_a)]);
                    dst[..t_a].fill(0.0);
                    dst[t_b..].fill(0.0);
                    for sp in spans.iter() {
                        let run = &mut dst[sp.t0..sp.t0 + sp.len];
                        if sp.t0 + sp.a > t_a {
                            run[..sp.a].fill(0.0);
                        }
                        if sp.t0 + sp.b < t_b {
                            run[sp.b..].fill(0.0);
                        }
                    }
                }
                continue;
            }
            for sp in spans.iter() {
                let (a, b) = (sp.a, sp.b);
                for ci in 0..geo.cg {
                    let dst = &mut panel[panel_row(ci) + sp.t0..][..sp.len];
                    dst[..a].fill(0.0);
                    dst[b..].fill(0.0);
                    if a == b {
                        continue;
                    }
                    let src0 = sp.src0 + ci * in_n;
                    let d = &mut dst[a..b];
                    match s_last {
                        1 => d.copy_from_slice(&self.x[src0..src0 + (b - a)]),
                        2 => strided_copy::<2>(d, &self.x[src0..]),
                        _ => {
                            for (j, v) in d.iter_mut().enumerate() {
                                *v = self.x[src0 + j * s_last];
                            }
                        }
                    }
                }
            }
        }
        if gather {
            let strips = Strips {
                x: self.x,
                cg: geo.cg,
                kn,
                in_n,
            };
            for (ti, offs) in table.chunks_exact(valid).enumerate() {
                // A tap whose offsets are one contiguous stretch of X (no
                // padding, no row break: always so for 1x1 stride-1 convs)
                // copies; otherwise one gather per element.
                let contiguous = offs[0] >= 0 && offs.windows(2).all(|w| w[1] == w[0] + 1);
                match (width, valid, contiguous) {
                    (6, 6, true) => strips.copy::<6>(panel, ti, offs[0] as usize),
                    (6, 6, false) => strips.gather::<6>(panel, ti, offs),
                    (4, 4, true) => strips.copy::<4>(panel, ti, offs[0] as usize),
                    (4, 4, false) => strips.gather::<4>(panel, ti, offs),
                    _ => strips.gather_any(panel, width, ti, offs),
                }
            }
        }
    }
}

/// `d[j] = src[S * j]` for every j: whole S-element chunks (which LLVM
/// turns into shuffles, where an indexed loop stays scalar and bounds-checked),
/// then the last element, whose chunk may be cut short by the end of `src`.
#[inline]
pub(super) fn strided_copy<const S: usize>(d: &mut [f32], src: &[f32]) {
    let whole = (src.len() / S).min(d.len());
    let (head, tail) = d.split_at_mut(whole);
    for (v, chunk) in head.iter_mut().zip(src.chunks_exact(S)) {
        *v = chunk[0];
    }
    for (j, v) in tail.iter_mut().enumerate() {
        *v = src[S * (whole + j)];
    }
}

/// The channel strips of one tap in a packed im2col panel: panel row
/// `ci * kn + tap` takes X's channel `ci` at a few source offsets. Fixed
/// widths (the GEMM's MR) compile to straight-line moves, where a `memcpy`
/// call per 6-float strip would cost more than the copy.
struct Strips<'a> {
    x: &'a [f32],
    cg: usize,
    kn: usize,
    in_n: usize,
}

impl Strips<'_> {
    /// Row `(ci, tap)` = `x[ci * in_n + o ..][..W]`, every channel.
    fn copy<const W: usize>(&self, panel: &mut [f32], tap: usize, o: usize) {
        for ci in 0..self.cg {
            let d: &mut [f32; W] = (&mut panel[(ci * self.kn + tap) * W..][..W])
                .try_into()
                .expect("a panel row holds W floats");
            let s: &[f32; W] = self.x[ci * self.in_n + o..][..W]
                .try_into()
                .expect("the strip holds W floats");
            *d = *s;
        }
    }

    /// Row `(ci, tap)` = `x[ci * in_n + offs[t]]` (0 where `offs[t] < 0`).
    fn gather<const W: usize>(&self, panel: &mut [f32], tap: usize, offs: &[isize]) {
        let offs: &[isize; W] = offs.try_into().expect("W offsets");
        for ci in 0..self.cg {
            let xc = &self.x[ci * self.in_n..];
            let d: &mut [f32; W] = (&mut panel[(ci * self.kn + tap) * W..][..W])
                .try_into()
                .expect("a panel row holds W floats");
            for (v, &o) in d.iter_mut().zip(offs) {
                *v = if o >= 0 { xc[o as usize] } else { 0.0 };
            }
        }
    }

    /// `gather` for any width: the first `offs.len()` floats of each row.
    fn gather_any(&self, panel: &mut [f32], width: usize, tap: usize, offs: &[isize]) {
        for ci in 0..self.cg {
            let xc = &self.x[ci * self.in_n..];
            let d = &mut panel[(ci * self.kn + tap) * width..][..offs.len()];
            for (v, &o) in d.iter_mut().zip(offs) {
                *v = if o >= 0 { xc[o as usize] } else { 0.0 };
            }
        }
    }
}

/// ConvTranspose. X `[N, C, D1..Dn]`, W `[C, M/group, k1..kn]`, B `[M]`.
pub fn conv_transpose(
    a: &ConvTransposeAttrs,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    match float_prec(x, "ConvTranspose")? {
        Prec::F32 => conv_transpose_impl::<f32>(a, x, w, b),
        Prec::F64 => conv_transpose_impl::<f64>(a, x, w, b),
    }
}

/// Resolved ConvTranspose geometry per spatial axis.
struct TransposeGeometry {
    out: Vec<usize>,
    /// Begin pads; negative when output_shape asks for more than the full extent.
    pad_begin: Vec<isize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
}

/// Output sizes and begin pads of ConvTranspose.
fn conv_transpose_geometry(
    a: &ConvTransposeAttrs,
    in_sp: &[usize],
    kshape: &[usize],
) -> Result<TransposeGeometry> {
    const OP: &str = "ConvTranspose";
    let nsp = in_sp.len();
    let ca = &a.conv;
    let strides = per_axis(OP, "strides", &ca.strides, nsp, 1, true)?;
    let dil = per_axis(OP, "dilations", &ca.dilations, nsp, 1, true)?;
    let out_pad = per_axis(OP, "output_padding", &a.output_padding, nsp, 0, false)?;
    // output_shape may list only the spatial dims or the full output shape.
    let out_shape_attr: Option<&[usize]> = match a.output_shape.len() {
        0 => None,
        l if l == nsp => Some(&a.output_shape),
        l if l == nsp + 2 => Some(&a.output_shape[2..]),
        l => {
            return Err(invalid!(
                "{OP}: output_shape {:?} has {l} values, expected {nsp} (one per spatial axis)",
                a.output_shape
            ))
        }
    };
    let mut out = vec![0usize; nsp];
    let mut pad_begin = vec![0isize; nsp];
    let full = |i: usize| -> isize {
        (strides[i] * in_sp[i].saturating_sub(1) + out_pad[i] + (kshape[i] - 1) * dil[i] + 1)
            as isize
    };
    let same = matches!(ca.auto_pad, AutoPad::SameUpper | AutoPad::SameLower);
    if out_shape_attr.is_some() || same {
        for i in 0..nsp {
            let target = match out_shape_attr {
                Some(os) => os[i],
                None => in_sp[i] * strides[i],
            };
            let total = full(i) - target as isize;
            let half = total.div_euclid(2);
            pad_begin[i] = if ca.auto_pad == AutoPad::SameUpper {
                half
            } else {
                total - half
            };
            out[i] = target;
        }
    } else {
        let pads = if ca.auto_pad == AutoPad::Valid || ca.pads.is_empty() {
            vec![0; 2 * nsp]
        } else if ca.pads.len() == 2 * nsp {
            ca.pads.clone()
        } else {
            return Err(invalid!(
                "{OP}: pads has {} values {:?}, expected {}",
                ca.pads.len(),
                ca.pads,
                2 * nsp
            ));
        };
        for i in 0..nsp {
            let o = full(i) - (pads[i] + pads[nsp + i]) as isize;
            if o < 0 {
                return Err(invalid!(
                    "{OP}: pads {pads:?} exceed the full output extent {} on spatial axis {i}",
                    full(i)
                ));
            }
            out[i] = o as usize;
            pad_begin[i] = pads[i] as isize;
        }
    }
    Ok(TransposeGeometry {
        out,
        pad_begin,
        strides,
        dilations: dil,
    })
}

fn conv_transpose_impl<T: Real>(
    a: &ConvTransposeAttrs,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() < 3 {
        return Err(invalid!(
            "ConvTranspose expects X of rank >= 3 [N, C, spatial...], got {xs:?}"
        ));
    }
    if ws.len() != xs.len() {
        return Err(invalid!(
            "ConvTranspose: W {ws:?} must have the same rank as X {xs:?}"
        ));
    }
    let group = a.conv.group;
    if group == 0 {
        return Err(invalid!("ConvTranspose: group must be >= 1, got 0"));
    }
    let (n, c) = (xs[0], xs[1]);
    if ws[0] != c {
        return Err(invalid!(
            "ConvTranspose: X {xs:?} has {c} channels but W {ws:?} expects {} (W.shape[0])",
            ws[0]
        ));
    }
    if c % group != 0 {
        return Err(invalid!(
            "ConvTranspose: {c} input channels (X {xs:?}) not divisible by group {group}"
        ));
    }
    let mg = ws[1];
    let m = mg * group;
    let cg = c / group;
    let kshape = &ws[2..];
    if kshape.contains(&0) {
        return Err(invalid!("ConvTranspose: W {ws:?} has an empty kernel"));
    }
    if !a.conv.kernel_shape.is_empty() && a.conv.kernel_shape != kshape {
        return Err(invalid!(
            "ConvTranspose: kernel_shape {:?} does not match W {ws:?}",
            a.conv.kernel_shape
        ));
    }
    let in_sp = &xs[2..];
    let TransposeGeometry {
        out: out_sp,
        pad_begin,
        strides,
        dilations: dil,
    } = conv_transpose_geometry(a, in_sp, kshape)?;
    let bias = match b {
        Some(b) => {
            if b.shape() != [m] {
                return Err(invalid!(
                    "ConvTranspose: bias B must have shape [{m}], got {:?}",
                    b.shape()
                ));
            }
            Some(values::<T>(b, "ConvTranspose B")?)
        }
        None => None,
    };
    let mut out_shape = vec![n, m];
    out_shape.extend_from_slice(&out_sp);
    let out_n = numel(&out_sp)?;
    let in_n = numel(in_sp)?;
    let kn = numel(kshape)?;
    let mut y = vec![T::ZERO; numel(&out_shape)?];
    if let Some(bias) = &bias {
        for (i, plane) in y.chunks_exact_mut(out_n.max(1)).enumerate() {
            plane.fill(bias[i % m]);
        }
    }
    if y.is_empty() || in_n == 0 || cg == 0 {
        return float_tensor(out_shape, y, x.dtype());
    }
    let xv = values::<T>(x, "ConvTranspose X")?;
    let wv = values::<T>(w, "ConvTranspose W")?;
    let nsp = in_sp.len();
    let last = nsp - 1;
    let mut taps = Vec::with_capacity(kn);
    let mut tap = vec![0usize; nsp];
    loop {
        taps.push(tap_offsets(&tap, &dil, &pad_begin));
        if !next_index(&mut tap, kshape) {
            break;
        }
    }
    let rows = mg * kn;
    // W^T per group: [mg*kn, cg].
    let wt: Vec<Vec<T>> = (0..group)
        .map(|g| transpose(&wv[g * cg * rows..(g + 1) * cg * rows], cg, rows))
        .collect();
    let mut col = vec![T::ZERO; rows * in_n];
    let s_last = strides[last];
    // A 2-D window exactly as big as the stride, unpadded (an upsampling
    // layer: PP-OCR's 2x2 stride 2): each output takes one tap, and the
    // taps of an output row interleave.
    let tiles = nsp == 2
        && kshape == strides.as_slice()
        && pad_begin.iter().all(|&p| p == 0)
        && dil.iter().all(|&d| d == 1);
    for ni in 0..n {
        for (gi, wtg) in wt.iter().enumerate() {
            let xg = &xv[(ni * c + gi * cg) * in_n..][..cg * in_n];
            T::product(rows, cg, in_n, wtg, xg, &mut col);
            let planes = &mut y[(ni * m + gi * mg) * out_n..(ni * m + (gi + 1) * mg) * out_n];
            let col = &col;
            if tiles {
                planes
                    .par_chunks_mut(out_n)
                    .enumerate()
                    .for_each(|(mi, yplane)| {
                        upsample_taps(
                            &col[mi * kn * in_n..][..kn * in_n],
                            in_sp,
                            &strides,
                            out_sp[1],
                            yplane,
                        )
                    });
                continue;
            }
            // col2im: scatter-add each (m, tap) row into its output plane,
            // the planes in parallel.
            planes
                .par_chunks_mut(out_n)
                .enumerate()
                .for_each(|(mi, yplane)| {
                    for (ti, offs) in taps.iter().enumerate() {
                        let crow = &col[(mi * kn + ti) * in_n..][..in_n];
                        let off = offs[last];
                        let (lo, hi) = valid_range(in_sp[last], s_last, off, out_sp[last]);
                        if lo >= hi {
                            continue;
                        }
                        for_each_row(in_sp, &out_sp, &strides, offs, |irow, orow| {
                            let dst0 =
                                (orow as isize + lo as isize * s_last as isize + off) as usize;
                            let src = &crow[irow + lo..irow + hi];
                            for (j, &v) in src.iter().enumerate() {
                                yplane[dst0 + j * s_last] += v;
                            }
                        });
                    }
                });
        }
    }
    float_tensor(out_shape, y, x.dtype())
}

/// One output plane of a 2-D ConvTranspose whose window is its stride
/// (`[sh, sw]`), unpadded: output `(iy * sh + ky, ix * sw + kx)` adds tap
/// `(ky, kx)`'s product row `taps[(ky * sw + kx) * in_n..]` at `(iy, ix)`.
/// One output row at a time, its taps interleaved in cache (the general
/// col2im walks the whole plane once per tap).
fn upsample_taps<T: Real>(
    taps: &[T],
    in_sp: &[usize],
    strides: &[usize],
    ow: usize,
    yplane: &mut [T],
) {
    let (ih, iw) = (in_sp[0], in_sp[1]);
    let (sh, sw) = (strides[0], strides[1]);
    let in_n = ih * iw;
    for iy in 0..ih {
        for ky in 0..sh {
            let orow = &mut yplane[(iy * sh + ky) * ow..][..iw * sw];
            let tap = |kx: usize| &taps[(ky * sw + kx) * in_n + iy * iw..][..iw];
            if sw == 2 {
                let (t0, t1) = (tap(0), tap(1));
                for ((o, &a), &b) in orow.chunks_exact_mut(2).zip(t0).zip(t1) {
                    o[0] += a;
                    o[1] += b;
                }
                continue;
            }
            for kx in 0..sw {
                for (j, &v) in tap(kx).iter().enumerate() {
                    orow[j * sw + kx] += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::*;

    fn attrs(
        auto_pad: AutoPad,
        group: usize,
        dil: &[usize],
        pads: &[usize],
        strides: &[usize],
    ) -> ConvAttrs {
        ConvAttrs {
            auto_pad,
            dilations: dil.to_vec(),
            group,
            kernel_shape: vec![],
            pads: pads.to_vec(),
            strides: strides.to_vec(),
        }
    }

    fn plain() -> ConvAttrs {
        attrs(AutoPad::NotSet, 1, &[], &[], &[])
    }

    /// Straightforward N-D convolution reference: for every output element,
    /// loop over input channels of its group and kernel taps.
    fn naive_conv(
        xs: &[usize],
        xv: &[f32],
        ws: &[usize],
        wv: &[f32],
        bias: Option<&[f32]>,
        group: usize,
        win: &Window,
    ) -> (Vec<usize>, Vec<f32>) {
        let nsp = xs.len() - 2;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let cg = c / group;
        let mg = m / group;
        let mut out_shape = vec![n, m];
        out_shape.extend_from_slice(&win.out);
        let total: usize = out_shape.iter().product();
        let mut y = vec![0.0f32; total];
        let kshape = &ws[2..];
        let kn: usize = kshape.iter().product();
        let in_sp = &xs[2..];
        for (flat, yv) in y.iter_mut().enumerate() {
            // Decompose the flat output index.
            let mut rem = flat;
            let mut oidx = vec![0; nsp];
            for a in (0..nsp).rev() {
                oidx[a] = rem % win.out[a];
                rem /= win.out[a];
            }
            let mi = rem % m;
            let ni = rem / m;
            let g = mi / mg;
            let mut acc = bias.map_or(0.0, |b| b[mi]) as f64;
            for ci in 0..cg {
                for t in 0..kn {
                    let mut trem = t;
                    let mut tidx = vec![0; nsp];
                    for a in (0..nsp).rev() {
                        tidx[a] = trem % kshape[a];
                        trem /= kshape[a];
                    }
                    let mut inside = true;
                    let mut xoff = 0usize;
                    for a in 0..nsp {
                        let p = (oidx[a] * win.strides[a] + tidx[a] * win.dilations[a]) as isize
                            - win.pad_begin[a] as isize;
                        if p < 0 || p >= in_sp[a] as isize {
                            inside = false;
                            break;
                        }
                        xoff = xoff * in_sp[a] + p as usize;
                    }
                    if !inside {
                        continue;
                    }
                    let xi = ((ni * c + g * cg + ci) * in_sp.iter().product::<usize>()) + xoff;
                    let wi = (mi * cg + ci) * kn + t;
                    acc += xv[xi] as f64 * wv[wi] as f64;
                }
            }
            *yv = acc as f32;
        }
        (out_shape, y)
    }

    #[test]
    fn one_channel_3x3_by_hand() {
        // X = 1..9 (3x3), W = [[1,0,0],[0,1,0],[0,0,1]] -> trace-ish sums.
        let x = t(&[1, 1, 3, 3], (1..=9).map(|v| v as f32).collect());
        let w = t(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let y = conv(&plain(), &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        // [1 2;4 5].[1 2;3 4] = 1+4+12+20 = 37, etc.
        assert_eq!(f32s(&y), vec![37.0, 47.0, 67.0, 77.0]);
        // With bias and pads 1: corners see a single input cell.
        let b = t(&[1], vec![0.5]);
        let y = conv(
            &attrs(AutoPad::NotSet, 1, &[], &[1, 1, 1, 1], &[]),
            &x,
            &w,
            Some(&b),
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 4]);
        let v = f32s(&y);
        assert_eq!(v[0], 4.0 * 1.0 + 0.5); // only x[0,0] under w[1,1]
        assert_eq!(v[15], 1.0 * 9.0 + 0.5); // only x[2,2] under w[0,0]
    }

    #[test]
    fn onnx_example_stride2_with_pads() {
        // ONNX Conv example: 5x7 input 0..35, 3x3 ones kernel, strides 2, pads 1.
        let x = t(&[1, 1, 7, 5], (0..35).map(|v| v as f32).collect());
        let w = t(&[1, 1, 3, 3], vec![1.0; 9]);
        let y = conv(
            &attrs(AutoPad::NotSet, 1, &[], &[1, 1, 1, 1], &[2, 2]),
            &x,
            &w,
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 3]);
        assert_eq!(
            f32s(&y),
            vec![12.0, 27.0, 24.0, 63.0, 108.0, 81.0, 123.0, 198.0, 141.0, 112.0, 177.0, 124.0]
        );
        // Pads only on the height axis.
        let y = conv(
            &attrs(AutoPad::NotSet, 1, &[], &[1, 0, 1, 0], &[2, 2]),
            &x,
            &w,
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 2]);
        assert_eq!(
            f32s(&y),
            vec![21.0, 33.0, 99.0, 117.0, 189.0, 207.0, 171.0, 183.0]
        );
    }

    #[test]
    fn same_upper_vs_same_lower_odd_padding() {
        // 1-D, input 4, kernel 2, stride 1: total pad 1.
        let x = t(&[1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let w = t(&[1, 1, 2], vec![1.0, 10.0]);
        let up = conv(&attrs(AutoPad::SameUpper, 1, &[], &[], &[]), &x, &w, None).unwrap();
        // Pad at the end: [1 2 3 4 0]
        assert_eq!(f32s(&up), vec![21.0, 32.0, 43.0, 4.0]);
        let lo = conv(&attrs(AutoPad::SameLower, 1, &[], &[], &[]), &x, &w, None).unwrap();
        // Pad at the start: [0 1 2 3 4]
        assert_eq!(f32s(&lo), vec![10.0, 21.0, 32.0, 43.0]);
        // VALID.
        let v = conv(&attrs(AutoPad::Valid, 1, &[], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&v), vec![21.0, 32.0, 43.0]);
        // SAME with stride 2 on 5: out 3, total = (3-1)*2+3-5 = 2.
        let x = t(&[1, 1, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let w = t(&[1, 1, 3], vec![1.0, 1.0, 1.0]);
        let y = conv(&attrs(AutoPad::SameUpper, 1, &[], &[], &[2]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![3.0, 9.0, 9.0]);
    }

    #[test]
    fn groups_depthwise_and_dilation() {
        // groups = 2: channel 0 uses filter 0, channel 1 uses filter 1.
        let x = t(&[1, 2, 1, 3], vec![1.0, 2.0, 3.0, 10.0, 20.0, 30.0]);
        let w = t(&[2, 1, 1, 2], vec![1.0, 1.0, 1.0, -1.0]);
        let y = conv(&attrs(AutoPad::NotSet, 2, &[], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[1, 2, 1, 2]);
        assert_eq!(f32s(&y), vec![3.0, 5.0, -10.0, -10.0]);
        // Dilation 2: taps 0 and 2.
        let x = t(&[1, 1, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let w = t(&[1, 1, 2], vec![1.0, 100.0]);
        let y = conv(&attrs(AutoPad::NotSet, 1, &[2], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![301.0, 402.0, 503.0]);
    }

    #[test]
    fn channel_validation_errors_state_shapes() {
        let x = t(&[1, 3, 4, 4], vec![0.0; 48]);
        let w = t(&[4, 2, 3, 3], vec![0.0; 72]);
        let e = conv(&attrs(AutoPad::NotSet, 1, &[], &[], &[]), &x, &w, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[1, 3, 4, 4]") && e.contains("[4, 2, 3, 3]"),
            "{e}"
        );
        let x = t(&[1, 4, 4, 4], vec![0.0; 64]);
        let w = t(&[3, 2, 3, 3], vec![0.0; 54]);
        let e = conv(&attrs(AutoPad::NotSet, 2, &[], &[], &[]), &x, &w, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("divisible by group 2"), "{e}");
        let w = t(&[2, 4, 5, 5], vec![0.0; 200]);
        assert!(conv(&plain(), &x, &w, None).is_err()); // kernel bigger than input
        let i = Tensor::from_vec(vec![1, 1, 1], vec![1i32]).unwrap();
        let e = conv(&plain(), &i, &i, None).unwrap_err();
        assert!(matches!(e, crate::KernelError::Unsupported(_)));
        assert!(e.to_string().contains("Conv on i32"));
    }

    #[test]
    fn im2col_matches_naive_on_random_shapes() {
        let mut rng = Rng::new(42);
        // (N, C, M, group, in spatial, kernel, strides, dilations, pads, auto_pad)
        type Case = (
            usize,
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
        let mut cases: Vec<Case> = vec![
            (
                1,
                1,
                1,
                1,
                vec![1],
                vec![1],
                vec![1],
                vec![1],
                vec![0, 0],
                AutoPad::NotSet,
            ),
            (
                2,
                3,
                4,
                1,
                vec![7],
                vec![3],
                vec![2],
                vec![1],
                vec![1, 2],
                AutoPad::NotSet,
            ),
            (
                1,
                4,
                6,
                2,
                vec![5, 6],
                vec![3, 2],
                vec![1, 2],
                vec![2, 1],
                vec![1, 0, 2, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                5,
                1,
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
                AutoPad::NotSet,
            ),
            (
                2,
                3,
                5,
                1,
                vec![4, 5],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                5,
                1,
                vec![9, 7],
                vec![1, 1],
                vec![2, 3],
                vec![1, 1],
                vec![0; 4],
                AutoPad::NotSet,
            ),
            (
                1,
                6,
                6,
                6,
                vec![5, 5],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                6,
                3,
                vec![6, 5],
                vec![3, 3],
                vec![2, 2],
                vec![1, 2],
                vec![1, 2, 0, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                2,
                3,
                1,
                vec![4, 5, 3],
                vec![2, 3, 2],
                vec![1, 2, 1],
                vec![1, 1, 2],
                vec![1, 0, 1, 0, 1, 1],
                AutoPad::NotSet,
            ),
            (
                1,
                2,
                2,
                2,
                vec![3, 4, 5],
                vec![2, 2, 2],
                vec![2, 1, 1],
                vec![1, 1, 1],
                vec![0; 6],
                AutoPad::NotSet,
            ),
            (
                1,
                3,
                2,
                1,
                vec![7, 6],
                vec![3, 4],
                vec![2, 3],
                vec![1, 1],
                vec![],
                AutoPad::SameUpper,
            ),
            (
                1,
                3,
                2,
                1,
                vec![7, 6],
                vec![3, 4],
                vec![2, 3],
                vec![1, 1],
                vec![],
                AutoPad::SameLower,
            ),
            (
                1,
                3,
                2,
                1,
                vec![7, 6],
                vec![2, 3],
                vec![3, 1],
                vec![2, 1],
                vec![],
                AutoPad::Valid,
            ),
            (
                1,
                1,
                1,
                1,
                vec![11],
                vec![4],
                vec![3],
                vec![3],
                vec![5, 5],
                AutoPad::NotSet,
            ),
        ];
        // Plus random ones.
        for _ in 0..30 {
            let nsp = 1 + rng.below(3);
            let group = 1 + rng.below(3);
            let cg = 1 + rng.below(3);
            let mg = 1 + rng.below(3);
            let mut ins = vec![];
            let mut ks = vec![];
            let mut ss = vec![];
            let mut ds = vec![];
            let mut ps = vec![0; 2 * nsp];
            for a in 0..nsp {
                let k = 1 + rng.below(3);
                let d = 1 + rng.below(2);
                let pb = rng.below(2);
                let pe = rng.below(3);
                let ext = (k - 1) * d + 1;
                let i = (ext + rng.below(5)).saturating_sub(pb + pe).max(1);
                ins.push(i);
                ks.push(k);
                ss.push(1 + rng.below(3));
                ds.push(d);
                ps[a] = pb;
                ps[nsp + a] = pe;
            }
            cases.push((
                1 + rng.below(2),
                cg * group,
                mg * group,
                group,
                ins,
                ks,
                ss,
                ds,
                ps,
                AutoPad::NotSet,
            ));
        }
        for (n, c, m, group, ins, ks, ss, ds, ps, ap) in cases {
            let mut xs = vec![n, c];
            xs.extend(&ins);
            let mut ws = vec![m, c / group];
            ws.extend(&ks);
            let xv = rng.vec(xs.iter().product());
            let wv = rng.vec(ws.iter().product());
            let bv = rng.vec(m);
            let a = ConvAttrs {
                auto_pad: ap,
                dilations: ds.clone(),
                group,
                kernel_shape: ks.clone(),
                pads: ps.clone(),
                strides: ss.clone(),
            };
            let x = t(&xs, xv.clone());
            let w = t(&ws, wv.clone());
            let b = t(&[m], bv.clone());
            let y = conv(&a, &x, &w, Some(&b)).unwrap();
            let win = resolve_window("Conv", &ins, &ks, &ss, &ds, &ps, ap, false).unwrap();
            let (shape, want) = naive_conv(&xs, &xv, &ws, &wv, Some(&bv), group, &win);
            assert_eq!(y.shape(), &shape[..], "case x{xs:?} w{ws:?}");
            assert_close(&f32s(&y), &want, 1e-4);
            // f64 path agrees.
            let x64 = Tensor::from_vec(xs.clone(), xv.iter().map(|&v| v as f64).collect()).unwrap();
            let w64 = Tensor::from_vec(ws.clone(), wv.iter().map(|&v| v as f64).collect()).unwrap();
            let y64 = conv(&a, &x64, &w64, Some(&b)).unwrap();
            let y64: Vec<f32> = y64
                .as_slice::<f64>()
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert_close(&y64, &want, 1e-4);
        }
    }

    #[test]
    fn empty_batch_and_f16() {
        let x = t(&[0, 2, 4, 4], vec![]);
        let w = t(&[3, 2, 3, 3], vec![0.5; 54]);
        let y = conv(&plain(), &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[0, 3, 2, 2]);
        let y = conv_transpose(
            &tattrs(&[], &[], &[], &[]),
            &x,
            &t(&[2, 3, 3, 3], vec![0.0; 54]),
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 3, 6, 6]);
        let h = |v: Vec<f32>| v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>();
        let x = Tensor::from_vec(vec![1, 1, 2], h(vec![1.0, 2.0])).unwrap();
        let w = Tensor::from_vec(vec![1, 1, 1], h(vec![3.0])).unwrap();
        let y = conv(&plain(), &x, &w, None).unwrap();
        assert_eq!(y.dtype(), kiln_ir::DType::F16);
        assert_eq!(y.as_slice::<half::f16>().unwrap()[1].to_f32(), 6.0);
    }

    fn tattrs(
        pads: &[usize],
        strides: &[usize],
        output_padding: &[usize],
        output_shape: &[usize],
    ) -> ConvTransposeAttrs {
        ConvTransposeAttrs {
            conv: attrs(AutoPad::NotSet, 1, &[], pads, strides),
            output_padding: output_padding.to_vec(),
            output_shape: output_shape.to_vec(),
        }
    }

    /// ConvTranspose reference: scatter every input element through the kernel.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv_transpose_1d(
        x: &[f32],
        c: usize,
        len: usize,
        w: &[f32],
        mg: usize,
        k: usize,
        group: usize,
        s: usize,
        d: usize,
        pb: isize,
        out_len: usize,
    ) -> Vec<f32> {
        let cg = c / group;
        let m = mg * group;
        let mut y = vec![0.0f32; m * out_len];
        for ci in 0..c {
            let g = ci / cg;
            for i in 0..len {
                for mi in 0..mg {
                    for kk in 0..k {
                        let o = (i * s + kk * d) as isize - pb;
                        if o >= 0 && (o as usize) < out_len {
                            y[(g * mg + mi) * out_len + o as usize] +=
                                x[ci * len + i] * w[(ci * mg + mi) * k + kk];
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv_transpose_1d_by_hand() {
        // ONNX example: x = [0,1,2], w = [[1,1,1],[1,1,1]] (2 output channels).
        let x = t(&[1, 1, 3], vec![0.0, 1.0, 2.0]);
        let w = t(&[1, 2, 3], vec![1.0; 6]);
        let y = conv_transpose(&tattrs(&[], &[], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[1, 2, 5]);
        assert_eq!(
            f32s(&y),
            vec![0.0, 1.0, 3.0, 3.0, 2.0, 0.0, 1.0, 3.0, 3.0, 2.0]
        );
        // Stride 2, kernel [1, 10]: y[2i] += x, y[2i+1] += 10x.
        let x = t(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        let w = t(&[1, 1, 2], vec![1.0, 10.0]);
        let b = t(&[1], vec![0.5]);
        let y = conv_transpose(&tattrs(&[], &[2], &[], &[]), &x, &w, Some(&b)).unwrap();
        assert_eq!(f32s(&y), vec![1.5, 10.5, 2.5, 20.5, 3.5, 30.5]);
        // pads crop begin/end; output_padding extends the end.
        let y = conv_transpose(&tattrs(&[1, 1], &[2], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![10.0, 2.0, 20.0, 3.0]);
        let y = conv_transpose(&tattrs(&[], &[2], &[1], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 0.0]);
    }

    #[test]
    fn conv_transpose_output_shape_and_auto_pad() {
        let x = t(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        let w = t(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        // Full extent: 2*(3-1)+3 = 7: [1, 2, 5, 4, 9, 6, 9].
        let full = conv_transpose(&tattrs(&[], &[2], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&full), vec![1.0, 2.0, 5.0, 4.0, 9.0, 6.0, 9.0]);
        // output_shape 6 (NOTSET): total pad 1 -> begin 1, end 0.
        let y = conv_transpose(&tattrs(&[], &[2], &[], &[6]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![2.0, 5.0, 4.0, 9.0, 6.0, 9.0]);
        // output_shape given with the full [N, C, L] form works too.
        let y = conv_transpose(&tattrs(&[], &[2], &[], &[1, 1, 6]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![2.0, 5.0, 4.0, 9.0, 6.0, 9.0]);
        // SAME_UPPER: output 3*2 = 6, total 1 -> begin 0, end 1.
        let mut a = tattrs(&[], &[2], &[], &[]);
        a.conv.auto_pad = AutoPad::SameUpper;
        let y = conv_transpose(&a, &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![1.0, 2.0, 5.0, 4.0, 9.0, 6.0]);
        a.conv.auto_pad = AutoPad::SameLower;
        let y = conv_transpose(&a, &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![2.0, 5.0, 4.0, 9.0, 6.0, 9.0]);
        // output_shape larger than the full extent: zeros appended at the end.
        let y = conv_transpose(&tattrs(&[], &[2], &[], &[8]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y), vec![1.0, 2.0, 5.0, 4.0, 9.0, 6.0, 9.0, 0.0]);
    }

    #[test]
    fn conv_transpose_onnx_2d_example() {
        // ONNX ConvTranspose example: X 3x3 = 0..8, W [1, 2, 3, 3] ones.
        let x = t(&[1, 1, 3, 3], (0..9).map(|v| v as f32).collect());
        let w = t(&[1, 2, 3, 3], vec![1.0; 18]);
        let y = conv_transpose(&tattrs(&[], &[], &[], &[]), &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[1, 2, 5, 5]);
        let want = [
            0.0, 1.0, 3.0, 3.0, 2.0, 3.0, 8.0, 15.0, 12.0, 7.0, 9.0, 21.0, 36.0, 27.0, 15.0, 9.0,
            20.0, 33.0, 24.0, 13.0, 6.0, 13.0, 21.0, 15.0, 8.0,
        ];
        let v = f32s(&y);
        assert_eq!(&v[..25], &want);
        assert_eq!(&v[25..], &want);
        // strides [3, 2], output_shape [10, 8] -> trailing zero row/col.
        let a = tattrs(&[], &[3, 2], &[], &[10, 8]);
        let y = conv_transpose(&a, &x, &w, None).unwrap();
        assert_eq!(y.shape(), &[1, 2, 10, 8]);
        let v = f32s(&y);
        assert_eq!(&v[0..8], &[0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0]);
        assert_eq!(&v[72..80], &[0.0; 8]);
        // Same with output_padding [1, 1] instead of output_shape.
        let y2 = conv_transpose(&tattrs(&[], &[3, 2], &[1, 1], &[]), &x, &w, None).unwrap();
        assert_eq!(f32s(&y2), v);
    }

    #[test]
    fn conv_transpose_random_1d_against_naive() {
        let mut rng = Rng::new(7);
        for _ in 0..40 {
            let group = 1 + rng.below(2);
            let cg = 1 + rng.below(3);
            let mg = 1 + rng.below(3);
            let c = cg * group;
            let len = 1 + rng.below(6);
            let k = 1 + rng.below(4);
            let s = 1 + rng.below(3);
            let d = 1 + rng.below(2);
            let pb = rng.below(2);
            let pe = rng.below(2);
            let full = s * (len - 1) + (k - 1) * d + 1;
            if full < pb + pe + 1 {
                continue;
            }
            let out_len = full - pb - pe;
            let xv = rng.vec(c * len);
            let wv = rng.vec(c * mg * k);
            let mut a = tattrs(&[pb, pe], &[s], &[], &[]);
            a.conv.dilations = vec![d];
            a.conv.group = group;
            let y = conv_transpose(
                &a,
                &t(&[1, c, len], xv.clone()),
                &t(&[c, mg, k], wv.clone()),
                None,
            )
            .unwrap();
            assert_eq!(y.shape(), &[1, mg * group, out_len]);
            let want =
                naive_conv_transpose_1d(&xv, c, len, &wv, mg, k, group, s, d, pb as isize, out_len);
            assert_close(&f32s(&y), &want, 1e-5);
        }
    }

    #[test]
    fn conv_transpose_f32_matches_the_f64_reference_2d() {
        // f32 runs the product on kiln_gemm's sgemm and the col2im planes
        // in parallel; f64 runs the blocked reference core. Groups, strides,
        // dilation, pads, output padding, several images, planes of up to
        // 40x40 with 32 channels (sgemm's threaded, tiled path).
        let cases: &[(
            usize,
            usize,
            usize,
            usize,
            [usize; 2],
            [usize; 2],
            [usize; 4],
        )] = &[
            (2, 4, 3, 1, [3, 3], [2, 2], [1, 1, 1, 1]),
            (1, 6, 4, 2, [4, 4], [2, 2], [1, 1, 1, 1]),
            (1, 32, 16, 1, [2, 2], [2, 2], [0, 0, 0, 0]),
            (1, 3, 5, 1, [3, 2], [1, 3], [0, 1, 2, 0]),
        ];
        let mut rng = Rng::new(5);
        for (ci, &(n, c, mg, group, k, s, pads)) in cases.iter().enumerate() {
            let (h, w) = if c >= 32 { (40, 40) } else { (7, 9) };
            let xv = rng.vec(n * c * h * w);
            let wv = rng.vec(c * mg * k[0] * k[1]);
            let bv = rng.vec(mg * group);
            let mut a = tattrs(&pads, &s, &[s[0] - 1, 0], &[]);
            a.conv.group = group;
            a.conv.dilations = vec![1, 2];
            let run = |dt: DType| {
                let cast = |shape: &[usize], v: &[f32]| {
                    let t32 = t(shape, v.to_vec());
                    crate::elementwise::cast(&t32, dt).unwrap()
                };
                let y = conv_transpose(
                    &a,
                    &cast(&[n, c, h, w], &xv),
                    &cast(&[c, mg, k[0], k[1]], &wv),
                    Some(&cast(&[mg * group], &bv)),
                )
                .unwrap();
                (y.shape().to_vec(), y.to_f64_vec().unwrap())
            };
            let (s32, y32) = run(DType::F32);
            let (s64, y64) = run(DType::F64);
            assert_eq!(s32, s64, "case {ci}");
            for (i, (a, b)) in y32.iter().zip(&y64).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "case {ci} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn conv_transpose_with_window_equal_to_stride_matches_the_definition() {
        // The upsampling path (each output takes one tap, rows interleaved):
        // 2x2 stride 2, 3x2 stride (3, 2), 1x3 stride (1, 3), with groups,
        // output padding (extra rows and columns: bias only), a batch;
        // against the scatter definition in f64.
        let cases: &[(usize, usize, usize, usize, [usize; 2], [usize; 2])] = &[
            (1, 8, 5, 1, [2, 2], [0, 0]),
            (2, 6, 3, 2, [3, 2], [2, 1]),
            (1, 4, 4, 1, [1, 3], [0, 2]),
        ];
        let mut rng = Rng::new(8);
        for (ci, &(n, c, mg, group, k, op)) in cases.iter().enumerate() {
            let (h, w) = (5, 7);
            let (xv, wv, bv) = (
                rng.vec(n * c * h * w),
                rng.vec(c * mg * k[0] * k[1]),
                rng.vec(mg * group),
            );
            let mut a = tattrs(&[0; 4], &k, &op, &[]);
            a.conv.group = group;
            let y = conv_transpose(
                &a,
                &t(&[n, c, h, w], xv.clone()),
                &t(&[c, mg, k[0], k[1]], wv.clone()),
                Some(&t(&[mg * group], bv.clone())),
            )
            .unwrap();
            let m = mg * group;
            let (oh, ow) = (h * k[0] + op[0], w * k[1] + op[1]);
            assert_eq!(y.shape(), &[n, m, oh, ow], "case {ci}");
            let cg = c / group;
            let mut want = vec![0f64; n * m * oh * ow];
            for ni in 0..n {
                for mo in 0..m {
                    let (g, mi) = (mo / mg, mo % mg);
                    for v in &mut want[(ni * m + mo) * oh * ow..][..oh * ow] {
                        *v = bv[mo] as f64;
                    }
                    for cl in 0..cg {
                        let ch = g * cg + cl;
                        for iy in 0..h {
                            for ix in 0..w {
                                let xval = xv[((ni * c + ch) * h + iy) * w + ix] as f64;
                                for ky in 0..k[0] {
                                    for kx in 0..k[1] {
                                        let wval = wv[((ch * mg + mi) * k[0] + ky) * k[1] + kx];
                                        let (oy, ox) = (iy * k[0] + ky, ix * k[1] + kx);
                                        want[((ni * m + mo) * oh + oy) * ow + ox] +=
                                            xval * wval as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (i, (&got, &w)) in f32s(&y).iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "case {ci} [{i}]: {got} vs {w}"
                );
            }
        }
    }

    #[test]
    fn conv_transpose_is_adjoint_of_conv_2d() {
        // <conv(x), y> == <x, conv_transpose(y)> for the same weights/geometry.
        let mut rng = Rng::new(11);
        let x = t(&[1, 2, 5, 6], rng.vec(60));
        let w = t(&[3, 2, 3, 2], rng.vec(36));
        let ca = attrs(AutoPad::NotSet, 1, &[1, 2], &[1, 0, 1, 1], &[2, 1]);
        let cx = conv(&ca, &x, &w, None).unwrap();
        let yv = rng.vec(cx.len());
        let y = t(cx.shape(), yv.clone());
        let ta = ConvTransposeAttrs {
            conv: ca.clone(),
            output_padding: vec![],
            output_shape: vec![],
        };
        let ty = conv_transpose(&ta, &y, &w, None).unwrap();
        assert_eq!(ty.shape(), x.shape());
        let lhs: f32 = f32s(&cx).iter().zip(&yv).map(|(a, b)| a * b).sum();
        let rhs: f32 = f32s(&x).iter().zip(f32s(&ty)).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }

    /// Every fast strategy (pointwise GEMM, tiled im2col GEMM, direct
    /// depthwise, the epilogue) against the naive conv and the reference.
    #[test]
    fn fast_strategies_match_naive() {
        let mut rng = Rng::new(77);
        // (N, C, M, group, in spatial, kernel, strides, dilations, pads)
        type Case = (
            usize,
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            // 3x3 over 16 channels on a 30x31 plane: the many-channel direct
            // kernel where AVX-512 exists (a GEMM elsewhere).
            (
                2,
                16,
                24,
                1,
                vec![30, 31],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1, 1, 1],
            ),
            // 1x1 stride 1 (pointwise, no copy), batch 2, odd sizes.
            (
                2,
                17,
                9,
                1,
                vec![9, 7],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
            ),
            // 1x1 stride 2 (im2col gather).
            (
                1,
                8,
                5,
                1,
                vec![9, 9],
                vec![1, 1],
                vec![2, 2],
                vec![1, 1],
                vec![0; 4],
            ),
            // 1x1 with pads (not pointwise).
            (
                1,
                3,
                2,
                1,
                vec![4, 5],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![1, 0, 0, 1],
            ),
            // 3x3 pad 1, stride 1 and 2, batch 2.
            (
                2,
                5,
                7,
                1,
                vec![11, 13],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                1,
                6,
                4,
                1,
                vec![12, 9],
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1; 4],
            ),
            // 7x7 stride 2 pad 3 (the ResNet stem).
            (
                1,
                3,
                8,
                1,
                vec![23, 21],
                vec![7, 7],
                vec![2, 2],
                vec![1, 1],
                vec![3; 4],
            ),
            // Large enough for several im2col tiles.
            (
                1,
                16,
                5,
                1,
                vec![40, 41],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            // Groups 2 of 5 channels (a grouped GEMM).
            (
                1,
                10,
                4,
                2,
                vec![8, 8],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                1,
                4,
                3,
                1,
                vec![10, 11],
                vec![3, 3],
                vec![1, 1],
                vec![2, 2],
                vec![2; 4],
            ),
            // Depthwise 3x3 / 5x5, stride 1 / 2, asymmetric pads, batch 2.
            (
                2,
                5,
                5,
                5,
                vec![9, 19],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![0, 1, 2, 1],
            ),
            (
                1,
                4,
                4,
                4,
                vec![10, 17],
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1, 0, 1, 2],
            ),
            (
                1,
                3,
                3,
                3,
                vec![12, 23],
                vec![5, 5],
                vec![1, 1],
                vec![1, 1],
                vec![2; 4],
            ),
            (
                2,
                3,
                3,
                3,
                vec![13, 22],
                vec![5, 5],
                vec![2, 2],
                vec![1, 1],
                vec![1, 2, 2, 1],
            ),
            // Depthwise: stride 3, dilation 2, a 7-wide kernel, rectangular.
            (
                1,
                2,
                2,
                2,
                vec![15, 20],
                vec![3, 3],
                vec![3, 3],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                1,
                2,
                2,
                2,
                vec![11, 12],
                vec![3, 3],
                vec![1, 1],
                vec![2, 2],
                vec![2; 4],
            ),
            (
                1,
                2,
                2,
                2,
                vec![11, 12],
                vec![7, 2],
                vec![1, 2],
                vec![1, 1],
                vec![3, 0, 3, 1],
            ),
            // Depthwise with the input narrower than the kernel (no interior).
            (
                1,
                2,
                2,
                2,
                vec![2, 3],
                vec![5, 5],
                vec![1, 1],
                vec![1, 1],
                vec![2; 4],
            ),
            // Channel multiplier (C 3 -> M 6, group 3).
            (
                1,
                3,
                6,
                3,
                vec![7, 8],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            // 1-D: general and depthwise.
            (2, 3, 4, 1, vec![17], vec![5], vec![2], vec![1], vec![2, 1]),
            // One input channel in one group (a GEMM, not the depthwise
            // kernel): an STFT-like wide window over few positions, and a
            // grayscale 3x3 stride-2 stem.
            (
                1,
                1,
                20,
                1,
                vec![80],
                vec![32],
                vec![16],
                vec![1],
                vec![0, 0],
            ),
            (
                2,
                1,
                6,
                1,
                vec![9, 11],
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1; 4],
            ),
            (1, 4, 4, 4, vec![33], vec![3], vec![1], vec![1], vec![1, 1]),
            (1, 4, 4, 4, vec![33], vec![5], vec![2], vec![1], vec![0, 3]),
            // 3-D: general and depthwise (no direct kernel: im2col path).
            (
                1,
                2,
                3,
                1,
                vec![5, 6, 7],
                vec![3, 3, 3],
                vec![1, 2, 1],
                vec![1, 1, 1],
                vec![1; 6],
            ),
            (
                1,
                3,
                3,
                3,
                vec![4, 5, 6],
                vec![3, 3, 3],
                vec![1, 1, 2],
                vec![1, 1, 1],
                vec![1; 6],
            ),
            // Big enough that the implicit im2col runs as several GEMMs
            // (column chunks across output rows, one image at a time), and
            // with strides, dilations and uneven pads on the wide panels.
            (
                2,
                32,
                24,
                1,
                vec![70, 70],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                2,
                16,
                20,
                1,
                vec![41, 37],
                vec![3, 3],
                vec![2, 1],
                vec![2, 1],
                vec![2, 1, 0, 3],
            ),
            // Few input channels per group (the direct few-channel kernel):
            // an RGB 7x7 stride-2 stem on two images, a 3x3 stride-2 stem on
            // an odd plane, a grouped conv of 2 channels per group with uneven
            // pads, a 1x1 stride-2 conv of 4 channels, a plane big enough
            // that only the phase padding is zeroed.
            (
                2,
                3,
                8,
                1,
                vec![23, 20],
                vec![7, 7],
                vec![2, 2],
                vec![1, 1],
                vec![3, 3, 3, 3],
            ),
            (
                1,
                3,
                5,
                1,
                vec![17, 15],
                vec![3, 3],
                vec![2, 2],
                vec![],
                vec![1, 1, 1, 1],
            ),
            (
                2,
                6,
                9,
                3,
                vec![9, 11],
                vec![3, 3],
                vec![],
                vec![1, 1],
                vec![0, 2, 1, 1],
            ),
            (
                1,
                4,
                6,
                1,
                vec![10, 9],
                vec![1, 1],
                vec![2, 2],
                vec![1, 1],
                vec![0; 4],
            ),
            (
                1,
                3,
                4,
                1,
                vec![70, 68],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1, 1, 1],
            ),
            // Strided GEMM convs through phase planes: dilation 2 with
            // uneven pads on two images, a row stride of 3 (no pair
            // deinterleave) over a 3x5 kernel, groups, several output tiles
            // of a 5x5 stride 2, and a column stride smaller than the row's.
            (
                2,
                8,
                10,
                1,
                vec![13, 14],
                vec![3, 3],
                vec![2, 2],
                vec![2, 2],
                vec![2, 1, 1, 2],
            ),
            (
                1,
                6,
                5,
                1,
                vec![11, 17],
                vec![3, 5],
                vec![1, 3],
                vec![1, 1],
                vec![1, 2, 0, 1],
            ),
            (
                2,
                12,
                8,
                2,
                vec![9, 10],
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                1,
                8,
                70,
                1,
                vec![30, 34],
                vec![5, 5],
                vec![2, 2],
                vec![1, 1],
                vec![2; 4],
            ),
            (
                1,
                8,
                6,
                1,
                vec![8, 9],
                vec![3, 3],
                vec![3, 2],
                vec![1, 1],
                vec![0; 4],
            ),
            // Output 1x1 and input 1x1.
            (
                1,
                4,
                3,
                1,
                vec![3, 3],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
            ),
            (
                1,
                4,
                3,
                1,
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
            ),
        ];
        let acts = [
            FusedAct::Identity,
            FusedAct::Relu,
            FusedAct::Clip {
                min: -0.5,
                max: 0.5,
            },
        ];
        for (ci, (n, c, m, group, ins, ks, ss, ds, ps)) in cases.into_iter().enumerate() {
            let mut xs = vec![n, c];
            xs.extend(&ins);
            let mut ws = vec![m, c / group];
            ws.extend(&ks);
            let xv = rng.vec(xs.iter().product());
            let wv = rng.vec(ws.iter().product());
            let bv = rng.vec(m);
            let a = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: ds.clone(),
                group,
                kernel_shape: ks.clone(),
                pads: ps.clone(),
                strides: ss.clone(),
            };
            let (x, w, b) = (t(&xs, xv.clone()), t(&ws, wv.clone()), t(&[m], bv.clone()));
            let win =
                resolve_window("Conv", &ins, &ks, &ss, &ds, &ps, AutoPad::NotSet, false).unwrap();
            let (shape, want) = naive_conv(&xs, &xv, &ws, &wv, Some(&bv), group, &win);
            // Plain Conv (the fast path for f32) and the reference.
            let y = conv(&a, &x, &w, Some(&b)).unwrap();
            assert_eq!(y.shape(), &shape[..], "case {ci}");
            assert_close(&f32s(&y), &want, 1e-4);
            let r = conv_reference(&a, &x, &w, Some(&b)).unwrap();
            assert_close(&f32s(&r), &want, 1e-4);
            // With packed weights (where the GEMM path runs) and an epilogue.
            let res = rng.vec(want.len());
            let act = acts[ci % acts.len()];
            let want_fused: Vec<f32> = want
                .iter()
                .zip(&res)
                .map(|(&v, &r)| act.eval(v + r))
                .collect();
            let res_t = t(&shape, res);
            // Both GEMM orientations, whichever the shape would pick.
            for positions in [false, true] {
                let packed = pack_conv_weights(&wv, m, group, positions);
                let weights = if uses_direct_kernel(group, c / group, &ks, &ss, &ds) {
                    ConvWeights::Raw(&w)
                } else {
                    ConvWeights::Packed(&packed)
                };
                let y = conv_f32(&a, &x, &ws, weights, Some(&b), Some(&res_t), act).unwrap();
                assert_close(&f32s(&y), &want_fused, 1e-4);
            }
        }
    }

    /// The `Gathered` product (X channels-last, each tap's channels read in
    /// place) against the naive conv: 1-D, 2-D and 3-D windows, stride,
    /// dilation, uneven and zero padding, a batch, channel counts below,
    /// at and past a vector and a k block, with and without a residual,
    /// and activations done in the product's registers (Relu, Clip) or on
    /// the planes after (Sigmoid, SiLU).
    #[test]
    fn gathered_conv_matches_naive() {
        let mut rng = Rng::new(91);
        // (N, C, M, in spatial, kernel, strides, dilations, pads)
        type Case = (
            usize,
            usize,
            usize,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            (
                1,
                64,
                64,
                vec![14, 14],
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1; 4],
            ),
            (
                2,
                16,
                70,
                vec![9, 11],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1, 0, 2, 1],
            ),
            (
                3,
                8,
                64,
                vec![7, 7],
                vec![3, 3],
                vec![2, 1],
                vec![2, 2],
                vec![2; 4],
            ),
            (
                1,
                130,
                65,
                vec![5, 6],
                vec![2, 3],
                vec![1, 2],
                vec![1, 1],
                vec![0; 4],
            ),
            (
                1,
                600,
                64,
                vec![4, 4],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![1; 4],
            ),
            // Channels past the most k per block (1024 here): k blocks
            // start inside a tap's segment.
            (
                1,
                1100,
                64,
                vec![3, 3],
                vec![2, 2],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
            ),
            (2, 24, 96, vec![20], vec![5], vec![3], vec![1], vec![2, 2]),
            (
                1,
                9,
                64,
                vec![4, 5, 6],
                vec![3, 2, 3],
                vec![1, 2, 1],
                vec![1, 1, 2],
                vec![1, 0, 1, 1, 1, 0],
            ),
            // A window larger than the padded input along one axis.
            (
                1,
                12,
                64,
                vec![3, 3],
                vec![3, 3],
                vec![1, 1],
                vec![1, 1],
                vec![0; 4],
            ),
        ];
        let acts = [
            FusedAct::Relu,
            FusedAct::Clip {
                min: -0.5,
                max: 0.5,
            },
            FusedAct::Sigmoid,
            FusedAct::Silu,
            FusedAct::Identity,
        ];
        for (ci, (n, c, m, ins, ks, ss, ds, ps)) in cases.into_iter().enumerate() {
            let mut xs = vec![n, c];
            xs.extend(&ins);
            let mut ws = vec![m, c];
            ws.extend(&ks);
            let xv = rng.vec(xs.iter().product());
            let wv = rng.vec(ws.iter().product());
            let bv = rng.vec(m);
            let a = ConvAttrs {
                auto_pad: AutoPad::NotSet,
                dilations: ds.clone(),
                group: 1,
                kernel_shape: ks.clone(),
                pads: ps.clone(),
                strides: ss.clone(),
            };
            let (x, b) = (t(&xs, xv.clone()), t(&[m], bv.clone()));
            let win =
                resolve_window("Conv", &ins, &ks, &ss, &ds, &ps, AutoPad::NotSet, false).unwrap();
            let (shape, want) = naive_conv(&xs, &xv, &ws, &wv, Some(&bv), 1, &win);
            let packed = pack_conv_weights_gathered(&wv, &ws);
            let res = rng.vec(want.len());
            let res_t = t(&shape, res.clone());
            for (ai, act) in acts.into_iter().enumerate() {
                for with_res in [false, true] {
                    let want: Vec<f32> = want
                        .iter()
                        .zip(&res)
                        .map(|(&v, &r)| act.eval(if with_res { v + r } else { v }))
                        .collect();
                    let residual = with_res.then_some(&res_t);
                    let y = conv_f32(
                        &a,
                        &x,
                        &ws,
                        ConvWeights::Packed(&packed),
                        Some(&b),
                        residual,
                        act,
                    )
                    .unwrap();
                    assert_eq!(y.shape(), &shape[..], "case {ci}");
                    let what = format!("case {ci} act {ai} residual {with_res}");
                    assert_close_in(what, &f32s(&y), &want, 1e-4);
                }
            }
            // A second run reuses the cached gather table; a batch of
            // another size builds it again (the table is per image, so
            // both must agree with the naive conv).
            let mut xs2 = xs.clone();
            xs2[0] = n + 1;
            let xv2 = rng.vec(xs2.iter().product());
            let (_, want2) = naive_conv(&xs2, &xv2, &ws, &wv, Some(&bv), 1, &win);
            let y2 = conv_f32(
                &a,
                &t(&xs2, xv2),
                &ws,
                ConvWeights::Packed(&packed),
                Some(&b),
                None,
                FusedAct::Identity,
            )
            .unwrap();
            assert_close(&f32s(&y2), &want2, 1e-4);
        }
    }

    #[test]
    fn fast_conv_edge_cases() {
        // No input channels: the output is the bias.
        let x = t(&[1, 0, 4, 4], vec![]);
        let w = t(&[3, 0, 3, 3], vec![]);
        let b = t(&[3], vec![1.0, -2.0, 3.0]);
        let y = conv(&plain(), &x, &w, Some(&b)).unwrap();
        assert_eq!(y.shape(), &[1, 3, 2, 2]);
        assert_eq!(f32s(&y), [[1.0; 4], [-2.0; 4], [3.0; 4]].concat());
        // Empty batch.
        let x = t(&[0, 2, 4, 4], vec![]);
        let w = t(&[2, 1, 3, 3], vec![0.5; 18]);
        let a = attrs(AutoPad::NotSet, 2, &[], &[], &[]);
        assert_eq!(conv(&a, &x, &w, None).unwrap().shape(), &[0, 2, 2, 2]);
        // NaN in X reaches the outputs that read it, through the GEMM path
        // (6 channels, group 1), the few-channel direct kernel (2 channels,
        // group 1) and the depthwise one (group 2); inf + finite stays inf.
        for (c, g) in [(6, 1), (2, 1), (2, 2)] {
            let mut xv = vec![1.0f32; 25 * c];
            xv[12] = f32::NAN; // channel 0, center
            xv[25] = f32::INFINITY; // channel 1, corner (0, 0)
            let x = t(&[1, c, 5, 5], xv);
            let w = t(&[2, c / g, 3, 3], vec![1.0; 18 * c / g]);
            let a = attrs(AutoPad::NotSet, g, &[], &[1; 4], &[2, 2]);
            let v = f32s(&conv(&a, &x, &w, None).unwrap());
            assert_eq!(v.len(), 18);
            // Output (1, 1) covers the center, (0, 0) the corner, (2, 2) neither.
            assert!(v[4].is_nan(), "C {c} group {g}: {v:?}");
            assert_eq!(v[9], f32::INFINITY, "C {c} group {g}: {v:?}");
            assert_eq!(v[13].is_nan(), g == 1, "C {c} group {g}: {v:?}");
            assert!(
                v[8].is_finite() && v[17].is_finite(),
                "C {c} group {g}: {v:?}"
            );
        }
        // A bias of the wrong shape or dtype is an error, not a panic.
        let x = t(&[1, 2, 4, 4], vec![0.0; 32]);
        let w = t(&[3, 2, 3, 3], vec![0.0; 54]);
        assert!(conv(&plain(), &x, &w, Some(&t(&[2], vec![0.0; 2]))).is_err());
        let res = t(&[1, 3, 3, 3], vec![0.0; 27]);
        let e = conv_f32(
            &plain(),
            &x,
            w.shape(),
            ConvWeights::Raw(&w),
            None,
            Some(&res),
            FusedAct::Relu,
        );
        assert!(e.unwrap_err().to_string().contains("residual"));
    }

    /// Depthwise through every instruction set this CPU has must agree.
    /// Which convs the direct kernels take by default, and which they can
    /// take when tuning picks them.
    #[test]
    fn direct_kernel_routing() {
        // Depthwise and channel multipliers: direct.
        assert!(uses_direct_kernel(8, 1, &[3, 3], &[1, 1], &[]));
        assert!(uses_direct_kernel(4, 1, &[5], &[2], &[]));
        // One input channel in one group: a GEMM, though the direct kernel
        // could run it.
        assert!(!uses_direct_kernel(1, 1, &[256], &[128], &[]));
        assert!(!uses_direct_kernel(1, 1, &[3, 3], &[2, 2], &[]));
        assert!(direct_possible(1, &[3, 3], &[2, 2], &[]));
        // 3-D windows: no direct kernel.
        assert!(!uses_direct_kernel(4, 1, &[3, 3, 3], &[], &[]));
        assert!(!direct_possible(1, &[3, 3, 3], &[], &[]));
    }

    #[test]
    fn depthwise_isas_agree() {
        let mut rng = Rng::new(78);
        // (H, W, k, stride, pads [top, left, bottom, right]): long rows, the
        // narrow planes of late layers, asymmetric and no padding, 1x1 planes.
        // The first three are big enough that only their padding is zeroed
        // (the scratch then holds stale values for the cases after them).
        for &(h, w, k, s, p) in &[
            (70, 66, 3, 1, [1, 1, 1, 1]),
            (90, 93, 3, 2, [1, 0, 1, 2]),
            (66, 70, 3, 1, [0, 2, 1, 1]),
            (13, 29, 3, 1, [1, 1, 1, 1]),
            (14, 31, 3, 2, [1, 1, 1, 1]),
            (12, 37, 5, 1, [2, 2, 2, 2]),
            (15, 33, 5, 2, [2, 2, 2, 2]),
            (7, 7, 3, 1, [1, 1, 1, 1]),
            (14, 14, 3, 2, [0, 0, 1, 1]),
            (14, 14, 3, 2, [1, 1, 1, 1]),
            (9, 6, 3, 1, [0, 0, 0, 0]),
            (8, 11, 3, 2, [0, 2, 1, 0]),
            (1, 1, 3, 1, [1, 1, 1, 1]),
            (2, 3, 5, 2, [2, 2, 2, 2]),
            (5, 5, 2, 1, [0, 0, 1, 1]),
            (6, 10, 4, 2, [1, 2, 2, 1]),
        ] {
            let c = 3;
            let xs = [2, c, h, w];
            let x = t(&xs, rng.vec(2 * c * h * w));
            let wt = t(&[c, 1, k, k], rng.vec(c * k * k));
            let a = attrs(AutoPad::NotSet, c, &[], &p, &[s, s]);
            let want = conv_reference(&a, &x, &wt, None).unwrap();
            let got = super::super::depthwise::all_isas(&a, &x, &wt);
            for g in got {
                assert_close(&g, &f32s(&want), 1e-5);
            }
        }
    }

    /// The channel-tiled depthwise kernel (16 channels per vector, small
    /// planes) with every epilogue form, against the reference conv followed
    /// by the epilogue in scalar code. Channel counts off the 16-lane block,
    /// several bands per plane, strides, dilations and asymmetric padding.
    #[test]
    fn depthwise_tiled_with_epilogues() {
        let mut rng = Rng::new(81);
        // (C, H, W, kernel, stride, dilation, pads [top, left, bottom, right])
        for (case, &(c, h, w, k, s, d, p)) in [
            (17, 7, 7, [3, 3], 1, 1, [1, 1, 1, 1]),
            (16, 14, 14, [3, 3], 2, 1, [1, 1, 1, 1]),
            (40, 27, 27, [3, 3], 1, 1, [1, 1, 1, 1]),
            (5, 28, 28, [5, 5], 1, 1, [2, 2, 2, 2]),
            (33, 13, 11, [3, 3], 2, 1, [0, 1, 1, 0]),
            (15, 9, 9, [3, 3], 1, 2, [2, 2, 2, 2]),
            (3, 11, 10, [1, 3], 3, 1, [0, 1, 0, 1]),
            (20, 12, 12, [7, 7], 1, 1, [3, 3, 3, 3]),
            (1, 1, 1, [3, 3], 1, 1, [1, 1, 1, 1]),
        ]
        .iter()
        .enumerate()
        {
            let n = 2;
            let x = t(&[n, c, h, w], rng.vec(n * c * h * w));
            let wt = t(&[c, 1, k[0], k[1]], rng.vec(c * k[0] * k[1]));
            let bias = t(&[c], rng.vec(c));
            let a = attrs(AutoPad::NotSet, c, &[d, d], &p, &[s, s]);
            let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
            assert!(
                !std::is_x86_feature_detected!("avx512f")
                    || super::super::depthwise::takes_tiled(&geo),
                "case {case}: the tiled kernel does not take {geo:?}"
            );
            let plain = f32s(&conv_reference(&a, &x, &wt, Some(&bias)).unwrap());
            let res = t(
                &[n, c, geo.out_shape[2], geo.out_shape[3]],
                rng.vec(plain.len()),
            );
            let w = ConvWeights::Raw(&wt);
            check_epilogues(
                &a,
                &x,
                wt.shape(),
                w,
                &bias,
                &plain,
                &res,
                |_, _, got, want| assert_close(got, want, 1e-5),
            );
        }
        // 1-D depthwise (a plane of height 1), strided and padded.
        let (c, l) = (20, 50);
        let x = t(&[2, c, l], rng.vec(2 * c * l));
        let wt = t(&[c, 1, 5], rng.vec(c * 5));
        let a = attrs(AutoPad::NotSet, c, &[], &[2, 1], &[2]);
        let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
        assert!(
            !std::is_x86_feature_detected!("avx512f") || super::super::depthwise::takes_tiled(&geo)
        );
        let want = f32s(&conv_reference(&a, &x, &wt, None).unwrap());
        let got = conv_f32(
            &a,
            &x,
            wt.shape(),
            ConvWeights::Raw(&wt),
            None,
            None,
            FusedAct::Identity,
        );
        assert_close(&f32s(&got.unwrap()), &want, 1e-5);
    }

    /// The 3x3 row kernel (AVX-512: depthwise planes too big for the
    /// channel-tiled kernel) against the reference, with every epilogue:
    /// strides 1 and 2, symmetric, asymmetric and 2-wide pads, no pads,
    /// output rows of exactly 16, 17 (a 1-lane tail), 10 (one partial
    /// vector) and odd widths, odd and even heights and a single row (stride
    /// 1 takes rows in pairs), and a channel multiplier of 2.
    #[test]
    fn depthwise_rows_with_epilogues() {
        let mut rng = Rng::new(83);
        // (C, M, H, W, stride, pads [top, left, bottom, right])
        for (case, &(c, m, h, w, s, p)) in [
            (5, 5, 40, 37, 1, [1, 1, 1, 1]),
            (3, 3, 64, 50, 2, [1, 1, 1, 1]),
            (4, 4, 61, 70, 2, [0, 1, 1, 0]),
            (6, 6, 31, 31, 1, [0, 0, 0, 0]),
            (2, 2, 40, 17, 1, [2, 2, 2, 2]),
            (3, 3, 70, 45, 2, [2, 2, 1, 2]),
            (2, 2, 60, 17, 1, [1, 1, 1, 1]),
            (2, 2, 60, 16, 1, [0, 1, 0, 1]),
            (3, 6, 33, 66, 2, [1, 1, 1, 1]),
            (2, 2, 90, 10, 1, [1, 1, 1, 1]),
            (2, 2, 180, 20, 2, [1, 1, 1, 1]),
            // Stride 1 runs output rows in pairs: an odd height (the last row
            // alone, over the bottom padding) and a single row.
            (4, 4, 39, 21, 1, [1, 1, 1, 1]),
            (2, 2, 3, 900, 1, [0, 0, 0, 0]),
            // A stride-1 28x28 plane, which rows of 28 take from the tiled kernel.
            (16, 16, 28, 28, 1, [1, 1, 1, 1]),
            // Stride 2 onto a 28x28 plane: small enough for the channel-tiled
            // kernel, which stride 2 leaves to the row kernel.
            (16, 16, 56, 56, 2, [1, 1, 1, 1]),
        ]
        .iter()
        .enumerate()
        {
            let n = 2;
            let x = t(&[n, c, h, w], rng.vec(n * c * h * w));
            let wt = t(&[m, 1, 3, 3], rng.vec(m * 9));
            let bias = t(&[m], rng.vec(m));
            let a = attrs(AutoPad::NotSet, c, &[1, 1], &p, &[s, s]);
            let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
            assert!(
                !std::is_x86_feature_detected!("avx512f")
                    || super::super::depthwise::takes_rows(&geo),
                "case {case}: the row kernel does not take {geo:?}"
            );
            let plain = f32s(&conv_reference(&a, &x, &wt, Some(&bias)).unwrap());
            let res = t(&geo.out_shape, rng.vec(plain.len()));
            let w = ConvWeights::Raw(&wt);
            check_epilogues(
                &a,
                &x,
                wt.shape(),
                w,
                &bias,
                &plain,
                &res,
                |_, _, got, want| assert_close(got, want, 1e-5),
            );
        }
    }

    /// The blocked direct kernel (few input channels per group, or many on
    /// wide planes) with every epilogue: on AVX-512 the bias and Relu/Clip
    /// run in its registers, the rest after.
    #[test]
    fn blocked_direct_with_epilogues() {
        let mut rng = Rng::new(84);
        // (C, M, group, H, W, kernel, stride, pads): an RGB stem (8-channel
        // blocks), a 7x7 stem, a grouped few-channel conv (blocks of 2), and
        // 16 channels on a 56-wide plane.
        for (case, &(c, m, group, h, w, k, s, p)) in [
            (3, 32, 1, 33, 35, 3, 2, 1),
            (3, 16, 1, 40, 38, 7, 2, 3),
            (6, 4, 2, 17, 19, 3, 1, 1),
            (16, 8, 1, 20, 56, 3, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let n = 2;
            let x = t(&[n, c, h, w], rng.vec(n * c * h * w));
            let wt = t(&[m, c / group, k, k], rng.vec(m * c / group * k * k));
            let bias = t(&[m], rng.vec(m));
            let a = attrs(AutoPad::NotSet, group, &[1, 1], &[p; 4], &[s, s]);
            let geo = conv_geometry(&a, x.shape(), wt.shape()).unwrap();
            let plain = f32s(&conv_reference(&a, &x, &wt, Some(&bias)).unwrap());
            let res = t(&geo.out_shape, rng.vec(plain.len()));
            let w = ConvWeights::Raw(&wt);
            check_epilogues(
                &a,
                &x,
                wt.shape(),
                w,
                &bias,
                &plain,
                &res,
                |act, with_res, got, want| {
                    let what = format!("case {case} {act:?} residual {with_res}");
                    assert_close_in(what, got, want, 1e-4);
                },
            );
        }
    }

    /// The few-channel direct kernel through every instruction set.
    #[test]
    fn few_channel_isas_agree() {
        let mut rng = Rng::new(79);
        // (C, M, group, H, W, k, stride, pads): stems, grouped, big planes
        // first so later cases run on stale scratch.
        for &(c, m, group, h, w, k, s, p) in &[
            (3, 6, 1, 75, 70, 3, 1, [1, 1, 1, 1]),
            (3, 5, 1, 90, 93, 7, 2, [3, 3, 3, 3]),
            (3, 8, 1, 17, 15, 3, 2, [1, 1, 1, 1]),
            (4, 6, 2, 9, 11, 3, 1, [0, 2, 1, 1]),
            (8, 4, 2, 10, 9, 5, 2, [2, 1, 2, 0]),
            (2, 3, 1, 6, 5, 1, 2, [0, 0, 0, 0]),
            (3, 4, 1, 2, 3, 5, 2, [2, 2, 2, 2]),
            // Many channels on wide planes (3 vectors per block; 6 output
            // channels per group take blocks of 2).
            (16, 16, 1, 30, 31, 3, 1, [1, 1, 1, 1]),
            (24, 12, 2, 29, 40, 5, 1, [2, 1, 2, 0]),
            // Many channels at stride 2 and on narrow rows (tuning's
            // candidates), odd sizes and uneven pads.
            (16, 32, 1, 33, 35, 3, 2, [1, 1, 1, 1]),
            (12, 8, 1, 9, 10, 3, 2, [0, 1, 1, 0]),
            (10, 16, 1, 7, 6, 3, 1, [1, 1, 1, 1]),
        ] {
            let xs = [2, c, h, w];
            let x = t(&xs, rng.vec(2 * c * h * w));
            let wt = t(&[m, c / group, k, k], rng.vec(m * (c / group) * k * k));
            let a = attrs(AutoPad::NotSet, group, &[], &p, &[s, s]);
            let want = conv_reference(&a, &x, &wt, None).unwrap();
            let got = super::super::depthwise::all_isas(&a, &x, &wt);
            for g in got {
                assert_close(&g, &f32s(&want), 1e-5);
            }
        }
    }

    /// Rough Conv speed on ResNet-50-like layers: `cargo test -p kiln-cpu
    /// --release -- --ignored conv_speed --nocapture`.
    #[test]
    #[ignore]
    fn conv_speed() {
        let mut rng = Rng::new(5);
        // (C, M, H, k, stride, pad, group)
        for &(c, m, h, k, s, p, g) in &[
            (3, 64, 224, 7, 2, 3, 1),
            (64, 64, 56, 3, 1, 1, 1),
            (256, 64, 56, 1, 1, 0, 1),
            (512, 512, 7, 3, 1, 1, 1),
            (128, 128, 56, 3, 1, 1, 128),
            (32, 32, 112, 3, 1, 1, 32),
            (144, 144, 56, 3, 2, 1, 144),
        ] {
            let x = t(&[1, c, h, h], rng.vec(c * h * h));
            let w = t(&[m, c / g, k, k], rng.vec(m * (c / g) * k * k));
            let a = attrs(AutoPad::NotSet, g, &[], &[p; 4], &[s, s]);
            let y = conv(&a, &x, &w, None).unwrap();
            // Best of 5: the machine is shared, the minimum is the least noisy.
            let mut secs = f64::MAX;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                std::hint::black_box(conv(&a, &x, &w, None).unwrap());
                secs = secs.min(start.elapsed().as_secs_f64());
            }
            let flops = 2.0 * y.len() as f64 * (c / g * k * k) as f64;
            println!(
                "conv C={c} M={m} {h}x{h} k={k} s={s} g={g}: {:.2} ms, {:.2} GFLOP/s",
                secs * 1e3,
                flops / secs / 1e9
            );
        }
    }

    #[test]
    fn window_ceil_mode_drops_window_starting_in_padding() {
        // in 5, k 2, s 2, pads 0/1, ceil: span (5+1-2)=4 -> ceil(4/2)+1 = 3; last
        // window starts at 4 < 5 -> kept.
        let w = resolve_window("P", &[5], &[2], &[2], &[], &[0, 1], AutoPad::NotSet, true).unwrap();
        assert_eq!(w.out, vec![3]);
        // in 4, k 2, s 2, pads 1/1, ceil: span 4 -> 3; last start (3-1)*2=4 >= 4+1? no -> 3.
        let w = resolve_window("P", &[4], &[2], &[2], &[], &[1, 1], AutoPad::NotSet, true).unwrap();
        assert_eq!(w.out, vec![3]);
        // in 4, k 3, s 3, pads 0/2, ceil: span 3 -> 2; last start 3 < 4 -> 2.
        // in 3, k 1, s 2, pads 0/1, ceil: span 3 -> 3; last start 4 >= 3 -> dropped -> 2.
        let w = resolve_window("P", &[3], &[1], &[2], &[], &[0, 1], AutoPad::NotSet, true).unwrap();
        assert_eq!(w.out, vec![2]);
        assert!(resolve_window("P", &[3], &[2, 2], &[], &[], &[], AutoPad::NotSet, false).is_err());
    }
}
