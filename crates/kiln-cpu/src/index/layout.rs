//! Compress, ReverseSequence, SpaceToDepth, DepthToSpace, CenterCropPad, Col2Im.

use super::{index_values, output_len};
use crate::util::normalize_axis;
use crate::{invalid, unsupported, Result};
use kiln_ir::{DType, PadMode, Tensor, TensorData};

pub fn compress(x: &Tensor, cond: &Tensor, axis: Option<i64>) -> Result<Tensor> {
    let op = "Compress";
    if cond.rank() != 1 {
        return Err(invalid!(
            "{op}: condition must be 1-D, got {:?}",
            cond.shape()
        ));
    }
    let c: Vec<bool> = match cond.as_slice::<bool>() {
        Some(v) => v.to_vec(),
        None => cond
            .to_f64_vec()
            .map_err(|e| invalid!("{op}: condition: {e}"))?
            .into_iter()
            .map(|v| v != 0.0)
            .collect(),
    };
    let (shape, outer, dim, inner) = match axis {
        None => (vec![x.len()], 1, x.len(), 1),
        Some(a) => {
            let s = x.shape();
            let ax = normalize_axis(a, s.len()).map_err(|e| invalid!("{op}: {e}"))?;
            (
                s.to_vec(),
                s[..ax].iter().product::<usize>(),
                s[ax],
                s[ax + 1..].iter().product::<usize>(),
            )
        }
    };
    if c.iter().skip(dim).any(|&b| b) {
        return Err(invalid!(
            "{op}: condition selects index beyond the axis length {dim}"
        ));
    }
    let keep: Vec<usize> = c
        .iter()
        .take(dim)
        .enumerate()
        .filter(|(_, b)| **b)
        .map(|(i, _)| i)
        .collect();
    let mut oshape = shape;
    let ax = match axis {
        None => 0,
        Some(a) => normalize_axis(a, oshape.len()).map_err(|e| invalid!("{op}: {e}"))?,
    };
    oshape[ax] = keep.len();
    let data = x.data().gather((0..outer).flat_map(|o| {
        let k = &keep;
        k.iter()
            .flat_map(move |&j| (0..inner).map(move |i| (o * dim + j) * inner + i))
    }));
    crate::util::tensor(oshape, data)
}

pub fn reverse_sequence(
    x: &Tensor,
    lens: &Tensor,
    batch_axis: i64,
    time_axis: i64,
) -> Result<Tensor> {
    let op = "ReverseSequence";
    let s = x.shape();
    if s.len() < 2 {
        return Err(invalid!("{op}: input must have rank >= 2, got {s:?}"));
    }
    let b = normalize_axis(batch_axis, s.len()).map_err(|e| invalid!("{op}: {e}"))?;
    let t = normalize_axis(time_axis, s.len()).map_err(|e| invalid!("{op}: {e}"))?;
    if b > 1 || t > 1 || b == t {
        return Err(invalid!(
            "{op}: batch_axis and time_axis must be 0 and 1 in some order"
        ));
    }
    let lens = index_values(op, lens, "sequence_lens")?;
    if lens.len() != s[b] {
        return Err(invalid!(
            "{op}: sequence_lens has {} values for batch size {}",
            lens.len(),
            s[b]
        ));
    }
    let inner: usize = s[2..].iter().product();
    let st = crate::util::strides(s);
    let mut src: Vec<usize> = Vec::with_capacity(x.len());
    for i0 in 0..s[0] {
        for i1 in 0..s[1] {
            let (bi, ti) = if b == 0 { (i0, i1) } else { (i1, i0) };
            let l = lens[bi];
            if l < 0 || l as usize > s[t] {
                return Err(invalid!(
                    "{op}: sequence length {l} is outside [0, {}]",
                    s[t]
                ));
            }
            let l = l as usize;
            let from_t = if ti < l { l - 1 - ti } else { ti };
            let base = bi * st[b] + from_t * st[t];
            src.extend(base..base + inner);
        }
    }
    crate::util::tensor(s.to_vec(), x.data().gather(src.into_iter()))
}

/// Reshape to `tmp`, transpose by `perm`, reshape to `out`.
fn rearrange(x: &Tensor, tmp: Vec<usize>, perm: &[i64], out: Vec<usize>) -> Result<Tensor> {
    let r = x.clone().reshaped(tmp).map_err(|e| invalid!("{e}"))?;
    let t = crate::shape_ops::transpose(&r, Some(perm))?;
    t.reshaped(out).map_err(|e| invalid!("{e}"))
}

