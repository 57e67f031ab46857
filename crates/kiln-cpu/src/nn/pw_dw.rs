//! A pointwise conv feeding a 3x3 depthwise conv (a MobileNet block's
//! expansion and the depthwise conv after it), run as one kernel on NCHW
//! tensors, on AVX-512.
//!
//! Run apart, the expansion writes its output (for MobileNetV2's 16 -> 96 on
//! 112x112, 4.8 MB per image; 38 MB at batch 8) and the depthwise conv reads
//! it back, from L3 or memory. Here a task takes one image and a band of
//! output rows: it packs the band's input rows of X once, then per group of
//! 6 expanded channels (one row panel of the GEMM microkernel) the GEMM
//! `W1[6, C] x X[C, band]` writes those 6 channels' rows, with the bias and
//! Relu/Clip done in its registers, into a thread-local scratch that stays
//! in L1/L2, and the depthwise row kernel (`depthwise_rows`) reads them from
//! there into Y. Nothing of the expansion reaches memory. The rows a band's
//! window shares with the next one (1 at stride 2, 2 at stride 1) are
//! computed by both.
//!
//! The reference is the two convs run apart.

use super::conv::Epi;
use super::depthwise::Plane2d;
use crate::{invalid, Result};
use kiln_gemm::{Lhs, MatRef, PackedB, Rhs};
use kiln_ir::{ConvAttrs, FusedAct, Tensor};
use rayon::prelude::*;

/// Expanded channels per task: the AVX-512 microkernel's row panel.
const GROUP: usize = 6;

thread_local! {
    /// A task's expanded planes.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The two convs: a pointwise one from `c` to `m` channels and a depthwise
/// one over those `m` channels.
pub(crate) struct PwDw<'a> {
    pub c: usize,
    pub m: usize,
    /// The pointwise weights, `[m, c]` row-major.
    pub w1: &'a [f32],
    pub b1: Option<&'a [f32]>,
    pub act1: FusedAct,
    /// The depthwise weights, `[m, 9]`.
    pub wd: &'a [f32],
    pub bd: Option<&'a [f32]>,
    pub act2: FusedAct,
    /// The depthwise conv's plane geometry (its input plane is X's).
    pub g: Plane2d,
}

/// Whether [`run`] takes a depthwise conv of geometry `g`: where the row
/// kernel does (3x3, stride 1 or 2, AVX-512).
pub(crate) fn applies(g: &Plane2d) -> bool {
    super::depthwise_rows::applies(g)
}

/// Whether one kernel beats the two convs run apart, for `n` images of `m`
/// expanded channels of `plane` positions each: where the expansion is half
/// the L3 or more, so that apart it goes to memory and back. Timed on 2
/// threads (Zen 5, 1 MB L2, 32 MB L3), apart against one kernel, in
/// MobileNetV2: at batch 8, 16 -> 96 on 112x112 (38 MB) 2.64 -> 2.20-2.43
/// ms. Where the expansion stays in the caches one kernel was no faster
/// or slower: batch 8, 24 -> 144 on 56x56, 1.37-1.38 ms both ways; batch 1
/// (the pair alone in a model, with one kernel forced), 16 -> 96 on 112x112
/// 0.29 apart against 0.30-0.32 ms, 24 -> 144 on 56x56 0.17 against 0.26,
/// 32 -> 192 on 28x28 0.12 against 0.26 (thin bands there: the rows two
/// bands share are computed twice, and the packed X is not amortized).
fn pays(n: usize, m: usize, plane: usize) -> bool {
    let l3 = kiln_hw::cpu().caches.l3.unwrap_or(8 << 20);
    let expansion = n
        .saturating_mul(m)
        .saturating_mul(plane)
        .saturating_mul(std::mem::size_of::<f32>());
    expansion >= l3 / 2
}

/// The depthwise conv's plane geometry when the kernel takes these shapes:
/// 2-D, X `[n, c, h, w]`, `m` expanded channels, a depthwise conv the row
/// kernel takes. (Whether it pays is [`pays`].)
fn one_kernel_plan(
    x_shape: &[usize],
    m: usize,
    dw: &ConvAttrs,
    wd_shape: &[usize],
) -> Result<Option<Plane2d>> {
    let &[n, _, h, w] = x_shape else {
        return Ok(None);
    };
    let geo = super::conv::conv_geometry(dw, &[n, m, h, w], wd_shape)?;
    if geo.in_sp.len() != 2 || geo.group != m || geo.cg != 1 || geo.mg != 1 {
        return Ok(None);
    }
    let g = super::depthwise::plane2d(&geo);
    Ok(applies(&g).then_some(g))
}

