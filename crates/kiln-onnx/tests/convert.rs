//! Opset normalization and model-level decoding, on ModelProtos built in code.

use kiln_ir::{Op, ReduceOp, Tensor};
use kiln_onnx::proto::{
    attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use kiln_onnx::{load_model_bytes, LoadOptions, OnnxError};
use prost::Message;

fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_node")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn value(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    use kiln_onnx::proto::tensor_shape_proto::{dimension::Value, Dimension};
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn model(opset: i64, nodes: Vec<NodeProto>) -> Vec<u8> {
    ModelProto {
        ir_version: Some(7),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![value("x", 1, &[2, 1, 3])],
            output: vec![value("y", 1, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn load(opset: i64, nodes: Vec<NodeProto>) -> Result<kiln_onnx::Model, OnnxError> {
    load_model_bytes(&model(opset, nodes), None, &LoadOptions::default())
}

#[test]
fn squeeze_axes_attribute_becomes_a_constant_input() {
    let m = load(
        11,
        vec![node(
            "Squeeze",
            &["x"],
            &["y"],
            vec![ints_attr("axes", &[1])],
        )],
    )
    .unwrap();
    let n = &m.graph.nodes[0];
    assert_eq!(n.op, Op::Squeeze);
    let axes = n.input(1).unwrap();
    assert_eq!(m.graph.initializers[axes].as_slice::<i64>().unwrap(), &[1]);
    // The same model at opset 13 keeps the axes input as written.
    let m = load(13, vec![node("Squeeze", &["x"], &["y"], vec![])]).unwrap();
    assert_eq!(m.graph.nodes[0].inputs.len(), 1);
}

#[test]
fn reduce_axes_attribute_until_opset_18() {
    let m = load(
        17,
        vec![node(
            "ReduceMean",
            &["x"],
            &["y"],
            vec![ints_attr("axes", &[-1])],
        )],
    )
    .unwrap();
    let n = &m.graph.nodes[0];
    assert!(matches!(
        n.op,
        Op::Reduce {
            op: ReduceOp::Mean,
            keepdims: true,
            ..
        }
    ));
    assert_eq!(
        m.graph.initializers[n.input(1).unwrap()]
            .as_slice::<i64>()
            .unwrap(),
        &[-1]
    );
}

#[test]
fn clip_attributes_become_inputs_before_opset_11() {
    let m = load(
        9,
        vec![node(
            "Clip",
            &["x"],
            &["y"],
            vec![float_attr("min", 0.0), float_attr("max", 6.0)],
        )],
    )
    .unwrap();
    let n = &m.graph.nodes[0];
    assert_eq!(n.op, Op::Clip);
    assert_eq!(
        **m.graph.initializers.get(n.input(2).unwrap()).unwrap(),
        Tensor::scalar(6.0f32)
    );
}

#[test]
fn constant_nodes_become_initializers() {
    let c = NodeProto {
        op_type: Some("Constant".into()),
        output: vec!["c".into()],
        attribute: vec![ints_attr("value_ints", &[3, 4])],
        ..Default::default()
    };
    let m = load(13, vec![c, node("Add", &["x", "c"], &["y"], vec![])]).unwrap();
    assert_eq!(m.graph.nodes.len(), 1);
    assert_eq!(
        m.graph.initializers["c"].as_slice::<i64>().unwrap(),
        &[3, 4]
    );
}

#[test]
fn unknown_ops_and_domains_are_unsupported_with_node_names() {
    let e = load(13, vec![node("Frobnicate", &["x"], &["y"], vec![])]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported: Frobnicate (opset 13) at node Frobnicate_node"
    );
    let mut n = node("FusedConv", &["x"], &["y"], vec![]);
    n.domain = Some("com.microsoft".into());
    let e = load(13, vec![n]).unwrap_err();
    assert!(matches!(e, OnnxError::UnsupportedOp { .. }), "{e}");
}

#[test]
fn garbage_and_truncated_bytes_are_decode_errors() {
    let bytes = model(13, vec![node("Relu", &["x"], &["y"], vec![])]);
    assert!(load_model_bytes(&bytes[..bytes.len() / 2], None, &LoadOptions::default()).is_err());
    assert!(load_model_bytes(b"\xff\xff\xff\xff", None, &LoadOptions::default()).is_err());
    assert!(load_model_bytes(&[], None, &LoadOptions::default()).is_err());
}
