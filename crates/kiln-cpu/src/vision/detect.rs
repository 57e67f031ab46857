//! RoiAlign, MaxRoiPool and NonMaxSuppression.

use super::{checked_len, floats, from_f64, scalar_f64, scalar_i64};
use crate::util::i64_values;
use crate::{invalid, Result};
use kiln_ir::Tensor;

pub struct RoiAlignParams {
    pub max_mode: bool,
    pub out_h: usize,
    pub out_w: usize,
    pub sampling_ratio: i64,
    pub spatial_scale: f64,
    pub half_pixel: bool,
}

/// Bilinear taps of one sampling point: four flat offsets and their weights
/// (all zero when the point lies outside `[-1, size]`).
fn bilinear_taps(y: f64, x: f64, h: usize, w: usize) -> ([usize; 4], [f64; 4]) {
    if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 {
        return ([0; 4], [0.0; 4]);
    }
    let mut y = y.max(0.0);
    let mut x = x.max(0.0);
    let mut y_lo = y as usize;
    let mut x_lo = x as usize;
    let y_hi;
    let x_hi;
    if y_lo >= h - 1 {
        y_lo = h - 1;
        y_hi = h - 1;
        y = y_lo as f64;
    } else {
        y_hi = y_lo + 1;
    }
    if x_lo >= w - 1 {
        x_lo = w - 1;
        x_hi = w - 1;
        x = x_lo as f64;
    } else {
        x_hi = x_lo + 1;
    }
    let ly = y - y_lo as f64;
    let lx = x - x_lo as f64;
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    (
        [
            y_lo * w + x_lo,
            y_lo * w + x_hi,
            y_hi * w + x_lo,
            y_hi * w + x_hi,
        ],
        [hy * hx, hy * lx, ly * hx, ly * lx],
    )
}

