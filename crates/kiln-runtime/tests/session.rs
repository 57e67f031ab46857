//! Session API behaviour on small hand-built graphs: input checking, threads,
//! control flow with outer-scope reads, overridable defaults.

use kiln_ir::*;
use kiln_runtime::Error;
use std::sync::Arc;

mod common;
use common::{node, session, vi};

/// y = relu(x + b), x: [N, 3] f32, b: initializer that is also an input (a default).
fn add_relu() -> Graph {
    let mut g = Graph {
        inputs: vec![
            vi("x", DType::F32, vec![Dim::named("N"), Dim::Known(3)]),
            vi("b", DType::F32, vec![Dim::Known(3)]),
        ],
        outputs: vec![vi("y", DType::F32, vec![Dim::named("N"), Dim::Known(3)])],
        nodes: vec![
            node("add", Op::Binary(BinaryOp::Add), &["x", "b"], &["s"]),
            node("relu", Op::Unary(UnaryOp::Relu), &["s"], &["y"]),
        ],
        ..Default::default()
    };
    g.initializers.insert(
        "b".into(),
        Arc::new(Tensor::vector(vec![1.0f32, -10.0, 0.5])),
    );
    g
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_slice::<f32>().unwrap().to_vec()
}

#[test]
fn runs_and_overrides_defaults() {
    let s = session(add_relu()).unwrap();
    assert_eq!(s.inputs().len(), 2);
    assert!(s.inputs()[1].has_default);
    let x = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, -4.0, 5.0, -6.0]).unwrap();
    let out = s.run(vec![("x".into(), x.clone())]).unwrap();
    assert_eq!(out[0].0, "y");
    assert_eq!(out[0].1.shape(), &[2, 3]);
    assert_eq!(f32s(&out[0].1), vec![2.0, 0.0, 3.5, 0.0, 0.0, 0.0]);
    let out = s
        .run(vec![
            ("x".into(), x),
            ("b".into(), Tensor::vector(vec![0.0f32; 3])),
        ])
        .unwrap();
    assert_eq!(f32s(&out[0].1), vec![1.0, 2.0, 3.0, 0.0, 5.0, 0.0]);
}

#[test]
fn input_errors_name_the_input_and_the_expectation() {
    let s = session(add_relu()).unwrap();
    let msg = |r: Result<Vec<(String, Tensor)>, Error>| r.unwrap_err().to_string();
    let e = msg(s.run(vec![("z".into(), Tensor::scalar(1.0f32))]));
    assert!(e.contains("'z'") && e.contains("x, b"), "{e}");
    let e = msg(s.run(vec![(
        "x".into(),
        Tensor::from_vec(vec![1, 3], vec![1i64, 2, 3]).unwrap(),
    )]));
    assert!(
        e.contains("'x'") && e.contains("f32") && e.contains("i64"),
        "{e}"
    );
    let e = msg(s.run(vec![(
        "x".into(),
        Tensor::from_vec(vec![3, 1], vec![1.0f32; 3]).unwrap(),
    )]));
    assert!(e.contains("'x'") && e.contains("[N, 3]"), "{e}");
    let e = msg(s.run(vec![]));
    assert!(e.contains("missing input 'x'"), "{e}");
}

