//! The plan interpreter, including the control-flow ops (If, Loop) that need to
//! run subgraphs. Sequence and optional ops (and Scan) are in `seq.rs`.

use crate::plan::{Plan, Step};
use crate::session::NodeTiming;
use crate::value::{unwrap_arc, Val};
use crate::{Error, Result};
use kiln_cpu::KernelError;
use kiln_ir::{DType, Op, Tensor};
use std::sync::Arc;
use std::time::Instant;

/// Runs `plan` with `feeds` bound to its input slots and `outer` bound to its
/// `plan.outer` values (in order). Returns the outputs in `plan.outputs` order.
pub(crate) fn execute(plan: &Plan, feeds: Vec<(usize, Val)>, outer: &[Val]) -> Result<Vec<Val>> {
    execute_profiled(plan, feeds, outer, None)
}

/// [`execute`], timing each top-level step into `profile` when given.
pub(crate) fn execute_profiled(
    plan: &Plan,
    feeds: Vec<(usize, Val)>,
    outer: &[Val],
    mut profile: Option<&mut Vec<NodeTiming>>,
) -> Result<Vec<Val>> {
    let mut values: Vec<Option<Val>> = vec![None; plan.num_slots];
    for (slot, t) in &plan.constants {
        values[*slot] = Some(Val::Tensor(t.clone()));
    }
    for ((_, slot), v) in plan.outer.iter().zip(outer) {
        values[*slot] = Some(v.clone());
    }
    for (slot, v) in feeds {
        values[slot] = Some(v);
    }
    for step in &plan.steps {
        crate::pool::rewarm();
        // Inputs are described before the step runs: a relabelling step
        // moves its input out of the slot.
        let described = profile.as_ref().map(|_| describe_inputs(step, &values));
        let started = profile.as_ref().map(|_| Instant::now());
        let outs = match relabel_in_place(step, &mut values)? {
            Some(outs) => outs,
            None => run_step(step, &values)?,
        };
        if let (Some(p), Some(t0), Some(inputs)) = (profile.as_deref_mut(), started, described) {
            let seconds = t0.elapsed().as_secs_f64();
            p.push(timing(step, inputs, &outs, seconds));
        }
        for (slot, v) in step.outputs.iter().zip(outs) {
            if let Some(slot) = slot {
                values[*slot] = Some(v);
            }
        }
        if let Some(missing) = step
            .outputs
            .iter()
            .flatten()
            .find(|s| values[**s].is_none())
        {
            return Err(node_error(
                step,
                format!("produced no value for output slot {missing}"),
            ));
        }
        for &slot in &step.frees {
            // An f32 buffer of 4 KiB or more that nothing else holds goes
            // back to the kernels' pool instead of to malloc (see
            // kiln_cpu::buffers).
            if let Some(Val::Tensor(t)) = values[slot].take() {
                if let Ok(t) = Arc::try_unwrap(t) {
                    kiln_cpu::buffers::recycle_tensor(t);
                }
            }
        }
    }
    plan.outputs
        .iter()
        .map(|(name, slot)| {
            values[*slot].clone().ok_or_else(|| {
                Error::InvalidModel(format!("graph output '{name}' was never computed"))
            })
        })
        .collect()
}

fn describe(v: Option<&Val>) -> Option<(DType, Vec<usize>)> {
    v.and_then(|v| v.as_tensor())
        .map(|t| (t.dtype(), t.shape().to_vec()))
}

/// Dtype and shape of each of the step's inputs (packed-and-freed weights
/// from `held`), for profiles.
fn describe_inputs(step: &Step, values: &[Option<Val>]) -> Vec<Option<(DType, Vec<usize>)>> {
    step.inputs
        .iter()
        .enumerate()
        .map(|(i, s)| match step.held.iter().find(|(h, _)| *h == i) {
            Some((_, held)) => Some(held.clone()),
            None => describe(s.and_then(|s| values[s].as_ref())),
        })
        .collect()
}

fn timing(
    step: &Step,
    inputs: Vec<Option<(DType, Vec<usize>)>>,
    outs: &[Val],
    seconds: f64,
) -> NodeTiming {
    NodeTiming {
        node: step.name.clone(),
        op: step.op.name(),
        seconds,
        inputs,
        outputs: outs.iter().map(|v| describe(Some(v))).collect(),
    }
}

pub(crate) fn node_error(step: &Step, message: String) -> Error {
    Error::Node {
        node: step.name.clone(),
        op: step.op.name().to_string(),
        message,
    }
}

pub(crate) fn kernel_error(step: &Step, e: KernelError) -> Error {
    match e {
        KernelError::Invalid(message) => node_error(step, message),
        KernelError::Unsupported(message) => Error::Unsupported {
            node: step.name.clone(),
            op: step.op.name().to_string(),
            message,
        },
    }
}

