//! LRN, GroupNormalization, MeanVarianceNormalization, LpNormalization, LpPool.

use super::{floats, from_f64};
use crate::util::{normalize_axis, strides};
use crate::{invalid, Result};
use kiln_ir::{Op, PoolAttrs, Tensor};

/// `[N, C, rest...]` as (N, C, product of the rest).
fn nc_inner(x: &Tensor, op: &str) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(invalid!("{op} needs an input of rank >= 2, got {s:?}"));
    }
    Ok((s[0], s[1], s[2..].iter().product()))
}

/// LRN: `y = x / (bias + alpha / size * sum of x^2 over nearby channels)^beta`,
/// the window spanning `floor((size-1)/2)` channels before and
/// `ceil((size-1)/2)` after.
pub fn lrn(x: &Tensor, alpha: f32, beta: f32, bias: f32, size: usize) -> Result<Tensor> {
    let (n, c, inner) = nc_inner(x, "LRN")?;
    if size == 0 {
        return Err(invalid!("LRN size must be positive"));
    }
    let v = floats(x, "LRN input")?;
    let before = (size - 1) / 2;
    let after = size - 1 - before;
    let (alpha, beta, bias) = (alpha as f64, beta as f64, bias as f64);
    let scale = alpha / size as f64;
    let mut out = vec![0.0f64; v.len()];
    for b in 0..n {
        for ch in 0..c {
            let lo = ch.saturating_sub(before);
            let hi = (ch + after).min(c - 1);
            for s in 0..inner {
                let mut sum = 0.0;
                for cj in lo..=hi {
                    let e = v[(b * c + cj) * inner + s];
                    sum += e * e;
                }
                let i = (b * c + ch) * inner + s;
                out[i] = v[i] / (bias + scale * sum).powf(beta);
            }
        }
    }
    from_f64(x.shape().to_vec(), out, x.dtype())
}

/// GroupNormalization over `num_groups` groups of channels; `scale`/`bias`
/// hold one value per channel (opset 21) or per group (`per_group`, opset 18).
pub fn group_norm(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    epsilon: f32,
    num_groups: usize,
    per_group: bool,
) -> Result<Tensor> {
    let (n, c, inner) = nc_inner(x, "GroupNormalization")?;
    if num_groups == 0 || c % num_groups != 0 {
        return Err(invalid!(
            "GroupNormalization: {c} channels cannot be split into {num_groups} groups"
        ));
    }
    let want = if per_group { num_groups } else { c };
    let sc = floats(scale, "scale")?;
    let bi = floats(bias, "bias")?;
    if sc.len() != want || bi.len() != want {
        return Err(invalid!(
            "GroupNormalization: scale {:?} and bias {:?} must hold {want} values",
            scale.shape(),
            bias.shape()
        ));
    }
    let v = floats(x, "GroupNormalization input")?;
    let cpg = c / num_groups;
    let span = cpg * inner;
    let eps = epsilon as f64;
    let mut out = vec![0.0f64; v.len()];
    for b in 0..n {
        for g in 0..num_groups {
            let start = (b * c + g * cpg) * inner;
            let chunk = &v[start..start + span];
            if span == 0 {
                continue;
            }
            let mean = chunk.iter().sum::<f64>() / span as f64;
            let var = chunk.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / span as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for k in 0..cpg {
                let ch = g * cpg + k;
                let p = if per_group { g } else { ch };
                for s in 0..inner {
                    let i = start + k * inner + s;
                    out[i] = (v[i] - mean) * inv * sc[p] + bi[p];
                }
            }
        }
    }
    from_f64(x.shape().to_vec(), out, x.dtype())
}

/// For each element of `shape`, the index of its group when `reduced` axes are
/// collapsed, plus the number of groups and the group size.
fn reduce_groups(shape: &[usize], reduced: &[bool]) -> (Vec<usize>, usize, usize) {
    let kept: Vec<usize> = shape
        .iter()
        .zip(reduced)
        .map(|(&d, &r)| if r { 1 } else { d })
        .collect();
    let kstr = strides(&kept);
    let n: usize = shape.iter().product();
    let groups: usize = kept.iter().product();
    let size = n.checked_div(groups).unwrap_or(0);
    let mut idx = vec![0usize; shape.len()];
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        keys.push(
            (0..shape.len())
                .filter(|&a| !reduced[a])
                .map(|a| idx[a] * kstr[a])
                .sum(),
        );
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    (keys, groups, size)
}

