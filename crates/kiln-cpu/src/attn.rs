//! Kernels for the `AttnOp` family (see `kiln_ir::op_attn`).
//!
//! The kernels compute in f64 and round to the input's precision at the points
//! where the ONNX reference stores an intermediate array (so f16/bf16 results
//! follow the reference's step-by-step rounding), then convert back.

mod attention;
mod loss;
mod misc;
mod state;

use crate::{invalid, Result};
use half::{bf16, f16};
use kiln_ir::{AttnOp, DType, Tensor, TensorData};

/// Runs one op of the family on its present inputs.
pub fn run(op: &AttnOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let name = op.name();
    let mut outs = match op {
        AttnOp::Attention { .. } => attention::attention(op, inputs, num_outputs)?,
        AttnOp::RmsNormalization { axis, epsilon } => vec![misc::rms_norm(
            req(inputs, 0, name, "X")?,
            req(inputs, 1, name, "scale")?,
            *axis,
            *epsilon,
        )?],
        AttnOp::RotaryEmbedding {
            interleaved,
            rotary_embedding_dim,
            num_heads,
        } => vec![misc::rotary(
            req(inputs, 0, name, "X")?,
            req(inputs, 1, name, "cos_cache")?,
            req(inputs, 2, name, "sin_cache")?,
            opt(inputs, 3),
            *interleaved,
            *rotary_embedding_dim,
            *num_heads,
        )?],
        AttnOp::NegativeLogLikelihoodLoss {
            reduction,
            ignore_index,
        } => loss::loss(
            false,
            req(inputs, 0, name, "input")?,
            req(inputs, 1, name, "target")?,
            opt(inputs, 2),
            *reduction,
            *ignore_index,
            num_outputs,
        )?,
        AttnOp::SoftmaxCrossEntropyLoss {
            reduction,
            ignore_index,
        } => loss::loss(
            true,
            req(inputs, 0, name, "scores")?,
            req(inputs, 1, name, "labels")?,
            opt(inputs, 2),
            *reduction,
            *ignore_index,
            num_outputs,
        )?,
        AttnOp::Recurrent { .. } => crate::rnn::recurrent(op, inputs, num_outputs)?,
        AttnOp::SwiGlu { alpha } => vec![misc::swiglu(
            req(inputs, 0, name, "A")?,
            req(inputs, 1, name, "B")?,
            *alpha,
        )?],
        AttnOp::CausalConvWithState { silu } => state::causal_conv(
            req(inputs, 0, name, "input")?,
            req(inputs, 1, name, "weight")?,
            opt(inputs, 2),
            opt(inputs, 3),
            *silu,
            num_outputs,
        )?,
        AttnOp::LinearAttention {
            q_num_heads,
            kv_num_heads,
            scale,
            gated,
            delta,
        } => state::linear_attention(
            req(inputs, 0, name, "query")?,
            req(inputs, 1, name, "key")?,
            req(inputs, 2, name, "value")?,
            opt(inputs, 3),
            opt(inputs, 4),
            opt(inputs, 5),
            *q_num_heads,
            *kv_num_heads,
            *scale,
            *gated,
            *delta,
            num_outputs,
        )?,
    };
    outs.truncate(num_outputs.max(1));
    Ok(outs)
}

/// The required input `i`, or an error naming it.
pub(crate) fn req<'a>(
    inputs: &[Option<&'a Tensor>],
    i: usize,
    op: &str,
    what: &str,
) -> Result<&'a Tensor> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| invalid!("{op}: missing required input {i} ({what})"))
}

pub(crate) fn opt<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// Most elements a kernel of this family allocates for one buffer.
const MAX_ELEMENTS: usize = 1 << 31;

/// Product of `shape`, refusing overflow and absurd sizes.
pub(crate) fn numel(shape: &[usize], what: &str) -> Result<usize> {
    match kiln_ir::checked_numel(shape) {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(invalid!("{what}: shape {shape:?} is too large")),
    }
}

/// The elements of a float tensor as f64.
pub(crate) fn f64s(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    if !t.dtype().is_float() {
        return Err(invalid!(
            "{what} must be a float tensor, got {} {:?}",
            t.dtype(),
            t.shape()
        ));
    }
    t.to_f64_vec().map_err(|e| invalid!("{what}: {e}"))
}

/// Rounds an f64 to the nearest value of `dtype` (f64 for non-float types).
pub(crate) fn rounder(dtype: DType) -> fn(f64) -> f64 {
    match dtype {
        DType::F32 => |v| v as f32 as f64,
        DType::F16 => |v| f16::from_f64(v).to_f64(),
        DType::BF16 => |v| bf16::from_f64(v).to_f64(),
        _ => |v| v,
    }
}

/// A float tensor of `dtype` from f64 values.
pub(crate) fn from_f64(shape: Vec<usize>, v: Vec<f64>, dtype: DType) -> Result<Tensor> {
    let data = match dtype {
        DType::F32 => TensorData::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F16 => TensorData::F16(v.into_iter().map(f16::from_f64).collect()),
        DType::BF16 => TensorData::BF16(v.into_iter().map(bf16::from_f64).collect()),
        DType::F64 => TensorData::F64(v),
        d => return Err(invalid!("expected a float output type, got {d}")),
    };
    crate::util::tensor(shape, data)
}

#[cfg(test)]
pub(crate) mod test_util {
    use kiln_ir::Tensor;

    pub fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    #[track_caller]
    pub fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let g = *g as f64;
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
            assert!(
                ok,
                "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_conversion() {
        assert_eq!(rounder(DType::F16)(1.0 + 1e-4), 1.0);
        assert_eq!(rounder(DType::F64)(1.0 + 1e-4), 1.0 + 1e-4);
        let t = from_f64(vec![2], vec![1.5, -2.0], DType::BF16).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert!(from_f64(vec![1], vec![1.0], DType::I32).is_err());
        assert!(numel(&[usize::MAX, 2], "x").is_err());
        let i = Tensor::vector(vec![1i64]);
        assert!(f64s(&i, "x").is_err());
    }

    #[test]
    fn missing_inputs_are_errors() {
        let op = AttnOp::SwiGlu { alpha: 1.0 };
        let a = Tensor::vector(vec![1.0f32]);
        assert!(run(&op, &[Some(&a)], 1).is_err());
        assert!(run(&op, &[], 1).is_err());
    }
}
