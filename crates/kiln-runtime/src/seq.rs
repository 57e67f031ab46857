//! Sequence and optional ops, SequenceMap and Scan: the ops whose values are not
//! plain tensors or that run a subgraph, executed here rather than in kiln-cpu.

use crate::control_flow::{execute, kernel_error, node_error, outer_values, want_tensor};
use crate::plan::Step;
use crate::value::{SeqVal, Val};
use crate::Result;
use kiln_ir::{DType, Op, ScanAttrs, SeqOp, Tensor, ValueType};
use std::sync::Arc;

/// Runs one sequence/optional op (or Scan, SequenceMap).
pub(crate) fn run(
    step: &Step,
    op: &SeqOp,
    inputs: &[Option<&Val>],
    values: &[Option<Val>],
) -> Result<Vec<Val>> {
    let err = |m: String| node_error(step, m);
    let input = |i: usize| inputs.get(i).copied().flatten();
    let required = |i: usize, what: &str| {
        input(i).ok_or_else(|| err(format!("missing required input {i} ({what})")))
    };
    let seq = |i: usize| -> Result<&SeqVal> {
        match required(i, "sequence")? {
            Val::Sequence(s) => Ok(s),
            other => Err(err(format!(
                "input {i} must be a sequence, got a {}",
                other.kind_name()
            ))),
        }
    };
    let tensor = |i: usize, what: &str| want_tensor(step, required(i, what)?, what);
    let one = |v: Val| Ok(vec![v]);
    match op {
        SeqOp::SequenceConstruct => {
            let mut items = Vec::with_capacity(inputs.len());
            let mut dtype = None;
            for i in 0..inputs.len() {
                let v = required(i, "tensor")?;
                let Val::Tensor(t) = v else {
                    return Err(err(format!(
                        "input {i} must be a tensor, got a {}",
                        v.kind_name()
                    )));
                };
                match dtype {
                    None => dtype = Some(t.dtype()),
                    Some(d) if d != t.dtype() => {
                        return Err(err(format!(
                            "input {i} is {} but input 0 is {d}: a sequence holds one element type",
                            t.dtype()
                        )))
                    }
                    Some(_) => {}
                }
                items.push(t.clone());
            }
            let dtype = dtype.ok_or_else(|| err("needs at least one input tensor".into()))?;
            one(Val::sequence(dtype, items))
        }
        SeqOp::SequenceEmpty { dtype } => one(Val::sequence(*dtype, Vec::new())),
        SeqOp::SequenceInsert => {
            let s = seq(0)?;
            let t = match required(1, "tensor")? {
                Val::Tensor(t) => t.clone(),
                other => {
                    return Err(err(format!(
                        "input 1 must be a tensor, got a {}",
                        other.kind_name()
                    )))
                }
            };
            if t.dtype() != s.dtype {
                return Err(err(format!(
                    "cannot insert a {} tensor into a sequence of {} tensors",
                    t.dtype(),
                    s.dtype
                )));
            }
            let n = s.items.len();
            let at = match input(2) {
                Some(p) => position(step, want_tensor(step, p, "position")?, n, true)?,
                None => n,
            };
            let mut items = s.items.clone();
            items.insert(at, t);
            one(Val::sequence(s.dtype, items))
        }
        SeqOp::SequenceAt => {
            let s = seq(0)?;
            let at = position(step, tensor(1, "position")?, s.items.len(), false)?;
            one(Val::Tensor(s.items[at].clone()))
        }
        SeqOp::SequenceErase => {
            let s = seq(0)?;
            let n = s.items.len();
            if n == 0 {
                return Err(err("cannot erase from an empty sequence".into()));
            }
            let at = match input(1) {
                Some(p) => position(step, want_tensor(step, p, "position")?, n, false)?,
                None => n - 1,
            };
            let mut items = s.items.clone();
            items.remove(at);
            one(Val::sequence(s.dtype, items))
        }
        SeqOp::SequenceLength => {
            let n =
                i64::try_from(seq(0)?.items.len()).map_err(|_| err("sequence too long".into()))?;
            one(Val::tensor(Tensor::scalar(n)))
        }
        SeqOp::SplitToSequence { axis, keepdims } => {
            let x = tensor(0, "input")?;
            let split = match input(1) {
                Some(v) => Some(want_tensor(step, v, "split")?),
                None => None,
            };
            let parts = split_to_sequence(x, split, *axis, *keepdims).map_err(err)?;
            one(Val::sequence(
                x.dtype(),
                parts.into_iter().map(Arc::new).collect(),
            ))
        }
        SeqOp::ConcatFromSequence { axis, new_axis } => {
            let s = seq(0)?;
            one(Val::tensor(concat_from_sequence(
                step, s, *axis, *new_axis,
            )?))
        }
        SeqOp::SequenceMap { body } => sequence_map(step, body.outputs.as_slice(), inputs, values),
        SeqOp::Optional => one(Val::Optional(input(0).map(|v| Box::new(v.clone())))),
        SeqOp::OptionalHasElement => {
            let has = match input(0) {
                None | Some(Val::Optional(None)) => false,
                Some(_) => true,
            };
            one(Val::tensor(Tensor::scalar(has)))
        }
        SeqOp::OptionalGetElement => match required(0, "optional")? {
            Val::Optional(Some(v)) => one((**v).clone()),
            Val::Optional(None) => Err(err("the optional input is empty".into())),
            other => one(other.clone()),
        },
        SeqOp::Scan(a) => scan(step, a, inputs, values),
    }
}

