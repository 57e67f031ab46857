//! The execution plan: the graph's nodes in dependency order over numbered value
//! slots, with each value freed after its last use.

use crate::{Error, Result};
use kiln_cpu::PreparedOp;
use kiln_ir::{Graph, Op, Tensor};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};

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
    /// made once here instead of on every run; shared with the steps of
    /// other plans of the session prepared from the same node and weights.
    pub prepared: Option<Arc<PreparedOp>>,
    /// Inputs whose constant was freed because `prepared` holds its data
    /// (packed): (input index, dtype and shape), for profiles.
    pub held: Vec<(usize, (kiln_ir::DType, Vec<usize>))>,
    /// The op only relabels input 0's shape (Reshape, Flatten, ...) and this
    /// step is that input's last reader: at run time its buffer moves into
    /// the output when nothing else holds it (no copy).
    pub relabels_in_place: bool,
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
    /// data packed (see [`Plan::compile_releasing`]), with their types.
    pub released: Vec<(String, kiln_ir::ValueType)>,
}

impl Plan {
    /// Compiles a subgraph. `outer` names the values visible from enclosing
    /// graphs; `outer_consts` holds those of them that are fixed weights
    /// (enclosing initializers no caller can override), which the subgraph
    /// takes as its own constants, so its kernels are prepared on them as
    /// at the top level (a model that wraps its whole body in an `If` on a
    /// run-time input, such as Silero VAD's sample rate, would otherwise
    /// run every conv and matmul on unpacked weights). Like the top level,
    /// it lets go of a weight once all its readers hold it packed. Returns
    /// the plan and the names of `outer_consts` it still holds (the
    /// enclosing plan may release the others).
    fn compile_sub(
        graph: &Graph,
        outer: &HashSet<String>,
        outer_consts: BTreeMap<String, Arc<Tensor>>,
        shared: &mut SharedPrepared,
    ) -> Result<(Plan, Vec<String>)> {
        let mut inits = graph.initializers.clone();
        let handed: Vec<String> = outer_consts.keys().cloned().collect();
        // (`outer_reads` leaves out the subgraph's own names: nothing here
        // replaces one of its values.)
        inits.extend(outer_consts);
        let plan = Plan::compile_with(graph, &mut inits, true, outer, shared)?;
        let kept = handed
            .into_iter()
            .filter(|n| inits.contains_key(n))
            .collect();
        Ok((plan, kept))
    }

    /// Compiles a top-level graph whose initializers the caller moved into
    /// `inits`. A weight whose only readers are prepared steps that hold it
    /// packed is removed from `inits` as soon as its last reader is prepared,
    /// so the original and the packed copy of every weight never all coexist
    /// (that would double a model's peak memory); those steps get None for it.
    /// A weight that subgraphs read counts as read by each node holding
    /// them, a read done once no subgraph of the node keeps the original.
    pub fn compile_releasing(
        graph: &Graph,
        inits: &mut BTreeMap<String, Arc<Tensor>>,
    ) -> Result<Plan> {
        Plan::compile_with(
            graph,
            inits,
            true,
            &HashSet::new(),
            &mut SharedPrepared::default(),
        )
    }

