//! NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.
//!
//! Both gather `-input[n, target[n, d...], d...]` with optional per-class
//! weights; a target equal to `ignore_index` contributes nothing and has weight
//! zero. `mean` is the weighted mean: sum of weighted losses over the sum of the
//! weights of the counted elements. SoftmaxCrossEntropyLoss first takes the
//! log-softmax over the class axis (1) and can also return it (`log_prob`).

use super::{f64s, from_f64, numel, rounder};
use crate::{invalid, Result};
use kiln_ir::{ReduceOp, Tensor};

pub(super) fn loss(
    sce: bool,
    x: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Option<ReduceOp>,
    ignore_index: Option<i64>,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    let op = if sce {
        "SoftmaxCrossEntropyLoss"
    } else {
        "NegativeLogLikelihoodLoss"
    };
    let xs = x.shape();
    let dt = x.dtype();
    if xs.len() < 2 {
        return Err(invalid!(
            "{op}: the input must have shape [N, C, d...], got {xs:?}"
        ));
    }
    let (n, c) = (xs[0], xs[1]);
    let inner = numel(&xs[2..], op)?;
    let mut want_t: Vec<usize> = vec![n];
    want_t.extend_from_slice(&xs[2..]);
    if target.shape() != want_t.as_slice() {
        return Err(invalid!(
            "{op}: the target must have shape {want_t:?} (the input {xs:?} without the class axis), got {:?}",
            target.shape()
        ));
    }
    if !target.dtype().is_int() {
        return Err(invalid!(
            "{op}: the target must be an integer tensor, got {}",
            target.dtype()
        ));
    }
    if num_outputs > 2 || (!sce && num_outputs > 1) {
        return Err(invalid!(
            "{op}: the node declares {num_outputs} outputs, more than the op has"
        ));
    }
    let tv = crate::util::i64_values(target, op)?;
    let r = rounder(dt);
    let xv = f64s(x, &format!("{op}: input"))?;
    let w = match weight {
        Some(w) => {
            if w.shape() != [c] {
                return Err(invalid!(
                    "{op}: the weight must have shape [{c}] (the class count), got {:?}",
                    w.shape()
                ));
            }
            Some(f64s(w, &format!("{op}: weight"))?)
        }
        None => None,
    };

    // Log-probabilities over the class axis, in the input's precision.
    let lp: Vec<f64> = if sce {
        let mut lp = vec![0.0; xv.len()];
        for ni in 0..n {
            for d in 0..inner {
                let at = |ci: usize| (ni * c + ci) * inner + d;
                let m = (0..c)
                    .map(|ci| xv[at(ci)])
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..c).map(|ci| r(r(xv[at(ci)] - m).exp())).collect();
                let s = r(e.iter().sum());
                for (ci, ev) in e.iter().enumerate() {
                    lp[at(ci)] = r(r(ev / s).ln());
                }
            }
        }
        lp
    } else {
        xv
    };

    let mut losses = vec![0.0; n * inner];
    let mut wsum = 0.0;
    let mut total = 0.0;
    for ni in 0..n {
        for d in 0..inner {
            let idx = ni * inner + d;
            let t = tv[idx];
            if Some(t) == ignore_index {
                continue;
            }
            if t < 0 || t as usize >= c {
                return Err(invalid!(
                    "{op}: target value {t} is out of range for {c} classes"
                ));
            }
            let t = t as usize;
            let wt = w.as_ref().map_or(1.0, |w| w[t]);
            let l = r(-lp[(ni * c + t) * inner + d] * wt);
            losses[idx] = l;
            wsum += wt;
            total += l;
        }
    }
    let loss = match reduction {
        None => from_f64(target.shape().to_vec(), losses, dt)?,
        Some(ReduceOp::Sum) => from_f64(vec![], vec![r(total)], dt)?,
        Some(ReduceOp::Mean) => from_f64(vec![], vec![r(r(total) / r(wsum))], dt)?,
        Some(o) => return Err(invalid!("{op}: unknown reduction {o:?}")),
    };
    let mut outs = vec![loss];
    if sce && num_outputs == 2 {
        outs.push(from_f64(xs.to_vec(), lp, dt)?);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, f32s, t};
    use super::*;

    #[test]
    fn nll_reductions_weights_and_ignore() {
        // N = 2, C = 3.
        let x = t(&[2, 3], vec![0.1, 0.2, 0.7, 0.5, 0.3, 0.2]);
        let tg = Tensor::vector(vec![2i64, 0]);
        let none = loss(false, &x, &tg, None, None, None, 1).unwrap();
        close(&f32s(&none[0]), &[-0.7, -0.5], 1e-6);
        let sum = loss(false, &x, &tg, None, Some(ReduceOp::Sum), None, 1).unwrap();
        close(&f32s(&sum[0]), &[-1.2], 1e-6);
        assert_eq!(sum[0].shape(), &[] as &[usize]);
        let w = t(&[3], vec![1.0, 2.0, 3.0]);
        let mean = loss(false, &x, &tg, Some(&w), Some(ReduceOp::Mean), None, 1).unwrap();
        close(&f32s(&mean[0]), &[(-0.7 * 3.0 - 0.5) / 4.0], 1e-6);
        // Ignoring class 0 drops the second element from sum and weight.
        let ig = loss(false, &x, &tg, Some(&w), Some(ReduceOp::Mean), Some(0), 1).unwrap();
        close(&f32s(&ig[0]), &[-0.7], 1e-6);
        // An ignore_index outside [0, C) is fine.
        let tg2 = Tensor::vector(vec![-100i64, 1]);
        let m = loss(false, &x, &tg2, None, Some(ReduceOp::Mean), Some(-100), 1).unwrap();
        close(&f32s(&m[0]), &[-0.3], 1e-6);
    }

    #[test]
    fn nll_nd_and_errors() {
        // [N=1, C=2, d=2].
        let x = t(&[1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let tg = Tensor::from_vec(vec![1, 2], vec![1i64, 0]).unwrap();
        let out = loss(false, &x, &tg, None, None, None, 1).unwrap();
        assert_eq!(out[0].shape(), &[1, 2]);
        close(&f32s(&out[0]), &[-3.0, -2.0], 1e-6);
        let bad = Tensor::from_vec(vec![1, 2], vec![2i64, 0]).unwrap();
        assert!(loss(false, &x, &bad, None, None, None, 1).is_err());
        let wrong_shape = Tensor::vector(vec![0i64]);
        assert!(loss(false, &x, &wrong_shape, None, None, None, 1).is_err());
        let ft = t(&[1, 2], vec![0.0, 1.0]);
        assert!(loss(false, &x, &ft, None, None, None, 1).is_err());
        assert!(loss(false, &t(&[2], vec![0.0, 1.0]), &tg, None, None, None, 1).is_err());
        // Empty batch: mean is NaN (0 / 0), sum is 0.
        let x0 = t(&[0, 3], vec![]);
        let t0 = Tensor::from_vec(vec![0], Vec::<i64>::new()).unwrap();
        let s = loss(false, &x0, &t0, None, Some(ReduceOp::Sum), None, 1).unwrap();
        close(&f32s(&s[0]), &[0.0], 0.0);
    }

    #[test]
    fn sce_with_log_prob() {
        let x = t(&[1, 2], vec![0.0, (3.0f64).ln() as f32]);
        let tg = Tensor::vector(vec![1i64]);
        let out = loss(true, &x, &tg, None, Some(ReduceOp::Mean), None, 2).unwrap();
        // p = [1/4, 3/4].
        close(&f32s(&out[0]), &[-(0.75f64).ln()], 1e-6);
        close(&f32s(&out[1]), &[(0.25f64).ln(), (0.75f64).ln()], 1e-6);
        assert!(loss(true, &x, &tg, None, None, None, 3).is_err());
        assert!(loss(false, &x, &tg, None, None, None, 2).is_err());
    }
}