/// A position input (a one-element int32/int64 tensor) into a sequence of `n`:
/// in `[-n, n-1]`, or `[-n, n]` when `allow_end` (insertion).
fn position(step: &Step, t: &Tensor, n: usize, allow_end: bool) -> Result<usize> {
    if !matches!(t.dtype(), DType::I32 | DType::I64) {
        return Err(node_error(
            step,
            format!("position must be int32 or int64, got {}", t.dtype()),
        ));
    }
    let v = t
        .to_i64_vec()
        .map_err(|e| node_error(step, format!("position: {e}")))?;
    let [p] = v.as_slice() else {
        return Err(node_error(
            step,
            format!("position must hold one value, got shape {:?}", t.shape()),
        ));
    };
    let len = i64::try_from(n).map_err(|_| node_error(step, "sequence too long".into()))?;
    let hi = if allow_end { len } else { len - 1 };
    if *p < -len || *p > hi {
        return Err(node_error(
            step,
            format!(
                "position {p} is out of range for a sequence of {n} (allowed [{}, {hi}])",
                -len
            ),
        ));
    }
    Ok(if *p < 0 {
        (p + len) as usize
    } else {
        *p as usize
    })
}

/// Normalizes `axis` for `rank`.
fn norm_axis(axis: i64, rank: usize) -> std::result::Result<usize, String> {
    let r = i64::try_from(rank).map_err(|_| "rank too large".to_string())?;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(format!(
            "axis {axis} is out of range for rank {rank} (allowed [{}, {}])",
            -r,
            r - 1
        ));
    }
    Ok(a as usize)
}