/// The step's inputs as tensors; a sequence or optional is an error naming the input.
pub(crate) fn tensor_inputs<'a>(
    step: &Step,
    inputs: &[Option<&'a Val>],
) -> Result<Vec<Option<&'a Tensor>>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            None => Ok(None),
            Some(v) => v.as_tensor().map(Some).ok_or_else(|| {
                node_error(
                    step,
                    format!(
                        "input {i} is a {}, but {} takes tensors here",
                        v.kind_name(),
                        step.op.name()
                    ),
                )
            }),
        })
        .collect()
}

/// A step that only relabels its input's shape, run by moving the input's
/// buffer into the output (see `Step::relabels_in_place`). None when the step
/// is not such a one or its input is shared (a constant, a caller's value
/// still held elsewhere): then `run_step` copies as usual.
fn relabel_in_place(step: &Step, values: &mut [Option<Val>]) -> Result<Option<Vec<Val>>> {
    let Some(Some(slot)) = step
        .inputs
        .first()
        .copied()
        .filter(|_| step.relabels_in_place)
    else {
        return Ok(None);
    };
    let shape = {
        let mut inputs: Vec<Option<&Val>> = Vec::with_capacity(step.inputs.len());
        for s in &step.inputs {
            inputs.push(s.and_then(|s| values[s].as_ref()));
        }
        if inputs[0].and_then(Val::as_tensor).is_none() {
            return Ok(None);
        }
        let tensors = tensor_inputs(step, &inputs)?;
        match kiln_cpu::view_shape(&step.op, &tensors) {
            Some(shape) => shape.map_err(|e| kernel_error(step, e))?,
            None => return Ok(None),
        }
    };
    match values[slot].take() {
        Some(Val::Tensor(t)) => match Arc::try_unwrap(t) {
            Ok(t) => {
                let out = t
                    .reshaped(shape)
                    .map_err(|e| node_error(step, e.to_string()))?;
                Ok(Some(vec![Val::tensor(out)]))
            }
            Err(shared) => {
                values[slot] = Some(Val::Tensor(shared));
                Ok(None)
            }
        },
        other => {
            values[slot] = other;
            Ok(None)
        }
    }
}

fn run_step(step: &Step, values: &[Option<Val>]) -> Result<Vec<Val>> {
    let mut inputs: Vec<Option<&Val>> = Vec::with_capacity(step.inputs.len());
    for slot in &step.inputs {
        inputs.push(match slot {
            Some(s) => Some(
                values[*s]
                    .as_ref()
                    .ok_or_else(|| node_error(step, format!("input slot {s} is empty")))?,
            ),
            None => None,
        });
    }
    match &step.op {
        Op::If { .. } => run_if(step, &inputs, values),
        Op::Loop { .. } => run_loop(step, &inputs, values),
        Op::Seq(op) => crate::seq::run(step, op, &inputs, values),
        // Identity passes sequences and optionals on as they are.
        Op::Identity
            if inputs
                .first()
                .copied()
                .flatten()
                .is_some_and(|v| v.as_tensor().is_none()) =>
        {
            Ok(vec![inputs[0].cloned().unwrap_or(Val::Optional(None))])
        }
        op => {
            let tensors = tensor_inputs(step, &inputs)?;
            let outs = match &step.prepared {
                Some(p) => p.run(&tensors, step.outputs.len()),
                None => kiln_cpu::run_op(op, &tensors, step.outputs.len()),
            }
            .map_err(|e| kernel_error(step, e))?;
            Ok(outs.into_iter().map(Val::tensor).collect())
        }
    }
}

/// The enclosing values subplan `i` of `step` reads.
pub(crate) fn outer_values(step: &Step, i: usize, values: &[Option<Val>]) -> Result<Vec<Val>> {
    step.subplan_outer[i]
        .iter()
        .map(|s| {
            values[*s]
                .clone()
                .ok_or_else(|| node_error(step, format!("outer value slot {s} is empty")))
        })
        .collect()
}

/// A tensor input (or body output) that must be a tensor.
pub(crate) fn want_tensor<'a>(step: &Step, v: &'a Val, what: &str) -> Result<&'a Tensor> {
    v.as_tensor().ok_or_else(|| {
        node_error(
            step,
            format!("{what} must be a tensor, got a {}", v.kind_name()),
        )
    })
}

/// Reads a one-element bool (or numeric) tensor as a condition.
fn truthy(step: &Step, t: &Tensor, what: &str) -> Result<bool> {
    if t.len() != 1 {
        return Err(node_error(
            step,
            format!("{what} must hold one element, got shape {:?}", t.shape()),
        ));
    }
    match t.as_slice::<bool>() {
        Some(v) => Ok(v[0]),
        None => Ok(t
            .to_f64_vec()
            .map_err(|e| node_error(step, format!("{what}: {e}")))?[0]
            != 0.0),
    }
}

