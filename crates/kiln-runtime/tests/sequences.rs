//! Sequence and optional values through the Session API: the Sequence*/Optional*
//! ops, SequenceMap, Scan (both forms), If/Loop carrying sequences, input
//! checking of sequence and optional inputs.

use kiln_ir::*;
use kiln_runtime::Value;
use std::sync::Arc;

mod common;
use common::{node, session, vi};

fn seq_vi(name: &str, dtype: DType, shape: Option<Vec<Dim>>) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        ty: ValueType::sequence_of(ValueType::new(dtype, shape)),
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_tensor().unwrap().as_slice::<f32>().unwrap().to_vec()
}

fn seq_items(v: &Value) -> &[Tensor] {
    match v {
        Value::Sequence { tensors, .. } => tensors,
        other => panic!("expected a sequence, got {}", other.describe()),
    }
}

fn init(g: &mut Graph, name: &str, t: Tensor) {
    g.initializers.insert(name.into(), Arc::new(t));
}

/// a=[1,2], b=[3,4] -> s=[a,b]; insert c=[5,6] at 0 -> [c,a,b]; at(-1)=b; len=3;
/// erase(default: last) -> [c,a]; concat axis 0 -> [5,6,1,2]; stack axis -1 -> [[5,1],[6,2]].
#[test]
fn sequence_ops_build_read_and_concatenate() {
    let mut g = Graph {
        inputs: vec![vi("a", DType::F32, vec![Dim::Known(2)])],
        outputs: vec![
            seq_vi("s3", DType::F32, None),
            vi("last", DType::F32, vec![Dim::Known(2)]),
            vi("len", DType::I64, vec![]),
            vi("cat", DType::F32, vec![Dim::Unknown]),
            vi("stacked", DType::F32, vec![Dim::Known(2), Dim::Unknown]),
        ],
        nodes: vec![
            node(
                "make",
                Op::Seq(SeqOp::SequenceConstruct),
                &["a", "b"],
                &["s"],
            ),
            node(
                "ins",
                Op::Seq(SeqOp::SequenceInsert),
                &["s", "c", "zero"],
                &["s3"],
            ),
            node(
                "at",
                Op::Seq(SeqOp::SequenceAt),
                &["s3", "minus1"],
                &["last"],
            ),
            node("len", Op::Seq(SeqOp::SequenceLength), &["s3"], &["len"]),
            node("erase", Op::Seq(SeqOp::SequenceErase), &["s3"], &["s2"]),
            node(
                "cat",
                Op::Seq(SeqOp::ConcatFromSequence {
                    axis: 0,
                    new_axis: false,
                }),
                &["s2"],
                &["cat"],
            ),
            node(
                "stack",
                Op::Seq(SeqOp::ConcatFromSequence {
                    axis: -1,
                    new_axis: true,
                }),
                &["s2"],
                &["stacked"],
            ),
        ],
        ..Default::default()
    };
    init(&mut g, "b", Tensor::vector(vec![3.0f32, 4.0]));
    init(&mut g, "c", Tensor::vector(vec![5.0f32, 6.0]));
    init(&mut g, "zero", Tensor::scalar(0i64));
    init(&mut g, "minus1", Tensor::scalar(-1i32));
    let s = session(g).unwrap();
    assert_eq!(s.outputs()[0].type_string(), "seq(f32 [2])");
    let out = s
        .run_values(vec![("a".into(), Tensor::vector(vec![1.0f32, 2.0]).into())])
        .unwrap();
    let items = seq_items(&out[0].1);
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_slice::<f32>().unwrap(), &[5.0, 6.0]);
    assert_eq!(items[2].as_slice::<f32>().unwrap(), &[3.0, 4.0]);
    assert_eq!(f32s(&out[1].1), vec![3.0, 4.0]);
    assert_eq!(
        out[2].1.as_tensor().unwrap().as_slice::<i64>().unwrap(),
        &[3]
    );
    assert_eq!(f32s(&out[3].1), vec![5.0, 6.0, 1.0, 2.0]);
    assert_eq!(out[4].1.as_tensor().unwrap().shape(), &[2, 2]);
    assert_eq!(f32s(&out[4].1), vec![5.0, 1.0, 6.0, 2.0]);

    // Session::run refuses the sequence output and says what to use.
    let e = s
        .run(vec![("a".into(), Tensor::vector(vec![1.0f32, 2.0]))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("s3") && e.contains("run_values"), "{e}");
}

