//! Stateful sequence ops: CausalConvWithState and LinearAttention.

use super::{f64s, from_f64, numel, rounder};
use crate::{invalid, Result};
use kiln_ir::Tensor;

/// CausalConvWithState: a depthwise 1-D convolution over `[past_state, input]`
/// (zeros when there is no state), optionally followed by SiLU. Returns the
/// output and the last `k - 1` steps of the padded input.
pub(super) fn causal_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    past: Option<&Tensor>,
    silu: bool,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    const OP: &str = "CausalConvWithState";
    let xs = x.shape();
    let ws = w.shape();
    if xs.len() != 3 {
        return Err(invalid!(
            "{OP}: input must be [batch, channels, length], got {xs:?}"
        ));
    }
    let (b, c, l) = (xs[0], xs[1], xs[2]);
    if ws.len() != 3 || ws[0] != c || ws[1] != 1 || ws[2] == 0 {
        return Err(invalid!(
            "{OP}: weight must have shape [{c}, 1, k] with k >= 1, got {ws:?}"
        ));
    }
    let k = ws[2];
    let pad = k - 1;
    let xv = f64s(x, &format!("{OP}: input"))?;
    let wv = f64s(w, &format!("{OP}: weight"))?;
    let bv = match bias {
        Some(t) => {
            if t.shape() != [c] {
                return Err(invalid!(
                    "{OP}: bias must have shape [{c}], got {:?}",
                    t.shape()
                ));
            }
            f64s(t, &format!("{OP}: bias"))?
        }
        None => vec![0.0; c],
    };
    let pv = match past {
        Some(t) => {
            if t.shape() != [b, c, pad] {
                return Err(invalid!(
                    "{OP}: past_state must have shape [{b}, {c}, {pad}], got {:?}",
                    t.shape()
                ));
            }
            f64s(t, &format!("{OP}: past_state"))?
        }
        None => vec![0.0; numel(&[b, c, pad], OP)?],
    };
    let r = rounder(x.dtype());
    let full = pad
        .checked_add(l)
        .ok_or_else(|| invalid!("{OP}: input too long"))?;
    let mut y = vec![0.0; xv.len()];
    let mut st = vec![0.0; pv.len()];
    let mut padded = vec![0.0; full];
    for bi in 0..b {
        for ci in 0..c {
            let row = bi * c + ci;
            padded[..pad].copy_from_slice(&pv[row * pad..(row + 1) * pad]);
            padded[pad..].copy_from_slice(&xv[row * l..(row + 1) * l]);
            let wk = &wv[ci * k..(ci + 1) * k];
            for t in 0..l {
                let acc: f64 = wk.iter().zip(&padded[t..t + k]).map(|(a, b)| a * b).sum();
                let v = r(acc + bv[ci]);
                y[row * l + t] = if silu {
                    // SiLU in f32 on the rounded convolution, as the reference.
                    let v32 = v as f32;
                    r((v32 * (1.0 / (1.0 + (-v32).exp()))) as f64)
                } else {
                    v
                };
            }
            st[row * pad..(row + 1) * pad].copy_from_slice(&padded[full - pad..]);
        }
    }
    let mut outs = vec![from_f64(xs.to_vec(), y, x.dtype())?];
    if num_outputs >= 2 {
        let sdt = past.map_or(x.dtype(), |p| p.dtype());
        outs.push(from_f64(vec![b, c, pad], st, sdt)?);
    }
    Ok(outs)
}

