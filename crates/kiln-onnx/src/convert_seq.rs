//! ONNX nodes of the `op_seq` family (see `kiln_ir::op_seq`) -> `Op`.

use crate::convert::NodeCtx;
use crate::{dtype_from_onnx, OnnxError, Result};
use kiln_ir::{Op, ScanAttrs, SeqOp};

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "SequenceConstruct" => SeqOp::SequenceConstruct,
        "SequenceEmpty" => {
            let code = a.int("dtype", 1);
            let dtype = i32::try_from(code)
                .map_err(|_| ctx.invalid(format!("dtype {code} is not an ONNX type")))
                .and_then(|c| {
                    dtype_from_onnx(c).map_err(|e| match e {
                        OnnxError::UnsupportedFeature(m) => ctx.unsupported(m),
                        other => ctx.invalid(other),
                    })
                })?;
            SeqOp::SequenceEmpty { dtype }
        }
        "SequenceInsert" => SeqOp::SequenceInsert,
        "SequenceAt" => SeqOp::SequenceAt,
        "SequenceErase" => SeqOp::SequenceErase,
        "SequenceLength" => SeqOp::SequenceLength,
        "SplitToSequence" => SeqOp::SplitToSequence {
            axis: a.int("axis", 0),
            keepdims: a.bool("keepdims", true),
        },
        "ConcatFromSequence" => SeqOp::ConcatFromSequence {
            axis: a
                .int_opt("axis")
                .ok_or_else(|| ctx.invalid("ConcatFromSequence needs the 'axis' attribute"))?,
            new_axis: a.bool("new_axis", false),
        },
        "SequenceMap" => SeqOp::SequenceMap {
            body: Box::new(ctx.subgraph("body")?),
        },
        // The `type` attribute only matters for an empty optional, whose runtime
        // value needs no type; its static type comes from the declared outputs.
        "Optional" => SeqOp::Optional,
        "OptionalHasElement" => SeqOp::OptionalHasElement,
        "OptionalGetElement" => SeqOp::OptionalGetElement,
        "Scan" => SeqOp::Scan(scan_attrs(ctx)?),
        _ => return Ok(None),
    };
    Ok(Some(Op::Seq(op)))
}

