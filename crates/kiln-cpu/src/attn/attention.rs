//! Attention (opsets 23-25): scaled dot-product attention with 3-D or 4-D
//! Q/K/V, grouped-query heads, boolean or additive masks (broadcast, padded to
//! the key length), causal and sliding-window masks aligned to the cache
//! offset, a KV cache (past/present), `nonpad_kv_seqlen`, softcap and the
//! `qk_matmul_output` output.
//!
//! Computed in f64, rounded to the input type where the ONNX reference holds an
//! intermediate array (scaled Q and K, QK, softcap, QK + bias, softmax steps in
//! the softmax precision, probabilities, Y).

use super::{f64s, from_f64, numel, opt, req, rounder};
use crate::{invalid, Result};
use kiln_ir::{AttnOp, DType, Tensor};

const OP: &str = "Attention";

/// A `[batch, heads, seq, head_size]` tensor as f64.
struct Bhsd {
    b: usize,
    h: usize,
    s: usize,
    d: usize,
    v: Vec<f64>,
}

impl Bhsd {
    #[inline]
    fn row(&self, b: usize, h: usize, s: usize) -> &[f64] {
        let start = ((b * self.h + h) * self.s + s) * self.d;
        &self.v[start..start + self.d]
    }
}

/// Q, K or V as `[B, H, S, D]`: 4-D as is, 3-D `[B, S, H*D]` split into `heads`.
fn to_bhsd(t: &Tensor, heads: Option<usize>, what: &str) -> Result<Bhsd> {
    let v = f64s(t, &format!("{OP}: {what}"))?;
    let sh = t.shape();
    match sh.len() {
        4 => Ok(Bhsd {
            b: sh[0],
            h: sh[1],
            s: sh[2],
            d: sh[3],
            v,
        }),
        3 => {
            let h = heads.ok_or_else(|| {
                invalid!("{OP}: 3-D inputs need the q_num_heads and kv_num_heads attributes")
            })?;
            let (b, s, hidden) = (sh[0], sh[1], sh[2]);
            if !hidden.is_multiple_of(h) {
                return Err(invalid!(
                    "{OP}: {what} {sh:?}: hidden size {hidden} is not a multiple of the head count {h}"
                ));
            }
            let d = hidden / h;
            let mut out = vec![0.0; v.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..h {
                        let src = (bi * s + si) * hidden + hi * d;
                        let dst = ((bi * h + hi) * s + si) * d;
                        out[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
            }
            Ok(Bhsd { b, h, s, d, v: out })
        }
        r => Err(invalid!(
            "{OP}: {what} must be 3-D or 4-D, got rank {r} {sh:?}"
        )),
    }
}

/// Concatenates `past` (4-D) and `cur` along the sequence axis.
fn concat_seq(past: Option<&Tensor>, cur: Bhsd, what: &str) -> Result<Bhsd> {
    let Some(p) = past else {
        return Ok(cur);
    };
    let ps = p.shape();
    if ps.len() != 4 || ps[0] != cur.b || ps[1] != cur.h || ps[3] != cur.d {
        return Err(invalid!(
            "{OP}: {what} must have shape [{}, {}, past_seq, {}], got {ps:?}",
            cur.b,
            cur.h,
            cur.d
        ));
    }
    let pv = f64s(p, &format!("{OP}: {what}"))?;
    let s = ps[2]
        .checked_add(cur.s)
        .ok_or_else(|| invalid!("{OP}: sequence too long"))?;
    let n = numel(&[cur.b, cur.h, s, cur.d], OP)?;
    let mut v = Vec::with_capacity(n);
    let (pb, cb) = (ps[2] * cur.d, cur.s * cur.d);
    for bh in 0..cur.b * cur.h {
        v.extend_from_slice(&pv[bh * pb..(bh + 1) * pb]);
        v.extend_from_slice(&cur.v[bh * cb..(bh + 1) * cb]);
    }
    Ok(Bhsd {
        b: cur.b,
        h: cur.h,
        s,
        d: cur.d,
        v,
    })
}

/// The attention mask, broadcast to `[B, H, Sq, Skv]` on lookup.
struct Mask {
    /// Additive values (bool masks: 0 for true, -inf for false), padded with
    /// -inf to the key length.
    v: Vec<f64>,
    /// Strides per output axis (0 along broadcast axes).
    strides: [usize; 4],
    dtype: Option<DType>,
}

impl Mask {
    fn new(t: &Tensor, target: [usize; 4]) -> Result<Mask> {
        let sh = t.shape();
        if sh.is_empty() || sh.len() > 4 {
            return Err(invalid!(
                "{OP}: attn_mask must have rank 1 to 4, got {sh:?}"
            ));
        }
        let is_bool = t.dtype() == DType::Bool;
        let raw: Vec<f64> = if is_bool {
            t.as_slice::<bool>()
                .unwrap_or(&[])
                .iter()
                .map(|&b| if b { 0.0 } else { f64::NEG_INFINITY })
                .collect()
        } else {
            f64s(t, &format!("{OP}: attn_mask"))?
        };
        // Right-align to rank 4, padding the key axis with -inf (false).
        let mut dims = [1usize; 4];
        dims[4 - sh.len()..].copy_from_slice(sh);
        let skv = target[3];
        let last = dims[3];
        let v = if last < skv {
            let rows = numel(&dims[..3], OP)?;
            let mut v = Vec::with_capacity(numel(&[rows, skv], OP)?);
            for r in 0..rows {
                v.extend_from_slice(&raw[r * last..(r + 1) * last]);
                v.extend(std::iter::repeat_n(f64::NEG_INFINITY, skv - last));
            }
            dims[3] = skv;
            v
        } else {
            raw
        };
        let mut strides = [0usize; 4];
        let mut acc = 1usize;
        for ax in (0..4).rev() {
            if dims[ax] != target[ax] && dims[ax] != 1 {
                return Err(invalid!(
                    "{OP}: attn_mask {sh:?} does not broadcast to [batch, q_heads, q_seq, kv_seq] = {target:?}"
                ));
            }
            strides[ax] = if dims[ax] == 1 { 0 } else { acc };
            acc *= dims[ax];
        }
        Ok(Mask {
            v,
            strides,
            dtype: (!is_bool).then(|| t.dtype()),
        })
    }

    #[inline]
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let s = &self.strides;
        self.v[b * s[0] + h * s[1] + i * s[2] + j * s[3]]
    }
}

/// Wider of two float types (f64 > f32 > f16/bf16), as numpy promotes them.
fn promote(a: DType, b: DType) -> DType {
    let rank = |d: DType| match d {
        DType::F64 => 3,
        DType::F32 => 2,
        _ => 1,
    };
    if a == b {
        a
    } else if rank(a) == 1 && rank(b) == 1 {
        // f16 + bf16 promotes to f32 in numpy-like rules.
        DType::F32
    } else if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

pub(super) fn attention(
    op: &AttnOp,
    inputs: &[Option<&Tensor>],
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    let AttnOp::Attention {
        is_causal,
        q_num_heads,
        kv_num_heads,
        scale,
        softcap,
        qk_matmul_output_mode,
        softmax_precision,
        left_window_size,
        right_window_size,
    } = op
    else {
        return Err(invalid!("{OP}: wrong op"));
    };
    if num_outputs > 4 {
        return Err(invalid!(
            "{OP} has 4 outputs (Y, present_key, present_value, qk_matmul_output), the node declares {num_outputs}"
        ));
    }
    let q = req(inputs, 0, OP, "Q")?;
    let k = req(inputs, 1, OP, "K")?;
    let v = req(inputs, 2, OP, "V")?;
    let (mask_t, past_k, past_v, nonpad) = (
        opt(inputs, 3),
        opt(inputs, 4),
        opt(inputs, 5),
        opt(inputs, 6),
    );
    let dt = q.dtype();
    if !dt.is_float() {
        return Err(invalid!("{OP}: Q must be a float tensor, got {dt}"));
    }
    if q.rank() != k.rank() || q.rank() != v.rank() {
        return Err(invalid!(
            "{OP}: Q, K and V must have the same rank, got {:?}, {:?} and {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    let rank3 = q.rank() == 3;
    let r = rounder(dt);
    let qh = to_bhsd(q, *q_num_heads, "Q")?;
    let kh = to_bhsd(k, *kv_num_heads, "K")?;
    let vh = to_bhsd(v, *kv_num_heads, "V")?;
    if kh.b != qh.b || vh.b != qh.b || kh.h != vh.h || kh.s != vh.s || kh.d != qh.d {
        return Err(invalid!(
            "{OP}: Q {:?}, K {:?} and V {:?} do not agree (batch, kv heads, kv length, head size)",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    if past_k.is_some() != past_v.is_some() {
        return Err(invalid!(
            "{OP}: past_key and past_value must be given together"
        ));
    }
    if nonpad.is_some() && past_k.is_some() {
        return Err(invalid!(
            "{OP}: nonpad_kv_seqlen cannot be combined with past_key/past_value"
        ));
    }
    let past_len = past_k.map(|p| p.shape().get(2).copied().unwrap_or(0));
    let kh = concat_seq(past_k, kh, "past_key")?;
    let vh = concat_seq(past_v, vh, "past_value")?;
    if kh.s != vh.s {
        return Err(invalid!(
            "{OP}: past_key and past_value have different sequence lengths"
        ));
    }
    let (b, hq, sq, dq) = (qh.b, qh.h, qh.s, qh.d);
    let (hkv, skv, dv) = (kh.h, kh.s, vh.d);
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(invalid!(
            "{OP}: the query head count {hq} must be a multiple of the key/value head count {hkv}"
        ));
    }
    let rep = hq / hkv;
    let nonpad: Option<Vec<i64>> = match nonpad {
        Some(t) => {
            let v = crate::util::i64_values(t, "Attention nonpad_kv_seqlen")?;
            if v.len() != b {
                return Err(invalid!(
                    "{OP}: nonpad_kv_seqlen must have shape [{b}] (the batch size), got {:?}",
                    t.shape()
                ));
            }
            Some(v)
        }
        None => None,
    };
    let target = [b, hq, sq, skv];
    let n_scores = numel(&target, OP)?;
    let mask = match mask_t {
        Some(t) => Some(Mask::new(t, target)?),
        None => None,
    };
    // Where the query block starts among the keys, per batch.
    let offset = |bi: usize| -> i64 {
        match (&past_len, &nonpad) {
            (Some(p), _) => *p as i64,
            (None, Some(np)) => np[bi] - sq as i64,
            (None, None) => 0,
        }
    };
    // The additive bias and whether it is -inf-only by construction.
    let window = *left_window_size >= 0 || *right_window_size >= 0;
    let bias = |bi: usize, h: usize, i: usize, j: usize| -> f64 {
        let mut val = match &mask {
            Some(m) => m.at(bi, h, i, j),
            None => 0.0,
        };
        let off = offset(bi);
        let diff = i as i64 + off - j as i64;
        let mut blocked = *is_causal && diff < 0;
        if window {
            if *left_window_size >= 0 && diff > *left_window_size {
                blocked = true;
            }
            if *right_window_size >= 0 && -diff > *right_window_size {
                blocked = true;
            }
        }
        if let Some(np) = &nonpad {
            if j as i64 >= np[bi] {
                blocked = true;
            }
        }
        if blocked {
            val += f64::NEG_INFINITY;
        }
        val
    };

    // Q and K are each scaled by sqrt(scale), in the input type.
    let scale = scale.map(|s| s as f64).unwrap_or(1.0 / (dq as f64).sqrt());
    let sqs = r(scale.sqrt());
    let qs: Vec<f64> = qh.v.iter().map(|&x| r(x * sqs)).collect();
    let ks: Vec<f64> = kh.v.iter().map(|&x| r(x * sqs)).collect();
    let qsh = Bhsd { v: qs, ..qh };
    let ksh = Bhsd {
        b: kh.b,
        h: kh.h,
        s: kh.s,
        d: kh.d,
        v: ks,
    };

    // The bias dtype follows numpy promotion with a float mask; the softmax
    // runs in softmax_precision when set.
    let bias_dt = match mask.as_ref().and_then(|m| m.dtype) {
        Some(md) => promote(dt, md),
        None => dt,
    };
    let rb = rounder(bias_dt);
    let rs = rounder(softmax_precision.unwrap_or(bias_dt));
    let softcap = *softcap as f64;
    let mode = *qk_matmul_output_mode;

    let mut y = vec![0.0; numel(&[b, hq, sq, dv], OP)?];
    let want_qk = num_outputs >= 4;
    let mut qk_out = if want_qk { vec![0.0; n_scores] } else { vec![] };
    let mut qk = vec![0.0; skv];
    let mut with = vec![0.0; skv];
    let mut p = vec![0.0; skv];
    for bi in 0..b {
        for h in 0..hq {
            let hk = h / rep;
            for i in 0..sq {
                let qrow = qsh.row(bi, h, i);
                for (j, qkj) in qk.iter_mut().enumerate() {
                    let krow = ksh.row(bi, hk, j);
                    let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    let mut s = r(dot);
                    if softcap > 0.0 {
                        s = r(r(r(s / softcap).tanh()) * softcap);
                    }
                    *qkj = s;
                }
                let mut bias_max = f64::NEG_INFINITY;
                let mut bias_nan = false;
                for j in 0..skv {
                    let bv = bias(bi, h, i, j);
                    if bv.is_nan() {
                        bias_nan = true;
                    } else if bv > bias_max {
                        bias_max = bv;
                    }
                    with[j] = rb(qk[j] + bv);
                }
                // Softmax (a row of all -inf gives zeros, not NaN).
                let mut m = f64::NEG_INFINITY;
                for &x in &with {
                    let x = rs(x);
                    if x.is_nan() {
                        m = f64::NAN;
                        break;
                    }
                    if x > m {
                        m = x;
                    }
                }
                let safe = if m == f64::NEG_INFINITY { 0.0 } else { m };
                let mut sum = 0.0;
                for (pj, &x) in p.iter_mut().zip(&with) {
                    *pj = rs(rs(rs(x) - safe).exp());
                    sum += *pj;
                }
                let mut sum = rs(sum);
                if sum == 0.0 {
                    sum = 1.0;
                }
                let all_masked = !bias_nan && bias_max == f64::NEG_INFINITY;
                for pj in p.iter_mut() {
                    *pj = if all_masked { 0.0 } else { rs(*pj / sum) };
                }
                if want_qk {
                    let row = &mut qk_out[((bi * hq + h) * sq + i) * skv..][..skv];
                    let src = match mode {
                        2 => &with,
                        3 => &p,
                        _ => &qk,
                    };
                    for (o, &x) in row.iter_mut().zip(src) {
                        *o = r(x);
                    }
                }
                let yrow = &mut y[((bi * hq + h) * sq + i) * dv..][..dv];
                for (j, &pj) in p.iter().enumerate() {
                    let pj = r(pj);
                    let vrow = vh.row(bi, hk, j);
                    for (o, &x) in yrow.iter_mut().zip(vrow) {
                        *o += pj * x;
                    }
                }
                for o in yrow.iter_mut() {
                    *o = r(*o);
                }
            }
        }
    }

    let y = if rank3 {
        // [B, H, S, Dv] -> [B, S, H*Dv].
        let mut t = vec![0.0; y.len()];
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..sq {
                    let src = ((bi * hq + h) * sq + i) * dv;
                    let dst = (bi * sq + i) * hq * dv + h * dv;
                    t[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                }
            }
        }
        from_f64(vec![b, sq, hq * dv], t, dt)?
    } else {
        from_f64(vec![b, hq, sq, dv], y, dt)?
    };
    let mut outs = vec![y];
    if num_outputs >= 2 {
        outs.push(from_f64(vec![b, hkv, skv, kh.d], kh.v, k.dtype())?);
    }
    if num_outputs >= 3 {
        outs.push(from_f64(vec![b, hkv, skv, dv], vh.v, v.dtype())?);
    }
    if num_outputs >= 4 {
        outs.push(from_f64(target.to_vec(), qk_out, dt)?);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    fn op() -> AttnOp {
        AttnOp::Attention {
            is_causal: false,
            q_num_heads: None,
            kv_num_heads: None,
            scale: None,
            softcap: 0.0,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            left_window_size: -1,
            right_window_size: -1,
        }
    }

    fn with(f: impl FnOnce(&mut AttnOp)) -> AttnOp {
        let mut o = op();
        f(&mut o);
        o
    }

    #[test]
    fn one_head_by_hand() {
        let q = t(&[1, 1, 1, 2], vec![1.0, 0.0]);
        let k = t(&[1, 1, 2, 2], vec![1.0, 0.0, 0.0, 1.0]);
        let v = t(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let outs = attention(&op(), &[Some(&q), Some(&k), Some(&v)], 4).unwrap();
        let a = (0.5f64).sqrt();
        let p0 = a.exp() / (a.exp() + 1.0);
        let p1 = 1.0 - p0;
        close(&f32s(&outs[0]), &[p0 + 3.0 * p1, 2.0 * p0 + 4.0 * p1], 1e-6);
        assert_eq!(outs[1].shape(), &[1, 1, 2, 2]);
        close(&f32s(&outs[3]), &[a, 0.0], 1e-6);
        // Explicit scale, softcap and mode 3 (probabilities).
        let o = with(|o| {
            if let AttnOp::Attention {
                scale,
                softcap,
                qk_matmul_output_mode,
                ..
            } = o
            {
                *scale = Some(2.0);
                *softcap = 1.0;
                *qk_matmul_output_mode = 3;
            }
        });
        let outs = attention(&o, &[Some(&q), Some(&k), Some(&v)], 4).unwrap();
        let s0 = (2.0f64).tanh();
        let p0 = s0.exp() / (s0.exp() + 1.0);
        close(&f32s(&outs[3]), &[p0, 1.0 - p0], 1e-6);
    }

    #[test]
    fn causal_masks_and_fully_masked_rows() {
        // Two queries, two keys; causal: query 0 sees key 0 only.
        let q = t(&[1, 1, 2, 1], vec![1.0, 1.0]);
        let k = t(&[1, 1, 2, 1], vec![1.0, 2.0]);
        let v = t(&[1, 1, 2, 1], vec![10.0, 20.0]);
        let o = with(|o| {
            if let AttnOp::Attention { is_causal, .. } = o {
                *is_causal = true;
            }
        });
        let outs = attention(&o, &[Some(&q), Some(&k), Some(&v)], 1).unwrap();
        let y = f32s(&outs[0]);
        assert_eq!(y[0], 10.0);
        let p0 = 1.0 / (1.0 + 1f64.exp());
        close(&y[1..], &[10.0 * p0 + 20.0 * (1.0 - p0)], 1e-6);
        // A bool mask hiding every key of query 1 gives zeros there, not NaN.
        let mask = Tensor::from_vec(vec![2, 2], vec![true, true, false, false]).unwrap();
        let o3 = with(|o| {
            if let AttnOp::Attention {
                qk_matmul_output_mode,
                ..
            } = o
            {
                *qk_matmul_output_mode = 3;
            }
        });
        let outs = attention(&o3, &[Some(&q), Some(&k), Some(&v), Some(&mask)], 4).unwrap();
        let y = f32s(&outs[0]);
        assert_eq!(y[1], 0.0);
        assert_eq!(&f32s(&outs[3])[2..], &[0.0, 0.0]);
        // A float mask shorter than the keys is padded with -inf.
        let short = t(&[1], vec![0.0]);
        let outs = attention(&op(), &[Some(&q), Some(&k), Some(&v), Some(&short)], 1).unwrap();
        assert_eq!(f32s(&outs[0]), vec![10.0, 10.0]);
        // Sliding window of one key to the left.
        let w = with(|o| {
            if let AttnOp::Attention {
                left_window_size,
                right_window_size,
                ..
            } = o
            {
                *left_window_size = 0;
                *right_window_size = 0;
            }
        });
        let outs = attention(&w, &[Some(&q), Some(&k), Some(&v)], 1).unwrap();
        assert_eq!(f32s(&outs[0]), vec![10.0, 20.0]);
    }

    #[test]
    fn gqa_3d_and_past() {
        // 3-D, q heads 2, kv heads 1, head size 1; past of one step.
        let o = with(|o| {
            if let AttnOp::Attention {
                q_num_heads,
                kv_num_heads,
                ..
            } = o
            {
                *q_num_heads = Some(2);
                *kv_num_heads = Some(1);
            }
        });
        let q = t(&[1, 1, 2], vec![1.0, -1.0]);
        let k = t(&[1, 1, 1], vec![1.0]);
        let v = t(&[1, 1, 1], vec![5.0]);
        let pk = t(&[1, 1, 1, 1], vec![0.0]);
        let pv = t(&[1, 1, 1, 1], vec![1.0]);
        let outs = attention(
            &o,
            &[Some(&q), Some(&k), Some(&v), None, Some(&pk), Some(&pv)],
            4,
        )
        .unwrap();
        assert_eq!(outs[0].shape(), &[1, 1, 2]);
        assert_eq!(outs[1].shape(), &[1, 1, 2, 1]);
        assert_eq!(f32s(&outs[2]), vec![1.0, 5.0]);
        assert_eq!(outs[3].shape(), &[1, 2, 1, 2]);
        // head 0: scores [0, 1]; head 1: [0, -1].
        let pa = 1.0 / (1.0 + 1f64.exp());
        close(
            &f32s(&outs[0]),
            &[pa + 5.0 * (1.0 - pa), (1.0 - pa) + 5.0 * pa],
            1e-6,
        );
        // 3-D without head counts, mismatched ranks, bad mask, bad heads.
        assert!(attention(&op(), &[Some(&q), Some(&k), Some(&v)], 1).is_err());
        let k4 = t(&[1, 1, 1, 1], vec![1.0]);
        assert!(attention(&o, &[Some(&q), Some(&k4), Some(&v)], 1).is_err());
        let q4 = t(&[1, 3, 1, 1], vec![1.0; 3]);
        let k42 = t(&[1, 2, 1, 1], vec![1.0; 2]);
        assert!(attention(&op(), &[Some(&q4), Some(&k42), Some(&k42)], 1).is_err());
        let bad_mask = t(&[3, 1], vec![0.0; 3]);
        assert!(attention(&o, &[Some(&q), Some(&k), Some(&v), Some(&bad_mask)], 1).is_err());
        assert!(attention(&o, &[Some(&q), Some(&k), Some(&v), None, Some(&pk)], 1).is_err());
        let qi = Tensor::from_vec(vec![1, 1, 2], vec![1i32, 2]).unwrap();
        assert!(attention(&o, &[Some(&qi), Some(&k), Some(&v)], 1).is_err());
    }

    #[test]
    fn nonpad_and_empty() {
        // nonpad_kv_seqlen = 1 hides the second key.
        let q = t(&[1, 1, 1, 1], vec![1.0]);
        let k = t(&[1, 1, 2, 1], vec![1.0, 1.0]);
        let v = t(&[1, 1, 2, 1], vec![3.0, 7.0]);
        let np = Tensor::vector(vec![1i64]);
        let outs = attention(
            &op(),
            &[Some(&q), Some(&k), Some(&v), None, None, None, Some(&np)],
            1,
        )
        .unwrap();
        assert_eq!(f32s(&outs[0]), vec![3.0]);
        // An empty mask pads to all -inf: every key hidden, Y is zero.
        let m0 = t(&[0], vec![]);
        let outs = attention(&op(), &[Some(&q), Some(&k), Some(&v), Some(&m0)], 1).unwrap();
        assert_eq!(f32s(&outs[0]), vec![0.0]);
        // Empty batch.
        let q0 = t(&[0, 1, 1, 1], vec![]);
        let k0 = t(&[0, 1, 2, 1], vec![]);
        let outs = attention(&op(), &[Some(&q0), Some(&k0), Some(&k0)], 2).unwrap();
        assert_eq!(outs[0].shape(), &[0, 1, 1, 1]);
        assert_eq!(outs[1].shape(), &[0, 1, 2, 1]);
    }
}
