//! LSTM (forward, reverse, bidirectional; peepholes, clip, input_forget,
//! sequence_lens, layout 0 and 1).
//!
//! Per direction, the input projections of all time steps are one GEMM
//! (`[S*B, I] x W^T`); every step then adds `H_{t-1} x R^T` and applies the
//! gates. Gate order in W, R and B is i, o, f, c; peepholes P are i, o, f.

use crate::nn::{float_prec, float_tensor, values, Prec, Real};
use crate::{invalid, Result};
use kiln_ir::{Activation, DType, LstmAttrs, RnnDirection, Tensor, TensorData};

fn act<T: Real>(a: Activation, v: T) -> T {
    match a {
        Activation::Sigmoid => T::ONE / (T::ONE + (-v).exp()),
        Activation::Tanh => v.tanh(),
        Activation::Relu => {
            if v > T::ZERO {
                v
            } else {
                T::ZERO
            }
        }
    }
}

#[inline]
fn clip<T: Real>(v: T, c: Option<T>) -> T {
    match c {
        Some(c) => {
            if v > c {
                c
            } else if v < -c {
                -c
            } else {
                v
            }
        }
        None => v,
    }
}

/// LSTM. Inputs: X, W, R, B?, sequence_lens?, initial_h?, initial_c?, P?.
/// Outputs Y, Y_h, Y_c, truncated to `num_outputs`.
pub fn lstm(a: &LstmAttrs, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let x = inputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| invalid!("LSTM: missing required input 0 (X)"))?;
    if num_outputs > 3 {
        return Err(invalid!(
            "LSTM has 3 outputs (Y, Y_h, Y_c), the node declares {num_outputs}"
        ));
    }
    let mut outs = match float_prec(x, "LSTM")? {
        Prec::F32 => lstm_impl::<f32>(a, inputs, x)?,
        Prec::F64 => lstm_impl::<f64>(a, inputs, x)?,
    };
    outs.truncate(num_outputs);
    Ok(outs)
}

fn check_shape(what: &str, t: &Tensor, want: &[usize], layout: &str) -> Result<()> {
    if t.shape() != want {
        return Err(invalid!(
            "LSTM: {what} must have shape {want:?} {layout}, got {:?}",
            t.shape()
        ));
    }
    Ok(())
}

