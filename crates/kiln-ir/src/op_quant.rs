//! Typed quantization ops (QuantizeLinear, DequantizeLinear, QLinear*, *Integer, DynamicQuantizeLinear, BitCast).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_quant.rs` and the kernels
//! live in `kiln-cpu/src/quant.rs`.

use crate::{ConvAttrs, DType, Tensor, ValueType};

/// quantization ops (QuantizeLinear, DequantizeLinear, QLinear*, *Integer, DynamicQuantizeLinear, BitCast).
#[derive(Clone, Debug, PartialEq)]
pub enum QuantOp {
    /// Cast / CastLike with a non-default `saturate` or `round_mode` (the default
    /// forms stay `Op::Cast` / `Op::CastLike`). `to: None` is CastLike: the
    /// result takes the dtype of input 1. `round_mode` is "up", "down" or
    /// "nearest" (e8m0 targets only).
    Cast {
        to: Option<DType>,
        saturate: bool,
        round_mode: String,
    },
    /// Inputs: x, y_scale, y_zero_point?. `block_size` 0: per-tensor or
    /// per-axis (by the scale's shape). The result dtype is the zero point's,
    /// else `output_dtype`, else u8. `precision`: dtype of the division (None:
    /// x's dtype).
    QuantizeLinear {
        axis: i64,
        block_size: usize,
        saturate: bool,
        output_dtype: Option<DType>,
        precision: Option<DType>,
    },
    /// Inputs: x, x_scale, x_zero_point?. The result dtype is `output_dtype`,
    /// else the scale's.
    DequantizeLinear {
        axis: i64,
        block_size: usize,
        output_dtype: Option<DType>,
    },
    /// Inputs: x (f32). Outputs: y (u8), y_scale (f32), y_zero_point (u8).
    DynamicQuantizeLinear,
    /// Inputs: A, B, a_zero_point?, b_zero_point? (8-bit ints). Output: i32.
    MatMulInteger,
    /// Inputs: a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
    /// y_zero_point?. Output: y_zero_point's dtype (else a's).
    QLinearMatMul,
    /// Inputs: x, w, x_zero_point?, w_zero_point?. Output: i32.
    ConvInteger(ConvAttrs),
    /// Inputs: x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
    /// y_zero_point?, B? (i32).
    QLinearConv(ConvAttrs),
    /// Reinterprets the bits of each element as `to` (same element size).
    BitCast { to: DType },
}

impl QuantOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            QuantOp::Cast { to: Some(_), .. } => "Cast",
            QuantOp::Cast { to: None, .. } => "CastLike",
            QuantOp::QuantizeLinear { .. } => "QuantizeLinear",
            QuantOp::DequantizeLinear { .. } => "DequantizeLinear",
            QuantOp::DynamicQuantizeLinear => "DynamicQuantizeLinear",
            QuantOp::MatMulInteger => "MatMulInteger",
            QuantOp::BitCast { .. } => "BitCast",
            QuantOp::QLinearMatMul => "QLinearMatMul",
            QuantOp::ConvInteger(_) => "ConvInteger",
            QuantOp::QLinearConv(_) => "QLinearConv",
        }
    }

    /// Output types from input types (`None`: absent or unknown) and the values of
    /// constant inputs. Returns one entry per node output (`None`: unknown), or a
    /// message saying what is wrong with the inputs.
    pub fn infer(
        &self,
        types: &[Option<ValueType>],
        _consts: &[Option<&Tensor>],
        num_outputs: usize,
    ) -> Result<Vec<Option<ValueType>>, String> {
        let ty = |i: usize| types.get(i).cloned().flatten();
        let shape0 = ty(0).and_then(|t| t.shape);
        let dtype = |i: usize| ty(i).map(|t| t.dtype);
        let with = |d: Option<DType>| d.map(|d| ValueType::new(d, shape0.clone()));
        let mut out = match self {
            QuantOp::Cast { to, .. } => vec![with(to.or_else(|| dtype(1)))],
            QuantOp::QuantizeLinear { output_dtype, .. } => {
                let zp = dtype(2);
                if let (Some(z), Some(o)) = (zp, output_dtype) {
                    if z != *o {
                        return Err(format!(
                            "output_dtype {o} differs from the zero point's dtype {z}"
                        ));
                    }
                }
                let d = match (types.get(2).map(|t| t.is_some()), zp) {
                    (_, Some(z)) => Some(z),
                    // A zero point of unknown type: the result type is unknown.
                    (Some(true), None) => None,
                    _ => Some(output_dtype.unwrap_or(DType::U8)),
                };
                vec![with(d)]
            }
            QuantOp::DequantizeLinear { output_dtype, .. } => {
                vec![with(output_dtype.or_else(|| dtype(1)))]
            }
            QuantOp::DynamicQuantizeLinear => vec![
                with(Some(DType::U8)),
                Some(ValueType::new(DType::F32, Some(vec![]))),
                Some(ValueType::new(DType::U8, Some(vec![]))),
            ],
            QuantOp::MatMulInteger => vec![Some(ValueType::new(DType::I32, None))],
            QuantOp::BitCast { to } => vec![with(Some(*to))],
            QuantOp::QLinearMatMul => {
                let d = if types.get(7).is_some_and(|t| t.is_some()) {
                    dtype(7)
                } else {
                    dtype(0)
                };
                vec![d.map(|d| ValueType::new(d, None))]
            }
            QuantOp::ConvInteger(_) => vec![Some(ValueType::new(DType::I32, None))],
            QuantOp::QLinearConv(_) => {
                let d = if types.get(7).is_some_and(|t| t.is_some()) {
                    dtype(7)
                } else {
                    dtype(0)
                };
                vec![d.map(|d| ValueType::new(d, None))]
            }
        };
        out.resize(num_outputs.max(1), None);
        out.truncate(num_outputs.max(1));
        Ok(out)
    }
}
