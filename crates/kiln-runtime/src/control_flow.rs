//! The plan interpreter, including the control-flow ops (If, Loop) that need to
//! run subgraphs.

use crate::plan::{Plan, Step};
use crate::{Error, Result};
use kiln_cpu::KernelError;
use kiln_ir::{Op, Tensor};
use std::sync::Arc;

/// Runs `plan` with `feeds` bound to its input slots and `outer` bound to its
/// `plan.outer` values (in order). Returns the outputs in `plan.outputs` order.
pub(crate) fn execute(
    plan: &Plan,
    feeds: Vec<(usize, Arc<Tensor>)>,
    outer: &[Arc<Tensor>],
) -> Result<Vec<Arc<Tensor>>> {
    let mut values: Vec<Option<Arc<Tensor>>> = vec![None; plan.num_slots];
    for (slot, t) in &plan.constants {
        values[*slot] = Some(t.clone());
    }
    for ((_, slot), t) in plan.outer.iter().zip(outer) {
        values[*slot] = Some(t.clone());
    }
    for (slot, t) in feeds {
        values[slot] = Some(t);
    }
    for step in &plan.steps {
        let outs = run_step(step, &values)?;
        for (slot, t) in step.outputs.iter().zip(outs) {
            if let Some(slot) = slot {
                values[*slot] = Some(Arc::new(t));
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
            values[slot] = None;
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

fn node_error(step: &Step, message: String) -> Error {
    Error::Node {
        node: step.name.clone(),
        op: step.op.name().to_string(),
        message,
    }
}

fn kernel_error(step: &Step, e: KernelError) -> Error {
    match e {
        KernelError::Invalid(message) => node_error(step, message),
        KernelError::Unsupported(message) => Error::Unsupported {
            node: step.name.clone(),
            op: step.op.name().to_string(),
            message,
        },
    }
}

fn run_step(step: &Step, values: &[Option<Arc<Tensor>>]) -> Result<Vec<Tensor>> {
    let mut inputs: Vec<Option<&Tensor>> = Vec::with_capacity(step.inputs.len());
    for slot in &step.inputs {
        inputs.push(match slot {
            Some(s) => Some(
                values[*s]
                    .as_deref()
                    .ok_or_else(|| node_error(step, format!("input slot {s} is empty")))?,
            ),
            None => None,
        });
    }
    match &step.op {
        Op::If { .. } => run_if(step, &inputs, values),
        Op::Loop { .. } => run_loop(step, &inputs, values),
        op => kiln_cpu::run_op(op, &inputs, step.outputs.len()).map_err(|e| kernel_error(step, e)),
    }
}

/// The enclosing values subplan `i` of `step` reads.
fn outer_values(step: &Step, i: usize, values: &[Option<Arc<Tensor>>]) -> Result<Vec<Arc<Tensor>>> {
    step.subplan_outer[i]
        .iter()
        .map(|s| {
            values[*s]
                .clone()
                .ok_or_else(|| node_error(step, format!("outer value slot {s} is empty")))
        })
        .collect()
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

fn unwrap_arc(t: Arc<Tensor>) -> Tensor {
    Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone())
}

fn run_if(
    step: &Step,
    inputs: &[Option<&Tensor>],
    values: &[Option<Arc<Tensor>>],
) -> Result<Vec<Tensor>> {
    let cond = inputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| node_error(step, "missing input 'cond'".into()))?;
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
    let outs = execute(plan, Vec::new(), &outer)?;
    Ok(outs.into_iter().map(unwrap_arc).collect())
}

/// Loop: inputs (M?, cond?, v_initial...), body (iter, cond, v...) -> (cond, v..., scan...).
fn run_loop(
    step: &Step,
    inputs: &[Option<&Tensor>],
    values: &[Option<Arc<Tensor>>],
) -> Result<Vec<Tensor>> {
    let body = &step.subplans[0];
    let outer = outer_values(step, 0, values)?;
    let max_trips = match inputs.first().copied().flatten() {
        Some(m) => Some(
            m.to_i64_vec()
                .map_err(|e| node_error(step, format!("M: {e}")))?
                .first()
                .copied()
                .unwrap_or(0),
        ),
        None => None,
    };
    let mut cond = match inputs.get(1).copied().flatten() {
        Some(c) => Some(truthy(step, c, "cond")?),
        None => None,
    };
    if max_trips.is_none() && cond.is_none() {
        return Err(node_error(
            step,
            "a Loop with neither a trip count nor a condition never ends".into(),
        ));
    }
    let mut carried: Vec<Arc<Tensor>> = inputs
        .iter()
        .skip(2)
        .map(|t| t.map(|t| Arc::new(t.clone())))
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
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    while max_trips.is_none_or(|m| i < m) && cond.unwrap_or(true) {
        let mut feeds = vec![
            (body.inputs[0].1, Arc::new(Tensor::scalar(i))),
            (
                body.inputs[1].1,
                Arc::new(Tensor::scalar(cond.unwrap_or(true))),
            ),
        ];
        for (k, v) in carried.iter().enumerate() {
            feeds.push((body.inputs[k + 2].1, v.clone()));
        }
        let outs = execute(body, feeds, &outer)?;
        if cond.is_some() {
            cond = Some(truthy(step, &outs[0], "the body's condition output")?);
        }
        carried = outs[1..=n_carried].to_vec();
        for (k, t) in outs[1 + n_carried..].iter().enumerate() {
            scans[k].push((**t).clone());
        }
        i += 1;
    }
    let mut result: Vec<Tensor> = carried.into_iter().map(unwrap_arc).collect();
    for parts in scans {
        result.push(stack(step, parts)?);
    }
    Ok(result)
}

/// Stacks equally shaped tensors along a new leading axis.
fn stack(step: &Step, parts: Vec<Tensor>) -> Result<Tensor> {
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
            p.reshaped(shape)
                .map_err(|e| node_error(step, e.to_string()))?,
        );
    }
    let refs: Vec<Option<&Tensor>> = unsqueezed.iter().map(Some).collect();
    let mut out =
        kiln_cpu::run_op(&Op::Concat { axis: 0 }, &refs, 1).map_err(|e| kernel_error(step, e))?;
    Ok(out.remove(0))
}