#[test]
fn fixed_dims_compile_for_their_sizes_and_bind_every_run() {
    // y = relu(x + b), and r = x reshaped to its own shape: with N fixed
    // at 2, the Shape is folded into a constant at load.
    let mut g = add_relu();
    g.outputs
        .push(vi("r", DType::F32, vec![Dim::named("N"), Dim::Known(3)]));
    g.nodes.push(node(
        "shape",
        Op::Shape {
            start: 0,
            end: None,
        },
        &["x"],
        &["xs"],
    ));
    g.nodes.push(node(
        "reshape",
        Op::Reshape { allowzero: false },
        &["x", "xs"],
        &["r"],
    ));
    let options = kiln_runtime::SessionOptions {
        fixed_dims: vec![("N".into(), 2), ("unused".into(), 7)],
        ..Default::default()
    };
    let s = kiln_runtime::Session::from_model_with(common::model(g.clone()), &options).unwrap();
    assert_eq!(s.inputs()[0].shape_string(), "[2, 3]");
    assert_eq!(s.outputs()[0].shape_string(), "[2, 3]");
    assert!(
        !s.graph()
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::Shape { .. })),
        "the Shape of a fixed-size input is a constant"
    );
    let x = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, -4.0, 5.0, -6.0]).unwrap();
    let out = s.run(vec![("x".into(), x)]).unwrap();
    assert_eq!(f32s(&out[0].1), vec![2.0, 0.0, 3.5, 0.0, 0.0, 0.0]);
    assert_eq!(out[1].1.shape(), &[2, 3]);
    // Another batch is refused, naming the input and the fixed shape.
    let e = s
        .run(vec![(
            "x".into(),
            Tensor::from_vec(vec![4, 3], vec![0.0f32; 12]).unwrap(),
        )])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'x'") && e.contains("[2, 3]") && e.contains("fixed at load: N=2"),
        "{e}"
    );
    assert_eq!(s.fixed_dims(), [("N".to_string(), 2)]);
    // A name given twice is refused.
    let twice = kiln_runtime::SessionOptions {
        fixed_dims: vec![("N".into(), 2), ("N".into(), 3)],
        ..Default::default()
    };
    let e = kiln_runtime::Session::from_model_with(common::model(g.clone()), &twice)
        .err()
        .expect("N fixed twice")
        .to_string();
    assert!(e.contains("'N'") && e.contains("twice"), "{e}");
    // Without fixed dims the same graph keeps N symbolic and runs any batch.
    let s = session(g).unwrap();
    assert_eq!(s.inputs()[0].shape_string(), "[N, 3]");
    let out = s
        .run(vec![(
            "x".into(),
            Tensor::from_vec(vec![4, 3], vec![0.0f32; 12]).unwrap(),
        )])
        .unwrap();
    assert_eq!(out[1].1.shape(), &[4, 3]);
    assert!(s
        .graph()
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::Shape { .. })));
}

#[test]
fn fixed_dims_bind_every_input_but_those_with_defaults() {
    // a, b: [N]; c: [N] with a default of 3 values. With N fixed at 2, a
    // and b take [2]; c keeps [N], so leaving it out feeds its default.
    let mut g = Graph {
        inputs: vec![
            vi("a", DType::F32, vec![Dim::named("N")]),
            vi("b", DType::F32, vec![Dim::named("N")]),
            vi("c", DType::F32, vec![Dim::named("N")]),
        ],
        outputs: vec![
            vi("y", DType::F32, vec![Dim::named("N")]),
            vi("z", DType::F32, vec![Dim::named("N")]),
        ],
        nodes: vec![
            node("add", Op::Binary(BinaryOp::Add), &["a", "b"], &["y"]),
            node("neg", Op::Unary(UnaryOp::Neg), &["c"], &["z"]),
        ],
        ..Default::default()
    };
    g.initializers
        .insert("c".into(), Arc::new(Tensor::vector(vec![1.0f32, 2.0, 3.0])));
    let options = kiln_runtime::SessionOptions {
        fixed_dims: vec![("N".into(), 2)],
        ..Default::default()
    };
    let s = kiln_runtime::Session::from_model_with(common::model(g), &options).unwrap();
    let shapes: Vec<String> = s.inputs().iter().map(|i| i.shape_string()).collect();
    assert_eq!(shapes, ["[2]", "[2]", "[N]"]);
    let out = s
        .run(vec![
            ("a".into(), Tensor::vector(vec![1.0f32, 2.0])),
            ("b".into(), Tensor::vector(vec![10.0f32, 20.0])),
        ])
        .unwrap();
    assert_eq!(f32s(&out[0].1), vec![11.0, 22.0]);
    assert_eq!(f32s(&out[1].1), vec![-1.0, -2.0, -3.0]);
}