/// MeanVarianceNormalization: `(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9)`
/// over `axes` (the ONNX function body's formula).
pub fn mvn(x: &Tensor, axes: &[i64]) -> Result<Tensor> {
    let rank = x.rank();
    let mut reduced = vec![false; rank];
    for &a in axes {
        reduced[normalize_axis(a, rank)?] = true;
    }
    let v = floats(x, "MeanVarianceNormalization input")?;
    let (keys, groups, size) = reduce_groups(x.shape(), &reduced);
    let mut sum = vec![0.0f64; groups];
    let mut sq = vec![0.0f64; groups];
    for (&k, &e) in keys.iter().zip(&v) {
        sum[k] += e;
        sq[k] += e * e;
    }
    let cnt = size.max(1) as f64;
    let out = keys
        .iter()
        .zip(&v)
        .map(|(&k, &e)| {
            let mean = sum[k] / cnt;
            let var = (sq[k] / cnt - mean * mean).max(0.0);
            (e - mean) / (var.sqrt() + 1e-9)
        })
        .collect();
    from_f64(x.shape().to_vec(), out, x.dtype())
}

/// LpNormalization along `axis` (p = 1 or 2); a zero norm gives zeros.
pub fn lp_norm(x: &Tensor, axis: i64, p: i64) -> Result<Tensor> {
    if p != 1 && p != 2 {
        return Err(invalid!("LpNormalization p must be 1 or 2, got {p}"));
    }
    let rank = x.rank();
    let ax = normalize_axis(axis, rank.max(1))?;
    let mut reduced = vec![false; rank];
    if rank > 0 {
        reduced[ax] = true;
    }
    let v = floats(x, "LpNormalization input")?;
    let (keys, groups, _) = reduce_groups(x.shape(), &reduced);
    let mut acc = vec![0.0f64; groups];
    for (&k, &e) in keys.iter().zip(&v) {
        acc[k] += if p == 1 { e.abs() } else { e * e };
    }
    if p == 2 {
        acc.iter_mut().for_each(|a| *a = a.sqrt());
    }
    let out = keys
        .iter()
        .zip(&v)
        .map(|(&k, &e)| if acc[k] == 0.0 { 0.0 } else { e / acc[k] })
        .collect();
    from_f64(x.shape().to_vec(), out, x.dtype())
}

