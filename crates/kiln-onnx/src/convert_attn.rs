//! ONNX nodes of the `op_attn` family (see `kiln_ir::op_attn`) -> `Op`.

use crate::convert::NodeCtx;
use crate::tensor_proto::dtype_from_onnx;
use crate::Result;
use kiln_ir::{AttnOp, Op, ReduceOp, RnnDirection};

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "Attention" => {
            let heads = |name: &str| -> Result<Option<usize>> {
                match a.int_opt(name) {
                    None => Ok(None),
                    Some(v) if v > 0 => Ok(Some(v as usize)),
                    Some(v) => Err(ctx.invalid(format!("{name} must be positive, got {v}"))),
                }
            };
            let softmax_precision = match a.int_opt("softmax_precision") {
                None | Some(0) => None,
                Some(code) => {
                    let d = dtype_from_onnx(code as i32).map_err(|_| {
                        ctx.invalid(format!("softmax_precision {code} is not a known type"))
                    })?;
                    if !d.is_float() {
                        return Err(
                            ctx.invalid(format!("softmax_precision must be a float type, got {d}"))
                        );
                    }
                    Some(d)
                }
            };
            let mode = a.int("qk_matmul_output_mode", 0);
            if !(0..=3).contains(&mode) {
                return Err(ctx.invalid(format!(
                    "qk_matmul_output_mode must be 0, 1, 2 or 3, got {mode}"
                )));
            }
            let window = |name: &str| -> Result<i64> {
                match a.int(name, -1) {
                    v if v >= -1 => Ok(v),
                    v => Err(ctx.invalid(format!("{name} must be -1 or non-negative, got {v}"))),
                }
            };
            AttnOp::Attention {
                is_causal: a.bool("is_causal", false),
                q_num_heads: heads("q_num_heads")?,
                kv_num_heads: heads("kv_num_heads")?,
                scale: a.float_opt("scale"),
                softcap: a.float("softcap", 0.0),
                qk_matmul_output_mode: mode,
                softmax_precision,
                left_window_size: window("left_window_size")?,
                right_window_size: window("right_window_size")?,
            }
        }
        "RMSNormalization" => {
            // stash_type 1 (f32) is the only one ONNX defines; kiln computes the
            // statistics in f32 (f64 for f64 input) in every case.
            AttnOp::RmsNormalization {
                axis: a.int("axis", -1),
                epsilon: a.float("epsilon", 1e-5),
            }
        }
        "RotaryEmbedding" => {
            let dim = a.int("rotary_embedding_dim", 0);
            if dim < 0 {
                return Err(ctx.invalid(format!(
                    "rotary_embedding_dim must be non-negative, got {dim}"
                )));
            }
            let num_heads = match a.int_opt("num_heads") {
                None | Some(0) => None,
                Some(n) if n > 0 => Some(n as usize),
                Some(n) => return Err(ctx.invalid(format!("num_heads must be positive, got {n}"))),
            };
            AttnOp::RotaryEmbedding {
                interleaved: a.bool("interleaved", false),
                rotary_embedding_dim: dim as usize,
                num_heads,
            }
        }
        "NegativeLogLikelihoodLoss" | "SoftmaxCrossEntropyLoss" => {
            let reduction = match a.string("reduction", "mean")?.as_str() {
                "none" => None,
                "sum" => Some(ReduceOp::Sum),
                "mean" => Some(ReduceOp::Mean),
                r => {
                    return Err(
                        ctx.invalid(format!("reduction must be none, sum or mean, got '{r}'"))
                    )
                }
            };
            let ignore_index = a.int_opt("ignore_index");
            if op_type == "NegativeLogLikelihoodLoss" {
                AttnOp::NegativeLogLikelihoodLoss {
                    reduction,
                    ignore_index,
                }
            } else {
                AttnOp::SoftmaxCrossEntropyLoss {
                    reduction,
                    ignore_index,
                }
            }
        }
        "RNN" | "GRU" => {
            let gru = op_type == "GRU";
            let direction = match a.string("direction", "forward")?.as_str() {
                "forward" => RnnDirection::Forward,
                "reverse" => RnnDirection::Reverse,
                "bidirectional" => RnnDirection::Bidirectional,
                d => return Err(ctx.invalid(format!("unknown {op_type} direction '{d}'"))),
            };
            let hidden_size = match a.int_opt("hidden_size") {
                None => None,
                Some(h) if h > 0 => Some(h as usize),
                Some(h) => {
                    return Err(ctx.invalid(format!("hidden_size must be positive, got {h}")))
                }
            };
            // alpha/beta values are consumed in order by the functions that take them.
            let mut alphas = a.floats("activation_alpha").unwrap_or(&[]).iter().copied();
            let mut betas = a.floats("activation_beta").unwrap_or(&[]).iter().copied();
            let mut activations = Vec::new();
            for name in a.strings("activations")? {
                let lower = name.to_ascii_lowercase();
                let takes_alpha = matches!(
                    lower.as_str(),
                    "affine"
                        | "leakyrelu"
                        | "thresholdedrelu"
                        | "scaledtanh"
                        | "hardsigmoid"
                        | "elu"
                );
                let takes_beta = matches!(lower.as_str(), "affine" | "scaledtanh" | "hardsigmoid");
                let alpha = if takes_alpha { alphas.next() } else { None };
                let beta = if takes_beta { betas.next() } else { None };
                let f = AttnOp::rnn_activation(&name, alpha, beta)
                    .ok_or_else(|| ctx.unsupported(format!("{op_type} activation '{name}'")))?;
                activations.push(f);
            }
            let layout = a.int("layout", 0);
            if layout != 0 && layout != 1 {
                return Err(ctx.invalid(format!("layout must be 0 or 1, got {layout}")));
            }
            AttnOp::Recurrent {
                gru,
                direction,
                hidden_size,
                activations,
                clip: a.float_opt("clip"),
                layout,
                linear_before_reset: gru && a.bool("linear_before_reset", false),
            }
        }
        "SwiGLU" => AttnOp::SwiGlu {
            alpha: a.float("alpha", 1.0),
        },
        "CausalConvWithState" => AttnOp::CausalConvWithState {
            silu: match a.string("activation", "none")?.as_str() {
                "none" => false,
                "silu" | "swish" => true,
                m => {
                    return Err(
                        ctx.invalid(format!("activation must be none, silu or swish, got '{m}'"))
                    )
                }
            },
        },
        "LinearAttention" => {
            let heads = |name: &str| -> Result<usize> {
                match a.int_opt(name) {
                    Some(v) if v > 0 => Ok(v as usize),
                    Some(v) => Err(ctx.invalid(format!("{name} must be positive, got {v}"))),
                    None => Err(ctx.invalid(format!("the {name} attribute is required"))),
                }
            };
            let (q_num_heads, kv_num_heads) = (heads("q_num_heads")?, heads("kv_num_heads")?);
            if !q_num_heads.is_multiple_of(kv_num_heads) {
                return Err(ctx.invalid(format!(
                    "q_num_heads {q_num_heads} must be a multiple of kv_num_heads {kv_num_heads}"
                )));
            }
            let (gated, delta) = match a.string("update_rule", "gated_delta")?.as_str() {
                "linear" => (false, false),
                "gated" => (true, false),
                "delta" => (false, true),
                "gated_delta" => (true, true),
                r => {
                    return Err(ctx.invalid(format!(
                        "update_rule must be linear, gated, delta or gated_delta, got '{r}'"
                    )))
                }
            };
            AttnOp::LinearAttention {
                q_num_heads,
                kv_num_heads,
                scale: a.float_opt("scale").filter(|&s| s != 0.0),
                gated,
                delta,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(Op::Attn(op)))
}

