//! Graph-building helpers shared by the runtime's integration tests.

use kiln_ir::*;
use kiln_onnx::Model;
use kiln_runtime::{Error, Session};

/// A tensor graph input/output with a known rank.
pub fn vi(name: &str, dtype: DType, shape: Vec<Dim>) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        ty: ValueType::new(dtype, Some(shape)),
    }
}

/// A node; an empty name in `inputs`/`outputs` is an omitted optional value.
pub fn node(name: &str, op: Op, inputs: &[&str], outputs: &[&str]) -> Node {
    let opt = |s: &&str| {
        if s.is_empty() {
            None
        } else {
            Some(s.to_string())
        }
    };
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(opt).collect(),
        outputs: outputs.iter().map(opt).collect(),
    }
}

/// `graph` as if loaded from an opset-17 model.
pub fn model(graph: Graph) -> Model {
    Model {
        graph,
        ir_version: 8,
        opset: 17,
        opset_imports: vec![(String::new(), 17)],
        producer: "test".into(),
    }
}

/// A session over `graph` as if loaded from an opset-17 model.
pub fn session(graph: Graph) -> Result<Session, Error> {
    Session::from_model(model(graph))
}
