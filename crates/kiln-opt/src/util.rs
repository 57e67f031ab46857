//! Shared graph queries and edits used by every pass: who produces and who reads
//! each value, constants, known shapes, and the two safe ways of removing a node
//! whose output equals an existing value.

use kiln_ir::{DType, Dim, Graph, Node, Op, Shape, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Producers and readers of every value of one graph (not of its subgraphs).
/// Rebuilt after each rewrite: passes stay simple and rewrites never see stale
/// indices.
pub struct Index {
    /// value -> (node index, output slot)
    pub producer: HashMap<String, (usize, usize)>,
    /// value -> distinct indices of the nodes that take it as an input.
    pub consumers: HashMap<String, Vec<usize>>,
    pub graph_outputs: HashSet<String>,
    pub graph_inputs: HashSet<String>,
    /// Values read by name from inside some node's subgraph. They must be
    /// neither renamed nor removed.
    pub sub_reads: HashSet<String>,
    /// Topological order of the nodes (every pass walks in this order).
    pub order: Vec<usize>,
}

impl Index {
    /// Indexes `g`. `None` when the graph does not validate (passes then do
    /// nothing).
    pub fn new(g: &Graph) -> Option<Index> {
        let order = g.topo_order(&HashSet::new()).ok()?;
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut sub_reads = HashSet::new();
        for (i, n) in g.nodes.iter().enumerate() {
            for (k, o) in n.outputs.iter().enumerate() {
                if let Some(o) = o {
                    producer.insert(o.clone(), (i, k));
                }
            }
            for name in n.present_inputs() {
                let v = consumers.entry(name.to_string()).or_default();
                if v.last() != Some(&i) && !v.contains(&i) {
                    v.push(i);
                }
            }
            for sub in n.op.subgraphs() {
                sub_reads.extend(sub.outer_reads());
            }
        }
        Some(Index {
            producer,
            consumers,
            graph_outputs: g.outputs.iter().map(|o| o.name.clone()).collect(),
            graph_inputs: g.inputs.iter().map(|i| i.name.clone()).collect(),
            sub_reads,
            order,
        })
    }

    /// The node indices reading `v` (each node once).
    pub fn readers(&self, v: &str) -> &[usize] {
        self.consumers.get(v).map(|c| c.as_slice()).unwrap_or(&[])
    }

    /// Whether something other than node inputs sees `v` (a graph output or a
    /// subgraph reading it by name): such a value must keep its name and value.
    pub fn is_pinned(&self, v: &str) -> bool {
        self.graph_outputs.contains(v) || self.sub_reads.contains(v)
    }

    /// The only node reading `v`, when `v` is an intermediate nothing else sees.
    pub fn single_reader(&self, v: &str) -> Option<usize> {
        if self.is_pinned(v) {
            return None;
        }
        match self.readers(v) {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The node producing `v`.
    pub fn producer_of(&self, v: &str) -> Option<usize> {
        self.producer.get(v).map(|&(i, _)| i)
    }
}

/// Rewrites `g` until nothing more matches: rebuilds the index, takes the
/// first node (in topological order) where `find` plans a rewrite, `apply`s
/// it, and starts over (indices shift when nodes go). Returns the number of
/// rewrites; an invalid graph gets none.
pub fn rewrite_each<P>(
    g: &mut Graph,
    find: impl Fn(&Graph, &Index, usize) -> Option<P>,
    mut apply: impl FnMut(&mut Graph, P),
) -> usize {
    let mut count = 0;
    'outer: loop {
        let Some(ix) = Index::new(g) else {
            return count;
        };
        for &i in &ix.order {
            if let Some(plan) = find(g, &ix, i) {
                apply(g, plan);
                count += 1;
                continue 'outer;
            }
        }
        return count;
    }
}

/// A constant: an initializer that the caller cannot override (not also a
/// graph input).
pub fn constant<'g>(g: &'g Graph, ix: &Index, name: &str) -> Option<&'g Arc<Tensor>> {
    if ix.graph_inputs.contains(name) {
        return None;
    }
    g.initializers.get(name)
}

/// The value of a one-element floating constant.
pub fn scalar_const(g: &Graph, ix: &Index, name: &str) -> Option<f64> {
    let t = constant(g, ix, name)?;
    if t.len() != 1 || !t.dtype().is_float() {
        return None;
    }
    t.to_f64_vec().ok()?.first().copied()
}

/// Whether every element of constant `name` equals `v` (exactly).
pub fn const_all_eq(g: &Graph, ix: &Index, name: &str, v: f64) -> bool {
    let Some(t) = constant(g, ix, name) else {
        return false;
    };
    if !t.dtype().is_numeric() || t.is_empty() {
        return false;
    }
    match t.to_f64_vec() {
        Ok(vals) => vals.iter().all(|&x| x == v),
        Err(_) => false,
    }
}

/// Relative closeness for recognizing exporters' rounded constants (0.7071,
/// 1.4142135, 0.044715).
pub fn approx(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-30)
}

/// The dtype of a value, when known.
pub fn dtype_of(g: &Graph, name: &str) -> Option<DType> {
    g.value_type(name)
        .filter(|t| t.is_tensor())
        .map(|t| t.dtype)
}