fn lstm_impl<T: Real>(
    a: &LstmAttrs,
    inputs: &[Option<&Tensor>],
    x: &Tensor,
) -> Result<Vec<Tensor>> {
    let get = |i: usize| inputs.get(i).copied().flatten();
    let w = get(1).ok_or_else(|| invalid!("LSTM: missing required input 1 (W)"))?;
    let r = get(2).ok_or_else(|| invalid!("LSTM: missing required input 2 (R)"))?;
    let (b, seq_lens, h0, c0, p) = (get(3), get(4), get(5), get(6), get(7));
    let dirs = if a.direction == RnnDirection::Bidirectional {
        2
    } else {
        1
    };
    let xs = x.shape();
    if xs.len() != 3 {
        return Err(invalid!(
            "LSTM: X must be 3-D ([seq, batch, input] for layout 0, [batch, seq, input] for layout 1), got {xs:?}"
        ));
    }
    let (sl, bs, isz) = match a.layout {
        0 => (xs[0], xs[1], xs[2]),
        1 => (xs[1], xs[0], xs[2]),
        l => return Err(invalid!("LSTM: layout must be 0 or 1, got {l}")),
    };
    let hs = if a.hidden_size > 0 {
        a.hidden_size
    } else if w.rank() == 3 && w.shape()[1] % 4 == 0 {
        w.shape()[1] / 4
    } else {
        return Err(invalid!(
            "LSTM: hidden_size is not set and W {:?} does not give it",
            w.shape()
        ));
    };
    let g4 = 4 * hs;
    check_shape(
        "W",
        w,
        &[dirs, g4, isz],
        "[num_directions, 4*hidden, input]",
    )?;
    check_shape(
        "R",
        r,
        &[dirs, g4, hs],
        "[num_directions, 4*hidden, hidden]",
    )?;
    if let Some(b) = b {
        check_shape("B", b, &[dirs, 2 * g4], "[num_directions, 8*hidden]")?;
    }
    if let Some(p) = p {
        check_shape("P", p, &[dirs, 3 * hs], "[num_directions, 3*hidden]")?;
    }
    let state_shape = if a.layout == 0 {
        [dirs, bs, hs]
    } else {
        [bs, dirs, hs]
    };
    let state_layout = if a.layout == 0 {
        "[num_directions, batch, hidden]"
    } else {
        "[batch, num_directions, hidden]"
    };
    for (what, t) in [("initial_h", h0), ("initial_c", c0)] {
        if let Some(t) = t {
            check_shape(what, t, &state_shape, state_layout)?;
        }
    }
    let lens = sequence_lengths("LSTM", seq_lens, bs, sl)?;
    let acts: Vec<[Activation; 3]> = {
        let v = &a.activations;
        let default = [Activation::Sigmoid, Activation::Tanh, Activation::Tanh];
        if v.is_empty() {
            vec![default; dirs]
        } else if v.len() == 3 * dirs {
            (0..dirs)
                .map(|d| [v[3 * d], v[3 * d + 1], v[3 * d + 2]])
                .collect()
        } else if v.len() == 3 {
            vec![[v[0], v[1], v[2]]; dirs]
        } else {
            return Err(invalid!(
                "LSTM: activations {v:?} must list 3 functions (f, g, h) per direction ({dirs} directions)"
            ));
        }
    };
    let clip_t = a.clip.map(|c| T::from_f64(c as f64));

    // Inputs in [S, B, I] order and states in [dirs, B, H] order.
    let xv = values::<T>(x, "LSTM X")?;
    let xv: Vec<T> = if a.layout == 0 {
        xv.into_owned()
    } else {
        let mut v = Vec::with_capacity(xv.len());
        for t in 0..sl {
            for bi in 0..bs {
                v.extend_from_slice(&xv[(bi * sl + t) * isz..][..isz]);
            }
        }
        v
    };
    let state = |t: Option<&Tensor>, what: &str| -> Result<Vec<T>> {
        let Some(t) = t else {
            return Ok(vec![T::ZERO; dirs * bs * hs]);
        };
        let v = values::<T>(t, what)?;
        if a.layout == 0 {
            return Ok(v.into_owned());
        }
        let mut out = Vec::with_capacity(v.len());
        for d in 0..dirs {
            for bi in 0..bs {
                out.extend_from_slice(&v[(bi * dirs + d) * hs..][..hs]);
            }
        }
        Ok(out)
    };
    let h_init = state(h0, "LSTM initial_h")?;
    let c_init = state(c0, "LSTM initial_c")?;
    let wv = values::<T>(w, "LSTM W")?;
    let rv = values::<T>(r, "LSTM R")?;
    let bv = match b {
        Some(b) => Some(values::<T>(b, "LSTM B")?),
        None => None,
    };
    let pv = match p {
        Some(p) => Some(values::<T>(p, "LSTM P")?),
        None => None,
    };

    // Y in [S, dirs, B, H]; Y_h / Y_c in [dirs, B, H].
    let mut y = vec![T::ZERO; sl * dirs * bs * hs];
    let mut yh = vec![T::ZERO; dirs * bs * hs];
    let mut yc = vec![T::ZERO; dirs * bs * hs];
    let zeros = vec![T::ZERO; 3 * hs];
    for d in 0..dirs {
        let reverse = a.direction == RnnDirection::Reverse || d == 1;
        let [fa, ga, ha] = acts[d];
        // W and R are stored `[4H, input]` and `[4H, H]`; the products take
        // them transposed, made ready once per direction (f32: packed for
        // the GEMM, which every time step then reads as it is).
        let wt = T::prepare_bt(&wv[d * g4 * isz..(d + 1) * g4 * isz], g4, isz);
        let rt = T::prepare_bt(&rv[d * g4 * hs..(d + 1) * g4 * hs], g4, hs);
        // Input projections of every step, with both biases folded in.
        let mut xw = vec![T::ZERO; sl * bs * g4];
        if let Some(bv) = &bv {
            let bias: Vec<T> = (0..g4)
                .map(|k| bv[d * 2 * g4 + k] + bv[d * 2 * g4 + g4 + k])
                .collect();
            for row in xw.chunks_exact_mut(g4) {
                row.copy_from_slice(&bias);
            }
        }
        T::product_bt(sl * bs, isz, g4, &xv, &wt, &mut xw, true);
        let peep: &[T] = match &pv {
            Some(pv) => &pv[d * 3 * hs..(d + 1) * 3 * hs],
            None => &zeros,
        };
        let (pi, po, pf) = (&peep[..hs], &peep[hs..2 * hs], &peep[2 * hs..]);
        let mut h = h_init[d * bs * hs..(d + 1) * bs * hs].to_vec();
        let mut c = c_init[d * bs * hs..(d + 1) * bs * hs].to_vec();
        let mut hr = vec![T::ZERO; bs * g4];
        for step in 0..sl {
            T::product_bt(bs, hs, g4, &h, &rt, &mut hr, false);
            for (bi, &len) in lens.iter().enumerate() {
                if step >= len {
                    continue;
                }
                let t = if reverse { len - 1 - step } else { step };
                let gx = &xw[(t * bs + bi) * g4..][..g4];
                let gh = &hr[bi * g4..][..g4];
                let hrow = &mut h[bi * hs..(bi + 1) * hs];
                let crow = &mut c[bi * hs..(bi + 1) * hs];
                let yrow = &mut y[((t * dirs + d) * bs + bi) * hs..][..hs];
                for j in 0..hs {
                    let pre = |k: usize| gx[k * hs + j] + gh[k * hs + j];
                    let cp = crow[j];
                    let ig = act(fa, clip(pre(0) + pi[j] * cp, clip_t));
                    let fg = if a.input_forget {
                        T::ONE - ig
                    } else {
                        act(fa, clip(pre(2) + pf[j] * cp, clip_t))
                    };
                    let cg = act(ga, clip(pre(3), clip_t));
                    let cn = fg * cp + ig * cg;
                    let og = act(fa, clip(pre(1) + po[j] * cn, clip_t));
                    let hn = og * act(ha, cn);
                    crow[j] = cn;
                    hrow[j] = hn;
                    yrow[j] = hn;
                }
            }
        }
        yh[d * bs * hs..(d + 1) * bs * hs].copy_from_slice(&h);
        yc[d * bs * hs..(d + 1) * bs * hs].copy_from_slice(&c);
    }

    let dt = x.dtype();
    if a.layout == 0 {
        return Ok(vec![
            float_tensor(vec![sl, dirs, bs, hs], y, dt)?,
            float_tensor(vec![dirs, bs, hs], yh, dt)?,
            float_tensor(vec![dirs, bs, hs], yc, dt)?,
        ]);
    }
    // Layout 1: Y [B, S, dirs, H], states [B, dirs, H].
    let mut y1 = Vec::with_capacity(y.len());
    for bi in 0..bs {
        for t in 0..sl {
            for d in 0..dirs {
                y1.extend_from_slice(&y[((t * dirs + d) * bs + bi) * hs..][..hs]);
            }
        }
    }
    let to_batch_major = |v: &[T]| {
        let mut out = Vec::with_capacity(v.len());
        for bi in 0..bs {
            for d in 0..dirs {
                out.extend_from_slice(&v[(d * bs + bi) * hs..][..hs]);
            }
        }
        out
    };
    Ok(vec![
        float_tensor(vec![bs, sl, dirs, hs], y1, dt)?,
        float_tensor(vec![bs, dirs, hs], to_batch_major(&yh), dt)?,
        float_tensor(vec![bs, dirs, hs], to_batch_major(&yc), dt)?,
    ])
}

