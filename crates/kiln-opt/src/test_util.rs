//! Test support: a small graph builder, a straight-line interpreter over
//! `kiln_cpu::run_op`, and `check_pass`, which runs a pass and asserts the
//! graph still validates, re-infers and computes the same outputs.

use crate::PassCtx;
use kiln_ir::{
    AutoPad, ConvAttrs, DType, Dim, FusedAct, FusedOp, Graph, Node, Op, Tensor, ValueInfo,
    ValueType,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A 2-D conv's attributes: a square `k` window, the same stride, padding
/// and dilation on both axes.
pub fn conv2d(group: usize, k: usize, stride: usize, pad: usize, dil: usize) -> ConvAttrs {
    ConvAttrs {
        auto_pad: AutoPad::NotSet,
        dilations: vec![dil, dil],
        group,
        kernel_shape: vec![k, k],
        pads: vec![pad; 4],
        strides: vec![stride, stride],
    }
}

/// `FusedOp::Conv` with these attributes and activation.
pub fn fused_conv(conv: ConvAttrs, act: FusedAct) -> Op {
    Op::Fused(FusedOp::Conv { conv, act })
}

/// Relu6, as MobileNets write it: Clip to [0, 6].
pub const RELU6: FusedAct = FusedAct::Clip { min: 0.0, max: 6.0 };

pub struct Builder {
    pub g: Graph,
    n: usize,
}

impl Builder {
    pub fn new() -> Builder {
        Builder {
            g: Graph {
                name: "test".into(),
                ..Default::default()
            },
            n: 0,
        }
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) {
        self.input_dims(name, dtype, shape.iter().map(|&d| Dim::Known(d)).collect());
    }

    pub fn input_dims(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) {
        self.g.inputs.push(ValueInfo {
            name: name.into(),
            ty: ValueType::new(dtype, Some(dims)),
        });
    }

    /// An input whose rank is unknown.
    pub fn input_unranked(&mut self, name: &str, dtype: DType) {
        self.g.inputs.push(ValueInfo {
            name: name.into(),
            ty: ValueType::new(dtype, None),
        });
    }

    pub fn init(&mut self, name: &str, t: Tensor) -> String {
        self.g.initializers.insert(name.into(), Arc::new(t));
        name.to_string()
    }

    pub fn init_f32(&mut self, name: &str, shape: &[usize], v: Vec<f32>) -> String {
        self.init(name, Tensor::from_vec(shape.to_vec(), v).unwrap())
    }

    /// A constant of random values in [lo, hi).
    pub fn init_rand(&mut self, name: &str, shape: &[usize], lo: f32, hi: f32) -> String {
        let n: usize = shape.iter().product();
        let mut r = Rng(0x9e37_79b9 ^ (self.g.initializers.len() as u64 + 1) * 7919);
        let v = (0..n).map(|_| lo + (hi - lo) * r.unit()).collect();
        self.init_f32(name, shape, v)
    }

    pub fn init_i64(&mut self, name: &str, v: Vec<i64>) -> String {
        self.init(name, Tensor::from_vec(vec![v.len()], v).unwrap())
    }

    pub fn scalar(&mut self, name: &str, v: f32) -> String {
        self.init(name, Tensor::scalar(v))
    }

    /// Adds a node; "" in `inputs`/`outputs` is an omitted optional slot.
    pub fn node(&mut self, op: Op, inputs: &[&str], outputs: &[&str]) {
        let opt = |s: &&str| (!s.is_empty()).then(|| s.to_string());
        self.n += 1;
        self.g.nodes.push(Node {
            name: format!("{}_{}", op.name(), self.n),
            op,
            inputs: inputs.iter().map(opt).collect(),
            outputs: outputs.iter().map(opt).collect(),
        });
    }

    pub fn output(&mut self, name: &str, dtype: DType) {
        self.g.outputs.push(ValueInfo {
            name: name.into(),
            ty: ValueType::new(dtype, None),
        });
    }

    /// The graph, inferred.
    pub fn finish(mut self) -> Graph {
        kiln_ir::infer::infer_graph(&mut self.g, &HashMap::new()).expect("test graph infers");
        self.g
    }
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Random inputs for every required graph input: f32 in [-2, 2), integers in
/// [0, int_hi), bools. Named dims take the value `sym` unless `dims` binds them.
pub fn random_inputs(
    g: &Graph,
    seed: u64,
    dims: &HashMap<String, usize>,
    sym: usize,
    int_hi: i64,
) -> HashMap<String, Tensor> {
    let mut r = Rng(seed);
    let mut out = HashMap::new();
    for vi in g.required_inputs() {
        let shape: Vec<usize> = vi
            .ty
            .shape
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|d| match d {
                Dim::Known(v) => *v,
                Dim::Named(n) => dims.get(n).copied().unwrap_or(sym),
                _ => sym,
            })
            .collect();
        let n: usize = shape.iter().product();
        let t = match vi.ty.dtype {
            DType::F32 => Tensor::from_vec(
                shape,
                (0..n).map(|_| 4.0 * r.unit() - 2.0).collect::<Vec<f32>>(),
            ),
            DType::F64 => Tensor::from_vec(
                shape,
                (0..n)
                    .map(|_| 4.0 * r.unit() as f64 - 2.0)
                    .collect::<Vec<f64>>(),
            ),
            DType::I64 => Tensor::from_vec(
                shape,
                (0..n)
                    .map(|_| (r.next() % int_hi as u64) as i64)
                    .collect::<Vec<i64>>(),
            ),
            DType::I32 => Tensor::from_vec(
                shape,
                (0..n)
                    .map(|_| (r.next() % int_hi as u64) as i32)
                    .collect::<Vec<i32>>(),
            ),
            DType::Bool => Tensor::from_vec(
                shape,
                (0..n).map(|_| r.next() % 2 == 0).collect::<Vec<bool>>(),
            ),
            d => panic!("random_inputs: no generator for {d}"),
        }
        .unwrap();
        out.insert(vi.name.clone(), t);
    }
    out
}

/// Runs a straight-line graph (no control flow) with the reference kernels
/// and returns its outputs by name.
pub fn run_graph(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, String> {
    let order = g.topo_order(&HashSet::new()).map_err(|e| e.to_string())?;
    let mut env: HashMap<String, Tensor> = g
        .initializers
        .iter()
        .map(|(k, v)| (k.clone(), (**v).clone()))
        .collect();
    for (k, v) in inputs {
        env.insert(k.clone(), v.clone());
    }
    for i in order {
        let n = &g.nodes[i];
        if !n.op.subgraphs().is_empty() {
            return Err(format!("node '{}' ({}) has subgraphs", n.name, n.op.name()));
        }
        let ins: Vec<Option<&Tensor>> = n
            .inputs
            .iter()
            .map(|o| o.as_ref().and_then(|name| env.get(name)))
            .collect();
        let outs = kiln_cpu::run_op(&n.op, &ins, n.outputs.len())
            .map_err(|e| format!("node '{}' ({}): {e}", n.name, n.op.name()))?;
        for (name, t) in n.outputs.iter().zip(outs) {
            if let Some(name) = name {
                env.insert(name.clone(), t);
            }
        }
    }
    g.outputs
        .iter()
        .map(|o| {
            env.remove(&o.name)
                .map(|t| (o.name.clone(), t))
                .ok_or_else(|| format!("output '{}' was not computed", o.name))
        })
        .collect()
}

/// The largest absolute difference between two output sets, after checking
/// they have the same names, dtypes and shapes and agree within
/// `rel * max(1, |a|)` elementwise (NaN matches NaN).
pub fn compare_outputs(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, rel: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "different output sets");
    let mut worst = 0.0f64;
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.dtype(), tb.dtype(), "output {name}: dtype");
        assert_eq!(ta.shape(), tb.shape(), "output {name}: shape");
        if ta.dtype().is_numeric() {
            let va = ta.to_f64_vec().unwrap();
            let vb = tb.to_f64_vec().unwrap();
            for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
                if x.is_nan() && y.is_nan() {
                    continue;
                }
                let d = (x - y).abs();
                assert!(
                    d <= rel * x.abs().max(1.0),
                    "output {name}[{i}]: {x} before vs {y} after"
                );
                worst = worst.max(d);
            }
        } else {
            assert_eq!(ta, tb, "output {name}");
        }
    }
    worst
}

