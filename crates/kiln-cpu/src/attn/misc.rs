//! RMSNormalization, RotaryEmbedding and SwiGLU.

use super::{f64s, from_f64, numel, rounder};
use crate::util::{broadcast_indices, broadcast_shape, normalize_axis};
use crate::{invalid, Result};
use kiln_ir::Tensor;

/// RMSNormalization: `X / sqrt(mean(X^2 over axes [axis, rank)) + epsilon) * scale`,
/// the statistics in f64, the result rounded to X's type.
pub(super) fn rms_norm(x: &Tensor, scale: &Tensor, axis: i64, epsilon: f32) -> Result<Tensor> {
    const OP: &str = "RMSNormalization";
    let xs = x.shape();
    let ax = normalize_axis(axis, xs.len()).map_err(|e| invalid!("{OP}: {e}"))?;
    let inner = numel(&xs[ax..], OP)?;
    let full = broadcast_shape(xs, scale.shape()).map_err(|e| invalid!("{OP}: scale: {e}"))?;
    if full != xs {
        return Err(invalid!(
            "{OP}: scale {:?} must broadcast to X {xs:?}",
            scale.shape()
        ));
    }
    let xv = f64s(x, &format!("{OP}: X"))?;
    let sv = f64s(scale, &format!("{OP}: scale"))?;
    let sidx = broadcast_indices(scale.shape(), xs);
    let r = rounder(x.dtype());
    let mut y = vec![0.0; xv.len()];
    if inner > 0 {
        for (blk, (xb, yb)) in xv.chunks(inner).zip(y.chunks_mut(inner)).enumerate() {
            let ms = xb.iter().map(|v| v * v).sum::<f64>() / inner as f64;
            let inv = 1.0 / (ms + epsilon as f64).sqrt();
            for (j, (o, &v)) in yb.iter_mut().zip(xb).enumerate() {
                *o = r(v * inv * sv[sidx[blk * inner + j]]);
            }
        }
    }
    from_f64(xs.to_vec(), y, x.dtype())
}

/// RotaryEmbedding on `[B, H, S, D]` or `[B, S, H*D]` input (`num_heads` given).
pub(super) fn rotary(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pos: Option<&Tensor>,
    interleaved: bool,
    rotary_dim: usize,
    num_heads: Option<usize>,
) -> Result<Tensor> {
    const OP: &str = "RotaryEmbedding";
    let xs = x.shape();
    // (batch, seq, heads, head size) and the flat index of element (b, s, h, d).
    let (b, s, h, d, four) = match xs.len() {
        4 => (xs[0], xs[2], xs[1], xs[3], true),
        3 => {
            let h = num_heads
                .ok_or_else(|| invalid!("{OP}: 3-D input needs the num_heads attribute"))?;
            if !xs[2].is_multiple_of(h) {
                return Err(invalid!(
                    "{OP}: hidden size {} is not a multiple of num_heads {h}",
                    xs[2]
                ));
            }
            (xs[0], xs[1], h, xs[2] / h, false)
        }
        r => return Err(invalid!("{OP}: X must be 3-D or 4-D, got rank {r}")),
    };
    let rd = if rotary_dim == 0 { d } else { rotary_dim };
    if rd > d || !rd.is_multiple_of(2) {
        return Err(invalid!(
            "{OP}: rotary_embedding_dim {rd} must be even and at most the head size {d}"
        ));
    }
    let half = rd / 2;
    let cv = f64s(cos, &format!("{OP}: cos_cache"))?;
    let sv = f64s(sin, &format!("{OP}: sin_cache"))?;
    if cos.shape() != sin.shape() {
        return Err(invalid!(
            "{OP}: cos_cache {:?} and sin_cache {:?} differ in shape",
            cos.shape(),
            sin.shape()
        ));
    }
    let cs = cos.shape();
    // Row of the caches for (b, s).
    let rows: Vec<usize> = match pos {
        Some(p) => {
            if cs.len() != 2 || cs[1] != half {
                return Err(invalid!(
                    "{OP}: with position_ids the caches must have shape [max_pos, {half}], got {cs:?}"
                ));
            }
            if p.shape() != [b, s] {
                return Err(invalid!(
                    "{OP}: position_ids must have shape [{b}, {s}], got {:?}",
                    p.shape()
                ));
            }
            crate::util::i64_values(p, OP)?
                .into_iter()
                .map(|v| {
                    if v < 0 || v as usize >= cs[0] {
                        Err(invalid!(
                            "{OP}: position id {v} is out of range for a cache of {} positions",
                            cs[0]
                        ))
                    } else {
                        Ok(v as usize)
                    }
                })
                .collect::<Result<_>>()?
        }
        None => {
            if cs != [b, s, half] {
                return Err(invalid!(
                    "{OP}: without position_ids the caches must have shape [{b}, {s}, {half}], got {cs:?}"
                ));
            }
            (0..b * s).collect()
        }
    };
    let xv = f64s(x, &format!("{OP}: X"))?;
    let r = rounder(x.dtype());
    let mut y = xv.clone();
    for bi in 0..b {
        for si in 0..s {
            let row = rows[bi * s + si] * half;
            for hi in 0..h {
                let base = if four {
                    ((bi * h + hi) * s + si) * d
                } else {
                    ((bi * s + si) * h + hi) * d
                };
                for k in 0..half {
                    let (i1, i2) = if interleaved {
                        (base + 2 * k, base + 2 * k + 1)
                    } else {
                        (base + k, base + half + k)
                    };
                    let (x1, x2) = (xv[i1], xv[i2]);
                    let (c, sn) = (cv[row + k], sv[row + k]);
                    y[i1] = r(r(c * x1) - r(sn * x2));
                    y[i2] = r(r(sn * x1) + r(c * x2));
                }
            }
        }
    }
    from_f64(xs.to_vec(), y, x.dtype())
}