/// RNN and GRU (`AttnOp::Recurrent`). Inputs: X, W, R, B?, sequence_lens?,
/// initial_h?. Outputs Y, Y_h, truncated to `num_outputs`.
///
/// Computed in f64 and rounded to X's type. Gate order in W, R and B is z, r, h
/// for GRU. Steps past a batch element's `sequence_lens` leave Y zero and the
/// state unchanged; reverse directions run from the element's last valid step.
pub fn recurrent(
    op: &kiln_ir::AttnOp,
    inputs: &[Option<&Tensor>],
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    let kiln_ir::AttnOp::Recurrent {
        gru,
        direction,
        hidden_size,
        activations,
        clip,
        layout,
        linear_before_reset,
    } = op
    else {
        return Err(invalid!("{} is not RNN or GRU", op.name()));
    };
    let name = op.name();
    let get = |i: usize| inputs.get(i).copied().flatten();
    let x = get(0).ok_or_else(|| invalid!("{name}: missing required input 0 (X)"))?;
    let w = get(1).ok_or_else(|| invalid!("{name}: missing required input 1 (W)"))?;
    let r = get(2).ok_or_else(|| invalid!("{name}: missing required input 2 (R)"))?;
    let (b, seq_lens, h0) = (get(3), get(4), get(5));
    if num_outputs > 2 {
        return Err(invalid!(
            "{name} has 2 outputs (Y, Y_h), the node declares {num_outputs}"
        ));
    }
    let dt = x.dtype();
    if !dt.is_float() {
        return Err(crate::unsupported!("{name} on {dt} tensors"));
    }
    let gates = if *gru { 3 } else { 1 };
    let dirs = if *direction == RnnDirection::Bidirectional {
        2
    } else {
        1
    };
    let xs = x.shape();
    if xs.len() != 3 {
        return Err(invalid!("{name}: X must be 3-D, got {xs:?}"));
    }
    let (sl, bs, isz) = match layout {
        0 => (xs[0], xs[1], xs[2]),
        1 => (xs[1], xs[0], xs[2]),
        l => return Err(invalid!("{name}: layout must be 0 or 1, got {l}")),
    };
    let hs = match hidden_size {
        Some(h) => *h,
        None => match r.shape() {
            [_, _, h] => *h,
            s => return Err(invalid!("{name}: R must be 3-D, got {s:?}")),
        },
    };
    let gh = gates * hs;
    let chk = |what: &str, t: &Tensor, want: &[usize]| -> Result<()> {
        if t.shape() != want {
            return Err(invalid!(
                "{name}: {what} must have shape {want:?}, got {:?}",
                t.shape()
            ));
        }
        Ok(())
    };
    chk("W", w, &[dirs, gh, isz])?;
    chk("R", r, &[dirs, gh, hs])?;
    if let Some(b) = b {
        chk("B", b, &[dirs, 2 * gh])?;
    }
    let state_shape = if *layout == 0 {
        [dirs, bs, hs]
    } else {
        [bs, dirs, hs]
    };
    if let Some(h0) = h0 {
        chk("initial_h", h0, &state_shape)?;
    }
    let lens = sequence_lengths(name, seq_lens, bs, sl)?;
    let nact = if *gru { 2 } else { 1 };
    let defaults: Vec<_> = if *gru {
        vec![
            kiln_ir::AttnOp::rnn_activation("Sigmoid", None, None),
            kiln_ir::AttnOp::rnn_activation("Tanh", None, None),
        ]
    } else {
        vec![kiln_ir::AttnOp::rnn_activation("Tanh", None, None)]
    }
    .into_iter()
    .flatten()
    .collect();
    let acts: Vec<&[_]> = if activations.is_empty() {
        vec![&defaults[..]; dirs]
    } else if activations.len() == nact * dirs {
        activations.chunks(nact).collect()
    } else if activations.len() == nact {
        vec![&activations[..]; dirs]
    } else {
        return Err(invalid!(
            "{name}: activations must list {nact} function(s) per direction ({dirs} directions), got {}",
            activations.len()
        ));
    };
    if acts.iter().any(|a| a.len() != nact) {
        return Err(invalid!("{name}: wrong activation count"));
    }
    let clip = clip.map(|c| c as f64);
    let cl = |v: f64| match clip {
        Some(c) => v.clamp(-c, c),
        None => v,
    };

    let f = |t: &Tensor, what: &str| -> Result<Vec<f64>> {
        if !t.dtype().is_float() {
            return Err(invalid!("{name}: {what} must be a float tensor"));
        }
        t.to_f64_vec().map_err(|e| invalid!("{name}: {what}: {e}"))
    };
    let xv = f(x, "X")?;
    let wv = f(w, "W")?;
    let rv = f(r, "R")?;
    let bv = match b {
        Some(b) => f(b, "B")?,
        None => vec![0.0; dirs * 2 * gh],
    };
    let h0v = match h0 {
        Some(h) => f(h, "initial_h")?,
        None => vec![0.0; dirs * bs * hs],
    };
    // Element accessors independent of the layout.
    let xat = |t: usize, bi: usize| -> &[f64] {
        let row = if *layout == 0 {
            t * bs + bi
        } else {
            bi * sl + t
        };
        &xv[row * isz..(row + 1) * isz]
    };
    let h0at = |d: usize, bi: usize| -> &[f64] {
        let row = if *layout == 0 {
            d * bs + bi
        } else {
            bi * dirs + d
        };
        &h0v[row * hs..(row + 1) * hs]
    };
    let ylen = sl
        .checked_mul(dirs)
        .and_then(|v| v.checked_mul(bs))
        .and_then(|v| v.checked_mul(hs))
        .ok_or_else(|| invalid!("{name}: output too large"))?;
    // Y as [S, dirs, B, H], Y_h as [dirs, B, H].
    let mut y = vec![0.0; ylen];
    let mut yh = vec![0.0; dirs * bs * hs];
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    for d in 0..dirs {
        let reverse = *direction == RnnDirection::Reverse || d == 1;
        let wd = &wv[d * gh * isz..(d + 1) * gh * isz];
        let rd = &rv[d * gh * hs..(d + 1) * gh * hs];
        let (wb, rb) = (
            &bv[d * 2 * gh..d * 2 * gh + gh],
            &bv[d * 2 * gh + gh..(d + 1) * 2 * gh],
        );
        let act = acts[d];
        for (bi, &len) in lens.iter().enumerate() {
            let mut h = h0at(d, bi).to_vec();
            let mut hn = vec![0.0; hs];
            for step in 0..len {
                let t = if reverse { len - 1 - step } else { step };
                let xt = xat(t, bi);
                let wrow = |g: usize, j: usize| &wd[(g * hs + j) * isz..(g * hs + j + 1) * isz];
                let rrow = |g: usize, j: usize| &rd[(g * hs + j) * hs..(g * hs + j + 1) * hs];
                if !*gru {
                    for j in 0..hs {
                        let pre = dot(xt, wrow(0, j)) + dot(&h, rrow(0, j)) + wb[j] + rb[j];
                        hn[j] = act[0].eval(cl(pre));
                    }
                } else {
                    // Gates z (0), r (1), h (2).
                    let mut rg = vec![0.0; hs];
                    let mut zg = vec![0.0; hs];
                    for j in 0..hs {
                        let z = dot(xt, wrow(0, j)) + dot(&h, rrow(0, j)) + wb[j] + rb[j];
                        let rr =
                            dot(xt, wrow(1, j)) + dot(&h, rrow(1, j)) + wb[hs + j] + rb[hs + j];
                        zg[j] = act[0].eval(cl(z));
                        rg[j] = act[0].eval(cl(rr));
                    }
                    let rh: Vec<f64> = h.iter().zip(&rg).map(|(a, b)| a * b).collect();
                    for j in 0..hs {
                        let xw = dot(xt, wrow(2, j)) + wb[2 * hs + j];
                        let pre = if *linear_before_reset {
                            xw + rg[j] * (dot(&h, rrow(2, j)) + rb[2 * hs + j])
                        } else {
                            xw + dot(&rh, rrow(2, j)) + rb[2 * hs + j]
                        };
                        let cand = act[1].eval(cl(pre));
                        hn[j] = (1.0 - zg[j]) * cand + zg[j] * h[j];
                    }
                }
                std::mem::swap(&mut h, &mut hn);
                let at = ((t * dirs + d) * bs + bi) * hs;
                y[at..at + hs].copy_from_slice(&h);
            }
            let at = (d * bs + bi) * hs;
            yh[at..at + hs].copy_from_slice(&h);
        }
    }
    let to = |shape: Vec<usize>, v: Vec<f64>| -> Result<Tensor> {
        let data = match dt {
            DType::F64 => TensorData::F64(v),
            DType::F16 => TensorData::F16(v.into_iter().map(half::f16::from_f64).collect()),
            DType::BF16 => TensorData::BF16(v.into_iter().map(half::bf16::from_f64).collect()),
            _ => TensorData::F32(v.into_iter().map(|x| x as f32).collect()),
        };
        crate::util::tensor(shape, data)
    };
    let mut outs = if *layout == 0 {
        vec![to(vec![sl, dirs, bs, hs], y)?, to(vec![dirs, bs, hs], yh)?]
    } else {
        let mut y1 = Vec::with_capacity(y.len());
        for bi in 0..bs {
            for t in 0..sl {
                for d in 0..dirs {
                    y1.extend_from_slice(&y[((t * dirs + d) * bs + bi) * hs..][..hs]);
                }
            }
        }
        let mut yh1 = Vec::with_capacity(yh.len());
        for bi in 0..bs {
            for d in 0..dirs {
                yh1.extend_from_slice(&yh[(d * bs + bi) * hs..][..hs]);
            }
        }
        vec![
            to(vec![bs, sl, dirs, hs], y1)?,
            to(vec![bs, dirs, hs], yh1)?,
        ]
    };
    outs.truncate(num_outputs.max(1));
    Ok(outs)
}