/// Elements `[start, start+len)` of `t` along `axis`; `squeeze` drops the axis
/// (with `len` 1).
fn slice_axis(
    t: &Tensor,
    axis: usize,
    start: usize,
    len: usize,
    squeeze: bool,
) -> std::result::Result<Tensor, String> {
    let shape = t.shape();
    let dim = shape[axis];
    if start.checked_add(len).is_none_or(|e| e > dim) {
        return Err(format!(
            "slice [{start}, {start}+{len}) exceeds axis {axis} of size {dim}"
        ));
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let indices = (0..outer).flat_map(move |o| {
        (start..start + len).flat_map(move |k| {
            let base = (o * dim + k) * inner;
            base..base + inner
        })
    });
    let data = t.data().gather(indices);
    let mut out_shape = shape.to_vec();
    if squeeze && len == 1 {
        out_shape.remove(axis);
    } else {
        out_shape[axis] = len;
    }
    Tensor::new(out_shape, data).map_err(|e| e.to_string())
}

fn split_to_sequence(
    x: &Tensor,
    split: Option<&Tensor>,
    axis: i64,
    keepdims: bool,
) -> std::result::Result<Vec<Tensor>, String> {
    if x.rank() == 0 {
        return Err("cannot split a scalar".into());
    }
    let a = norm_axis(axis, x.rank())?;
    let dim = x.shape()[a];
    let (sizes, squeeze) = match split {
        None => (vec![1; dim], !keepdims),
        Some(s) => {
            if !s.dtype().is_int() {
                return Err(format!("split must be int32 or int64, got {}", s.dtype()));
            }
            let v = s.to_i64_vec().map_err(|e| e.to_string())?;
            let sizes: Vec<usize> = match s.rank() {
                0 => {
                    let chunk = v.first().copied().unwrap_or(0);
                    let chunk = usize::try_from(chunk)
                        .ok()
                        .filter(|&c| c > 0)
                        .ok_or_else(|| format!("a scalar split must be positive, got {chunk}"))?;
                    let mut sizes = vec![chunk; dim / chunk];
                    let rest = dim % chunk;
                    if rest > 0 {
                        sizes.push(rest);
                    }
                    sizes
                }
                1 => {
                    let sizes = v
                        .iter()
                        .map(|&p| {
                            usize::try_from(p).map_err(|_| format!("split has a negative size {p}"))
                        })
                        .collect::<std::result::Result<Vec<usize>, String>>()?;
                    let total = sizes
                        .iter()
                        .try_fold(0usize, |acc, &p| acc.checked_add(p))
                        .ok_or("split sizes overflow")?;
                    if total != dim {
                        return Err(format!(
                            "split sizes {v:?} add up to {total}, but axis {a} has {dim}"
                        ));
                    }
                    sizes
                }
                r => return Err(format!("split must be a scalar or 1-D, got rank {r}")),
            };
            (sizes, false)
        }
    };
    let mut parts = Vec::with_capacity(sizes.len());
    let mut pos = 0;
    for len in sizes {
        parts.push(slice_axis(x, a, pos, len, squeeze)?);
        pos += len;
    }
    Ok(parts)
}

fn concat_from_sequence(step: &Step, s: &SeqVal, axis: i64, new_axis: bool) -> Result<Tensor> {
    let first = s
        .items
        .first()
        .ok_or_else(|| node_error(step, "cannot concatenate an empty sequence".into()))?;
    let rank = first.rank() + usize::from(new_axis);
    let a = norm_axis(axis, rank).map_err(|m| node_error(step, m))?;
    let mut owned = Vec::new();
    if new_axis {
        for t in &s.items {
            let mut shape = t.shape().to_vec();
            if a > shape.len() {
                return Err(node_error(
                    step,
                    format!(
                        "the sequence's tensors differ in rank ({:?} and {:?})",
                        first.shape(),
                        t.shape()
                    ),
                ));
            }
            shape.insert(a, 1);
            owned.push(
                (**t)
                    .clone()
                    .reshaped(shape)
                    .map_err(|e| node_error(step, e.to_string()))?,
            );
        }
    }
    let refs: Vec<Option<&Tensor>> = if new_axis {
        owned.iter().map(Some).collect()
    } else {
        s.items.iter().map(|t| Some(&**t)).collect()
    };
    let axis = i64::try_from(a).map_err(|_| node_error(step, "axis too large".into()))?;
    let mut out =
        kiln_cpu::run_op(&Op::Concat { axis }, &refs, 1).map_err(|e| kernel_error(step, e))?;
    if out.is_empty() {
        return Err(node_error(step, "Concat produced no output".into()));
    }
    Ok(out.remove(0))
}

/// Stacks equally shaped tensors along a new axis `axis` (`parts` non-empty).
fn stack_along(step: &Step, parts: &[Arc<Tensor>], axis: usize) -> Result<Tensor> {
    let mut owned = Vec::with_capacity(parts.len());
    for p in parts {
        let mut shape = p.shape().to_vec();
        if axis > shape.len() {
            return Err(node_error(
                step,
                format!("cannot stack along axis {axis} tensors of shape {shape:?}"),
            ));
        }
        shape.insert(axis, 1);
        owned.push(
            (**p)
                .clone()
                .reshaped(shape)
                .map_err(|e| node_error(step, e.to_string()))?,
        );
    }
    let refs: Vec<Option<&Tensor>> = owned.iter().map(Some).collect();
    let axis = i64::try_from(axis).map_err(|_| node_error(step, "axis too large".into()))?;
    let mut out =
        kiln_cpu::run_op(&Op::Concat { axis }, &refs, 1).map_err(|e| kernel_error(step, e))?;
    if out.is_empty() {
        return Err(node_error(step, "Concat produced no output".into()));
    }
    Ok(out.remove(0))
}

/// An empty result for zero iterations: the declared element type with `count`
/// (0) inserted at `axis`; dims not known statically are 0 too.
fn empty_like_declared(step: &Step, decl: Option<&ValueType>, axis: i64) -> Result<Tensor> {
    let (dtype, dims): (DType, Vec<usize>) = match decl {
        Some(t) => (
            t.dtype,
            t.shape
                .as_ref()
                .map(|s| s.iter().map(|d| d.known().unwrap_or(0)).collect())
                .unwrap_or_default(),
        ),
        None => (DType::F32, Vec::new()),
    };
    let a = norm_axis(axis, dims.len() + 1).map_err(|m| node_error(step, m))?;
    let mut shape = dims;
    shape.insert(a, 0);
    Tensor::zeros(dtype, shape).map_err(|e| node_error(step, e.to_string()))
}

fn sequence_map(
    step: &Step,
    declared_outputs: &[kiln_ir::ValueInfo],
    inputs: &[Option<&Val>],
    values: &[Option<Val>],
) -> Result<Vec<Val>> {
    let body = &step.subplans[0];
    let outer = outer_values(step, 0, values)?;
    let ins: Vec<&Val> = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| node_error(step, format!("input {i} is missing"))))
        .collect::<Result<_>>()?;
    let n = match ins.first() {
        Some(Val::Sequence(s)) => s.items.len(),
        Some(other) => {
            return Err(node_error(
                step,
                format!("input 0 must be a sequence, got a {}", other.kind_name()),
            ))
        }
        None => return Err(node_error(step, "needs an input sequence".into())),
    };
    for (i, v) in ins.iter().enumerate() {
        match v {
            Val::Sequence(s) if s.items.len() != n => {
                return Err(node_error(
                    step,
                    format!(
                        "input {i} is a sequence of {} but input 0 has {n}",
                        s.items.len()
                    ),
                ))
            }
            Val::Optional(_) => {
                return Err(node_error(
                    step,
                    format!("input {i} is an optional; SequenceMap takes sequences and tensors"),
                ))
            }
            _ => {}
        }
    }
    if body.inputs.len() != ins.len() {
        return Err(node_error(
            step,
            format!(
                "the body takes {} inputs but the node has {}",
                body.inputs.len(),
                ins.len()
            ),
        ));
    }
    let k_out = step.outputs.len();
    if body.outputs.len() < k_out {
        return Err(node_error(
            step,
            format!(
                "the node has {k_out} outputs but the body only {}",
                body.outputs.len()
            ),
        ));
    }
    let mut results: Vec<Vec<Arc<Tensor>>> = vec![Vec::with_capacity(n); k_out];
    for pos in 0..n {
        let feeds = ins
            .iter()
            .zip(&body.inputs)
            .map(|(v, (_, slot))| {
                let fed = match v {
                    Val::Sequence(s) => Val::Tensor(s.items[pos].clone()),
                    other => (*other).clone(),
                };
                (*slot, fed)
            })
            .collect();
        let outs = execute(body, feeds, &outer)?;
        for (k, v) in outs.into_iter().take(k_out).enumerate() {
            match v {
                Val::Tensor(t) => results[k].push(t),
                other => {
                    return Err(node_error(
                        step,
                        format!(
                            "body output {k} is a {}; SequenceMap bodies produce tensors",
                            other.kind_name()
                        ),
                    ))
                }
            }
        }
    }
    let mut out = Vec::with_capacity(k_out);
    for (k, items) in results.into_iter().enumerate() {
        let dtype = match items.first() {
            Some(t) => t.dtype(),
            None => declared_outputs
                .get(k)
                .map(|o| o.ty.dtype)
                .unwrap_or(DType::F32),
        };
        if let Some(bad) = items.iter().find(|t| t.dtype() != dtype) {
            return Err(node_error(
                step,
                format!(
                    "body output {k} is {} at one position and {dtype} at another",
                    bad.dtype()
                ),
            ));
        }
        out.push(Val::sequence(dtype, items));
    }
    Ok(out)
}