#[test]
fn sequence_op_failures_name_the_node() {
    let run_one = |op: SeqOp, extra: Tensor| {
        let y = if op == SeqOp::SequenceErase {
            seq_vi("y", DType::F32, None)
        } else {
            vi("y", DType::F32, vec![Dim::Known(1)])
        };
        let mut g = Graph {
            inputs: vec![vi("a", DType::F32, vec![Dim::Known(1)])],
            outputs: vec![y],
            nodes: vec![
                node("make", Op::Seq(SeqOp::SequenceConstruct), &["a"], &["s"]),
                node("bad", Op::Seq(op), &["s", "p"], &["y"]),
            ],
            ..Default::default()
        };
        init(&mut g, "p", extra);
        // Inference may already refuse a dtype clash; both must name the node.
        match session(g) {
            Err(e) => e.to_string(),
            Ok(s) => s
                .run_values(vec![("a".into(), Tensor::vector(vec![1.0f32]).into())])
                .unwrap_err()
                .to_string(),
        }
    };
    let e = run_one(SeqOp::SequenceAt, Tensor::scalar(1i64));
    assert!(e.contains("'bad'") && e.contains("out of range"), "{e}");
    let e = run_one(SeqOp::SequenceAt, Tensor::scalar(1.0f32));
    assert!(e.contains("'bad'") && e.contains("int"), "{e}");
    let e = run_one(SeqOp::SequenceInsert, Tensor::vector(vec![1i64]));
    assert!(e.contains("'bad'") && e.contains("i64"), "{e}");
    let e = run_one(SeqOp::SequenceErase, Tensor::scalar(-2i64));
    assert!(e.contains("'bad'") && e.contains("-2"), "{e}");
}

#[test]
fn split_to_sequence_and_back() {
    let mut g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(2), Dim::Known(5)])],
        outputs: vec![
            seq_vi("parts", DType::F32, None),
            vi("back", DType::F32, vec![Dim::Known(2), Dim::Known(5)]),
            seq_vi("cols", DType::F32, None),
        ],
        nodes: vec![
            node(
                "split",
                Op::Seq(SeqOp::SplitToSequence {
                    axis: 1,
                    keepdims: true,
                }),
                &["x", "two"],
                &["parts"],
            ),
            node(
                "join",
                Op::Seq(SeqOp::ConcatFromSequence {
                    axis: -1,
                    new_axis: false,
                }),
                &["parts"],
                &["back"],
            ),
            node(
                "cols",
                Op::Seq(SeqOp::SplitToSequence {
                    axis: -1,
                    keepdims: false,
                }),
                &["x"],
                &["cols"],
            ),
        ],
        ..Default::default()
    };
    init(&mut g, "two", Tensor::scalar(2i64));
    let s = session(g).unwrap();
    let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
    let out = s
        .run_values(vec![(
            "x".into(),
            Tensor::from_vec(vec![2, 5], x.clone()).unwrap().into(),
        )])
        .unwrap();
    let parts = seq_items(&out[0].1);
    let shapes: Vec<&[usize]> = parts.iter().map(|t| t.shape()).collect();
    assert_eq!(shapes, vec![&[2, 2][..], &[2, 2], &[2, 1]]);
    assert_eq!(parts[2].as_slice::<f32>().unwrap(), &[4.0, 9.0]);
    assert_eq!(f32s(&out[1].1), x);
    let cols = seq_items(&out[2].1);
    assert_eq!(cols.len(), 5);
    assert_eq!(cols[1].shape(), &[2]);
    assert_eq!(cols[1].as_slice::<f32>().unwrap(), &[1.0, 6.0]);
}

