//! GridSample, AffineGrid, DeformConv and MaxUnpool.

use super::{checked_len, floats, from_f64};
use crate::util::{i64_values, strides};
use crate::{invalid, unsupported, Result};
use kiln_ir::{ConvAttrs, DType, PadMode, ResizeMode, Tensor};

/// Reflects `x` into `[lo, hi]` by folding at the borders (the ONNX reference's
/// `_gs_reflect`).
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let rng = hi - lo;
    if rng <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let n = (dx / rng).trunc();
        let r = dx - n * rng;
        if n % 2.0 == 0.0 {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / rng).trunc();
        let r = dx - n * rng;
        if n % 2.0 == 0.0 {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

/// Keys' cubic convolution weights (a = -0.75) for the taps at -1, 0, 1, 2
/// around a point `t` in `[0, 1)` past tap 0.
fn cubic_weights(t: f64) -> [f64; 4] {
    let a = -0.75;
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Round half to even (numpy `rint`).
fn rint(x: f64) -> f64 {
    x.round_ties_even()
}

/// GridSample over `[N, C, D1..Dk]` at the normalized points of `grid`
/// `[N, O1..Om, k]` (last component indexes the last spatial dim).
pub fn grid_sample(
    x: &Tensor,
    grid: &Tensor,
    mode: ResizeMode,
    padding: PadMode,
    align_corners: bool,
) -> Result<Tensor> {
    let xs = x.shape();
    let gs = grid.shape();
    if xs.len() < 3 {
        return Err(invalid!("GridSample X must have rank >= 3, got {xs:?}"));
    }
    let k = xs.len() - 2;
    if gs.len() < 2 || gs[0] != xs[0] || gs[gs.len() - 1] != k {
        return Err(invalid!(
            "GridSample grid must be [N, ..., {k}] for X {xs:?}, got {gs:?}"
        ));
    }
    let (n, c) = (xs[0], xs[1]);
    let dims = &xs[2..];
    let mut out_shape = vec![n, c];
    out_shape.extend_from_slice(&gs[1..gs.len() - 1]);
    let total = checked_len(&out_shape, "GridSample output")?;
    let points: usize = gs[1..gs.len() - 1].iter().product();
    let plane: usize = dims.iter().product();
    let dstr = strides(dims);
    let xv = floats(x, "GridSample X")?;
    let gv = floats(grid, "GridSample grid")?;
    let grid_f64 = grid.dtype() == DType::F64;
    let mut out = vec![0.0f64; total];
    if plane == 0 {
        // No pixels to sample: every point reads padding zeros.
        return from_f64(out_shape, out, x.dtype());
    }
    // Borders for reflection and for the out-of-range test.
    let borders: Vec<(f64, f64)> = dims
        .iter()
        .map(|&d| {
            if align_corners {
                (0.0, d as f64 - 1.0)
            } else {
                (-0.5, d as f64 - 0.5)
            }
        })
        .collect();
    let map_index = |i: i64, ax: usize| -> Option<usize> {
        let d = dims[ax] as i64;
        match padding {
            PadMode::Edge => Some(i.clamp(0, d - 1) as usize),
            PadMode::Reflect => {
                let (lo, hi) = borders[ax];
                let r = reflect(i as f64, lo, hi) as i64;
                Some(r.clamp(0, d - 1) as usize)
            }
            _ => {
                if i >= 0 && i < d {
                    Some(i as usize)
                } else {
                    None
                }
            }
        }
    };
    let mut coord = vec![0.0f64; k];
    // Per dimension: the taps (index or None for zero padding) and weights.
    let mut taps: Vec<Vec<(Option<usize>, f64)>> = vec![Vec::new(); k];
    let mut combo: Vec<(usize, f64)> = Vec::new();
    for b in 0..n {
        for p in 0..points {
            let g = &gv[(b * points + p) * k..(b * points + p + 1) * k];
            for ax in 0..k {
                let v = g[k - 1 - ax];
                let len = dims[ax] as f64;
                // The reference computes these in f32.
                let d = if grid_f64 {
                    if align_corners {
                        (v + 1.0) / 2.0 * (len - 1.0)
                    } else {
                        ((v + 1.0) * len - 1.0) / 2.0
                    }
                } else {
                    let (v, len) = (v as f32, len as f32);
                    (if align_corners {
                        (v + 1.0) / 2.0 * (len - 1.0)
                    } else {
                        ((v + 1.0) * len - 1.0) / 2.0
                    }) as f64
                };
                coord[ax] = d as f32 as f64;
            }
            if mode == ResizeMode::Nearest {
                coord.iter_mut().for_each(|v| *v = rint(*v));
            }
            for ax in 0..k {
                let v = coord[ax];
                let (lo, hi) = borders[ax];
                if v < lo || v > hi {
                    coord[ax] = match padding {
                        PadMode::Edge => v.clamp(0.0, dims[ax] as f64 - 1.0),
                        PadMode::Reflect => reflect(v, lo, hi),
                        _ => v,
                    } as f32 as f64;
                }
            }
            for ax in 0..k {
                let v = coord[ax];
                taps[ax].clear();
                if !v.is_finite() {
                    taps[ax].push((None, 0.0));
                    continue;
                }
                match mode {
                    ResizeMode::Nearest => taps[ax].push((map_index(v.trunc() as i64, ax), 1.0)),
                    ResizeMode::Linear => {
                        let x0 = v.floor();
                        let t = v - x0;
                        let i0 = x0 as i64;
                        taps[ax].push((map_index(i0, ax), 1.0 - t));
                        taps[ax].push((map_index(i0.saturating_add(1), ax), t));
                    }
                    ResizeMode::Cubic => {
                        let x0 = v.floor();
                        let w = cubic_weights(v - x0);
                        let i0 = x0 as i64;
                        for (j, wj) in w.iter().enumerate() {
                            taps[ax].push((map_index(i0.saturating_add(j as i64 - 1), ax), *wj));
                        }
                    }
                }
            }
            // Tensor product of the per-dimension taps.
            combo.clear();
            combo.push((0, 1.0));
            for ax in 0..k {
                let mut next = Vec::with_capacity(combo.len() * taps[ax].len());
                for &(off, w) in &combo {
                    for &(idx, wt) in &taps[ax] {
                        if let Some(i) = idx {
                            next.push((off + i * dstr[ax], w * wt));
                        }
                    }
                }
                combo = next;
            }
            for ch in 0..c {
                let data = &xv[(b * c + ch) * plane..(b * c + ch + 1) * plane];
                let v: f64 = combo.iter().map(|&(o, w)| w * data[o]).sum();
                out[(b * c + ch) * points + p] = v;
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

/// AffineGrid: `theta` `[N, 2, 3]` (2-D) or `[N, 3, 4]` (3-D) applied to the
/// normalized base grid of `size` `[N, C, (D,) H, W]`.
pub fn affine_grid(theta: &Tensor, size: &Tensor, align_corners: bool) -> Result<Tensor> {
    let sz = i64_values(size, "AffineGrid size")?;
    let k = match sz.len() {
        4 => 2,
        5 => 3,
        l => return Err(invalid!("AffineGrid size must have 4 or 5 values, got {l}")),
    };
    let sz: Vec<usize> = sz
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| invalid!("AffineGrid size {v} is negative")))
        .collect::<Result<_>>()?;
    let n = sz[0];
    if theta.shape() != [n, k, k + 1] {
        return Err(invalid!(
            "AffineGrid theta must be [{n}, {k}, {}], got {:?}",
            k + 1,
            theta.shape()
        ));
    }
    let sp = &sz[2..];
    let mut out_shape = vec![n];
    out_shape.extend_from_slice(sp);
    out_shape.push(k);
    let total = checked_len(&out_shape, "AffineGrid output")?;
    let base = |s: usize| -> Vec<f64> {
        (0..s)
            .map(|i| {
                if align_corners {
                    if s <= 1 {
                        0.0
                    } else {
                        -1.0 + 2.0 * i as f64 / (s - 1) as f64
                    }
                } else {
                    -1.0 + (2 * i + 1) as f64 / s as f64
                }
            })
            .collect()
    };
    // Spatial dims in order (D,) H, W; the point is (x = W, y = H, z = D).
    let axes: Vec<Vec<f64>> = sp.iter().map(|&s| base(s)).collect();
    let th = floats(theta, "theta")?;
    let points: usize = sp.iter().product();
    let mut out = vec![0.0f64; total];
    let mut idx = vec![0usize; k];
    for b in 0..n {
        let t = &th[b * k * (k + 1)..(b + 1) * k * (k + 1)];
        idx.iter_mut().for_each(|i| *i = 0);
        for p in 0..points {
            // Homogeneous point (x, y, [z,] 1).
            let mut hp = vec![1.0f64; k + 1];
            for j in 0..k {
                hp[j] = axes[k - 1 - j][idx[k - 1 - j]];
            }
            for r in 0..k {
                let v: f64 = (0..=k).map(|j| t[r * (k + 1) + j] * hp[j]).sum();
                out[(b * points + p) * k + r] = v;
            }
            for a in (0..k).rev() {
                idx[a] += 1;
                if idx[a] < sp[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
    }
    from_f64(out_shape, out, theta.dtype())
}

/// Bilinear sample of a `h x w` plane at `(y, x)`, zero outside.
fn bilinear_zero(data: &[f64], h: usize, w: usize, y: f64, x: f64) -> f64 {
    if !(y.is_finite() && x.is_finite()) {
        return 0.0;
    }
    let (y0, x0) = (y.floor(), x.floor());
    let (ty, tx) = (y - y0, x - x0);
    let (y0, x0) = (y0 as i64, x0 as i64);
    let at = |yy: i64, xx: i64| -> f64 {
        if yy >= 0 && (yy as usize) < h && xx >= 0 && (xx as usize) < w {
            data[yy as usize * w + xx as usize]
        } else {
            0.0
        }
    };
    (1.0 - ty) * ((1.0 - tx) * at(y0, x0) + tx * at(y0, x0 + 1))
        + ty * ((1.0 - tx) * at(y0 + 1, x0) + tx * at(y0 + 1, x0 + 1))
}

/// DeformConv (2-D): convolution whose taps are moved by `offset` and scaled by
/// `mask`, sampled bilinearly with zeros outside the input.
pub fn deform_conv(
    x: &Tensor,
    wt: &Tensor,
    offset: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
    a: &ConvAttrs,
    offset_group: usize,
) -> Result<Tensor> {
    let xs = x.shape();
    let ws = wt.shape();
    let os = offset.shape();
    if xs.len() != 4 {
        return Err(unsupported!(
            "DeformConv on {}-D input {xs:?} (only 2-D)",
            xs.len().saturating_sub(2)
        ));
    }
    if ws.len() != 4 || os.len() != 4 || os[0] != xs[0] {
        return Err(invalid!(
            "DeformConv W must be [M, C/group, kH, kW] and offset [N, ..., oH, oW], got {ws:?} and {os:?}"
        ));
    }
    let (n, ic, ih, iw) = (xs[0], xs[1], xs[2], xs[3]);
    let (oc, icg) = (ws[0], ws[1]);
    let g = a.group.max(1);
    let og = offset_group.max(1);
    let (kh, kw) = match a.kernel_shape.as_slice() {
        [] => (ws[2], ws[3]),
        [h, w] if *h == ws[2] && *w == ws[3] => (*h, *w),
        k => return Err(invalid!("kernel_shape {k:?} does not match W {ws:?}")),
    };
    if icg * g != ic || oc % g != 0 || ic % og != 0 {
        return Err(invalid!(
            "DeformConv: X {xs:?}, W {ws:?}, group {g}, offset_group {og} do not fit"
        ));
    }
    let pick = |v: &[usize], i: usize, d: usize| v.get(i).copied().unwrap_or(d);
    let (sh, sw) = (pick(&a.strides, 0, 1), pick(&a.strides, 1, 1));
    let (dh, dw) = (pick(&a.dilations, 0, 1), pick(&a.dilations, 1, 1));
    let (pt, pl) = (pick(&a.pads, 0, 0), pick(&a.pads, 1, 0));
    let (pb, pr) = (pick(&a.pads, 2, 0), pick(&a.pads, 3, 0));
    if sh == 0 || sw == 0 || dh == 0 || dw == 0 {
        return Err(invalid!(
            "DeformConv strides and dilations must be positive"
        ));
    }
    let out_dim = |i: usize, p: usize, k: usize, d: usize, s: usize| -> Option<usize> {
        let span = k.checked_sub(1)?.checked_mul(d)?.checked_add(1)?;
        i.checked_add(p)?.checked_sub(span).map(|v| v / s + 1)
    };
    let (oh, ow) = (os[2], os[3]);
    if kh == 0
        || kw == 0
        || out_dim(ih, pt.saturating_add(pb), kh, dh, sh) != Some(oh)
        || out_dim(iw, pl.saturating_add(pr), kw, dw, sw) != Some(ow)
    {
        return Err(invalid!(
            "DeformConv offset spatial shape {:?} does not match the convolution output",
            &os[2..]
        ));
    }
    let kk = kh * kw;
    if os[1] != og * kk * 2 {
        return Err(invalid!(
            "DeformConv offset has {} channels, expected {}",
            os[1],
            og * kk * 2
        ));
    }
    if let Some(m) = mask {
        if m.shape() != [n, og * kk, oh, ow] {
            return Err(invalid!(
                "DeformConv mask must be {:?}, got {:?}",
                [n, og * kk, oh, ow],
                m.shape()
            ));
        }
    }
    if let Some(b) = bias {
        if b.len() != oc {
            return Err(invalid!(
                "DeformConv B must hold {oc} values, got {:?}",
                b.shape()
            ));
        }
    }
    let out_shape = vec![n, oc, oh, ow];
    let total = checked_len(&out_shape, "DeformConv output")?;
    let pix = oh * ow;
    checked_len(&[ic, kk, pix], "DeformConv columns")?;
    let xv = floats(x, "DeformConv X")?;
    let wv = floats(wt, "DeformConv W")?;
    let ov = floats(offset, "offset")?;
    let mv = mask.map(|m| floats(m, "mask")).transpose()?;
    let bv = bias.map(|b| floats(b, "B")).transpose()?;
    let icog = ic / og;
    let ocg = oc / g;
    let mut out = vec![0.0f64; total];
    let mut cols = vec![0.0f64; ic * kk * pix];
    for b in 0..n {
        for c in 0..ic {
            let o = c / icog;
            let plane = &xv[(b * ic + c) * ih * iw..(b * ic + c + 1) * ih * iw];
            for i in 0..kh {
                for j in 0..kw {
                    let kidx = i * kw + j;
                    let ch_y = ((b * og + o) * kk + kidx) * 2;
                    for y in 0..oh {
                        for xx in 0..ow {
                            let p = y * ow + xx;
                            let dy = ov[ch_y * pix + p];
                            let dx = ov[(ch_y + 1) * pix + p];
                            let py = (y * sh + i * dh) as f64 - pt as f64 + dy;
                            let px = (xx * sw + j * dw) as f64 - pl as f64 + dx;
                            let m = mv
                                .as_ref()
                                .map_or(1.0, |m| m[((b * og + o) * kk + kidx) * pix + p]);
                            cols[(c * kk + kidx) * pix + p] =
                                m * bilinear_zero(plane, ih, iw, py, px);
                        }
                    }
                }
            }
        }
        for m in 0..oc {
            let grp = m / ocg;
            let acc = &mut out[(b * oc + m) * pix..(b * oc + m + 1) * pix];
            let b0 = bv.as_ref().map_or(0.0, |v| v[m]);
            acc.iter_mut().for_each(|v| *v = b0);
            for cg in 0..icg {
                let c = grp * icg + cg;
                for kidx in 0..kk {
                    let wgt = wv[(m * icg + cg) * kk + kidx];
                    let col = &cols[(c * kk + kidx) * pix..(c * kk + kidx + 1) * pix];
                    for (a, v) in acc.iter_mut().zip(col) {
                        *a += wgt * v;
                    }
                }
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

/// MaxUnpool: scatters `x` to the flat positions `indices` of the unpooled
/// shape `(in-1)*stride - pads + kernel`; with `output_shape` the result is that
/// shape, the unpooled tensor at its start (the ONNX reference's layout).
pub fn max_unpool(
    x: &Tensor,
    indices: &Tensor,
    output_shape: Option<&Tensor>,
    kernel: &[usize],
    pads: &[usize],
    strides_: &[usize],
) -> Result<Tensor> {
    let xs = x.shape();
    let k = kernel.len();
    if xs.len() != k + 2 {
        return Err(invalid!(
            "MaxUnpool X {xs:?} must have rank {} for kernel_shape {kernel:?}",
            k + 2
        ));
    }
    if indices.shape() != xs {
        return Err(invalid!(
            "MaxUnpool indices {:?} must have the shape of X {xs:?}",
            indices.shape()
        ));
    }
    let mut inferred = vec![xs[0], xs[1]];
    for d in 0..k {
        let s = strides_.get(d).copied().unwrap_or(1) as i128;
        let p = pads.get(d).copied().unwrap_or(0) as i128
            + pads.get(k + d).copied().unwrap_or(0) as i128;
        let v = (xs[d + 2] as i128 - 1) * s - p + kernel[d] as i128;
        let v = usize::try_from(v.max(0)).map_err(|_| invalid!("MaxUnpool output is too large"))?;
        inferred.push(if xs[d + 2] == 0 { 0 } else { v });
    }
    let inner_n = checked_len(&inferred, "MaxUnpool output")?;
    let iv = i64_values(indices, "MaxUnpool indices")?;
    let xv = floats(x, "MaxUnpool X")?;
    let mut y = vec![0.0f64; inner_n];
    for (&i, &v) in iv.iter().zip(&xv) {
        let i = usize::try_from(i)
            .ok()
            .filter(|&i| i < inner_n)
            .ok_or_else(|| invalid!("MaxUnpool index {i} is out of range for {inferred:?}"))?;
        y[i] = v;
    }
    let Some(os) = output_shape else {
        return from_f64(inferred, y, x.dtype());
    };
    let os = i64_values(os, "output_shape")?;
    let os: Vec<usize> = os
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| invalid!("output_shape {v} is negative")))
        .collect::<Result<_>>()?;
    if os.len() != inferred.len() || os.iter().zip(&inferred).any(|(o, i)| o < i) {
        return Err(invalid!(
            "MaxUnpool output_shape {os:?} cannot hold the unpooled shape {inferred:?}"
        ));
    }
    let total = checked_len(&os, "MaxUnpool output")?;
    let mut out = vec![0.0f64; total];
    let ostr = strides(&os);
    let istr = strides(&inferred);
    for (flat, v) in y.into_iter().enumerate() {
        if v == 0.0 {
            continue;
        }
        let mut rem = flat;
        let mut o = 0;
        for d in 0..inferred.len() {
            let q = rem / istr[d];
            rem %= istr[d];
            o += q * ostr[d];
        }
        out[o] = v;
    }
    from_f64(os, out, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;
    use kiln_ir::AutoPad;

    #[test]
    fn helpers_reflect_rint_cubic() {
        assert_eq!(reflect(-1.0, -0.5, 3.5), 0.0);
        assert_eq!(reflect(4.0, -0.5, 3.5), 3.0);
        assert_eq!(reflect(8.0, -0.5, 3.5), -0.5 + 0.5);
        assert_eq!(reflect(1.0, 0.0, 0.0), 0.0);
        assert_eq!(rint(0.5), 0.0);
        assert_eq!(rint(1.5), 2.0);
        assert_eq!(rint(2.5), 2.0);
        assert_eq!(rint(-0.5), 0.0);
        assert_eq!(rint(-1.5), -2.0);
        assert_eq!(rint(1.4), 1.0);
        let w = cubic_weights(0.0);
        close(&w.map(|v| v as f32), &[0.0, 1.0, 0.0, 0.0], 1e-12);
        let w = cubic_weights(0.5);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn grid_sample_modes() {
        // 1x1x2x2 image [[0, 1], [2, 3]].
        let x = t(&[1, 1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]);
        // Centre, the top-left corner and a point far outside.
        let g = t(&[1, 1, 3, 2], vec![0.0, 0.0, -1.0, -1.0, 3.0, 0.0]);
        let y = grid_sample(&x, &g, ResizeMode::Linear, PadMode::Constant, true).unwrap();
        assert_eq!(y.shape(), &[1, 1, 1, 3]);
        close(&f32s(&y), &[1.5, 0.0, 0.0], 1e-6);
        // align_corners=0: (-1, -1) is the outer corner of pixel 0 -> a quarter of it.
        let y = grid_sample(&x, &g, ResizeMode::Linear, PadMode::Constant, false).unwrap();
        close(&f32s(&y), &[1.5, 0.0, 0.0], 1e-6);
        let y = grid_sample(&x, &g, ResizeMode::Linear, PadMode::Edge, false).unwrap();
        close(&f32s(&y), &[1.5, 0.0, 2.0], 1e-6);
        let y = grid_sample(&x, &g, ResizeMode::Nearest, PadMode::Edge, true).unwrap();
        // (0.5, 0.5) rounds to even (0, 0); (2, 0.5) -> (1, 0) at the border.
        close(&f32s(&y), &[0.0, 0.0, 1.0], 1e-6);
        let y = grid_sample(&x, &g, ResizeMode::Cubic, PadMode::Edge, true).unwrap();
        close(&f32s(&y)[..2], &[1.5, 0.0], 1e-6);
        // 3-D (volumetric) input.
        let x3 = t(&[1, 1, 2, 1, 1], vec![1.0, 3.0]);
        let g3 = t(&[1, 1, 1, 1, 3], vec![0.0, 0.0, 0.0]);
        let y = grid_sample(&x3, &g3, ResizeMode::Linear, PadMode::Constant, true).unwrap();
        close(&f32s(&y), &[2.0], 1e-6);
        assert!(grid_sample(
            &x,
            &t(&[1, 1, 1, 3], vec![0.0; 3]),
            ResizeMode::Linear,
            PadMode::Constant,
            true
        )
        .is_err());
    }

    #[test]
    fn affine_grid_identity() {
        let theta = t(&[1, 2, 3], vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let size = Tensor::vector(vec![1i64, 1, 2, 2]);
        let y = affine_grid(&theta, &size, true).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2, 2]);
        close(
            &f32s(&y),
            &[-1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0],
            1e-6,
        );
        let y = affine_grid(&theta, &size, false).unwrap();
        close(
            &f32s(&y),
            &[-0.5, -0.5, 0.5, -0.5, -0.5, 0.5, 0.5, 0.5],
            1e-6,
        );
        let theta3 = t(
            &[1, 3, 4],
            vec![1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        );
        let y = affine_grid(&theta3, &Tensor::vector(vec![1i64, 1, 1, 1, 2]), true).unwrap();
        assert_eq!(y.shape(), &[1, 1, 1, 2, 3]);
        close(&f32s(&y), &[-0.5, 0.0, 0.0, 1.5, 0.0, 0.0], 1e-6);
        assert!(affine_grid(&theta, &Tensor::vector(vec![1i64, 1, 2]), true).is_err());
        assert!(affine_grid(&theta3, &size, true).is_err());
    }

    fn conv_attrs(pads: Vec<usize>) -> ConvAttrs {
        ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![],
            pads,
            strides: vec![],
        }
    }

    #[test]
    fn deform_conv_zero_offset_is_conv() {
        let x = t(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let w = t(&[1, 1, 1, 1], vec![2.0]);
        let off = t(&[1, 2, 2, 2], vec![0.0; 8]);
        let y = deform_conv(&x, &w, &off, None, None, &conv_attrs(vec![]), 1).unwrap();
        close(&f32s(&y), &[2.0, 4.0, 6.0, 8.0], 1e-6);
        // Offset by half a pixel right: bilinear between neighbours, zero beyond.
        let mut o = vec![0.0; 8];
        o[4..].iter_mut().for_each(|v| *v = 0.5);
        let off = t(&[1, 2, 2, 2], o);
        let b = t(&[1], vec![1.0]);
        let m = t(&[1, 1, 2, 2], vec![1.0, 1.0, 1.0, 0.0]);
        let y = deform_conv(&x, &w, &off, Some(&b), Some(&m), &conv_attrs(vec![]), 1).unwrap();
        close(&f32s(&y), &[4.0, 3.0, 8.0, 1.0], 1e-6);
        let bad = t(&[1, 2, 3, 3], vec![0.0; 18]);
        assert!(deform_conv(&x, &w, &bad, None, None, &conv_attrs(vec![]), 1).is_err());
    }

    #[test]
    fn max_unpool_scatter() {
        let x = t(&[1, 1, 2, 2], vec![5.0, 6.0, 7.0, 8.0]);
        let i = Tensor::from_vec(vec![1, 1, 2, 2], vec![5i64, 7, 13, 15]).unwrap();
        let y = max_unpool(&x, &i, None, &[2, 2], &[], &[2, 2]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 4]);
        let mut want = vec![0.0; 16];
        want[5] = 5.0;
        want[7] = 6.0;
        want[13] = 7.0;
        want[15] = 8.0;
        close(&f32s(&y), &want, 0.0);
        let os = Tensor::vector(vec![1i64, 1, 5, 5]);
        let y = max_unpool(&x, &i, Some(&os), &[2, 2], &[], &[2, 2]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 5, 5]);
        assert_eq!(f32s(&y)[6], 5.0);
        assert_eq!(f32s(&y)[8], 6.0);
        let bad = Tensor::from_vec(vec![1, 1, 2, 2], vec![5i64, 7, 13, 16]).unwrap();
        assert!(max_unpool(&x, &bad, None, &[2, 2], &[], &[2, 2]).is_err());
        assert!(max_unpool(
            &x,
            &i,
            Some(&Tensor::vector(vec![1i64, 1, 3, 3])),
            &[2, 2],
            &[],
            &[2, 2]
        )
        .is_err());
    }
}
