//! ONNX nodes of the `op_vision` family (see `kiln_ir::op_vision`) -> `Op`.

use crate::convert::NodeCtx;
use crate::tensor_proto::dtype_from_onnx;
use crate::{OnnxError, Result};
use kiln_ir::{AutoPad, ConvAttrs, DType, Op, PadMode, PoolAttrs, ResizeMode, Tensor, VisionOp};

fn output_dtype(ctx: &NodeCtx) -> Result<DType> {
    let code = ctx.attrs.int("output_datatype", 1);
    let code = i32::try_from(code)
        .map_err(|_| ctx.invalid(format!("output_datatype {code} is out of range")))?;
    match dtype_from_onnx(code) {
        Ok(d) if d.is_numeric() => Ok(d),
        Ok(d) => Err(ctx.invalid(format!("output_datatype must be numeric, got {d}"))),
        Err(OnnxError::UnsupportedFeature(m)) => {
            Err(ctx.unsupported(format!("output_datatype {m}")))
        }
        Err(e) => Err(ctx.invalid(e)),
    }
}

fn positive(ctx: &NodeCtx, name: &str, v: i64) -> Result<usize> {
    if v < 1 {
        return Err(ctx.invalid(format!("attribute '{name}' must be positive, got {v}")));
    }
    usize::try_from(v).map_err(|_| ctx.invalid(format!("attribute '{name}' is too large")))
}

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "LRN" => {
            let size = a
                .int_opt("size")
                .ok_or_else(|| ctx.invalid("the 'size' attribute is required"))?;
            VisionOp::Lrn {
                alpha: a.float("alpha", 1e-4),
                beta: a.float("beta", 0.75),
                bias: a.float("bias", 1.0),
                size: positive(ctx, "size", size)?,
            }
        }
        "GroupNormalization" => {
            let g = a
                .int_opt("num_groups")
                .ok_or_else(|| ctx.invalid("the 'num_groups' attribute is required"))?;
            VisionOp::GroupNormalization {
                epsilon: a.float("epsilon", 1e-5),
                num_groups: positive(ctx, "num_groups", g)?,
                per_group: ctx.opset < 21,
            }
        }
        "MeanVarianceNormalization" => {
            if ctx.opset < 9 {
                if !a.bool("normalize_variance", true) {
                    return Err(ctx.unsupported("MeanVarianceNormalization-1 normalize_variance=0"));
                }
                let axes = if a.bool("across_channels", false) {
                    vec![0, 1, 2, 3]
                } else {
                    vec![0, 2, 3]
                };
                VisionOp::MeanVarianceNormalization { axes }
            } else {
                VisionOp::MeanVarianceNormalization {
                    axes: a.ints("axes").map(|v| v.to_vec()).unwrap_or(vec![0, 2, 3]),
                }
            }
        }
        "LpNormalization" => VisionOp::LpNormalization {
            axis: a.int("axis", -1),
            p: a.int("p", 2),
        },
        "LpPool" => {
            // LpPool-1 had a float `p`; later opsets an int.
            let p = match a.int_opt("p") {
                Some(p) => p,
                None => {
                    let f = a.float("p", 2.0);
                    if f.fract() != 0.0 {
                        return Err(ctx.unsupported(format!("LpPool with non-integer p {f}")));
                    }
                    f as i64
                }
            };
            if p < 1 {
                return Err(ctx.invalid(format!("p must be positive, got {p}")));
            }
            let kernel_shape = a.usizes("kernel_shape")?;
            if kernel_shape.is_empty() {
                return Err(ctx.invalid("the 'kernel_shape' attribute is required"));
            }
            VisionOp::LpPool {
                pool: PoolAttrs {
                    auto_pad: crate::convert::auto_pad(ctx.attrs)?,
                    ceil_mode: a.bool("ceil_mode", false),
                    dilations: a.usizes("dilations")?,
                    kernel_shape,
                    pads: a.usizes("pads")?,
                    strides: a.usizes("strides")?,
                    count_include_pad: false,
                },
                p,
            }
        }
        "MaxUnpool" => {
            let kernel_shape = a.usizes("kernel_shape")?;
            if kernel_shape.is_empty() {
                return Err(ctx.invalid("the 'kernel_shape' attribute is required"));
            }
            VisionOp::MaxUnpool {
                kernel_shape,
                pads: a.usizes("pads")?,
                strides: a.usizes("strides")?,
            }
        }
        "GridSample" => {
            let mode = match a
                .string("mode", if ctx.opset < 20 { "bilinear" } else { "linear" })?
                .as_str()
            {
                "bilinear" | "linear" => ResizeMode::Linear,
                "nearest" => ResizeMode::Nearest,
                "bicubic" | "cubic" => ResizeMode::Cubic,
                m => return Err(ctx.invalid(format!("unknown GridSample mode '{m}'"))),
            };
            let padding = match a.string("padding_mode", "zeros")?.as_str() {
                "zeros" => PadMode::Constant,
                "border" => PadMode::Edge,
                "reflection" => PadMode::Reflect,
                m => return Err(ctx.invalid(format!("unknown padding_mode '{m}'"))),
            };
            VisionOp::GridSample {
                mode,
                padding,
                align_corners: a.bool("align_corners", false),
            }
        }
        "AffineGrid" => VisionOp::AffineGrid {
            align_corners: a.bool("align_corners", false),
        },
        "RoiAlign" => {
            let max_mode = match a.string("mode", "avg")?.as_str() {
                "avg" => false,
                "max" => true,
                m => return Err(ctx.invalid(format!("unknown RoiAlign mode '{m}'"))),
            };
            // RoiAlign-10 had no coordinate_transformation_mode and behaved like
            // output_half_pixel; from opset 16 the default is half_pixel.
            let default_ct = if ctx.opset < 16 {
                "output_half_pixel"
            } else {
                "half_pixel"
            };
            let half_pixel = match a
                .string("coordinate_transformation_mode", default_ct)?
                .as_str()
            {
                "half_pixel" => true,
                "output_half_pixel" => false,
                m => {
                    return Err(ctx.invalid(format!("unknown coordinate_transformation_mode '{m}'")))
                }
            };
            VisionOp::RoiAlign {
                max_mode,
                output_height: positive(ctx, "output_height", a.int("output_height", 1))?,
                output_width: positive(ctx, "output_width", a.int("output_width", 1))?,
                sampling_ratio: a.int("sampling_ratio", 0).max(0),
                spatial_scale: a.float("spatial_scale", 1.0),
                half_pixel,
            }
        }
        "MaxRoiPool" => {
            let ps = a.usizes("pooled_shape")?;
            if ps.len() != 2 || ps.contains(&0) {
                return Err(ctx.invalid(format!(
                    "pooled_shape must hold two positive values, got {ps:?}"
                )));
            }
            VisionOp::MaxRoiPool {
                pooled_shape: [ps[0], ps[1]],
                spatial_scale: a.float("spatial_scale", 1.0),
            }
        }
        "NonMaxSuppression" => VisionOp::NonMaxSuppression {
            center_point_box: a.bool("center_point_box", false),
        },
        "DeformConv" => {
            let group = positive(ctx, "group", a.int("group", 1))?;
            let offset_group = positive(ctx, "offset_group", a.int("offset_group", 1))?;
            VisionOp::DeformConv {
                conv: ConvAttrs {
                    auto_pad: AutoPad::NotSet,
                    dilations: a.usizes("dilations")?,
                    group,
                    kernel_shape: a.usizes("kernel_shape")?,
                    pads: a.usizes("pads")?,
                    strides: a.usizes("strides")?,
                },
                offset_group,
            }
        }
        "DFT" => {
            if ctx.opset < 20 {
                // DFT-17: axis was an attribute (default 1); now it is input 2.
                let axis = a.int("axis", 1);
                ctx.inputs.truncate(2);
                let c = ctx.constant("dft_axis", Tensor::scalar(axis));
                ctx.set_input(2, c);
            }
            VisionOp::Dft {
                inverse: a.bool("inverse", false),
                onesided: a.bool("onesided", false),
            }
        }
        "STFT" => VisionOp::Stft {
            onesided: a.bool("onesided", true),
        },
        "HannWindow" | "HammingWindow" | "BlackmanWindow" => {
            let periodic = a.bool("periodic", true);
            let dtype = output_dtype(ctx)?;
            match op_type {
                "HannWindow" => VisionOp::HannWindow { periodic, dtype },
                "HammingWindow" => VisionOp::HammingWindow { periodic, dtype },
                _ => VisionOp::BlackmanWindow { periodic, dtype },
            }
        }
        "MelWeightMatrix" => VisionOp::MelWeightMatrix {
            dtype: output_dtype(ctx)?,
        },
        _ => return Ok(None),
    };
    Ok(Some(Op::Vision(op)))
}