/// Whether [`pointwise_depthwise_f32`] may run a pair as one kernel on this
/// CPU: X `[n?, c, h, w]` (`n` unknown: some batch may), `m` expanded
/// channels, the depthwise conv `dw` with weights of `wd_shape`.
pub(crate) fn one_kernel(
    n: Option<usize>,
    [c, h, w]: [usize; 3],
    m: usize,
    dw: &ConvAttrs,
    wd_shape: &[usize],
) -> bool {
    let fits = matches!(one_kernel_plan(&[1, c, h, w], m, dw, wd_shape), Ok(Some(_)));
    fits && n.is_none_or(|n| pays(n, m, h * w))
}

/// `FusedOp::PointwiseDepthwise` on f32 NCHW tensors in one kernel, where it
/// applies ([`applies`]: 2-D, AVX-512, a 3x3 depthwise conv of stride 1 or
/// 2) and pays ([`pays`]); `Ok(None)` elsewhere (the caller runs the two
/// convs apart). The unit test below runs the kernel on small shapes
/// through [`run`], whatever [`pays`] says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pointwise_depthwise_f32(
    pw_act: FusedAct,
    dw: &ConvAttrs,
    act: FusedAct,
    x: &Tensor,
    w1: &Tensor,
    b1: Option<&Tensor>,
    wd: &Tensor,
    bd: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (Some(xv), Some(w1v), Some(wdv)) = (
        x.as_slice::<f32>(),
        w1.as_slice::<f32>(),
        wd.as_slice::<f32>(),
    ) else {
        return Ok(None);
    };
    let (&[n, c, h, w], &[m, wc, 1, 1]) = (x.shape(), w1.shape()) else {
        return Ok(None);
    };
    if wc != c {
        return Err(invalid!(
            "FusedPointwiseDepthwise: X {:?} does not match the pointwise weights {:?}",
            x.shape(),
            w1.shape()
        ));
    }
    // No input channels: the expansion is its bias alone (the two convs).
    if c == 0 {
        return Ok(None);
    }
    let Some(g) = one_kernel_plan(&[n, c, h, w], m, dw, wd.shape())? else {
        return Ok(None);
    };
    if !pays(n, m, h * w) {
        return Ok(None);
    }
    let b1 = crate::util::f32_of_shape(b1, &[m], "FusedPointwiseDepthwise: pointwise bias")?;
    let bd = crate::util::f32_of_shape(bd, &[m], "FusedPointwiseDepthwise: depthwise bias")?;
    let p = PwDw {
        c,
        m,
        w1: w1v,
        b1,
        act1: pw_act,
        wd: wdv,
        bd,
        act2: act,
        g,
    };
    let mut y = crate::buffers::take_f32(n * m * g.oh * g.ow);
    run(&p, n, xv, &mut y);
    Ok(Some(crate::util::tensor(
        vec![n, m, g.oh, g.ow],
        kiln_ir::TensorData::F32(y),
    )?))
}

/// Y `[n, m, oh, ow]` from X `[n, c, ih, iw]`.
pub(crate) fn run(p: &PwDw<'_>, n: usize, x: &[f32], y: &mut [f32]) {
    run_in_bands(p, n, x, y, band_rows(n, p, &p.g))
}