#[test]
fn symbolic_dims_must_agree_across_inputs() {
    let g = Graph {
        inputs: vec![
            vi("a", DType::F32, vec![Dim::named("N")]),
            vi("b", DType::F32, vec![Dim::named("N")]),
        ],
        outputs: vec![vi("y", DType::F32, vec![Dim::named("N")])],
        nodes: vec![node("add", Op::Binary(BinaryOp::Add), &["a", "b"], &["y"])],
        ..Default::default()
    };
    let s = session(g).unwrap();
    let e = s
        .run(vec![
            ("a".into(), Tensor::vector(vec![1.0f32, 2.0])),
            ("b".into(), Tensor::vector(vec![1.0f32; 3])),
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains("N=3") && e.contains("N=2"), "{e}");
}

#[test]
fn one_session_many_threads() {
    let s = Arc::new(session(add_relu()).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let v = i as f32;
                    let x = Tensor::from_vec(vec![1, 3], vec![v, v, v]).unwrap();
                    let out = s.run(vec![("x".into(), x)]).unwrap();
                    assert_eq!(f32s(&out[0].1), vec![v + 1.0, 0.0, v + 0.5]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn if_branches_read_outer_scope_values() {
    // cond = sum(x) > 0; then: x * w (w outer initializer); else: neg(x2) (x2 outer node output).
    let then_g = Graph {
        outputs: vec![vi("t_out", DType::F32, vec![Dim::Known(2)])],
        nodes: vec![node(
            "mul",
            Op::Binary(BinaryOp::Mul),
            &["x", "w"],
            &["t_out"],
        )],
        ..Default::default()
    };
    let else_g = Graph {
        outputs: vec![vi("e_out", DType::F32, vec![Dim::Known(2)])],
        nodes: vec![node("neg", Op::Unary(UnaryOp::Neg), &["x2"], &["e_out"])],
        ..Default::default()
    };
    let mut g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(2)])],
        outputs: vec![vi("y", DType::F32, vec![Dim::Known(2)])],
        nodes: vec![
            node("double", Op::Binary(BinaryOp::Add), &["x", "x"], &["x2"]),
            node(
                "sum",
                Op::Reduce {
                    op: ReduceOp::Sum,
                    keepdims: false,
                    noop_with_empty_axes: false,
                },
                &["x"],
                &["total"],
            ),
            node(
                "gt",
                Op::Binary(BinaryOp::Greater),
                &["total", "zero"],
                &["cond"],
            ),
            node(
                "if",
                Op::If {
                    then_branch: Box::new(then_g),
                    else_branch: Box::new(else_g),
                },
                &["cond"],
                &["y"],
            ),
        ],
        ..Default::default()
    };
    g.initializers
        .insert("w".into(), Arc::new(Tensor::vector(vec![10.0f32, 100.0])));
    g.initializers
        .insert("zero".into(), Arc::new(Tensor::scalar(0.0f32)));
    let s = session(g).unwrap();
    let out = s
        .run(vec![("x".into(), Tensor::vector(vec![1.0f32, 2.0]))])
        .unwrap();
    assert_eq!(f32s(&out[0].1), vec![10.0, 200.0]);
    let out = s
        .run(vec![("x".into(), Tensor::vector(vec![-1.0f32, -2.0]))])
        .unwrap();
    assert_eq!(f32s(&out[0].1), vec![2.0, 4.0]);
}

#[test]
fn loop_carries_values_and_stacks_scan_outputs() {
    // for i in 0..M: acc = acc + x ; scan out acc
    let body = Graph {
        inputs: vec![
            vi("i", DType::I64, vec![]),
            vi("c_in", DType::Bool, vec![]),
            vi("acc_in", DType::F32, vec![Dim::Known(2)]),
        ],
        outputs: vec![
            vi("c_out", DType::Bool, vec![]),
            vi("acc_out", DType::F32, vec![Dim::Known(2)]),
            vi("scan", DType::F32, vec![Dim::Known(2)]),
        ],
        nodes: vec![
            node("keep", Op::Identity, &["c_in"], &["c_out"]),
            node(
                "acc",
                Op::Binary(BinaryOp::Add),
                &["acc_in", "x"],
                &["acc_out"],
            ),
            node("copy", Op::Identity, &["acc_out"], &["scan"]),
        ],
        ..Default::default()
    };
    let mut g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(2)])],
        outputs: vec![
            vi("final", DType::F32, vec![Dim::Known(2)]),
            vi("all", DType::F32, vec![Dim::Unknown, Dim::Known(2)]),
        ],
        nodes: vec![node(
            "loop",
            Op::Loop {
                body: Box::new(body),
            },
            &["m", "", "init"],
            &["final", "all"],
        )],
        ..Default::default()
    };
    g.initializers
        .insert("m".into(), Arc::new(Tensor::scalar(3i64)));
    g.initializers
        .insert("init".into(), Arc::new(Tensor::vector(vec![0.0f32, 1.0])));
    let s = session(g).unwrap();
    let out = s
        .run(vec![("x".into(), Tensor::vector(vec![1.0f32, 2.0]))])
        .unwrap();
    assert_eq!(f32s(&out[0].1), vec![3.0, 7.0]);
    assert_eq!(out[1].1.shape(), &[3, 2]);
    assert_eq!(f32s(&out[1].1), vec![1.0, 3.0, 2.0, 5.0, 3.0, 7.0]);
}