/// RoiAlign over `[N, C, H, W]` features for `[R, 4]` boxes `(x1, y1, x2, y2)`.
/// Max mode takes the largest weighted tap, as the ONNX reference (and
/// onnxruntime) do.
pub fn roi_align(x: &Tensor, rois: &Tensor, batch: &Tensor, p: &RoiAlignParams) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(invalid!("RoiAlign X must be [N, C, H, W], got {s:?}"));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let r = batch.len();
    if rois.shape() != [r, 4] || batch.rank() != 1 {
        return Err(invalid!(
            "RoiAlign rois must be [num_rois, 4] and batch_indices [num_rois], got {:?} and {:?}",
            rois.shape(),
            batch.shape()
        ));
    }
    let out_shape = vec![r, c, p.out_h, p.out_w];
    let total = checked_len(&out_shape, "RoiAlign output")?;
    let bi = i64_values(batch, "batch_indices")?;
    let bx = floats(rois, "rois")?;
    let xv = floats(x, "RoiAlign X")?;
    let mut out = vec![0.0f64; total];
    let plane = h * w;
    let bins = p.out_h * p.out_w;
    for roi in 0..r {
        let b = usize::try_from(bi[roi])
            .ok()
            .filter(|&b| b < n)
            .ok_or_else(|| invalid!("batch index {} is out of range for batch {n}", bi[roi]))?;
        if plane == 0 {
            continue;
        }
        let off = if p.half_pixel { 0.5 } else { 0.0 };
        let sw = bx[roi * 4] * p.spatial_scale - off;
        let sh = bx[roi * 4 + 1] * p.spatial_scale - off;
        let ew = bx[roi * 4 + 2] * p.spatial_scale - off;
        let eh = bx[roi * 4 + 3] * p.spatial_scale - off;
        let (mut rw, mut rh) = (ew - sw, eh - sh);
        if !p.half_pixel {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let bin_h = rh / p.out_h as f64;
        let bin_w = rw / p.out_w as f64;
        let grid = |ratio: i64, extent: f64, pooled: usize| -> usize {
            if ratio > 0 {
                ratio as usize
            } else {
                let g = (extent / pooled as f64).ceil();
                if g.is_finite() && g > 0.0 {
                    (g as usize).min(1 << 16)
                } else {
                    0
                }
            }
        };
        let gh = grid(p.sampling_ratio, rh, p.out_h);
        let gw = grid(p.sampling_ratio, rw, p.out_w);
        checked_len(&[bins, gh, gw], "RoiAlign sampling grid")?;
        let count = (gh * gw).max(1) as f64;
        // Taps for every (bin, sample), shared by all channels.
        let mut taps = Vec::with_capacity(bins * gh * gw);
        for ph in 0..p.out_h {
            for pw in 0..p.out_w {
                for iy in 0..gh {
                    let y = sh + ph as f64 * bin_h + (iy as f64 + 0.5) * bin_h / gh as f64;
                    for ix in 0..gw {
                        let xx = sw + pw as f64 * bin_w + (ix as f64 + 0.5) * bin_w / gw as f64;
                        taps.push(bilinear_taps(y, xx, h, w));
                    }
                }
            }
        }
        let per_bin = gh * gw;
        for ch in 0..c {
            let data = &xv[(b * c + ch) * plane..(b * c + ch + 1) * plane];
            for bin in 0..bins {
                let samples = &taps[bin * per_bin..(bin + 1) * per_bin];
                let v = if p.max_mode {
                    let mut m: Option<f64> = None;
                    for (pos, wt) in samples {
                        let val = (0..4)
                            .map(|k| wt[k] * data[pos[k]])
                            .fold(f64::NEG_INFINITY, f64::max);
                        m = Some(m.map_or(val, |m: f64| m.max(val)));
                    }
                    m.unwrap_or(0.0)
                } else {
                    let sum: f64 = samples
                        .iter()
                        .map(|(pos, wt)| (0..4).map(|k| wt[k] * data[pos[k]]).sum::<f64>())
                        .sum();
                    sum / count
                };
                out[(roi * c + ch) * bins + bin] = v;
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

/// MaxRoiPool (Caffe ROI pooling) over `[N, C, H, W]` for `[R, 5]` rois
/// `(batch, x1, y1, x2, y2)`; empty bins give 0.
pub fn max_roi_pool(x: &Tensor, rois: &Tensor, pooled: [usize; 2], scale: f32) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(invalid!("MaxRoiPool X must be [N, C, H, W], got {s:?}"));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    if rois.rank() != 2 || rois.shape()[1] != 5 {
        return Err(invalid!(
            "MaxRoiPool rois must be [num_rois, 5], got {:?}",
            rois.shape()
        ));
    }
    let r = rois.shape()[0];
    let [ph_n, pw_n] = pooled;
    let out_shape = vec![r, c, ph_n, pw_n];
    let total = checked_len(&out_shape, "MaxRoiPool output")?;
    let bx = floats(rois, "rois")?;
    let xv = floats(x, "MaxRoiPool X")?;
    let scale = scale as f64;
    let mut out = vec![0.0f64; total];
    let clampi = |v: f64, hi: usize| -> usize { v.max(0.0).min(hi as f64) as usize };
    for roi in 0..r {
        let b = bx[roi * 5];
        if !(b >= 0.0 && (b as usize) < n) {
            return Err(invalid!(
                "roi batch index {b} is out of range for batch {n}"
            ));
        }
        let b = b as usize;
        let x1 = (bx[roi * 5 + 1] * scale).round();
        let y1 = (bx[roi * 5 + 2] * scale).round();
        let x2 = (bx[roi * 5 + 3] * scale).round();
        let y2 = (bx[roi * 5 + 4] * scale).round();
        let rh = (y2 - y1 + 1.0).max(1.0);
        let rw = (x2 - x1 + 1.0).max(1.0);
        let bin_h = rh / ph_n as f64;
        let bin_w = rw / pw_n as f64;
        for ch in 0..c {
            let base = (b * c + ch) * h * w;
            for ph in 0..ph_n {
                let hs = clampi((ph as f64 * bin_h).floor() + y1, h);
                let he = clampi(((ph + 1) as f64 * bin_h).ceil() + y1, h);
                for pw in 0..pw_n {
                    let ws = clampi((pw as f64 * bin_w).floor() + x1, w);
                    let we = clampi(((pw + 1) as f64 * bin_w).ceil() + x1, w);
                    let mut m = f64::NEG_INFINITY;
                    for yy in hs..he {
                        for xx in ws..we {
                            m = m.max(xv[base + yy * w + xx]);
                        }
                    }
                    out[((roi * c + ch) * ph_n + ph) * pw_n + pw] =
                        if he <= hs || we <= ws { 0.0 } else { m };
                }
            }
        }
    }
    from_f64(out_shape, out, x.dtype())
}

/// Whether box `a` suppresses box `b`: IoU strictly above `thr`.
fn suppresses(a: &[f64], b: &[f64], center: bool, thr: f64) -> bool {
    let bounds = |v: &[f64]| -> (f64, f64, f64, f64) {
        if center {
            let (hw, hh) = (v[2] / 2.0, v[3] / 2.0);
            (v[0] - hw, v[0] + hw, v[1] - hh, v[1] + hh)
        } else {
            (
                v[1].min(v[3]),
                v[1].max(v[3]),
                v[0].min(v[2]),
                v[0].max(v[2]),
            )
        }
    };
    let (ax0, ax1, ay0, ay1) = bounds(a);
    let (bx0, bx1, by0, by1) = bounds(b);
    let ix0 = ax0.max(bx0);
    let ix1 = ax1.min(bx1);
    if ix1 <= ix0 {
        return false;
    }
    let iy0 = ay0.max(by0);
    let iy1 = ay1.min(by1);
    if iy1 <= iy0 {
        return false;
    }
    let inter = (ix1 - ix0) * (iy1 - iy0);
    let area_a = (ax1 - ax0) * (ay1 - ay0);
    let area_b = (bx1 - bx0) * (by1 - by0);
    let union = area_a + area_b - inter;
    if inter <= 0.0 || area_a <= 0.0 || area_b <= 0.0 || union <= 0.0 {
        return false;
    }
    inter / union > thr
}

/// NonMaxSuppression: `[num_selected, 3]` rows of (batch, class, box), per batch
/// and class in descending score order (ties: lower box index first).
pub fn nms(
    boxes: &Tensor,
    scores: &Tensor,
    max_out: Option<&Tensor>,
    iou: Option<&Tensor>,
    score_thr: Option<&Tensor>,
    center: bool,
) -> Result<Tensor> {
    let bs = boxes.shape();
    let ss = scores.shape();
    if bs.len() != 3 || bs[2] != 4 || ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
        return Err(invalid!(
            "NonMaxSuppression boxes must be [batch, boxes, 4] and scores [batch, classes, boxes], got {bs:?} and {ss:?}"
        ));
    }
    let (nb, nbox, ncls) = (bs[0], bs[1], ss[1]);
    let max_out = match max_out {
        Some(t) if !t.is_empty() => scalar_i64(t, "max_output_boxes_per_class")?.max(0) as u64,
        _ => 0,
    };
    let iou = match iou {
        Some(t) if !t.is_empty() => scalar_f64(t, "iou_threshold")?,
        _ => 0.0,
    };
    let score_thr = match score_thr {
        Some(t) if !t.is_empty() => Some(scalar_f64(t, "score_threshold")?),
        _ => None,
    };
    let bv = floats(boxes, "boxes")?;
    let sv = floats(scores, "scores")?;
    let mut rows: Vec<i64> = Vec::new();
    for b in 0..nb {
        let bb = &bv[b * nbox * 4..(b + 1) * nbox * 4];
        for cl in 0..ncls {
            let sc = &sv[(b * ncls + cl) * nbox..(b * ncls + cl + 1) * nbox];
            let mut cand: Vec<usize> = (0..nbox)
                .filter(|&i| score_thr.is_none_or(|t| sc[i] > t))
                .collect();
            cand.sort_by(|&i, &j| sc[j].total_cmp(&sc[i]).then(i.cmp(&j)));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() as u64 >= max_out {
                    break;
                }
                let bi = &bb[i * 4..i * 4 + 4];
                if kept
                    .iter()
                    .all(|&k| !suppresses(bi, &bb[k * 4..k * 4 + 4], center, iou))
                {
                    kept.push(i);
                    rows.extend([b as i64, cl as i64, i as i64]);
                }
            }
        }
    }
    let n = rows.len() / 3;
    crate::util::tensor(vec![n, 3], kiln_ir::TensorData::I64(rows))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    fn params(max_mode: bool, half_pixel: bool, ratio: i64) -> RoiAlignParams {
        RoiAlignParams {
            max_mode,
            out_h: 1,
            out_w: 1,
            sampling_ratio: ratio,
            spatial_scale: 1.0,
            half_pixel,
        }
    }

    #[test]
    fn roi_align_bilinear_average_and_max() {
        // 2x2 image [[0, 1], [2, 3]]; a box over the whole image.
        let x = t(&[1, 1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]);
        let rois = t(&[1, 4], vec![0.0, 0.0, 1.0, 1.0]);
        let bi = Tensor::vector(vec![0i64]);
        // output_half_pixel, 1 sample at the box centre (0.5, 0.5) -> 1.5.
        let y = roi_align(&x, &rois, &bi, &params(false, false, 1)).unwrap();
        close(&f32s(&y), &[1.5], 1e-6);
        // half_pixel shifts by -0.5: centre (0, 0) -> 0.
        let y = roi_align(&x, &rois, &bi, &params(false, true, 1)).unwrap();
        close(&f32s(&y), &[0.0], 1e-6);
        // Max of weighted taps at (0.5, 0.5): 0.25 * 3.
        let y = roi_align(&x, &rois, &bi, &params(true, false, 1)).unwrap();
        close(&f32s(&y), &[0.75], 1e-6);
        assert!(roi_align(
            &x,
            &rois,
            &Tensor::vector(vec![1i64]),
            &params(false, false, 1)
        )
        .is_err());
        assert!(roi_align(&x, &t(&[1, 3], vec![0.0; 3]), &bi, &params(false, false, 1)).is_err());
        // No rois -> empty output.
        let y = roi_align(
            &x,
            &t(&[0, 4], vec![]),
            &Tensor::vector(Vec::<i64>::new()),
            &params(false, false, 0),
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 1, 1, 1]);
    }

    #[test]
    fn max_roi_pool_bins() {
        let x = t(&[1, 1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]);
        let rois = t(&[1, 5], vec![0.0, 0.0, 0.0, 1.0, 1.0]);
        let y = max_roi_pool(&x, &rois, [1, 1], 1.0).unwrap();
        close(&f32s(&y), &[3.0], 1e-6);
        let y = max_roi_pool(&x, &rois, [2, 2], 1.0).unwrap();
        close(&f32s(&y), &[0.0, 1.0, 2.0, 3.0], 1e-6);
        assert!(max_roi_pool(&x, &t(&[1, 5], vec![3.0, 0.0, 0.0, 1.0, 1.0]), [1, 1], 1.0).is_err());
    }

    #[test]
    fn nms_selects_and_suppresses() {
        let boxes = t(
            &[1, 3, 4],
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, 10.0, 1.0, 11.0],
        );
        let scores = t(&[1, 1, 3], vec![0.9, 0.75, 0.6]);
        let m = Tensor::vector(vec![3i64]);
        let iou = Tensor::vector(vec![0.5f32]);
        let y = nms(&boxes, &scores, Some(&m), Some(&iou), None, false).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 0, 0, 0, 0, 2]);
        // Score threshold drops the last box; max 1 output.
        let st = Tensor::vector(vec![0.7f32]);
        let one = Tensor::vector(vec![1i64]);
        let y = nms(&boxes, &scores, Some(&one), Some(&iou), Some(&st), false).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 0, 0]);
        // No max_output_boxes_per_class -> nothing selected.
        let y = nms(&boxes, &scores, None, None, None, false).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
        // Centre format: same boxes as centres.
        let cb = t(&[1, 2, 4], vec![0.5, 0.5, 1.0, 1.0, 0.5, 0.6, 1.0, 1.0]);
        let cs = t(&[1, 1, 2], vec![0.5, 0.9]);
        let y = nms(&cb, &cs, Some(&m), Some(&iou), None, true).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 0, 1]);
        assert!(nms(
            &boxes,
            &t(&[1, 1, 2], vec![0.0; 2]),
            Some(&m),
            None,
            None,
            false
        )
        .is_err());
    }
}