/// [`run`] in tasks of `band` output rows (tests try every band).
fn run_in_bands(p: &PwDw<'_>, n: usize, x: &[f32], y: &mut [f32], band: usize) {
    let g = &p.g;
    let (hw, ohw) = (g.ih * g.iw, g.oh * g.ow);
    assert!(
        applies(g)
            && p.c > 0
            && x.len() == n * p.c * hw
            && y.len() == n * p.m * ohw
            && p.w1.len() == p.m * p.c
            && p.wd.len() == p.m * 9
            && p.b1.is_none_or(|b| b.len() == p.m)
            && p.bd.is_none_or(|b| b.len() == p.m),
        "pointwise-depthwise buffers do not match {n} x {} -> {} channels of {g:?}",
        p.c,
        p.m
    );
    if y.is_empty() {
        return;
    }
    let epi1 = Epi {
        bias: p.b1,
        res: None,
        act: p.act1,
        m: p.m,
        out_n: hw,
    };
    let epi2 = Epi {
        bias: p.bd,
        res: None,
        act: p.act2,
        m: p.m,
        out_n: ohw,
    };
    let band = band.clamp(1, g.oh.max(1));
    let bands = g.oh.div_ceil(band);
    let out = super::SharedOut(y.as_mut_ptr());
    (0..n * bands).into_par_iter().for_each(|t| {
        let (ni, o0) = (t / bands, (t % bands) * band);
        let o1 = (o0 + band).min(g.oh);
        // The band's input rows, and its geometry as a plane of its own:
        // padding above only in the first band, below where the rows run
        // out (the row kernel reads rows past `ih` as zeros).
        // (A band past the input's last row, under a bottom pad wider than
        // the window, reads only padding: no rows.)
        let top = (o0 * g.sh).saturating_sub(g.ph).min(g.ih);
        let bottom = ((o1 - 1) * g.sh + g.kh)
            .saturating_sub(g.ph)
            .min(g.ih)
            .max(top);
        let sub = Plane2d {
            ih: bottom - top,
            ph: g.ph.saturating_sub(o0 * g.sh),
            oh: o1 - o0,
            ..*g
        };
        let (sub_hw, sub_ohw) = (sub.ih * g.iw, sub.oh * g.ow);
        // The band's X, packed once for all its channel groups: read in
        // place, its C rows lie a plane apart, and the microkernel's loads
        // from that many streams ran at half the packed rate.
        let xi = &x[ni * p.c * hw + top * g.iw..(ni + 1) * p.c * hw];
        let b = PackedB::new(MatRef::new(xi, p.c, sub_hw, hw, 1));
        // Taken out of the thread-local for the task, not borrowed: a GEMM
        // big enough to run in parallel lets rayon start another band task
        // on this thread while this one waits.
        let mut s = SCRATCH.with(|c| c.take());
        if s.len() < GROUP * sub_hw {
            s.resize(GROUP * sub_hw, 0.0);
        }
        {
            for g0 in (0..p.m).step_by(GROUP) {
                let rows = GROUP.min(p.m - g0);
                let planes = &mut s[..rows * sub_hw];
                let a = MatRef::row_major(&p.w1[g0 * p.c..(g0 + rows) * p.c], rows, p.c);
                let (finish, act_left) = epi1.channel_rows_finish(ni, g0, 0);
                let act = |_row: usize, _col0: usize, vals: &mut [f32]| epi1.act_only(vals);
                kiln_gemm::sgemm_fused(
                    1.0,
                    Lhs::Mat(a),
                    Rhs::Packed(&b),
                    0.0,
                    planes,
                    sub_hw,
                    &finish,
                    if act_left { Some(&act) } else { None },
                );
                for j in 0..rows {
                    let ch = g0 + j;
                    // SAFETY: task t alone writes output rows o0..o1 of
                    // image ni (every channel), inside `y` (length
                    // asserted); `y` outlives the loop.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.get().add((ni * p.m + ch) * ohw + o0 * g.ow),
                            sub_ohw,
                        )
                    };
                    super::depthwise_rows::plane(
                        &sub,
                        &planes[j * sub_hw..(j + 1) * sub_hw],
                        &p.wd[ch * 9..(ch + 1) * 9],
                        dst,
                        // (No residual: the plane kernel's positions need
                        // not be the band's.)
                        &epi2,
                        ni,
                        ch,
                    );
                }
            }
        }
        SCRATCH.with(|c| c.replace(s));
    });
}