fn dims4(op: &str, x: &Tensor) -> Result<[usize; 4]> {
    match x.shape() {
        &[n, c, h, w] => Ok([n, c, h, w]),
        s => Err(invalid!("{op}: input must be 4-D, got {s:?}")),
    }
}

pub fn space_to_depth(x: &Tensor, bs: usize, crd: bool) -> Result<Tensor> {
    let op = "SpaceToDepth";
    let [n, c, h, w] = dims4(op, x)?;
    if bs == 0 || h % bs != 0 || w % bs != 0 {
        return Err(invalid!(
            "{op}: H={h} and W={w} must be multiples of blocksize {bs}"
        ));
    }
    let tmp = vec![n, c, h / bs, bs, w / bs, bs];
    let perm: [i64; 6] = if crd {
        [0, 1, 3, 5, 2, 4]
    } else {
        [0, 3, 5, 1, 2, 4]
    };
    rearrange(x, tmp, &perm, vec![n, c * bs * bs, h / bs, w / bs])
}

pub fn depth_to_space(x: &Tensor, bs: usize, crd: bool) -> Result<Tensor> {
    let op = "DepthToSpace";
    let [n, c, h, w] = dims4(op, x)?;
    let bb = bs
        .checked_mul(bs)
        .filter(|&v| v > 0)
        .ok_or_else(|| invalid!("{op}: bad blocksize {bs}"))?;
    if c % bb != 0 {
        return Err(invalid!(
            "{op}: C={c} must be a multiple of blocksize² {bb}"
        ));
    }
    let (tmp, perm): (Vec<usize>, [i64; 6]) = if crd {
        (vec![n, c / bb, bs, bs, h, w], [0, 1, 4, 2, 5, 3])
    } else {
        (vec![n, bs, bs, c / bb, h, w], [0, 3, 4, 1, 5, 2])
    };
    let out = vec![n, c / bb, h * bs, w * bs];
    output_len(op, &out)?;
    rearrange(x, tmp, &perm, out)
}

pub fn center_crop_pad(x: &Tensor, shape: &Tensor, axes: &[i64]) -> Result<Tensor> {
    let op = "CenterCropPad";
    let s = x.shape();
    let r = s.len();
    let target = index_values(op, shape, "shape")?;
    let axes: Vec<usize> = if axes.is_empty() {
        (0..r).collect()
    } else {
        axes.iter()
            .map(|&a| normalize_axis(a, r).map_err(|e| invalid!("{op}: {e}")))
            .collect::<Result<_>>()?
    };
    if target.len() != axes.len() {
        return Err(invalid!(
            "{op}: shape has {} values for {} axes",
            target.len(),
            axes.len()
        ));
    }
    let mut starts = vec![0i64; r];
    let mut ends: Vec<i64> = s.iter().map(|&d| d as i64).collect();
    let mut pads = vec![0i64; 2 * r];
    for (&ax, &t) in axes.iter().zip(&target) {
        if t < 0 {
            return Err(invalid!("{op}: target size {t} is negative"));
        }
        let dim = s[ax] as i64;
        if t < dim {
            let d = (dim - t) / 2;
            starts[ax] = d;
            ends[ax] = d + t;
        } else if t > dim {
            let d = t - dim;
            pads[ax] = d / 2;
            pads[ax + r] = d - d / 2;
        }
    }
    let cropped = crate::shape_ops::slice(
        x,
        &Tensor::vector(starts),
        &Tensor::vector(ends),
        None,
        None,
    )?;
    let mut oshape = cropped.shape().to_vec();
    for d in 0..r {
        oshape[d] = usize::try_from(pads[d] + pads[d + r])
            .ok()
            .and_then(|p| oshape[d].checked_add(p))
            .ok_or_else(|| invalid!("{op}: target size on axis {d} is too large"))?;
    }
    output_len(op, &oshape)?;
    if pads.iter().all(|&p| p == 0) {
        return Ok(cropped);
    }
    crate::shape_ops::pad(
        PadMode::Constant,
        &cropped,
        &Tensor::vector(pads),
        None,
        None,
    )
}

