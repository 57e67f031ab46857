//! Common-subexpression elimination: two nodes with the same op, the same
//! attributes and the same inputs compute the same values, so the later one's
//! readers are pointed at the earlier one's outputs. Equal small constants are
//! merged first, so that nodes reading equal copies of a constant match too.
//!
//! Nodes with subgraphs and sequence ops are left alone, as are nodes whose
//! outputs are graph outputs or read by subgraphs.

use crate::util::{constant, Index};
use crate::PassCtx;
use kiln_ir::{Graph, Op};
use std::collections::HashMap;

/// Constants up to this size are compared for merging.
const MAX_MERGE_BYTES: usize = 64 << 10;

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    let Some(ix) = Index::new(g) else {
        return 0;
    };
    let mut count = 0;

    let mut seen: HashMap<(&'static str, Vec<Option<String>>), Vec<usize>> = HashMap::new();
    let mut dead = Vec::new();
    for &i in &ix.order {
        let n = &g.nodes[i];
        if !n.op.subgraphs().is_empty() || matches!(n.op, Op::Seq(_)) {
            continue;
        }
        if n.present_outputs().any(|o| ix.is_pinned(o)) {
            continue;
        }
        let key = (n.op.name(), n.inputs.clone());
        let earlier = seen.entry(key).or_default();
        let twin = earlier.iter().copied().find(|&j| {
            let m = &g.nodes[j];
            m.op == n.op
                && m.outputs.len() == n.outputs.len()
                && n.outputs
                    .iter()
                    .zip(&m.outputs)
                    .all(|(a, b)| a.is_none() || b.is_some())
        });
        let Some(j) = twin else {
            earlier.push(i);
            continue;
        };
        let pairs: Vec<(String, String)> = n
            .outputs
            .iter()
            .zip(&g.nodes[j].outputs)
            .filter_map(|(a, b)| Some((a.clone()?, b.clone()?)))
            .collect();
        for (from, to) in pairs {
            for m in g.nodes.iter_mut() {
                for inp in m.inputs.iter_mut().flatten() {
                    if *inp == from {
                        *inp = to.clone();
                    }
                }
            }
        }
        dead.push(i);
        count += 1;
    }
    crate::util::remove_nodes(g, &dead);
    count
}

/// The constant-merging pass (run before node CSE): see [`merge_constants_in`].
pub fn merge_constants(g: &mut Graph, _ctx: &PassCtx) -> usize {
    match Index::new(g) {
        Some(ix) => merge_constants_in(g, &ix),
        None => 0,
    }
}

/// Points readers of equal small constants at one of them (the first by
/// name). Returns how many constants were merged away.
fn merge_constants_in(g: &mut Graph, ix: &Index) -> usize {
    let mut groups: HashMap<(kiln_ir::DType, Vec<usize>), Vec<String>> = HashMap::new();
    for (name, t) in &g.initializers {
        if t.byte_size() <= MAX_MERGE_BYTES
            && constant(g, ix, name).is_some()
            && !ix.is_pinned(name)
        {
            groups
                .entry((t.dtype(), t.shape().to_vec()))
                .or_default()
                .push(name.clone());
        }
    }
    let mut rename: HashMap<String, String> = HashMap::new();
    for names in groups.values() {
        if names.len() < 2 {
            continue;
        }
        let mut canon: Vec<&String> = Vec::new();
        for name in names {
            let t = &g.initializers[name];
            match canon.iter().find(|c| *g.initializers[c.as_str()] == **t) {
                Some(c) => {
                    rename.insert(name.clone(), (*c).clone());
                }
                None => canon.push(name),
            }
        }
    }
    if rename.is_empty() {
        return 0;
    }
    for n in g.nodes.iter_mut() {
        for inp in n.inputs.iter_mut().flatten() {
            if let Some(c) = rename.get(inp.as_str()) {
                *inp = c.clone();
            }
        }
    }
    for name in rename.keys() {
        g.initializers.remove(name);
    }
    rename.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use kiln_ir::{BinaryOp, DType, UnaryOp};

    #[test]
    fn merges_duplicate_nodes_and_equal_constants() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3]);
        let c1 = b.init_f32("c1", &[3], vec![1.0, 2.0, 3.0]);
        let c2 = b.init_f32("c2", &[3], vec![1.0, 2.0, 3.0]);
        b.node(Op::Binary(BinaryOp::Add), &["x", &c1], &["a"]);
        b.node(Op::Binary(BinaryOp::Add), &["x", &c2], &["b"]);
        b.node(Op::Unary(UnaryOp::Exp), &["a"], &["ea"]);
        b.node(Op::Unary(UnaryOp::Exp), &["b"], &["eb"]);
        b.node(Op::Binary(BinaryOp::Mul), &["ea", "eb"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (merged, n) = check_pass(&g, merge_constants);
        assert_eq!(n, 1); // c2 -> c1
        let (after, n) = check_pass(&merged, run);
        assert_eq!(n, 2); // b -> a, eb -> ea
        assert_eq!(after.nodes.len(), 3);
        assert_eq!(after.nodes[2].inputs[0], after.nodes[2].inputs[1]);
    }

    #[test]
    fn keeps_nodes_with_different_attributes_or_graph_outputs() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3]);
        b.node(
            Op::Softmax {
                axis: 0,
                coerce_2d: false,
            },
            &["x"],
            &["a"],
        );
        b.node(
            Op::Softmax {
                axis: 1,
                coerce_2d: false,
            },
            &["x"],
            &["b"],
        );
        b.node(Op::Unary(UnaryOp::Exp), &["x"], &["e1"]);
        b.node(Op::Unary(UnaryOp::Exp), &["x"], &["e2"]);
        b.node(Op::Binary(BinaryOp::Add), &["a", "b"], &["y"]);
        b.output("y", DType::F32);
        b.output("e1", DType::F32);
        b.output("e2", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }

    #[test]
    fn leaves_overridable_constants_unmerged() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[3]);
        b.input("c1", DType::F32, &[3]);
        b.init_f32("c1", &[3], vec![1.0; 3]);
        let c2 = b.init_f32("c2", &[3], vec![1.0; 3]);
        b.node(Op::Binary(BinaryOp::Add), &["x", "c1"], &["a"]);
        b.node(Op::Binary(BinaryOp::Add), &["x", &c2], &["b"]);
        b.node(Op::Binary(BinaryOp::Mul), &["a", "b"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, merge_constants);
        assert_eq!(n, 0);
        assert_eq!(after, g);
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 0);
        assert_eq!(after, g);
    }
}