#[cfg(test)]
mod tests {
    use crate::proto::{
        attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto,
        OperatorSetIdProto,
    };
    use crate::test_util::{float_attr, int_attr, str_attr, value};
    use crate::{load_model_bytes, LoadOptions, Model, Result};
    use kiln_ir::{AttnOp, DType, Op, ReduceOp, RnnDirection};
    use prost::Message;

    fn load(opset: i64, op: &str, attrs: Vec<AttributeProto>) -> Result<Model> {
        let node = NodeProto {
            op_type: Some(op.into()),
            name: Some("n".into()),
            input: vec!["a".into(), "b".into(), "c".into()],
            output: vec!["y".into()],
            attribute: attrs,
            ..Default::default()
        };
        let bytes = ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![node],
                input: vec![value("a"), value("b"), value("c")],
                output: vec![value("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        load_model_bytes(&bytes, None, &LoadOptions::default())
    }

    fn op_of(m: &Model) -> &AttnOp {
        match &m.graph.nodes[0].op {
            Op::Attn(o) => o,
            other => panic!("not an attn op: {other:?}"),
        }
    }

    #[test]
    fn attention_attributes() {
        let m = load(
            23,
            "Attention",
            vec![
                int_attr("is_causal", 1),
                int_attr("q_num_heads", 4),
                int_attr("kv_num_heads", 2),
                float_attr("softcap", 2.5),
                int_attr("qk_matmul_output_mode", 3),
                int_attr("softmax_precision", 1),
            ],
        )
        .unwrap();
        assert_eq!(
            op_of(&m),
            &AttnOp::Attention {
                is_causal: true,
                q_num_heads: Some(4),
                kv_num_heads: Some(2),
                scale: None,
                softcap: 2.5,
                qk_matmul_output_mode: 3,
                softmax_precision: Some(DType::F32),
                left_window_size: -1,
                right_window_size: -1,
            }
        );
        assert!(load(23, "Attention", vec![int_attr("qk_matmul_output_mode", 7)]).is_err());
        assert!(load(25, "Attention", vec![int_attr("left_window_size", -2)]).is_err());
    }

    #[test]
    fn loss_recurrent_and_state_attributes() {
        let m = load(
            13,
            "SoftmaxCrossEntropyLoss",
            vec![str_attr("reduction", "sum"), int_attr("ignore_index", -1)],
        )
        .unwrap();
        assert_eq!(
            op_of(&m),
            &AttnOp::SoftmaxCrossEntropyLoss {
                reduction: Some(ReduceOp::Sum),
                ignore_index: Some(-1),
            }
        );
        assert!(load(
            13,
            "NegativeLogLikelihoodLoss",
            vec![str_attr("reduction", "max")]
        )
        .is_err());

        let acts = AttributeProto {
            name: Some("activations".into()),
            r#type: Some(AttributeType::Strings as i32),
            strings: vec![b"HardSigmoid".to_vec(), b"Tanh".to_vec()],
            ..Default::default()
        };
        let alphas = AttributeProto {
            name: Some("activation_alpha".into()),
            r#type: Some(AttributeType::Floats as i32),
            floats: vec![0.3],
            ..Default::default()
        };
        let m = load(
            14,
            "GRU",
            vec![
                acts,
                alphas,
                int_attr("hidden_size", 3),
                int_attr("linear_before_reset", 1),
                str_attr("direction", "reverse"),
            ],
        )
        .unwrap();
        let AttnOp::Recurrent {
            gru,
            direction,
            hidden_size,
            activations,
            linear_before_reset,
            ..
        } = op_of(&m)
        else {
            panic!("not recurrent");
        };
        assert!(*gru && *linear_before_reset);
        assert_eq!(*direction, RnnDirection::Reverse);
        assert_eq!(*hidden_size, Some(3));
        // HardSigmoid with alpha 0.3 and the default beta 0.5: at 1 it is 0.8.
        assert!((activations[0].eval(1.0) - 0.8).abs() < 1e-6);
        assert_eq!(activations.len(), 2);
        assert_eq!(m.graph.nodes[0].op.name(), "GRU");
        assert!(load(14, "RNN", vec![int_attr("hidden_size", 0)]).is_err());

        assert!(load(27, "LinearAttention", vec![]).is_err());
        assert!(load(
            27,
            "CausalConvWithState",
            vec![str_attr("activation", "gelu")]
        )
        .is_err());
    }
}