/// Scan: opset 9+ semantics per batch entry; the opset-8 (batched) form runs it
/// once per batch row with that row's `sequence_lens`, padding scan outputs
/// past a row's length with zeros.
fn scan(
    step: &Step,
    a: &ScanAttrs,
    inputs: &[Option<&Val>],
    values: &[Option<Val>],
) -> Result<Vec<Val>> {
    let outer = outer_values(step, 0, values)?;
    let skip = usize::from(a.batched);
    let rest = inputs.get(skip..).unwrap_or(&[]);
    let mut tensors: Vec<&Tensor> = Vec::with_capacity(rest.len());
    for (i, v) in rest.iter().enumerate() {
        let v = v.ok_or_else(|| node_error(step, format!("input {} is missing", i + skip)))?;
        tensors.push(want_tensor(step, v, "a Scan state or scan input")?);
    }
    let m = a.num_scan_inputs;
    if m == 0 || m > tensors.len() {
        return Err(node_error(
            step,
            format!(
                "num_scan_inputs is {m} but the node has {} state and scan inputs",
                tensors.len()
            ),
        ));
    }
    let n_state = tensors.len() - m;
    let body = &step.subplans[0];
    if body.inputs.len() != tensors.len() {
        return Err(node_error(
            step,
            format!(
                "the body takes {} inputs but the node feeds {}",
                body.inputs.len(),
                tensors.len()
            ),
        ));
    }
    if body.outputs.len() < n_state {
        return Err(node_error(
            step,
            format!(
                "the body has {} outputs, fewer than its {n_state} states",
                body.outputs.len()
            ),
        ));
    }
    let n_scan_out = body.outputs.len() - n_state;
    // The body's declared scan output types shape empty results (zero iterations).
    let declared: Vec<Option<&ValueType>> = (0..n_scan_out)
        .map(|k| a.body.outputs.get(n_state + k).map(|o| &o.ty))
        .collect();
    let (states, scans) = tensors.split_at(n_state);
    if !a.batched {
        let run = ScanRun {
            step,
            a,
            outer: &outer,
            declared: &declared,
        };
        let (finals, outs) = run.unbatched(
            states.iter().map(|t| Arc::new((*t).clone())).collect(),
            scans,
            None,
        )?;
        return Ok(finals
            .into_iter()
            .chain(outs.into_iter().map(Val::tensor))
            .collect());
    }

    // Opset 8: batch axis 0 everywhere, scan axis 1 of the scan inputs.
    let batch = tensors
        .first()
        .and_then(|t| t.shape().first().copied())
        .ok_or_else(|| node_error(step, "Scan-8 inputs need a batch axis".into()))?;
    for (i, t) in tensors.iter().enumerate() {
        if t.shape().first() != Some(&batch) {
            return Err(node_error(
                step,
                format!(
                    "input {} has shape {:?}, but the batch size is {batch}",
                    i + skip,
                    t.shape()
                ),
            ));
        }
    }
    let full = scans
        .first()
        .and_then(|t| t.shape().get(1).copied())
        .ok_or_else(|| {
            node_error(
                step,
                "Scan-8 scan inputs need [batch, sequence, ...] shapes".into(),
            )
        })?;
    let lens: Vec<usize> = match inputs.first().copied().flatten() {
        None => vec![full; batch],
        Some(v) => {
            let t = want_tensor(step, v, "sequence_lens")?;
            let l = t
                .to_i64_vec()
                .map_err(|e| node_error(step, format!("sequence_lens: {e}")))?;
            if l.len() != batch {
                return Err(node_error(
                    step,
                    format!(
                        "sequence_lens has {} entries for a batch of {batch}",
                        l.len()
                    ),
                ));
            }
            l.iter()
                .map(|&x| {
                    usize::try_from(x)
                        .ok()
                        .filter(|&x| x <= full)
                        .ok_or_else(|| {
                            node_error(step, format!("sequence length {x} is outside [0, {full}]"))
                        })
                })
                .collect::<Result<_>>()?
        }
    };
    let run = ScanRun {
        step,
        a,
        outer: &outer,
        declared: &declared,
    };
    let slice =
        |t: &Tensor, b: usize| slice_axis(t, 0, b, 1, true).map_err(|m| node_error(step, m));
    let mut final_rows: Vec<Vec<Arc<Tensor>>> = vec![Vec::with_capacity(batch); n_state];
    let mut scan_rows: Vec<Vec<Arc<Tensor>>> = vec![Vec::with_capacity(batch); n_scan_out];
    for (b, &len) in lens.iter().enumerate() {
        let st: Vec<Arc<Tensor>> = states
            .iter()
            .map(|t| slice(t, b).map(Arc::new))
            .collect::<Result<_>>()?;
        let sc: Vec<Tensor> = scans.iter().map(|t| slice(t, b)).collect::<Result<_>>()?;
        let sc_refs: Vec<&Tensor> = sc.iter().collect();
        let (finals, outs) = run.unbatched(st, &sc_refs, Some((len, full)))?;
        for (k, f) in finals.into_iter().enumerate() {
            final_rows[k].push(Arc::new(want_tensor(step, &f, "a Scan state")?.clone()));
        }
        for (k, o) in outs.into_iter().enumerate() {
            scan_rows[k].push(Arc::new(o));
        }
    }
    let mut out = Vec::with_capacity(n_state + n_scan_out);
    for (k, rows) in final_rows.into_iter().enumerate() {
        out.push(Val::tensor(if rows.is_empty() {
            Tensor::zeros(states[k].dtype(), states[k].shape().to_vec())
                .map_err(|e| node_error(step, e.to_string()))?
        } else {
            stack_along(step, &rows, 0)?
        }));
    }
    for (k, rows) in scan_rows.into_iter().enumerate() {
        out.push(Val::tensor(if rows.is_empty() {
            // Batch of 0: [0, sequence length, element dims...].
            let inner = empty_like_declared(step, declared[k], 0)?;
            let mut shape = inner.shape().to_vec();
            shape[0] = full;
            shape.insert(0, 0);
            Tensor::zeros(inner.dtype(), shape).map_err(|e| node_error(step, e.to_string()))?
        } else {
            stack_along(step, &rows, 0)?
        }));
    }
    Ok(out)
}