#[cfg(test)]
mod tests {
    use crate::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    use crate::test_util::{int_attr, str_attr, value};
    use crate::{load_model_bytes, LoadOptions, Model, Result};
    use kiln_ir::{Op, PadMode, ResizeMode, VisionOp};
    use prost::Message;

    fn load(opset: i64, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> Result<Model> {
        let node = NodeProto {
            op_type: Some(op.into()),
            name: Some("n".into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec!["y".into()],
            attribute: attrs,
            ..Default::default()
        };
        let bytes = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![node],
                input: vec![value("x"), value("g")],
                output: vec![value("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        load_model_bytes(&bytes, None, &LoadOptions::default())
    }

    #[test]
    fn dft_axis_attribute_becomes_an_input() {
        let m = load(17, "DFT", &["x"], vec![int_attr("axis", 2)]).unwrap();
        let n = &m.graph.nodes[0];
        assert_eq!(
            n.op,
            Op::Vision(VisionOp::Dft {
                inverse: false,
                onesided: false
            })
        );
        assert_eq!(n.inputs.len(), 3);
        assert!(n.inputs[1].is_none());
        let axis = n.inputs[2].as_ref().unwrap();
        assert_eq!(m.graph.initializers[axis].to_i64_vec().unwrap(), vec![2]);
        // Opset 20 keeps the inputs as written.
        let m = load(20, "DFT", &["x"], vec![]).unwrap();
        assert_eq!(m.graph.nodes[0].inputs.len(), 1);
    }

    #[test]
    fn modes_per_opset() {
        let m = load(
            16,
            "GridSample",
            &["x", "g"],
            vec![
                str_attr("mode", "bicubic"),
                str_attr("padding_mode", "reflection"),
            ],
        )
        .unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::GridSample {
                mode: ResizeMode::Cubic,
                padding: PadMode::Reflect,
                align_corners: false
            })
        );
        assert!(load(
            20,
            "GridSample",
            &["x", "g"],
            vec![str_attr("mode", "area")]
        )
        .is_err());
        let m = load(10, "RoiAlign", &["x", "g", "g"], vec![]).unwrap();
        assert!(matches!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::RoiAlign {
                half_pixel: false,
                ..
            })
        ));
        let m = load(16, "RoiAlign", &["x", "g", "g"], vec![]).unwrap();
        assert!(matches!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::RoiAlign {
                half_pixel: true,
                ..
            })
        ));
        let m = load(
            18,
            "GroupNormalization",
            &["x", "g", "g"],
            vec![int_attr("num_groups", 2)],
        )
        .unwrap();
        assert!(matches!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::GroupNormalization {
                per_group: true,
                num_groups: 2,
                ..
            })
        ));
        assert!(load(21, "GroupNormalization", &["x", "g", "g"], vec![]).is_err());
        assert!(load(13, "LRN", &["x"], vec![]).is_err());
        assert!(load(13, "LRN", &["x"], vec![int_attr("size", 0)]).is_err());
        let m = load(
            17,
            "HannWindow",
            &["x"],
            vec![int_attr("output_datatype", 11)],
        )
        .unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::HannWindow {
                periodic: true,
                dtype: kiln_ir::DType::F64
            })
        );
        assert!(load(
            17,
            "HannWindow",
            &["x"],
            vec![int_attr("output_datatype", 9)]
        )
        .is_err());
        let m = load(17, "STFT", &["x", "g"], vec![]).unwrap();
        assert_eq!(
            m.graph.nodes[0].op,
            Op::Vision(VisionOp::Stft { onesided: true })
        );
    }
}
