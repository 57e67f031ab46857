//! The execution plan: the graph's nodes in dependency order over numbered value
//! slots, with each value freed after its last use.

use crate::{Error, Result};
use kiln_ir::{Graph, Op, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One node, resolved to slots.
pub(crate) struct Step {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Option<usize>>,
    pub outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step: dropped right after it runs.
    pub frees: Vec<usize>,
    /// Compiled subgraphs (If: then, else; Loop: body).
    pub subplans: Vec<Plan>,
    /// For each subplan, the slots here that feed its `outer` values, in order.
    pub subplan_outer: Vec<Vec<usize>>,
    /// The kernel specialized on the node's constant inputs (packed weights),
    /// made once here instead of on every run.
    pub prepared: Option<kiln_cpu::PreparedOp>,
    /// Inputs whose constant was freed because `prepared` holds its data
    /// (packed): (input index, dtype and shape), for profiles.
    pub held: Vec<(usize, (kiln_ir::DType, Vec<usize>))>,
}

/// A compiled graph. Subgraph plans read enclosing values through `outer`.
pub(crate) struct Plan {
    pub num_slots: usize,
    /// Constant slots, filled before the first step.
    pub constants: Vec<(usize, Arc<Tensor>)>,
    /// Graph inputs in declaration order: (name, slot).
    pub inputs: Vec<(String, usize)>,
    /// Values read from enclosing graphs: (name, slot here).
    pub outer: Vec<(String, usize)>,
    pub steps: Vec<Step>,
    /// Graph outputs: (name, slot).
    pub outputs: Vec<(String, usize)>,
    /// Initializers not kept as constants because prepared steps hold their
    /// data packed (see [`release_packed_constants`]).
    pub released: Vec<String>,
}

impl Plan {
    /// Compiles `graph`. `outer` names the values visible from enclosing graphs.
    pub fn compile(graph: &Graph, outer: &HashSet<String>) -> Result<Plan> {
        let order = graph
            .topo_order(outer)
            .map_err(|e| Error::InvalidModel(e.to_string()))?;
        let mut slots: HashMap<String, usize> = HashMap::new();

        let mut inputs = Vec::new();
        for vi in &graph.inputs {
            inputs.push((vi.name.clone(), slot_of(&vi.name, &mut slots)));
        }
        let mut constants = Vec::new();
        for (name, t) in &graph.initializers {
            constants.push((slot_of(name, &mut slots), t.clone()));
        }
        // Values defined in this graph; anything else a node reads comes from outside.
        let mut defined: HashSet<String> = slots.keys().cloned().collect();
        for node in &graph.nodes {
            defined.extend(node.present_outputs().map(str::to_string));
        }
        let mut outer_reads = Vec::new();
        let mut visible_below = outer.clone();
        visible_below.extend(defined.iter().cloned());

        // Initializers the caller cannot override: safe to specialize kernels on.
        let fixed = |name: &str| {
            if graph.inputs.iter().any(|i| i.name == name) {
                None
            } else {
                graph.initializers.get(name).map(|t| &**t)
            }
        };
        let mut steps = Vec::with_capacity(order.len());
        // Per step, every slot it reads, including subgraph free variables.
        let mut reads_per_step: Vec<Vec<usize>> = Vec::with_capacity(order.len());
        for &i in &order {
            let node = &graph.nodes[i];
            let mut resolve = |name: &str, slots: &mut HashMap<String, usize>| -> usize {
                if !defined.contains(name) && !slots.contains_key(name) {
                    outer_reads.push(name.to_string());
                }
                slot_of(name, slots)
            };
            let ins: Vec<Option<usize>> = node
                .inputs
                .iter()
                .map(|o| o.as_deref().map(|n| resolve(n, &mut slots)))
                .collect();
            let mut reads: Vec<usize> = ins.iter().flatten().copied().collect();
            let mut subplans = Vec::new();
            let mut subplan_outer = Vec::new();
            for sub in node.op.subgraphs() {
                let plan = Plan::compile(sub, &visible_below).map_err(|e| match e {
                    Error::InvalidModel(m) => Error::InvalidModel(format!(
                        "in a subgraph of node '{}' ({}): {m}",
                        node.name,
                        node.op.name()
                    )),
                    other => other,
                })?;
                let feeds: Vec<usize> = plan
                    .outer
                    .iter()
                    .map(|(name, _)| resolve(name, &mut slots))
                    .collect();
                reads.extend(&feeds);
                subplan_outer.push(feeds);
                subplans.push(plan);
            }
            let outs: Vec<Option<usize>> = node
                .outputs
                .iter()
                .map(|o| o.as_deref().map(|n| slot_of(n, &mut slots)))
                .collect();
            reads_per_step.push(reads);
            let prepared = if node.op.subgraphs().is_empty() {
                let constants: Vec<Option<&Tensor>> = node
                    .inputs
                    .iter()
                    .map(|o| o.as_deref().and_then(fixed))
                    .collect();
                if constants.iter().any(Option::is_some) {
                    kiln_cpu::prepare(&node.op, &constants)
                } else {
                    None
                }
            } else {
                None
            };
            steps.push(Step {
                name: node.name.clone(),
                op: node.op.clone(),
                inputs: ins,
                outputs: outs,
                frees: Vec::new(),
                subplans,
                subplan_outer,
                prepared,
                held: Vec::new(),
            });
        }
        let outputs: Vec<(String, usize)> = graph
            .outputs
            .iter()
            .map(|o| (o.name.clone(), slot_of(&o.name, &mut slots)))
            .collect();
        // Graph outputs that are outer values (a branch returning an enclosing value).
        for (name, _) in &outputs {
            if !defined.contains(name) && !outer_reads.contains(name) {
                outer_reads.push(name.clone());
            }
        }

        let keep: HashSet<usize> = outputs.iter().map(|(_, s)| *s).collect();
        let released_slots =
            release_packed_constants(&mut constants, &mut steps, &mut reads_per_step, &keep);
        let mut released: Vec<String> = slots
            .iter()
            .filter(|(_, s)| released_slots.contains(s))
            .map(|(n, _)| n.clone())
            .collect();
        released.sort();

        // Liveness: free each slot after its last reader, unless it is an output.
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (si, reads) in reads_per_step.iter().enumerate() {
            for &s in reads {
                last_use.insert(s, si);
            }
        }
        for (slot, si) in last_use {
            if !keep.contains(&slot) {
                steps[si].frees.push(slot);
            }
        }
        outer_reads.dedup();
        let outer_slots = outer_reads
            .into_iter()
            .map(|n| {
                let s = slot_of(&n, &mut slots);
                (n, s)
            })
            .collect();
        Ok(Plan {
            num_slots: slots.len(),
            constants,
            inputs,
            outer: outer_slots,
            steps,
            outputs,
            released,
        })
    }
}

/// Drops each constant whose only readers are prepared steps that hold its
/// data packed (their `packed_input`): keeping the original as well would
/// double the weights' memory. Those steps get None for that input.
fn release_packed_constants(
    constants: &mut Vec<(usize, Arc<Tensor>)>,
    steps: &mut [Step],
    reads_per_step: &mut [Vec<usize>],
    keep: &HashSet<usize>,
) -> HashSet<usize> {
    // Per slot: how many reads in all, and how many a prepared op holds.
    let mut reads: HashMap<usize, (usize, usize)> = HashMap::new();
    for (step, step_reads) in steps.iter().zip(reads_per_step.iter()) {
        for &s in step_reads {
            reads.entry(s).or_default().0 += 1;
        }
        if let Some(p) = &step.prepared {
            if let Some(Some(s)) = step.inputs.get(p.packed_input()) {
                reads.entry(*s).or_default().1 += 1;
            }
        }
    }
    let released: HashSet<usize> = constants
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| !keep.contains(s) && matches!(reads.get(s), Some(&(all, held)) if all == held))
        .collect();
    if released.is_empty() {
        return released;
    }
    let described: HashMap<usize, (kiln_ir::DType, Vec<usize>)> = constants
        .iter()
        .filter(|(s, _)| released.contains(s))
        .map(|(s, t)| (*s, (t.dtype(), t.shape().to_vec())))
        .collect();
    constants.retain(|(s, _)| !released.contains(s));
    for (step, step_reads) in steps.iter_mut().zip(reads_per_step.iter_mut()) {
        let Some(idx) = step.prepared.as_ref().map(|p| p.packed_input()) else {
            continue;
        };
        if let Some(slot) = step.inputs.get(idx).copied().flatten() {
            if released.contains(&slot) {
                step.inputs[idx] = None;
                step.held.push((idx, described[&slot].clone()));
                step_reads.retain(|&s| s != slot);
            }
        }
    }
    released
}

/// The slot of `name`, allocating the next one on first sight.
fn slot_of(name: &str, slots: &mut HashMap<String, usize>) -> usize {
    let n = slots.len();
    *slots.entry(name.to_string()).or_insert(n)
}