struct ScanRun<'a> {
    step: &'a Step,
    a: &'a ScanAttrs,
    outer: &'a [Val],
    declared: &'a [Option<&'a ValueType>],
}

impl ScanRun<'_> {
    /// One unbatched scan. `limit`: (iterations to run, length to pad scan
    /// outputs to) for the opset-8 form. Returns the final states and the scan
    /// outputs.
    fn unbatched(
        &self,
        states: Vec<Arc<Tensor>>,
        scans: &[&Tensor],
        limit: Option<(usize, usize)>,
    ) -> Result<(Vec<Val>, Vec<Tensor>)> {
        let (step, a) = (self.step, self.a);
        let body = &step.subplans[0];
        let n_state = states.len();
        let mut axes = Vec::with_capacity(scans.len());
        let mut trips: Option<usize> = None;
        for (j, t) in scans.iter().enumerate() {
            let axis = a.input_axes.get(j).copied().unwrap_or(0);
            let ax = norm_axis(axis, t.rank())
                .map_err(|m| node_error(step, format!("scan input {j}: {m}")))?;
            let len = t.shape()[ax];
            match trips {
                None => trips = Some(len),
                Some(tr) if tr != len => {
                    return Err(node_error(
                        step,
                        format!(
                            "scan input {j} has {len} elements along axis {ax}, but scan input 0 has {tr}"
                        ),
                    ))
                }
                Some(_) => {}
            }
            axes.push(ax);
        }
        let full = trips.unwrap_or(0);
        let (iters, pad_to) = limit.unwrap_or((full, full));
        let mut state: Vec<Val> = states.into_iter().map(Val::Tensor).collect();
        let n_scan_out = body.outputs.len() - n_state;
        let mut parts: Vec<Vec<Arc<Tensor>>> = vec![Vec::with_capacity(pad_to); n_scan_out];
        for it in 0..iters {
            let mut feeds: Vec<(usize, Val)> = Vec::with_capacity(body.inputs.len());
            for (k, v) in state.iter().enumerate() {
                feeds.push((body.inputs[k].1, v.clone()));
            }
            for (j, t) in scans.iter().enumerate() {
                let reverse = a.input_reverse.get(j).copied().unwrap_or(false);
                let idx = if reverse { iters - 1 - it } else { it };
                let elem = slice_axis(t, axes[j], idx, 1, true).map_err(|m| node_error(step, m))?;
                feeds.push((body.inputs[n_state + j].1, Val::tensor(elem)));
            }
            let mut outs = execute(body, feeds, self.outer)?;
            let scan_outs = outs.split_off(n_state);
            state = outs;
            for (k, v) in scan_outs.into_iter().enumerate() {
                match v {
                    Val::Tensor(t) => parts[k].push(t),
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
        }
        let mut outs = Vec::with_capacity(n_scan_out);
        for (k, mut p) in parts.into_iter().enumerate() {
            if a.output_reverse.get(k).copied().unwrap_or(false) {
                p.reverse();
            }
            if p.len() < pad_to {
                // Opset 8 rows shorter than the batch's sequence length.
                let zero = match p.first() {
                    Some(t) => Tensor::zeros(t.dtype(), t.shape().to_vec()),
                    None => {
                        let e = empty_like_declared(step, self.declared[k], 0)?;
                        Tensor::zeros(e.dtype(), e.shape()[1..].to_vec())
                    }
                }
                .map_err(|e| node_error(step, e.to_string()))?;
                let zero = Arc::new(zero);
                p.resize(pad_to, zero);
            }
            let axis = a.output_axes.get(k).copied().unwrap_or(0);
            outs.push(if p.is_empty() {
                empty_like_declared(step, self.declared[k], axis)?
            } else {
                let r = p[0].rank() + 1;
                let ax = norm_axis(axis, r)
                    .map_err(|m| node_error(step, format!("scan output {k}: {m}")))?;
                stack_along(step, &p, ax)?
            });
        }
        Ok((state, outs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    #[test]
    fn slices_along_an_axis() {
        let x = t(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let s = slice_axis(&x, 1, 1, 2, false).unwrap();
        assert_eq!(s.shape(), &[2, 2]);
        assert_eq!(s.as_slice::<f32>().unwrap(), &[2., 3., 5., 6.]);
        let s = slice_axis(&x, 0, 1, 1, true).unwrap();
        assert_eq!(s.shape(), &[3]);
        assert_eq!(s.as_slice::<f32>().unwrap(), &[4., 5., 6.]);
        assert!(slice_axis(&x, 1, 2, 2, false).is_err());
        let e = t(vec![0, 3], vec![]);
        assert_eq!(slice_axis(&e, 1, 0, 1, true).unwrap().shape(), &[0]);
    }

    #[test]
    fn split_to_sequence_forms() {
        let x = t(vec![3, 6], (0..18).map(|v| v as f32).collect());
        // scalar split 4 along axis 1: sizes 4, 2.
        let p = split_to_sequence(&x, Some(&Tensor::scalar(4i64)), 1, true).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].shape(), &[3, 4]);
        assert_eq!(p[1].shape(), &[3, 2]);
        assert_eq!(
            p[1].as_slice::<f32>().unwrap(),
            &[4., 5., 10., 11., 16., 17.]
        );
        // 1-D split along a negative axis.
        let p = split_to_sequence(&x, Some(&Tensor::vector(vec![1i64, 2])), -2, true).unwrap();
        assert_eq!(p[1].shape(), &[2, 6]);
        // No split: pieces of 1, squeezed without keepdims.
        let p = split_to_sequence(&x, None, 1, false).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p[5].shape(), &[3]);
        assert_eq!(p[5].as_slice::<f32>().unwrap(), &[5., 11., 17.]);
        let p = split_to_sequence(&x, None, 0, true).unwrap();
        assert_eq!(p[0].shape(), &[1, 6]);
        // Errors, not panics.
        assert!(split_to_sequence(&x, Some(&Tensor::vector(vec![1i64, 1])), 0, true).is_err());
        assert!(split_to_sequence(&x, Some(&Tensor::vector(vec![-1i64, 4])), 0, true).is_err());
        assert!(split_to_sequence(&x, Some(&Tensor::scalar(0i64)), 0, true).is_err());
        assert!(split_to_sequence(&x, None, 2, true).is_err());
        assert!(split_to_sequence(&Tensor::scalar(1.0f32), None, 0, true).is_err());
        // A zero-length axis gives an empty sequence.
        let e = t(vec![0, 2], vec![]);
        assert!(split_to_sequence(&e, None, 0, true).unwrap().is_empty());
    }
}