/// The context `optimize` would give a pass on this graph.
pub fn ctx_for(g: &Graph) -> PassCtx {
    let mut probe = g.clone();
    let (_, values) =
        kiln_ir::infer::infer_graph_with_values(&mut probe, &HashMap::new(), &HashMap::new())
            .expect("graph infers");
    PassCtx {
        max_folded_bytes: 64 << 20,
        sym_values: values,
    }
}

/// Asserts `after` validates, re-infers and computes what `before` does on
/// two random input sets.
pub fn assert_equivalent(before: &Graph, after: &Graph) {
    after
        .topo_order(&HashSet::new())
        .expect("optimized graph validates");
    let mut re = after.clone();
    kiln_ir::infer::infer_graph(&mut re, &HashMap::new()).expect("optimized graph re-infers");
    for seed in [1u64, 77] {
        let ins = random_inputs(before, seed, &HashMap::new(), 3, 5);
        let want = run_graph(before, &ins).expect("original runs");
        let got = run_graph(after, &ins).expect("optimized runs");
        compare_outputs(&want, &got, 1e-4);
    }
}

/// Runs `pass` on a copy of `g`, checks equivalence, and returns the result
/// and the pass's rewrite count.
pub fn check_pass(g: &Graph, pass: fn(&mut Graph, &PassCtx) -> usize) -> (Graph, usize) {
    let mut after = g.clone();
    let n = pass(&mut after, &ctx_for(g));
    assert_equivalent(g, &after);
    (after, n)
}

/// Counts nodes whose op name is `name` (`"FusedConv"`, `"Relu"`, ...).
pub fn count_op(g: &Graph, name: &str) -> usize {
    g.nodes.iter().filter(|n| n.op.name() == name).count()
}