/// SwiGLU: `A * sigmoid(alpha * A) * B` for same-shaped A and B.
pub(super) fn swiglu(a: &Tensor, b: &Tensor, alpha: f32) -> Result<Tensor> {
    const OP: &str = "SwiGLU";
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Err(invalid!(
            "{OP}: A ({} {:?}) and B ({} {:?}) must have the same shape and type",
            a.dtype(),
            a.shape(),
            b.dtype(),
            b.shape()
        ));
    }
    let av = f64s(a, &format!("{OP}: A"))?;
    let bv = f64s(b, &format!("{OP}: B"))?;
    let r = rounder(a.dtype());
    let alpha = alpha as f64;
    let y = av
        .iter()
        .zip(&bv)
        .map(|(&x, &g)| {
            let sig = r(1.0 / (1.0 + (-alpha * x).exp()));
            r(r(x * sig) * g)
        })
        .collect();
    from_f64(a.shape().to_vec(), y, a.dtype())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    #[test]
    fn rms_by_hand() {
        let x = t(&[2, 2], vec![3.0, 4.0, 0.0, 0.0]);
        let s = t(&[2], vec![1.0, 2.0]);
        let y = rms_norm(&x, &s, -1, 0.0).unwrap();
        let rms = (12.5f64).sqrt();
        close(&f32s(&y)[..2], &[3.0 / rms, 8.0 / rms], 1e-6);
        // eps keeps the zero row finite.
        let y = rms_norm(&x, &s, 1, 1e-5).unwrap();
        close(&f32s(&y)[2..], &[0.0, 0.0], 0.0);
        // axis 0 normalizes over everything.
        let y = rms_norm(&x, &t(&[1], vec![1.0]), 0, 0.0).unwrap();
        let rms = (25.0f64 / 4.0).sqrt();
        close(&f32s(&y), &[3.0 / rms, 4.0 / rms, 0.0, 0.0], 1e-6);
        assert!(rms_norm(&x, &s, 2, 0.0).is_err());
        assert!(rms_norm(&x, &t(&[3], vec![1.0; 3]), -1, 0.0).is_err());
        let e = t(&[0, 2], vec![]);
        assert_eq!(rms_norm(&e, &s, -1, 0.0).unwrap().shape(), &[0, 2]);
    }

    #[test]
    fn rotary_half_and_interleaved() {
        // B = 1, H = 1, S = 1, D = 4; cos = [c0, c1], sin = [s0, s1].
        let x = t(&[1, 1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let cos = t(&[1, 1, 2], vec![0.5, 0.0]);
        let sin = t(&[1, 1, 2], vec![0.5, 1.0]);
        let y = rotary(&x, &cos, &sin, None, false, 0, None).unwrap();
        // pairs (x0, x2) and (x1, x3).
        close(
            &f32s(&y),
            &[0.5 - 1.5, 0.0 - 4.0, 0.5 + 1.5, 2.0 + 0.0],
            1e-6,
        );
        let y = rotary(&x, &cos, &sin, None, true, 0, None).unwrap();
        // pairs (x0, x1) and (x2, x3).
        close(&f32s(&y), &[0.5 - 1.0, 0.5 + 1.0, -4.0, 3.0], 1e-6);
        // Partial rotation leaves the tail, position ids pick cache rows.
        let cos2 = t(&[3, 1], vec![9.0, 1.0, 9.0]);
        let sin2 = t(&[3, 1], vec![9.0, 0.0, 9.0]);
        let pos = Tensor::from_vec(vec![1, 1], vec![1i64]).unwrap();
        let y = rotary(&x, &cos2, &sin2, Some(&pos), false, 2, None).unwrap();
        close(&f32s(&y), &[1.0, 2.0, 3.0, 4.0], 1e-6);
        // 3-D input with num_heads = 2 (head size 2).
        let x3 = t(&[1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let c1 = t(&[1, 1, 1], vec![0.0]);
        let s1 = t(&[1, 1, 1], vec![1.0]);
        let y = rotary(&x3, &c1, &s1, None, false, 0, Some(2)).unwrap();
        close(&f32s(&y), &[-2.0, 1.0, -4.0, 3.0], 1e-6);
        assert!(rotary(&x3, &c1, &s1, None, false, 0, None).is_err());
        let bad = Tensor::from_vec(vec![1, 1], vec![5i64]).unwrap();
        assert!(rotary(&x, &cos2, &sin2, Some(&bad), false, 2, None).is_err());
        assert!(rotary(&x, &cos, &sin, None, false, 3, None).is_err());
    }

    #[test]
    fn swiglu_values() {
        let a = t(&[2], vec![0.0, 2.0]);
        let b = t(&[2], vec![5.0, 3.0]);
        let y = swiglu(&a, &b, 1.0).unwrap();
        let sig = 1.0 / (1.0 + (-2.0f64).exp());
        close(&f32s(&y), &[0.0, 2.0 * sig * 3.0], 1e-6);
        assert!(swiglu(&a, &t(&[1], vec![1.0]), 1.0).is_err());
    }
}