pub fn col2im(
    x: &Tensor,
    image_shape: &Tensor,
    block_shape: &Tensor,
    dilations: &[usize],
    pads: &[usize],
    strides: &[usize],
) -> Result<Tensor> {
    let op = "Col2Im";
    let img: Vec<usize> = index_values(op, image_shape, "image_shape")?
        .into_iter()
        .map(|v| {
            usize::try_from(v).map_err(|_| invalid!("{op}: image_shape value {v} is negative"))
        })
        .collect::<Result<_>>()?;
    let blk: Vec<usize> = index_values(op, block_shape, "block_shape")?
        .into_iter()
        .map(|v| {
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| invalid!("{op}: block_shape value {v} must be positive"))
        })
        .collect::<Result<_>>()?;
    let nd = img.len();
    if blk.len() != nd || nd == 0 {
        return Err(invalid!(
            "{op}: image_shape and block_shape must have the same non-zero length"
        ));
    }
    let dil = if dilations.is_empty() {
        vec![1; nd]
    } else {
        dilations.to_vec()
    };
    let st = if strides.is_empty() {
        vec![1; nd]
    } else {
        strides.to_vec()
    };
    let pd = if pads.is_empty() {
        vec![0; 2 * nd]
    } else {
        pads.to_vec()
    };
    if dil.len() != nd
        || st.len() != nd
        || pd.len() != 2 * nd
        || st.contains(&0)
        || dil.contains(&0)
    {
        return Err(invalid!(
            "{op}: dilations, strides and pads do not fit {nd} spatial dims"
        ));
    }
    let xs = x.shape();
    if xs.len() != 3 {
        return Err(invalid!(
            "{op}: input must be [N, C*prod(block_shape), L], got {xs:?}"
        ));
    }
    let bl = blk
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| invalid!("{op}: block_shape {blk:?} is too large"))?;
    if !xs[1].is_multiple_of(bl) {
        return Err(invalid!(
            "{op}: input dim 1 ({}) is not a multiple of prod(block_shape) {bl}",
            xs[1]
        ));
    }
    let (n, c) = (xs[0], xs[1] / bl);
    let too_big = || invalid!("{op}: image, block, pads or dilations are too large");
    let mut ncol = Vec::with_capacity(nd);
    for i in 0..nd {
        let eff = dil[i]
            .checked_mul(blk[i] - 1)
            .and_then(|v| v.checked_add(1))
            .ok_or_else(too_big)?;
        let span = img[i]
            .checked_add(pd[i])
            .and_then(|v| v.checked_add(pd[i + nd]))
            .ok_or_else(too_big)?;
        if span < eff {
            return Err(invalid!(
                "{op}: the block does not fit the padded image on dim {i}"
            ));
        }
        ncol.push((span - eff) / st[i] + 1);
    }
    let l = ncol
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(too_big)?;
    if xs[2] != l {
        return Err(invalid!("{op}: input has {} blocks, expected {l}", xs[2]));
    }
    let mut oshape = vec![n, c];
    oshape.extend_from_slice(&img);
    let total = output_len(op, &oshape)?;
    if !x.dtype().is_float() {
        return Err(unsupported!("{op} on {} tensors", x.dtype()));
    }
    let v = x.to_f64_vec().map_err(|e| invalid!("{op}: {e}"))?;
    let mut out = vec![0.0f64; total];
    let img_size: usize = img.iter().product();
    let ist = crate::util::strides(&img);
    let mut koff = vec![0usize; nd];
    let mut cpos = vec![0usize; nd];
    for nc in 0..n * c {
        for kb in 0..bl {
            // kernel offset multi-index
            let mut rem = kb;
            for i in (0..nd).rev() {
                koff[i] = rem % blk[i];
                rem /= blk[i];
            }
            for col in 0..l {
                let mut rem = col;
                for i in (0..nd).rev() {
                    cpos[i] = rem % ncol[i];
                    rem /= ncol[i];
                }
                let mut off = 0usize;
                let mut inside = true;
                for i in 0..nd {
                    let p = (cpos[i] * st[i] + koff[i] * dil[i]) as i64 - pd[i] as i64;
                    if p < 0 || p as usize >= img[i] {
                        inside = false;
                        break;
                    }
                    off += p as usize * ist[i];
                }
                if inside {
                    out[nc * img_size + off] += v[(nc * bl + kb) * l + col];
                }
            }
        }
    }
    let data = match x.dtype() {
        DType::F32 => TensorData::F32(out.iter().map(|&v| v as f32).collect()),
        DType::F16 => TensorData::F16(out.iter().map(|&v| half::f16::from_f64(v)).collect()),
        DType::BF16 => TensorData::BF16(out.iter().map(|&v| half::bf16::from_f64(v)).collect()),
        _ => TensorData::F64(out),
    };
    crate::util::tensor(oshape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<T: kiln_ir::Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn compress_cases() {
        let x = t(&[3, 2], vec![1i32, 2, 3, 4, 5, 6]);
        let c = t(&[3], vec![false, true, true]);
        let r = compress(&x, &c, Some(0)).unwrap();
        assert_eq!(r.shape(), &[2, 2]);
        assert_eq!(r.as_slice::<i32>().unwrap(), &[3, 4, 5, 6]);
        let r = compress(&x, &t(&[2], vec![false, true]), Some(-1)).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 4, 6]);
        let r = compress(&x, &t(&[5], vec![false, true, false, false, true]), None).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 5]);
        assert!(compress(&x, &t(&[4], vec![false, false, false, true]), Some(0)).is_err());
        assert!(compress(&x, &c, Some(2)).is_err());
    }

    #[test]
    fn reverse_sequence_cases() {
        let x = t(&[4, 2], (0..8).collect::<Vec<i32>>()); // time-major [T=4, B=2]
        let r = reverse_sequence(&x, &t(&[2], vec![4i64, 2]), 1, 0).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[6, 3, 4, 1, 2, 5, 0, 7]);
        let x = t(&[2, 3], (0..6).collect::<Vec<i32>>()); // batch-major
        let r = reverse_sequence(&x, &t(&[2], vec![1i64, 3]), 0, 1).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[0, 1, 2, 5, 4, 3]);
        assert!(reverse_sequence(&x, &t(&[2], vec![1i64, 4]), 0, 1).is_err());
        assert!(reverse_sequence(&x, &t(&[1], vec![1i64]), 0, 1).is_err());
    }

    #[test]
    fn depth_space_round_trip() {
        let x = t(&[1, 8, 1, 1], (0..8).collect::<Vec<i32>>());
        let d = depth_to_space(&x, 2, false).unwrap();
        assert_eq!(d.shape(), &[1, 2, 2, 2]);
        assert_eq!(d.as_slice::<i32>().unwrap(), &[0, 2, 4, 6, 1, 3, 5, 7]);
        let c = depth_to_space(&x, 2, true).unwrap();
        assert_eq!(c.as_slice::<i32>().unwrap(), &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            space_to_depth(&d, 2, false).unwrap().as_slice::<i32>(),
            x.as_slice::<i32>()
        );
        assert_eq!(
            space_to_depth(&c, 2, true).unwrap().as_slice::<i32>(),
            x.as_slice::<i32>()
        );
        assert!(depth_to_space(&t(&[1, 3, 1, 1], vec![0i32; 3]), 2, false).is_err());
        assert!(space_to_depth(&t(&[1, 1, 3, 2], vec![0i32; 6]), 2, false).is_err());
        assert!(space_to_depth(&t(&[3, 2], vec![0i32; 6]), 2, false).is_err());
    }

    #[test]
    fn center_crop_pad_cases() {
        let x = t(&[5], vec![1i32, 2, 3, 4, 5]);
        let r = center_crop_pad(&x, &t(&[1], vec![2i64]), &[]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 3]);
        let r = center_crop_pad(&x, &t(&[1], vec![8i64]), &[]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[0, 1, 2, 3, 4, 5, 0, 0]);
        let r = center_crop_pad(
            &t(&[2, 3], vec![1i32, 2, 3, 4, 5, 6]),
            &t(&[1], vec![1i64]),
            &[-1],
        )
        .unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 5]);
        assert!(center_crop_pad(&x, &t(&[2], vec![1i64, 1]), &[]).is_err());
    }

    #[test]
    fn col2im_cases() {
        // 1 channel, 2x2 block over a 3x3 image, stride 1: 4 blocks.
        let x = t(&[1, 4, 4], vec![1.0f32; 16]);
        let r = col2im(
            &x,
            &t(&[2], vec![3i64, 3]),
            &t(&[2], vec![2i64, 2]),
            &[],
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(r.shape(), &[1, 1, 3, 3]);
        assert_eq!(
            r.as_slice::<f32>().unwrap(),
            &[1., 2., 1., 2., 4., 2., 1., 2., 1.]
        );
        assert!(col2im(
            &x,
            &t(&[2], vec![4i64, 3]),
            &t(&[2], vec![2i64, 2]),
            &[],
            &[],
            &[]
        )
        .is_err());
        assert!(col2im(
            &x,
            &t(&[2], vec![3i64, 3]),
            &t(&[2], vec![0i64, 2]),
            &[],
            &[],
            &[]
        )
        .is_err());
    }
}