/// Per-batch sequence lengths from the optional `sequence_lens` input (all `seq`
/// when absent), each checked to lie in `[0, seq]`.
fn sequence_lengths(
    op: &str,
    seq_lens: Option<&Tensor>,
    batch: usize,
    seq: usize,
) -> Result<Vec<usize>> {
    let Some(s) = seq_lens else {
        return Ok(vec![seq; batch]);
    };
    let v = crate::util::i64_values(s, &format!("{op} sequence_lens"))?;
    if v.len() != batch {
        return Err(invalid!(
            "{op}: sequence_lens must have shape [{batch}] (the batch size), got {:?}",
            s.shape()
        ));
    }
    v.iter()
        .map(|&l| match usize::try_from(l) {
            Ok(l) if l <= seq => Ok(l),
            _ => Err(invalid!(
                "{op}: sequence_lens {v:?} must lie in [0, {seq}] (the sequence length)"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(direction: RnnDirection, hidden: usize) -> LstmAttrs {
        LstmAttrs {
            direction,
            hidden_size: hidden,
            activations: vec![],
            clip: None,
            input_forget: false,
            layout: 0,
        }
    }

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    fn sig(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    #[track_caller]
    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "got {got:?}\nwant {want:?}");
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn one_step_by_hand() {
        // H = 1, I = 1, B = 1, S = 1. W = [wi, wo, wf, wc], R = 0.
        let (wi, wo, wf, wc) = (0.5, -0.3, 0.8, 1.2);
        let x = t(&[1, 1, 1], vec![2.0]);
        let w = t(&[1, 4, 1], vec![wi, wo, wf, wc]);
        let r = t(&[1, 4, 1], vec![0.0; 4]);
        let b = t(&[1, 8], vec![0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.2]);
        let h0 = t(&[1, 1, 1], vec![0.0]);
        let c0 = t(&[1, 1, 1], vec![0.5]);
        let outs = lstm(
            &attrs(RnnDirection::Forward, 1),
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                Some(&b),
                None,
                Some(&h0),
                Some(&c0),
            ],
            3,
        )
        .unwrap();
        let xv = 2.0f64;
        let i = sig(wi as f64 * xv + 0.1);
        let o = sig(wo as f64 * xv);
        let f = sig(wf as f64 * xv);
        let cc = (wc as f64 * xv - 0.2).tanh();
        let c = f * 0.5 + i * cc;
        let h = o * c.tanh();
        assert_eq!(outs.len(), 3);
        assert_eq!(outs[0].shape(), &[1, 1, 1, 1]);
        close(&f32s(&outs[0]), &[h as f32]);
        close(&f32s(&outs[1]), &[h as f32]);
        close(&f32s(&outs[2]), &[c as f32]);
        // Only Y_h asked for: truncation keeps the order Y, Y_h.
        let outs = lstm(
            &attrs(RnnDirection::Forward, 1),
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                Some(&b),
                None,
                Some(&h0),
                Some(&c0),
            ],
            2,
        )
        .unwrap();
        assert_eq!(outs.len(), 2);
    }

    #[test]
    fn peepholes_clip_input_forget_relu() {
        let x = t(&[1, 1, 1], vec![1.0]);
        let w = t(&[1, 4, 1], vec![3.0, 2.0, 1.0, -4.0]);
        let r = t(&[1, 4, 1], vec![0.0; 4]);
        let c0 = t(&[1, 1, 1], vec![2.0]);
        let p = t(&[1, 3], vec![0.5, 0.25, -0.5]); // i, o, f
        let mut a = attrs(RnnDirection::Forward, 1);
        a.clip = Some(2.5);
        a.activations = vec![Activation::Sigmoid, Activation::Relu, Activation::Tanh];
        let outs = lstm(
            &a,
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                None,
                None,
                None,
                Some(&c0),
                Some(&p),
            ],
            3,
        )
        .unwrap();
        let i = sig((3.0f64 + 0.5 * 2.0).min(2.5));
        let f = sig(1.0 - 0.5 * 2.0);
        let cc = (-4.0f64).max(-2.5).max(0.0); // relu(clip(-4))
        let c = f * 2.0 + i * cc;
        let o = sig(2.0 + 0.25 * c);
        let h = o * c.tanh();
        close(&f32s(&outs[1]), &[h as f32]);
        close(&f32s(&outs[2]), &[c as f32]);
        a.input_forget = true;
        let outs = lstm(
            &a,
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                None,
                None,
                None,
                Some(&c0),
                Some(&p),
            ],
            3,
        )
        .unwrap();
        let c = (1.0 - i) * 2.0 + i * cc;
        close(&f32s(&outs[2]), &[c as f32]);
    }

    /// Scalar reference of one direction for one batch element.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        w: &[f32],
        r: &[f32],
        b: &[f32],
        isz: usize,
        hs: usize,
        steps: &[usize],
        h0: &[f32],
        c0: &[f32],
    ) -> (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let mut h: Vec<f64> = h0.iter().map(|&v| v as f64).collect();
        let mut c: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
        let mut ys = vec![];
        for &t in steps {
            let xt = &x[t * isz..(t + 1) * isz];
            let gate = |g: usize, j: usize| {
                let row = g * hs + j;
                let mut s = (b[row] + b[4 * hs + row]) as f64;
                for k in 0..isz {
                    s += w[row * isz + k] as f64 * xt[k] as f64;
                }
                for k in 0..hs {
                    s += r[row * hs + k] as f64 * h[k];
                }
                s
            };
            let mut hn = vec![0.0; hs];
            let mut cn = vec![0.0; hs];
            for j in 0..hs {
                let i = sig(gate(0, j));
                let o = sig(gate(1, j));
                let f = sig(gate(2, j));
                let g = gate(3, j).tanh();
                cn[j] = f * c[j] + i * g;
                hn[j] = o * cn[j].tanh();
            }
            h = hn;
            c = cn;
            ys.push(h.iter().map(|&v| v as f32).collect());
        }
        (
            ys,
            h.iter().map(|&v| v as f32).collect(),
            c.iter().map(|&v| v as f32).collect(),
        )
    }

    #[test]
    fn bidirectional_sequence_lens_and_layouts() {
        let (sl, bs, isz, hs) = (4, 3, 2, 3);
        let xv = rand(sl * bs * isz, 1);
        let wv = rand(2 * 4 * hs * isz, 2);
        let rv = rand(2 * 4 * hs * hs, 3);
        let bv = rand(2 * 8 * hs, 4);
        let h0v = rand(2 * bs * hs, 5);
        let c0v = rand(2 * bs * hs, 6);
        let lens = vec![4i32, 2, 0];
        let x = t(&[sl, bs, isz], xv.clone());
        let w = t(&[2, 4 * hs, isz], wv.clone());
        let r = t(&[2, 4 * hs, hs], rv.clone());
        let b = t(&[2, 8 * hs], bv.clone());
        let h0 = t(&[2, bs, hs], h0v.clone());
        let c0 = t(&[2, bs, hs], c0v.clone());
        let sq = Tensor::vector(lens.clone());
        let a = attrs(RnnDirection::Bidirectional, hs);
        let outs = lstm(
            &a,
            &[
                Some(&x),
                Some(&w),
                Some(&r),
                Some(&b),
                Some(&sq),
                Some(&h0),
                Some(&c0),
            ],
            3,
        )
        .unwrap();
        assert_eq!(outs[0].shape(), &[sl, 2, bs, hs]);
        assert_eq!(outs[1].shape(), &[2, bs, hs]);
        assert_eq!(outs[2].shape(), &[2, bs, hs]);
        let (y, yh, yc) = (f32s(&outs[0]), f32s(&outs[1]), f32s(&outs[2]));
        for d in 0..2 {
            let wd = &wv[d * 4 * hs * isz..(d + 1) * 4 * hs * isz];
            let rd = &rv[d * 4 * hs * hs..(d + 1) * 4 * hs * hs];
            let bd = &bv[d * 8 * hs..(d + 1) * 8 * hs];
            for bi in 0..bs {
                let len = lens[bi] as usize;
                // This batch element's inputs as [S, I].
                let xb: Vec<f32> = (0..sl)
                    .flat_map(|tt| xv[(tt * bs + bi) * isz..][..isz].to_vec())
                    .collect();
                let steps: Vec<usize> = if d == 0 {
                    (0..len).collect()
                } else {
                    (0..len).rev().collect()
                };
                let st = (d * bs + bi) * hs;
                let (ys, hf, cf) = reference(
                    &xb,
                    wd,
                    rd,
                    bd,
                    isz,
                    hs,
                    &steps,
                    &h0v[st..st + hs],
                    &c0v[st..st + hs],
                );
                for tt in 0..sl {
                    let got = &y[((tt * 2 + d) * bs + bi) * hs..][..hs];
                    match steps.iter().position(|&s| s == tt) {
                        Some(k) => close(got, &ys[k]),
                        None => assert_eq!(got, &vec![0.0; hs][..], "padding step {tt}"),
                    }
                }
                close(&yh[st..st + hs], &hf);
                close(&yc[st..st + hs], &cf);
            }
        }

        // Layout 1 gives the same numbers, batch-major.
        let mut a1 = a.clone();
        a1.layout = 1;
        let perm3 = |v: &[f32], d0: usize, d1: usize, d2: usize| -> Vec<f32> {
            let mut out = vec![];
            for j in 0..d1 {
                for i in 0..d0 {
                    out.extend_from_slice(&v[(i * d1 + j) * d2..][..d2]);
                }
            }
            out
        };
        let x1 = t(&[bs, sl, isz], perm3(&xv, sl, bs, isz));
        let h01 = t(&[bs, 2, hs], perm3(&h0v, 2, bs, hs));
        let c01 = t(&[bs, 2, hs], perm3(&c0v, 2, bs, hs));
        let outs1 = lstm(
            &a1,
            &[
                Some(&x1),
                Some(&w),
                Some(&r),
                Some(&b),
                Some(&sq),
                Some(&h01),
                Some(&c01),
            ],
            3,
        )
        .unwrap();
        assert_eq!(outs1[0].shape(), &[bs, sl, 2, hs]);
        assert_eq!(outs1[1].shape(), &[bs, 2, hs]);
        close(&f32s(&outs1[1]), &perm3(&yh, 2, bs, hs));
        close(&f32s(&outs1[2]), &perm3(&yc, 2, bs, hs));
        // Y: [S, dirs*B... ] -> [B, S, dirs, H].
        let mut want = vec![];
        for bi in 0..bs {
            for tt in 0..sl {
                for d in 0..2 {
                    want.extend_from_slice(&y[((tt * 2 + d) * bs + bi) * hs..][..hs]);
                }
            }
        }
        close(&f32s(&outs1[0]), &want);
    }

    #[test]
    fn reverse_matches_forward_on_reversed_input() {
        let (sl, bs, isz, hs) = (5, 2, 3, 2);
        let xv = rand(sl * bs * isz, 10);
        let w = t(&[1, 4 * hs, isz], rand(4 * hs * isz, 11));
        let r = t(&[1, 4 * hs, hs], rand(4 * hs * hs, 12));
        let mut xr = vec![];
        for tt in (0..sl).rev() {
            xr.extend_from_slice(&xv[tt * bs * isz..(tt + 1) * bs * isz]);
        }
        let fw = lstm(
            &attrs(RnnDirection::Forward, hs),
            &[Some(&t(&[sl, bs, isz], xr)), Some(&w), Some(&r)],
            3,
        )
        .unwrap();
        let rv = lstm(
            &attrs(RnnDirection::Reverse, hs),
            &[Some(&t(&[sl, bs, isz], xv)), Some(&w), Some(&r)],
            3,
        )
        .unwrap();
        close(&f32s(&fw[1]), &f32s(&rv[1]));
        close(&f32s(&fw[2]), &f32s(&rv[2]));
        // Y of reverse at step t equals Y of forward at step S-1-t.
        let (yf, yr) = (f32s(&fw[0]), f32s(&rv[0]));
        let step = bs * hs;
        for tt in 0..sl {
            close(
                &yr[tt * step..(tt + 1) * step],
                &yf[(sl - 1 - tt) * step..(sl - tt) * step],
            );
        }
    }

    /// The f32 products (`kiln_gemm` on W and R as transposed views) against
    /// the f64 reference core, on odd shapes: `c += a * b^T` alone, then a
    /// whole bidirectional LSTM with biases and initial states.
    #[test]
    fn f32_products_match_the_reference() {
        let mut rng = crate::nn::test_util::Rng::new(7);
        let mut rnd = move || rng.f32() as f64;
        for (m, k, n) in [(1, 128, 512), (3, 5, 7), (17, 33, 20), (0, 4, 4), (2, 0, 3)] {
            let a: Vec<f64> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f64> = (0..n * k).map(|_| rnd()).collect();
            let c0: Vec<f64> = (0..m * n).map(|_| rnd()).collect();
            let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (bt64, bt32) = (f64::prepare_bt(&b, n, k), f32::prepare_bt(&f(&b), n, k));
            for acc in [true, false] {
                let mut want = c0.clone();
                f64::product_bt(m, k, n, &a, &bt64, &mut want, acc);
                // NaN where the product overwrites: it must not be read.
                let mut got = if acc { f(&c0) } else { vec![f32::NAN; m * n] };
                f32::product_bt(m, k, n, &f(&a), &bt32, &mut got, acc);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{k}x{n} acc {acc}: {g} vs {w}"
                    );
                }
            }
        }
        let (sl, bs, isz, hs) = (4, 3, 6, 5);
        let shapes: [Vec<usize>; 6] = [
            vec![sl, bs, isz],
            vec![2, 4 * hs, isz],
            vec![2, 4 * hs, hs],
            vec![2, 8 * hs],
            vec![2, bs, hs],
            vec![2, bs, hs],
        ];
        let data: Vec<Vec<f64>> = shapes
            .iter()
            .map(|s| {
                (0..s.iter().product::<usize>())
                    .map(|_| rnd() * 0.5)
                    .collect()
            })
            .collect();
        let run = |f64s: bool| -> Vec<Vec<f64>> {
            let ts: Vec<Tensor> = shapes
                .iter()
                .zip(&data)
                .map(|(s, d)| {
                    if f64s {
                        Tensor::from_vec(s.clone(), d.clone()).unwrap()
                    } else {
                        t(s, d.iter().map(|&x| x as f32).collect())
                    }
                })
                .collect();
            let ins = [
                Some(&ts[0]),
                Some(&ts[1]),
                Some(&ts[2]),
                Some(&ts[3]),
                None,
                Some(&ts[4]),
                Some(&ts[5]),
            ];
            lstm(&attrs(RnnDirection::Bidirectional, hs), &ins, 3)
                .unwrap()
                .iter()
                .map(|o| o.to_f64_vec().unwrap())
                .collect()
        };
        let (want, got) = (run(true), run(false));
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.len(), g.len());
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn validation_errors() {
        let x = t(&[2, 1, 3], vec![0.0; 6]);
        let w = t(&[1, 8, 3], vec![0.0; 24]);
        let r = t(&[1, 8, 2], vec![0.0; 16]);
        let a = attrs(RnnDirection::Forward, 2);
        assert!(lstm(&a, &[Some(&x), Some(&w), Some(&r)], 3).is_ok());
        let bad_r = t(&[1, 8, 3], vec![0.0; 24]);
        let e = lstm(&a, &[Some(&x), Some(&w), Some(&bad_r)], 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 8, 2]") && e.contains("[1, 8, 3]"), "{e}");
        let sq = Tensor::vector(vec![3i32]);
        assert!(lstm(&a, &[Some(&x), Some(&w), Some(&r), None, Some(&sq)], 3).is_err());
        assert!(lstm(
            &attrs(RnnDirection::Bidirectional, 2),
            &[Some(&x), Some(&w), Some(&r)],
            3
        )
        .is_err());
        assert!(lstm(&a, &[Some(&x), Some(&w)], 1).is_err());
        let xi = Tensor::from_vec(vec![2, 1, 3], vec![0i32; 6]).unwrap();
        assert!(lstm(&a, &[Some(&xi), Some(&w), Some(&r)], 1).is_err());
        // hidden_size inferred from W; f64 works.
        let a0 = attrs(RnnDirection::Forward, 0);
        let outs = lstm(&a0, &[Some(&x), Some(&w), Some(&r)], 1).unwrap();
        assert_eq!(outs[0].shape(), &[2, 1, 1, 2]);
        let x64 = Tensor::from_vec(vec![2, 1, 3], vec![0.5f64; 6]).unwrap();
        let outs = lstm(&a, &[Some(&x64), Some(&w), Some(&r)], 3).unwrap();
        assert_eq!(outs[1].dtype(), kiln_ir::DType::F64);
        // Empty batch.
        let x0 = t(&[2, 0, 3], vec![]);
        let outs = lstm(&a, &[Some(&x0), Some(&w), Some(&r)], 3).unwrap();
        assert_eq!(outs[0].shape(), &[2, 1, 0, 2]);
    }
}