/// `[B, T, H*D]` as `[B, H, T, D]` (f64).
fn heads_first(t: &Tensor, h: usize, what: &str) -> Result<(usize, Vec<f64>)> {
    let s = t.shape();
    if s.len() != 3 || h == 0 || !s[2].is_multiple_of(h) {
        return Err(invalid!(
            "LinearAttention: {what} must be [batch, seq, heads*size] with {h} heads, got {s:?}"
        ));
    }
    let (b, tl, d) = (s[0], s[1], s[2] / h);
    let v = f64s(t, &format!("LinearAttention: {what}"))?;
    let mut out = vec![0.0; v.len()];
    for bi in 0..b {
        for ti in 0..tl {
            for hi in 0..h {
                let src = (bi * tl + ti) * h * d + hi * d;
                let dst = ((bi * h + hi) * tl + ti) * d;
                out[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }
    Ok((d, out))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: Option<&Tensor>,
    decay: Option<&Tensor>,
    beta: Option<&Tensor>,
    hq: usize,
    hkv: usize,
    scale: Option<f32>,
    gated: bool,
    delta: bool,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    const OP: &str = "LinearAttention";
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(invalid!(
            "{OP}: q_num_heads {hq} must be a multiple of kv_num_heads {hkv}"
        ));
    }
    if gated != decay.is_some() || delta != beta.is_some() {
        return Err(invalid!(
            "{OP}: the update rule needs decay {} and beta {}, got decay {} and beta {}",
            if gated { "present" } else { "absent" },
            if delta { "present" } else { "absent" },
            if decay.is_some() { "present" } else { "absent" },
            if beta.is_some() { "present" } else { "absent" },
        ));
    }
    let qs = q.shape();
    if qs.len() != 3 || k.rank() != 3 || v.rank() != 3 {
        return Err(invalid!(
            "{OP}: query, key and value must be 3-D, got {qs:?}, {:?} and {:?}",
            k.shape(),
            v.shape()
        ));
    }
    let (b, tl) = (qs[0], qs[1]);
    if k.shape()[..2] != qs[..2] || v.shape()[..2] != qs[..2] {
        return Err(invalid!(
            "{OP}: query {qs:?}, key {:?} and value {:?} differ in batch or length",
            k.shape(),
            v.shape()
        ));
    }
    let (dk, qv) = heads_first(q, hq, "query")?;
    let (dk2, kv) = heads_first(k, hkv, "key")?;
    let (dv, vv) = heads_first(v, hkv, "value")?;
    if dk != dk2 {
        return Err(invalid!(
            "{OP}: query head size {dk} differs from key head size {dk2}"
        ));
    }
    // decay as [B, Hkv, T, dk or 1].
    let (dec, dec_w) = match decay {
        Some(t) => {
            let s = t.shape();
            if s.len() != 3 || s[..2] != qs[..2] {
                return Err(invalid!("{OP}: decay must be [{b}, {tl}, ...], got {s:?}"));
            }
            if s[2] == hkv {
                (heads_first(t, hkv, "decay")?.1, 1)
            } else if Some(s[2]) == hkv.checked_mul(dk) {
                (heads_first(t, hkv, "decay")?.1, dk)
            } else {
                return Err(invalid!(
                    "{OP}: decay's last dim {} must be kv_num_heads ({hkv}) or kv_num_heads * d_k ({})",
                    s[2],
                    hkv * dk
                ));
            }
        }
        None => (vec![], 0),
    };
    // beta as [B, heads (Hkv or 1), T].
    let (bet, bet_h) = match beta {
        Some(t) => {
            let s = t.shape();
            if s.len() != 3 || s[..2] != qs[..2] || !(s[2] == hkv || s[2] == 1) {
                return Err(invalid!(
                    "{OP}: beta must be [{b}, {tl}, {hkv} or 1], got {s:?}"
                ));
            }
            (heads_first(t, s[2], "beta")?.1, s[2])
        }
        None => (vec![], 0),
    };
    let n_state = numel(&[b, hkv, dk, dv], OP)?;
    let mut state = match past {
        Some(p) => {
            if p.shape() != [b, hkv, dk, dv] {
                return Err(invalid!(
                    "{OP}: past_state must have shape [{b}, {hkv}, {dk}, {dv}], got {:?}",
                    p.shape()
                ));
            }
            f64s(p, &format!("{OP}: past_state"))?
        }
        None => vec![0.0; n_state],
    };
    let scale = scale.map_or(1.0 / (dk as f64).sqrt(), |s| s as f64);
    let group = hq / hkv;
    let mut out = vec![0.0; numel(&[b, tl, hq, dv], OP)?];
    let mut vt = vec![0.0; dv];
    for bi in 0..b {
        for t in 0..tl {
            for h in 0..hkv {
                let st = &mut state[(bi * hkv + h) * dk * dv..][..dk * dv];
                let kt = &kv[((bi * hkv + h) * tl + t) * dk..][..dk];
                vt.copy_from_slice(&vv[((bi * hkv + h) * tl + t) * dv..][..dv]);
                if gated {
                    let g = &dec[((bi * hkv + h) * tl + t) * dec_w..][..dec_w];
                    for di in 0..dk {
                        let f = g[if dec_w == 1 { 0 } else { di }].exp();
                        st[di * dv..(di + 1) * dv].iter_mut().for_each(|x| *x *= f);
                    }
                }
                if delta {
                    let bh = if bet_h == 1 { 0 } else { h };
                    let be = bet[(bi * bet_h + bh) * tl + t];
                    for (m, vm) in vt.iter_mut().enumerate() {
                        let retrieved: f64 = (0..dk).map(|di| st[di * dv + m] * kt[di]).sum();
                        *vm = be * (*vm - retrieved);
                    }
                }
                for di in 0..dk {
                    for m in 0..dv {
                        st[di * dv + m] += kt[di] * vt[m];
                    }
                }
                for g in 0..group {
                    let hqi = h * group + g;
                    let qt = &qv[((bi * hq + hqi) * tl + t) * dk..][..dk];
                    let o = &mut out[((bi * tl + t) * hq + hqi) * dv..][..dv];
                    for (m, om) in o.iter_mut().enumerate() {
                        *om = scale * (0..dk).map(|di| qt[di] * st[di * dv + m]).sum::<f64>();
                    }
                }
            }
        }
    }
    let mut outs = vec![from_f64(vec![b, tl, hq * dv], out, q.dtype())?];
    if num_outputs >= 2 {
        let sdt = past.map_or(q.dtype(), |p| p.dtype());
        outs.push(from_f64(vec![b, hkv, dk, dv], state, sdt)?);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    #[test]
    fn causal_conv_by_hand() {
        // B = 1, C = 1, L = 3, k = 2: y[t] = w0 * x[t-1] + w1 * x[t] + b.
        let x = t(&[1, 1, 3], vec![1.0, 2.0, 3.0]);
        let w = t(&[1, 1, 2], vec![10.0, 1.0]);
        let b = t(&[1], vec![0.5]);
        let outs = causal_conv(&x, &w, Some(&b), None, false, 2).unwrap();
        close(&f32s(&outs[0]), &[1.5, 12.5, 23.5], 1e-6);
        assert_eq!(f32s(&outs[1]), vec![3.0]);
        let past = t(&[1, 1, 1], vec![4.0]);
        let outs = causal_conv(&x, &w, None, Some(&past), true, 2).unwrap();
        let silu = |v: f64| v / (1.0 + (-v).exp());
        close(&f32s(&outs[0]), &[silu(41.0), silu(12.0), silu(23.0)], 1e-6);
        // k = 1 keeps no state.
        let w1 = t(&[1, 1, 1], vec![2.0]);
        let outs = causal_conv(&x, &w1, None, None, false, 2).unwrap();
        assert_eq!(outs[1].shape(), &[1, 1, 0]);
        assert!(causal_conv(&x, &t(&[2, 1, 1], vec![1.0; 2]), None, None, false, 1).is_err());
        assert!(causal_conv(&x, &w, None, Some(&x), false, 1).is_err());
    }

    #[test]
    fn linear_attention_linear_rule_by_hand() {
        // One head, d = 1: state accumulates k*v; out = scale * q * state.
        let q = t(&[1, 2, 1], vec![1.0, 2.0]);
        let k = t(&[1, 2, 1], vec![3.0, 4.0]);
        let v = t(&[1, 2, 1], vec![5.0, 6.0]);
        let outs =
            linear_attention(&q, &k, &v, None, None, None, 1, 1, None, false, false, 2).unwrap();
        close(&f32s(&outs[0]), &[15.0, 2.0 * (15.0 + 24.0)], 1e-6);
        close(&f32s(&outs[1]), &[39.0], 1e-6);
        // Gated delta: state = exp(g) * state; v' = beta * (v - state * k).
        let g = t(&[1, 2, 1], vec![0.0, (0.5f64).ln() as f32]);
        let be = t(&[1, 2, 1], vec![1.0, 0.5]);
        let outs = linear_attention(
            &q,
            &k,
            &v,
            None,
            Some(&g),
            Some(&be),
            1,
            1,
            Some(1.0),
            true,
            true,
            2,
        )
        .unwrap();
        let s1 = 15.0;
        let s2d = 0.5 * s1;
        let v2 = 0.5 * (6.0 - s2d * 4.0);
        let s2 = s2d + 4.0 * v2;
        close(&f32s(&outs[0]), &[s1, 2.0 * s2], 1e-5);
        // Missing decay for a gated rule, bad head counts.
        assert!(
            linear_attention(&q, &k, &v, None, None, None, 1, 1, None, true, false, 1).is_err()
        );
        assert!(
            linear_attention(&q, &k, &v, None, None, None, 3, 2, None, false, false, 1).is_err()
        );
    }
}