/// Output rows per task: as many as keep the band's packed X (`c`
/// channels) within a quarter of L2, and enough bands over the batch for 4
/// tasks per thread.
fn band_rows(n: usize, p: &PwDw<'_>, g: &Plane2d) -> usize {
    let l2 = kiln_hw::cpu().caches.l2.unwrap_or(512 << 10);
    let row_bytes = p.c.max(1) * g.iw * std::mem::size_of::<f32>();
    let rows_in = (l2 / 4 / row_bytes.max(1)).max(g.kh);
    let by_cache = ((rows_in - g.kh) / g.sh + 1).max(1);
    let want_bands = (4 * rayon::current_num_threads()).div_ceil(n.max(1));
    by_cache
        .min(g.oh.div_ceil(want_bands.max(1)))
        .clamp(1, g.oh.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused;
    use crate::nn::test_util::{assert_close_in, f32s, t, Rng};
    use kiln_ir::{AutoPad, ConvAttrs, FusedOp, Tensor};

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        t(shape, Rng::new(seed).vec(shape.iter().product()))
    }

    fn conv_attrs(k: usize, stride: usize, pad: usize, group: usize) -> ConvAttrs {
        ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![1, 1],
            group,
            kernel_shape: vec![k, k],
            pads: vec![pad; 4],
            strides: vec![stride, stride],
        }
    }

    /// The two convs apart, through the fused-op runner, against [`run`]:
    /// channel counts that leave a partial group, strides 1 and 2, odd and
    /// even planes, every activation placement.
    #[test]
    fn matches_the_two_convs_run_apart() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU (the kernel needs it)");
            return;
        }
        let clip = FusedAct::Clip { min: 0.0, max: 6.0 };
        let (id, relu, hs) = (FusedAct::Identity, FusedAct::Relu, FusedAct::HardSwish);
        // (N, C, M, H, W, stride, pad begin, pad end, acts): channel counts
        // that leave a partial group (a last group of one runs the GEMM's
        // one-row path), TF-style stride-2 padding (0 before, 1 after), a
        // pad past the window at the end (bands wholly in it read no rows),
        // and a band GEMM big enough to run in parallel (its wait may start
        // another band on the same thread).
        let cases = [
            (1, 16, 96, 20, 20, 2, 1, 1, clip, clip),
            (2, 24, 144, 15, 17, 1, 1, 1, clip, id),
            (1, 8, 10, 9, 30, 2, 1, 1, relu, relu),
            (1, 5, 7, 8, 8, 1, 1, 1, id, clip),
            (3, 32, 12, 28, 28, 1, 1, 1, hs, hs),
            (1, 6, 13, 16, 18, 2, 0, 1, relu, clip),
            (1, 4, 8, 8, 10, 1, 1, 5, clip, relu),
            (2, 3, 9, 7, 12, 2, 2, 6, id, id),
            (2, 64, 7, 64, 64, 1, 1, 1, relu, id),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a test pool");
        for (ci, &(n, c, m, h, w, s, pb, pe, act1, act2)) in cases.iter().enumerate() {
            let x = tensor(&[n, c, h, w], ci as u64 + 1);
            let w1 = tensor(&[m, c, 1, 1], ci as u64 + 11);
            let b1 = tensor(&[m], ci as u64 + 21);
            let wd = tensor(&[m, 1, 3, 3], ci as u64 + 31);
            let bd = tensor(&[m], ci as u64 + 41);
            let pw = FusedOp::Conv {
                conv: conv_attrs(1, 1, 0, 1),
                act: act1,
            };
            let dw = FusedOp::Conv {
                conv: ConvAttrs {
                    pads: vec![pb, pb, pe, pe],
                    ..conv_attrs(3, s, 0, m)
                },
                act: act2,
            };
            let mid = fused::run_reference(&pw, &[Some(&x), Some(&w1), Some(&b1)])
                .expect("the pointwise conv");
            let want = fused::run_reference(&dw, &[Some(&mid), Some(&wd), Some(&bd)])
                .expect("the depthwise conv");
            let (oh, ow) = (want.shape()[2], want.shape()[3]);
            let g = Plane2d {
                ih: h,
                iw: w,
                kh: 3,
                kw: 3,
                sh: s,
                sw: s,
                dh: 1,
                dw: 1,
                ph: pb,
                pw: pb,
                oh,
                ow,
            };
            assert!(applies(&g), "case {ci}");
            let (w1v, b1v, wdv, bdv) = (f32s(&w1), f32s(&b1), f32s(&wd), f32s(&bd));
            let p = PwDw {
                c,
                m,
                w1: &w1v,
                b1: Some(&b1v),
                act1,
                wd: &wdv,
                bd: Some(&bdv),
                act2,
                g,
            };
            let mut got = vec![f32::NAN; n * m * oh * ow];
            pool.install(|| run(&p, n, &f32s(&x), &mut got));
            assert_close_in(format!("case {ci}"), &got, &f32s(&want), 1e-4);
            for band in 1..=oh {
                got.fill(f32::NAN);
                pool.install(|| run_in_bands(&p, n, &f32s(&x), &mut got, band));
                assert_close_in(
                    format!("case {ci}, bands of {band} rows"),
                    &got,
                    &f32s(&want),
                    1e-4,
                );
            }
        }
    }
}