#[cfg(test)]
mod recurrent_tests {
    use super::*;
    use kiln_ir::AttnOp;

    fn rec(gru: bool, direction: RnnDirection, lbr: bool) -> AttnOp {
        AttnOp::Recurrent {
            gru,
            direction,
            hidden_size: Some(1),
            activations: vec![],
            clip: None,
            layout: 0,
            linear_before_reset: lbr,
        }
    }

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn f(t: &Tensor) -> Vec<f64> {
        t.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect()
    }

    fn sig(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    #[track_caller]
    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn rnn_two_steps_by_hand() {
        // H = 1, I = 1: h1 = tanh(0.5*x1 + 0.1), h2 = tanh(0.5*x2 + 2*h1 + 0.1).
        let x = t(&[2, 1, 1], vec![1.0, -1.0]);
        let w = t(&[1, 1, 1], vec![0.5]);
        let r = t(&[1, 1, 1], vec![2.0]);
        let b = t(&[1, 2], vec![0.1, 0.0]);
        let outs = recurrent(
            &rec(false, RnnDirection::Forward, false),
            &[Some(&x), Some(&w), Some(&r), Some(&b)],
            2,
        )
        .unwrap();
        let h1 = (0.6f64).tanh();
        let h2 = (-0.5 + 2.0 * h1 + 0.1f64).tanh();
        assert_eq!(outs[0].shape(), &[2, 1, 1, 1]);
        close(&f(&outs[0]), &[h1, h2]);
        close(&f(&outs[1]), &[h2]);
        // Reverse with sequence_lens 1 only sees x1.
        let lens = Tensor::vector(vec![1i32]);
        let outs = recurrent(
            &rec(false, RnnDirection::Reverse, false),
            &[Some(&x), Some(&w), Some(&r), Some(&b), Some(&lens)],
            2,
        )
        .unwrap();
        close(&f(&outs[0]), &[h1, 0.0]);
        close(&f(&outs[1]), &[h1]);
    }

    #[test]
    fn gru_one_step_both_reset_forms() {
        let x = t(&[1, 1, 1], vec![1.0]);
        let w = t(&[1, 3, 1], vec![0.5, -0.5, 1.0]); // z, r, h
        let r = t(&[1, 3, 1], vec![0.2, 0.3, 0.4]);
        let b = t(&[1, 6], vec![0.0, 0.0, 0.1, 0.0, 0.0, 0.2]);
        let h0 = t(&[1, 1, 1], vec![0.5]);
        let ins = [Some(&x), Some(&w), Some(&r), Some(&b), None, Some(&h0)];
        let z = sig(0.5 + 0.2 * 0.5);
        let rg = sig(-0.5 + 0.3 * 0.5);
        for lbr in [false, true] {
            let outs = recurrent(&rec(true, RnnDirection::Forward, lbr), &ins, 2).unwrap();
            let cand = if lbr {
                (1.0 + 0.1 + rg * (0.4 * 0.5 + 0.2f64)).tanh()
            } else {
                (1.0 + 0.1 + 0.4 * rg * 0.5 + 0.2f64).tanh()
            };
            let h = (1.0 - z) * cand + z * 0.5;
            close(&f(&outs[1]), &[h]);
        }
        // Bidirectional needs two directions of weights.
        assert!(recurrent(&rec(true, RnnDirection::Bidirectional, false), &ins, 2).is_err());
        assert!(recurrent(&rec(true, RnnDirection::Forward, false), &ins[..2], 2).is_err());
        let xi = Tensor::from_vec(vec![1, 1, 1], vec![1i64]).unwrap();
        assert!(recurrent(
            &rec(true, RnnDirection::Forward, false),
            &[Some(&xi), Some(&w), Some(&r)],
            1
        )
        .is_err());
    }

    #[test]
    fn layout_one_and_empty() {
        let x = t(&[2, 1, 1], vec![1.0, 2.0]); // [B=2, S=1, I=1]
        let w = t(&[1, 1, 1], vec![1.0]);
        let r = t(&[1, 1, 1], vec![0.0]);
        let mut op = rec(false, RnnDirection::Forward, false);
        if let AttnOp::Recurrent { layout, .. } = &mut op {
            *layout = 1;
        }
        let outs = recurrent(&op, &[Some(&x), Some(&w), Some(&r)], 2).unwrap();
        assert_eq!(outs[0].shape(), &[2, 1, 1, 1]);
        assert_eq!(outs[1].shape(), &[2, 1, 1]);
        close(&f(&outs[1]), &[(1.0f64).tanh(), (2.0f64).tanh()]);
        let x0 = t(&[0, 1, 1], vec![]);
        let outs = recurrent(&op, &[Some(&x0), Some(&w), Some(&r)], 1).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].shape(), &[0, 1, 1, 1]);
    }
}