#[test]
fn malformed_graphs_are_rejected_with_the_node_name() {
    let g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(2)])],
        outputs: vec![vi("y", DType::F32, vec![Dim::Known(2)])],
        nodes: vec![node("lonely", Op::Unary(UnaryOp::Relu), &["ghost"], &["y"])],
        ..Default::default()
    };
    let e = session(g).err().unwrap().to_string();
    assert!(e.contains("lonely") && e.contains("ghost"), "{e}");
}

#[test]
fn kernel_failures_name_the_node() {
    let mut g = Graph {
        inputs: vec![vi("idx", DType::I64, vec![Dim::Known(1)])],
        outputs: vec![vi("y", DType::F32, vec![Dim::Known(1)])],
        nodes: vec![node(
            "pick",
            Op::Gather { axis: 0 },
            &["data", "idx"],
            &["y"],
        )],
        ..Default::default()
    };
    g.initializers
        .insert("data".into(), Arc::new(Tensor::vector(vec![1.0f32, 2.0])));
    let s = session(g).unwrap();
    let e = s
        .run(vec![("idx".into(), Tensor::vector(vec![7i64]))])
        .unwrap_err();
    assert!(matches!(e, Error::Node { .. }));
    let e = e.to_string();
    assert!(
        e.contains("pick") && e.contains("Gather") && e.contains('7'),
        "{e}"
    );
}

/// A weight read only by a MatMul is held packed by the plan and freed from the
/// graph; one also read by a Gather (tied embeddings) stays. Values agree with
/// the unoptimized session either way.
#[test]
fn packed_weights_free_their_originals_unless_read_elsewhere() {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let graph = |tied: bool| {
        let mut nodes = vec![node("mm", Op::MatMul, &["x", "w"], &["y"])];
        let mut outputs = vec![vi("y", DType::F32, vec![Dim::Known(2), Dim::Known(4)])];
        if tied {
            nodes.push(node("emb", Op::Gather { axis: 0 }, &["w", "ids"], &["e"]));
            outputs.push(vi("e", DType::F32, vec![Dim::Known(1), Dim::Known(4)]));
        }
        let mut g = Graph {
            inputs: vec![vi("x", DType::F32, vec![Dim::Known(2), Dim::Known(3)])],
            outputs,
            nodes,
            ..Default::default()
        };
        g.initializers.insert(
            "w".into(),
            Arc::new(Tensor::from_vec(vec![3, 4], w.clone()).unwrap()),
        );
        g.initializers
            .insert("ids".into(), Arc::new(Tensor::vector(vec![2i64])));
        g
    };
    let x = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0]).unwrap();
    // y = x @ w, by hand.
    let want: Vec<f32> = (0..2)
        .flat_map(|i| {
            let x = &x;
            let w = &w;
            (0..4).map(move |j| {
                (0..3)
                    .map(|k| x.as_slice::<f32>().unwrap()[i * 3 + k] * w[k * 4 + j])
                    .sum()
            })
        })
        .collect();

    let s = session(graph(false)).unwrap();
    assert!(
        !s.graph().initializers.contains_key("w"),
        "w is held packed"
    );
    assert_eq!(
        s.graph().value_type("w").unwrap().shape,
        Some(known_shape(&[3, 4]))
    );
    // (The unused ids initializer is dropped by the optimizer.)
    assert_eq!(s.parameter_stats().0, 12, "w still counts as a parameter");
    let out = s.run(vec![("x".into(), x.clone())]).unwrap();
    assert_eq!(f32s(&out[0].1), want);
    let (_, profile) = s.run_profiled(vec![("x".into(), x.clone())]).unwrap();
    let mm = profile.iter().find(|t| t.node == "mm").unwrap();
    assert_eq!(
        mm.inputs[1],
        Some((DType::F32, vec![3, 4])),
        "profile sees w"
    );

    let s = session(graph(true)).unwrap();
    assert!(s.graph().initializers.contains_key("w"), "Gather reads w");
    let out = s.run(vec![("x".into(), x)]).unwrap();
    assert_eq!(f32s(&out[0].1), want);
    assert_eq!(f32s(&out[1].1), w[8..12].to_vec());
}

