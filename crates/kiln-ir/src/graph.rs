//! Graphs: nodes over named values, plus validation and topological ordering.

use crate::{IrError, Op, Tensor, ValueType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// One operator application.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's name from the model, or a generated `<op>_<index>` when it had none.
    pub name: String,
    pub op: Op,
    /// Input value names; `None` for an omitted optional input.
    pub inputs: Vec<Option<String>>,
    /// Output value names; `None` for an optional output the model does not use.
    pub outputs: Vec<Option<String>>,
}

impl Node {
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs.get(i).and_then(|o| o.as_deref())
    }

    /// The names of the inputs that are present.
    pub fn present_inputs(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().filter_map(|o| o.as_deref())
    }

    pub fn present_outputs(&self) -> impl Iterator<Item = &str> {
        self.outputs.iter().filter_map(|o| o.as_deref())
    }
}

/// A named graph input or output with its declared type.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: ValueType,
}

/// A computation graph. Subgraphs (If branches, Loop bodies) are `Graph`s too and
/// may read values of their enclosing graphs by name.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    /// Inputs the caller provides. An input that also has an initializer is an
    /// overridable default: the caller may feed it or leave it out.
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Constant tensors (ONNX initializers and Constant nodes).
    pub initializers: BTreeMap<String, Arc<Tensor>>,
    pub nodes: Vec<Node>,
    /// Known types of intermediate values (declared by the model or inferred).
    pub value_types: HashMap<String, ValueType>,
}

impl Graph {
    /// Inputs the caller must provide (those without a default initializer).
    pub fn required_inputs(&self) -> impl Iterator<Item = &ValueInfo> {
        self.inputs
            .iter()
            .filter(|i| !self.initializers.contains_key(&i.name))
    }

    /// Total elements and bytes held by initializers (the model's parameters).
    pub fn parameter_stats(&self) -> (usize, usize) {
        self.initializers
            .values()
            .fold((0, 0), |(n, b), t| (n + t.len(), b + t.byte_size()))
    }

    /// The type of a value if the graph knows it (inputs, outputs, initializers,
    /// value_types).
    pub fn value_type(&self, name: &str) -> Option<ValueType> {
        if let Some(t) = self.initializers.get(name) {
            return Some(ValueType::new(
                t.dtype(),
                Some(crate::known_shape(t.shape())),
            ));
        }
        if let Some(vi) = self
            .inputs
            .iter()
            .chain(self.outputs.iter())
            .find(|v| v.name == name)
        {
            return Some(vi.ty.clone());
        }
        self.value_types.get(name).cloned()
    }

    /// Node indices in an order where every value is defined before it is used.
    ///
    /// `outer` holds the names visible from enclosing graphs (empty for the main
    /// graph). Fails, naming the node, on an undefined input, a value defined
    /// twice, or a cycle. Subgraphs are checked recursively.
    pub fn topo_order(&self, outer: &HashSet<String>) -> Result<Vec<usize>, IrError> {
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for out in node.present_outputs() {
                if self.initializers.contains_key(out) || self.inputs.iter().any(|v| v.name == out)
                {
                    return Err(IrError::Invalid(format!(
                        "node '{}' ({}) writes '{}', which is already a graph input or initializer",
                        node.name,
                        node.op.name(),
                        out
                    )));
                }
                if let Some(prev) = producer.insert(out, i) {
                    return Err(IrError::Invalid(format!(
                        "value '{}' is produced by both node '{}' and node '{}'",
                        out, self.nodes[prev].name, node.name
                    )));
                }
            }
        }
        let is_source = |name: &str| {
            self.initializers.contains_key(name)
                || self.inputs.iter().any(|v| v.name == name)
                || outer.contains(name)
        };