/// LpPool: `(sum over the window of |x|^p)^(1/p)`, padded cells counting as
/// zero. Runs AveragePool (count_include_pad) on `|x|^p` for the window
/// geometry (auto_pad, ceil_mode, dilations) and scales by the kernel size.
pub fn lp_pool(x: &Tensor, pool: &PoolAttrs, p: i64) -> Result<Tensor> {
    if p < 1 {
        return Err(invalid!("LpPool p must be positive, got {p}"));
    }
    let v = floats(x, "LpPool input")?;
    let pw: Vec<f64> = v.iter().map(|e| e.abs().powf(p as f64)).collect();
    let powered = from_f64(x.shape().to_vec(), pw, kiln_ir::DType::F64)?;
    let mut attrs = pool.clone();
    attrs.count_include_pad = true;
    let avg = crate::run_op(&Op::AveragePool(attrs), &[Some(&powered)], 1)?;
    let avg = avg
        .into_iter()
        .next()
        .ok_or_else(|| invalid!("LpPool: AveragePool returned no output"))?;
    let k = kiln_ir::checked_numel(&pool.kernel_shape)
        .ok_or_else(|| invalid!("LpPool kernel_shape {:?} is too large", pool.kernel_shape))?;
    let a = floats(&avg, "LpPool window")?;
    let inv_p = 1.0 / p as f64;
    let out = a
        .iter()
        .map(|s| (s * k as f64).max(0.0).powf(inv_p))
        .collect();
    from_f64(avg.shape().to_vec(), out, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;
    use kiln_ir::{AutoPad, DType};

    #[test]
    fn lrn_hand_checked() {
        // One pixel, 3 channels [1, 2, 3], size 3, alpha 3 (alpha/size = 1), beta 1, bias 1.
        let x = t(&[1, 3, 1, 1], vec![1.0, 2.0, 3.0]);
        let y = lrn(&x, 3.0, 1.0, 1.0, 3).unwrap();
        // sums: c0: 1+4 = 5; c1: 1+4+9 = 14; c2: 4+9 = 13.
        close(&f32s(&y), &[1.0 / 6.0, 2.0 / 15.0, 3.0 / 14.0], 1e-6);
        // Even size 2: window is [c, c+1].
        let y = lrn(&x, 2.0, 1.0, 1.0, 2).unwrap();
        close(&f32s(&y), &[1.0 / 6.0, 2.0 / 14.0, 3.0 / 10.0], 1e-6);
        // Empty and bad inputs.
        let e = t(&[0, 3, 2, 2], vec![]);
        assert_eq!(lrn(&e, 1.0, 1.0, 1.0, 3).unwrap().shape(), &[0, 3, 2, 2]);
        assert!(lrn(&t(&[3], vec![1.0; 3]), 1.0, 1.0, 1.0, 3).is_err());
        assert!(lrn(&Tensor::vector(vec![1i64, 2]), 1.0, 1.0, 1.0, 1).is_err());
        // f16 computes in wider precision and rounds once.
        let xh = Tensor::from_vec(
            vec![1, 3, 1, 1],
            vec![
                half::f16::from_f32(1.0),
                half::f16::from_f32(2.0),
                half::f16::from_f32(3.0),
            ],
        )
        .unwrap();
        let y = lrn(&xh, 3.0, 1.0, 1.0, 3).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let got: Vec<f32> = y.to_f64_vec().unwrap().iter().map(|&v| v as f32).collect();
        close(&got, &[1.0 / 6.0, 2.0 / 15.0, 3.0 / 14.0], 1e-3);
    }

    #[test]
    fn group_norm_both_forms() {
        // N=1, C=2, 2 values each; one group over all 4 values.
        let x = t(&[1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let sc = t(&[2], vec![1.0, 2.0]);
        let bi = t(&[2], vec![0.0, 1.0]);
        let y = group_norm(&x, &sc, &bi, 0.0, 1, false).unwrap();
        let s = (1.25f32).sqrt();
        close(
            &f32s(&y),
            &[-1.5 / s, -0.5 / s, 2.0 * 0.5 / s + 1.0, 2.0 * 1.5 / s + 1.0],
            1e-6,
        );
        // Two groups (one channel each), per-group scale.
        let y = group_norm(&x, &sc, &bi, 0.0, 2, true).unwrap();
        close(&f32s(&y), &[-1.0, 1.0, -1.0, 3.0], 1e-6);
        assert!(group_norm(&x, &sc, &bi, 0.0, 3, false).is_err());
        assert!(group_norm(&x, &t(&[1], vec![1.0]), &bi, 0.0, 1, false).is_err());
    }

    #[test]
    fn mvn_and_lp_norm() {
        let x = t(&[1, 1, 1, 2], vec![1.0, 3.0]);
        let y = mvn(&x, &[0, 2, 3]).unwrap();
        close(&f32s(&y), &[-1.0, 1.0], 1e-6);
        let y = mvn(&x, &[-1]).unwrap();
        close(&f32s(&y), &[-1.0, 1.0], 1e-6);
        assert!(mvn(&x, &[4]).is_err());

        let x = t(&[2, 2], vec![3.0, 4.0, 0.0, 0.0]);
        let y = lp_norm(&x, -1, 2).unwrap();
        close(&f32s(&y), &[0.6, 0.8, 0.0, 0.0], 1e-6);
        let y = lp_norm(&x, 1, 1).unwrap();
        close(&f32s(&y), &[3.0 / 7.0, 4.0 / 7.0, 0.0, 0.0], 1e-6);
        let y = lp_norm(&x, 0, 2).unwrap();
        close(&f32s(&y), &[1.0, 1.0, 0.0, 0.0], 1e-6);
        assert!(lp_norm(&x, 2, 2).is_err());
        assert!(lp_norm(&x, 1, 3).is_err());
    }

    #[test]
    fn lp_pool_sums_powers() {
        let x = t(&[1, 1, 4], vec![3.0, -4.0, 1.0, 2.0]);
        let a = PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
            dilations: vec![],
            kernel_shape: vec![2],
            pads: vec![],
            strides: vec![2],
            count_include_pad: false,
        };
        let y = lp_pool(&x, &a, 2).unwrap();
        close(&f32s(&y), &[5.0, 5f32.sqrt()], 1e-6);
        let y = lp_pool(&x, &a, 1).unwrap();
        close(&f32s(&y), &[7.0, 3.0], 1e-6);
        // Padding counts as zero.
        let mut b = a.clone();
        b.pads = vec![1, 1];
        let y = lp_pool(&x, &b, 1).unwrap();
        close(&f32s(&y), &[3.0, 5.0, 2.0], 1e-6);
        let xd = Tensor::from_vec(vec![1, 1, 2], vec![3.0f64, 4.0]).unwrap();
        let y = lp_pool(&xd, &a, 2).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert!(lp_pool(&x, &a, 0).is_err());
    }
}
