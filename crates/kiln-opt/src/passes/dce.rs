//! Dead-node elimination: removes nodes none of whose outputs is read (by a
//! live node, a subgraph of a live node, or as a graph output), and constants
//! nothing reads any more.

use crate::PassCtx;
use kiln_ir::Graph;
use std::collections::HashSet;

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    let Ok(order) = g.topo_order(&HashSet::new()) else {
        return 0;
    };
    let mut needed: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut live = vec![false; g.nodes.len()];
    for &i in order.iter().rev() {
        let n = &g.nodes[i];
        if !n.present_outputs().any(|o| needed.contains(o)) {
            continue;
        }
        live[i] = true;
        needed.extend(n.present_inputs().map(str::to_string));
        for sub in n.op.subgraphs() {
            needed.extend(sub.outer_reads());
        }
    }
    let dead = live.iter().filter(|l| !**l).count();
    if dead > 0 {
        let mut k = 0;
        g.nodes.retain(|_| {
            k += 1;
            live[k - 1]
        });
        let produced: HashSet<&str> = g.nodes.iter().flat_map(|n| n.present_outputs()).collect();
        g.value_types.retain(|k, _| produced.contains(k.as_str()));
    }
    // Constants nothing reads (graph inputs' defaults are part of the interface
    // and stay).
    let inputs: HashSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    let unused: Vec<String> = g
        .initializers
        .keys()
        .filter(|k| !needed.contains(*k) && !inputs.contains(k.as_str()))
        .cloned()
        .collect();
    for k in &unused {
        g.initializers.remove(k);
    }
    dead
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{DType, Op, UnaryOp};

    #[test]
    fn removes_unread_chain_and_its_constants() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3]);
        let c = b.init_f32("c", &[3], vec![1.0, 2.0, 3.0]);
        b.node(Op::Unary(UnaryOp::Relu), &["x"], &["y"]);
        b.node(Op::Binary(kiln_ir::BinaryOp::Add), &["x", &c], &["dead1"]);
        b.node(Op::Unary(UnaryOp::Exp), &["dead1"], &["dead2"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 2);
        assert_eq!(after.nodes.len(), 1);
        assert!(after.initializers.is_empty());
    }

    #[test]
    fn keeps_graph_outputs_and_overridable_defaults() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2]);
        // An input with a default: part of the interface even if unread.
        b.input("opt", DType::F32, &[2]);
        b.init_f32("opt", &[2], vec![0.0, 0.0]);
        b.node(Op::Unary(UnaryOp::Relu), &["x"], &["y"]);
        b.node(Op::Unary(UnaryOp::Exp), &["y"], &["z"]);
        b.output("y", DType::F32);
        b.output("z", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }
}
