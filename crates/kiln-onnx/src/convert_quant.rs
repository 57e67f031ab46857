//! ONNX nodes of the `op_quant` family (see `kiln_ir::op_quant`) -> `Op`.

use crate::attrs::Attrs;
use crate::convert::NodeCtx;
use crate::tensor_proto::dtype_from_onnx;
use crate::{OnnxError, Result};
use kiln_ir::{DType, Op, QuantOp};

/// Cast / CastLike with a non-default `saturate` (opset 19+) or `round_mode`
/// (opset 24+): the `QuantOp::Cast` form (`to: None` for CastLike). `None` when
/// both attributes have their defaults, so the plain `Op::Cast` applies.
pub(crate) fn cast_attrs(a: &Attrs, to: Option<DType>) -> Result<Option<Op>> {
    let saturate = a.bool("saturate", true);
    let round_mode = a.string("round_mode", "up")?;
    if !matches!(round_mode.as_str(), "up" | "down" | "nearest") {
        return Err(OnnxError::Invalid(format!(
            "Cast: round_mode must be \"up\", \"down\" or \"nearest\", got {round_mode:?}"
        )));
    }
    if saturate && round_mode == "up" {
        return Ok(None);
    }
    Ok(Some(Op::Quant(QuantOp::Cast {
        to,
        saturate,
        round_mode,
    })))
}

fn dtype_attr(ctx: &NodeCtx, name: &str) -> Result<Option<DType>> {
    match ctx.attrs.int_opt(name) {
        None | Some(0) => Ok(None),
        Some(code) => dtype_from_onnx(code as i32).map(Some).map_err(|e| match e {
            OnnxError::UnsupportedFeature(m) => ctx.unsupported(format!("{name} {m}")),
            other => ctx.invalid(other.to_string()),
        }),
    }
}

fn block_size(ctx: &NodeCtx) -> Result<usize> {
    let b = ctx.attrs.int("block_size", 0);
    usize::try_from(b).map_err(|_| ctx.invalid(format!("block_size must be >= 0, got {b}")))
}

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "QuantizeLinear" => QuantOp::QuantizeLinear {
            axis: a.int("axis", 1),
            block_size: block_size(ctx)?,
            saturate: a.bool("saturate", true),
            output_dtype: dtype_attr(ctx, "output_dtype")?,
            precision: dtype_attr(ctx, "precision")?,
        },
        "DequantizeLinear" => QuantOp::DequantizeLinear {
            axis: a.int("axis", 1),
            block_size: block_size(ctx)?,
            output_dtype: dtype_attr(ctx, "output_dtype")?,
        },
        "DynamicQuantizeLinear" => QuantOp::DynamicQuantizeLinear,
        "MatMulInteger" => QuantOp::MatMulInteger,
        "QLinearMatMul" => QuantOp::QLinearMatMul,
        "ConvInteger" => QuantOp::ConvInteger(crate::convert::conv_attrs(ctx.attrs)?),
        "QLinearConv" => QuantOp::QLinearConv(crate::convert::conv_attrs(ctx.attrs)?),
        "BitCast" => QuantOp::BitCast {
            to: dtype_attr(ctx, "to")?
                .ok_or_else(|| ctx.invalid("the 'to' attribute is missing"))?,
        },
        _ => return Ok(None),
    };
    Ok(Some(Op::Quant(op)))
}