    fn compile_with(
        graph: &Graph,
        inits: &mut BTreeMap<String, Arc<Tensor>>,
        release: bool,
        outer: &HashSet<String>,
        shared: &mut SharedPrepared,
    ) -> Result<Plan> {
        // The initializers may have been moved out of `graph` into `inits`:
        // they are available values all the same.
        let mut available = outer.clone();
        available.extend(inits.keys().cloned());
        let order = graph
            .topo_order(&available)
            .map_err(|e| Error::InvalidModel(e.to_string()))?;
        let mut slots: HashMap<String, usize> = HashMap::new();

        let mut inputs = Vec::new();
        for vi in &graph.inputs {
            inputs.push((vi.name.clone(), slot_of(&vi.name, &mut slots)));
        }
        for name in inits.keys() {
            slot_of(name, &mut slots);
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
        let overridable: HashSet<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
        // Per fixed initializer, how many reads are left before it could be
        // released: node inputs, one per node whose subgraphs read it, and
        // "never" for graph outputs.
        let mut reads_left: HashMap<String, usize> = HashMap::new();
        if release {
            for node in &graph.nodes {
                for name in node.present_inputs() {
                    *reads_left.entry(name.to_string()).or_default() += 1;
                }
                let by_subgraphs: HashSet<String> = node
                    .op
                    .subgraphs()
                    .iter()
                    .flat_map(|sub| sub.outer_reads())
                    .collect();
                for name in by_subgraphs {
                    *reads_left.entry(name).or_default() += 1;
                }
            }
            for o in &graph.outputs {
                reads_left.insert(o.name.clone(), usize::MAX);
            }
        }
        let mut holders = Holders {
            reads_left,
            ..Holders::default()
        };
        // Tied tables whose only reader is their Gather go now, before any
        // packing: the product's B has the same values, and packing it while
        // both copies lived would raise the load's peak memory by one table.
        let ties = if release {
            find_tied_tables(graph, inits, &overridable)
        } else {
            Vec::new()
        };
        let mut dropped: HashMap<String, (kiln_ir::DType, Vec<usize>)> = HashMap::new();
        for tie in &ties {
            if tie.early && holders.reads_left.get(&tie.table) == Some(&1) {
                if let Some(t) = inits.remove(&tie.table) {
                    holders.record_released(&tie.table, &t);
                    dropped.insert(tie.table.clone(), (t.dtype(), t.shape().to_vec()));
                }
            }
        }
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
            // Weights handed down to the subgraphs: whether some subgraph
            // still holds the original.
            let mut handed: BTreeMap<String, bool> = BTreeMap::new();
            for sub in node.op.subgraphs() {
                let consts: BTreeMap<String, Arc<Tensor>> = sub
                    .outer_reads()
                    .into_iter()
                    .filter(|name| !overridable.contains(name.as_str()))
                    .filter_map(|name| inits.get(&name).map(|t| (name, Arc::clone(t))))
                    .collect();
                for name in consts.keys() {
                    handed.entry(name.clone()).or_insert(false);
                }
                let (plan, kept) = Plan::compile_sub(sub, &visible_below, consts, shared).map_err(
                    |e| match e {
                        Error::InvalidModel(m) => Error::InvalidModel(format!(
                            "in a subgraph of node '{}' ({}): {m}",
                            node.name,
                            node.op.name()
                        )),
                        other => other,
                    },
                )?;
                for name in kept {
                    handed.insert(name, true);
                }
                let feeds: Vec<usize> = plan
                    .outer
                    .iter()
                    .map(|(name, _)| resolve(name, &mut slots))
                    .collect();
                reads.extend(&feeds);
                subplan_outer.push(feeds);
                subplans.push(plan);
            }
            // A dropped table: the step will read it from the product's panels.
            let mut ins = ins;
            let mut held = Vec::new();
            for (idx, name) in node.inputs.iter().enumerate() {
                if let Some(info) = name.as_deref().and_then(|n| dropped.get(n)) {
                    let slot = ins[idx].take();
                    reads.retain(|&s| Some(s) != slot);
                    held.push((idx, info.clone()));
                }
            }
            let outs: Vec<Option<usize>> = node
                .outputs
                .iter()
                .map(|o| o.as_deref().map(|n| slot_of(n, &mut slots)))
                .collect();
            reads_per_step.push(reads);
            let prepared = if node.op.subgraphs().is_empty() {
                let constants: Vec<Option<&Arc<Tensor>>> = node
                    .inputs
                    .iter()
                    .map(|o| {
                        o.as_deref()
                            .filter(|n| !overridable.contains(n))
                            .and_then(|n| inits.get(n))
                    })
                    .collect();
                if constants.iter().any(Option::is_some) {
                    // The first output's shape as inferred, for layout choices.
                    let out_shape: Option<Vec<Option<usize>>> = node
                        .outputs
                        .first()
                        .and_then(|o| o.as_deref())
                        .and_then(|name| graph.value_type(name))
                        .and_then(|t| t.shape)
                        .map(|dims| dims.iter().map(|d| d.known()).collect());
                    shared.prepare(&node.op, &constants, out_shape)
                } else {
                    None
                }
            } else {
                None
            };
            // Each read of a weight a prepared step holds packed counts down;
            // at zero nothing needs the original any more.
            let release_now = prepared.as_ref().and_then(|p| {
                let idx = p.packed_input();
                let name = node.input(idx).filter(|n| inits.contains_key(*n))?;
                holders.note(name, steps.len(), idx)
            });
            steps.push(Step {
                name: node.name.clone(),
                op: node.op.clone(),
                inputs: ins,
                outputs: outs,
                frees: Vec::new(),
                subplans,
                subplan_outer,
                prepared,
                held,
                relabels_in_place: false,
            });
            if let Some(name) = release_now {
                holders.release(&name, inits, &slots, &mut steps, &mut reads_per_step);
            }
            // A weight no subgraph of this node holds unpacked: this node's
            // read of it is done.
            for (name, _) in handed.into_iter().filter(|(_, kept)| !kept) {
                if holders.read_done(&name) {
                    holders.release(&name, inits, &slots, &mut steps, &mut reads_per_step);
                }
            }
        }
        // The Gathers of tied tables read the products' panels, which exist now.
        let step_of: HashMap<usize, usize> =
            order.iter().enumerate().map(|(s, &n)| (n, s)).collect();
        for tie in &ties {
            // Every node has a step (the order covers the whole graph).
            let (Some(&gi), Some(&pi)) = (step_of.get(&tie.gather), step_of.get(&tie.product))
            else {
                continue;
            };
            let shared = steps[pi]
                .prepared
                .as_ref()
                .and_then(|p| kiln_cpu::prepare_gather_from(&steps[gi].op, &tie.shape, p))
                .map(Arc::new);
            match shared {
                Some(p) => {
                    steps[gi].prepared = Some(p);
                    if !dropped.contains_key(&tie.table) {
                        if let Some(name) = holders.note(&tie.table, gi, 0) {
                            holders.release(&name, inits, &slots, &mut steps, &mut reads_per_step);
                        }
                    }
                }
                None if dropped.contains_key(&tie.table) => {
                    return Err(Error::InvalidModel(format!(
                        "internal: node '{}' was to read table '{}' from the packed weights of node '{}', which were not prepared",
                        steps[gi].name, tie.table, steps[pi].name
                    )));
                }
                None => {}
            }
        }
        let constants: Vec<(usize, Arc<Tensor>)> = inits
            .iter()
            .map(|(name, t)| (slots[name], t.clone()))
            .collect();
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

        let mut released = holders.released;
        released.sort_by(|a, b| a.0.cmp(&b.0));
        // Liveness: free each slot after its last reader, unless it is an output.
        let keep: HashSet<usize> = outputs.iter().map(|(_, s)| *s).collect();
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
        for step in &mut steps {
            let relabels = matches!(
                step.op,
                Op::Reshape { .. }
                    | Op::Flatten { .. }
                    | Op::Squeeze
                    | Op::Unsqueeze
                    | Op::Identity
            );
            step.relabels_in_place = relabels
                && step.prepared.is_none()
                && match step.inputs.first() {
                    Some(Some(x)) => {
                        step.frees.contains(x) && !step.inputs[1..].contains(&Some(*x))
                    }
                    _ => false,
                };
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

/// The slot of `name`, allocating the next one on first sight.
fn slot_of(name: &str, slots: &mut HashMap<String, usize>) -> usize {
    let n = slots.len();
    *slots.entry(name.to_string()).or_insert(n)
}

/// Prepared kernels shared by all the plans compiled for one session: the
/// sibling branches of an `If` that read the same enclosing weights (an
/// exported decoder's with-cache and without-cache branches) hold one
/// packing between them, not one each.
#[derive(Default)]
pub(crate) struct SharedPrepared {
    /// Keyed by the address of the node's first constant input.
    by_first: HashMap<usize, Vec<PreparedFor>>,
}

/// What a shared prepared kernel was made from.
struct PreparedFor {
    op: Op,
    /// Per input, the constant it was prepared on. Weak, so the entry does
    /// not keep a released weight alive; while it exists the allocation is
    /// not reused, so the same address is the same tensor.
    constants: Vec<Option<Weak<Tensor>>>,
    out_shape: Option<Vec<Option<usize>>>,
    prepared: Arc<PreparedOp>,
}

impl SharedPrepared {
    /// The kernel of `op` prepared on `constants` (`kiln_cpu::prepare`),
    /// made once per op, constants and output shape.
    fn prepare(
        &mut self,
        op: &Op,
        constants: &[Option<&Arc<Tensor>>],
        out_shape: Option<Vec<Option<usize>>>,
    ) -> Option<Arc<PreparedOp>> {
        let first = constants.iter().flatten().next()?;
        let key = Arc::as_ptr(first) as usize;
        let same = |e: &PreparedFor| {
            e.op == *op
                && e.out_shape == out_shape
                && e.constants.len() == constants.len()
                && e.constants
                    .iter()
                    .zip(constants)
                    .all(|(w, c)| match (w, c) {
                        (None, None) => true,
                        (Some(w), Some(c)) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(c)),
                        _ => false,
                    })
        };
        if let Some(e) = self
            .by_first
            .get(&key)
            .and_then(|v| v.iter().find(|e| same(e)))
        {
            return Some(Arc::clone(&e.prepared));
        }
        let plain: Vec<Option<&Tensor>> = constants.iter().map(|c| c.map(|t| &**t)).collect();
        let prepared = Arc::new(kiln_cpu::prepare(op, &plain, out_shape.as_deref())?);
        self.by_first.entry(key).or_default().push(PreparedFor {
            op: op.clone(),
            constants: constants.iter().map(|c| c.map(Arc::downgrade)).collect(),
            out_shape,
            prepared: Arc::clone(&prepared),
        });
        Some(prepared)
    }
}

/// Which weights prepared steps hold packed, and when each original can go.
#[derive(Default)]
struct Holders {
    /// Per fixed initializer, reads left before it could be released
    /// (`usize::MAX`: never). Empty when the plan releases nothing.
    reads_left: HashMap<String, usize>,
    /// Per weight, the prepared steps that hold it: (step, input).
    by_weight: HashMap<String, Vec<(usize, usize)>>,
    /// Weights released, with their types.
    released: Vec<(String, kiln_ir::ValueType)>,
}

impl Holders {
    /// Step `step` holds weight `name` (its input `idx`). Returns the name
    /// when that was the weight's last read.
    fn note(&mut self, name: &str, step: usize, idx: usize) -> Option<String> {
        self.by_weight
            .entry(name.to_string())
            .or_default()
            .push((step, idx));
        self.read_done(name).then(|| name.to_string())
    }

    /// One read of weight `name` needs the original no more. Returns
    /// whether that was its last read.
    fn read_done(&mut self, name: &str) -> bool {
        match self.reads_left.get_mut(name) {
            Some(left) if *left != usize::MAX && *left > 0 => {
                *left -= 1;
                *left == 0
            }
            _ => false,
        }
    }

    /// Frees weight `name`: its holders get None for it and stop reading its slot.
    fn release(
        &mut self,
        name: &str,
        inits: &mut BTreeMap<String, Arc<Tensor>>,
        slots: &HashMap<String, usize>,
        steps: &mut [Step],
        reads_per_step: &mut [Vec<usize>],
    ) {
        let Some(t) = inits.remove(name) else {
            return;
        };
        let slot = slots[name];
        // (A weight only subgraphs read has no holder here.)
        for &(si, idx) in self.by_weight.get(name).into_iter().flatten() {
            steps[si].inputs[idx] = None;
            steps[si].held.push((idx, (t.dtype(), t.shape().to_vec())));
            reads_per_step[si].retain(|&s| s != slot);
        }
        self.record_released(name, &t);
    }

    /// Notes that weight `name` (`t`) is no longer kept, with its type.
    fn record_released(&mut self, name: &str, t: &Tensor) {
        let ty = kiln_ir::ValueType::new(t.dtype(), Some(kiln_ir::known_shape(t.shape())));
        self.released.push((name.to_string(), ty));
    }
}

/// A Gather whose constant table is bit for bit the transpose of a
/// MatMul/Gemm's packed weights ([`kiln_cpu::tied_table`]).
struct Tie {
    /// Node indices of the Gather and of the product.
    gather: usize,
    product: usize,
    /// The table's name and shape.
    table: String,
    shape: Vec<usize>,
    /// The product packs another initializer (a transposed copy), so the
    /// table can go before any packing.
    early: bool,
}

/// Tied embeddings: a Gather on a constant table D whose transpose some
/// MatMul/Gemm packs (GPT-2's token table and LM head) can read D's rows
/// from those panels, so D need not be kept as well.
fn find_tied_tables(
    graph: &Graph,
    inits: &BTreeMap<String, Arc<Tensor>>,
    overridable: &HashSet<&str>,
) -> Vec<Tie> {
    let constant = |name: Option<&str>| {
        name.filter(|n| !overridable.contains(n))
            .and_then(|n| inits.get_key_value(n))
    };
    let mut ties = Vec::new();
    for (gather, g) in graph.nodes.iter().enumerate() {
        let Some((table, data)) =
            constant(g.input(0)).filter(|_| matches!(g.op, Op::Gather { .. }))
        else {
            continue;
        };
        let product = graph.nodes.iter().enumerate().find_map(|(pi, p)| {
            let (b_name, b) = constant(p.input(1))?;
            kiln_cpu::tied_table(&g.op, data, &p.op, b).then_some((pi, b_name != table))
        });
        if let Some((product, early)) = product {
            ties.push(Tie {
                gather,
                product,
                table: table.clone(),
                shape: data.shape().to_vec(),
                early,
            });
        }
    }
    ties
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{DType, Dim, Node, ValueInfo, ValueType};

    fn node(name: &str, op: Op, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| Some(s.to_string())).collect(),
            outputs: outputs.iter().map(|s| Some(s.to_string())).collect(),
        }
    }