/// Tied embeddings: a Gather's table that is bit for bit the transpose of a
/// product's packed weights is read from those panels and freed, whether the
/// head packs a transposed copy (MatMul on its own initializer, as exporters
/// write GPT-2) or the table itself (Gemm with transB). A copy that differs
/// in one bit is not tied. Values match the plain kernels throughout.
#[test]
fn tied_embedding_tables_are_kept_once_in_the_heads_panels() {
    let (vocab, width) = (70usize, 3usize); // 70 columns: a partial panel
    let table: Vec<f32> = (0..vocab * width)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let transposed: Vec<f32> = (0..width * vocab)
        .map(|e| table[(e % vocab) * width + e / vocab])
        .collect();
    // head: "matmul" (MatMul on tableT), "gemm" (Gemm transB on table),
    // "near" (MatMul on a tableT with one bit flipped).
    let graph = |head: &str| {
        let ids_dims = vec![Dim::Known(2), Dim::Known(2)];
        let mut g = Graph {
            inputs: vec![vi("ids", DType::I64, ids_dims)],
            outputs: vec![
                vi(
                    "e",
                    DType::F32,
                    vec![Dim::Known(2), Dim::Known(2), Dim::Known(width)],
                ),
                vi("logits", DType::F32, vec![Dim::Known(2), Dim::Known(vocab)]),
            ],
            nodes: vec![
                node("wte", Op::Gather { axis: 0 }, &["table", "ids"], &["e"]),
                node("first", Op::Flatten { axis: 2 }, &["e"], &["rows4"]),
                node("rows", Op::Slice, &["rows4", "zero", "two", "zero"], &["h"]),
            ],
            ..Default::default()
        };
        let mut init = |name: &str, t: Tensor| {
            g.initializers.insert(name.into(), Arc::new(t));
        };
        init(
            "table",
            Tensor::from_vec(vec![vocab, width], table.clone()).unwrap(),
        );
        init("zero", Tensor::vector(vec![0i64]));
        init("two", Tensor::vector(vec![2i64]));
        if head == "gemm" {
            g.nodes.push(node(
                "lm_head",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 0.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["h", "table"],
                &["logits"],
            ));
        } else {
            let mut t = transposed.clone();
            if head == "near" {
                t[2 * vocab + 5] = f32::from_bits(t[2 * vocab + 5].to_bits() ^ 1);
            }
            init("tableT", Tensor::from_vec(vec![width, vocab], t).unwrap());
            g.nodes
                .push(node("lm_head", Op::MatMul, &["h", "tableT"], &["logits"]));
        }
        g
    };
    let ids = Tensor::from_vec(vec![2, 2], vec![0i64, 69, -1, 13]).unwrap();
    let rows = [0usize, 69, 69, 13];
    let want_e: Vec<f32> = rows
        .iter()
        .flat_map(|&r| table[r * width..(r + 1) * width].to_vec())
        .collect();
    for head in ["matmul", "gemm", "near"] {
        let s = session(graph(head)).unwrap();
        let kept = s.graph().initializers.contains_key("table");
        assert_eq!(kept, head == "near", "{head}: table kept = {kept}");
        assert!(!s.graph().initializers.contains_key("tableT"), "{head}");
        let out = s.run(vec![("ids".into(), ids.clone())]).unwrap();
        assert_eq!(out[0].1.shape(), &[2, 2, width], "{head}");
        assert_eq!(f32s(&out[0].1), want_e, "{head}");
        // logits = h @ table^T for the first two looked-up rows.
        let want_logits: Vec<f32> = rows[..2]
            .iter()
            .flat_map(|&r| {
                let table = &table;
                (0..vocab).map(move |v| {
                    (0..width)
                        .map(|k| table[r * width + k] * table[v * width + k])
                        .sum::<f32>()
                })
            })
            .collect();
        for (g, w) in f32s(&out[1].1).iter().zip(&want_logits) {
            assert!((g - w).abs() <= 1e-5, "{head}: {g} vs {w}");
        }
        // The lookup still checks its indices, and the profile still sees
        // the table's shape.
        let bad = Tensor::from_vec(vec![2, 2], vec![0i64, 70, 1, 1]).unwrap();
        let e = s.run(vec![("ids".into(), bad)]).unwrap_err().to_string();
        assert!(e.contains("wte") && e.contains("70"), "{head}: {e}");
        let (_, profile) = s.run_profiled(vec![("ids".into(), ids.clone())]).unwrap();
        let wte = profile.iter().find(|t| t.node == "wte").unwrap();
        assert_eq!(
            wte.inputs[0],
            Some((DType::F32, vec![vocab, width])),
            "{head}"
        );
    }
}

