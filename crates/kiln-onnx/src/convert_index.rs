//! ONNX nodes of the `op_index` family (see `kiln_ir::op_index`) -> `Op`.

use crate::convert::NodeCtx;
use crate::tensor_proto::dtype_from_onnx;
use crate::{OnnxError, Result};
use kiln_ir::{BinaryOp, IndexOp, Op, Tensor};

fn reduction(ctx: &NodeCtx) -> Result<Option<BinaryOp>> {
    Ok(match ctx.attrs.string("reduction", "none")?.as_str() {
        "none" => None,
        "add" => Some(BinaryOp::Add),
        "mul" => Some(BinaryOp::Mul),
        "max" => Some(BinaryOp::Max),
        "min" => Some(BinaryOp::Min),
        r => return Err(ctx.invalid(format!("unknown reduction '{r}'"))),
    })
}

fn blocksize(ctx: &NodeCtx) -> Result<usize> {
    match ctx.attrs.int_opt("blocksize") {
        Some(b) if b > 0 => Ok(b as usize),
        Some(b) => Err(ctx.invalid(format!("blocksize must be positive, got {b}"))),
        None => Err(ctx.invalid("the 'blocksize' attribute is missing")),
    }
}

fn crd_mode(ctx: &NodeCtx) -> Result<bool> {
    match ctx.attrs.string("mode", "DCR")?.as_str() {
        "DCR" => Ok(false),
        "CRD" => Ok(true),
        m => Err(ctx.invalid(format!("mode must be DCR or CRD, got '{m}'"))),
    }
}

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "GatherND" => {
            let b = a.int("batch_dims", 0);
            if b < 0 {
                return Err(ctx.invalid(format!("batch_dims must be >= 0, got {b}")));
            }
            IndexOp::GatherND {
                batch_dims: b as usize,
            }
        }
        "ScatterND" => IndexOp::ScatterND {
            reduction: reduction(ctx)?,
        },
        "ScatterElements" | "Scatter" => IndexOp::ScatterElements {
            axis: a.int("axis", 0),
            reduction: reduction(ctx)?,
            legacy: op_type == "Scatter",
        },
        "TopK" => {
            if ctx.opset < 10 {
                let k = a
                    .int_opt("k")
                    .ok_or_else(|| ctx.invalid("the 'k' attribute is missing"))?;
                let c = ctx.constant("topk_k", Tensor::vector(vec![k]));
                ctx.set_input(1, c);
            }
            IndexOp::TopK {
                axis: a.int("axis", -1),
                largest: a.bool("largest", true),
            }
        }
        "CumSum" => IndexOp::CumSum {
            exclusive: a.bool("exclusive", false),
            reverse: a.bool("reverse", false),
        },
        "CumProd" => IndexOp::CumProd {
            exclusive: a.bool("exclusive", false),
            reverse: a.bool("reverse", false),
        },
        "NonZero" => IndexOp::NonZero,
        "OneHot" => IndexOp::OneHot {
            axis: a.int("axis", -1),
        },
        "Compress" => IndexOp::Compress {
            axis: a.int_opt("axis"),
        },
        "Unique" => IndexOp::Unique {
            axis: a.int_opt("axis"),
            sorted: a.bool("sorted", true),
        },
        "Einsum" => {
            let equation = a.string("equation", "")?;
            if equation.is_empty() {
                return Err(ctx.invalid("the 'equation' attribute is missing"));
            }
            IndexOp::Einsum { equation }
        }
        "ReverseSequence" => IndexOp::ReverseSequence {
            batch_axis: a.int("batch_axis", 1),
            time_axis: a.int("time_axis", 0),
        },
        "SpaceToDepth" => IndexOp::SpaceToDepth {
            blocksize: blocksize(ctx)?,
            crd: crd_mode(ctx)?,
        },
        "DepthToSpace" => IndexOp::DepthToSpace {
            blocksize: blocksize(ctx)?,
            crd: crd_mode(ctx)?,
        },
        "CenterCropPad" => IndexOp::CenterCropPad {
            axes: a.ints("axes").map(|v| v.to_vec()).unwrap_or_default(),
        },
        "Col2Im" => IndexOp::Col2Im {
            dilations: a.usizes("dilations")?,
            pads: a.usizes("pads")?,
            strides: a.usizes("strides")?,
        },
        "EyeLike" => {
            let dtype = match a.int_opt("dtype") {
                None => None,
                Some(code) => Some(dtype_from_onnx(code as i32).map_err(|e| match e {
                    OnnxError::UnsupportedFeature(m) => ctx.unsupported(format!("EyeLike to {m}")),
                    other => ctx.invalid(other),
                })?),
            };
            IndexOp::EyeLike {
                dtype,
                k: a.int("k", 0),
            }
        }
        "Det" => IndexOp::Det,
        "Shrink" => IndexOp::Shrink {
            lambd: a.float("lambd", 0.5),
            bias: a.float("bias", 0.0),
        },
        "Swish" => IndexOp::Swish {
            alpha: a.float("alpha", 1.0),
        },
        "Hardmax" => {
            let coerce_2d = ctx.opset < 13;
            IndexOp::Hardmax {
                axis: a.int("axis", if coerce_2d { 1 } else { -1 }),
                coerce_2d,
            }
        }
        "TensorScatter" => IndexOp::TensorScatter {
            axis: a.int("axis", -2),
            circular: match a.string("mode", "linear")?.as_str() {
                "linear" => false,
                "circular" => true,
                m => return Err(ctx.invalid(format!("mode must be linear or circular, got '{m}'"))),
            },
        },
        _ => return Ok(None),
    };
    Ok(Some(Op::Index(op)))
}