        // Kahn's algorithm over node -> node edges.
        let mut indegree = vec![0usize; self.nodes.len()];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for name in node_reads(node) {
                if let Some(&p) = producer.get(name.as_str()) {
                    indegree[i] += 1;
                    users[p].push(i);
                } else if !is_source(&name) {
                    return Err(IrError::Invalid(format!(
                        "node '{}' ({}) reads '{}', which no node, input or initializer defines",
                        node.name,
                        node.op.name(),
                        name
                    )));
                }
            }
        }
        let mut ready: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| indegree[i] == 0)
            .collect();
        ready.reverse();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(i) = ready.pop() {
            order.push(i);
            for &u in users[i].iter().rev() {
                indegree[u] -= 1;
                if indegree[u] == 0 {
                    ready.push(u);
                }
            }
        }
        if order.len() != self.nodes.len() {
            let stuck = (0..self.nodes.len())
                .find(|&i| indegree[i] > 0)
                .map(|i| self.nodes[i].name.clone())
                .unwrap_or_default();
            return Err(IrError::Invalid(format!(
                "the graph has a cycle through node '{stuck}'"
            )));
        }
        for out in &self.outputs {
            if !producer.contains_key(out.name.as_str()) && !is_source(&out.name) {
                return Err(IrError::Invalid(format!(
                    "graph output '{}' is not produced by any node",
                    out.name
                )));
            }
        }

        // Subgraphs see everything defined here plus what this graph sees.
        let mut visible: HashSet<String> = outer.clone();
        visible.extend(self.initializers.keys().cloned());
        visible.extend(self.inputs.iter().map(|v| v.name.clone()));
        visible.extend(producer.keys().map(|s| s.to_string()));
        for node in &self.nodes {
            for sub in node.op.subgraphs() {
                sub.topo_order(&visible).map_err(|e| {
                    IrError::Invalid(format!(
                        "in a subgraph of node '{}' ({}): {e}",
                        node.name,
                        node.op.name()
                    ))
                })?;
            }
        }
        Ok(order)
    }

    /// Names a subgraph reads from enclosing scopes (free variables), including
    /// those read by its own nested subgraphs.
    pub fn outer_reads(&self) -> Vec<String> {
        let mut defined: HashSet<&str> = self.initializers.keys().map(|s| s.as_str()).collect();
        defined.extend(self.inputs.iter().map(|v| v.name.as_str()));
        for n in &self.nodes {
            defined.extend(n.present_outputs());
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let reads = self
            .nodes
            .iter()
            .flat_map(node_reads)
            .chain(self.outputs.iter().map(|o| o.name.clone()));
        for name in reads {
            if !defined.contains(name.as_str()) && seen.insert(name.clone()) {
                out.push(name);
            }
        }
        out
    }
}

/// Every value a node reads: its inputs and the free variables of its subgraphs.
fn node_reads(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = node.present_inputs().map(|s| s.to_string()).collect();
    for sub in node.op.subgraphs() {
        names.extend(sub.outer_reads());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, UnaryOp};

    fn relu(name: &str, input: &str, output: &str) -> Node {
        Node {
            name: name.into(),
            op: Op::Unary(UnaryOp::Relu),
            inputs: vec![Some(input.into())],
            outputs: vec![Some(output.into())],
        }
    }

    fn graph(nodes: Vec<Node>) -> Graph {
        Graph {
            inputs: vec![ValueInfo {
                name: "x".into(),
                ty: ValueType::new(DType::F32, None),
            }],
            outputs: vec![ValueInfo {
                name: "z".into(),
                ty: ValueType::new(DType::F32, None),
            }],
            nodes,
            ..Default::default()
        }
    }

    #[test]
    fn orders_nodes_listed_out_of_order() {
        let g = graph(vec![relu("b", "y", "z"), relu("a", "x", "y")]);
        assert_eq!(g.topo_order(&HashSet::new()).unwrap(), vec![1, 0]);
    }

    #[test]
    fn reports_cycle_and_undefined_value_with_node_name() {
        let g = graph(vec![relu("a", "z", "y"), relu("b", "y", "z")]);
        let e = g.topo_order(&HashSet::new()).unwrap_err().to_string();
        assert!(e.contains("cycle"), "{e}");
        let g = graph(vec![relu("a", "nope", "z")]);
        let e = g.topo_order(&HashSet::new()).unwrap_err().to_string();
        assert!(e.contains("'a'") && e.contains("'nope'"), "{e}");
    }
}