#[test]
fn optionals_hold_or_lack_a_value() {
    let opt_ty = ValueType::optional_of(ValueType::new(DType::F32, Some(vec![Dim::Known(2)])));
    let g = Graph {
        inputs: vec![ValueInfo {
            name: "o".into(),
            ty: opt_ty.clone(),
        }],
        outputs: vec![
            vi("has", DType::Bool, vec![]),
            vi("none_has", DType::Bool, vec![]),
            ValueInfo {
                name: "wrapped".into(),
                ty: opt_ty,
            },
            vi("got", DType::F32, vec![Dim::Known(2)]),
        ],
        nodes: vec![
            node("has", Op::Seq(SeqOp::OptionalHasElement), &["o"], &["has"]),
            node("nh", Op::Seq(SeqOp::OptionalHasElement), &[], &["none_has"]),
            node("get", Op::Seq(SeqOp::OptionalGetElement), &["o"], &["got"]),
            node("wrap", Op::Seq(SeqOp::Optional), &["got"], &["wrapped"]),
        ],
        ..Default::default()
    };
    let s = session(g).unwrap();
    assert_eq!(s.inputs()[0].type_string(), "optional(f32 [2])");
    let present = Value::Optional(Some(Box::new(Tensor::vector(vec![1.0f32, 2.0]).into())));
    let out = s.run_values(vec![("o".into(), present.clone())]).unwrap();
    let b = |v: &Value| v.as_tensor().unwrap().as_slice::<bool>().unwrap()[0];
    assert!(b(&out[0].1));
    assert!(!b(&out[1].1));
    assert_eq!(out[2].1, present);
    assert_eq!(f32s(&out[3].1), vec![1.0, 2.0]);
    // A plain tensor for an optional input counts as present (through run()
    // too), but run() refuses the optional output.
    let out = s
        .run(vec![("o".into(), Tensor::vector(vec![3.0f32, 4.0]))])
        .unwrap_err()
        .to_string();
    assert!(
        out.contains("wrapped") && out.contains("run_values"),
        "{out}"
    );
    // An empty optional: GetElement fails, naming the node.
    let e = s
        .run_values(vec![("o".into(), Value::Optional(None))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'get'") && e.contains("empty"), "{e}");
}

#[test]
fn sequence_inputs_are_checked_by_name() {
    let g = Graph {
        inputs: vec![seq_vi("s", DType::F32, Some(vec![Dim::named("N")]))],
        outputs: vec![vi("n", DType::I64, vec![])],
        nodes: vec![node("len", Op::Seq(SeqOp::SequenceLength), &["s"], &["n"])],
        ..Default::default()
    };
    let s = session(g).unwrap();
    // Elements may differ in a symbolic dim.
    let ok = Value::sequence(
        DType::F32,
        vec![
            Tensor::vector(vec![1.0f32]),
            Tensor::vector(vec![1.0f32, 2.0]),
        ],
    )
    .unwrap();
    let out = s.run_values(vec![("s".into(), ok)]).unwrap();
    assert_eq!(
        out[0].1.as_tensor().unwrap().as_slice::<i64>().unwrap(),
        &[2]
    );
    let empty = Value::sequence(DType::F32, vec![]).unwrap();
    let out = s.run_values(vec![("s".into(), empty)]).unwrap();
    assert_eq!(
        out[0].1.as_tensor().unwrap().as_slice::<i64>().unwrap(),
        &[0]
    );

    let msg = |v: Value| s.run_values(vec![("s".into(), v)]).unwrap_err().to_string();
    let e = msg(Tensor::vector(vec![1.0f32]).into());
    assert!(e.contains("'s'") && e.contains("seq(f32 [N])"), "{e}");
    let e = msg(Value::sequence(DType::I64, vec![Tensor::vector(vec![1i64])]).unwrap());
    assert!(
        e.contains("'s'") && e.contains("i64") && e.contains("f32"),
        "{e}"
    );
    let e = msg(Value::sequence(DType::F32, vec![Tensor::scalar(1.0f32)]).unwrap());
    assert!(e.contains("'s[0]'") && e.contains("[N]"), "{e}");
    let e = msg(Value::Optional(None));
    assert!(e.contains("'s'") && e.contains("empty optional"), "{e}");
}

/// Scan-9+: state s += x[t] over x read in reverse; y (output axis 1) stacks the
/// states, z (reverse output direction) the elements read.
#[test]
fn scan_with_axes_and_directions() {
    let body = Graph {
        inputs: vec![
            vi("s_in", DType::F32, vec![Dim::Known(2)]),
            vi("x_in", DType::F32, vec![Dim::Known(2)]),
        ],
        outputs: vec![
            vi("s_out", DType::F32, vec![Dim::Known(2)]),
            vi("y", DType::F32, vec![Dim::Known(2)]),
            vi("z", DType::F32, vec![Dim::Known(2)]),
        ],
        nodes: vec![
            node(
                "add",
                Op::Binary(BinaryOp::Add),
                &["s_in", "x_in"],
                &["s_out"],
            ),
            node("copy", Op::Identity, &["s_out"], &["y"]),
            node("elem", Op::Identity, &["x_in"], &["z"]),
        ],
        ..Default::default()
    };
    let scan = ScanAttrs {
        body: Box::new(body),
        num_scan_inputs: 1,
        batched: false,
        input_axes: vec![0],
        input_reverse: vec![true],
        output_axes: vec![1, 0],
        output_reverse: vec![false, true],
    };
    let mut g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(3), Dim::Known(2)])],
        outputs: vec![
            vi("final", DType::F32, vec![Dim::Known(2)]),
            vi("ys", DType::F32, vec![Dim::Known(2), Dim::Known(3)]),
            vi("zs", DType::F32, vec![Dim::Known(3), Dim::Known(2)]),
        ],
        nodes: vec![node(
            "scan",
            Op::Seq(SeqOp::Scan(scan)),
            &["init", "x"],
            &["final", "ys", "zs"],
        )],
        ..Default::default()
    };
    init(&mut g, "init", Tensor::vector(vec![0.0f32, 0.0]));
    let s = session(g).unwrap();
    let x = Tensor::from_vec(vec![3, 2], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let out = s.run(vec![("x".into(), x.clone())]).unwrap();
    assert_eq!(out[0].1.as_slice::<f32>().unwrap(), &[9.0, 12.0]);
    assert_eq!(out[1].1.shape(), &[2, 3]);
    assert_eq!(
        out[1].1.as_slice::<f32>().unwrap(),
        &[5.0, 8.0, 9.0, 6.0, 10.0, 12.0]
    );
    assert_eq!(out[2].1, x);
}

