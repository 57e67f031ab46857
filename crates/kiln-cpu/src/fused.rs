//! Kernels of kiln's fused ops (`FusedOp`): a Conv or MatMul whose bias add,
//! residual add and activation run in one pass.
//!
//! `run_reference` composes the plain kernels and applies `FusedAct::eval`
//! element by element; it is the definition the fast path is tested against.

use crate::{invalid, nn, unsupported, Result};
use kiln_ir::{DType, FusedAct, FusedOp, Tensor};

/// Runs a fused op. Inputs: X/A, W/B, bias?, residual?.
pub fn run(op: &FusedOp, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    run_reference(op, inputs)
}

/// The reference: the plain op, then bias, residual and activation in order.
pub fn run_reference(op: &FusedOp, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let get = |i: usize, what: &str| {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| invalid!("missing required input {i} ({what})"))
    };
    let opt = |i: usize| inputs.get(i).copied().flatten();
    let (mut y, bias_axis) = match op {
        FusedOp::Conv { conv, .. } => (nn::conv(conv, get(0, "X")?, get(1, "W")?, opt(2))?, None),
        FusedOp::MatMul { .. } => {
            let y = nn::matmul(get(0, "A")?, get(1, "B")?)?;
            let last = y.rank().checked_sub(1);
            (y, last)
        }
    };
    if y.dtype() != DType::F32 {
        return Err(unsupported!("{} on {} tensors", op.name(), y.dtype()));
    }
    let shape = y.shape().to_vec();
    let out = y
        .as_slice_mut::<f32>()
        .ok_or_else(|| invalid!("{}: output is not f32", op.name()))?;
    if let (Some(axis), Some(bias)) = (bias_axis, opt(2)) {
        let n = shape[axis];
        let b = bias
            .as_slice::<f32>()
            .filter(|b| b.len() == n && bias.rank() == 1)
            .ok_or_else(|| {
                invalid!(
                    "{}: bias must be f32 [{n}], got {} {:?}",
                    op.name(),
                    bias.dtype(),
                    bias.shape()
                )
            })?;
        for row in out.chunks_exact_mut(n.max(1)) {
            for (v, &bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
    if let Some(res) = opt(3) {
        let r = res
            .as_slice::<f32>()
            .filter(|_| res.shape() == shape.as_slice())
            .ok_or_else(|| {
                invalid!(
                    "{}: residual must be f32 {:?}, got {} {:?}",
                    op.name(),
                    shape,
                    res.dtype(),
                    res.shape()
                )
            })?;
        for (v, &rv) in out.iter_mut().zip(r) {
            *v += rv;
        }
    }
    let act = op.act();
    if act != FusedAct::Identity {
        for v in out.iter_mut() {
            *v = act.eval(*v);
        }
    }
    Ok(y)
}