/// Scan-8 (batched, `sequence_lens` first, `directions`) and Scan-9+ (axes and
/// directions per scan input and output).
fn scan_attrs(ctx: &mut NodeCtx) -> Result<ScanAttrs> {
    let a = ctx.attrs;
    let body = Box::new(ctx.subgraph("body")?);
    let name = ctx.name.to_string();
    let invalid = |m: String| OnnxError::Invalid(format!("node '{name}' (Scan): {m}"));
    let n = a.int("num_scan_inputs", 0);
    let num_scan_inputs = usize::try_from(n)
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| invalid(format!("num_scan_inputs must be at least 1, got {n}")))?;
    // A 0/1 list attribute; `want`: its required length when given.
    let flags = |attr: &str, want: Option<usize>| -> Result<Vec<bool>> {
        let v = a.ints(attr).unwrap_or(&[]);
        if let Some(w) = want {
            if !v.is_empty() && v.len() != w {
                return Err(invalid(format!(
                    "'{attr}' has {} entries, expected {w}",
                    v.len()
                )));
            }
        }
        v.iter()
            .map(|&d| match d {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(invalid(format!("'{attr}' values must be 0 or 1, got {d}"))),
            })
            .collect()
    };
    let batched = ctx.opset < 9;
    if batched {
        if ctx.inputs.is_empty() {
            return Err(invalid(
                "Scan-8 needs its sequence_lens input slot (which may be empty)".into(),
            ));
        }
        return Ok(ScanAttrs {
            body,
            num_scan_inputs,
            batched,
            input_axes: Vec::new(),
            input_reverse: flags("directions", Some(num_scan_inputs))?,
            output_axes: Vec::new(),
            output_reverse: Vec::new(),
        });
    }
    let input_axes = a.ints("scan_input_axes").unwrap_or(&[]).to_vec();
    if !input_axes.is_empty() && input_axes.len() != num_scan_inputs {
        return Err(invalid(format!(
            "'scan_input_axes' has {} entries, expected {num_scan_inputs}",
            input_axes.len()
        )));
    }
    Ok(ScanAttrs {
        body,
        num_scan_inputs,
        batched,
        input_axes,
        input_reverse: flags("scan_input_directions", Some(num_scan_inputs))?,
        output_axes: a.ints("scan_output_axes").unwrap_or(&[]).to_vec(),
        output_reverse: flags("scan_output_directions", None)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::proto::{
        type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        TypeProto, ValueInfoProto,
    };
    use crate::test_util::{graph_attr, int_attr, ints_attr};
    use crate::{load_model_bytes, LoadOptions, OnnxError};
    use kiln_ir::{DType, Op, SeqOp, ValueKind};
    use prost::Message;

    fn tensor_ty(elem: i32) -> TypeProto {
        TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: None,
            })),
            ..Default::default()
        }
    }

    fn seq_ty(elem: TypeProto) -> TypeProto {
        TypeProto {
            value: Some(type_proto::Value::SequenceType(Box::new(
                type_proto::Sequence {
                    elem_type: Some(Box::new(elem)),
                },
            ))),
            ..Default::default()
        }
    }

    fn opt_ty(elem: TypeProto) -> TypeProto {
        TypeProto {
            value: Some(type_proto::Value::OptionalType(Box::new(
                type_proto::Optional {
                    elem_type: Some(Box::new(elem)),
                },
            ))),
            ..Default::default()
        }
    }

    fn vi(name: &str, ty: TypeProto) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(ty),
            ..Default::default()
        }
    }

    fn node(op: &str, ins: &[&str], outs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("{op}_node")),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: outs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn load(
        opset: i64,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
        nodes: Vec<NodeProto>,
    ) -> Result<crate::Model, OnnxError> {
        let bytes = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: nodes,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        load_model_bytes(&bytes, None, &LoadOptions::default())
    }

    fn scan_body() -> GraphProto {
        GraphProto {
            name: Some("body".into()),
            node: vec![node("Add", &["s", "x"], &["s2"], vec![])],
            input: vec![vi("s", tensor_ty(1)), vi("x", tensor_ty(1))],
            output: vec![vi("s2", tensor_ty(1))],
            ..Default::default()
        }
    }

    fn the_op(m: &crate::Model) -> &Op {
        &m.graph.nodes[0].op
    }

    #[test]
    fn sequence_and_optional_types_parse() {
        let m = load(
            17,
            vec![vi("s", seq_ty(tensor_ty(7)))],
            vec![vi("o", opt_ty(seq_ty(tensor_ty(7))))],
            vec![node("Optional", &["s"], &["o"], vec![])],
        )
        .unwrap();
        let s = &m.graph.inputs[0].ty;
        assert_eq!(s.dtype, DType::I64);
        assert_eq!(s.kind, ValueKind::Sequence(Box::new(ValueKind::Tensor)));
        assert_eq!(
            m.graph.outputs[0].ty.describe(),
            "optional(seq(i64 [unknown rank]))"
        );
        assert_eq!(the_op(&m), &Op::Seq(SeqOp::Optional));
    }

    #[test]
    fn sequence_ops_parse_attributes() {
        let out = vec![vi("y", seq_ty(tensor_ty(7)))];
        let m = load(
            17,
            vec![],
            out.clone(),
            vec![node(
                "SequenceEmpty",
                &[],
                &["y"],
                vec![int_attr("dtype", 7)],
            )],
        )
        .unwrap();
        assert_eq!(
            the_op(&m),
            &Op::Seq(SeqOp::SequenceEmpty { dtype: DType::I64 })
        );
        let m = load(
            17,
            vec![vi("x", tensor_ty(1))],
            vec![vi("y", seq_ty(tensor_ty(1)))],
            vec![node(
                "SplitToSequence",
                &["x"],
                &["y"],
                vec![int_attr("axis", -1), int_attr("keepdims", 0)],
            )],
        )
        .unwrap();
        assert_eq!(
            the_op(&m),
            &Op::Seq(SeqOp::SplitToSequence {
                axis: -1,
                keepdims: false
            })
        );
        let e = load(
            17,
            vec![vi("s", seq_ty(tensor_ty(1)))],
            vec![vi("y", tensor_ty(1))],
            vec![node("ConcatFromSequence", &["s"], &["y"], vec![])],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ConcatFromSequence_node") && e.contains("axis"),
            "{e}"
        );
    }

    #[test]
    fn scan_forms_by_opset() {
        let ins = vec![vi("init", tensor_ty(1)), vi("xs", tensor_ty(1))];
        let outs = vec![vi("fin", tensor_ty(1))];
        let m = load(
            8,
            ins.clone(),
            outs.clone(),
            vec![node(
                "Scan",
                &["", "init", "xs"],
                &["fin"],
                vec![
                    int_attr("num_scan_inputs", 1),
                    ints_attr("directions", &[1]),
                    graph_attr("body", scan_body()),
                ],
            )],
        )
        .unwrap();
        let Op::Seq(SeqOp::Scan(a)) = the_op(&m) else {
            panic!("not a Scan");
        };
        assert!(a.batched);
        assert_eq!(a.input_reverse, vec![true]);
        assert_eq!(m.graph.nodes[0].inputs[0], None);

        let m = load(
            11,
            ins.clone(),
            outs.clone(),
            vec![node(
                "Scan",
                &["init", "xs"],
                &["fin"],
                vec![
                    int_attr("num_scan_inputs", 1),
                    ints_attr("scan_input_axes", &[-1]),
                    graph_attr("body", scan_body()),
                ],
            )],
        )
        .unwrap();
        let Op::Seq(SeqOp::Scan(a)) = the_op(&m) else {
            panic!("not a Scan");
        };
        assert!(!a.batched);
        assert_eq!(a.input_axes, vec![-1]);

        let bad = |attrs: Vec<AttributeProto>| {
            load(
                11,
                ins.clone(),
                outs.clone(),
                vec![node("Scan", &["init", "xs"], &["fin"], attrs)],
            )
            .unwrap_err()
            .to_string()
        };
        let e = bad(vec![
            int_attr("num_scan_inputs", 0),
            graph_attr("body", scan_body()),
        ]);
        assert!(e.contains("num_scan_inputs"), "{e}");
        let e = bad(vec![
            int_attr("num_scan_inputs", 1),
            ints_attr("scan_input_directions", &[2]),
            graph_attr("body", scan_body()),
        ]);
        assert!(e.contains("scan_input_directions"), "{e}");
        let e = bad(vec![int_attr("num_scan_inputs", 1)]);
        assert!(e.contains("body"), "{e}");
    }
}