    fn vi(name: &str, shape: &[usize]) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            ty: ValueType::new(
                DType::F32,
                Some(shape.iter().map(|&d| Dim::Known(d)).collect()),
            ),
        }
    }

    fn weight() -> Arc<Tensor> {
        Arc::new(Tensor::from_vec(vec![4, 3], (0..12).map(|v| v as f32).collect()).unwrap())
    }

    /// A branch computing `out = x * w`.
    fn matmul_branch(out: &str, w: &str) -> Graph {
        Graph {
            outputs: vec![vi(out, &[1, 3])],
            nodes: vec![node("mm", Op::MatMul, &["x", w], &[out])],
            ..Default::default()
        }
    }

    /// `y = If(cond, then, else)` over input x `[1, 4]`, with `inits`.
    fn if_graph(then_g: Graph, else_g: Graph, inits: &[&str], w_input: bool) -> Graph {
        let mut inputs = vec![
            vi("x", &[1, 4]),
            ValueInfo {
                name: "cond".into(),
                ty: ValueType::new(DType::Bool, Some(vec![])),
            },
        ];
        if w_input {
            inputs.push(vi("w_default", &[4, 3]));
        }
        let mut g = Graph {
            inputs,
            outputs: vec![vi("y", &[1, 3])],
            nodes: vec![node(
                "if",
                Op::If {
                    then_branch: Box::new(then_g),
                    else_branch: Box::new(else_g),
                },
                &["cond"],
                &["y"],
            )],
            ..Default::default()
        };
        for name in inits {
            g.initializers.insert(name.to_string(), weight());
        }
        g
    }

    /// A branch's MatMul on an enclosing initializer is prepared on it (the
    /// branch holds it as a constant, not as an outer value), and the
    /// enclosing plan lets the original go; one on an initializer the
    /// caller may override (a graph input with a default) still reads it
    /// from outside, unprepared, and it stays.
    #[test]
    fn subgraphs_prepare_on_fixed_enclosing_weights() {
        let g = if_graph(
            matmul_branch("t", "w_fixed"),
            matmul_branch("e", "w_default"),
            &["w_fixed", "w_default"],
            true,
        );
        let mut inits = g.initializers.clone();
        let plan = Plan::compile_releasing(&g, &mut inits).unwrap();
        let step = &plan.steps[0];
        let (then_plan, else_plan) = (&step.subplans[0], &step.subplans[1]);
        assert!(then_plan.steps[0].prepared.is_some());
        assert!(then_plan.outer.iter().all(|(n, _)| n != "w_fixed"));
        assert!(then_plan.constants.is_empty());
        assert!(else_plan.steps[0].prepared.is_none());
        assert!(else_plan.outer.iter().any(|(n, _)| n == "w_default"));
        assert!(!inits.contains_key("w_fixed") && inits.contains_key("w_default"));
        assert!(plan.released.iter().any(|(n, _)| n == "w_fixed"));
    }

    /// Two branches reading the same weight share one packing, and the
    /// original goes once both hold it.
    #[test]
    fn sibling_branches_share_one_packing() {
        let g = if_graph(
            matmul_branch("t", "w"),
            matmul_branch("e", "w"),
            &["w"],
            false,
        );
        let mut inits = g.initializers.clone();
        let plan = Plan::compile_releasing(&g, &mut inits).unwrap();
        let step = &plan.steps[0];
        let (a, b) = (
            step.subplans[0].steps[0].prepared.as_ref().unwrap(),
            step.subplans[1].steps[0].prepared.as_ref().unwrap(),
        );
        assert!(Arc::ptr_eq(a, b));
        assert!(!inits.contains_key("w"));
    }

    /// A weight some branch also reads unpacked (here as its output) stays,
    /// in the enclosing plan and in that branch; an If nested in a branch
    /// is prepared on the outermost weights too.
    #[test]
    fn weights_read_unpacked_stay_and_nested_branches_prepare() {
        let passthrough = Graph {
            outputs: vec![vi("w", &[4, 3])],
            ..Default::default()
        };
        let nested = Graph {
            outputs: vec![vi("inner", &[1, 3])],
            nodes: vec![node(
                "inner_if",
                Op::If {
                    then_branch: Box::new(matmul_branch("n_t", "w")),
                    else_branch: Box::new(matmul_branch("n_e", "w")),
                },
                &["cond"],
                &["inner"],
            )],
            ..Default::default()
        };
        let g = if_graph(nested, passthrough, &["w"], false);
        let mut inits = g.initializers.clone();
        let plan = Plan::compile_releasing(&g, &mut inits).unwrap();
        let step = &plan.steps[0];
        let inner = &step.subplans[0].steps[0];
        assert!(inner.subplans[0].steps[0].prepared.is_some());
        assert!(inner.subplans[1].steps[0].prepared.is_some());
        assert!(!step.subplans[1].constants.is_empty());
        assert!(inits.contains_key("w"));
    }

    /// A Loop body input named like an enclosing initializer is the body's
    /// own value: not replaced by the weight, not prepared on it.
    #[test]
    fn a_body_input_shadowing_a_weight_stays_an_input() {
        let body = Graph {
            inputs: vec![
                ValueInfo {
                    name: "i".into(),
                    ty: ValueType::new(DType::I64, Some(vec![])),
                },
                ValueInfo {
                    name: "c_in".into(),
                    ty: ValueType::new(DType::Bool, Some(vec![])),
                },
                vi("w", &[4, 3]),
            ],
            outputs: vec![
                ValueInfo {
                    name: "c_out".into(),
                    ty: ValueType::new(DType::Bool, Some(vec![])),
                },
                vi("w_out", &[4, 3]),
                vi("scan", &[1, 3]),
            ],
            nodes: vec![
                node("keep", Op::Identity, &["c_in"], &["c_out"]),
                node("carry", Op::Identity, &["w"], &["w_out"]),
                node("mm", Op::MatMul, &["x", "w"], &["scan"]),
            ],
            ..Default::default()
        };
        let mut g = Graph {
            inputs: vec![
                vi("x", &[1, 4]),
                ValueInfo {
                    name: "n".into(),
                    ty: ValueType::new(DType::I64, Some(vec![])),
                },
                vi("start", &[4, 3]),
            ],
            outputs: vec![vi("last", &[4, 3]), vi("all", &[2, 1, 3])],
            nodes: vec![node(
                "loop",
                Op::Loop {
                    body: Box::new(body),
                },
                &["n", "", "start"],
                &["last", "all"],
            )],
            ..Default::default()
        };
        g.nodes[0].inputs[1] = None;
        g.initializers.insert("w".into(), weight());
        let mut inits = g.initializers.clone();
        let plan = Plan::compile_releasing(&g, &mut inits).unwrap();
        let body = &plan.steps[0].subplans[0];
        assert!(body.constants.is_empty());
        assert!(body.steps.iter().all(|s| s.prepared.is_none()));
    }
}