fn run_if(step: &Step, inputs: &[Option<&Val>], values: &[Option<Val>]) -> Result<Vec<Val>> {
    let cond = inputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| node_error(step, "missing input 'cond'".into()))?;
    let cond = want_tensor(step, cond, "cond")?;
    let branch = if truthy(step, cond, "cond")? { 0 } else { 1 };
    let plan = &step.subplans[branch];
    if plan.outputs.len() != step.outputs.len() {
        return Err(node_error(
            step,
            format!(
                "the branch has {} outputs but the node has {}",
                plan.outputs.len(),
                step.outputs.len()
            ),
        ));
    }
    let outer = outer_values(step, branch, values)?;
    execute(plan, Vec::new(), &outer)
}

/// Loop: inputs (M?, cond?, v_initial...), body (iter, cond, v...) -> (cond, v..., scan...).
/// Loop-carried values may be sequences and optionals; scan outputs are tensors.
fn run_loop(step: &Step, inputs: &[Option<&Val>], values: &[Option<Val>]) -> Result<Vec<Val>> {
    let body = &step.subplans[0];
    let outer = outer_values(step, 0, values)?;
    let max_trips = match inputs.first().copied().flatten() {
        Some(m) => Some(
            want_tensor(step, m, "M")?
                .to_i64_vec()
                .map_err(|e| node_error(step, format!("M: {e}")))?
                .first()
                .copied()
                .unwrap_or(0),
        ),
        None => None,
    };
    let mut cond = match inputs.get(1).copied().flatten() {
        Some(c) => Some(truthy(step, want_tensor(step, c, "cond")?, "cond")?),
        None => None,
    };
    if max_trips.is_none() && cond.is_none() {
        return Err(node_error(
            step,
            "a Loop with neither a trip count nor a condition never ends".into(),
        ));
    }
    let mut carried: Vec<Val> = inputs
        .iter()
        .skip(2)
        .map(|v| v.cloned())
        .collect::<Option<_>>()
        .ok_or_else(|| {
            node_error(
                step,
                "loop-carried initial values must all be present".into(),
            )
        })?;
    let n_carried = carried.len();
    if body.inputs.len() != n_carried + 2 {
        return Err(node_error(
            step,
            format!(
                "the body takes {} inputs but the node feeds {}",
                body.inputs.len(),
                n_carried + 2
            ),
        ));
    }
    if body.outputs.len() < n_carried + 1 {
        return Err(node_error(
            step,
            format!(
                "the body has {} outputs, fewer than 1 + {n_carried}",
                body.outputs.len()
            ),
        ));
    }
    let n_scan = body.outputs.len() - 1 - n_carried;
    let mut scans: Vec<Vec<Arc<Tensor>>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    while max_trips.is_none_or(|m| i < m) && cond.unwrap_or(true) {
        let mut feeds = vec![
            (body.inputs[0].1, Val::tensor(Tensor::scalar(i))),
            (
                body.inputs[1].1,
                Val::tensor(Tensor::scalar(cond.unwrap_or(true))),
            ),
        ];
        for (k, v) in carried.iter().enumerate() {
            feeds.push((body.inputs[k + 2].1, v.clone()));
        }
        let outs = execute(body, feeds, &outer)?;
        if cond.is_some() {
            let c = want_tensor(step, &outs[0], "the body's condition output")?;
            cond = Some(truthy(step, c, "the body's condition output")?);
        }
        carried = outs[1..=n_carried].to_vec();
        for (k, v) in outs[1 + n_carried..].iter().enumerate() {
            match v {
                Val::Tensor(t) => scans[k].push(t.clone()),
                other => {
                    return Err(node_error(
                        step,
                        format!(
                            "scan output {k} of the body is a {}; scan outputs must be tensors",
                            other.kind_name()
                        ),
                    ))
                }
            }
        }
        i += 1;
    }
    let mut result: Vec<Val> = carried;
    for parts in scans {
        result.push(Val::tensor(stack(step, parts)?));
    }
    Ok(result)
}

/// Stacks equally shaped tensors along a new leading axis.
pub(crate) fn stack(step: &Step, parts: Vec<Arc<Tensor>>) -> Result<Tensor> {
    if parts.is_empty() {
        // Zero iterations: the element shape is unknown; an empty f32 vector is
        // what the reference implementation produces too.
        return Ok(Tensor::vector(Vec::<f32>::new()));
    }
    let mut unsqueezed = Vec::with_capacity(parts.len());
    for p in parts {
        let mut shape = vec![1];
        shape.extend_from_slice(p.shape());
        unsqueezed.push(
            unwrap_arc(p)
                .reshaped(shape)
                .map_err(|e| node_error(step, e.to_string()))?,
        );
    }
    let refs: Vec<Option<&Tensor>> = unsqueezed.iter().map(Some).collect();
    let mut out =
        kiln_cpu::run_op(&Op::Concat { axis: 0 }, &refs, 1).map_err(|e| kernel_error(step, e))?;
    if out.is_empty() {
        return Err(node_error(step, "Concat produced no output".into()));
    }
    Ok(out.remove(0))
}