/// Scan-8: batch-major inputs, per-row sequence_lens; rows shorter than the
/// sequence axis keep their state and get zero scan outputs past their length.
#[test]
fn scan_opset8_batches_with_sequence_lens() {
    let body = Graph {
        inputs: vec![
            vi("s_in", DType::F32, vec![Dim::Known(1)]),
            vi("x_in", DType::F32, vec![Dim::Known(1)]),
        ],
        outputs: vec![
            vi("s_out", DType::F32, vec![Dim::Known(1)]),
            vi("y", DType::F32, vec![Dim::Known(1)]),
        ],
        nodes: vec![
            node(
                "add",
                Op::Binary(BinaryOp::Add),
                &["s_in", "x_in"],
                &["s_out"],
            ),
            node("copy", Op::Identity, &["s_out"], &["y"]),
        ],
        ..Default::default()
    };
    let scan = ScanAttrs {
        body: Box::new(body),
        num_scan_inputs: 1,
        batched: true,
        input_axes: vec![],
        input_reverse: vec![],
        output_axes: vec![],
        output_reverse: vec![],
    };
    let mut g = Graph {
        inputs: vec![vi(
            "x",
            DType::F32,
            vec![Dim::Known(2), Dim::Known(3), Dim::Known(1)],
        )],
        outputs: vec![
            vi("final", DType::F32, vec![Dim::Known(2), Dim::Known(1)]),
            vi(
                "ys",
                DType::F32,
                vec![Dim::Known(2), Dim::Known(3), Dim::Known(1)],
            ),
        ],
        nodes: vec![node(
            "scan",
            Op::Seq(SeqOp::Scan(scan)),
            &["lens", "init", "x"],
            &["final", "ys"],
        )],
        ..Default::default()
    };
    init(&mut g, "lens", Tensor::vector(vec![2i32, 3]));
    init(
        &mut g,
        "init",
        Tensor::from_vec(vec![2, 1], vec![0.0f32, 0.0]).unwrap(),
    );
    let s = session(g).unwrap();
    let x = Tensor::from_vec(vec![2, 3, 1], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let out = s.run(vec![("x".into(), x.clone())]).unwrap();
    assert_eq!(out[0].1.shape(), &[2, 1]);
    assert_eq!(out[0].1.as_slice::<f32>().unwrap(), &[3.0, 15.0]);
    assert_eq!(out[1].1.shape(), &[2, 3, 1]);
    assert_eq!(
        out[1].1.as_slice::<f32>().unwrap(),
        &[1.0, 3.0, 0.0, 4.0, 9.0, 15.0]
    );
    // A sequence length past the sequence axis is an error naming the node.
    let mut g2 = s.graph().clone();
    init(&mut g2, "lens", Tensor::vector(vec![4i32, 1]));
    let e = session(g2)
        .unwrap()
        .run(vec![("x".into(), x)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'scan'") && e.contains('4'), "{e}");
}

/// SequenceMap over a sequence (elements of different lengths) and a tensor.
#[test]
fn sequence_map_runs_the_body_per_element() {
    let body = Graph {
        inputs: vec![
            vi("e", DType::F32, vec![Dim::named("N")]),
            vi("k", DType::F32, vec![]),
        ],
        outputs: vec![
            vi("sum", DType::F32, vec![Dim::named("N")]),
            vi("shape", DType::I64, vec![Dim::Known(1)]),
        ],
        nodes: vec![
            node("add", Op::Binary(BinaryOp::Add), &["e", "k"], &["sum"]),
            node(
                "shape",
                Op::Shape {
                    start: 0,
                    end: None,
                },
                &["e"],
                &["shape"],
            ),
        ],
        ..Default::default()
    };
    let mut g = Graph {
        inputs: vec![seq_vi("xs", DType::F32, Some(vec![Dim::named("N")]))],
        outputs: vec![
            seq_vi("sums", DType::F32, Some(vec![Dim::named("N")])),
            seq_vi("shapes", DType::I64, Some(vec![Dim::Known(1)])),
        ],
        nodes: vec![node(
            "map",
            Op::Seq(SeqOp::SequenceMap {
                body: Box::new(body),
            }),
            &["xs", "ten"],
            &["sums", "shapes"],
        )],
        ..Default::default()
    };
    init(&mut g, "ten", Tensor::scalar(10.0f32));
    let s = session(g).unwrap();
    let xs = Value::sequence(
        DType::F32,
        vec![
            Tensor::vector(vec![1.0f32, 2.0]),
            Tensor::vector(vec![3.0f32]),
        ],
    )
    .unwrap();
    let out = s.run_values(vec![("xs".into(), xs)]).unwrap();
    let sums = seq_items(&out[0].1);
    assert_eq!(sums[0].as_slice::<f32>().unwrap(), &[11.0, 12.0]);
    assert_eq!(sums[1].as_slice::<f32>().unwrap(), &[13.0]);
    let shapes = seq_items(&out[1].1);
    assert_eq!(shapes[1].as_slice::<i64>().unwrap(), &[1]);
    // An empty input sequence gives empty outputs of the body's declared dtypes.
    let out = s
        .run_values(vec![(
            "xs".into(),
            Value::sequence(DType::F32, vec![]).unwrap(),
        )])
        .unwrap();
    assert_eq!(out[1].1, Value::sequence(DType::I64, vec![]).unwrap());
}

/// A Loop carrying a sequence (insert the iteration number each time), an If
/// whose branches return sequences, and Identity on a sequence.
#[test]
fn loop_and_if_carry_sequences() {
    let body = Graph {
        inputs: vec![
            vi("i", DType::I64, vec![]),
            vi("c_in", DType::Bool, vec![]),
            seq_vi("s_in", DType::I64, None),
        ],
        outputs: vec![
            vi("c_out", DType::Bool, vec![]),
            seq_vi("s_out", DType::I64, None),
        ],
        nodes: vec![
            node("keep", Op::Identity, &["c_in"], &["c_out"]),
            node(
                "ins",
                Op::Seq(SeqOp::SequenceInsert),
                &["s_in", "i"],
                &["s_out"],
            ),
        ],
        ..Default::default()
    };
    let then_g = Graph {
        outputs: vec![seq_vi("t", DType::I64, None)],
        nodes: vec![node("same", Op::Identity, &["looped"], &["t"])],
        ..Default::default()
    };
    let else_g = Graph {
        outputs: vec![seq_vi("e", DType::I64, None)],
        nodes: vec![node(
            "none",
            Op::Seq(SeqOp::SequenceEmpty { dtype: DType::I64 }),
            &[],
            &["e"],
        )],
        ..Default::default()
    };
    let mut g = Graph {
        inputs: vec![vi("flag", DType::Bool, vec![])],
        outputs: vec![seq_vi("y", DType::I64, None)],
        nodes: vec![
            node(
                "empty",
                Op::Seq(SeqOp::SequenceEmpty { dtype: DType::I64 }),
                &[],
                &["s0"],
            ),
            node(
                "loop",
                Op::Loop {
                    body: Box::new(body),
                },
                &["m", "", "s0"],
                &["looped"],
            ),
            node(
                "if",
                Op::If {
                    then_branch: Box::new(then_g),
                    else_branch: Box::new(else_g),
                },
                &["flag"],
                &["y"],
            ),
        ],
        ..Default::default()
    };
    init(&mut g, "m", Tensor::scalar(3i64));
    let s = session(g).unwrap();
    let out = s
        .run_values(vec![("flag".into(), Tensor::scalar(true).into())])
        .unwrap();
    let items = seq_items(&out[0].1);
    let got: Vec<i64> = items
        .iter()
        .map(|t| t.as_slice::<i64>().unwrap()[0])
        .collect();
    assert_eq!(got, vec![0, 1, 2]);
    assert!(items.iter().all(|t| t.rank() == 0));
    let out = s
        .run_values(vec![("flag".into(), Tensor::scalar(false).into())])
        .unwrap();
    assert_eq!(out[0].1, Value::sequence(DType::I64, vec![]).unwrap());
}