/// The (symbolic) shape of a tensor value, when its rank is known.
pub fn shape_of(g: &Graph, name: &str) -> Option<Shape> {
    g.value_type(name)
        .filter(|t| t.is_tensor())
        .and_then(|t| t.shape)
}

/// The shape as numbers when every dim is known.
pub fn static_shape(g: &Graph, name: &str) -> Option<Vec<usize>> {
    shape_of(g, name)?.iter().map(Dim::known).collect()
}

/// Whether two values provably have the same shape: both ranks known and the
/// dims equal, with no unknown dim (equal names or equal expressions over
/// names denote equal sizes).
pub fn same_shape(g: &Graph, a: &str, b: &str) -> bool {
    match (shape_of(g, a), shape_of(g, b)) {
        (Some(x), Some(y)) => x == y && x.iter().all(|d| !d.is_unknown()),
        _ => false,
    }
}

/// Every name used anywhere in the graph (values, initializers, inputs,
/// outputs, and names subgraphs read), so new names never collide.
pub fn used_names(g: &Graph) -> HashSet<String> {
    let mut s: HashSet<String> = g.initializers.keys().cloned().collect();
    s.extend(g.inputs.iter().map(|v| v.name.clone()));
    s.extend(g.outputs.iter().map(|v| v.name.clone()));
    s.extend(g.value_types.keys().cloned());
    for n in &g.nodes {
        s.extend(n.present_inputs().map(str::to_string));
        s.extend(n.present_outputs().map(str::to_string));
        for sub in n.op.subgraphs() {
            s.extend(used_names(sub));
        }
    }
    s
}

/// A name starting with `base` that nothing in the graph uses yet.
pub fn fresh_name(g: &Graph, base: &str) -> String {
    let used = used_names(g);
    if !used.contains(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !used.contains(n))
        .expect("an unused name exists")
}

/// Adds a new constant named after `base` and returns its name.
pub fn add_constant(g: &mut Graph, base: &str, t: Tensor) -> String {
    let name = fresh_name(g, base);
    g.initializers.insert(name.clone(), Arc::new(t));
    name
}

/// Makes every reader of `out` read `src` instead, so that the node producing
/// `out` can be removed by the caller (which must then remove it). Returns
/// `false`, changing nothing, when that is not safe.
///
/// When `out` is a graph output, it keeps its name: `src` is renamed to `out`
/// instead, which needs `src` to be a node's output that nothing outside the
/// graph sees.
pub fn redirect(g: &mut Graph, ix: &Index, out: &str, src: &str) -> bool {
    if out == src || ix.sub_reads.contains(out) {
        return false;
    }
    if ix.graph_outputs.contains(out) {
        if !ix.producer.contains_key(src) || ix.is_pinned(src) {
            return false;
        }
        rename_value(g, src, out);
    } else {
        for n in g.nodes.iter_mut() {
            for i in n.inputs.iter_mut().flatten() {
                if i == out {
                    *i = src.to_string();
                }
            }
        }
        g.value_types.remove(out);
    }
    true
}

/// Renames value `from` to `to` in every node output and input of the graph
/// (not in subgraphs: callers check `sub_reads` first). `to`'s type wins.
pub fn rename_value(g: &mut Graph, from: &str, to: &str) {
    for n in g.nodes.iter_mut() {
        for i in n.inputs.iter_mut().flatten() {
            if i == from {
                *i = to.to_string();
            }
        }
        for o in n.outputs.iter_mut().flatten() {
            if o == from {
                *o = to.to_string();
            }
        }
    }
    if let Some(t) = g.value_types.remove(from) {
        g.value_types.entry(to.to_string()).or_insert(t);
    }
}

/// Removes the nodes at `idx` (any order, duplicates allowed) and the types of
/// the values only they produced.
pub fn remove_nodes(g: &mut Graph, idx: &[usize]) {
    let mut idx = idx.to_vec();
    idx.sort_unstable();
    idx.dedup();
    for &i in idx.iter().rev() {
        let n = g.nodes.remove(i);
        for o in n.present_outputs() {
            if !g.nodes.iter().any(|m| m.present_outputs().any(|x| x == o)) {
                g.value_types.remove(o);
            }
        }
    }
}

/// The other input of a two-input node, given one of them.
pub fn other_input<'n>(n: &'n Node, this: &str) -> Option<&'n str> {
    match (n.input(0), n.input(1)) {
        (Some(a), Some(b)) if a == this => Some(b),
        (Some(a), Some(b)) if b == this => Some(a),
        _ => None,
    }
}

/// Whether the op is a binary op of kind `b`, with both inputs present.
pub fn is_binary(n: &Node, b: kiln_ir::BinaryOp) -> bool {
    n.op == Op::Binary(b) && n.inputs.len() == 2 && n.input(0).is_some() && n.input(1).is_some()
}

/// The single output name of a node with exactly one present output.
pub fn single_output(n: &Node) -> Option<&str> {
    let mut it = n.present_outputs();
    let first = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some(first)
}

/// f32 constant tensor from values and a shape.
pub fn f32_tensor(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape, v).expect("internal: f32 tensor of matching length")
}

/// Whether node `node` is the only reader of `v` (and nothing outside the
/// graph sees `v`).
pub fn single_reader_is(ix: &Index, v: &str, node: usize) -> bool {
    ix.single_reader(v) == Some(node)
}