#[cfg(test)]
mod tests {
    use crate::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    use crate::test_util::{int_attr, str_attr, value};
    use crate::{load_model_bytes, LoadOptions, OnnxError};
    use kiln_ir::{BinaryOp, IndexOp, Op};
    use prost::Message;

    fn load(
        opset: i64,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> Result<crate::Model, OnnxError> {
        let node = NodeProto {
            op_type: Some(op.into()),
            name: Some("n".into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        };
        let bytes = ModelProto {
            ir_version: Some(7),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![node],
                input: inputs
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| value(s))
                    .collect(),
                output: vec![value(outputs[0])],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        load_model_bytes(&bytes, None, &LoadOptions::default())
    }

    #[test]
    fn topk_k_attribute_becomes_an_input() {
        let m = load(1, "TopK", &["x"], &["v", "i"], vec![int_attr("k", 2)]).unwrap();
        let n = &m.graph.nodes[0];
        assert_eq!(
            n.op,
            Op::Index(IndexOp::TopK {
                axis: -1,
                largest: true
            })
        );
        let k = n.input(1).unwrap();
        assert_eq!(m.graph.initializers[k].as_slice::<i64>().unwrap(), &[2]);
        assert!(load(1, "TopK", &["x"], &["v", "i"], vec![]).is_err());
    }

    #[test]
    fn attributes_and_defaults() {
        let m = load(13, "Hardmax", &["x"], &["y"], vec![]).unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Index(IndexOp::Hardmax {
                axis: -1,
                coerce_2d: false
            })
        );
        let m = load(11, "Hardmax", &["x"], &["y"], vec![]).unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Index(IndexOp::Hardmax {
                axis: 1,
                coerce_2d: true
            })
        );
        let m = load(
            18,
            "ScatterND",
            &["x", "i", "u"],
            &["y"],
            vec![str_attr("reduction", "max")],
        )
        .unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Index(IndexOp::ScatterND {
                reduction: Some(BinaryOp::Max)
            })
        );
        assert!(load(
            18,
            "ScatterND",
            &["x", "i", "u"],
            &["y"],
            vec![str_attr("reduction", "avg")]
        )
        .is_err());
        let m = load(
            9,
            "Scatter",
            &["x", "i", "u"],
            &["y"],
            vec![int_attr("axis", 1)],
        )
        .unwrap();
        assert_eq!(m.graph.nodes[0].op.name(), "Scatter");
        let m = load(
            13,
            "DepthToSpace",
            &["x"],
            &["y"],
            vec![int_attr("blocksize", 2)],
        )
        .unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Index(IndexOp::DepthToSpace {
                blocksize: 2,
                crd: false
            })
        );
        assert!(load(13, "DepthToSpace", &["x"], &["y"], vec![]).is_err());
        assert!(load(
            13,
            "SpaceToDepth",
            &["x"],
            &["y"],
            vec![int_attr("blocksize", 0)]
        )
        .is_err());
        assert!(load(12, "Einsum", &["x"], &["y"], vec![]).is_err());
        assert!(load(
            12,
            "GatherND",
            &["x", "i"],
            &["y"],
            vec![int_attr("batch_dims", -1)]
        )
        .is_err());
    }
}