/// Reshape-like steps move their input's buffer when they are its last
/// reader and copy otherwise; either way every reader sees the right values
/// and shapes. Here `x` is reshaped (moved: the caller gave it up), `s` is
/// reshaped while `mul` still reads it (copied), `x` also feeds a graph
/// output through Identity, and a constant is flattened (shared: copied).
#[test]
fn relabelling_ops_move_or_copy_as_readers_require() {
    let shape = |v: Vec<i64>| Arc::new(Tensor::from_vec(vec![v.len()], v).unwrap());
    let mut g = Graph {
        inputs: vec![vi("x", DType::F32, vec![Dim::Known(2), Dim::Known(3)])],
        outputs: vec![
            vi("rows", DType::F32, vec![Dim::Known(3), Dim::Known(2)]),
            vi("prod", DType::F32, vec![Dim::Known(6)]),
            vi("flat_c", DType::F32, vec![Dim::Known(1), Dim::Known(6)]),
            vi("same", DType::F32, vec![Dim::Known(2), Dim::Known(3)]),
        ],
        nodes: vec![
            node("add", Op::Binary(BinaryOp::Add), &["x", "c"], &["s"]),
            node("id", Op::Identity, &["x"], &["same"]),
            node(
                "r1",
                Op::Reshape { allowzero: false },
                &["s", "to32"],
                &["rows"],
            ),
            node(
                "r2",
                Op::Reshape { allowzero: false },
                &["s", "to6"],
                &["s6"],
            ),
            node("sq", Op::Flatten { axis: 0 }, &["c"], &["flat_c"]),
            node("mul", Op::Binary(BinaryOp::Mul), &["s6", "s6"], &["prod"]),
        ],
        ..Default::default()
    };
    g.initializers.insert(
        "c".into(),
        Arc::new(Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap()),
    );
    g.initializers.insert("to32".into(), shape(vec![3, 2]));
    g.initializers.insert("to6".into(), shape(vec![-1]));
    let s = session(g).unwrap();
    for _ in 0..2 {
        let x = Tensor::from_vec(vec![2, 3], vec![0.5f32, 1.0, -1.0, 2.0, 0.0, -6.0]).unwrap();
        let out = s.run(vec![("x".into(), x)]).unwrap();
        let get = |name: &str| {
            let t = &out.iter().find(|(n, _)| n == name).unwrap().1;
            (t.shape().to_vec(), f32s(t))
        };
        let sum = vec![1.5f32, 3.0, 2.0, 6.0, 5.0, 0.0];
        assert_eq!(get("rows"), (vec![3, 2], sum.clone()));
        assert_eq!(
            get("prod"),
            (vec![6], sum.iter().map(|v| v * v).collect::<Vec<_>>())
        );
        assert_eq!(
            get("flat_c"),
            (vec![1, 6], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        assert_eq!(
            get("same"),
            (vec![2, 3], vec![0.5, 1.0, -1.0, 2.0, 0.0, -6.0])
        );
    }
    // Profiles still describe a moved input (taken before the step ran).
    let x = Tensor::from_vec(vec![2, 3], vec![0.0f32; 6]).unwrap();
    let (_, timings) = s.run_profiled(vec![("x".into(), x)]).unwrap();
    for t in timings
        .iter()
        .filter(|t| t.op == "Reshape" || t.op == "Identity")
    {
        assert_eq!(
            t.inputs[0],
            Some((DType::F32, vec![2, 3])),
            "profile of {}",
            t.node
        );
    }
    assert!(
        timings.iter().any(|t| t.op == "Identity"),
        "the Identity to a graph output stays a step: {timings:?}"
    );
}
